"""The saliency store: dataset splits and bit-packed saliency maps in a Zarr v3 hierarchy.

Layout (see ``docs/STORE_FORMAT.md`` for the full description)::

    <root>/                     attrs: format="sat-saliency-cache", format_version=1
      <split>/                  attrs: n, fingerprint, ids_sha256, image_shape, num_classes, ...
        labels                  int64 (N,)
        ids                     string (N,)  (Zarr v3 "string" data type, vlen-utf8)
        images                  uint8 (N, C, H, W), optional
        maps/<name>/            attrs: provenance, encoding, shape, n, chunk_size, complete, ...
          data                  uint8 (N, packed_nbytes), sharded, zstd + crc32c per chunk
          done                  uint8 (n_chunks,), one completion flag per data chunk

Writers hold a per-map lock; a map becomes readable (without ``allow_partial``) once every
chunk's ``done`` flag is set and :meth:`MapWriter.finalize` marked it complete. Only numpy,
zarr and numcodecs are imported here (no torch), so consumers can read maps on their own.

This module holds :class:`SaliencyStore`; the rest lives beside it and is re-exported here:
``names`` (map names, provenance), ``layout`` (format constants), ``location`` (local and
fsspec backends), ``lock`` (the writer lock), ``split`` (:class:`Split`) and ``maps``
(:class:`MapReader`, :class:`MapWriter`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import zarr

from saliency_cache.errors import (
    MapNotFoundError,
    MismatchError,
    ReadOnlyError,
    SatError,
    StoreFormatError,
    StoreNotFoundError,
)
from saliency_cache.layout import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SHARD_CHUNKS,
    FILE_KINDS,
    FORMAT,
    FORMAT_VERSION,
    ZSTD_LEVEL,
    compressors,
    wrap_meta,
)
from saliency_cache.location import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PARTIAL_RE,
    FsspecLocation,
    LocalLocation,
    Location,
    open_location,
    parse_manifest,
)
from saliency_cache.lock import LOCK_NAME, WriterLock
from saliency_cache.map_writer import MapWriter
from saliency_cache.maps import MapReader
from saliency_cache.names import (
    MODE_SHORT,
    TARGET_RULES,
    TEACHER_MODES,
    Provenance,
    check_split_name,
    ids_digest,
    jsonable,
    map_name_from_provenance,
    normalize_provenance,
    package_version,
    plain_name,
    sanitize_map_name,
)
from saliency_cache.split import Split, array_names

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SHARD_CHUNKS",
    "FILE_KINDS",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MODE_SHORT",
    "PARTIAL_RE",
    "TARGET_RULES",
    "TEACHER_MODES",
    "ZSTD_LEVEL",
    "FsspecLocation",
    "LocalLocation",
    "Location",
    "MapReader",
    "MapWriter",
    "Provenance",
    "SaliencyStore",
    "Split",
    "WriterLock",
    "ids_digest",
    "map_name_from_provenance",
    "normalize_provenance",
    "open_location",
    "package_version",
    "parse_manifest",
    "resolve_map",
    "sanitize_map_name",
]


class SaliencyStore:
    """A saliency store at a local path or fsspec URL. Create with :meth:`open`."""

    def __init__(self, loc: Location, root: zarr.Group) -> None:
        self._loc = loc
        self._root = root

    @property
    def url(self) -> str:
        return self._loc.url

    @property
    def read_only(self) -> bool:
        return self._loc.read_only

    @property
    def storage_options(self) -> dict:
        return dict(self._loc.storage_options)

    @property
    def location(self) -> Location:
        """Where the store lives (raw file operations: listing, sizes, bytes)."""
        return self._loc

    @property
    def root(self) -> zarr.Group:
        """The store's root zarr group."""
        return self._root

    def __repr__(self) -> str:
        return f"SaliencyStore({self.url!r}, {'r' if self.read_only else 'a'})"

    @classmethod
    def open(
        cls,
        url: str | os.PathLike,
        mode: Literal["r", "a", "w"] = "r",
        storage_options: dict | None = None,
    ) -> SaliencyStore:
        """Open a store.

        Args:
            url: a local path or any fsspec URL (``file://``, ``memory://``, ``s3://``, ``https://``).
            mode: ``"r"`` read-only (every write raises ReadOnlyError); ``"a"`` open or create
                for writing; ``"w"`` create a new store (refuses an existing store or any
                non-empty location: nothing is ever deleted).
            storage_options: passed to fsspec for URLs (credentials, endpoint, ...).

        Raises:
            StoreNotFoundError: mode "r" and nothing is there.
            StoreFormatError: the location is not a saliency store, or of another format version.
        """
        if mode not in ("r", "a", "w", "r+"):
            raise SatError(f"store mode must be 'r', 'a' or 'w', got {mode!r}")
        loc = open_location(url, read_only=mode == "r", storage_options=storage_options)
        if loc.http and mode != "r":
            raise ReadOnlyError(
                f"stores served over HTTP(S) are read-only, so {loc.url} cannot be opened with "
                f"mode {mode!r}; write locally or to s3:// and publish with `sat cache copy`"
            )
        if mode in ("r", "r+"):
            # A local path says what is there; a URL is only asked for its zarr.json (listing
            # a bucket or an HTTP host just to open a store would be slow or impossible).
            state = None if loc.remote else loc.root_state()
            if state == "absent":
                raise StoreNotFoundError(f"no store at {loc.url}")
            if state == "file":
                raise StoreFormatError(f"{loc.url} is a file, not a saliency store")
            if not cls._has_root(loc):
                if state is not None:
                    raise StoreFormatError(f"{loc.url} is not a saliency store (no zarr.json)")
                raise StoreNotFoundError(f"no saliency store at {loc.url} (no zarr.json)")
            loc.check_byte_ranges()
            return cls._open_existing(loc)
        if cls._has_root(loc):
            if mode == "w":
                raise SatError(
                    f"a store already exists at {loc.url}; open it with mode 'a' to add to it"
                )
            return cls._open_existing(loc)
        if loc.root_state() in ("file", "nonempty"):
            if loc.remote:
                raise StoreFormatError(
                    f"{loc.url} is not empty and is not a saliency store; refusing to write into it"
                )
            raise StoreFormatError(
                f"{loc.url} exists and is not a saliency store; refusing to write into it"
            )
        root = zarr.create_group(
            loc.zstore, attributes={"format": FORMAT, "format_version": FORMAT_VERSION}
        )
        return cls(loc, root)

    @staticmethod
    def _has_root(loc: Location) -> bool:
        try:
            return loc.exists("zarr.json")
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise StoreNotFoundError(f"cannot reach {loc.url}: {e}") from None

    @classmethod
    def _open_existing(cls, loc: Location) -> SaliencyStore:
        mode = "r" if loc.read_only else "r+"
        root = wrap_meta(
            f"store {loc.url}", lambda: zarr.open_group(loc.zstore, mode=mode, zarr_format=3)
        )
        attrs = root.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise StoreFormatError(
                f"{loc.url} is a Zarr store but not a saliency store "
                f"(format attribute {attrs.get('format')!r}, expected {FORMAT!r})"
            )
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreFormatError(
                f"{loc.url} has format_version {attrs.get('format_version')!r}; "
                f"this package reads format_version {FORMAT_VERSION}"
            )
        return cls(loc, root)

    @classmethod
    def attach_writer(
        cls,
        url: str | os.PathLike,
        split: str,
        name: str,
        storage_options: dict | None = None,
        shards: Sequence[int] | None = None,
    ) -> MapWriter:
        """A writer for a map that another process created and holds (a dask task's handle).

        It does not take the writer lock: it is only for tasks spawned by the lock holder
        (the process that called :meth:`Split.create_map`), and each such task must own whole
        shards (a shard file is rewritten as a unit; two tasks writing chunks of one shard
        would lose each other's chunks). Pass ``shards`` to have the writer refuse chunks
        outside them. Such a writer cannot :meth:`~MapWriter.finalize`.

        Raises:
            WriterLockedError: nobody holds the map's writer lock.
        """
        st = cls.open(url, "r+", storage_options=storage_options)
        return st.split(split).attach(name, shards)

    def require_writable(self, what: str) -> None:
        """ReadOnlyError (saying it cannot ``what``) if the store was opened read-only."""
        if self.read_only:
            raise ReadOnlyError(f"cannot {what}: store {self.url} was opened read-only")

    def splits(self) -> list[str]:
        """Names of the splits, sorted."""
        return [n for n in self._loc.list_dir("") if self._loc.exists(f"{n}/zarr.json")]

    def split(self, name: str) -> Split:
        """The split ``name``; MapNotFoundError (listing the available splits) if absent."""
        if not plain_name(name) or not self._loc.exists(f"{name}/zarr.json"):
            raise MapNotFoundError(
                f"no split {name!r} in {self.url}; available: {', '.join(self.splits()) or 'none'}"
            )
        return Split(self, name)

    def create_split(
        self,
        name: str,
        *,
        labels: np.ndarray,
        ids: Sequence[str],
        fingerprint: str,
        image_shape: tuple[int, int, int],
        num_classes: int,
        class_names: list[str] | None = None,
        dataset: dict | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        with_images: bool = False,
    ) -> Split:
        """Create (or return the identical existing) split.

        Args:
            labels: int (N,) class indices in ``[0, num_classes)``; stored as int64.
            ids: N distinct sample ids (file names or indices); ints are stored as strings.
            fingerprint: the dataset's fingerprint (any string identifying the source data).
            image_shape: ``(C, H, W)`` of one image.
            chunk_size: samples per chunk of ``images`` (and the default for maps).
            with_images: also create ``images`` uint8 (N, C, H, W), filled by :meth:`Split.write_images`.

        Raises:
            MismatchError: a split of that name exists for other data (quotes both fingerprints).
        """
        self.require_writable(f"create split {name!r}")
        return create_split(
            self,
            name,
            labels=labels,
            ids=ids,
            fingerprint=fingerprint,
            image_shape=image_shape,
            num_classes=num_classes,
            class_names=class_names,
            dataset=dataset,
            chunk_size=chunk_size,
            with_images=with_images,
        )


