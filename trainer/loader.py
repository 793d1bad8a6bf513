"""Stream images, labels and bit-packed maps from a saliency store, one chunk block at a time.

Order of an epoch: the split's chunk blocks are permuted with a generator seeded by
``(seed, epoch)``; block ``k`` of that order goes to rank ``k % world_size``, and inside a
rank to DataLoader worker ``j % num_workers`` (``j`` counting that rank's blocks). Each worker
reads ``buffer_blocks`` blocks at a time, shuffles the samples inside that buffer and emits
batches. Every sample is read exactly once per epoch across all ranks and workers.

Maps leave the loader still bit-packed (uint8); :meth:`StoreStream.decode_maps` unpacks them
on the training device with a 256-entry lookup table, which costs one gather per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from saliency_cache.encoding import lookup_table
from saliency_cache.errors import MismatchError, SatError
from saliency_cache.store import SaliencyStore
from trainer.loop import Batch, epoch_seed


@dataclass(frozen=True)
class MapSpec:
    name: str
    encoding: str
    shape: tuple[int, int, int]


class MapDecoder:
    """Unpacks (B, nbytes) uint8 rows into int8 (B, *shape) maps on any device."""

    def __init__(self, spec: MapSpec) -> None:
        self.spec = spec
        self.numel = int(np.prod(spec.shape))
        self._table = torch.from_numpy(lookup_table(spec.encoding).copy())
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        table = self._on.get(packed.device)
        if table is None:
            table = self._on[packed.device] = self._table.to(packed.device)
        vals = table[packed.long()].reshape(packed.shape[0], -1)[:, : self.numel]
        return vals.reshape(packed.shape[0], *self.spec.shape)


class StoreStream(torch.utils.data.IterableDataset):
    """Batches of (images, labels, packed maps) from one split of a store.

    Args:
        store: path or URL of the store (opened read-only in each worker).
        split: split name, e.g. ``"train"``.
        map_names: maps to stream with every sample (empty for baselines).
        batch_size: samples per batch.
        shuffle: shuffle blocks and samples within a buffer of ``buffer_blocks`` blocks.
        seed: seeds the order; the order of epoch ``e`` depends only on ``(seed, e)``.
        images_from: an ``ImageDataset`` supplying images when the store has none; its
            fingerprint must match the split's.
        expect_fingerprint: refuse the split unless its fingerprint equals this.
        rank, world_size: the DDP rank and world size; blocks are split between ranks.
        allow_partial: stream maps that are not complete (refused by default).
    """

    def __init__(
        self,
        store: str,
        split: str,
        map_names: Sequence[str] = (),
        *,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        buffer_blocks: int = 4,
        images_from=None,
        expect_fingerprint: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        storage_options: dict | None = None,
        allow_partial: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise SatError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise SatError(f"rank {rank} is outside world size {world_size}")
        self.store_url, self.split_name = str(store), split
        self.map_names = list(map_names)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.buffer_blocks = max(1, buffer_blocks)
        self.rank, self.world_size = rank, world_size
        self.storage_options = storage_options
        self.allow_partial = allow_partial
        self.images_from = images_from
        self.epoch = 0
        # Validate everything once, up front, in the main process.
        st = SaliencyStore.open(self.store_url, "r", storage_options=storage_options)
        sp = st.split(split)
        if expect_fingerprint is not None and sp.fingerprint != expect_fingerprint:
            raise MismatchError(
                f"split {split!r} of {self.store_url} has fingerprint {sp.fingerprint[:16]}…, "
                f"expected {expect_fingerprint[:16]}… (a store of other data?)"
            )
        if images_from is None and not sp.has_images():
            raise SatError(
                f"split {split!r} of {self.store_url} holds no images; pass the dataset "
                "(images_from) or precompute with images"
            )
        if images_from is not None:
            fp = images_from.fingerprint()
            if fp != sp.fingerprint or len(images_from) != sp.n:
                raise MismatchError(
                    f"dataset {images_from.name}/{images_from.split} (n={len(images_from)}, "
                    f"fingerprint {fp[:16]}…) does not match split {split!r} of "
                    f"{self.store_url} (n={sp.n}, fingerprint {sp.fingerprint[:16]}…)"
                )
        self.n = sp.n
        self.num_samples_total = sp.n
        self.chunk_size = sp.chunk_size
        self.image_shape = tuple(sp.image_shape)
        self.specs: list[MapSpec] = []
        self.n_blocks = math.ceil(self.n / self.chunk_size)
        usable = np.ones(self.n_blocks, dtype=bool)
        for name in self.map_names:
            reader = sp.open_map(name, allow_partial=allow_partial)
            if allow_partial:  # never train on chunks that were not written (they read as 0)
                done = np.asarray(reader.done_chunks(), dtype=bool)
                for b in range(self.n_blocks):
                    s, e = b * self.chunk_size, min(self.n, (b + 1) * self.chunk_size)
                    usable[b] &= bool(done[s // reader.chunk_size : (e - 1) // reader.chunk_size + 1].all())
            shape = tuple(reader.shape)
            if shape[1:] != self.image_shape[1:] or shape[0] not in (1, self.image_shape[0]):
                raise MismatchError(
                    f"map {name!r} has shape {shape}, images have {self.image_shape}"
                )
            self.specs.append(MapSpec(name, reader.encoding, shape))
        self.decoders = [MapDecoder(s) for s in self.specs]
        self.blocks = np.flatnonzero(usable).tolist()  # blocks whose maps are all written
        if not self.blocks:
            raise SatError(f"no chunk of maps {self.map_names} is complete yet")
        self.num_samples = sum(self._block_len(b) for b in self._rank_blocks(0))

    # ---- order -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _block_len(self, b: int) -> int:
        return min(self.chunk_size, self.n - b * self.chunk_size)

    def _block_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(self.blocks)
        rng = np.random.default_rng(epoch_seed(self.seed, epoch, salt=3))
        return [self.blocks[i] for i in rng.permutation(len(self.blocks))]

    def _rank_blocks(self, epoch: int, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        return self._block_order(epoch)[r :: self.world_size]

    def steps_per_epoch(self, epochs: int, num_workers: int = 0) -> int:
        """Batches every rank can deliver in each of ``epochs`` epochs (the DDP lock-step count)."""
        w = max(1, num_workers)
        best = None
        for e in range(epochs):
            for r in range(self.world_size):
                blocks = self._rank_blocks(e, r)
                per_worker = [
                    sum(self._block_len(b) for b in blocks[j::w]) for j in range(w)
                ]
                steps = sum(math.ceil(s / self.batch_size) for s in per_worker)
                best = steps if best is None else min(best, steps)
        return max(1, best or 1)

    # ---- iteration ---------------------------------------------------------------------
    def _open(self):
        st = SaliencyStore.open(self.store_url, "r", storage_options=self.storage_options)
        sp = st.split(self.split_name)
        readers = [sp.open_map(n, allow_partial=self.allow_partial) for n in self.map_names]
        return sp, readers

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_epoch(self.epoch, worker=wid, num_workers=nw)

    def iter_epoch(self, epoch: int, worker: int = 0, num_workers: int = 1) -> Iterator[Batch]:
        sp, readers = self._open()
        labels = torch.from_numpy(np.asarray(sp.labels(), dtype=np.int64))
        blocks = self._rank_blocks(epoch)[worker::num_workers]
        rng = np.random.default_rng(epoch_seed(self.seed, epoch, self.rank, salt=4 + worker))
        carry: list[tuple[torch.Tensor, ...]] = []
        for g in range(0, len(blocks), self.buffer_blocks):
            parts = []
            for b in blocks[g : g + self.buffer_blocks]:
                s, e = b * self.chunk_size, b * self.chunk_size + self._block_len(b)
                if self.images_from is not None:
                    imgs = np.asarray(self.images_from.load_images(s, e), dtype=np.uint8)
                else:
                    imgs = sp.read_images(s, e)
                parts.append(
                    (
                        torch.from_numpy(np.ascontiguousarray(imgs)),
                        labels[s:e],
                        torch.arange(s, e, dtype=torch.int64),
                        *[torch.from_numpy(np.ascontiguousarray(r.read_packed(s, e))) for r in readers],
                    )
                )
            buf = [torch.cat(cols) for cols in zip(*(carry + parts), strict=True)]
            carry = []
            n = buf[0].shape[0]
            perm = torch.from_numpy(rng.permutation(n)) if self.shuffle else torch.arange(n)
            buf = [t[perm] for t in buf]
            last_group = g + self.buffer_blocks >= len(blocks)
            for s in range(0, n, self.batch_size):
                cols = [t[s : s + self.batch_size] for t in buf]
                if cols[0].shape[0] < self.batch_size and not last_group:
                    carry = [tuple(cols)]  # a short batch waits for the next buffer
                    break
                yield Batch(cols[0], cols[1], cols[2], list(cols[3:]))

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """Single-process iteration (the loop's interface); see :meth:`loader` for workers."""
        return self.iter_epoch(epoch)

    def decode_maps(self, maps: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return [dec(m) for dec, m in zip(self.decoders, maps, strict=True)]


class WorkerLoader:
    """A :class:`BatchSource` that runs a :class:`StoreStream` in DataLoader worker processes."""

    def __init__(self, stream: StoreStream, num_workers: int, pin_memory: bool = False) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.num_samples = stream.num_samples
        self.batch_size = stream.batch_size

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        if self.num_workers <= 0:
            return self.stream.iter_epoch(epoch)
        self.stream.set_epoch(epoch)
        dl = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        return iter(dl)

    def decode_maps(self, maps: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return self.stream.decode_maps(maps, device)
