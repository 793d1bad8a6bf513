"""Writing one map: :class:`MapWriter`, the map's arrays (:func:`create_map_arrays`) and the
check that an existing map can be resumed (:func:`check_resume`). Readers are in
:mod:`saliency_cache.maps`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from saliency_cache.encoding import invalid_bytes, pack
from saliency_cache.errors import MismatchError, SatError
from saliency_cache.layout import DECODE_ERRORS, compressors
from saliency_cache.maps import MapBase
from saliency_cache.names import provenance_diff

if TYPE_CHECKING:
    from saliency_cache.lock import WriterLock
    from saliency_cache.split import Split


class MapWriter(MapBase):
    """Writes the chunks of one map. Get it from :meth:`Split.create_map` / :meth:`Split.open_map_writer`.

    A context manager: leaving the ``with`` block (or :meth:`close`) releases the writer lock.
    Every write replaces whole chunks and sets their ``done`` flags afterwards, so a killed
    writer leaves each chunk either old or new and never marked done before its data exists.
    """

    def __init__(
        self, split: Split, name: str, lock: WriterLock | None, shards: Sequence[int] | None = None
    ) -> None:
        super().__init__(split, name)
        self._lock = lock
        self._closed = False
        self._shards = None if shards is None else {int(s) for s in shards}
        # Keep every chunk physically present, even an all-zero one, so each done chunk is covered by its crc32c.
        self._data = self._data.with_config({"write_empty_chunks": True})

    @property
    def attached(self) -> bool:
        """True for a lock-less handle from :meth:`SaliencyStore.attach_writer`."""
        return self._lock is None

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the writer lock (no-op for attached writers and when already closed)."""
        if not self._closed:
            self._closed = True
            if self._lock is not None:
                self._lock.release()

    def _require_open(self, what: str) -> None:
        if self._closed:
            raise SatError(f"cannot {what}: the writer of {self._what} is closed")
        self.split.store.require_writable(what)

    def pending_chunks(self) -> list[int]:
        """Chunks not written yet, ascending: never written, or marked done but their shard
        file is gone (so a new precompute run recomputes lost chunks)."""
        pending = ~self.done_chunks()
        pending[list(self.lost_chunks())] = True
        return [int(k) for k in np.flatnonzero(pending)]

    def write_chunk(self, k: int, values: np.ndarray) -> None:
        """Pack and write chunk ``k``: int8 (rows of chunk k, C|1, H, W) in {-1,+1} / {-1,0,+1}.

        Writing a chunk that is already done is a no-op if the values are identical and a
        MismatchError if they differ.
        """
        self.write_chunks(k, values)

    def write_chunks(self, first: int, values: np.ndarray) -> None:
        """Write consecutive whole chunks starting at chunk ``first`` (int8 rows covering them).

        One call per shard rewrites each shard file once instead of once per chunk.
        """
        self._require_open("write chunks")
        values = np.asarray(values)
        if values.dtype.kind not in "iu":
            raise SatError(f"map values must be int8, got dtype {values.dtype}")
        if values.ndim != 4 or tuple(values.shape[1:]) != self.shape:
            raise SatError(
                f"values for {self._what} must be (rows, {', '.join(map(str, self.shape))}), "
                f"got {values.shape}"
            )
        self._write(first, values.shape[0], lambda: pack(values, self.encoding))

    def write_chunk_packed(self, k: int, packed: np.ndarray) -> None:
        """Write chunk ``k`` from packed rows: uint8 (rows of chunk k, packed_nbytes)."""
        self.write_chunks_packed(k, packed)

    def write_chunks_packed(self, first: int, packed: np.ndarray) -> None:
        """Write consecutive whole chunks from packed rows (validated: no invalid bytes or padding)."""
        self._require_open("write chunks")
        packed = np.asarray(packed)
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != self.packed_nbytes:
            raise SatError(
                f"packed rows for {self._what} must be uint8 (rows, {self.packed_nbytes}), "
                f"got {packed.dtype} {packed.shape}"
            )
        bad = invalid_bytes(packed, self.encoding, self.shape)
        if bad.any():
            raise SatError(
                f"packed row {int(np.flatnonzero(bad)[0])} holds bytes no valid {self.encoding} map packs to"
            )
        self._write(first, packed.shape[0], lambda: packed)

    def _write(self, first: int, rows: int, get_packed) -> None:
        k0 = self._check_chunk(first)
        s = k0 * self.chunk_size
        e = s + rows
        if rows < 1 or e > self.n or (e % self.chunk_size and e != self.n):
            raise SatError(
                f"chunk {k0} of {self._what} starts at sample {s}; {rows} rows do not end on a "
                f"chunk boundary (chunk size {self.chunk_size}, n {self.n})"
            )
        k1 = math.ceil(e / self.chunk_size)  # exclusive
        if self._shards is not None:
            outside = {k // self.shard_chunks for k in range(k0, k1)} - self._shards
            if outside:
                raise SatError(
                    f"this writer owns shards {sorted(self._shards)} of {self._what}, not {sorted(outside)}"
                )
        packed = get_packed()
        done = self._done_of(k0, k1)
        lost = self.lost_chunks(range(k0 // self.shard_chunks, (k1 - 1) // self.shard_chunks + 1))
        if lost:
            self._forget_lost(lost, k0, k1)
            done[[k - k0 for k in lost if k0 <= k < k1]] = False
        rewrite = not done.all()
        for j in np.flatnonzero(done):
            k = k0 + int(j)
            cs, ce = k * self.chunk_size, min((k + 1) * self.chunk_size, self.n)
            try:
                stored = np.asarray(self._data[cs:ce])
            except DECODE_ERRORS:
                rewrite = True  # a corrupt stored chunk is simply rewritten
                continue
            if not np.array_equal(stored, packed[cs - s : ce - s]):
                raise MismatchError(
                    f"chunk {k} of {self._what} was already written with other values "
                    "(a non-deterministic saliency method?); overwrite the map to recompute it"
                )
        if not rewrite:
            return  # every chunk is done with these very bytes
        self._data[s:e] = packed
        # Only after the data is in place: a killed writer never leaves a done flag without data.
        self._done[k0:k1] = 1

    def _forget_lost(self, lost: Mapping[int, str], k0: int, k1: int) -> None:
        """Chunks marked done whose shard file is gone are not written: clear the flags of
        those this write (chunks ``[k0, k1)``) does not cover, before the shard is written
        again, so the new file never holds a chunk flagged done without its data."""
        if self.complete:
            self._group.attrs.update({"complete": False})
            self.complete = False
        for k in lost:
            if not k0 <= k < k1:
                self._done[k] = 0

    def reset_chunks(self, chunks: Sequence[int]) -> None:
        """Clear the done flags of ``chunks`` (e.g. ones ``verify`` found corrupt) so they are recomputed."""
        self._require_open("reset chunks")
        if self.attached:
            raise SatError("an attached writer cannot reset chunks; use the lock holder's writer")
        ks = sorted({self._check_chunk(k) for k in chunks})
        if not ks:
            return
        self._group.attrs.update({"complete": False})
        self.complete = False
        for k in ks:
            self._done[k] = 0

    def finalize(self) -> bool:
        """Mark the map complete iff every chunk is done; return whether it is."""
        self._require_open("finalize")
        if self.attached:
            raise SatError("an attached writer cannot finalize; the lock holder does")
        complete = bool(self.done_chunks().all()) and not self.lost_chunks()
        if complete != self.complete:
            self._group.attrs.update({"complete": complete})
            self.complete = complete
        return complete


def create_map_arrays(group: zarr.Group, attrs: Mapping[str, Any]) -> None:
    """Create (replacing) the ``data`` and ``done`` arrays of a map group with attributes ``attrs``."""
    n, cs, sc, nb = attrs["n"], attrs["chunk_size"], attrs["shard_chunks"], attrs["packed_nbytes"]
    inner = ShardingCodec(
        chunk_shape=(cs, nb),
        codecs=[BytesCodec(), *compressors()],
        index_codecs=[BytesCodec(), Crc32cCodec()],
        index_location="end",
    )
    group.create_array(
        "data",
        shape=(n, nb),
        dtype="uint8",
        chunks=(cs * sc, nb),
        serializer=inner,
        compressors=None,
        fill_value=0,
        overwrite=True,
    )
    # One done chunk per data shard, unsharded: the task that owns a shard owns its flags.
    group.create_array(
        "done",
        shape=(attrs["n_chunks"],),
        dtype="uint8",
        chunks=(sc,),
        serializer=BytesCodec(),
        compressors=[Crc32cCodec()],
        fill_value=0,
        overwrite=True,
    )


def check_resume(
    name: str,
    where: str,
    have: Mapping[str, Any],
    want: Mapping[str, Any],
    chunk_size,
    shard_chunks,
) -> None:
    """MismatchError unless the existing map ``name`` of ``where`` (attributes ``have``) can be resumed as
    ``want``; ``chunk_size``/``shard_chunks`` are the caller's explicit choices (or None)."""
    hint = "; pass overwrite=True to replace it or choose another name"
    diff = provenance_diff(have.get("provenance") or {}, want["provenance"])
    if diff:
        raise MismatchError(
            f"map {name!r} of {where} exists with other provenance ({'; '.join(diff)}){hint}"
        )
    for k in ("fingerprint", "ids_sha256", "n"):
        if have.get(k) != want[k]:
            raise MismatchError(
                f"map {name!r} was computed for {k} {have.get(k)!r}, the split has {want[k]!r}{hint}"
            )
    checks = [
        ("encoding", True),
        ("channels", True),
        ("shape", True),
        ("chunk_size", chunk_size is not None),
        ("shard_chunks", shard_chunks is not None),
    ]
    for k, check in checks:
        if check and have.get(k) != want[k]:
            raise MismatchError(
                f"map {name!r} exists with {k} {have.get(k)!r}, asked for {want[k]!r}{hint}"
            )