# ---- creating a split ----------------------------------------------------------------------
def create_split(
    store: SaliencyStore,
    name: str,
    *,
    labels: np.ndarray,
    ids: Sequence[str],
    fingerprint: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    class_names: list[str] | None,
    dataset: dict | None,
    chunk_size: int,
    with_images: bool,
) -> Split:
    """The work of :meth:`SaliencyStore.create_split` (see there), on a writable store."""
    check_split_name(name)
    labels, ids_list, attrs = split_attrs(
        labels, ids, fingerprint, image_shape, num_classes, class_names, dataset, chunk_size
    )
    if store.location.exists(f"{name}/zarr.json"):
        sp = Split(store, name, allow_unready=True)
        if (
            sp.n != attrs["n"]
            or sp.fingerprint != fingerprint
            or sp.ids_sha256 != attrs["ids_sha256"]
        ):
            raise MismatchError(
                f"split {name!r} of {store.url} holds other data: fingerprint "
                f"{sp.fingerprint} (n={sp.n}) vs the given {fingerprint} (n={attrs['n']})"
            )
        if sp.image_shape != tuple(attrs["image_shape"]) or sp.num_classes != num_classes:
            raise MismatchError(
                f"split {name!r} has image_shape {sp.image_shape} and {sp.num_classes} classes, "
                f"given {tuple(attrs['image_shape'])} and {num_classes}"
            )
        if sp.ready and (not with_images or sp.has_images_array()):
            return sp
        group = sp._group
    else:
        group = store.root.create_group(name, attributes={**attrs, "ready": False})
    if not group.attrs.get("ready", False):
        create_split_arrays(group, labels, ids_list, attrs["chunk_size"])
    if with_images and "images" not in array_names(store.location, name):
        c, h, w = attrs["image_shape"]
        group.create_array(
            "images",
            shape=(attrs["n"], c, h, w),
            dtype="uint8",
            chunks=(attrs["chunk_size"], c, h, w),
            compressors=compressors(),
            fill_value=0,
            overwrite=True,
        )
        group.attrs.update({"images_complete": False})
    group.attrs.update({"ready": True})
    return Split(store, name)


