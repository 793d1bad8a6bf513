"""Handles on one map: :class:`MapBase` (what readers and writers share) and
:class:`MapReader`; :mod:`saliency_cache.map_writer` has the writer and the map's arrays.

A map group holds ``data`` (uint8 (N, packed_nbytes), sharded: one file per
``shard_chunks`` chunks) and ``done`` (one flag per chunk, one unsharded chunk per data
shard, so the task that owns a shard owns its flags). A done chunk must have its shard file:
zarr would read an absent shard as zeros, which are valid packed maps. Readers check each
shard file once, when the shard is first read (:meth:`Split.open_map` checks them all up
front), so reading costs no existence check per batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from saliency_cache.direct import DirectRows, read_rows_into
from saliency_cache.encoding import ENCODINGS, invalid_bytes, packed_nbytes, unpack
from saliency_cache.errors import (
    CorruptChunkError,
    MissingChunkError,
    SatError,
    StoreFormatError,
)
from saliency_cache.layout import (
    DECODE_ERRORS,
    FORMAT_VERSION,
    check_indices,
    check_range,
    chunk_file_keys,
    req_attr,
    wrap_meta,
)

if TYPE_CHECKING:
    from saliency_cache.split import Split


class MapBase:
    """Attributes shared by readers and writers, read from the map group's metadata."""

    def __init__(self, split: Split, name: str) -> None:
        self.split = split
        self.name = name
        self._what = f"map {name!r} of split {split.name!r} in {split.store.url}"
        self._group = split.map_group(name)
        a = self._group.attrs.asdict()
        w = self._what
        self.encoding = req_attr(a, "encoding", w, str)
        if self.encoding not in ENCODINGS:
            raise StoreFormatError(f"{w} has an unknown encoding {self.encoding!r}")
        self.channels = req_attr(a, "channels", w, int)
        self.shape = tuple(req_attr(a, "shape", w, list))
        self.n = req_attr(a, "n", w, int)
        self.chunk_size = req_attr(a, "chunk_size", w, int)
        self.shard_chunks = req_attr(a, "shard_chunks", w, int)
        self.fingerprint = req_attr(a, "fingerprint", w, str)
        self.ids_sha256 = req_attr(a, "ids_sha256", w, str)
        self.provenance: dict[str, Any] = dict(req_attr(a, "provenance", w, dict))
        self.complete = bool(a.get("complete", False))
        self.format_version = a.get("format_version")
        if self.format_version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{w} has format_version {self.format_version!r}; this package reads {FORMAT_VERSION}"
            )
        if len(self.shape) != 3 or self.n < 1 or self.chunk_size < 1 or self.shard_chunks < 1:
            raise StoreFormatError(
                f"{w} has malformed layout attributes shape={self.shape}, "
                f"n={self.n}, chunk_size={self.chunk_size}"
            )
        self.n_chunks = math.ceil(self.n / self.chunk_size)
        self.n_shards = math.ceil(self.n_chunks / self.shard_chunks)
        self.packed_nbytes = packed_nbytes(self.shape, self.encoding)
        meta = f"{split.store.url}/{split.map_key(name)}/{{}}/zarr.json"
        self._data = wrap_meta(f"data of {w}", lambda: self._group["data"], meta.format("data"))
        self._done = wrap_meta(f"done of {w}", lambda: self._group["done"], meta.format("done"))
        self._files_ok: set[int] = set()  # shards this handle found holding their done chunks
        self._gone: set[str] = set()  # shard files found missing
        self._direct: list[DirectRows | None] | None = None  # data's reader, once looked up
        if tuple(self._data.shape) != (self.n, self.packed_nbytes) or self._data.dtype != np.uint8:
            raise StoreFormatError(
                f"{w}: data is {self._data.dtype} {tuple(self._data.shape)}, attributes say "
                f"uint8 {(self.n, self.packed_nbytes)}"
            )
        if tuple(self._done.shape) != (self.n_chunks,):
            raise StoreFormatError(
                f"{w}: done has shape {tuple(self._done.shape)}, expected ({self.n_chunks},)"
            )

    @property
    def data_array(self) -> zarr.Array:
        """The raw ``data`` array, for integrity tools: reading it bypasses this handle's checks."""
        return self._data

    @property
    def done_array(self) -> zarr.Array:
        """The raw ``done`` array (uint8 (n_chunks,)), for integrity tools."""
        return self._done

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {self.encoding}, shape={self.shape}, "
            f"n={self.n}, chunk_size={self.chunk_size})"
        )

    def chunk_bounds(self, k: int) -> tuple[int, int]:
        """Samples ``[start, stop)`` of chunk ``k``."""
        k = self._check_chunk(k)
        return k * self.chunk_size, min((k + 1) * self.chunk_size, self.n)

    def shard_of_chunk(self, k: int) -> int:
        return self._check_chunk(k) // self.shard_chunks

    def chunks_of_shard(self, s: int) -> range:
        if (
            isinstance(s, bool)
            or not isinstance(s, (int, np.integer))
            or not 0 <= s < self.n_shards
        ):
            raise SatError(f"shard {s!r} is outside 0..{self.n_shards - 1} of {self._what}")
        return range(s * self.shard_chunks, min((s + 1) * self.shard_chunks, self.n_chunks))

    def _check_chunk(self, k: int) -> int:
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, np.integer))
            or not 0 <= k < self.n_chunks
        ):
            raise SatError(f"chunk {k!r} is outside 0..{self.n_chunks - 1} of {self._what}")
        return int(k)

    def done_chunks(self) -> np.ndarray:
        """bool (n_chunks,): which chunks were written."""
        try:
            return np.asarray(self._done[:]) != 0
        except DECODE_ERRORS:
            pass
        flags = np.zeros(self.n_chunks, dtype=bool)
        for c in range(0, self.n_chunks, self.shard_chunks):
            try:
                flags[c : c + self.shard_chunks] = self._done[c : c + self.shard_chunks] != 0
            except DECODE_ERRORS as e:
                raise CorruptChunkError(
                    f"{self._what}: done flags of chunks {c}..{min(c + self.shard_chunks, self.n_chunks) - 1} "
                    f"failed to decode: {e}"
                ) from None
        return flags

    # ---- chunk files ----
    def shard_files(self) -> list[str]:
        """Store keys of the data shard files; file ``s`` holds :meth:`chunks_of_shard` ``(s)``."""
        return chunk_file_keys(self._data)

    def lost_chunks(self, shards: Iterable[int] | None = None) -> dict[int, str]:
        """``{chunk: shard file key}`` of the chunks marked done that their shard lacks: the
        shard file is gone (:meth:`lost_reason`), or its index lists no such chunk (an older
        copy of the file put back).

        Checks ``shards`` (default: all) once per handle: one existence check per shard file
        and one read of each present shard's index (16 bytes per chunk, at the file's end);
        done flags are read only for shards found lacking chunks.
        """
        todo = [s for s in (range(self.n_shards) if shards is None else shards)]
        todo = [s for s in dict.fromkeys(todo) if s not in self._files_ok]
        if not todo:
            return {}
        keys = self.shard_files()
        gone = set(self.split.store.location.missing([keys[s] for s in todo]))
        self._gone = (self._gone - {keys[s] for s in todo}) | gone
        lost: dict[int, str] = {}
        for s in todo:
            ks = self.chunks_of_shard(s)
            if keys[s] in gone:
                held = np.zeros(len(ks), dtype=bool)
            else:
                held = self._indexed_chunks(keys[s], len(ks))
                if held.all():
                    self._files_ok.add(s)
                    continue
            done = self._done_of(ks.start, ks.stop)
            found = {ks.start + int(j): keys[s] for j in np.flatnonzero(done & ~held)}
            lost.update(found)
            if not found:
                self._files_ok.add(s)  # only unwritten chunks are absent (a partial map)
        return lost

    def lost_reason(self, key: str) -> str:
        """Why the shard file ``key`` lacks chunks, for messages."""
        if key in self._gone:
            return "is missing"
        return "does not hold them (an older copy of the file?)"

    def _indexed_chunks(self, key: str, n: int) -> np.ndarray:
        """bool (n,): which of the shard's first ``n`` chunks its index lists. All True when
        the index does not pass its crc32c: reading the shard then reports it as corrupt."""
        import google_crc32c  # zarr's crc32c codec uses it

        size = 16 * self.shard_chunks + 4  # (offset, nbytes) uint64 per chunk, then crc32c
        raw = self.split.store.location.get_suffix(key, size)
        if raw is None or len(raw) != size:
            return np.ones(n, dtype=bool)
        body, crc = raw[:-4], raw[-4:]
        if np.uint32(google_crc32c.value(body)).tobytes() != crc:
            return np.ones(n, dtype=bool)
        index = np.frombuffer(body, dtype="<u8").reshape(-1, 2)[:n]
        return ~(index == np.iinfo(np.uint64).max).all(axis=1)

    def lost_done_files(self) -> list[str]:
        """Keys of the ``done`` files missing from a map marked complete (every chunk of a
        complete map has its flag set, so each of its done files was written)."""
        if not self.complete:
            return []
        return self.split.store.location.missing(chunk_file_keys(self._done))

    def damage(self) -> str | None:
        """One line naming the first lost file (done flags of a complete map, or a shard
        holding chunks marked done), or None if every such file is there."""
        url = self.split.store.url
        done_gone = self.lost_done_files()
        if done_gone:
            return (
                f"{self._what}: done flags file {url}/{done_gone[0]} is missing, but the map "
                "is marked complete; restore the store from a good copy"
            )
        lost = self.lost_chunks()
        if not lost:
            return None
        key = next(iter(lost.values()))
        ks = [k for k, v in lost.items() if v == key]
        more = len(set(lost.values())) - 1
        return (
            f"{self._what}: shard file {url}/{key} {self.lost_reason(key)}, with {len(ks)} "
            f"chunks marked written ({ks[0]}..{ks[-1]})"
            + (f" (and {more} more shard files)" if more else "")
            + "; restore it from a good copy, or run the precompute again (it recomputes them)"
        )

    def check_files(self) -> None:
        """MissingChunkError naming the first lost file (see :meth:`damage`)."""
        msg = self.damage()
        if msg is not None:
            raise MissingChunkError(msg)

    def _require_shards_of(self, s: int, e: int) -> None:
        """Refuse to read samples ``[s, e)`` if a chunk marked done there has lost its file."""
        per = self.chunk_size * self.shard_chunks
        shards = range(s // per, (e - 1) // per + 1) if e > s else range(0)
        if any(sh not in self._files_ok for sh in shards) and self.lost_chunks(shards):
            self.check_files()

    def _done_of(self, c0: int, c1: int) -> np.ndarray:
        try:
            return np.asarray(self._done[c0:c1]) != 0
        except DECODE_ERRORS:
            return self.done_chunks()[c0:c1]  # raises CorruptChunkError naming the flags

    def _read_packed(self, s: int, e: int) -> np.ndarray:
        self._require_shards_of(s, e)
        try:
            return np.asarray(self._data[s:e])
        except DECODE_ERRORS:
            pass
        # Locate the chunk that fails, so the message names it.
        out = np.empty((e - s, self.packed_nbytes), dtype=np.uint8)
        for k in range(s // self.chunk_size, math.ceil(e / self.chunk_size)):
            cs, ce = max(s, k * self.chunk_size), min(e, (k + 1) * self.chunk_size)
            try:
                out[cs - s : ce - s] = self._data[cs:ce]
            except DECODE_ERRORS as err:
                raise CorruptChunkError(
                    f"{self._what}: chunk {k} (samples {k * self.chunk_size}.."
                    f"{min((k + 1) * self.chunk_size, self.n) - 1}) failed to decode: {err}"
                ) from None
        return out

    def _unpack(self, packed: np.ndarray, first_row: int | np.ndarray) -> np.ndarray:
        bad = invalid_bytes(packed, self.encoding, self.shape)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = int(first_row + i) if np.isscalar(first_row) else int(first_row[i])
            raise CorruptChunkError(
                f"{self._what}: sample {row} (chunk {row // self.chunk_size}) holds bytes no valid "
                f"{self.encoding} map packs to"
            )
        return unpack(packed, self.encoding, self.shape, validate=False)


class MapReader(MapBase):
    """Reads one map. Get it from :meth:`Split.open_map`.

    Attributes: ``name``, ``encoding``, ``channels``, ``shape`` (C|1, H, W), ``n``,
    ``chunk_size``, ``n_chunks``, ``shard_chunks``, ``n_shards``, ``packed_nbytes`` (bytes per
    packed sample), ``provenance`` (dict), ``complete``, ``fingerprint``, ``ids_sha256``.

    With ``allow_partial``, chunks that were never written read as packed zeros (binary: all
    -1, ternary: all 0); :meth:`done_chunks` says which chunks are real.
    """

    def read_packed(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, packed_nbytes): packed rows, for unpacking on the training device."""
        s, e = check_range(start, stop, self.n, self._what)
        return self._read_packed(s, e)

    def read_packed_into(self, ranges: Sequence[tuple[int, int]], out: np.ndarray) -> None:
        """Fill ``out`` (uint8 (sum(stop - start), packed_nbytes), C-contiguous) with the rows
        :meth:`read_packed` gives for each ``(start, stop)`` range in turn: the loader's read,
        one call per buffer, decoded straight into ``out`` for local stores of this package's
        layout (:mod:`saliency_cache.direct`), through zarr otherwise."""
        ranges = [check_range(s, e, self.n, self._what) for s, e in ranges]
        rows = sum(e - s for s, e in ranges)
        if out.dtype != np.uint8 or tuple(out.shape) != (rows, self.packed_nbytes):
            raise SatError(
                f"out must be uint8 {(rows, self.packed_nbytes)}, got {out.dtype} {tuple(out.shape)}"
            )
        for s, e in ranges:
            self._require_shards_of(s, e)
        if self._direct is None:
            self._direct = [DirectRows.of(self._data, self.split.store.location, self._what)]
        read_rows_into(self._direct[0], ranges, out, self._read_packed)

    def read(self, start: int, stop: int) -> np.ndarray:
        """int8 (stop - start, C|1, H, W), values in {-1, +1} or {-1, 0, +1}."""
        s, e = check_range(start, stop, self.n, self._what)
        return self._unpack(self._read_packed(s, e), s)

    def read_packed_indices(self, idx: Sequence[int]) -> np.ndarray:
        """uint8 (len(idx), packed_nbytes) in the given order; each chunk is read once."""
        a = check_indices(idx, self.n, self._what)
        if a.size == 0:
            return np.zeros((0, self.packed_nbytes), dtype=np.uint8)
        u, inv = np.unique(a, return_inverse=True)
        per = self.chunk_size * self.shard_chunks
        shards = [int(s) for s in np.unique(u // per) if int(s) not in self._files_ok]
        if shards and self.lost_chunks(shards):
            self.check_files()
        try:
            rows = np.asarray(self._data.get_orthogonal_selection((u, slice(None))))
        except DECODE_ERRORS:
            rows = np.empty((u.size, self.packed_nbytes), dtype=np.uint8)
            chunks = u // self.chunk_size
            for k in np.unique(chunks):
                sel = chunks == k
                s, e = int(u[sel][0]), int(u[sel][-1]) + 1
                rows[sel] = self._read_packed(s, e)[u[sel] - s]
        return rows[inv]

    def read_indices(self, idx: Sequence[int]) -> np.ndarray:
        """int8 (len(idx), C|1, H, W) in the given order (unsorted and repeated indices allowed)."""
        a = check_indices(idx, self.n, self._what)
        return self._unpack(self.read_packed_indices(a), a)

    def iter_blocks(
        self, order: Sequence[int] | None = None, packed: bool = False
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, values)`` per chunk, in ``order`` (chunk indices; default all in turn).

        ``values`` are int8 (stop - start, C|1, H, W), or uint8 packed rows if ``packed``.
        Reading whole chunks in a shuffled chunk order is the fast path for training.
        """
        ks = range(self.n_chunks) if order is None else [self._check_chunk(k) for k in order]
        for k in ks:
            s, e = k * self.chunk_size, min((k + 1) * self.chunk_size, self.n)
            rows = self._read_packed(s, e)
            yield s, e, (rows if packed else self._unpack(rows, s))

    def nbytes_on_disk(self) -> int:
        """Bytes the map's group occupies (all files: data shards, done flags, metadata)."""
        return self.split.store.location.du(self.split.map_key(self.name))

    def codecs(self) -> list[dict[str, Any]]:
        """The data array's codec chain as stored in its metadata."""
        meta = self._data.metadata.to_dict()
        return json.loads(json.dumps(meta.get("codecs", []), default=str))
