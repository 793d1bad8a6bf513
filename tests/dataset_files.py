"""Tiny datasets written in each real on-disk format, for tests (numpy + PIL only).

Every function writes into ``root`` (normally a pytest ``tmp_path``), is deterministic for a
given ``seed`` and returns the folder to pass as ``root`` to
:func:`trainer.data.open_dataset`:

    root = make_tiny_imagenet(tmp_path, n_classes=2, per_class=3, size=16)
    ds = open_dataset("tiny-imagenet", root, "train", image_size=16)

Images are random noise plus a class-dependent bright square, so pixels differ between
samples and classes. Sizes are tiny so that a test reads them in milliseconds.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _image(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """uint8 (H, W, 3): noise with a bright square whose position depends on the label."""
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    q = max(1, min(h, w) // 4)
    y = (label * q) % max(1, h - q)
    img[y : y + q, :q] = 230
    return img


def _save(img: np.ndarray, path: Path, *, gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(img)
    if gray:
        pil = pil.convert("L")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        pil.save(path, format="JPEG", quality=95)
    else:
        pil.save(path)


def make_cifar_pickles(
    root: str | Path,
    which: str = "cifar10",
    n_train: int = 10,
    n_test: int = 4,
    num_classes: int | None = None,
    seed: int = 0,
    bytes_keys: bool = False,
) -> Path:
    """Write CIFAR-10 (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
    ``batches.meta``) or CIFAR-100 (``cifar-100-python/train``, ``test``, ``meta``) pickles.

    Each batch is a dict with ``data`` uint8 (N, 3072) (red, green, blue planes of a 32x32
    image, row-major), the labels as a list (``labels``, or ``fine_labels`` and
    ``coarse_labels``) and ``filenames``, as in the real files. CIFAR-10's training images
    are spread over the five batches. ``bytes_keys`` writes bytes keys, as a Python 2
    pickle read with ``encoding="bytes"`` would have. Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        ncls = num_classes or 10
        names = [CIFAR10_CLASSES[c % 10] + ("" if c < 10 else str(c)) for c in range(ncls)]
        meta_file, meta = "batches.meta", {key("label_names"): names, key("num_vis"): 3072}
        train_files = [f"data_batch_{k}" for k in range(1, 6)]
        test_files = ["test_batch"]
    elif which == "cifar100":
        folder = root / "cifar-100-python"
        ncls = num_classes or 100
        names = [f"fine{c}" for c in range(ncls)]
        meta_file = "meta"
        meta = {key("fine_label_names"): names, key("coarse_label_names"): ["c0", "c1"]}
        train_files, test_files = ["train"], ["test"]
    else:
        raise ValueError(which)
    folder.mkdir(parents=True, exist_ok=True)

    def write(fname: str, n: int, start: int) -> None:
        labels = [int(v) for v in (np.arange(start, start + n) % ncls)]
        data = (
            np.stack([_image(rng, c, 32, 32).transpose(2, 0, 1).reshape(-1) for c in labels])
            if n
            else np.zeros((0, 3072), np.uint8)
        )
        batch = {
            key("batch_label"): f"fixture batch {fname}",
            key("data"): data,
            key("filenames"): [f"img_{start + i}.png" for i in range(n)],
        }
        if which == "cifar10":
            batch[key("labels")] = labels
        else:
            batch[key("fine_labels")] = labels
            batch[key("coarse_labels")] = [c % 2 for c in labels]
        with (folder / fname).open("wb") as f:
            pickle.dump(batch, f, protocol=2)

    per = np.array_split(np.arange(n_train), len(train_files))
    for fname, idx in zip(train_files, per, strict=True):
        write(fname, len(idx), int(idx[0]) if len(idx) else 0)
    for fname in test_files:
        write(fname, n_test, 0)
    with (folder / meta_file).open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def make_imagefolder(
    root: str | Path,
    classes: Iterable[str] = ("cat", "dog"),
    per_class: int = 3,
    size: int = 8,
    splits: Iterable[str] = ("train", "val"),
    ext: str = "png",
    seed: int = 0,
) -> Path:
    """Write ``root/<split>/<class>/<k:04d>.<ext>`` images of ``size`` x ``size`` pixels.

    ``ext="png"`` keeps pixels exact; ``"jpg"`` writes JPEGs like the shared cifar10-jpeg
    set. Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, cname in enumerate(classes):
            for k in range(per_class):
                _save(_image(rng, c, size, size), root / split / cname / f"{k:04d}.{ext}")
    return root


def make_tiny_imagenet(
    root: str | Path,
    n_classes: int = 2,
    per_class: int = 3,
    size: int = 16,
    val_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """Write a Tiny ImageNet tree under ``root/tiny-imagenet-fixture`` and return that folder.

    Layout as the original: ``wnids.txt`` (not in sorted order, as in the real file),
    ``words.txt``, ``train/<wnid>/images/<wnid>_<k>.JPEG``, ``train/<wnid>/<wnid>_boxes.txt``
    and ``val/images/val_<k>.JPEG`` with ``val/val_annotations.txt``; fields are
    tab-separated and boxes are inclusive pixel indices. Among the boxes: the whole image
    (first train image of each class), a single pixel (second one) and one touching the
    bottom-right corner (third). The second train image of the first class and the first
    val image are grayscale JPEGs.
    """
    base = Path(root) / "tiny-imagenet-fixture"
    rng = np.random.default_rng(seed)
    wnids = [f"n{9000000 - 17 * c:08d}" for c in range(n_classes)]  # descending: not sorted
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing {c}\n" for c, w in enumerate(wnids)))

    def box(k: int) -> tuple[int, int, int, int]:
        if k == 0:
            return (0, 0, size - 1, size - 1)
        if k == 1:
            return (3, 2, 3, 2)
        if k == 2:
            return (size // 2, size // 3, size - 1, size - 1)
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = (int(v) for v in rng.integers(size // 2, size, 2))
        return (x0, y0, x1, y1)

    for c, wnid in enumerate(wnids):
        lines = []
        for k in range(per_class):
            fname = f"{wnid}_{k}.JPEG"
            _save(
                _image(rng, c, size, size),
                base / "train" / wnid / "images" / fname,
                gray=(c == 0 and k == 1),
            )
            lines.append("\t".join([fname, *map(str, box(k))]))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(lines) + "\n")
    lines = []
    for k in range(n_classes * val_per_class):
        c = (k * 7 + 1) % n_classes  # classes interleaved, not grouped
        fname = f"val_{k}.JPEG"
        _save(_image(rng, c, size, size), base / "val" / "images" / fname, gray=(k == 0))
        lines.append("\t".join([fname, wnids[c], *map(str, box(k + 3))]))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def make_oxford17(
    root: str | Path,
    n_classes: int = 2,
    in_class: Iterable[int] = (0, 1, 2, 60, 61),
    size: int = 16,
    unmasked: Iterable[int] = (3,),
    unmasked_classes: Iterable[int] | None = None,
    seed: int = 0,
) -> Path:
    """Write ``root/images/image_NNNN.jpg`` and palette-PNG label maps ``root/labels/*.png``.

    For class c < n_classes and j in ``in_class`` the image number is ``80 c + j + 1``
    (so j < 60 is in the train split, j >= 60 in val). Each label map has a flower disc
    (label 1) ringed by an unlabelled band (0), a leaf bar (2) and background (3), with
    the same palette as the real files. Images numbered in ``unmasked`` and every image of
    ``unmasked_classes`` (default: the last class, like cowslip in the real set) get no label
    map. Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    if unmasked_classes is None:
        unmasked_classes = (n_classes - 1,) if n_classes > 1 else ()
    no_mask, no_mask_cls = set(unmasked), set(unmasked_classes)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128]
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(n_classes):
        for j in in_class:
            number = 80 * c + j + 1
            img = _image(rng, c, size, size)
            _save(img, root / "images" / f"image_{number:04d}.jpg")
            if number in no_mask or c in no_mask_cls:
                continue
            cy, cx = (int(v) for v in rng.integers(size // 3, size - size // 3, 2))
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            rad = size / 5
            labels = np.full((size, size), 3, np.uint8)
            labels[size - size // 5 :, :] = 2
            labels[r2 <= (rad + 1.5) ** 2] = 0
            labels[r2 <= rad**2] = 1
            pil = Image.frombytes("P", (size, size), labels.tobytes())
            pil.putpalette(palette)
            (root / "labels").mkdir(parents=True, exist_ok=True)
            pil.save(root / "labels" / f"image_{number:04d}.png")
    return root


def oxford_label_map(path: str | Path) -> np.ndarray:
    """The label values of a fixture's (or the real set's) label map, uint8 (H, W)."""
    with Image.open(path) as im:
        return np.asarray(im).copy()
