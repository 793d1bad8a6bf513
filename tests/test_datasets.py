"""Dataset sources: parsing of every on-disk format, clear errors on bad input, fingerprints,
and the synthetic shapes generator. Everything runs on tiny dataset folders from
tests/dataset_files.py; the last tests read the real shared datasets when they are present and
skip otherwise."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliency_cache.errors import SatError
from tests.coco_data import make_coco
from tests.dataset_files import (
    CIFAR10_CLASSES,
    make_cifar_pickles,
    make_imagefolder,
    make_oxford17,
    make_tiny_imagenet,
    oxford_label_map,
)
from trainer.data import (
    DATASETS,
    SHAPES,
    ImageDataset,
    list_datasets,
    mask_bbox,
    open_dataset,
    rescale_box,
)

# Every registered dataset, built as a tiny fixture: (root, options).
FACTORIES = {
    "cifar10": lambda p: (make_cifar_pickles(p, "cifar10"), {}),
    "cifar100": lambda p: (make_cifar_pickles(p, "cifar100"), {}),
    "imagefolder": lambda p: (make_imagefolder(p), {}),
    "tiny-imagenet": lambda p: (make_tiny_imagenet(p), {"image_size": 16}),
    "oxford17": lambda p: (make_oxford17(p), {"image_size": 16}),
    "synthetic": lambda p: (None, {"n": 20, "image_size": 16}),
    "coco": lambda p: (make_coco(p / "coco") and p / "coco", {"image_size": 16}),
}


def _raises(match_parts: list[str]):
    """pytest.raises(SatError) whose message contains every part, in order."""
    return pytest.raises(SatError, match=".*".join(re.escape(str(p)) for p in match_parts))


# ---- the contract, for every registered dataset -------------------------------------------
def test_every_registered_dataset_has_a_fixture():
    assert set(list_datasets()) == set(FACTORIES)
    assert list_datasets() == DATASETS.names()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_dataset_contract(name, tmp_path):
    root, opts = FACTORIES[name](tmp_path)
    ds = open_dataset(name, root, "train", **opts)
    assert isinstance(ds, ImageDataset) and ds.name == name and ds.split == "train"
    n = len(ds)
    assert n > 0
    ids, labels = ds.ids(), ds.labels()
    assert len(ids) == n and len(set(ids)) == n and all(isinstance(s, str) for s in ids)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    assert labels.min() >= 0 and labels.max() < ds.num_classes == len(ds.class_names)
    c, h, w = ds.image_shape
    assert c == 3
    images = ds.load_images(0, n)
    assert images.dtype == np.uint8 and images.shape == (n, c, h, w)
    np.testing.assert_array_equal(ds.load_images(1, 3), images[1:3])
    assert ds.load_images(2, 2).shape == (0, c, h, w)
    for i in range(n):
        s = ds[i]
        assert s.image.dtype == np.uint8
        np.testing.assert_array_equal(s.image, images[i])
        assert (s.label, s.id) == (labels[i], ids[i])
        if s.box is not None:
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
            assert ds.get_box(i) == s.box
        if s.mask is not None:
            assert s.mask.dtype == bool and s.mask.shape == (h, w)
            np.testing.assert_array_equal(ds.get_mask(i)[0], s.mask)
    assert ds.annotated("box").sum() == sum(ds[i].box is not None for i in range(n))
    assert ds.annotated("mask").sum() == sum(ds[i].mask is not None for i in range(n))
    assert ds.has_boxes == bool(ds.annotated("box").any())
    assert ds.has_masks == bool(ds.annotated("mask").any())
    np.testing.assert_array_equal(ds[-1].image, images[-1])
    with pytest.raises(IndexError):
        ds[n]
    with pytest.raises(SatError, match=re.escape(f"[0, {n + 1})")):
        ds.load_images(0, n + 1)
    desc = json.loads(json.dumps(ds.describe()))
    assert desc["name"] == name and desc["split"] == "train" and desc["num_samples"] == n
    fp = ds.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert open_dataset(name, root, "train", **opts).fingerprint() == fp
    with _raises(["unknown option", "'bogus'", name]):
        open_dataset(name, root, "train", bogus=1, **opts)
    with _raises(["no split", "'nonsense'"]):
        open_dataset(name, root, "nonsense", **opts)


def test_unknown_dataset_and_missing_root(tmp_path):
    with _raises(["unknown dataset", "'mnist'"]):
        open_dataset("mnist", tmp_path, "train")
    with _raises(["needs a root"]):
        open_dataset("tiny-imagenet", None, "train")
    with _raises(["root folder not found", tmp_path / "nope"]):
        open_dataset("imagefolder", tmp_path / "nope", "train")
    with _raises(["image_size", "positive integer", "-3"]):
        open_dataset("synthetic", None, "train", image_size=-3)


def test_datasets_module_does_not_import_torch():
    code = (
        "import sys; import trainer.data, trainer.data.weak, tests.dataset_files; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    import subprocess

    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stderr


# ---- CIFAR pickles --------------------------------------------------------------------------
@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_reads_planes_labels_and_names(tmp_path, bytes_keys):
    root = make_cifar_pickles(tmp_path, "cifar10", n_train=12, n_test=5, bytes_keys=bytes_keys)
    ds = open_dataset("cifar10", root, "train")
    assert (
        len(ds) == 12 and ds.num_classes == 10 and ds.class_names[:2] == ["airplane", "automobile"]
    )
    # Samples follow data_batch_1..5 in order; a row holds the R, G, B planes, row-major.
    rows, labels = [], []
    for k in range(1, 6):
        with open(root / "cifar-10-batches-py" / f"data_batch_{k}", "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        batch = {(key.decode() if isinstance(key, bytes) else key): v for key, v in batch.items()}
        rows.append(batch["data"])
        labels += batch["labels"]
    rows = np.concatenate(rows)
    np.testing.assert_array_equal(ds.labels(), labels)
    img = ds[7].image
    for c, y, x in [(0, 0, 0), (1, 5, 3), (2, 31, 30), (0, 17, 31)]:
        assert img[c, y, x] == rows[7, c * 1024 + y * 32 + x]
    assert ds.ids()[7] == "cifar10/train/7"


def test_cifar100_fine_labels_and_val_alias(tmp_path):
    root = make_cifar_pickles(tmp_path, "cifar100", n_train=6, n_test=3)
    train = open_dataset("cifar100", root, "train")
    assert train.num_classes == 100 and train.class_names[5] == "fine5"
    np.testing.assert_array_equal(train.labels(), np.arange(6))
    test, val = open_dataset("cifar100", root, "test"), open_dataset("cifar100", root, "val")
    assert val.ids() == test.ids() == ["cifar100/test/0", "cifar100/test/1", "cifar100/test/2"]
    assert val.fingerprint() == test.fingerprint() != train.fingerprint()
    # The folder itself is accepted as root too.
    assert len(open_dataset("cifar100", root / "cifar-100-python", "train")) == 6


def test_cifar_options_resize_and_max_per_class(tmp_path):
    root = make_cifar_pickles(tmp_path, "cifar10", n_train=25, num_classes=10)
    ds = open_dataset("cifar10", root, "train", max_per_class=2, image_size=16)
    assert len(ds) == 20 and ds.image_shape == (3, 16, 16)
    assert np.bincount(ds.labels()).tolist() == [2] * 10
    full = open_dataset("cifar10", root, "train")
    # First two of each class, in their original order; ids keep the original index.
    np.testing.assert_array_equal(full.labels(), np.arange(25) % 10)
    assert ds.ids() == [f"cifar10/train/{i}" for i in range(20)]
    assert ds.load_images(0, 20).shape == (20, 3, 16, 16)


def test_cifar_missing_files_say_where_and_how(tmp_path):
    with _raises(
        [tmp_path / "cifar-10-batches-py" / "batches.meta", "cifar.html", "download=True"]
    ):
        open_dataset("cifar10", tmp_path, "train")
    root = make_cifar_pickles(tmp_path / "c", "cifar10")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with _raises(["not found", root / "cifar-10-batches-py" / "data_batch_3"]):
        open_dataset("cifar10", root, "train")
    assert len(open_dataset("cifar10", root, "test")) == 4  # the test batch is still there


def test_cifar_pickle_may_not_name_arbitrary_globals(tmp_path):
    root = make_cifar_pickles(tmp_path, "cifar10")
    path = root / "cifar-10-batches-py" / "test_batch"
    with path.open("wb") as f:  # a harmless stand-in for a malicious global
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": Path("/")}, f)
    with _raises([path, "not allowed"]):
        open_dataset("cifar10", root, "test")


# ---- ImageFolder ----------------------------------------------------------------------------
def test_imagefolder_classes_sorted_pixels_exact(tmp_path):
    root = make_imagefolder(tmp_path, classes=("zebra", "ant", "mole"), per_class=2, size=8)
    ds = open_dataset("imagefolder", root, "train")
    assert ds.class_names == ["ant", "mole", "zebra"]
    assert ds.ids()[:3] == ["train/ant/0000.png", "train/ant/0001.png", "train/mole/0000.png"]
    np.testing.assert_array_equal(ds.labels(), [0, 0, 1, 1, 2, 2])
    expected = np.asarray(Image.open(root / "train" / "mole" / "0001.png").convert("RGB"))
    np.testing.assert_array_equal(ds[3].image, expected.transpose(2, 0, 1))


def test_imagefolder_split_selection(tmp_path):
    root = make_imagefolder(tmp_path / "a", splits=("train", "test"), per_class=2)
    val = open_dataset("imagefolder", root, "val")  # no val/ folder: the test/ folder
    assert val.ids()[0] == "test/cat/0000.png"
    assert val.fingerprint() == open_dataset("imagefolder", root, "test").fingerprint()
    with _raises(["no split 'holdout'", root / "holdout", "train"]):
        open_dataset("imagefolder", root, "holdout")
    flat = make_imagefolder(tmp_path / "b", splits=("",), per_class=1)
    assert open_dataset("imagefolder", flat, "all").ids() == ["cat/0000.png", "dog/0000.png"]


def test_imagefolder_sizes_and_corrupt_file(tmp_path):
    root = make_imagefolder(tmp_path, per_class=2, size=8, ext="jpg")
    Image.new("RGB", (10, 6)).save(root / "train" / "dog" / "0005.jpg")
    ds = open_dataset("imagefolder", root, "train")
    assert ds.image_shape == (3, 8, 8)
    with _raises([root / "train" / "dog" / "0005.jpg", "10x6", "image_size"]):
        ds.load_images(0, len(ds))
    resized = open_dataset("imagefolder", root, "train", image_size=12)
    assert resized.load_images(0, len(resized)).shape == (5, 3, 12, 12)
    (root / "train" / "cat" / "0001.jpg").write_bytes(b"not a jpeg at all")
    with _raises(["cannot read image", root / "train" / "cat" / "0001.jpg"]):
        resized[1]


# ---- Tiny ImageNet --------------------------------------------------------------------------
def test_tiny_imagenet_train_layout_boxes_and_grayscale(tmp_path):
    root = make_tiny_imagenet(tmp_path, n_classes=3, per_class=4, size=16)
    wnids = (root / "wnids.txt").read_text().split()
    assert wnids != sorted(wnids)  # labels must follow the file, not sorted order
    ds = open_dataset("tiny-imagenet", root, "train", image_size=16)
    assert ds.wnids == wnids and ds.num_classes == 3 and len(ds) == 12
    assert ds.class_names == ["thing 0", "thing 1", "thing 2"]  # from words.txt
    assert ds.ids()[:2] == [
        f"train/{wnids[0]}/images/{wnids[0]}_0.JPEG",
        f"train/{wnids[0]}/images/{wnids[0]}_1.JPEG",
    ]
    np.testing.assert_array_equal(ds.labels(), np.repeat(np.arange(3), 4))
    for c, wnid in enumerate(wnids):
        lines = (root / "train" / wnid / f"{wnid}_boxes.txt").read_text().splitlines()
        for k, line in enumerate(lines):
            fname, *coords = line.split("\t")
            assert ds.ids()[4 * c + k].endswith(fname)
            assert ds.get_box(4 * c + k) == tuple(map(int, coords))
    assert ds[0].box == (0, 0, 15, 15) and ds[1].box == (3, 2, 3, 2)
    gray = ds[1].image  # saved as a grayscale JPEG by the fixture
    assert Image.open(root / ds.ids()[1]).mode == "L"
    assert gray.shape == (3, 16, 16)
    np.testing.assert_array_equal(gray[0], gray[1])
    np.testing.assert_array_equal(gray[0], gray[2])
    assert ds.has_boxes and not ds.has_masks


def test_tiny_imagenet_val_and_parent_root(tmp_path):
    root = make_tiny_imagenet(tmp_path, n_classes=2, val_per_class=3)
    ds = open_dataset("tiny-imagenet", tmp_path, "val", image_size=16)  # parent folder works
    assert ds.root == root.resolve()
    table = {}
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        f, wnid, *box = line.split("\t")
        table[f"val/images/{f}"] = (ds.wnids.index(wnid), tuple(map(int, box)))
    assert sorted(ds.ids()) == ds.ids() and set(ds.ids()) == set(table)
    for i, sid in enumerate(ds.ids()):
        assert (int(ds.labels()[i]), ds.get_box(i)) == table[sid]
    assert ds[0].image.shape == (3, 16, 16)  # val_0 is grayscale


def test_tiny_imagenet_resize_rescales_boxes_outward(tmp_path):
    root = make_tiny_imagenet(tmp_path, n_classes=1, per_class=4, size=16)
    native = open_dataset("tiny-imagenet", root, "train", image_size=16)
    small = open_dataset("tiny-imagenet", root, "train", image_size=8)
    big = open_dataset("tiny-imagenet", root, "train")  # default 64
    assert small.image_shape == (3, 8, 8) and small.load_images(0, 4).shape == (4, 3, 8, 8)
    assert small.get_box(0) == (0, 0, 7, 7) and big.get_box(0) == (0, 0, 63, 63)
    # One pixel at (3, 2) of 16 lies in pixel (1, 1) of 8 and covers 12..15 x 8..11 of 64.
    assert small.get_box(1) == (1, 1, 1, 1) and big.get_box(1) == (12, 8, 15, 11)
    for i in range(4):
        b = native.get_box(i)
        # Outward rounding: the resized box covers every pixel the original box overlaps.
        assert rescale_box(b, (16, 16), (8, 8)) == small.get_box(i)
        x0, y0, x1, y1 = small.get_box(i)
        assert x0 <= b[0] / 2 and (x1 + 1) >= (b[2] + 1) / 2
        assert y0 <= b[1] / 2 and (y1 + 1) >= (b[3] + 1) / 2
    assert rescale_box((5, 0, 9, 63), (64, 64), (32, 32)) == (2, 0, 4, 31)
    assert small.fingerprint() != native.fingerprint()


def test_tiny_imagenet_max_per_class(tmp_path):
    root = make_tiny_imagenet(tmp_path, n_classes=2, per_class=12, size=16)
    ds = open_dataset("tiny-imagenet", root, "train", image_size=16, max_per_class=3)
    wnid = ds.wnids[0]
    # Sorted file order: _0, _1, _10 (string order, deterministic).
    assert ds.ids()[:3] == [f"train/{wnid}/images/{wnid}_{k}.JPEG" for k in ("0", "1", "10")]
    assert np.bincount(ds.labels()).tolist() == [3, 3]


def test_tiny_imagenet_class_names_come_from_words_txt(tmp_path):
    root = make_tiny_imagenet(tmp_path, n_classes=3, per_class=1, size=16)
    wnids = (root / "wnids.txt").read_text().split()
    # Real words.txt: every ImageNet wnid, synonyms after a tab; two of ours share a name.
    (root / "words.txt").write_text(
        "n00001740\tentity\n"
        f"{wnids[0]}\tEuropean fire salamander, Salamandra salamandra\n"
        f"{wnids[1]}\tcrane\n{wnids[2]}\tcrane, machine\n"
    )
    ds = open_dataset("tiny-imagenet", root, "train", image_size=16)
    assert ds.class_names == ["European fire salamander", f"crane ({wnids[1]})",
                              f"crane ({wnids[2]})"]
    (root / "words.txt").write_text(f"{wnids[1]}\tgoldfish\n")  # missing lines: the wnid
    assert open_dataset("tiny-imagenet", root, "train", image_size=16).class_names == [
        wnids[0], "goldfish", wnids[2]]
    before = ds.fingerprint()
    (root / "words.txt").unlink()
    again = open_dataset("tiny-imagenet", root, "train", image_size=16)
    assert again.class_names == wnids
    assert again.fingerprint() == before  # names are labels for people, not data


def _tiny(tmp_path):
    root = make_tiny_imagenet(tmp_path, n_classes=2, per_class=3, size=16)
    wnid = (root / "wnids.txt").read_text().split()[0]
    return root, wnid, root / "train" / wnid / f"{wnid}_boxes.txt"


def _replace_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{f}\t1\t2\t3", "expected 5 tab-separated fields"),
        ("{f}\t1\t2\t3\t4\t5", "expected 5 tab-separated fields"),
        ("{f}\t1\ttwo\t3\t4", "must be integers"),
        ("{f}\t1\t2\t3.5\t4", "must be integers"),
        ("{f}\t0\t0\t16\t4", "not inside the 16x16 image"),  # x1 >= width
        ("{f}\t0\t0\t4\t16", "not inside the 16x16 image"),  # y1 >= height
        ("{f}\t5\t0\t4\t4", "not inside the 16x16 image"),  # x0 > x1
        ("{f}\t0\t-1\t4\t4", "not inside the 16x16 image"),
    ],
)
def test_tiny_imagenet_bad_box_line_names_file_and_line(tmp_path, line, message):
    root, wnid, boxes = _tiny(tmp_path)
    _replace_line(boxes, 2, line.format(f=f"{wnid}_1.JPEG"))
    with _raises([boxes, "line 2", message]):
        open_dataset("tiny-imagenet", root, "train", image_size=16)


def test_tiny_imagenet_bad_val_annotations(tmp_path):
    root, _, _ = _tiny(tmp_path)
    ann = root / "val" / "val_annotations.txt"
    original = ann.read_text()
    _replace_line(ann, 3, "val_2.JPEG\tn99999999\t0\t0\t3\t3")
    with _raises([ann, "line 3", "'n99999999'", "not listed in", root / "wnids.txt"]):
        open_dataset("tiny-imagenet", root, "val", image_size=16)
    ann.write_text(original)
    _replace_line(ann, 1, "val_0.JPEG\t0\t0\t3\t3")
    with _raises([ann, "line 1", "expected 6 tab-separated fields"]):
        open_dataset("tiny-imagenet", root, "val", image_size=16)
    ann.write_text("\n".join(original.splitlines()[1:]) + "\n")  # val_0 loses its line
    with _raises([root / "val" / "images" / "val_0.JPEG", "has no line in", ann]):
        open_dataset("tiny-imagenet", root, "val", image_size=16)
    ann.unlink()
    with _raises(["not found", ann]):
        open_dataset("tiny-imagenet", root, "val", image_size=16)


def test_tiny_imagenet_missing_boxes_file_and_unknown_class_folder(tmp_path):
    root, wnid, boxes = _tiny(tmp_path)
    boxes.unlink()
    with _raises(["box annotation file not found", boxes]):
        open_dataset("tiny-imagenet", root, "train", image_size=16)
    root2, _, _ = _tiny(tmp_path / "b")
    stray = root2 / "train" / "n00000042" / "images"
    stray.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(stray / "n00000042_0.JPEG")
    with _raises(["class folder", root2 / "train" / "n00000042", "not listed in", "wnids.txt"]):
        open_dataset("tiny-imagenet", root2, "train", image_size=16)
    (root2 / "wnids.txt").unlink()
    with _raises([root2 / "wnids.txt", "not found"]):
        open_dataset("tiny-imagenet", root2, "train")


def test_tiny_imagenet_corrupt_and_truncated_images(tmp_path):
    root, wnid, _ = _tiny(tmp_path)
    ds = open_dataset("tiny-imagenet", root, "train", image_size=16)
    bad = root / "train" / wnid / "images" / f"{wnid}_2.JPEG"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with _raises(["cannot read image", bad]):
        ds[2]
    bad.write_bytes(b"\x00" * 64)
    with _raises(["cannot read image", bad]):
        ds.load_images(0, 3)


# ---- Oxford-17 ------------------------------------------------------------------------------
def test_oxford17_classes_split_and_masks(tmp_path):
    root = make_oxford17(tmp_path, n_classes=3, in_class=(0, 1, 59, 60, 79), unmasked=(2,))
    train = open_dataset("oxford17", root, "train", image_size=16)
    val = open_dataset("oxford17", root, "val", image_size=16)
    every = open_dataset("oxford17", root, "all", image_size=16)
    num = [int(s[-8:-4]) for s in every.ids()]
    assert num == [1, 2, 60, 61, 80, 81, 82, 140, 141, 160, 161, 162, 220, 221, 240]
    np.testing.assert_array_equal(every.labels(), [(k - 1) // 80 for k in num])
    assert [int(s[-8:-4]) for s in train.ids()] == [k for k in num if (k - 1) % 80 < 60]
    assert [int(s[-8:-4]) for s in val.ids()] == [k for k in num if (k - 1) % 80 >= 60]
    assert every.num_classes == 17 and every.class_names[13] == "cowslip"
    for i, sid in enumerate(every.ids()):
        s = every[i]
        label_file = root / "labels" / Path(sid).with_suffix(".png").name
        if not label_file.exists():  # image 2 and the whole last class
            assert s.mask is None and s.ignore is None
            continue
        values = oxford_label_map(label_file)
        np.testing.assert_array_equal(s.mask, values == 1)
        np.testing.assert_array_equal(s.ignore, values == 0)
    assert every.annotated("mask").tolist() == [(k not in (2,)) and (k - 1) // 80 != 2 for k in num]
    assert every.has_masks and every.has_ignore and not every.has_boxes


def test_oxford17_options(tmp_path):
    root = make_oxford17(tmp_path, n_classes=2)
    only = open_dataset("oxford17", root, "train", image_size=16, only_with_masks=True)
    assert [s[-8:-4] for s in only.ids()] == ["0001", "0002"]  # 0003 and class 1: no mask
    wide = open_dataset("oxford17", root, "train", image_size=16, foreground=[1, 2], ignore=[])
    values = oxford_label_map(root / "labels" / "image_0001.png")
    s = wide[0]
    np.testing.assert_array_equal(s.mask, np.isin(values, [1, 2]))
    assert s.ignore is None and not wide.has_ignore
    up = open_dataset("oxford17", root, "train", image_size=32)[0]
    # Nearest-neighbour upsampling: each label pixel becomes a 2x2 block.
    np.testing.assert_array_equal(up.mask, np.kron(values == 1, np.ones((2, 2), bool)))
    with _raises(["label values [1]", "both foreground and ignore"]):
        open_dataset("oxford17", root, "train", foreground=1, ignore=[0, 1])
    with _raises(["foreground", "integer", "'flower'"]):
        open_dataset("oxford17", root, "train", foreground="flower")


def test_oxford17_bad_masks_and_names(tmp_path):
    root = make_oxford17(tmp_path, n_classes=2)
    mask = root / "labels" / "image_0002.png"
    Image.frombytes("P", (12, 16), bytes(12 * 16)).save(mask)
    ds = open_dataset("oxford17", root, "train", image_size=16)
    with _raises([mask, "12x16", "image_0002.jpg", "16x16"]):
        ds[1]
    with _raises([mask, "12x16"]):
        ds.get_mask(1)
    Image.new("RGB", (16, 16)).save(mask)
    with _raises([mask, "mode RGB"]):
        ds.get_mask(1)
    Image.new("RGB", (16, 16)).save(root / "images" / "image_1361.jpg")
    with _raises([root / "images" / "image_1361.jpg", "outside 1..1360"]):
        open_dataset("oxford17", root, "all", image_size=16)


# ---- fingerprints ---------------------------------------------------------------------------
def test_fingerprint_changes_with_one_pixel_and_survives_a_move(tmp_path):
    root = make_imagefolder(tmp_path / "a", per_class=3, size=8)
    fp = open_dataset("imagefolder", root, "train").fingerprint()
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    assert open_dataset("imagefolder", moved, "train").fingerprint() == fp
    path = moved / "train" / "dog" / "0002.png"
    arr = np.asarray(Image.open(path)).copy()
    arr[4, 5, 1] ^= 1
    Image.fromarray(arr).save(path)
    assert open_dataset("imagefolder", moved, "train").fingerprint() != fp
    assert open_dataset("imagefolder", root, "train", image_size=8).fingerprint() != fp


def test_fingerprint_changes_with_one_label(tmp_path):
    root = make_cifar_pickles(tmp_path, "cifar10", n_train=10)
    fp = open_dataset("cifar10", root, "train").fingerprint()
    path = root / "cifar-10-batches-py" / "data_batch_2"
    with path.open("rb") as f:
        batch = pickle.load(f)
    batch["labels"][0] = (batch["labels"][0] + 1) % 10
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)
    again = open_dataset("cifar10", root, "train")
    assert again.fingerprint() != fp
    assert again.fingerprint() == again.fingerprint()  # cached, and stable


def test_fingerprint_covers_boxes_masks_and_options(tmp_path):
    root, wnid, boxes = _tiny(tmp_path / "t")
    fp = open_dataset("tiny-imagenet", root, "train", image_size=16).fingerprint()
    assert (
        open_dataset("tiny-imagenet", root, "train", image_size=16, max_per_class=2).fingerprint()
        != fp
    )
    _replace_line(boxes, 3, f"{wnid}_2.JPEG\t1\t1\t5\t5")
    assert open_dataset("tiny-imagenet", root, "train", image_size=16).fingerprint() != fp

    ox = make_oxford17(tmp_path / "o")
    fp = open_dataset("oxford17", ox, "train", image_size=16).fingerprint()
    path = ox / "labels" / "image_0001.png"
    values = oxford_label_map(path).copy()
    values[0, 0] = 1 if values[0, 0] != 1 else 2
    im = Image.frombytes("P", values.shape[::-1], values.tobytes())
    im.putpalette(Image.open(path).getpalette())
    im.save(path)
    assert open_dataset("oxford17", ox, "train", image_size=16).fingerprint() != fp


# ---- synthetic shapes -----------------------------------------------------------------------
def _synth(split="train", **kw):
    opts = {"n": 300, "image_size": 32, "num_classes": 10, "seed": 1} | kw
    return open_dataset("synthetic", None, split, **opts)


def test_synthetic_is_deterministic_by_seed_and_split():
    a, b = _synth(), _synth()
    xa = a.load_images(0, len(a))
    np.testing.assert_array_equal(xa, b.load_images(0, len(b)))
    np.testing.assert_array_equal(a.labels(), b.labels())
    assert a.fingerprint() == b.fingerprint()
    other = _synth(seed=2)
    assert not np.array_equal(xa, other.load_images(0, len(other)))
    assert other.fingerprint() != a.fingerprint()
    val = _synth("val", n_val=300)
    assert not np.array_equal(xa, val.load_images(0, 300)) and val.fingerprint() != a.fingerprint()
    assert len(_synth("val")) == 300 and len(_synth("val", n_val=40)) == 40
    # A smaller n is a prefix of a larger one (sample i depends on the seed and i only).
    small = _synth(n=70)
    np.testing.assert_array_equal(small.load_images(0, 70), xa[:70])
    np.testing.assert_array_equal(small.labels(), a.labels()[:70])
    np.testing.assert_array_equal(small.get_mask(69)[0], a.get_mask(69)[0])
    # Reads across generation blocks agree with single samples.
    np.testing.assert_array_equal(a.load_images(250, 262)[8], a[258].image)


def test_synthetic_classes_are_balanced_and_named():
    ds = _synth(n=512, num_classes=6)
    assert ds.class_names == list(SHAPES[:6])
    assert np.bincount(ds.labels()).min() >= 512 // 6 - 1
    assert ds.has_boxes and ds.has_masks and not ds.has_ignore
    with _raises(["num_classes", "2..10", "11"]):
        _synth(num_classes=11)
    with _raises(["image_size", ">= 12", "8"]):
        _synth(image_size=8)


@pytest.mark.parametrize("size, seed", [(32, 3), (12, 1), (16, 2)])
def test_synthetic_masks_are_the_shape_pixels_and_boxes_their_extent(size, seed):
    ds = _synth(n=256, image_size=size, seed=seed)
    images = ds.load_images(0, len(ds)).astype(np.int64)
    ring_close = ring_total = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s.mask.any()
        ys, xs = np.nonzero(s.mask)
        assert s.box == (xs.min(), ys.min(), xs.max(), ys.max()) == mask_bbox(s.mask)
        # Inside the mask every pixel has the shape's colour, up to +-0.04 of grain ...
        colour = np.median(images[i][:, s.mask], axis=1)
        assert np.abs(images[i][:, s.mask] - colour[:, None]).max() <= 21
        # ... and the pixels right next to it (4-neighbours outside) do not.
        grown = s.mask.copy()
        grown[1:] |= s.mask[:-1]
        grown[:-1] |= s.mask[1:]
        grown[:, 1:] |= s.mask[:, :-1]
        grown[:, :-1] |= s.mask[:, 1:]
        ring = grown & ~s.mask
        dist = np.abs(images[i][:, ring] - colour[:, None]).max(axis=0)
        ring_close += int((dist <= 21).sum())
        ring_total += int(ring.sum())
    assert ring_close <= 0.01 * ring_total


def test_synthetic_generation_is_fast():
    t0 = time.perf_counter()
    ds = open_dataset("synthetic", None, "train", n=2000, image_size=32)
    ds.load_images(0, 2000)
    ds.labels()
    assert time.perf_counter() - t0 < 3.0  # ~0.1 s here; generous for busy CI machines


@pytest.mark.slow
def test_synthetic_is_learnable_by_a_tiny_cnn():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tr = open_dataset("synthetic", None, "train", n=1024, n_val=256, num_classes=4, seed=0)
    va = open_dataset("synthetic", None, "val", n=1024, n_val=256, num_classes=4, seed=0)
    x = torch.from_numpy(tr.load_images(0, len(tr))).float() / 255
    y = torch.from_numpy(tr.labels())
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        xv = torch.from_numpy(va.load_images(0, len(va))).float() / 255
        acc = (model(xv).argmax(1) == torch.from_numpy(va.labels())).float().mean().item()
    assert acc > 0.8, acc


# ---- the real shared datasets (skipped when absent) -----------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    return Path(os.environ.get("SAT_SHARED_DATA") or REPO.parent / "shared" / "data")


def _real_dataset(tmp_path_factory, folder: str, tarball: str, members=None) -> Path:
    """An extracted copy of a shared dataset: ``data/<folder>`` in the repo when ``make data``
    made one, else the needed members of the tarball extracted into a temporary folder."""
    local = REPO / "data" / folder
    if local.is_dir():
        return local
    tar = _shared_data() / tarball
    if not tar.is_file():
        pytest.skip(f"shared dataset {tar} not present (set SAT_SHARED_DATA to its folder)")
    out = tmp_path_factory.mktemp(folder)
    with tarfile.open(tar) as tf:
        chosen = [m for m in tf if members is None or members(m.name)]
        tf.extractall(out, members=chosen, filter="data")
    return out / folder


@pytest.fixture(scope="module")
def real_tiny(tmp_path_factory):
    return _real_dataset(tmp_path_factory, "tiny-imagenet-20", "tiny-imagenet-20.tar.gz")


@pytest.fixture(scope="module")
def real_flowers(tmp_path_factory):
    return _real_dataset(tmp_path_factory, "oxford17-flowers-seg", "oxford17-flowers-seg.tar.gz")


def test_real_tiny_imagenet(real_tiny):
    ds = open_dataset("tiny-imagenet", real_tiny, "train")
    assert len(ds) == 10_000 and ds.num_classes == 20 and ds.image_shape == (3, 64, 64)
    assert np.bincount(ds.labels()).tolist() == [500] * 20
    assert ds.annotated("box").all()
    val = open_dataset("tiny-imagenet", real_tiny, "val", image_size=32)
    assert len(val) == 1000 and np.bincount(val.labels()).tolist() == [50] * 20
    assert val.load_images(0, 8).shape == (8, 3, 32, 32)
    # Some real images are grayscale JPEGs; they come back as RGB with equal channels.
    gray = next(i for i in range(len(val)) if Image.open(real_tiny / val.ids()[i]).mode == "L")
    img = val[gray].image
    assert img.shape == (3, 32, 32) and (img[0] == img[1]).all() and (img[1] == img[2]).all()
    sub = open_dataset("tiny-imagenet", real_tiny, "train", max_per_class=3)
    assert len(sub) == 60 and re.fullmatch(r"[0-9a-f]{64}", sub.fingerprint())
    assert (
        sub.fingerprint()
        == open_dataset("tiny-imagenet", real_tiny, "train", max_per_class=3).fingerprint()
    )


def test_real_oxford17_flowers(real_flowers):
    ds = open_dataset("oxford17", real_flowers, "all", image_size=64)
    assert len(ds) == 1360 and ds.image_shape == (3, 64, 64)
    has = ds.annotated("mask")
    assert has.sum() == 846
    per_class = np.bincount(ds.labels()[has], minlength=17)
    assert per_class[13] == 0 and per_class[np.arange(17) != 13].min() >= 17
    first = int(np.flatnonzero(has)[0])
    s = ds[first]
    assert s.mask.any() and (~s.mask).any() and s.ignore.any()
    assert not (s.mask & s.ignore).any()
    assert len(open_dataset("oxford17", real_flowers, "train", image_size=64)) == 1020
    assert len(open_dataset("oxford17", real_flowers, "val", image_size=64)) == 340


def test_real_cifar10_jpeg_imagefolder(tmp_path_factory):
    keep = re.compile(r"/(train|test)/[a-z]+/000[0-2]\.jpg$")
    root = _real_dataset(
        tmp_path_factory,
        "cifar10-jpeg",
        "cifar10-jpeg.tar.gz",
        members=lambda name: bool(keep.search(name)),
    )
    ds = open_dataset("imagefolder", root, "train", max_per_class=3)
    assert ds.class_names == list(CIFAR10_CLASSES)
    assert len(ds) == 30 and ds.image_shape == (3, 32, 32)
    assert ds.ids()[0] == "train/airplane/0000.jpg"
    assert (
        open_dataset("imagefolder", root, "val", max_per_class=3).ids()[0]
        == "test/airplane/0000.jpg"
    )
