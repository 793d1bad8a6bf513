"""``synthetic``: generated shapes with exact masks and boxes, for tests and the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saliency_cache.errors import SatError
from trainer.data.base import DATASETS, Box, ImageDataset, Sample, _check_source, _Hasher
from trainer.data.files import _check_split, _positive_int

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
