"""Shared by the file-backed sources: argument checks, image listing and decoding, box parsing,
and :class:`_FileDataset` (images decoded on demand from a list of files).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from saliency_cache.errors import SatError
from trainer.data.base import _IMAGE_EXTENSIONS, _RESAMPLE, Box, ImageDataset, _Hasher


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

    def check_files(self) -> None:
        for path in self._files:
            _image_size(path)  # header only: names a missing, empty or non-image file

    def _hash_sources(self, h: _Hasher) -> None:
        for path in self._files:
            h.file(path)


