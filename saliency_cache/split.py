"""One dataset split of a store: labels, ids, optional images, and its named maps.

:class:`Split` reads the split's arrays and creates, opens and deletes its maps (the map
handles are in :mod:`saliency_cache.maps` and :mod:`saliency_cache.map_writer`). Every chunk
the split calls written must have its file: zarr reads an absent chunk as the fill value, so
a lost file would read as zeros.
Each array's chunk files are checked once per handle, on its first read (one existence
check per file, a few stat calls locally, one concurrent round of requests remotely), and
:meth:`Split.check_files` checks them all up front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from saliency_cache.direct import DirectRows, read_rows_into
from saliency_cache.encoding import check_encoding, packed_nbytes
from saliency_cache.errors import (
    CorruptChunkError,
    IncompleteMapError,
    MapNotFoundError,
    MismatchError,
    MissingChunkError,
    SatError,
    StoreFormatError,
    WriterLockedError,
)
from saliency_cache.layout import (
    DECODE_ERRORS,
    DEFAULT_SHARD_CHUNKS,
    FORMAT_VERSION,
    check_indices,
    check_range,
    chunk_file_keys,
    req_attr,
    wrap_meta,
)
from saliency_cache.location import Location
from saliency_cache.lock import WriterLock
from saliency_cache.map_writer import MapWriter, check_resume, create_map_arrays
from saliency_cache.maps import MapReader
from saliency_cache.names import (
    Provenance,
    ids_digest,
    normalize_provenance,
    plain_name,
    sanitize_map_name,
)

if TYPE_CHECKING:
    from saliency_cache.store import SaliencyStore


class Split:
    """One dataset split of a store: labels, ids, optional images and named maps.

    Attributes: ``name``, ``n``, ``fingerprint``, ``ids_sha256``, ``image_shape`` (C, H, W),
    ``num_classes``, ``class_names`` (list or None), ``dataset`` (dict), ``chunk_size``.
    """

    def __init__(self, store: SaliencyStore, name: str, allow_unready: bool = False) -> None:
        self.store = store
        self.name = name
        self._loc = store.location
        what = f"split {name!r} of {store.url}"
        self._group = wrap_meta(what, lambda: store.root[name], f"{store.url}/{name}/zarr.json")
        if not isinstance(self._group, zarr.Group):
            raise StoreFormatError(f"{what} is an array, not a group")
        a = self._group.attrs.asdict()
        self.n = req_attr(a, "n", what, int)
        self.fingerprint = req_attr(a, "fingerprint", what, str)
        self.ids_sha256 = req_attr(a, "ids_sha256", what, str)
        self.image_shape = tuple(req_attr(a, "image_shape", what, list))
        self.num_classes = req_attr(a, "num_classes", what, int)
        self.chunk_size = req_attr(a, "chunk_size", what, int)
        self.class_names = a.get("class_names")
        self.dataset = a.get("dataset") or {}
        self.ready = bool(a.get("ready", True))
        self._images_complete = bool(a.get("images_complete", False))
        self._files_ok: set[str] = set()  # arrays whose chunk files were all found
        self._direct: list[DirectRows | None] | None = None  # images' reader, once looked up
        if len(self.image_shape) != 3 or self.n < 1 or self.chunk_size < 1:
            raise StoreFormatError(
                f"{what} has malformed attributes n={self.n}, "
                f"image_shape={self.image_shape}, chunk_size={self.chunk_size}"
            )
        if not self.ready and not allow_unready:
            raise StoreFormatError(f"{what} was not completely created; create it again")

    def __repr__(self) -> str:
        return f"Split({self.name!r}, n={self.n}, fingerprint={self.fingerprint[:12]!r})"

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_size)

    def _what(self) -> str:
        return f"split {self.name!r} of {self.store.url}"

    def array(self, name: str) -> zarr.Array:
        """The raw zarr array ``name`` (``labels``, ``ids``, ``images``), for integrity tools:
        reading it bypasses this handle's checks. SatError if it is absent or unreadable."""
        return wrap_meta(
            f"{name} of {self._what()}",
            lambda: self._group[name],
            f"{self.store.url}/{self.name}/{name}/zarr.json",
        )

    def _read(self, arr_name: str, fn):
        try:
            return fn()
        except SatError:
            raise
        except DECODE_ERRORS as e:
            raise CorruptChunkError(f"{arr_name} of {self._what()} failed to decode: {e}") from None

    # ---- chunk files ----
    def missing_files(self, array: str) -> list[tuple[int, int, str]]:
        """``(first sample, stop sample, key)`` of every chunk file of ``array`` that is not there.

        ``labels`` and ``ids`` are written whole when the split is created, and ``images``
        before it is marked complete, so once those are done every chunk file must exist.
        """
        arr = self.array(array)
        keys = chunk_file_keys(arr)
        gone = set(self._loc.missing(keys))
        step = (arr.shards or arr.chunks)[0]
        return [(i * step, min((i + 1) * step, self.n), k) for i, k in enumerate(keys) if k in gone]

    def damage(self, images: bool = True) -> str | None:
        """One line naming the first lost chunk file of ``labels``, ``ids`` and (with ``images``,
        once they are marked complete) ``images``; None if every file is there."""
        arrays = ["labels", "ids"]
        if images and self._images_complete_attr() and self.has_images_array():
            arrays.append("images")
        for name in arrays:
            msg = self._lost_message(name)
            if msg is not None:
                return msg
        return None

    def check_files(self, images: bool = True) -> None:
        """MissingChunkError naming the first lost chunk file (see :meth:`damage`).

        Reads check their array's files on first use anyway; this checks them all up front
        (training calls it before the first step).
        """
        msg = self.damage(images)
        if msg is not None:
            raise MissingChunkError(msg)

    def _lost_message(self, name: str) -> str | None:
        if name in self._files_ok:
            return None
        gone = self.missing_files(name)
        if not gone:
            self._files_ok.add(name)
            return None
        s, e, key = gone[0]
        more = f" (and {len(gone) - 1} more files)" if len(gone) > 1 else ""
        return (
            f"{name} of {self._what()}: chunk file {self.store.url}/{key} (samples {s}..{e - 1}) "
            f"is missing{more}; zarr would read it as fill values. Restore the store from a "
            "good copy"
        )

    def _require_files(self, name: str) -> None:
        msg = self._lost_message(name)
        if msg is not None:
            raise MissingChunkError(msg)

    # ---- labels and ids ----
    def labels(self) -> np.ndarray:
        """int64 (N,) class indices."""
        self._require_files("labels")
        arr = self.array("labels")
        return self._read("labels", lambda: np.asarray(arr[:], dtype=np.int64))

    def ids(self) -> list[str]:
        """The N sample ids, as strings."""
        self._require_files("ids")
        arr = self.array("ids")
        return self._read("ids", lambda: [str(x) for x in arr[:].tolist()])

    # ---- images ----
    def has_images_array(self) -> bool:
        return self._loc.exists(f"{self.name}/images/zarr.json")  # no listing: works over HTTP

    def _images_complete_attr(self) -> bool:
        if not self._images_complete:
            a = wrap_meta(self._what(), lambda: self.store.root[self.name]).attrs.asdict()
            self._images_complete = bool(a.get("images_complete", False))
        return self._images_complete

    def images_complete(self) -> bool:
        """True once :meth:`mark_images_complete` ran (re-read from the store)."""
        return self._images_complete_attr() and self.has_images_array()

    def has_images(self) -> bool:
        """True if the split holds a completely written ``images`` array."""
        return self.images_complete()

    def mark_images_complete(self) -> None:
        """Record that every chunk of ``images`` was written (call after the last :meth:`write_images`)."""
        self.store.require_writable("mark images complete")
        if not self.has_images_array():
            raise SatError(f"{self._what()} has no images array (create it with with_images=True)")
        self._group.attrs.update({"images_complete": True})
        self._images_complete = True

    def write_images(self, start: int, images: np.ndarray) -> None:
        """Write uint8 (B, C, H, W) images at sample ``start`` (a multiple of ``chunk_size``).

        ``B`` must cover whole chunks (or end at N), so every chunk is written in one piece.
        """
        self.store.require_writable("write images")
        if not self.has_images_array():
            raise SatError(f"{self._what()} has no images array (create it with with_images=True)")
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise SatError(f"images must be uint8, got dtype {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise SatError(
                f"images must be (B, {', '.join(map(str, self.image_shape))}), got {images.shape}"
            )
        s, e = check_range(start, int(start) + images.shape[0], self.n, self._what())
        if s % self.chunk_size or (e % self.chunk_size and e != self.n) or e == s:
            raise SatError(
                f"image writes must cover whole chunks of {self.chunk_size}: got [{s}, {e}) of {self.n}"
            )
        # Every chunk gets its file, even an all-zero one: an absent file means a lost chunk.
        self.array("images").with_config({"write_empty_chunks": True})[s:e] = images

    def _images_for_read(self) -> zarr.Array:
        if not self.has_images_array():
            raise SatError(f"{self._what()} holds no images")
        if not self.images_complete():
            raise IncompleteMapError(f"the images of {self._what()} were not completely written")
        self._require_files("images")
        return self.array("images")

    def read_images(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, C, H, W)."""
        arr = self._images_for_read()
        s, e = check_range(start, stop, self.n, self._what())
        return self._read("images", lambda: arr[s:e])

    def read_images_into(self, ranges: Sequence[tuple[int, int]], out: np.ndarray) -> None:
        """Fill ``out`` (uint8 (sum(stop - start), C, H, W), C-contiguous) with the images of
        each ``(start, stop)`` range in turn: the loader's read, one call per buffer.

        A local store of this package's layout is decoded straight into ``out``
        (:mod:`saliency_cache.direct`, several times cheaper per chunk than zarr's path);
        any other store is read through zarr, range by range.
        """
        if self._direct is None:  # the checks of _images_for_read, then the reader, once
            arr = self._images_for_read()
            self._direct = [DirectRows.of(arr, self._loc, f"images of {self._what()}")]
        direct = self._direct[0]
        # Through zarr, every call checks again (an absent chunk file would read as zeros);
        # the direct reader opens each chunk file anyway and refuses a missing one.
        arr = self._images_for_read() if direct is None else None
        ranges = [check_range(s, e, self.n, self._what()) for s, e in ranges]
        rows = sum(e - s for s, e in ranges)
        if out.dtype != np.uint8 or tuple(out.shape) != (rows, *self.image_shape):
            raise SatError(
                f"out must be uint8 {(rows, *self.image_shape)}, got {out.dtype} {tuple(out.shape)}"
            )
        read_rows_into(direct, ranges, out, lambda s, e: self._read("images", lambda: arr[s:e]))

    def read_images_indices(self, idx: Sequence[int]) -> np.ndarray:
        """uint8 (len(idx), C, H, W), in the order given (repeats allowed)."""
        arr = self._images_for_read()
        a = check_indices(idx, self.n, self._what())
        if a.size == 0:
            return np.zeros((0, *self.image_shape), dtype=np.uint8)
        u, inv = np.unique(a, return_inverse=True)
        return self._read("images", lambda: arr.get_orthogonal_selection((u,)))[inv]

    # ---- maps ----
    def map_key(self, name: str) -> str:
        return f"{self.name}/maps/{name}"

    def maps(self) -> list[str]:
        """Names of the maps in this split (complete or not), sorted."""
        prefix = f"{self.name}/maps"
        return [
            m for m in self._loc.list_dir(prefix) if self._loc.exists(f"{prefix}/{m}/zarr.json")
        ]

    def require_map(self, name: str) -> str:
        if not plain_name(name) or not self._loc.exists(f"{self.map_key(name)}/zarr.json"):
            raise MapNotFoundError(
                f"no map {name!r} in {self._what()}; available: {', '.join(self.maps()) or 'none'}"
            )
        return name

    def map_group(self, name: str) -> zarr.Group:
        g = wrap_meta(
            f"map {name!r} of {self._what()}",
            lambda: self._group[f"maps/{name}"],
            f"{self.store.url}/{self.map_key(name)}/zarr.json",
        )
        if not isinstance(g, zarr.Group):
            raise StoreFormatError(f"map {name!r} of {self._what()} is not a group")
        return g

    def create_map(
        self,
        name: str,
        *,
        provenance: Mapping[str, Any] | Provenance,
        encoding: str,
        channels: int,
        chunk_size: int | None = None,
        shard_chunks: int | None = None,
        overwrite: bool = False,
        force_unlock: bool = False,
    ) -> MapWriter:
        """Create a map, or resume the map of that name if its provenance is the same.

        (Long on purpose: the checks, the resume decision and the creation run under one
        writer lock, which a split into helpers would have to hand around.)

        Args:
            name: sanitised with :func:`sanitize_map_name`.
            provenance: a dict or :class:`Provenance`; ``encoding``, ``created`` and
                ``package_version`` are filled in. A caller-given ``created`` is kept.
            encoding: ``"binary"`` or ``"ternary"``.
            channels: the image's channel count or 1 (box/mask maps).
            chunk_size: samples per chunk (default: the split's ``chunk_size``).
            shard_chunks: chunks per shard file (default 64, at most the number of chunks).
            overwrite: replace an existing map of that name whatever its provenance.
            force_unlock: take the writer lock even if it belongs to a process on another host.

        Returns:
            A :class:`MapWriter` holding the map's writer lock (close it, or use ``with``).

        Raises:
            MismatchError: a map of that name exists with other provenance, layout or data.
            WriterLockedError: another live writer holds the map.
        """
        self.store.require_writable(f"create map {name!r}")
        name = sanitize_map_name(name)
        check_encoding(encoding)
        if channels not in (1, self.image_shape[0]):
            raise SatError(
                f"map channels must be 1 or the image's {self.image_shape[0]}, got {channels!r}"
            )
        cs = self.chunk_size if chunk_size is None else chunk_size
        if not isinstance(cs, (int, np.integer)) or cs < 1:
            raise SatError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if shard_chunks is not None and (
            not isinstance(shard_chunks, (int, np.integer)) or shard_chunks < 1
        ):
            raise SatError(f"shard_chunks must be a positive integer, got {shard_chunks!r}")
        prov = normalize_provenance(provenance, encoding)
        key = self.map_key(name)
        lock = WriterLock.acquire(self._loc, key, f"map {name!r} of {self._what()}", force_unlock)
        try:
            shape = [int(channels), *self.image_shape[1:]]
            n_chunks = math.ceil(self.n / cs)
            sc = min(shard_chunks or DEFAULT_SHARD_CHUNKS, n_chunks)
            want = {
                "format_version": FORMAT_VERSION,
                "provenance": prov,
                "encoding": encoding,
                "channels": int(channels),
                "shape": shape,
                "n": self.n,
                "chunk_size": int(cs),
                "shard_chunks": int(sc),
                "n_chunks": n_chunks,
                "packed_nbytes": packed_nbytes(shape, encoding),
                "fingerprint": self.fingerprint,
                "ids_sha256": self.ids_sha256,
                "complete": False,
            }
            if self._loc.exists(f"{key}/zarr.json") and not overwrite:
                group = self.map_group(name)
                have = group.attrs.asdict()
                check_resume(name, self._what(), have, want, chunk_size, shard_chunks)
                self._loc.remove_partial_files(key)  # left by a writer killed mid-write
                if not {"data", "done"} <= array_names(self._loc, key):
                    create_map_arrays(group, have)  # a creation killed before its arrays
                return MapWriter(self, name, lock=lock)
            if self._loc.exists(f"{key}/zarr.json"):
                # Arrays go first: a crash then leaves old attributes with no data, never new
                # provenance over old done flags.
                for arr in ("data", "done"):
                    self._loc.delete_dir(f"{key}/{arr}")
                group = self.map_group(name)
                group.attrs.put(want)
            else:
                # Not overwrite=True: that would delete the directory holding our lock file.
                group = zarr.create_group(self._loc.zstore, path=key, attributes=want)
            create_map_arrays(group, want)
            return MapWriter(self, name, lock=lock)
        except BaseException:
            lock.release()
            raise

    def open_map_writer(self, name: str, *, force_unlock: bool = False) -> MapWriter:
        """Resume writing an existing map (takes the writer lock; keeps its done chunks)."""
        self.store.require_writable(f"write map {name!r}")
        self.require_map(name)
        lock = WriterLock.acquire(
            self._loc, self.map_key(name), f"map {name!r} of {self._what()}", force_unlock
        )
        try:
            return MapWriter(self, name, lock=lock)
        except BaseException:
            lock.release()
            raise

    def attach(self, name: str, shards: Sequence[int] | None) -> MapWriter:
        self.require_map(name)
        if WriterLock.read(self._loc, self.map_key(name)) is None:
            raise WriterLockedError(
                f"map {name!r} of {self._what()} has no writer lock: attach_writer is only for "
                "tasks started by the process holding it (via create_map or open_map_writer)"
            )
        return MapWriter(self, name, lock=None, shards=shards)

    def open_map(
        self,
        name: str,
        *,
        allow_partial: bool = False,
        expect_fingerprint: str | None = None,
        expect_ids: Sequence[str] | None = None,
        expect_n: int | None = None,
    ) -> MapReader:
        """A reader for map ``name``, after checking that it belongs to this data.

        Raises:
            MapNotFoundError: no such map (the message lists the available ones).
            MismatchError: the map's recorded n / ids_sha256 / fingerprint differ from the
                split's or from ``expect_*`` (both values quoted).
            IncompleteMapError: chunks are missing and ``allow_partial`` is False.
            MissingChunkError: a file of a chunk marked written (a shard, done flags) is gone.
        """
        self.require_map(name)
        r = MapReader(self, name)
        what = f"map {name!r} of {self._what()}"
        pairs = [
            ("n", r.n, self.n, "the split"),
            ("fingerprint", r.fingerprint, self.fingerprint, "the split"),
            ("ids_sha256", r.ids_sha256, self.ids_sha256, "the split"),
        ]
        if expect_n is not None:
            pairs.append(("n", r.n, int(expect_n), "expected"))
        if expect_fingerprint is not None:
            pairs.append(("fingerprint", r.fingerprint, expect_fingerprint, "expected"))
        if expect_ids is not None:
            pairs.append(
                ("ids_sha256", r.ids_sha256, ids_digest([str(i) for i in expect_ids]), "expected")
            )
        for key, mine, theirs, whose in pairs:
            if mine != theirs:
                raise MismatchError(f"{what} has {key} {mine!r} but {whose} has {theirs!r}")
        # An unfinished map is refused as such; a finished one (or any, with allow_partial)
        # must have the file of every chunk marked written.
        if not allow_partial and not r.complete:
            self._refuse_incomplete(r, what)
        r.check_files()
        if not allow_partial and not r.done_chunks().all():
            self._refuse_incomplete(r, what)
        return r

    @staticmethod
    def _refuse_incomplete(r: MapReader, what: str) -> None:
        missing = np.flatnonzero(~r.done_chunks())
        if missing.size == 0:
            raise IncompleteMapError(
                f"{what} was never finalized (every chunk is written; run finalize())"
            )
        first = ", ".join(str(int(k)) for k in missing[:5])
        raise IncompleteMapError(
            f"{what} is incomplete: {missing.size} of {r.n_chunks} chunks missing "
            f"(first: {first}); finish the precompute or pass allow_partial"
        )

    def inspect_map(self, name: str) -> MapReader:
        """A reader without the completeness and data checks of :meth:`open_map` (for inspection tools)."""
        self.require_map(name)
        return MapReader(self, name)

    def delete_map(self, name: str, *, force_unlock: bool = False) -> None:
        """Delete map ``name`` (takes its writer lock first, so a live writer blocks it)."""
        self.store.require_writable(f"delete map {name!r}")
        self.require_map(name)
        key = self.map_key(name)
        lock = WriterLock.acquire(self._loc, key, f"map {name!r} of {self._what()}", force_unlock)
        lock.forget()  # the lock file goes with the directory
        # Metadata first: an interrupted delete leaves no half map that readers would list.
        self._loc.delete(f"{key}/zarr.json")
        self._loc.delete_dir(key)


def array_names(loc: Location, prefix: str) -> set[str]:
    """Names of the arrays and groups directly under ``prefix`` (those with a zarr.json)."""
    return {n for n in loc.list_dir(prefix) if loc.exists(f"{prefix}/{n}/zarr.json")}
