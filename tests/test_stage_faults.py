"""Fault injection across the stages: each file a stage reads is damaged in turn.

For ``sat teacher``, ``sat precompute``, ``sat train`` and ``sat eval``, every kind of file
the stage reads (dataset images, annotation files, the teacher checkpoint, a training
checkpoint) is truncated, emptied, overwritten with garbage, removed, or (for checkpoints)
given NaN weights, and the stage must: exit 2 with one ``error:`` line that names the
damaged file, create nothing new (no store, no run or --out directory), and leave every
existing file, stores included, byte-identical. The store's own file kinds (metadata,
shards, done flags) are covered by the store's fault tests.

The module builds one small world (an ImageFolder of 8 x 8 images, a width-4 teacher trained
for one epoch, a store with its guided-backprop map, a one-epoch student, an Oxford-17
fixture, a Tiny ImageNet fixture for box files); each case copies what it damages into its
own ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from pipelines.cli import main
from saliency_cache.store import SaliencyStore
from tests.dataset_files import make_imagefolder, make_oxford17, make_tiny_imagenet
from tests.helpers import one_line_error
from trainer.checkpoint import load_checkpoint, save_checkpoint

CPU = ["--device", "cpu", "--quiet"]
TINY = ["--width", "4", "--batch-size", "4", "--robust-val-samples", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("stage_faults")
    w = SimpleNamespace(base=base, images=make_imagefolder(base / "images", per_class=4, size=8))
    w.oxford = make_oxford17(base / "oxford", n_classes=2, size=16)
    w.tiny = make_tiny_imagenet(base / "tiny", n_classes=2, per_class=3, size=16)
    w.teacher_dir = base / "teacher"
    w.store = base / "store.zarr"
    w.run = base / "run"
    data = ["--dataset", "imagefolder", "--data-root", str(w.images)]
    sat = CliRunner()
    res = sat.invoke(main, ["teacher", *data, *TINY, "--epochs", "1", "--out",
                            str(w.teacher_dir), *CPU])
    assert res.exit_code == 0, res.output
    w.teacher = w.teacher_dir / "teacher.safetensors"
    res = sat.invoke(main, ["precompute", *data, "--store", str(w.store), "--teacher",
                            str(w.teacher), "--chunk-size", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    (w.map,) = SaliencyStore.open(w.store, "r").split("train").maps()
    res = sat.invoke(main, ["train", "--store", str(w.store), "--mode", "sat", "--map", w.map,
                            *TINY, "--epochs", "1", "--out", str(w.run), *CPU])
    assert res.exit_code == 0, res.output
    return w


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---- the faults ------------------------------------------------------------------------
def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _garbage(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 4)


def _remove(p: Path) -> None:
    p.unlink()


def _nan_weights(p: Path) -> None:
    ck = load_checkpoint(p)
    name = sorted(ck.model_state)[len(ck.model_state) // 2]
    ck.model_state[name] = torch.full_like(ck.model_state[name], float("nan"))
    # Written directly (not through save_checkpoint's path) so the damage is the only change.
    save_checkpoint(p, ck)


FILE_FAULTS: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate, "empty": _empty, "garbage": _garbage,
}
CHECKPOINT_FAULTS = {**FILE_FAULTS, "removed": _remove, "nan": _nan_weights}
# An empty box file is not a fault: its images have no box, which the map's provenance
# records as missing annotations (see test_an_empty_box_file_is_recorded_as_missing_boxes).
BOX_FILE_FAULTS = {"truncated": _truncate, "garbage": _garbage, "removed": _remove}


# ---- the stages ------------------------------------------------------------------------
# Each builder copies what the case damages into ``tmp`` and returns (command, damaged file,
# outputs that must not appear). A dataset image that is removed is not a fault (the
# listing is the dataset), so images get the file faults only.
def _imagefolder_copy(w, tmp: Path) -> tuple[list[str], Path]:
    root = Path(shutil.copytree(w.images, tmp / "images"))
    return ["--dataset", "imagefolder", "--data-root", str(root)], root / "train/dog/0001.png"


def teacher_on_images(w, tmp):
    data, target = _imagefolder_copy(w, tmp)
    out = tmp / "teacher"
    return ["teacher", *data, *TINY, "--epochs", "1", "--out", str(out), *CPU], target, [out]


def teacher_resume(w, tmp):
    out = Path(shutil.copytree(w.teacher_dir, tmp / "teacher"))
    data = ["--dataset", "imagefolder", "--data-root", str(w.images)]
    cmd = ["teacher", *data, *TINY, "--epochs", "2", "--resume", "--out", str(out), *CPU]
    return cmd, out / "checkpoints/last.safetensors", []


def precompute_images(w, tmp):
    data, target = _imagefolder_copy(w, tmp)
    store = tmp / "new.zarr"
    return (["precompute", *data, "--store", str(store), "--teacher", str(w.teacher),
             "--chunk-size", "4", "--quiet"], target, [store, tmp / "new.precompute.json"])


def precompute_masks(w, tmp):
    root = Path(shutil.copytree(w.oxford, tmp / "oxford"))
    store = tmp / "new.zarr"
    return (["precompute", "--dataset", "oxford17", "--data-root", str(root), "--image-size",
             "16", "--store", str(store), "--weak", "mask", "--quiet"],
            sorted((root / "labels").glob("*.png"))[0], [store])


def precompute_boxes(w, tmp):
    root = Path(shutil.copytree(w.tiny, tmp / "tiny"))
    store = tmp / "new.zarr"
    return (["precompute", "--dataset", "tiny-imagenet", "--data-root", str(root),
             "--image-size", "16", "--store", str(store), "--weak", "box", "--quiet"],
            sorted(root.glob("train/*/*_boxes.txt"))[0], [store])


def precompute_teacher_new_store(w, tmp):
    teacher = Path(shutil.copy(w.teacher, tmp / "teacher.safetensors"))
    store = tmp / "new.zarr"
    return (["precompute", "--dataset", "imagefolder", "--data-root", str(w.images), "--store",
             str(store), "--teacher", str(teacher), "--chunk-size", "4", "--quiet"],
            teacher, [store])


def precompute_teacher_existing_store(w, tmp):
    teacher = Path(shutil.copy(w.teacher, tmp / "teacher.safetensors"))
    store = Path(shutil.copytree(w.store, tmp / "store.zarr"))
    # Another method on the same store: a new map would be created, if anything were.
    return (["precompute", "--dataset", "imagefolder", "--data-root", str(w.images), "--store",
             str(store), "--teacher", str(teacher), "--method", "gradient", "--chunk-size",
             "4", "--quiet"], teacher, [])


def train_resume(w, tmp):
    run = Path(shutil.copytree(w.run, tmp / "run"))
    return (["train", "--store", str(w.store), "--mode", "sat", "--map", w.map, *TINY,
             "--epochs", "2", "--resume", "--out", str(run), *CPU],
            run / "checkpoints/last.safetensors", [])


def eval_checkpoint(w, tmp):
    ckpt = Path(shutil.copy(w.run / "checkpoints/best.safetensors", tmp / "best.safetensors"))
    out = tmp / "eval"
    return (["eval", "--checkpoint", str(ckpt), "--store", str(w.store), "--attacks", "pgd5",
             "--eps", "1", "--out", str(out), *CPU], ckpt, [out])


STAGES: dict[str, tuple[Callable, dict[str, Callable[[Path], None]]]] = {
    "teacher/dataset image": (teacher_on_images, FILE_FAULTS),
    "teacher/resume checkpoint": (teacher_resume, CHECKPOINT_FAULTS),
    "precompute/dataset image": (precompute_images, FILE_FAULTS),
    "precompute/mask annotation": (precompute_masks, FILE_FAULTS),
    "precompute/box annotation": (precompute_boxes, BOX_FILE_FAULTS),
    "precompute/teacher, new store": (precompute_teacher_new_store, CHECKPOINT_FAULTS),
    "precompute/teacher, existing store": (precompute_teacher_existing_store, CHECKPOINT_FAULTS),
    "train/resume checkpoint": (train_resume, CHECKPOINT_FAULTS),
    "eval/checkpoint": (eval_checkpoint, CHECKPOINT_FAULTS),
}
CASES = [(stage, fault) for stage, (_, faults) in STAGES.items() for fault in faults]


def test_every_stage_and_every_file_kind_is_covered():
    assert {s.split("/")[0] for s in STAGES} == {"teacher", "precompute", "train", "eval"}
    assert len(CASES) >= 30


@pytest.mark.parametrize(("stage", "fault"), CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_damaged_input_is_named_and_nothing_is_written(world, tmp_path, stage, fault):
    build, faults = STAGES[stage]
    cmd, target, must_not_exist = build(world, tmp_path)
    faults[fault](target)
    world_before, tmp_before = _tree(world.base), _tree(tmp_path)
    res = CliRunner().invoke(main, cmd)
    line = one_line_error(res)
    assert str(target) in line, line
    assert res.stdout == ""
    for p in must_not_exist:
        assert not p.exists(), f"{p} was left behind"
    assert _tree(tmp_path) == tmp_before
    assert _tree(world.base) == world_before


def test_an_empty_box_file_is_recorded_as_missing_boxes(world, tmp_path):
    cmd, boxes, _ = precompute_boxes(world, tmp_path)
    _empty(boxes)
    res = CliRunner().invoke(main, cmd)
    assert res.exit_code == 0, res.output
    prov = SaliencyStore.open(tmp_path / "new.zarr", "r").split("train").open_map("box").provenance
    assert prov["missing_annotations"] == 3 and prov["encoding"] == "ternary"
