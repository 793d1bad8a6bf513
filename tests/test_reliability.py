"""No silent wrong data, and a failed command leaves nothing behind (issue 13, findings 2-5).

- non-finite teachers and checkpoints are refused, naming the teacher and sample or the
  file and tensor;
- ImageFolder numbers classes once for all splits and refuses an empty class folder (the
  other sources have one class list by construction: checked here);
- precompute checks every input before it creates anything, and removes what a failed run
  created without data; its refusal names a real flag (``--overwrite``);
- messages quote what the user typed and name the file a write failed on.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import trainer.saliency
from pipelines.cli import main
from pipelines.common import DataSpec
from pipelines.precompute import PrecomputeConfig, run
from saliency_cache.errors import SatError
from saliency_cache.store import MapWriter, SaliencyStore
from tests.dataset_files import (
    make_cifar_pickles,
    make_imagefolder,
    make_oxford17,
    make_tiny_imagenet,
)
from tests.helpers import GBP, add_random_map, make_store, one_line_error, teacher_provenance
from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.data import open_dataset
from trainer.models import create_model
from trainer.saliency.maps import NonFiniteSaliencyError, compute_maps

CPU = ["--device", "cpu", "--quiet"]


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*")) if p.is_file()
    }


def _teacher(path: Path, num_classes: int = 2, *, seed: int = 0, in_channels: int = 3,
             **arch_over) -> Path:
    torch.manual_seed(seed)
    model = create_model("resnet10", num_classes, width=4, in_channels=in_channels)
    save_checkpoint(path, Checkpoint(arch={**model.arch, **arch_over},
                                     model_state=model.state_dict(),
                                     extra={"teacher_mode": "standard"}))
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability")
    w = SimpleNamespace(base=base, images=make_imagefolder(base / "images", per_class=4, size=8))
    w.data = ["--dataset", "imagefolder", "--data-root", str(w.images)]
    w.teacher = _teacher(base / "teacher.safetensors")
    w.store = base / "store.zarr"
    res = CliRunner().invoke(main, ["precompute", *w.data, "--store", str(w.store), "--teacher",
                                    str(w.teacher), "--chunk-size", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    (w.map,) = SaliencyStore.open(w.store, "r").split("train").maps()
    return w


def _precompute(w, store, teacher, *extra):
    return CliRunner().invoke(main, ["precompute", *w.data, "--store", str(store), "--teacher",
                                     str(teacher), "--chunk-size", "4", "--quiet", *extra])


# ---- finding 2: non-finite teachers and checkpoints --------------------------------------
def _nan_copy(src: Path, dst: Path, tensor: str = "fc.weight") -> Path:
    ck = load_checkpoint(src) if src.is_file() else None
    assert ck is not None
    ck.model_state[tensor] = torch.full_like(ck.model_state[tensor], float("nan"))
    save_checkpoint(dst, ck)
    return dst


def test_a_nan_teacher_writes_no_map_and_no_store(w, tmp_path):
    teacher = _nan_copy(w.teacher, tmp_path / "nan.safetensors")
    res = _precompute(w, tmp_path / "new.zarr", teacher)
    line = one_line_error(res)
    assert str(teacher) in line and "non-finite" in line and "'fc.weight'" in line, line
    assert not (tmp_path / "new.zarr").exists()


def test_compute_maps_names_the_first_sample_with_non_finite_attributions():
    class Log(torch.nn.Module):  # log of the first pixel: -inf (and an inf gradient) at 0
        def forward(self, x):
            return torch.log(x.flatten(1)[:, :2])

    x = torch.full((4, 1, 2, 2), 0.5)
    x[2, 0, 0, 0] = 0.0
    method = trainer.saliency.create_method("gradient")
    with pytest.raises(NonFiniteSaliencyError) as err:
        compute_maps(method, Log(), x, torch.zeros(4, dtype=torch.long))
    assert err.value.index == 2


def test_non_finite_attributions_stop_precompute_naming_teacher_and_sample(w, tmp_path, monkeypatch):
    def bad(*args, **kw):
        raise NonFiniteSaliencyError(1, "attributions")

    monkeypatch.setattr(trainer.saliency, "compute_maps", bad)
    store = tmp_path / "new.zarr"
    cfg = PrecomputeConfig(store=str(store), data=DataSpec("imagefolder", str(w.images)),
                           teachers=(str(w.teacher),), chunk_size=4, show_progress=False)
    with pytest.raises(SatError) as err:
        run(cfg)
    msg = str(err.value)
    ids = open_dataset("imagefolder", w.images, "train").ids()
    assert str(w.teacher) in msg and repr(ids[1]) in msg and "attributions" in msg, msg
    assert not store.exists()  # the map got no chunk, the store was new: both removed


@pytest.mark.parametrize("stage", ["eval", "train"])
def test_checkpoints_with_non_finite_weights_are_refused(w, tmp_path, stage):
    run_dir = tmp_path / "run"
    ok = CliRunner().invoke(main, ["train", "--store", str(w.store), "--mode", "sat", "--map",
                                   w.map, "--width", "4", "--batch-size", "4", "--epochs", "1",
                                   "--robust-val-samples", "0", "--out", str(run_dir), *CPU])
    assert ok.exit_code == 0, ok.output
    last = run_dir / "checkpoints/last.safetensors"
    _nan_copy(last, last, "layer1.0.conv1.weight")
    before = _tree(tmp_path)
    if stage == "eval":
        args = ["eval", "--checkpoint", str(last), "--store", str(w.store), "--attacks", "pgd5",
                "--eps", "1", "--out", str(tmp_path / "eval"), *CPU]
    else:
        args = ["train", "--store", str(w.store), "--mode", "sat", "--map", w.map, "--width",
                "4", "--batch-size", "4", "--epochs", "2", "--robust-val-samples", "0",
                "--resume", "--out", str(run_dir), *CPU]
    line = one_line_error(CliRunner().invoke(main, args))
    assert str(last) in line and "'layer1.0.conv1.weight'" in line, line
    assert _tree(tmp_path) == before


# ---- finding 3: one class list for all splits ----------------------------------------------
def test_imagefolder_classes_are_the_union_over_splits(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=("ant", "bee", "cat"), splits=("train",))
    make_imagefolder(root, classes=("ant", "cat"), splits=("val",), seed=1)
    train = open_dataset("imagefolder", root, "train")
    val = open_dataset("imagefolder", root, "val")
    assert train.class_names == val.class_names == ["ant", "bee", "cat"]
    cat = [lab for lab, i in zip(val.labels(), val.ids(), strict=True) if "/cat/" in i]
    assert set(cat) == {2}  # the same label as train's cat, not 1

    store = tmp_path / "s.zarr"
    res = CliRunner().invoke(main, ["precompute", "--dataset", "imagefolder", "--data-root",
                                    str(root), "--store", str(store), "--quiet"])
    assert res.exit_code == 0, res.output
    st = SaliencyStore.open(store, "r")
    assert st.split("val").class_names == st.split("train").class_names == ["ant", "bee", "cat"]
    assert st.split("val").num_classes == 3


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=("ant", "bee", "cat"))
    for f in (root / "train/bee").iterdir():
        f.unlink()
    with pytest.raises(SatError, match=r"train/bee holds no images"):
        open_dataset("imagefolder", root, "train")


@pytest.mark.parametrize("source", ["tiny-imagenet", "oxford17", "cifar10"])
def test_other_sources_share_one_class_list_between_splits(tmp_path, source):
    if source == "tiny-imagenet":
        root, opts = make_tiny_imagenet(tmp_path, n_classes=3, val_per_class=1), {}
    elif source == "oxford17":
        root, opts = make_oxford17(tmp_path, n_classes=3), {"image_size": 16}
    else:
        root, opts = make_cifar_pickles(tmp_path, n_train=10, n_test=4), {}
    train = open_dataset(source, root, "train", **opts)
    val = open_dataset(source, root, "val", **opts)
    assert train.class_names == val.class_names and train.num_classes == val.num_classes


# ---- finding 4: inputs checked before anything is created ----------------------------------
@pytest.mark.parametrize("wrong", ["classes", "architecture", "channels"])
def test_a_wrong_teacher_creates_no_store_and_no_map(w, tmp_path, wrong):
    if wrong == "classes":
        teacher, expect = _teacher(tmp_path / "t.safetensors", 3), "3 classes"
    elif wrong == "architecture":  # weights of width 4 under a recorded width of 8
        teacher, expect = _teacher(tmp_path / "t.safetensors", width=8), "does not fit"
    else:
        teacher, expect = _teacher(tmp_path / "t.safetensors", in_channels=1), "1-channel"
    new = tmp_path / "new.zarr"
    line = one_line_error(_precompute(w, new, teacher))
    assert str(teacher) in line and expect in line, line
    assert not new.exists()
    existing = Path(shutil.copytree(w.store, tmp_path / "existing.zarr"))
    before = _tree(existing)
    one_line_error(_precompute(w, existing, teacher, "--method", "gradient"))
    assert _tree(existing) == before  # no 0-of-N-chunks map added


def test_a_checkpoint_without_a_recorded_model_is_refused(tmp_path):
    from trainer.checkpoint import load_model

    path = tmp_path / "t.safetensors"
    save_checkpoint(path, Checkpoint(arch={"width": 4}, model_state={"w": torch.zeros(1)}))
    with pytest.raises(SatError, match=r"records no model name or num_classes"):
        load_model(path, "cpu")


def test_a_state_dict_mismatch_is_one_line_listing_the_keys(w, tmp_path):
    teacher = _teacher(tmp_path / "t.safetensors", width=8)
    line = one_line_error(CliRunner().invoke(main, [
        "eval", "--checkpoint", str(teacher), "--store", str(w.store), "--attacks", "pgd5",
        "--eps", "1", *CPU]))
    assert "conv1.weight (4, 3, 3, 3) vs (8, 3, 3, 3)" in line and "more)" in line, line


def test_a_map_created_by_a_failed_run_is_removed(w, tmp_path, monkeypatch):
    store = Path(shutil.copytree(w.store, tmp_path / "s.zarr"))
    before = _tree(store)

    def full_disk(self, k, values):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MapWriter, "write_chunk", full_disk)
    line = one_line_error(_precompute(w, store, w.teacher, "--method", "gradient"))
    assert str(store) in line and "No space left on device" in line, line
    assert _tree(store) == before
    assert SaliencyStore.open(store, "r").split("train").maps() == [w.map]


def test_a_failed_ingest_into_a_new_store_leaves_no_store(w, tmp_path):
    root = Path(shutil.copytree(w.images, tmp_path / "images"))
    img = root / "val/cat/0002.png"
    img.write_bytes(img.read_bytes()[:-40])  # the header reads, the pixels do not
    store = tmp_path / "new.zarr"
    line = one_line_error(CliRunner().invoke(main, [
        "precompute", "--dataset", "imagefolder", "--data-root", str(root), "--store",
        str(store), "--quiet"]))
    assert str(img) in line, line
    assert not store.exists() and not (tmp_path / "new.precompute.json").exists()


def test_a_new_store_another_writer_is_using_is_not_removed(w, tmp_path, monkeypatch):
    import pipelines.precompute as pc
    from saliency_cache.store import LOCK_NAME

    store = tmp_path / "new.zarr"

    def other_writer_then_fail(st, cfg, split_name, ds):
        lock = store / "train" / "maps" / "other" / LOCK_NAME  # as a concurrent run holds
        lock.parent.mkdir(parents=True)
        lock.write_text('{"pid": 1}')
        raise SatError("ingest failed")

    monkeypatch.setattr(pc, "_ingest", other_writer_then_fail)
    line = one_line_error(_precompute(w, store, w.teacher))
    assert "ingest failed" in line
    assert (store / "train" / "maps" / "other" / LOCK_NAME).exists()


def test_the_refusal_of_a_changed_map_names_a_real_flag(w, tmp_path):
    store = Path(shutil.copytree(w.store, tmp_path / "s.zarr"))
    retrained = _teacher(tmp_path / "teacher.safetensors", seed=1)  # same name, other sha
    line = one_line_error(_precompute(w, store, retrained))
    assert "--overwrite" in line and "overwrite=True" not in line, line
    res = _precompute(w, store, retrained, "--overwrite")
    assert res.exit_code == 0, res.output
    prov = SaliencyStore.open(store, "r").split("train").open_map(w.map).provenance
    assert prov["checkpoint_sha256"] == hashlib.sha256(retrained.read_bytes()).hexdigest()


# ---- finding 5: messages quote what the user typed --------------------------------------
@pytest.mark.parametrize(("args", "expect"), [
    (["--eps", "-1"], "--eps must be in [0, 255] (/255 units), got -1"),
    (["--pgd-step-size", "0"], "--pgd-step-size must be in (0, 255]"),
    (["--batch-size", "0"], "batch size must be >= 1, got 0"),
])
def test_train_quotes_the_typed_value(w, tmp_path, args, expect):
    line = one_line_error(CliRunner().invoke(main, [
        "train", "--store", str(w.store), "--mode", "pgd", "--out", str(tmp_path / "r"),
        *args, *CPU]))
    assert expect in line and "0.0039" not in line, line
    assert not (tmp_path / "r").exists()


def test_an_incomplete_map_names_the_allow_partial_flag(tmp_path):
    store = make_store(tmp_path, maps=())
    name = add_random_map(store, "train", teacher_provenance(), skip_chunks=[1])
    assert name == GBP
    line = one_line_error(CliRunner().invoke(main, [
        "train", "--store", str(store), "--mode", "sat", "--map", name, "--width", "4",
        "--epochs", "1", "--out", str(tmp_path / "r"), *CPU]))
    assert "--allow-partial" in line and "pass allow_partial" not in line, line
    ckpt = _teacher(tmp_path / "t.safetensors", 4)
    line = one_line_error(CliRunner().invoke(main, [
        "eval", "--checkpoint", str(ckpt), "--store", str(store), "--split", "train",
        "--attacks", "saliency-map", "--map", name, "--eps", "1", *CPU]))
    assert "incomplete" in line and "allow_partial" not in line, line


def test_a_full_disk_names_the_checkpoint(w, tmp_path, monkeypatch):
    import trainer.checkpoint

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.checkpoint, "save_file", full_disk)
    run_dir = tmp_path / "run"
    line = one_line_error(CliRunner().invoke(main, [
        "train", "--store", str(w.store), "--mode", "standard", "--width", "4", "--batch-size",
        "4", "--epochs", "1", "--robust-val-samples", "0", "--out", str(run_dir), *CPU]))
    assert str(run_dir / "checkpoints") in line and "No space left on device" in line, line
    assert not list(run_dir.rglob("*.tmp"))


def test_a_full_disk_names_the_json_file(tmp_path, monkeypatch):
    from pipelines.common import write_json

    def full_disk(self, *args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(SatError, match=r"cannot write .*result.json: No space left on device"):
        write_json(tmp_path / "result.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_precompute_config_quotes_sizes():
    data = DataSpec("synthetic", options={"n": 8})
    for kw, expect in (({"chunk_size": 0}, "chunk size must be >= 1, got 0"),
                       ({"batch_size": -3}, "batch size must be >= 1, got -3"),
                       ({"shard_chunks": 0}, "shard chunks must be >= 1, got 0")):
        with pytest.raises(SatError, match=expect):
            PrecomputeConfig(store="x.zarr", data=data, **kw)


# ---- defaults that would fill in for missing data -------------------------------------
def test_precompute_refuses_an_empty_split_list_and_maps_with_no_split():
    data = DataSpec("synthetic", options={"n": 8})
    with pytest.raises(SatError, match=r"no splits given to ingest \(--splits\)"):
        PrecomputeConfig(store="x.zarr", data=data, splits=(), map_splits=())
    with pytest.raises(SatError, match=r"no map splits \(--map-splits\)"):
        PrecomputeConfig(store="x.zarr", data=data, weak=("mask",), map_splits=())


def test_train_refuses_a_missing_validation_split(w, tmp_path):
    args = ["train", "--store", str(w.store), "--mode", "standard", "--width", "4",
            "--batch-size", "4", "--epochs", "1", "--robust-val-samples", "0", *CPU]
    line = one_line_error(CliRunner().invoke(main, [*args, "--val-split", "test", "--out",
                                                    str(tmp_path / "r")]))
    assert "'test'" in line and "--val-split ''" in line, line
    assert not (tmp_path / "r").exists()
    res = CliRunner().invoke(main, [*args, "--val-split", "", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