def split_attrs(
    labels, ids, fingerprint, image_shape, num_classes, class_names, dataset, chunk_size
):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise SatError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise SatError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    n = int(labels.shape[0])
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise SatError(f"num_classes must be a positive integer, got {num_classes!r}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SatError(f"label {int(labels[i])} at index {i} is outside [0, {num_classes})")
    ids_list = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (str, int, np.integer)):
            raise SatError(f"sample ids must be strings (or integers), got {i!r}")
        ids_list.append(str(i))
    if len(ids_list) != n:
        raise SatError(f"{len(ids_list)} ids given for {n} labels")
    if len(set(ids_list)) != n:
        seen: set[str] = set()
        dup = next(i for i in ids_list if i in seen or seen.add(i))
        raise SatError(f"sample id {dup!r} occurs more than once")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise SatError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise SatError(
            f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}"
        )
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise SatError(f"{len(class_names)} class names given for {num_classes} classes")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise SatError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    attrs = {
        "format_version": FORMAT_VERSION,
        "n": n,
        "fingerprint": fingerprint,
        "ids_sha256": ids_digest(ids_list),
        "image_shape": list(shape),
        "num_classes": int(num_classes),
        "class_names": class_names,
        "chunk_size": int(chunk_size),
        "dataset": jsonable(dict(dataset or {}), "dataset description"),
    }
    return labels, ids_list, attrs


