"""Read rows of the store's uint8 arrays straight from their chunk files (local stores only).

Why: zarr's read path costs about a millisecond of CPU per call and chunk on one core (the
hand-off to its event-loop thread, a thread-pool hop for every file read and every zstd
decode, the shard index read again on every call, fresh buffers for each step). The loader
reads one 256-sample chunk of images and one of each map per block, so at 32x32 those costs,
not the bytes, held it near 70,000 samples/s; decoding the same chunks here costs a tenth.

What: the arrays this package writes have one fixed layout (:mod:`saliency_cache.layout`,
:func:`saliency_cache.map_writer.create_map_arrays`): uint8, chunked along the first axis only,
each chunk ``bytes -> zstd -> crc32c``; map data sharded with the shard index
(``bytes -> crc32c``) at the end of the file. :meth:`DirectRows.of` checks an array's
metadata against exactly that layout and returns None for anything else (another codec
chain or chunk shape, a remote store), and callers then read through zarr. Every chunk's
crc32c is checked and its decoded size compared with the chunk's, as zarr does; a chunk
that fails either raises :class:`CorruptChunkError`, a chunk file gone raises
:class:`MissingChunkError`. As with zarr, a chunk that a shard's index marks empty (never
written; partial maps only) reads as zeros: the callers check beforehand that no chunk
marked done lacks its data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr
from crc32c import crc32c
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from saliency_cache.errors import CorruptChunkError, MissingChunkError

_EMPTY = np.iinfo(np.uint64).max  # a shard index entry of a chunk that was never written
_ZSTD = Zstd()  # decoding does not depend on the level
_ZSTD_MAGIC = 0xFD2FB528


def _is_chain(codecs: Sequence, kinds: Sequence[type]) -> bool:
    return len(codecs) == len(kinds) and all(type(c) is k for c, k in zip(codecs, kinds, strict=True))


def zstd_content_size(frame: memoryview) -> int | None:
    """The decoded size a zstd frame's header declares (RFC 8878, 3.1.1.1), or None if it
    declares none. ValueError if ``frame`` does not start with a zstd frame header."""
    if len(frame) < 5 or int.from_bytes(frame[:4], "little") != _ZSTD_MAGIC:
        raise ValueError("not a zstd frame")
    fhd = frame[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]  # window descriptor, dictionary id
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    if len(frame) < pos + size:
        raise ValueError("truncated zstd frame header")
    value = int.from_bytes(frame[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def read_rows_into(
    direct: DirectRows | None,
    ranges: Sequence[tuple[int, int]],
    out: np.ndarray,
    read_range: Callable[[int, int], np.ndarray],
) -> None:
    """Fill ``out`` with rows ``[s, e)`` of each range in turn: through ``direct`` when the
    array has one, else through ``read_range(s, e)`` (zarr), one range at a time."""
    if direct is not None:
        direct.read_into(ranges, out)
        return
    pos = 0
    for s, e in ranges:
        out[pos : pos + e - s] = read_range(s, e)
        pos += e - s


class DirectRows:
    """Reads rows ``[start, stop)`` of one array of this store's layout from its files.

    ``what`` names the array in messages (e.g. ``"images of split 'train' in /data/s.zarr"``).
    Get one from :meth:`of`; the constructor trusts its arguments.
    """

    def __init__(self, arr: zarr.Array, root: Path, what: str, url: str) -> None:
        self.n = int(arr.shape[0])
        self.row_bytes = math.prod(int(d) for d in arr.shape[1:])
        self.chunk = int(arr.chunks[0])  # rows per (inner) chunk
        self.chunk_nbytes = self.chunk * self.row_bytes  # edge chunks are stored full size too
        self.shard = None if arr.shards is None else int(arr.shards[0])  # rows per shard file
        self._what, self._url, self._root = what, url, root
        self._path, self._meta = arr.path, arr.metadata
        self._tail = (0,) * (len(arr.shape) - 1)
        self._index: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}  # per shard file

    def _key(self, i: int) -> str:
        """Store key of chunk file ``i`` (a shard file for sharded arrays)."""
        return f"{self._path}/{self._meta.encode_chunk_key((i, *self._tail))}"

    @classmethod
    def of(cls, arr: zarr.Array, location, what: str) -> DirectRows | None:
        """A reader for ``arr`` if it lives in a local directory and has exactly this store's
        layout; None otherwise (the caller then reads through zarr)."""
        from saliency_cache.location import LocalLocation

        if not isinstance(location, LocalLocation) or arr.dtype != np.uint8 or arr.ndim < 2:
            return None
        if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
            return None  # chunked along more than the first axis
        chunk_chain = (BytesCodec, ZstdCodec, Crc32cCodec)
        codecs = arr.metadata.codecs
        if arr.shards is None:
            if not _is_chain(codecs, chunk_chain):
                return None
        else:
            sharding = codecs[0] if len(codecs) == 1 else None
            if (
                not isinstance(sharding, ShardingCodec)
                or not _is_chain(sharding.codecs, chunk_chain)
                or not _is_chain(sharding.index_codecs, (BytesCodec, Crc32cCodec))
                or sharding.index_location != ShardingCodecIndexLocation.end
                or tuple(arr.shards[1:]) != tuple(arr.shape[1:])
                or arr.shards[0] % arr.chunks[0]
            ):
                return None
        return cls(arr, location.root, what, location.url)

    # ---- reading ----
    def read_into(self, ranges: Sequence[tuple[int, int]], out: np.ndarray) -> None:
        """Fill ``out`` with rows ``[s, e)`` of each range in turn.

        out: uint8, C-contiguous, ``sum(e - s)`` rows of the array's row shape (any shape
        with that many bytes per row). Chunks wholly inside a range are decoded straight
        into ``out``; a chunk only partly wanted is decoded aside and its rows copied.
        """
        if out.dtype != np.uint8 or not out.flags.c_contiguous or out.ndim < 1:
            raise ValueError("out must be a C-contiguous uint8 array")
        flat = out.reshape(out.shape[0], -1)
        if flat.shape[1] != self.row_bytes:
            raise ValueError(f"out rows hold {flat.shape[1]} bytes, the array's {self.row_bytes}")
        pieces, pos = [], 0  # (chunk, first row wanted, stop row, row of out)
        for s, e in ranges:
            if not 0 <= s <= e <= self.n:
                raise ValueError(f"range [{s}, {e}) is outside the array's {self.n} rows")
            for k in range(s // self.chunk, -(-e // self.chunk)):
                lo, hi = max(s, k * self.chunk), min(e, (k + 1) * self.chunk)
                pieces.append((k, lo, hi, pos))
                pos += hi - lo
        if pos != flat.shape[0]:
            raise ValueError(f"out has {flat.shape[0]} rows, the ranges {pos}")
        io = _Scratch()
        if self.shard is None:
            for k, lo, hi, p in pieces:
                self._put(self._chunk_file(k, io), k, lo, hi, flat, p, io)
            return
        per = self.shard // self.chunk
        by_file: dict[int, list] = {}
        for piece in pieces:
            by_file.setdefault(piece[0] // per, []).append(piece)
        for f, group in by_file.items():
            self._read_shard(f, group, flat, io)

    def _put(self, stored, k: int, lo: int, hi: int, flat, p: int, io: _Scratch) -> None:
        """Decode chunk ``k`` (its stored bytes; None: never written) and put its rows
        ``[lo, hi)`` at row ``p`` of ``flat``."""
        rows = hi - lo
        if stored is None:
            flat[p : p + rows] = 0  # zarr's fill value: an unwritten chunk of a partial map
            return
        if rows == self.chunk:  # the whole chunk (so lo is its first row): straight in
            self._decode(stored, k, flat[p : p + rows])
            return
        if io.chunk is None:
            io.chunk = np.empty((self.chunk, self.row_bytes), np.uint8)
        self._decode(stored, k, io.chunk)
        first = lo - k * self.chunk
        flat[p : p + rows] = io.chunk[first : first + rows]

    def _decode(self, stored: memoryview, k: int, dest: np.ndarray) -> None:
        """crc32c-check and zstd-decode chunk ``k`` into ``dest`` (one chunk's bytes)."""
        body, crc = stored[:-4], stored[-4:]
        try:
            if len(stored) < 4 or crc32c(body) != int.from_bytes(crc, "little"):
                raise ValueError("crc32c checksum mismatch")
            size = zstd_content_size(body)
            if size is None:  # a frame that declares no size: decode aside, then compare
                raw = np.frombuffer(_ZSTD.decode(body), np.uint8)
                if raw.size != self.chunk_nbytes:
                    raise ValueError(f"decodes to {raw.size} bytes, a chunk holds {self.chunk_nbytes}")
                dest.reshape(-1)[:] = raw
            elif size != self.chunk_nbytes:
                raise ValueError(f"decodes to {size} bytes, a chunk holds {self.chunk_nbytes}")
            else:
                _ZSTD.decode(body, out=dest)  # zstd checks the frame against that size
        except (ValueError, RuntimeError) as err:
            s, e = k * self.chunk, min(self.n, (k + 1) * self.chunk)
            raise CorruptChunkError(
                f"{self._what}: chunk {k} (samples {s}..{e - 1}) failed to decode: {err}"
            ) from None

    def _missing(self, key: str, k: int, rows: int) -> MissingChunkError:
        s, e = k * self.chunk, min(self.n, k * self.chunk + rows)
        return MissingChunkError(
            f"{self._what}: chunk file {self._url}/{key} (samples {s}..{e - 1}) is missing; "
            "restore the store from a good copy"
        )

    def _chunk_file(self, k: int, io: _Scratch) -> memoryview:
        """The stored bytes of chunk ``k`` of an unsharded array (its whole file)."""
        key = self._key(k)
        try:
            with open(self._root / key, "rb", buffering=0) as fh:
                view = io.bytes(os.fstat(fh.fileno()).st_size)
                got = fh.readinto(view)
        except FileNotFoundError:
            raise self._missing(key, k, self.chunk) from None
        return view[:got]

    def _read_shard(self, f: int, pieces: list, flat: np.ndarray, io: _Scratch) -> None:
        """Decode ``pieces`` (chunks of shard file ``f``) from one open file, so the index
        and the chunks come from the same file even if a writer replaces it meanwhile."""
        key = self._key(f)
        per = self.shard // self.chunk
        try:
            fh = open(self._root / key, "rb", buffering=0)  # closed by the with below
        except FileNotFoundError:
            for k, lo, hi, p in pieces:  # a shard never written (partial maps only)
                self._put(None, k, lo, hi, flat, p, io)
            return
        with fh:
            index = self._shard_index(fh, f, per)
            for k, lo, hi, p in pieces:
                off, nbytes = (int(x) for x in index[k - f * per])
                if off == _EMPTY and nbytes == _EMPTY:
                    self._put(None, k, lo, hi, flat, p, io)
                    continue
                view = io.bytes(nbytes)
                fh.seek(off)
                got = fh.readinto(view)
                self._put(view[:got], k, lo, hi, flat, p, io)

    def _shard_index(self, fh, f: int, per: int) -> np.ndarray:
        """uint64 (per, 2): (offset, nbytes) of shard file ``f``'s chunks, cached per file
        identity (inode, size, mtime), so a file replaced by a writer is read anew."""
        st = os.fstat(fh.fileno())
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._index.get(f)
        if hit is not None and hit[0] == ident:
            return hit[1]
        size = 16 * per + 4
        fh.seek(max(0, st.st_size - size))
        raw = fh.read(size)
        k0 = f * per
        where = f"shard file {self._url}/{self._key(f)} (chunks {k0}..{k0 + per - 1})"
        if len(raw) != size or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise CorruptChunkError(f"{self._what}: the index of {where} failed its crc32c check")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(per, 2)
        used = index[:, 0] != _EMPTY
        if (index[used, 0] + index[used, 1] > st.st_size - size).any():
            raise CorruptChunkError(f"{self._what}: {where} is shorter than its index says")
        self._index[f] = (ident, index)
        return index


class _Scratch:
    """Buffers one :meth:`DirectRows.read_into` call reuses from chunk to chunk."""

    def __init__(self) -> None:
        self._bytes = bytearray()
        self.chunk: np.ndarray | None = None  # one decoded chunk, for partly wanted chunks

    def bytes(self, n: int) -> memoryview:
        """A writable view of ``n`` bytes (valid until the next call)."""
        if len(self._bytes) < n:
            self._bytes = bytearray(n)
        return memoryview(self._bytes)[:n]
