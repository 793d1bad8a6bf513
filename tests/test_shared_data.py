"""Integration on the real shared datasets: teacher -> ``sat precompute`` -> verify -> show.

The tarballs live in ``../shared/data`` beside the project (or wherever ``SAT_SHARED_DATA``
points). A clone without them skips these tests with the reason. Only the files a test needs
are extracted, into a temporary folder: a few hundred small files instead of the 12,000 of a
full ``make data``, and never a half-extracted ``data/`` folder that another run is filling.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from pipelines.common import DataSpec
from saliency_cache.store import SaliencyStore
from trainer.checkpoint import file_sha256
from trainer.data.weak import box_to_map, mask_to_map

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def _shared_tarball(name: str) -> Path:
    root = Path(os.environ.get("SAT_SHARED_DATA") or REPO.parent / "shared" / "data")
    path = root / name
    if not path.is_file():
        pytest.skip(f"{path} not found (set SAT_SHARED_DATA to the folder holding {name})")
    return path


def _extract(tarball: Path, dest: Path, keep) -> int:
    """Extract the members whose name satisfies ``keep``; return how many."""
    n = 0
    with tarfile.open(tarball, "r:gz") as tar:
        for m in tar:
            if m.isfile() and keep(m.name):
                tar.extract(m, dest, filter="data")
                n += 1
    return n


def _sat(*args: str) -> dict | str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, f"sat {' '.join(map(str, args))}\n{res.output}"
    return json.loads(res.output) if "--json" in args else res.output


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # a drawing, not a blank canvas


def _teacher_and_precompute(tmp: Path, data_args: list[str], weak: str, workers: int,
                            val: bool) -> tuple[Path, Path]:
    teacher = tmp / "teacher"
    res = _sat("teacher", *data_args, "--arch", "resnet10", "--width", "4", "--epochs", "1",
               "--batch-size", "64", "--robust-val-samples", "16", "--device", "cpu",
               *([] if val else ["--val-split", ""]), "--quiet", "--json", "--out", teacher)
    ckpt = Path(res["checkpoint"])
    assert ckpt.is_file() and (teacher / "teacher.json").is_file()
    store = tmp / "store.zarr"
    res = _sat("precompute", *data_args, "--store", store, "--splits",
               "train,val" if val else "train", "--teacher", ckpt, "--method", "gbp",
               "--weak", weak, "--chunk-size", "64", "--batch-size", "32",
               "--workers", str(workers), "--device", "cpu", "--quiet", "--json")
    assert {m["name"] for m in res["maps"]} == {weak, "resnet10-std-gbp"}
    assert _sat("cache", "verify", store).strip() == "ok"
    for name in (weak, "resnet10-std-gbp"):
        png = tmp / f"{name}.png"
        _sat("cache", "show", store, name, "--index", "0", "--index", "7", "--out", png)
        _check_png(png)
    return ckpt, store


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> Path:
    """tiny-imagenet-20: class list, box files, 12 train images per class and the first 10
    val images of each class (what ``max_per_class=10`` reads)."""
    tarball = _shared_tarball("tiny-imagenet-20.tar.gz")
    dest = tmp_path_factory.mktemp("shared")
    with tarfile.open(tarball, "r:gz") as tar:
        for m in tar:
            if m.name.endswith("/val/val_annotations.txt"):
                lines = tar.extractfile(m).read().decode().splitlines()
                break
        else:
            pytest.fail(f"{tarball} holds no val/val_annotations.txt")
    per_class: dict[str, list[str]] = {}
    for line in lines:
        fname, wnid = line.split("\t")[:2]
        per_class.setdefault(wnid, []).append(fname)
    val = {f for names in per_class.values() for f in sorted(names)[:10]}
    train_img = re.compile(r"/train/(n\d+)/images/\1_(\d+)\.JPEG$")

    def keep(name: str) -> bool:
        if name.endswith(("/wnids.txt", "/words.txt", "_boxes.txt", "/val_annotations.txt")):
            return True
        if "/val/images/" in name:
            return Path(name).name in val
        m = train_img.search(name)
        return bool(m) and int(m.group(2)) < 12

    assert _extract(tarball, dest, keep) == 20 * 12 + 20 * 10 + 20 + 3
    return dest / "tiny-imagenet-20"


@pytest.fixture(scope="module")
def oxford17(tmp_path_factory) -> Path:
    """oxford17-flowers-seg: the first two segmented train images of every class that has any."""
    tarball = _shared_tarball("oxford17-flowers-seg.tar.gz")
    dest = tmp_path_factory.mktemp("shared")
    with tarfile.open(tarball, "r:gz") as tar:
        names = tar.getnames()
    segmented = sorted(
        int(m.group(1)) for m in map(re.compile(r"/labels/image_(\d{4})\.png$").search, names) if m
    )
    chosen: dict[int, list[int]] = {}
    for number in segmented:
        c, j = divmod(number - 1, 80)
        if j < 60 and len(chosen.setdefault(c, [])) < 2:  # numbers 1..60 of a class: train
            chosen[c].append(number)
    wanted = {f"image_{n:04d}" for ns in chosen.values() for n in ns}
    n = _extract(tarball, dest, lambda name: Path(name).stem in wanted)
    assert n == 2 * len(wanted) and len(chosen) == 16  # cowslip (class 13) has no label maps
    return dest / "oxford17-flowers-seg"


def test_tiny_imagenet_teacher_precompute_verify_show(tiny_imagenet, tmp_path):
    data_args = ["--dataset", "tiny-imagenet", "--data-root", str(tiny_imagenet),
                 "--image-size", str(IMAGE_SIZE), "--max-per-class", "10"]
    ckpt, store = _teacher_and_precompute(tmp_path, data_args, "box", workers=1, val=True)

    data = DataSpec("tiny-imagenet", str(tiny_imagenet), {"image_size": IMAGE_SIZE, "max_per_class": 10})
    ds = data.open("train")
    st = SaliencyStore.open(store, "r")
    sp = st.split("train")
    assert sp.n == len(ds) == 20 * 10 and sp.num_classes == 20
    # Readable class names from words.txt, one per wnid, recorded in the store.
    assert sp.class_names == ds.class_names and len(set(ds.class_names)) == 20
    assert not any(n in ds.wnids for n in ds.class_names)
    assert sp.ids() == ds.ids() and sp.fingerprint == ds.fingerprint()
    assert np.array_equal(sp.read_images(0, sp.n), ds.load_images(0, len(ds)))
    assert st.split("val").n == 20 * 10 and st.split("val").maps() == []

    box = sp.open_map("box").read(0, sp.n)
    want = np.stack([box_to_map(ds.get_box(i), IMAGE_SIZE, IMAGE_SIZE) for i in range(len(ds))])
    assert np.array_equal(box, want)
    assert 0.05 < (box == 1).mean() < 0.95  # boxes cover part of the images, not all or none

    gbp = sp.open_map("resnet10-std-gbp")
    assert gbp.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and gbp.encoding == "ternary"
    assert gbp.provenance["checkpoint_sha256"] == file_sha256(ckpt)
    values = gbp.read(0, sp.n)
    assert (values == 1).any() and (values == -1).any()


def test_oxford17_teacher_precompute_verify_show_with_masks(oxford17, tmp_path):
    data_args = ["--dataset", "oxford17", "--data-root", str(oxford17),
                 "--image-size", str(IMAGE_SIZE), "--data-option", "only_with_masks=true"]
    ckpt, store = _teacher_and_precompute(tmp_path, data_args, "mask", workers=2, val=False)

    data = DataSpec("oxford17", str(oxford17),
                    {"image_size": IMAGE_SIZE, "only_with_masks": True})
    ds = data.open("train")
    sp = SaliencyStore.open(store, "r").split("train")
    assert sp.n == len(ds) == 32 and sp.ids() == ds.ids()
    r = sp.open_map("mask")
    assert r.encoding == "ternary" and r.provenance["missing_annotations"] == 0
    got = r.read(0, sp.n)
    want = np.stack([mask_to_map(*ds.get_mask(i)) for i in range(len(ds))])
    assert np.array_equal(got, want)
    assert set(np.unique(got)) == {-1, 0, 1}  # flower, background and the unlabelled band
    gbp = sp.open_map("resnet10-std-gbp")
    assert gbp.provenance["checkpoint_sha256"] == file_sha256(ckpt)
    assert gbp.provenance["teacher_num_classes"] == 17
