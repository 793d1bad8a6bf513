"""Weak saliency: bounding boxes and segmentation masks rasterised to int8 maps.

The paper's weak saliency is +1 on the object and -1 elsewhere, the same on every channel,
so these maps have one channel, shape (1, H, W), and broadcast over the image's channels.
Where the annotation says nothing the map is 0: a sample with no box or mask gets an
all-zero map, and a mask's ignore region (e.g. the unlabelled band around an Oxford-17
flower) is 0 too. SAT adds no saliency-guided perturbation where the map is 0. A source
that can produce 0 is stored with the ``ternary`` encoding, otherwise ``binary``.

numpy only: this runs in dask workers next to the store code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from saliency_cache.errors import SatError

if TYPE_CHECKING:
    from trainer.data import ImageDataset

WEAK_SOURCES = ("box", "mask")


def box_to_map(box: Sequence[int], height: int, width: int) -> np.ndarray:
    """int8 (1, height, width): +1 on pixels ``x0..x1`` x ``y0..y1`` (inclusive), -1 elsewhere.

    box: ``(x0, y0, x1, y1)`` with ``0 <= x0 <= x1 < width`` and ``0 <= y0 <= y1 < height``;
    ``(0, 0, width - 1, height - 1)`` is the whole image and ``(x, y, x, y)`` one pixel.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
        raise SatError(
            f"box {tuple(box)} is not inside a {width}x{height} image "
            "(need 0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height)"
        )
    out = np.full((1, height, width), -1, dtype=np.int8)
    out[0, y0 : y1 + 1, x0 : x1 + 1] = 1
    return out


def mask_to_map(mask: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """int8 (1, H, W): +1 where ``mask``, -1 elsewhere, 0 where ``ignore`` (which wins).

    mask, ignore: bool (H, W). With no ignore region the map is binary ({-1, +1}),
    otherwise ternary ({-1, 0, +1}).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise SatError(f"mask must be a bool (H, W) array, got {mask.dtype} {mask.shape}")
    out = np.where(mask, 1, -1).astype(np.int8)[None]
    if ignore is not None:
        ignore = np.asarray(ignore)
        if ignore.shape != mask.shape or ignore.dtype != bool:
            raise SatError(
                f"ignore must be a bool array of the mask's shape {mask.shape}, "
                f"got {ignore.dtype} {ignore.shape}"
            )
        out[0, ignore] = 0
    return out


def _check(dataset: ImageDataset, source: str) -> None:
    if source not in WEAK_SOURCES:
        raise SatError(
            f"unknown weak saliency source {source!r}; choose one of: {', '.join(WEAK_SOURCES)}"
        )
    has = dataset.has_boxes if source == "box" else dataset.has_masks
    if not has:
        raise SatError(
            f"dataset {dataset.name}/{dataset.split} has no {source} annotations "
            f"(boxes: {dataset.has_boxes}, masks: {dataset.has_masks})"
        )


def weak_maps(dataset: ImageDataset, start: int, stop: int, source: str = "box") -> np.ndarray:
    """int8 (stop - start, 1, H, W) weak maps of samples ``start..stop-1``.

    source: ``"box"`` (+1 inside the inclusive box) or ``"mask"`` (+1 on the foreground,
    0 on the ignore region). A sample without that annotation gets an all-zero map. Reads
    annotations only (no image decoding where the dataset allows it), so the result for a
    range equals the concatenation of single-sample calls.
    """
    _check(dataset, source)
    if not 0 <= start <= stop <= len(dataset):
        raise SatError(
            f"sample range [{start}, {stop}) is outside {dataset.name}/{dataset.split} "
            f"of {len(dataset)} samples"
        )
    _, h, w = dataset.image_shape
    out = np.zeros((stop - start, 1, h, w), dtype=np.int8)
    for k, i in enumerate(range(start, stop)):
        if source == "box":
            # a source may cover several boxes per sample (coco with objects="class")
            boxes = dataset.get_boxes(i) if hasattr(dataset, "get_boxes") else [dataset.get_box(i)]
            maps = [box_to_map(b, h, w) for b in boxes if b is not None]
            if maps:
                out[k] = np.max(maps, axis=0)  # +1 inside any of the boxes
        else:
            mask, ignore = dataset.get_mask(i)
            if mask is not None:
                if mask.shape != (h, w):
                    raise SatError(
                        f"mask of sample {i} ({dataset.ids()[i]}) has shape {mask.shape}, "
                        f"images are {h}x{w}"
                    )
                out[k] = mask_to_map(mask, ignore)
    return out


def missing_annotations(dataset: ImageDataset, source: str) -> int:
    """How many samples have no ``source`` annotation (they get all-zero maps)."""
    _check(dataset, source)
    return int((~np.asarray(dataset.annotated(source), dtype=bool)).sum())


def weak_encoding(dataset: ImageDataset, source: str) -> tuple[str, int]:
    """(encoding, missing): the store encoding for ``source`` maps of ``dataset`` and the
    number of samples without that annotation (recorded in the map's provenance).

    ``"binary"`` only when every sample has the annotation and masks carry no ignore
    region, so every map value is +1 or -1; ``"ternary"`` otherwise. Cheap: no decoding.
    """
    missing = missing_annotations(dataset, source)
    may_ignore = source == "mask" and dataset.has_ignore
    return ("ternary" if missing or may_ignore else "binary"), missing
