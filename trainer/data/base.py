"""The dataset interface: :class:`Sample`, :class:`ImageDataset`, the content fingerprint and the
dataset registry (:func:`open_dataset`, :func:`list_datasets`).

Every dataset is map-style and yields :class:`Sample` objects: a ``uint8`` image of shape
``(C, H, W)`` (RGB; grayscale files are converted), an ``int`` label, a stable string id and,
where the source has them, an inclusive bounding box and a boolean foreground mask, both in
the coordinates of the (resized) image. ``fingerprint()`` identifies the exact data so that a
saliency store can refuse maps computed on something else.

The data package imports numpy and PIL only (no torch): it runs inside dask workers and in the
store-side tooling. Nothing is read at import time; opening a dataset lists files and parses
annotations, and images are decoded only when a sample is asked for.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import json
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

    def check_files(self) -> None:
        """Raise :class:`SatError` naming the first source file that is missing or not a
        readable image (reads headers only). A no-op for sources held in arrays. Precompute
        calls it before it creates anything, so a zero-byte image cannot leave a half-made
        store behind."""
        return None

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



def _check_source(source: str) -> None:
    if source not in ("box", "mask"):
        raise SatError(f"unknown annotation source {source!r}; choose box or mask")

