"""Dataset sources: CIFAR pickles, ImageFolder, Tiny ImageNet, Oxford-17 flowers, synthetic shapes.

Every dataset is map-style and yields :class:`Sample` objects: a ``uint8`` image of shape
``(C, H, W)`` (RGB; grayscale files are converted), an ``int`` label, a stable string id and,
where the source has them, an inclusive bounding box and a boolean foreground mask, both in
the coordinates of the (resized) image. ``fingerprint()`` identifies the exact data so that a
saliency store can refuse maps computed on something else.

This module imports numpy and PIL only (no torch): it runs inside dask workers and in the
store-side tooling. Nothing is read at import time; opening a dataset lists files and parses
annotations, and images are decoded only when a sample is asked for.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import json
import os
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from saliency_cache.errors import SatError
from trainer.registry import Registry

# Bump when anything that feeds the fingerprint changes meaning (resampling filter, hashing
# layout, synthetic generator), so that stores written before the change are refused.
FINGERPRINT_VERSION = 1
# Downsampling with PIL's BILINEAR filter is antialiased (its support grows with the scale
# factor), so a 64 -> 32 resize averages pixels instead of dropping them.
_RESAMPLE = Image.Resampling.BILINEAR
_IMAGE_EXTENSIONS = tuple(".jpg .jpeg .png .bmp .ppm .pgm .gif .tif .tiff .webp".split())

Box = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class Sample:
    """One example, in the coordinates of the image as the dataset returns it (after resize).

    image: uint8 (C, H, W), RGB, values 0..255.
    label: class index in ``[0, num_classes)``.
    id: stable id (relative file path or ``"<dataset>/<split>/<index>"``).
    box: ``(x0, y0, x1, y1)`` inclusive pixel indices, ``0 <= x0 <= x1 < W`` and
        ``0 <= y0 <= y1 < H``; None when the sample has no box.
    mask: bool (H, W), True on the foreground; None when the sample has no mask.
    ignore: bool (H, W), True where the annotation says nothing (e.g. the unlabelled band
        around an Oxford-17 flower); None when there is no such region. Only set with a mask.
    """

    image: np.ndarray
    label: int
    id: str
    box: Box | None = None
    mask: np.ndarray | None = None
    ignore: np.ndarray | None = None


class ImageDataset(abc.ABC):
    """A map-style image dataset with cheap ids and labels and a content fingerprint.

    Attributes: ``name`` (registered name), ``root`` (folder or None), ``split``,
    ``num_classes``, ``class_names`` (list of ``num_classes`` str), ``image_shape``
    (C, H, W) of every image, ``has_boxes`` / ``has_masks`` (whether any sample carries one),
    ``has_ignore`` (whether masks may carry an ignore region, which makes mask maps ternary).
    """

    name: str = ""
    root: Path | None
    split: str
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]
    has_boxes: bool = False
    has_masks: bool = False
    has_ignore: bool = False

    # ---- the abstract core -------------------------------------------------------------
    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _get(self, i: int) -> Sample:
        """Sample ``i`` for ``0 <= i < len(self)`` (bounds already checked)."""

    @abc.abstractmethod
    def ids(self) -> list[str]:
        """Sample ids in dataset order, without decoding any image."""

    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """int64 (N,) labels in dataset order, without decoding any image."""

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """Every option the dataset was opened with, defaults filled in (JSON-able)."""

    @abc.abstractmethod
    def _pixel_options(self) -> dict[str, Any]:
        """The options that change pixels, boxes or masks (part of the fingerprint)."""

    @abc.abstractmethod
    def _hash_sources(self, h: _Hasher) -> None:
        """Feed the bytes of every source file or array of this split into ``h``."""

    # ---- shared behaviour --------------------------------------------------------------
    def __getitem__(self, i: int) -> Sample:
        return self._get(self._index_of(i))

    def _index_of(self, i: int) -> int:
        """``i`` as an index in ``[0, len)`` (negative counts from the end); IndexError else."""
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(i).__name__}")
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} of {n} samples")
        return j

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise SatError(
                f"sample range [{start}, {stop}) is outside {self.name}/{self.split} "
                f"of {len(self)} samples"
            )

    def load_images(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, C, H, W) images of samples ``start..stop-1``."""
        self._check_range(start, stop)
        out = np.empty((stop - start, *self.image_shape), dtype=np.uint8)
        for k, i in enumerate(range(start, stop)):
            out[k] = self._get(i).image
        return out

    def annotated(self, source: str) -> np.ndarray:
        """bool (N,): which samples carry a ``"box"`` or a ``"mask"``. Cheap (no decoding)."""
        _check_source(source)
        return np.zeros(len(self), dtype=bool)

    def get_box(self, i: int) -> Box | None:
        """The inclusive box of sample ``i`` in the (resized) image, or None."""
        return self[i].box

    def get_mask(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(foreground, ignore) bool (H, W) masks of sample ``i``; each may be None."""
        s = self[i]
        return s.mask, s.ignore

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in the store: name, root, split, options, sizes."""
        return {
            "name": self.name,
            "root": None if self.root is None else str(self.root),
            "split": self.split,
            "options": self.options(),
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "has_boxes": self.has_boxes,
            "has_masks": self.has_masks,
        }

    def fingerprint(self) -> str:
        """sha256 hex digest of the data as this dataset returns it.

        Covers the name, the split, the options that change pixels (e.g. image size), the
        ids, the labels, the boxes and the bytes of every source file or array (image files,
        mask files, CIFAR arrays, generated synthetic arrays). Paths enter only relative to the
        dataset folder, so the digest is the same on every machine. Computed once per
        instance (it reads every file) and cached.
        """
        cached = getattr(self, "_fingerprint_cache", None)
        if cached is not None:
            return cached
        h = _Hasher()
        h.json(
            {
                "fingerprint_version": FINGERPRINT_VERSION,
                "name": self.name,
                "split": self._source_split(),
                "pixel_options": self._pixel_options(),
                "image_shape": list(self.image_shape),
                "num_samples": len(self),
            }
        )
        h.text("\n".join(self.ids()))
        h.array(np.ascontiguousarray(self.labels(), dtype="<i8"))
        self._hash_sources(h)
        self._fingerprint_cache = h.hexdigest()
        return self._fingerprint_cache

    def _source_split(self) -> str:
        """The split actually read (``val`` may be an alias of ``test``)."""
        return self.split

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


class _Hasher:
    """sha256 over length-prefixed fields, so that no two field sequences collide."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def bytes(self, data: bytes | memoryview) -> None:
        self._h.update(len(data).to_bytes(8, "little"))
        self._h.update(data)

    def text(self, s: str) -> None:
        self.bytes(s.encode("utf-8"))

    def json(self, obj: Any) -> None:
        self.text(json.dumps(obj, sort_keys=True, separators=(",", ":")))

    def array(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        self.json({"dtype": a.dtype.str, "shape": list(a.shape)})
        self.bytes(memoryview(a).cast("B"))

    def file(self, path: Path) -> None:
        try:
            self.bytes(path.read_bytes())
        except OSError as e:
            raise SatError(f"cannot read {path}: {e.strerror or e}") from None

    def hexdigest(self) -> str:
        return self._h.hexdigest()


DATASETS: Registry[type[ImageDataset]] = Registry("dataset")


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def dataset_options(name: str) -> dict[str, Any]:
    """The options dataset ``name`` accepts, with their defaults."""
    cls = DATASETS.get(name)
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def open_dataset(name: str, root: str | Path | None, split: str, **options: Any) -> ImageDataset:
    """Open split ``split`` of the registered dataset ``name`` stored under ``root``.

    ``options`` are dataset specific (see :func:`dataset_options`); an unknown option is a
    :class:`SatError` that lists the valid ones.
    """
    cls = DATASETS.get(name)
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SatError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for dataset {name!r}; "
            f"valid: {', '.join(sorted(valid))}"
        )
    return cls(root, split, **options)


# ---- small helpers -------------------------------------------------------------------------
def _check_source(source: str) -> None:
    if source not in ("box", "mask"):
        raise SatError(f"unknown annotation source {source!r}; choose box or mask")


def _check_split(name: str, split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise SatError(
            f"dataset {name!r} has no split {split!r}; choose one of: {', '.join(valid)}"
        )


def _positive_int(name: str, key: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SatError(f"dataset {name!r}: option {key} must be a positive integer, got {value!r}")
    return int(value)


def _int_set(name: str, key: str, value: Any) -> tuple[int, ...]:
    vals = [value] if isinstance(value, (int, np.integer)) else value
    try:
        out = tuple(sorted({int(v) for v in vals}))
        if any(isinstance(v, bool) or int(v) != v for v in vals):
            raise ValueError
    except (TypeError, ValueError):
        raise SatError(
            f"dataset {name!r}: option {key} must be an integer or a list of integers, "
            f"got {value!r}"
        ) from None
    return out


def _need_root(name: str, root: str | Path | None) -> Path:
    if root is None or str(root) == "":
        raise SatError(f"dataset {name!r} needs a root folder (--data-root)")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise SatError(f"dataset {name!r}: root folder not found: {p}")
    return p.resolve()


def _find_dir_with(root: Path, marker: str, name: str) -> Path:
    """``root`` if it holds ``marker``, else its only sub-folder that does (e.g. an extracted
    ``data/`` folder holding ``tiny-imagenet-20/``)."""
    if (root / marker).exists():
        return root
    found = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / marker).exists()]
    if len(found) == 1:
        return found[0]
    if found:
        raise SatError(
            f"dataset {name!r}: several folders under {root} hold {marker} "
            f"({', '.join(d.name for d in found)}); pass one of them as the root"
        )
    raise SatError(f"dataset {name!r}: {root / marker} not found (is {root} the dataset folder?)")


def _list_images(folder: Path) -> list[str]:
    """Image file names in ``folder``, sorted, hidden files skipped."""
    with os.scandir(folder) as it:
        names = [
            e.name
            for e in it
            if not e.name.startswith(".")
            and e.name.lower().endswith(_IMAGE_EXTENSIONS)
            and e.is_file()
        ]
    return sorted(names)


def _first_per_class(labels: np.ndarray, k: int | None) -> np.ndarray:
    """Indices of the first ``k`` samples of each class, in their original order."""
    if k is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:k]] = True
    return np.flatnonzero(keep)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise SatError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SatError(f"cannot read image {path}: {e}") from None


def _read_rgb(
    path: Path, size: tuple[int, int] | None, native: tuple[int, int] | None
) -> np.ndarray:
    """Decode ``path`` to uint8 (3, H, W) RGB.

    size: (H, W) to resize to, or None to keep the file's size. native: (W, H) the file
    must have (the size boxes and masks refer to), or None.
    """
    try:
        with Image.open(path) as im:
            if native is not None and im.size != native:
                raise SatError(
                    f"image {path} is {im.size[0]}x{im.size[1]}, expected {native[0]}x{native[1]} "
                    "like the rest of the dataset (pass image_size to resize)"
                )
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise SatError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SatError(f"cannot read image {path}: {e}") from None
    if size is not None and rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), _RESAMPLE)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def rescale_box(box: Box, native: tuple[int, int], size: tuple[int, int]) -> Box:
    """Map an inclusive box from a ``native`` (W, H) image to a resized (H, W) ``size`` one.

    Pixel ``x`` covers the interval ``[x, x + 1)``; the box covers ``[x0, x1 + 1)``, which
    scales to ``[x0 * s, (x1 + 1) * s)``. The new box is every new pixel that overlaps that
    interval: ``x0' = floor(x0 * s)``, ``x1' = ceil((x1 + 1) * s) - 1`` (outward rounding, so
    the box never shrinks below the object, and ``0 0 W-1 H-1`` stays the whole image).
    """
    (nw, nh), (h, w) = native, size
    x0, y0, x1, y1 = box
    return (
        x0 * w // nw,
        y0 * h // nh,
        -(-(x1 + 1) * w // nw) - 1,
        -(-(y1 + 1) * h // nh) - 1,
    )


def _parse_box(path: Path, lineno: int, fields: Sequence[str], native: tuple[int, int]) -> Box:
    try:
        x0, y0, x1, y1 = (int(f) for f in fields)
    except ValueError:
        raise SatError(
            f"{path} line {lineno}: box coordinates must be integers, got {' '.join(fields)!r}"
        ) from None
    w, h = native
    if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
        raise SatError(
            f"{path} line {lineno}: box ({x0}, {y0}, {x1}, {y1}) is not inside the {w}x{h} image "
            "(need 0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height, inclusive)"
        )
    return (x0, y0, x1, y1)


def _read_lines(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(1-based line number, whitespace-split fields) of every non-blank line of ``path``."""
    if not path.is_file():
        raise SatError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SatError(f"cannot read {what} {path}: {e}") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


# ---- file-backed datasets ------------------------------------------------------------------
class _FileDataset(ImageDataset):
    """Images from files: ``_files[i]`` is decoded on demand and resized to ``_size``."""

    _files: list[Path]
    _ids: list[str]
    _labels: np.ndarray
    _size: tuple[int, int] | None  # (H, W) to resize to, or None to keep the file size
    _native: tuple[int, int] | None  # (W, H) every file must have, or None

    def __len__(self) -> int:
        return len(self._files)

    def ids(self) -> list[str]:
        return list(self._ids)

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def _image(self, i: int) -> np.ndarray:
        return _read_rgb(self._files[i], self._size, self._native)

    def load_images(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        out = np.empty((stop - start, *self.image_shape), dtype=np.uint8)
        for k, i in enumerate(range(start, stop)):
            out[k] = self._image(i)  # decodes the image only, not its mask
        return out

    def _hash_sources(self, h: _Hasher) -> None:
        for path in self._files:
            h.file(path)


@DATASETS.register("imagefolder")
class ImageFolderDataset(_FileDataset):
    """Class sub-folders of images: ``root/<split>/<class>/<file>`` (classes sorted by name).

    ``split`` selects the folder ``root/<split>``; ``val`` falls back to ``root/test`` when
    there is no ``root/val``; ``split="all"`` reads class folders directly under ``root``.
    Labels are the index of the class folder in sorted order; files are taken in sorted
    order within a class. ids are paths relative to ``root`` (``train/cat/0001.jpg``).

    Options: ``image_size`` (int) resizes every image to a square of that side (bilinear,
    antialiased); by default images keep their size, which must then be the same for all.
    ``max_per_class`` keeps the first k files of each class.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int | None = None,
        max_per_class: int | None = None,
    ) -> None:
        self.root = _need_root(self.name, root)
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size, allow_none=True)
        self._max_per_class = _positive_int(
            self.name, "max_per_class", max_per_class, allow_none=True
        )
        folder = self._split_folder()
        classes = sorted(
            d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not classes:
            raise SatError(f"dataset {self.name!r}: no class folders in {folder}")
        files, labels = [], []
        for c, cname in enumerate(classes):
            for f in _list_images(folder / cname):
                files.append(folder / cname / f)
                labels.append(c)
        if not files:
            raise SatError(f"dataset {self.name!r}: no image files under {folder}")
        keep = _first_per_class(np.asarray(labels, dtype=np.int64), self._max_per_class)
        self._files = [files[i] for i in keep]
        self._labels = np.asarray(labels, dtype=np.int64)[keep]
        self._ids = [p.relative_to(self.root).as_posix() for p in self._files]
        self.class_names = classes
        self.num_classes = len(classes)
        w, h = _image_size(self._files[0])
        if self._image_size is None:
            self._size, self._native = None, (w, h)
            self.image_shape = (3, h, w)
        else:
            self._size, self._native = (self._image_size, self._image_size), None
            self.image_shape = (3, self._image_size, self._image_size)
        self._folder = folder

    def _split_folder(self) -> Path:
        if self.split == "all":
            return self.root
        for cand in (self.split, "test") if self.split == "val" else (self.split,):
            if (self.root / cand).is_dir():
                return self.root / cand
        subs = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        raise SatError(
            f"dataset {self.name!r} has no split {self.split!r}: folder {self.root / self.split} "
            f"not found (sub-folders: {', '.join(subs) or 'none'}); use split 'all' to read "
            f"class folders directly under {self.root}"
        )

    def _source_split(self) -> str:
        return "all" if self._folder == self.root else self._folder.name

    def _get(self, i: int) -> Sample:
        return Sample(self._image(i), int(self._labels[i]), self._ids[i])

    def options(self) -> dict[str, Any]:
        return {"image_size": self._image_size, "max_per_class": self._max_per_class}

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size}


@DATASETS.register("tiny-imagenet")
class TinyImageNetDataset(_FileDataset):
    """Tiny ImageNet in its original layout (the 200-class set or any subset of it).

    ``root`` holds ``wnids.txt`` (one class id per line; the label is the line's index, so
    the class order is the file's order) or is a folder with exactly one such dataset folder.
    train: ``train/<wnid>/images/*.JPEG``, boxes in ``train/<wnid>/<wnid>_boxes.txt``
    (``file x0 y0 x1 y1`` per line); samples are class by class in ``wnids.txt`` order,
    files in sorted name order. val: ``val/images/*.JPEG`` in sorted name order, labels and
    boxes in ``val/val_annotations.txt`` (``file wnid x0 y0 x1 y1``). ids are paths relative
    to ``root``. Box coordinates are inclusive pixel indices of the original image.
    ``wnids`` lists the class ids; ``class_names`` are readable names, the first synonym of
    each wnid in ``words.txt`` (the wnid itself when that file or its line is missing, and
    ``name (wnid)`` when two classes share a first synonym).

    Options: ``image_size`` (default 64) resizes images (bilinear, antialiased) and rescales
    boxes outward (see :func:`rescale_box`). ``max_per_class`` keeps the first k images of
    each class in the order above. A train image with no line in its boxes file has
    ``box=None``; a val image with no annotation line is an error (its label is unknown).
    """

    name = "tiny-imagenet"

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int = 64,
        max_per_class: int | None = None,
    ) -> None:
        _check_split(self.name, split, ("train", "val"))
        self.root = _find_dir_with(_need_root(self.name, root), "wnids.txt", self.name)
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size)
        self._max_per_class = _positive_int(
            self.name, "max_per_class", max_per_class, allow_none=True
        )
        self.wnids = self._read_wnids()
        self.class_names = self._read_words(self.wnids)
        self.num_classes = len(self.wnids)
        cls_of = {w: c for c, w in enumerate(self.wnids)}
        if split == "train":
            files, labels, boxes = self._scan_train(cls_of)
        else:
            files, labels, boxes = self._scan_val(cls_of)
        keep = _first_per_class(np.asarray(labels, dtype=np.int64), self._max_per_class)
        self._files = [files[i] for i in keep]
        self._labels = np.asarray(labels, dtype=np.int64)[keep]
        self._ids = [p.relative_to(self.root).as_posix() for p in self._files]
        self._size = (self._image_size, self._image_size)
        self._boxes = [
            None if boxes[i] is None else rescale_box(boxes[i], self._native, self._size)
            for i in keep
        ]
        self.image_shape = (3, self._image_size, self._image_size)
        self.has_boxes = any(b is not None for b in self._boxes)

    def _read_wnids(self) -> list[str]:
        path = self.root / "wnids.txt"
        wnids: list[str] = []
        seen: dict[str, int] = {}
        for n, fields in _read_lines(path, "class list"):
            if len(fields) != 1:
                raise SatError(f"{path} line {n}: expected one wnid, got {' '.join(fields)!r}")
            if fields[0] in seen:
                raise SatError(
                    f"{path} line {n}: wnid {fields[0]!r} repeats line {seen[fields[0]]}"
                )
            seen[fields[0]] = n
            wnids.append(fields[0])
        if not wnids:
            raise SatError(f"{path} lists no classes")
        return wnids

    def _read_words(self, wnids: list[str]) -> list[str]:
        """Readable class names from ``words.txt`` (``wnid<TAB>synonym, synonym, ...``)."""
        path = self.root / "words.txt"
        first: dict[str, str] = {}
        if path.is_file():
            wanted = set(wnids)
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    wnid, _, words = line.rstrip("\n").partition("\t")
                    if wnid in wanted and words.strip():
                        first[wnid] = words.split(",")[0].strip()
        names = [first.get(w, w) for w in wnids]
        shared = {n for n in names if names.count(n) > 1}
        return [f"{n} ({w})" if n in shared and n != w else n for n, w in zip(names, wnids, strict=True)]

    def _scan_train(self, cls_of: dict[str, int]):
        train = self.root / "train"
        if not train.is_dir():
            raise SatError(f"dataset {self.name!r}: train folder not found: {train}")
        folders = sorted(
            d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        for f in folders:
            if f not in cls_of:
                raise SatError(
                    f"dataset {self.name!r}: class folder {train / f} is not listed in "
                    f"{self.root / 'wnids.txt'}"
                )
        files: list[Path] = []
        labels: list[int] = []
        names_per_class = []
        for wnid in self.wnids:
            img_dir = train / wnid / "images"
            if not img_dir.is_dir():
                raise SatError(
                    f"dataset {self.name!r}: wnid {wnid!r} from {self.root / 'wnids.txt'} has no "
                    f"image folder {img_dir}"
                )
            names = _list_images(img_dir)
            names_per_class.append(names)
            files += [img_dir / f for f in names]
            labels += [cls_of[wnid]] * len(names)
        if not files:
            raise SatError(f"dataset {self.name!r}: no images under {train}")
        self._native = _image_size(files[0])
        boxes: list[Box | None] = []
        for wnid, names in zip(self.wnids, names_per_class, strict=True):
            table = self._read_train_boxes(train / wnid / f"{wnid}_boxes.txt")
            boxes += [table.get(f) for f in names]
        return files, labels, boxes

    def _read_train_boxes(self, path: Path) -> dict[str, Box]:
        table: dict[str, Box] = {}
        for n, fields in _read_lines(path, "box annotation file"):
            if len(fields) != 5:
                raise SatError(
                    f"{path} line {n}: expected 5 tab-separated fields (file x0 y0 x1 y1), "
                    f"got {len(fields)}: {' '.join(fields)!r}"
                )
            if fields[0] in table:
                raise SatError(f"{path} line {n}: second box for {fields[0]!r}")
            table[fields[0]] = _parse_box(path, n, fields[1:], self._native)
        return table

    def _scan_val(self, cls_of: dict[str, int]):
        img_dir = self.root / "val" / "images"
        if not img_dir.is_dir():
            raise SatError(f"dataset {self.name!r}: val image folder not found: {img_dir}")
        names = _list_images(img_dir)
        if not names:
            raise SatError(f"dataset {self.name!r}: no images in {img_dir}")
        self._native = _image_size(img_dir / names[0])
        path = self.root / "val" / "val_annotations.txt"
        table: dict[str, tuple[int, Box]] = {}
        for n, fields in _read_lines(path, "val annotation file"):
            if len(fields) != 6:
                raise SatError(
                    f"{path} line {n}: expected 6 tab-separated fields (file wnid x0 y0 x1 y1), "
                    f"got {len(fields)}: {' '.join(fields)!r}"
                )
            if fields[1] not in cls_of:
                raise SatError(
                    f"{path} line {n}: wnid {fields[1]!r} of {fields[0]} is not listed in "
                    f"{self.root / 'wnids.txt'}"
                )
            if fields[0] in table:
                raise SatError(f"{path} line {n}: second annotation for {fields[0]!r}")
            table[fields[0]] = (cls_of[fields[1]], _parse_box(path, n, fields[2:], self._native))
        files, labels, boxes = [], [], []
        for f in names:
            if f not in table:
                raise SatError(f"image {img_dir / f} has no line in {path} (its class is unknown)")
            files.append(img_dir / f)
            labels.append(table[f][0])
            boxes.append(table[f][1])
        return files, labels, boxes

    def _get(self, i: int) -> Sample:
        return Sample(self._image(i), int(self._labels[i]), self._ids[i], box=self._boxes[i])

    def get_box(self, i: int) -> Box | None:
        return self._boxes[self._index_of(i)]

    def annotated(self, source: str) -> np.ndarray:
        _check_source(source)
        if source == "mask":
            return np.zeros(len(self), dtype=bool)
        return np.array([b is not None for b in self._boxes], dtype=bool)

    def options(self) -> dict[str, Any]:
        return {"image_size": self._image_size, "max_per_class": self._max_per_class}

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size}

    def _hash_sources(self, h: _Hasher) -> None:
        super()._hash_sources(h)
        h.array(np.array([b if b is not None else (-1, -1, -1, -1) for b in self._boxes], "<i8"))


_OXFORD_NAME = re.compile(r"^image_(\d{4})\.(jpg|jpeg|png)$", re.IGNORECASE)
_OXFORD_PER_CLASS = 80
_OXFORD_TRAIN_PER_CLASS = 60
_OXFORD_CLASSES = tuple(
    "daffodil snowdrop lily_valley bluebell crocus iris tigerlily tulip fritillary sunflower "
    "daisy colts_foot dandelion cowslip buttercup windflower pansy".split()
)


@DATASETS.register("oxford17")
class Oxford17Dataset(_FileDataset):
    """Oxford 17 Category Flowers with optional segmentation label maps.

    Images are ``<root>/<image_dir>/image_NNNN.jpg`` (NNNN = 0001..1360); the class is
    ``(NNNN - 1) // 80``. The layout ships no official split, so this one is fixed by the
    image number: within each class of 80, numbers 1..60 are ``train`` and 61..80 are
    ``val`` (1,020 / 340 images); ``all`` is every image. Samples are in image-number order;
    ids are paths relative to ``root``.

    Masks are label maps ``<mask_dir>/image_NNNN.png`` (palette or grayscale PNG; the pixel
    value is the label) of the same size as their image. A pixel is foreground when its
    label is in ``foreground`` and ignored (neither foreground nor background; 0 in a mask
    map) when it is in ``ignore``. A sample without a mask file has ``mask=None``.

    Options: ``image_size`` (default 256; images bilinear, masks nearest-neighbour; aspect
    ratio is not kept), ``image_dir`` (default ``images``), ``mask_dir`` (default
    ``labels``; relative to root or absolute), ``foreground`` (default ``[1]``), ``ignore``
    (default ``[0]``), ``only_with_masks`` (default False) keeps only segmented images,
    ``max_per_class`` keeps the first k images of each class.
    """

    name = "oxford17"

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int = 256,
        image_dir: str = "images",
        mask_dir: str = "labels",
        foreground: int | Sequence[int] = (1,),
        ignore: int | Sequence[int] = (0,),
        only_with_masks: bool = False,
        max_per_class: int | None = None,
    ) -> None:
        _check_split(self.name, split, ("train", "val", "all"))
        self.root = _find_dir_with(_need_root(self.name, root), image_dir, self.name)
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size)
        self._max_per_class = _positive_int(
            self.name, "max_per_class", max_per_class, allow_none=True
        )
        self._foreground = _int_set(self.name, "foreground", foreground)
        self._ignore = _int_set(self.name, "ignore", ignore)
        both = set(self._foreground) & set(self._ignore)
        if both:
            raise SatError(
                f"dataset {self.name!r}: label values {sorted(both)} are both foreground and ignore"
            )
        if not isinstance(only_with_masks, bool):
            raise SatError(
                f"dataset {self.name!r}: only_with_masks must be true or false, "
                f"got {only_with_masks!r}"
            )
        self._only_with_masks = only_with_masks
        self._image_dir, self._mask_dir_opt = str(image_dir), str(mask_dir)
        img_dir = self.root / image_dir
        mask_dir_path = Path(mask_dir) if Path(mask_dir).is_absolute() else self.root / mask_dir
        mask_names = set(_list_images(mask_dir_path)) if mask_dir_path.is_dir() else set()
        if only_with_masks and not mask_dir_path.is_dir():
            raise SatError(
                f"dataset {self.name!r}: only_with_masks set but mask folder not found: "
                f"{mask_dir_path}"
            )
        entries = []
        for f in _list_images(img_dir):
            m = _OXFORD_NAME.match(f)
            if m is None:
                continue  # the original archive keeps other files (files.txt) beside the images
            number = int(m.group(1))
            label = (number - 1) // _OXFORD_PER_CLASS
            if not 1 <= number <= _OXFORD_PER_CLASS * len(_OXFORD_CLASSES):
                raise SatError(
                    f"image {img_dir / f}: number {number} is outside 1..1360, so it has no class "
                    f"of the {len(_OXFORD_CLASSES)}"
                )
            in_train = (number - 1) % _OXFORD_PER_CLASS < _OXFORD_TRAIN_PER_CLASS
            if split == "all" or (split == "train") == in_train:
                mask_name = f"image_{m.group(1)}.png"
                mask = mask_dir_path / mask_name if mask_name in mask_names else None
                if mask is not None or not only_with_masks:
                    entries.append((number, img_dir / f, label, mask))
        if not entries:
            raise SatError(f"dataset {self.name!r}: no images for split {split!r} in {img_dir}")
        entries.sort(key=lambda e: e[0])
        labels = np.array([e[2] for e in entries], dtype=np.int64)
        keep = _first_per_class(labels, self._max_per_class)
        self._files = [entries[i][1] for i in keep]
        self._masks: list[Path | None] = [entries[i][3] for i in keep]
        self._labels = labels[keep]
        self._ids = [p.relative_to(self.root).as_posix() for p in self._files]
        self.class_names = list(_OXFORD_CLASSES)
        self.num_classes = len(_OXFORD_CLASSES)
        self._size = (self._image_size, self._image_size)
        self._native = None  # images may differ in size; each mask must match its own image
        self.image_shape = (3, self._image_size, self._image_size)
        self.has_masks = any(m is not None for m in self._masks)
        self.has_ignore = self.has_masks and bool(self._ignore)

    def _read_mask(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        path = self._masks[i]
        if path is None:
            return None, None
        img_size = _image_size(self._files[i])
        try:
            with Image.open(path) as im:
                if im.mode not in ("P", "L", "1", "I", "I;16"):
                    raise SatError(
                        f"mask {path} has mode {im.mode}; expected a palette or grayscale label map"
                    )
                if im.size != img_size:
                    raise SatError(
                        f"mask {path} is {im.size[0]}x{im.size[1]} but its image {self._files[i]} "
                        f"is {img_size[0]}x{img_size[1]}"
                    )
                im.load()
                if im.size != (self._size[1], self._size[0]):
                    im = im.resize((self._size[1], self._size[0]), Image.Resampling.NEAREST)
                values = np.asarray(im).astype(np.int64)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise SatError(f"cannot read mask {path}: {e}") from None
        fg = np.isin(values, self._foreground)
        ign = np.isin(values, self._ignore) if self._ignore else None
        return fg, ign

    def _get(self, i: int) -> Sample:
        mask, ign = self._read_mask(i)
        return Sample(self._image(i), int(self._labels[i]), self._ids[i], mask=mask, ignore=ign)

    def get_mask(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self._read_mask(self._index_of(i))

    def annotated(self, source: str) -> np.ndarray:
        _check_source(source)
        if source == "box":
            return np.zeros(len(self), dtype=bool)
        return np.array([m is not None for m in self._masks], dtype=bool)

    def options(self) -> dict[str, Any]:
        return {
            "image_size": self._image_size,
            "image_dir": self._image_dir,
            "mask_dir": self._mask_dir_opt,
            "foreground": list(self._foreground),
            "ignore": list(self._ignore),
            "only_with_masks": self._only_with_masks,
            "max_per_class": self._max_per_class,
        }

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size}

    def _hash_sources(self, h: _Hasher) -> None:
        super()._hash_sources(h)
        # Mask files are sources too: an edited label map changes the weak maps built from it.
        for m in self._masks:
            if m is None:
                h.text("")
            else:
                h.text(m.name)
                h.file(m)


# ---- CIFAR pickles -------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Loads the CIFAR batch dicts (lists, str/bytes, numpy arrays) and nothing else, so a
    tampered file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles from numpy 1.x
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path, how_to_get: str) -> dict[str, Any]:
    if not path.is_file():
        raise SatError(f"CIFAR file not found: {path}; {how_to_get}")
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise SatError(f"cannot read CIFAR file {path}: {e}") from None
    if not isinstance(obj, dict):
        raise SatError(f"CIFAR file {path} does not hold a dict (got {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(values: Iterable[Any]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class _CifarDataset(ImageDataset):
    """CIFAR in torchvision's on-disk pickle format, read without torch.

    Images are uint8 (3, 32, 32) (the pickle's rows are the red, green, blue planes of a
    32x32 image, row-major). Splits: ``train`` and ``test``; ``val`` reads the test set.
    ids are ``"<name>/<train|test>/<index in the original split>"``.

    Options: ``image_size`` (default 32) resizes (bilinear, antialiased); ``max_per_class``
    keeps the first k images of each class; ``download=True`` fetches the data with
    torchvision when it is missing (needs torchvision and network).
    """

    _folder: str
    _train_files: tuple[str, ...]
    _test_files: tuple[str, ...]
    _meta_file: str
    _label_key: str
    _names_key: str
    _display: str
    _tv_class: str

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int = 32,
        max_per_class: int | None = None,
        download: bool = False,
    ) -> None:
        _check_split(self.name, split, ("train", "test", "val"))
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size)
        self._max_per_class = _positive_int(
            self.name, "max_per_class", max_per_class, allow_none=True
        )
        self._download = bool(download)
        if root is None or str(root) == "":
            raise SatError(f"dataset {self.name!r} needs a root folder (--data-root)")
        base = Path(root).expanduser().resolve()
        # Accept either the folder that holds cifar-10-batches-py/ or that folder itself.
        folder = base / self._folder
        if not folder.is_dir() and (base / self._meta_file).is_file():
            folder = base
        if not (folder / self._meta_file).is_file() and self._download:
            self._fetch(base)
            folder = base / self._folder
        self.root = folder
        how = (
            f"download the {self._display} python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {base}, "
            "or pass download=True (needs torchvision)"
        )
        meta = _load_cifar_pickle(folder / self._meta_file, how)
        if self._names_key not in meta:
            raise SatError(
                f"CIFAR file {folder / self._meta_file} has no {self._names_key!r} entry"
            )
        self.class_names = _names(meta[self._names_key])
        self.num_classes = len(self.class_names)
        files = self._train_files if split == "train" else self._test_files
        data, labels = [], []
        for fname in files:
            d = _load_cifar_pickle(folder / fname, how)
            if "data" not in d or self._label_key not in d:
                raise SatError(f"CIFAR file {folder / fname} lacks 'data' or {self._label_key!r}")
            arr = np.asarray(d["data"])
            lab = np.asarray(d[self._label_key], dtype=np.int64)
            if (
                arr.dtype != np.uint8
                or arr.ndim != 2
                or arr.shape[1] != 3072
                or len(lab) != len(arr)
            ):
                raise SatError(
                    f"CIFAR file {folder / fname}: expected uint8 data (N, 3072) and N labels, got "
                    f"{arr.dtype} {arr.shape} and {len(lab)} labels"
                )
            if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise SatError(
                    f"CIFAR file {folder / fname}: labels outside 0..{self.num_classes - 1}"
                )
            data.append(arr)
            labels.append(lab)
        all_labels = np.concatenate(labels)
        keep = _first_per_class(all_labels, self._max_per_class)
        self._data = np.concatenate(data)[keep].reshape(-1, 3, 32, 32)
        self._labels = all_labels[keep]
        self._index = keep
        self.image_shape = (3, self._image_size, self._image_size)

    def _fetch(self, base: Path) -> None:
        try:
            import torchvision.datasets as tvd
        except ImportError:
            raise SatError(
                f"download=True needs torchvision, which is not installed; "
                f"{self._display} not found in {base}"
            ) from None
        try:
            base.mkdir(parents=True, exist_ok=True)
            # One archive holds both splits; torchvision checks its md5 before extracting.
            getattr(tvd, self._tv_class)(str(base), train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise SatError(f"downloading {self._display} into {base} failed: {e}") from None

    def _source_split(self) -> str:
        return "train" if self.split == "train" else "test"

    def __len__(self) -> int:
        return len(self._labels)

    def ids(self) -> list[str]:
        s = self._source_split()
        return [f"{self.name}/{s}/{i}" for i in self._index]

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def _resized(self, images: np.ndarray) -> np.ndarray:
        if self._image_size == 32:
            return images.copy()
        s = self._image_size
        out = np.empty((len(images), 3, s, s), dtype=np.uint8)
        for k, img in enumerate(images):
            pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))
            out[k] = np.asarray(pil.resize((s, s), _RESAMPLE)).transpose(2, 0, 1)
        return out

    def _get(self, i: int) -> Sample:
        s = self._source_split()
        return Sample(
            self._resized(self._data[i : i + 1])[0],
            int(self._labels[i]),
            f"{self.name}/{s}/{self._index[i]}",
        )

    def load_images(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        return self._resized(self._data[start:stop])

    def options(self) -> dict[str, Any]:
        return {
            "image_size": self._image_size,
            "max_per_class": self._max_per_class,
            "download": self._download,
        }

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size}

    def _hash_sources(self, h: _Hasher) -> None:
        h.array(self._data)


@DATASETS.register("cifar10")
class Cifar10Dataset(_CifarDataset):
    __doc__ = _CifarDataset.__doc__
    name = "cifar10"
    _folder = "cifar-10-batches-py"
    _train_files = tuple(f"data_batch_{k}" for k in range(1, 6))
    _test_files = ("test_batch",)
    _meta_file = "batches.meta"
    _label_key = "labels"
    _names_key = "label_names"
    _display = "CIFAR-10"
    _tv_class = "CIFAR10"


@DATASETS.register("cifar100")
class Cifar100Dataset(_CifarDataset):
    __doc__ = _CifarDataset.__doc__
    name = "cifar100"
    _folder = "cifar-100-python"
    _train_files = ("train",)
    _test_files = ("test",)
    _meta_file = "meta"
    _label_key = "fine_labels"
    _names_key = "fine_label_names"
    _display = "CIFAR-100"
    _tv_class = "CIFAR100"


# ---- synthetic shapes ----------------------------------------------------------------------
SHAPES = tuple("disc square triangle plus ring diamond xcross frame hbar vbar".split())
_SPLIT_STREAM = {"train": 0, "val": 1}
_BLOCK = 256  # samples per generation block; block b is a pure function of (seed, split, b)


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixels inside a unit-radius shape; dx, dy are offsets from its centre over its radius.

    Every shape lies within ``max(|dx|, |dy|) <= 1``, so it fits the square of side 2r.
    """
    ax, ay = np.abs(dx), np.abs(dy)
    cheb = np.maximum(ax, ay)
    r2 = dx * dx + dy * dy
    if kind == "disc":
        return r2 <= 1.0
    if kind == "square":
        return cheb <= 0.8
    if kind == "triangle":  # apex up, base at the bottom
        return (dy <= 0.8) & (ax <= 0.5 * (dy + 1.0))
    if kind == "plus":
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if kind == "ring":
        return (r2 <= 1.0) & (r2 >= 0.36)
    if kind == "diamond":
        return ax + ay <= 1.0
    if kind == "xcross":
        return ((np.abs(dx - dy) <= 0.45) | (np.abs(dx + dy) <= 0.45)) & (cheb <= 0.85)
    if kind == "frame":
        return (cheb <= 0.9) & (cheb >= 0.55)
    if kind == "hbar":
        return (ax <= 1.0) & (ay <= 0.35)
    if kind == "vbar":
        return (ay <= 1.0) & (ax <= 0.35)
    raise ValueError(kind)


def _generate_block(seed: int, stream: int, block: int, size: int, num_classes: int):
    """One block of ``_BLOCK`` synthetic samples: (uint8 (B,3,S,S), int64 (B,), bool (B,S,S)).

    Only uniform draws and exact float arithmetic (no sin/cos, no normal sampler), so the
    bytes are the same on every platform. Labels are the generator's first draw, so
    :func:`_block_labels` reproduces them without drawing the rest.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, block]))
    b, s = _BLOCK, size
    labels = rng.permutation(np.arange(b) % num_classes).astype(np.int64)
    radius = (s * rng.uniform(0.22, 0.36, b)).astype(np.float32)
    # Integer centres at least ceil(r) from the border: the shape lies fully inside, and
    # thin shapes (plus, ring, frame) always cover some pixel centres.
    margin = np.ceil(radius).astype(np.int64)
    span = s - 2 * margin  # number of allowed centre positions, >= 1 for size >= 12
    cx = margin + np.floor(rng.random(b) * span).astype(np.int64)
    cy = margin + np.floor(rng.random(b) * span).astype(np.int64)
    grey = rng.uniform(0.15, 0.85, b)
    bg = np.clip(grey[:, None] + rng.uniform(-0.12, 0.12, (b, 3)), 0.0, 1.0)
    # The shape is at least ~0.4 brighter or darker than the background, so it stays visible.
    away = np.where(grey < 0.5, 1.0, -1.0) * rng.uniform(0.4, 0.6, b)
    fg = np.clip((grey + away)[:, None] + rng.uniform(-0.2, 0.2, (b, 3)), 0.0, 1.0)
    use_stripes = rng.random(b) < 0.5
    direction = rng.integers(0, 4, b)
    period = rng.uniform(3.0, 7.0, b)
    phase = rng.random(b)
    noise = rng.random((b, s, s), dtype=np.float32)
    grain = rng.random((b, s, s), dtype=np.float32)

    coords = np.arange(s, dtype=np.float32)
    yy, xx = coords[None, :, None], coords[None, None, :]
    a = np.array([1, 0, 1, 1], np.float32)[direction][:, None, None]
    c = np.array([0, 1, 1, -1], np.float32)[direction][:, None, None]
    t = np.mod(
        (a * xx + c * yy) / period[:, None, None].astype(np.float32)
        + phase[:, None, None].astype(np.float32),
        1.0,
    )
    stripes = np.abs(2.0 * t - 1.0) - 0.5  # triangle wave in [-0.5, 0.5]
    texture = np.where(use_stripes[:, None, None], stripes, noise - 0.5) * np.float32(0.3)

    r = radius[:, None, None]
    dx = (xx - cx[:, None, None].astype(np.float32)) / r
    dy = (yy - cy[:, None, None].astype(np.float32)) / r
    mask = np.zeros((b, s, s), dtype=bool)
    for k in range(num_classes):
        sel = labels == k
        mask[sel] = _shape_mask(SHAPES[k], dx[sel], dy[sel])

    img = bg[:, :, None, None].astype(np.float32) + texture[:, None]
    img = np.where(mask[:, None], fg[:, :, None, None].astype(np.float32), img)
    img = img + (grain[:, None] - 0.5) * np.float32(0.08)
    images = np.floor(np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if not mask.reshape(b, -1).any(1).all():  # guaranteed by the margin rule above
        raise RuntimeError("synthetic generator produced an empty shape")
    return images, labels, mask


def _block_labels(seed: int, stream: int, block: int, num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, block]))
    return rng.permutation(np.arange(_BLOCK) % num_classes).astype(np.int64)


def mask_bbox(mask: np.ndarray) -> Box | None:
    """Inclusive ``(x0, y0, x1, y1)`` bounding box of a bool (H, W) mask; None if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


@DATASETS.register("synthetic")
class SyntheticShapes(ImageDataset):
    """Procedural shapes on textured backgrounds; the class is the shape kind.

    Each image shows one shape (``SHAPES[label]``: disc, square, triangle, plus, ring,
    diamond, x-cross, frame, horizontal bar, vertical bar) at a random position and size,
    in a colour at least ~0.4 brighter or darker than a background of noise or stripes.
    The mask is exactly the shape's pixels and the box is the mask's inclusive bounding box.
    Classes are balanced within every block of 256 samples.

    Deterministic: sample i depends only on (seed, split, i // 256), so ``n=100`` is the
    first 100 samples of ``n=1000``. ``train`` and ``val`` use different seed streams.
    ``root`` is ignored. ids are ``"synthetic/<split>/<i>"``.

    Options: ``n`` (train samples, default 2000), ``n_val`` (val samples, default ``n``),
    ``image_size`` (default 32, at least 12), ``num_classes`` (2..10, default 6),
    ``seed`` (default 0).
    """

    name = "synthetic"

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        n: int = 2000,
        n_val: int | None = None,
        image_size: int = 32,
        num_classes: int = 6,
        seed: int = 0,
    ) -> None:
        _check_split(self.name, split, tuple(_SPLIT_STREAM))
        self.root = None
        self.split = split
        self._n = _positive_int(self.name, "n", n)
        self._n_val = _positive_int(self.name, "n_val", n_val, allow_none=True)
        self._image_size = _positive_int(self.name, "image_size", image_size)
        if self._image_size < 12:
            raise SatError(f"dataset 'synthetic': image_size must be >= 12, got {image_size!r}")
        self.num_classes = _positive_int(self.name, "num_classes", num_classes)
        if not 2 <= self.num_classes <= len(SHAPES):
            raise SatError(
                f"dataset 'synthetic': num_classes must be in 2..{len(SHAPES)}, got {num_classes!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SatError(
                f"dataset 'synthetic': seed must be a non-negative integer, got {seed!r}"
            )
        self._seed = int(seed)
        self._len = self._n if split == "train" else (self._n_val or self._n)
        self._stream = _SPLIT_STREAM[split]
        self.class_names = list(SHAPES[: self.num_classes])
        self.image_shape = (3, self._image_size, self._image_size)
        self.has_boxes = self.has_masks = True
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self._len

    def _block(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(images, labels, masks, boxes int64 (B, 4)) of block k; a few blocks are cached."""
        if k not in self._cache:
            images, labels, masks = _generate_block(
                self._seed, self._stream, k, self._image_size, self.num_classes
            )
            rows, cols = masks.any(2), masks.any(1)
            s = self._image_size
            boxes = np.stack(
                [
                    cols.argmax(1),
                    rows.argmax(1),
                    s - 1 - cols[:, ::-1].argmax(1),
                    s - 1 - rows[:, ::-1].argmax(1),
                ],
                axis=1,
            ).astype(np.int64)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = (images, labels, masks, boxes)
        return self._cache[k]

    def _get(self, i: int) -> Sample:
        images, labels, masks, boxes = self._block(i // _BLOCK)
        j = i % _BLOCK
        return Sample(
            images[j].copy(),
            int(labels[j]),
            f"synthetic/{self.split}/{i}",
            box=tuple(int(v) for v in boxes[j]),
            mask=masks[j].copy(),
        )

    def _ranges(self, start: int, stop: int):
        """(block, lo, hi) pieces covering samples start..stop-1."""
        i = start
        while i < stop:
            k = i // _BLOCK
            hi = min(stop, (k + 1) * _BLOCK)
            yield k, i - k * _BLOCK, hi - k * _BLOCK
            i = hi

    def load_images(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        parts = [self._block(k)[0][lo:hi] for k, lo, hi in self._ranges(start, stop)]
        if not parts:
            return np.empty((0, *self.image_shape), dtype=np.uint8)
        return np.concatenate(parts)

    def get_box(self, i: int) -> Box | None:
        i = self._index_of(i)
        return tuple(int(v) for v in self._block(i // _BLOCK)[3][i % _BLOCK])

    def get_mask(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        i = self._index_of(i)
        return self._block(i // _BLOCK)[2][i % _BLOCK].copy(), None

    def annotated(self, source: str) -> np.ndarray:
        _check_source(source)
        return np.ones(len(self), dtype=bool)

    def ids(self) -> list[str]:
        return [f"synthetic/{self.split}/{i}" for i in range(self._len)]

    def labels(self) -> np.ndarray:
        nblocks = -(-self._len // _BLOCK)
        lab = [_block_labels(self._seed, self._stream, k, self.num_classes) for k in range(nblocks)]
        return np.concatenate(lab)[: self._len]

    def options(self) -> dict[str, Any]:
        return {
            "n": self._n,
            "n_val": self._n_val,
            "image_size": self._image_size,
            "num_classes": self.num_classes,
            "seed": self._seed,
        }

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size, "num_classes": self.num_classes, "seed": self._seed}

    def _hash_sources(self, h: _Hasher) -> None:
        for k, lo, hi in self._ranges(0, self._len):
            images, _, masks, boxes = self._block(k)
            h.array(images[lo:hi])
            h.array(np.packbits(masks[lo:hi], axis=-1))
            h.array(boxes[lo:hi])