def create_split_arrays(
    group: zarr.Group, labels: np.ndarray, ids: list[str], chunk_size: int
) -> None:
    n = labels.shape[0]
    lab = group.create_array(
        "labels",
        shape=(n,),
        dtype="int64",
        chunks=(min(n, 1 << 20),),
        compressors=compressors(),
        fill_value=0,
        overwrite=True,
    )
    # Every chunk gets its file (an all-zero labels chunk too): an absent file is a lost chunk.
    lab.with_config({"write_empty_chunks": True})[:] = labels
    ida = group.create_array(
        "ids",
        shape=(n,),
        dtype=str,
        chunks=(min(n, 1 << 16),),
        compressors=compressors(),
        overwrite=True,
    )
    ida.with_config({"write_empty_chunks": True})[:] = np.array(ids, dtype=object)
    if "maps" not in group:
        group.create_group("maps")


def resolve_map(
    st: SaliencyStore, split_name: str | None, map_arg: str | None
) -> tuple[Split, str | None]:
    """``(Split, map name or None)`` from a ``--split`` choice and a ``MAP`` / ``SPLIT/MAP`` argument.

    Without a split, the store's only split is taken, else ``train``; SatError otherwise.
    MapNotFoundError if the map is not in the split (listing the maps that are).
    """
    map_name = map_arg
    if map_arg is not None and "/" in map_arg:
        given, map_name = map_arg.split("/", 1)
        if split_name is not None and split_name != given:
            raise SatError(f"map {map_arg!r} names split {given!r} but --split is {split_name!r}")
        split_name = given
    if split_name is None:
        splits = st.splits()
        if len(splits) == 1:
            split_name = splits[0]
        elif "train" in splits:
            split_name = "train"
        elif not splits:
            raise SatError(f"store {st.url} has no splits")
        else:
            raise SatError(
                f"store {st.url} has several splits; pick one with --split: {', '.join(splits)}"
            )
    sp = st.split(split_name)
    if map_name is not None:
        sp.require_map(map_name)
    return sp, map_name
