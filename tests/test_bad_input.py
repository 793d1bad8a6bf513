"""Bad input across the ``sat`` commands: every case exits 2 with exactly one ``error: ...`` line
on stderr, no traceback, and leaves the existing store, run directory and report untouched.

The module builds, once, what a user would have on disk after a first session: a store of
the synthetic set with mask maps, a trained and evaluated run, a report, and the Tiny
ImageNet / Oxford-17 fixtures with one malformed annotation each. Each case then runs a bad
command against those outputs (in-process through click's CliRunner; two of them through
the installed ``sat`` script in a subprocess) and checks that no file changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from tests.dataset_files import make_oxford17, make_tiny_imagenet

SYN = ["--dataset", "synthetic", "--n", "64", "--n-val", "32", "--image-size", "16",
       "--num-classes", "4"]
CPU = ["--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    w = SimpleNamespace(base=base, store=str(base / "store.zarr"), run=base / "run",
                        report=base / "report")
    w.ckpt = str(w.run / "checkpoints" / "best.safetensors")
    sat = CliRunner()
    for args in (
        ["precompute", *SYN, "--store", w.store, "--weak", "mask", "--chunk-size", "16",
         "--quiet"],
        ["train", "--store", w.store, "--mode", "sat", "--map", "mask", "--epochs", "1",
         "--width", "4", "--batch-size", "32", "--robust-val-samples", "0", "--out",
         str(w.run), *CPU],
        ["eval", "--checkpoint", w.ckpt, "--store", w.store, "--attacks", "pgd5",
         "--eps", "1", "--max-samples", "8", *CPU],
        ["report", str(w.run), "--out", str(w.report)],
    ):
        res = sat.invoke(main, args)
        assert res.exit_code == 0, (args[0], res.output, res.exception)

    w.truncated = base / "truncated.safetensors"
    w.truncated.write_bytes(Path(w.ckpt).read_bytes()[:2000])

    # Tiny ImageNet whose first class's box file has a line with 2 fields instead of 5.
    w.tiny = make_tiny_imagenet(base / "tiny", n_classes=2, per_class=3, size=16)
    boxes = sorted(w.tiny.glob("train/*/*_boxes.txt"))[0]
    boxes.write_text(boxes.read_text() + "garbage\tline\n")
    # Oxford-17 whose first label map is 7x5 while its image is 16x16.
    w.oxford = make_oxford17(base / "oxford", n_classes=2, size=16)
    first_mask = sorted((w.oxford / "labels").glob("*.png"))[0]
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(first_mask)

    # A directory whose root metadata is not JSON, and a copy of the store with a damaged chunk.
    w.corrupt = base / "corrupt.zarr"
    w.corrupt.mkdir()
    (w.corrupt / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    w.damaged = base / "damaged.zarr"
    shutil.copytree(w.store, w.damaged)
    shard = w.damaged / "train" / "maps" / "mask" / "data" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[12] ^= 0xFF
    shard.write_bytes(bytes(raw))

    (base / "unknown_keys.yaml").write_text("epochs: 1\nwidht: 4\n")
    # The last value used to win in silence; both spellings of an option are one key.
    (base / "repeated_key.yaml").write_text("epochs: 1\nwidth: 4\nepochs: 3\n")
    (base / "two_spellings.yaml").write_text("batch-size: 16\nbatch_size: 32\n")
    # Cases that must create a new output point here, outside the hashed tree.
    w.fresh = tmp_path_factory.mktemp("bad_input_fresh")
    (base / "a_file").write_text("not a directory\n")
    return w


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# name -> (arguments built from the world, text the error line must contain)
Case = tuple[Callable[[SimpleNamespace], list[str]], str]
CASES: dict[str, Case] = {
    # teacher
    "teacher: missing data root": (lambda w: [
        "teacher", "--dataset", "tiny-imagenet", "--data-root", str(w.base / "no-such-dir"),
        "--out", str(w.run), *CPU], "no-such-dir"),
    "teacher: unknown dataset": (lambda w: [
        "teacher", "--dataset", "imagenet-99", "--out", str(w.run), *CPU], "imagenet-99"),
    "teacher: unknown architecture": (lambda w: [
        "teacher", *SYN, "--arch", "resnet99", "--out", str(w.run), *CPU], "resnet99"),
    "teacher: zero epochs": (lambda w: [
        "teacher", *SYN, "--epochs", "0", "--out", str(w.run), *CPU], "epochs must be >= 1"),
    "teacher: --out is a file": (lambda w: [
        "teacher", *SYN, "--width", "4", "--epochs", "1", "--out", str(w.base / "a_file"),
        *CPU], "not a directory"),
    # precompute
    "precompute: unknown saliency method": (lambda w: [
        "precompute", *SYN, "--store", w.store, "--teacher", w.ckpt, "--method", "gbp,lrp",
        "--quiet"], "'lrp'"),
    "precompute: truncated teacher checkpoint": (lambda w: [
        "precompute", *SYN, "--store", w.store, "--teacher", str(w.truncated), "--quiet"],
        "truncated or corrupt"),
    "precompute: tiny-imagenet box file with a malformed line": (lambda w: [
        "precompute", "--dataset", "tiny-imagenet", "--data-root", str(w.tiny),
        "--image-size", "16", "--store", w.store, "--weak", "box", "--quiet"],
        "line 4: expected 5 tab-separated fields"),
    "precompute: oxford17 mask of the wrong size": (lambda w: [
        "precompute", "--dataset", "oxford17", "--data-root", str(w.oxford), "--image-size",
        "16", "--store", str(w.fresh / "oxford.zarr"), "--weak", "mask", "--quiet"],
        "is 7x5 but its image"),
    "precompute: into a read-only http store": (lambda w: [
        "precompute", *SYN, "--store", "http://127.0.0.1:9/shared/store.zarr", "--weak",
        "mask", "--quiet"], "read-only"),
    "precompute: chunk size 0": (lambda w: [
        "precompute", *SYN, "--store", w.store, "--chunk-size", "0", "--quiet"],
        "chunk size"),
    "precompute: quantile 1.5": (lambda w: [
        "precompute", *SYN, "--store", w.store, "--teacher", w.ckpt, "--method", "gbp",
        "--quantile", "1.5", "--quiet"], "1.5"),
    "precompute: unknown weak source": (lambda w: [
        "precompute", *SYN, "--store", w.store, "--weak", "polygon", "--quiet"], "polygon"),
    # train
    "train: missing store": (lambda w: [
        "train", "--store", str(w.base / "missing.zarr"), "--mode", "standard", "--out",
        str(w.run), *CPU], "missing.zarr"),
    "train: store of another dataset": (lambda w: [
        "train", "--store", w.store, "--mode", "sat", "--map", "mask", *SYN, "--data-seed",
        "7", "--epochs", "1", "--width", "4", "--out", str(w.run), *CPU], "does not match"),
    "train: unknown mode": (lambda w: [
        "train", "--store", w.store, "--mode", "saliency-dropout", "--out", str(w.run), *CPU],
        "saliency-dropout"),
    "train: unknown map": (lambda w: [
        "train", "--store", w.store, "--mode", "sat", "--map", "resnet10-adv-gbp", "--out",
        str(w.run), *CPU], "resnet10-adv-gbp"),
    "train: zero epochs": (lambda w: [
        "train", "--store", w.store, "--mode", "standard", "--epochs", "0", "--out",
        str(w.run), *CPU], "epochs must be >= 1"),
    "train: yaml config with unknown keys": (lambda w: [
        "train", "--config", str(w.base / "unknown_keys.yaml"), "--store", w.store, "--out",
        str(w.run), *CPU], "widht"),
    "train: yaml config with a repeated key": (lambda w: [
        "train", "--config", str(w.base / "repeated_key.yaml"), "--store", w.store, "--out",
        str(w.run), *CPU], "repeated_key.yaml repeats key 'epochs'"),
    "train: yaml config with a key in two spellings": (lambda w: [
        "train", "--config", str(w.base / "two_spellings.yaml"), "--store", w.store, "--out",
        str(w.run), *CPU], "two_spellings.yaml repeats key 'batch_size'"),
    "train: yaml config that is missing": (lambda w: [
        "train", "--config", str(w.base / "nope.yaml"), "--store", w.store, "--out",
        str(w.run), *CPU], "nope.yaml"),
    "train: corrupt store metadata": (lambda w: [
        "train", "--store", str(w.corrupt), "--mode", "standard", "--out", str(w.run), *CPU],
        "corrupt.zarr"),
    "train: map with a damaged chunk": (lambda w: [
        "train", "--store", str(w.damaged), "--mode", "sat", "--map", "mask", "--epochs", "1",
        "--width", "4", "--out", str(w.run), *CPU], "chunk 0"),
    "train: resume with another mode": (lambda w: [
        "train", "--store", w.store, "--mode", "standard", "--epochs", "2", "--width", "4",
        "--batch-size", "32", "--robust-val-samples", "0", "--out", str(w.run), "--resume",
        *CPU], "--resume: mode was 'sat'"),
    # eval
    "eval: missing checkpoint": (lambda w: [
        "eval", "--checkpoint", str(w.run / "checkpoints" / "nope.safetensors"), "--store",
        w.store, *CPU], "nope.safetensors"),
    "eval: truncated checkpoint": (lambda w: [
        "eval", "--checkpoint", str(w.truncated), "--store", w.store, "--out",
        str(w.run / "eval"), *CPU], "truncated or corrupt"),
    "eval: unknown attack": (lambda w: [
        "eval", "--checkpoint", w.ckpt, "--store", w.store, "--attacks", "pgd5,cw", *CPU],
        "'cw'"),
    "eval: negative epsilon": (lambda w: [
        "eval", "--checkpoint", w.ckpt, "--store", w.store, "--eps", "-1", *CPU], "-1"),
    "eval: other architecture": (lambda w: [
        "eval", "--checkpoint", w.ckpt, "--store", w.store, "--arch", "resnet34", *CPU],
        "resnet34"),
    "eval: unknown split": (lambda w: [
        "eval", "--checkpoint", w.ckpt, "--store", w.store, "--split", "test", *CPU],
        "'test'"),
    # report and cache
    "report: run without results": (lambda w: [
        "report", str(w.run), str(w.base / "tiny"), "--out", str(w.report)],
        "no evaluation results"),
    "cache show: index out of range": (lambda w: [
        "cache", "show", w.store, "mask", "--index", "64", "--out", str(w.report / "m.png")],
        "64"),
    "cache ls: corrupt store": (lambda w: ["cache", "ls", str(w.corrupt)], "corrupt.zarr"),
    "cache info: not a store": (lambda w: ["cache", "info", str(w.run), "mask"],
                                "not a saliency store"),
}


def _check_one_line_error(exit_code: int, stderr: str, expected: str) -> None:
    assert exit_code == 2, (exit_code, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]


def test_at_least_fifteen_distinct_cases_across_the_commands():
    commands = {name.split(":")[0].split()[0] for name in CASES}
    assert len(CASES) >= 15
    assert {"teacher", "precompute", "train", "eval", "report", "cache"} <= commands


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, name):
    make, expected = CASES[name]
    before = _tree_hash(world.base)
    res = CliRunner().invoke(main, make(world))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    _check_one_line_error(res.exit_code, res.stderr, expected)
    assert res.stdout == ""
    assert _tree_hash(world.base) == before


def test_stages_other_than_train_refuse_to_run_once_per_torchrun_rank(world):
    before = _tree_hash(world.base)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", world.ckpt, "--store", world.store,
                                    "--attacks", "pgd5", *CPU], env={"WORLD_SIZE": "2"})
    _check_one_line_error(res.exit_code, res.stderr, "only `sat train` runs under torchrun")
    assert _tree_hash(world.base) == before


SUBPROCESS_CASES = ["eval: truncated checkpoint", "train: corrupt store metadata",
                    "precompute: oxford17 mask of the wrong size"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_no_traceback_reaches_the_terminal(world, name):
    """The installed ``sat`` script, as a user runs it: exit 2, one stderr line, no traceback."""
    make, expected = CASES[name]
    sat = Path(sys.executable).with_name("sat")
    assert sat.is_file(), f"the sat console script is not installed next to {sys.executable}"
    before = _tree_hash(world.base)
    proc = subprocess.run([str(sat), *make(world)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _check_one_line_error(proc.returncode, proc.stderr, expected)
    assert proc.stdout == ""
    assert _tree_hash(world.base) == before
