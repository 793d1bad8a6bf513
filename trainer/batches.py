"""What the training loop consumes: :class:`Batch`, the :class:`BatchSource` protocol, the
per-epoch seed every source derives its randomness from, and :class:`ArraySource` (an
in-memory source for teachers, tests and small evaluations). The store-backed source is
:class:`trainer.loader.StoreStream`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from saliency_cache.errors import SatError


@dataclass
class Batch:
    """One batch as it leaves a loader (CPU tensors).

    images: uint8 (B, C, H, W); labels: int64 (B,); index: int64 (B,) sample indices in the
    split; maps: one tensor per streamed map, already decoded to int8 (B, C|1, H, W) or still
    bit-packed uint8 (B, nbytes) — :meth:`BatchSource.decode_maps` turns them into int8 on the
    device.
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    maps: list[torch.Tensor]

    def pin_memory(self) -> Batch:
        """This batch in page-locked memory (DataLoader's ``pin_memory`` calls this)."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(),
                     self.index.pin_memory(), [m.pin_memory() for m in self.maps])


class BatchSource(Protocol):
    """What the loop needs from a data source (a store stream or an in-memory array)."""

    num_samples: int

    def epoch_batches(self, epoch: int) -> Iterator[Batch]: ...

    def decode_maps(self, maps: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]: ...


def epoch_seed(seed: int, epoch: int, rank: int = 0, salt: int = 0) -> int:
    """A 63-bit seed unique to (seed, epoch, rank, salt), stable across runs and platforms."""
    x = (seed * 1_000_003 + epoch) * 1_000_033 + rank * 7919 + salt * 104_729
    x ^= x >> 17
    return (x * 0x9E3779B97F4A7C15) & ((1 << 63) - 1)


class ArraySource:
    """An in-memory :class:`BatchSource` over uint8 images (teachers, tests, small evals).

    images: uint8 (N, C, H, W); labels: int64 (N,); maps: optional list of int8 (N, C|1, H, W).
    Shuffling uses a generator seeded by (seed, epoch); ``rank``/``world_size`` split samples.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        maps: list[torch.Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise SatError(f"images must be uint8 (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise SatError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels.long()
        self.maps = list(maps or [])
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.num_samples = len(range(rank, images.shape[0], world_size))

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        n = self.images.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, salt=2))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order[self.rank :: self.world_size]
        for s in range(0, order.numel(), self.batch_size):
            idx = order[s : s + self.batch_size]
            yield Batch(self.images[idx], self.labels[idx], idx, [m[idx] for m in self.maps])

    def decode_maps(self, maps: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return maps

    def steps(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)
