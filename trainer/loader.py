"""Stream images, labels and bit-packed maps from a saliency store, one chunk block at a time.

Order of an epoch: the split's chunk blocks are permuted with a generator seeded by
``(seed, epoch)``; block ``k`` of that order goes to rank ``k % world_size``, and inside a
rank to DataLoader worker ``j % num_workers`` (``j`` counting that rank's pieces). When the
blocks do not divide evenly between ranks, the blocks of the incomplete last round (and the
split's short last block) are split sample-wise into ``world_size`` equal pieces, so rank
shares differ by at most one sample: DDP ranks must take the same number of steps, and with
whole blocks the ranks with fewer blocks would cap everyone's epoch (dropping up to a block
per rank).
Each worker reads ``buffer_blocks`` pieces at a time, shuffles the samples inside that buffer
and emits batches. Every sample is read exactly once per epoch across all ranks and workers.
By default the buffer is as many blocks as fit in ``buffer_mb`` of memory: stores keep the
dataset's order, which is often sorted by class (Tiny ImageNet, ImageFolder), and a buffer of
a few blocks would then give batches of a few classes only, which trains badly. The default
budget, 256 MB, holds a whole split of up to ~80,000 samples at 32x32 (~21,000 at 64x64, 80
blocks of 256 drawn from random places of the split), and keeps a loader's memory flat as
the split grows past it (``make bench-scale``: 512 MB grew peak RSS by ~0.5 GB at 1M samples).

Maps leave the loader still bit-packed (uint8); :meth:`StoreStream.decode_maps` unpacks them
on the training device with a 256-entry lookup table, which costs one gather per batch.

Cost (one core, 32x32 images + one ternary map): each column of a buffer is read by one call
(:meth:`Split.read_images_into`, :meth:`MapReader.read_packed_into`), which decodes a local
store's chunk files straight into a read buffer kept from buffer to buffer; each batch then
gathers its rows with ``index_select``. Reading each block through zarr and permuting the
whole buffer with ``t[perm]`` ran at ~75,000 samples/s, zarr's per-call overhead being most
of it; docs/BENCHMARKS.md has the profile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from saliency_cache.encoding import lookup_table, packed_nbytes
from saliency_cache.errors import CorruptChunkError, MismatchError, SatError
from saliency_cache.store import SaliencyStore
from trainer.batches import Batch, epoch_seed


@dataclass(frozen=True)
class MapSpec:
    name: str
    encoding: str
    shape: tuple[int, int, int]


class MapDecoder:
    """Unpacks (B, nbytes) uint8 rows into int8 (B, *shape) maps on any device."""

    # A table row (the 8 or 4 int8 values packed in one byte) viewed as one machine word, so
    # decoding gathers one word per byte: ~10x faster on CPU than gathering int8 rows.
    _WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16}

    def __init__(self, spec: MapSpec) -> None:
        self.spec = spec
        self.numel = int(np.prod(spec.shape))
        table = torch.from_numpy(lookup_table(spec.encoding).copy())  # int8 (256, k)
        self._per_byte = table.shape[1]
        word = self._WORDS.get(table.shape[1])
        self._table = table.view(word).reshape(256) if word is not None else table
        self._on: dict[torch.device, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # Device copies of the table stay behind when a DataLoader worker receives the
        # decoder (spawn/forkserver pickle it): a CUDA tensor would start a CUDA context there.
        return {**self.__dict__, "_on": {}}

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        table = self._on.get(packed.device)
        if table is None:
            table = self._on[packed.device] = self._table.to(packed.device)
        vals = table.index_select(0, packed.reshape(-1).int()).view(torch.int8)
        vals = vals.reshape(packed.shape[0], packed.shape[1] * self._per_byte)[:, : self.numel]
        return vals.reshape(packed.shape[0], *self.spec.shape)


def check_map_integrity(store: SaliencyStore, split: str, name: str) -> None:
    """Check every written chunk of a map (crc32c, then its values) and refuse the first
    corrupt one.

    It turns a corrupt chunk met in the middle of a run into a refusal to start that names
    the map and the chunk. Every start reads all of the map's bytes and checks their crc32c;
    chunks whose bytes an earlier start already decoded and found valid are not decoded again
    (a verification record outside the store, :mod:`saliency_cache.verified`; set
    ``SAT_VERIFY_CACHE=off`` to decode every chunk every time).
    """
    from saliency_cache.verified import default_cache_dir
    from saliency_cache.verify import verify

    problems = verify(store, split, name, records=default_cache_dir())
    bad = [p for p in problems if p.kind in ("corrupt", "invalid", "metadata")]
    if bad:
        more = f" (and {len(bad) - 1} more problems)" if len(bad) > 1 else ""
        raise CorruptChunkError(
            f"map {name!r} of split {split!r} in {store.url} is damaged: {bad[0]}{more}; "
            "restore it from a good copy, or recompute those chunks (MapWriter.reset_chunks, "
            "then sat precompute)"
        )


def _rows(cols: list[torch.Tensor], rows: torch.Tensor | slice) -> list[torch.Tensor]:
    """Copies of ``rows`` (int64 positions, or a slice) of each column: one ``index_select``
    per column over its rows viewed as flat bytes (several times faster than ``t[rows]``)."""
    if isinstance(rows, slice):
        return [t[rows].clone() for t in cols]
    out = []
    for t in cols:
        flat = t.reshape(t.shape[0], -1)
        dst = torch.empty((rows.shape[0], flat.shape[1]), dtype=t.dtype)
        torch.index_select(flat, 0, rows, out=dst)
        out.append(dst.reshape(rows.shape[0], *t.shape[1:]))
    return out


class StoreStream(torch.utils.data.IterableDataset):
    """Batches of (images, labels, packed maps) from one split of a store.

    Args:
        store: path or URL of the store (opened read-only in each worker).
        split: split name, e.g. ``"train"``.
        map_names: maps to stream with every sample (empty for baselines).
        batch_size: samples per batch.
        shuffle: shuffle blocks and samples within a buffer of ``buffer_blocks`` blocks.
        buffer_blocks: blocks shuffled together; None sizes the buffer to ``buffer_mb``.
        buffer_mb: memory budget of the shuffle buffer (images + packed maps) per worker.
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
        buffer_blocks: int | None = None,
        buffer_mb: float = 256.0,
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
        self.rank, self.world_size = rank, world_size
        self.storage_options = storage_options
        self.allow_partial = allow_partial
        self.images_from = images_from
        self.epoch = 0
        # Validate everything once, up front, in the main process.
        st = SaliencyStore.open(self.store_url, "r", storage_options=storage_options)
        sp = st.split(split)
        sp.check_files(images=images_from is None)  # a lost chunk file refuses the run here
        self._check_images(sp, images_from, expect_fingerprint)
        self.n = sp.n
        self.num_samples_total = sp.n
        self.chunk_size = sp.chunk_size
        self.image_shape = tuple(sp.image_shape)
        self.n_blocks = math.ceil(self.n / self.chunk_size)
        self.specs, usable = self._check_maps(st, sp)
        self.decoders = [MapDecoder(s) for s in self.specs]
        if buffer_blocks is None:
            row_bytes = int(np.prod(self.image_shape)) + sum(
                packed_nbytes(sp_.shape, sp_.encoding) for sp_ in self.specs
            )
            buffer_blocks = int(buffer_mb * 2**20 // max(1, row_bytes * self.chunk_size))
        self.buffer_blocks = max(1, int(buffer_blocks))
        self.blocks = np.flatnonzero(usable).tolist()  # blocks whose maps are all written
        if not self.blocks:
            raise SatError(f"no chunk of maps {self.map_names} is complete yet")
        self.num_samples = sum(e - s for s, e in self._rank_ranges(0))

    def _check_images(self, sp, images_from, expect_fingerprint: str | None) -> None:
        """Refuse a split of other data, or one with no images and no dataset to supply them."""
        split = self.split_name
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

    def _check_maps(self, st, sp) -> tuple[list[MapSpec], np.ndarray]:
        """Open and check each streamed map: (their specs, bool (n_blocks,) of the blocks
        whose chunks every map has written; all True unless ``allow_partial``)."""
        specs: list[MapSpec] = []
        usable = np.ones(self.n_blocks, dtype=bool)
        for name in self.map_names:
            reader = sp.open_map(name, allow_partial=self.allow_partial)
            check_map_integrity(st, self.split_name, name)
            if self.allow_partial:  # never train on chunks that were not written (they read as 0)
                done = np.asarray(reader.done_chunks(), dtype=bool)
                for b in range(self.n_blocks):
                    s, e = b * self.chunk_size, min(self.n, (b + 1) * self.chunk_size)
                    usable[b] &= bool(done[s // reader.chunk_size : (e - 1) // reader.chunk_size + 1].all())
            shape = tuple(reader.shape)
            if shape[1:] != self.image_shape[1:] or shape[0] not in (1, self.image_shape[0]):
                raise MismatchError(
                    f"map {name!r} has shape {shape}, images have {self.image_shape}"
                )
            specs.append(MapSpec(name, reader.encoding, shape))
        return specs, usable

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

    def _rank_ranges(self, epoch: int, rank: int | None = None) -> list[tuple[int, int]]:
        """Sample ranges ``[start, stop)`` of one rank in epoch ``epoch``, in reading order."""
        r = self.rank if rank is None else rank
        order = self._block_order(epoch)
        full = [b for b in order if self._block_len(b) == self.chunk_size]
        whole = len(full) - len(full) % self.world_size
        cs = self.chunk_size
        out = [(b * cs, (b + 1) * cs) for b in full[r : whole : self.world_size]]
        # Left over: the blocks of an incomplete round and the split's short last block.
        rest = set(full[:whole])
        tail = [b for b in order if b not in rest]
        if tail:
            # The samples of the leftover blocks, in order, cut into world_size equal pieces.
            sizes = [self._block_len(b) for b in tail]
            total = sum(sizes)
            lo = r * total // self.world_size
            hi = (r + 1) * total // self.world_size
            pos = 0
            for b, size in zip(tail, sizes, strict=True):
                s, e = max(lo, pos), min(hi, pos + size)
                if s < e:
                    start = b * self.chunk_size - pos
                    out.append((start + s, start + e))
                pos += size
        return out

    def epoch_steps(self, epoch: int, num_workers: int = 0, rank: int | None = None) -> int:
        """Batches ``rank`` (default: this rank) yields in ``epoch`` when read by
        ``num_workers`` DataLoader workers (0: in-process). Each worker cuts its own share
        into batches, so with workers an epoch can take a few more (partial) batches than
        ``ceil(n / batch)``."""
        ranges = self._rank_ranges(epoch, rank)
        w = max(1, num_workers)
        per_worker = [sum(hi - lo for lo, hi in ranges[j::w]) for j in range(w)]
        return sum(math.ceil(n / self.batch_size) for n in per_worker)

    def steps_per_epoch(self, epochs: int, num_workers: int = 0) -> int:
        """Batches every rank can deliver in each of ``epochs`` epochs (the DDP lock-step count)."""
        return max(1, min(
            self.epoch_steps(e, num_workers, r)
            for e in range(epochs) for r in range(self.world_size)
        ))

    # ---- iteration ---------------------------------------------------------------------
    _handles = None  # (split, map readers, labels) of this process, opened on first use
    _buffer = None  # the read buffer's columns, kept from buffer to buffer and epoch to epoch

    def __getstate__(self) -> dict:
        # DataLoader workers open their own handles and buffers.
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_buffer")}

    def _open(self):
        """(split, map readers, int64 (N,) labels), opened once per process and kept: the
        checks of opening cost a few milliseconds, a large share of a small split's epoch."""
        if self._handles is None:
            st = SaliencyStore.open(self.store_url, "r", storage_options=self.storage_options)
            sp = st.split(self.split_name)
            readers = [sp.open_map(n, allow_partial=self.allow_partial) for n in self.map_names]
            self._handles = (sp, readers, np.asarray(sp.labels(), dtype=np.int64))
        return self._handles

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_epoch(self.epoch, worker=wid, num_workers=nw)

    def iter_epoch(self, epoch: int, worker: int = 0, num_workers: int = 1) -> Iterator[Batch]:
        """The batches of ``worker``'s share of this rank's epoch (see the module docstring).

        Per buffer: the rows of the short batch carried over from the previous buffer, then
        the samples of the buffer's pieces, each column read by one call into a read buffer
        that is reused (fresh memory costs page faults: 20 ms per 50 MB here, more than
        reading it); each batch then gathers its rows of the buffer's permutation
        (``index_select``) into tensors of its own.
        """
        sp, readers, labels = self._open()
        ranges = self._rank_ranges(epoch)[worker::num_workers]
        rng = np.random.default_rng(epoch_seed(self.seed, epoch, self.rank, salt=4 + worker))
        most = min(self.buffer_blocks * self.chunk_size, sum(e - s for s, e in ranges))
        carry: Batch | None = None
        for g in range(0, len(ranges), self.buffer_blocks):
            buf = self._take_buffer(most + self.batch_size - 1)
            cols = self._read_buffer(buf, sp, readers, ranges[g : g + self.buffer_blocks], carry)
            n = cols[0].shape[0]
            perm = torch.from_numpy(rng.permutation(n)) if self.shuffle else None
            last_group = g + self.buffer_blocks >= len(ranges)
            carry = None
            for s in range(0, n, self.batch_size):
                rows = perm[s : s + self.batch_size] if perm is not None else slice(s, s + self.batch_size)
                images, index, *maps = _rows(cols, rows)
                b = Batch(images, torch.from_numpy(labels[index.numpy()]), index, maps)
                if b.labels.shape[0] < self.batch_size and not last_group:
                    carry = b  # a short batch waits for the next buffer
                    break
                yield b
            self._buffer = buf  # free again (taken meanwhile by nothing else of this process)

    def _take_buffer(self, rows: int) -> list[torch.Tensor]:
        """The kept read buffer if it holds ``rows`` rows, else a new one: [images uint8
        (rows, C, H, W), index int64 (rows,), *maps uint8 (rows, nbytes)]. Taken out of the
        stream while in use, so that a second iterator of the same stream gets its own."""
        buf, self._buffer = self._buffer, None
        if buf is None or buf[0].shape[0] < rows:
            nbytes = [packed_nbytes(sp.shape, sp.encoding) for sp in self.specs]
            buf = [torch.empty((rows, *self.image_shape), dtype=torch.uint8),
                   torch.empty(rows, dtype=torch.int64),
                   *[torch.empty((rows, nb), dtype=torch.uint8) for nb in nbytes]]
        return buf

    def _read_buffer(self, buf, sp, readers, group: list[tuple[int, int]], carry: Batch | None):
        """Views of ``buf``'s first rows, filled: [images, index, *packed maps], the carried
        rows first, then the samples of ``group``'s ranges in order."""
        k = 0 if carry is None else carry.labels.shape[0]
        cols = [t[: k + sum(e - s for s, e in group)] for t in buf]
        images, index, maps = cols[0], cols[1], cols[2:]
        if carry is not None:
            images[:k], index[:k] = carry.images, carry.index
            for m, c in zip(maps, carry.maps, strict=True):
                m[:k] = c
        if self.images_from is not None:
            pos = k
            for s, e in group:
                images[pos : pos + e - s] = torch.from_numpy(
                    np.asarray(self.images_from.load_images(s, e), dtype=np.uint8))
                pos += e - s
        else:
            sp.read_images_into(group, images[k:].numpy())
        for r, m in zip(readers, maps, strict=True):
            r.read_packed_into(group, m[k:].numpy())
        index[k:] = torch.from_numpy(
            np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in group]))
        return cols

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """Single-process iteration (the loop's interface); :class:`WorkerLoader` adds workers."""
        return self.iter_epoch(epoch)

    def decode_maps(self, maps: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return [dec(m) for dec, m in zip(self.decoders, maps, strict=True)]


class WorkerLoader:
    """A :class:`BatchSource` that runs a :class:`StoreStream` in DataLoader worker processes.

    ``pin_memory`` (for CUDA training) puts each batch in page-locked memory, so that the
    loop's ``non_blocking`` copies to the GPU overlap with its work.
    """

    def __init__(self, stream: StoreStream, num_workers: int, pin_memory: bool = False) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.num_samples = stream.num_samples
        self.batch_size = stream.batch_size

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        if self.num_workers <= 0:
            batches = self.stream.iter_epoch(epoch)
            return (b.pin_memory() for b in batches) if self.pin_memory else batches
        self.stream.set_epoch(epoch)
        dl = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        return iter(dl)

    def epoch_steps(self, epoch: int) -> int:
        """Batches this loader yields in ``epoch`` (see :meth:`StoreStream.epoch_steps`)."""
        return self.stream.epoch_steps(epoch, self.num_workers)

    def decode_maps(self, maps: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return self.stream.decode_maps(maps, device)
