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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import socket
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from saliency_cache.encoding import (
    ENCODINGS,
    check_encoding,
    invalid_bytes,
    pack,
    packed_nbytes,
    unpack,
)
from saliency_cache.errors import (
    CorruptChunkError,
    IncompleteMapError,
    MapNotFoundError,
    MismatchError,
    ReadOnlyError,
    SatError,
    StoreFormatError,
    StoreNotFoundError,
    WriterLockedError,
)

FORMAT = "sat-saliency-cache"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 256  # samples per chunk: the unit of a write, a read and a done flag
DEFAULT_SHARD_CHUNKS = 64  # chunks per shard file: a 50,000-sample map is 4 files
ZSTD_LEVEL = 3
LOCK_NAME = ".writer.lock"
# What zarr's local store leaves behind when a write is killed: "<name>.<uuid hex>.partial".
PARTIAL_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")
# Written by ``sat cache copy`` next to the root zarr.json: every key of the copy with its size
# and sha256, so hosts without directory listings (static HTTP) can still list splits and maps.
MANIFEST_NAME = ".sat-manifest.json"
MANIFEST_FORMAT = "sat-saliency-cache-manifest"
TEACHER_MODES = ("standard", "adversarial", "sparse")
TARGET_RULES = ("label", "argmax")
MODE_SHORT = {"standard": "std", "adversarial": "adv", "sparse": "sparse"}
_MAX_NAME = 128
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What zarr/numcodecs raise when a chunk fails its checksum or does not decompress.
_DECODE_ERRORS = (ValueError, RuntimeError, TypeError, EOFError, AssertionError)


# ---- names, digests, provenance ------------------------------------------------------------
def sanitize_map_name(name: str) -> str:
    """Turn ``name`` into a safe single path component.

    Keeps ``[A-Za-z0-9._-]``, replaces every other run of characters with ``_`` and strips
    leading dots and underscores: ``"../evil"`` -> ``"evil"``, ``"a/b"`` -> ``"a_b"``,
    ``"my map"`` -> ``"my_map"``. Raises SatError for names that end up empty, ``".."``,
    ``"zarr.json"`` (the metadata file) or longer than 128 characters.
    """
    if not isinstance(name, str):
        raise SatError(f"a map name must be a string, got {name!r}")
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._")
    if not out or out == ".." or "/" in out:
        raise SatError(f"map name {name!r} is empty after sanitising")
    if out == "zarr.json":
        raise SatError(f"map name {name!r} is reserved")
    if len(out) > _MAX_NAME:
        raise SatError(f"map name {name!r} is longer than {_MAX_NAME} characters")
    return out


def _plain(name: object) -> bool:
    """True for a name that is one path component (lookups never walk into other nodes)."""
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
    )


def _check_split_name(name: str) -> str:
    if not isinstance(name, str) or sanitize_map_name(name) != name:
        raise SatError(
            f"split name {name!r} must be a plain name of letters, digits, '.', '_' and '-'"
        )
    return name


def map_name_from_provenance(prov: Mapping[str, Any]) -> str:
    """The conventional map name: ``<arch>-<mode>-<method>`` for teacher maps, the source otherwise.

    ``{"source": "teacher", "teacher_arch": "ResNet10", "teacher_mode": "adversarial",
    "method": "gbp"}`` -> ``"resnet10-adv-gbp"`` (modes: std, adv, sparse); the suffix
    ``-argmax`` marks maps computed for the teacher's prediction instead of the label. Weak
    maps are named after their source (``"box"``, ``"mask"``). The result is sanitised.
    """
    source = prov.get("source")
    if not source:
        raise SatError(f"provenance needs a 'source' to derive a map name, got {dict(prov)!r}")
    if source != "teacher":
        return sanitize_map_name(str(source))
    arch, mode, method = prov.get("teacher_arch"), prov.get("teacher_mode"), prov.get("method")
    if not arch or not method:
        raise SatError(
            f"teacher provenance needs teacher_arch and method, got arch={arch!r} method={method!r}"
        )
    # "++" would sanitise to "_"; spell it "pp" so gradcam++ stays distinct and readable.
    parts = [
        str(arch).lower(),
        MODE_SHORT.get(str(mode), str(mode or "unknown")),
        str(method).replace("++", "pp"),
    ]
    if prov.get("target_rule") == "argmax":
        parts.append("argmax")
    return sanitize_map_name("-".join(parts))


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 (hex) of the ids as a compact JSON list: ``json.dumps(ids, ensure_ascii=False, separators=(",", ":"))`` in UTF-8."""
    text = json.dumps(list(ids), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_version() -> str:
    """Installed version of ``sat-pipeline``, or ``"unknown"`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sat-pipeline")
    except PackageNotFoundError:
        return "unknown"


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise SatError(f"{what} must be JSON-serialisable (no NaN): {e}") from None


@dataclass(frozen=True)
class Provenance:
    """Where a map came from. Stored as a flat dict in the map's ``provenance`` attribute.

    ``extra`` holds any further keys the caller records (they are flattened by :meth:`to_dict`).
    """

    source: str  # "teacher", "box", "mask", ...
    teacher_arch: str | None = None
    teacher_mode: str | None = None  # "standard", "adversarial", "sparse" (or "unknown")
    checkpoint_sha256: str | None = None
    method: str | None = None  # saliency method, e.g. "gbp"
    method_params: Mapping[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    target_rule: str | None = None  # "label" (paper) or "argmax" (authors' code)
    encoding: str | None = None
    created: str | None = None  # ISO-8601 UTC, set once when the map is created
    package_version: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise SatError(f"provenance source must be a non-empty string, got {self.source!r}")
        if self.target_rule not in (None, *TARGET_RULES):
            raise SatError(
                f"provenance target_rule must be label or argmax, got {self.target_rule!r}"
            )
        if self.encoding not in (None, *ENCODINGS):
            raise SatError(f"provenance encoding must be binary or ternary, got {self.encoding!r}")
        if self.teacher_mode is not None and not isinstance(self.teacher_mode, str):
            raise SatError(f"provenance teacher_mode must be a string, got {self.teacher_mode!r}")
        if not isinstance(self.method_params, Mapping):
            raise SatError(f"provenance method_params must be a dict, got {self.method_params!r}")
        clash = set(self.extra) & {f.name for f in fields(self)}
        if clash:
            raise SatError(f"provenance extra keys {sorted(clash)} shadow standard fields")

    def to_dict(self) -> dict[str, Any]:
        """Standard fields in a fixed order, then the extra keys sorted (stable metadata bytes)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["method_params"] = dict(self.method_params)
        for k in sorted(self.extra):
            out[k] = self.extra[k]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        if known.get("method_params") is None:
            known["method_params"] = {}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


def normalize_provenance(
    provenance: Mapping[str, Any] | Provenance, encoding: str
) -> dict[str, Any]:
    """Validate ``provenance`` and fill ``encoding``, ``created`` and ``package_version``."""
    prov = provenance if isinstance(provenance, Provenance) else Provenance.from_dict(provenance)
    if prov.encoding not in (None, encoding):
        raise SatError(f"provenance says encoding {prov.encoding!r} but the map is {encoding!r}")
    d = prov.to_dict()
    d["encoding"] = encoding
    d["created"] = d["created"] or _now()
    d["package_version"] = d["package_version"] or package_version()
    return _jsonable(d, "provenance")


def _prov_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(a) | set(b)) - {"created"})
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


# ---- where the store lives -----------------------------------------------------------------
def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


async def _collect(it) -> list:
    return [x async for x in it]


class _Location:
    """A zarr store plus the few raw operations the store layer needs (exists, list, size, bytes)."""

    def __init__(self, url: str | os.PathLike, read_only: bool, storage_options: dict | None):
        self.url = os.fspath(url)
        self.read_only = read_only
        self.storage_options = dict(storage_options or {})
        self.remote = bool(_URL_RE.match(self.url))
        # Absolute, so the lock file and the store stay the same files if the cwd changes.
        self.local_root: Path | None = None if self.remote else Path(self.url).absolute()
        self._zstore = None
        self._fs = None
        self._manifest: dict[str, dict[str, Any]] | None | bool = False  # False: not read yet

    @property
    def http(self) -> bool:
        return self.url.lower().startswith(("http://", "https://"))

    @property
    def zstore(self):
        if self._zstore is None:
            if self.remote:
                self._zstore = zarr.storage.FsspecStore.from_url(
                    self.url, storage_options=self.storage_options or None, read_only=self.read_only
                )
            else:
                self._zstore = zarr.storage.LocalStore(self.local_root, read_only=self.read_only)
        return self._zstore

    def exists(self, key: str) -> bool:
        if self.local_root is not None:
            return (self.local_root / key).is_file()
        return bool(_sync(self.zstore.exists(key)))

    def list_dir(self, prefix: str) -> list[str]:
        if self.local_root is not None:
            d = self.local_root / prefix
            return sorted(os.listdir(d)) if d.is_dir() else []
        try:
            # HTTP listings name sub-directories with a trailing "/".
            names = {n.rstrip("/") for n in _sync(_collect(self.zstore.list_dir(prefix)))}
            names.discard("")
        except FileNotFoundError:
            names = set()
        except Exception:  # e.g. HTTP 403: the host serves files but no directory listings
            if self.manifest() is None:
                raise
            names = set()
        if names:
            return sorted(names)
        files = self.manifest()
        if files is not None:
            # A read-only copy published by `sat cache copy` on a host that cannot list.
            head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
            return sorted({k[len(head) :].split("/", 1)[0] for k in files if k.startswith(head)})
        if self.http:  # every group holds a zarr.json, so an empty HTTP listing is no listing
            where = "/".join(p for p in (self.url.rstrip("/"), prefix) if p)
            raise SatError(
                f"cannot list {where}: the server gives no directory listings and "
                f"the store has no {MANIFEST_NAME}; name the split and map explicitly, or "
                "publish the store with `sat cache copy` (which writes the manifest)"
            )
        return []

    def manifest(self) -> dict[str, dict[str, Any]] | None:
        """``{key: {"size", "sha256"}}`` from a read-only remote store's manifest, else None."""
        if self._manifest is False:
            self._manifest = None
            if self.remote and self.read_only:
                raw = self.get(MANIFEST_NAME)
                if raw is not None:
                    self._manifest = parse_manifest(raw, self.url)
        return self._manifest

    def get(self, key: str) -> bytes | None:
        from zarr.core.buffer import default_buffer_prototype

        buf = _sync(self.zstore.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def set(self, key: str, data: bytes) -> None:
        from zarr.core.buffer import default_buffer_prototype

        _sync(self.zstore.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def delete(self, key: str) -> None:
        _sync(self.zstore.delete(key))

    def remove_partial_files(self, prefix: str) -> int:
        """Delete the temporary files a killed local write left under ``prefix`` (zarr's
        ``<name>.<uuid hex>.partial``); only for a caller holding the writer lock. Returns
        how many were removed (always 0 for remote stores, whose writes are not staged so)."""
        if self.local_root is None or not (self.local_root / prefix).is_dir():
            return 0
        removed = 0
        for dirpath, _dirs, files in os.walk(self.local_root / prefix):
            for f in files:
                if PARTIAL_RE.search(f):
                    Path(dirpath, f).unlink(missing_ok=True)
                    removed += 1
        return removed

    def delete_dir(self, prefix: str) -> None:
        if self.local_root is not None:
            shutil.rmtree(self.local_root / prefix, ignore_errors=True)
        else:
            _sync(self.zstore.delete_dir(prefix))

    def du(self, prefix: str) -> int:
        """Bytes on disk under ``prefix`` (sum of file sizes; fsspec's ``du`` for remote stores)."""
        if self.local_root is not None:
            total = 0
            for dirpath, _dirs, files in os.walk(self.local_root / prefix):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, f))
                    except FileNotFoundError:  # a temp file replaced meanwhile
                        pass
            return total
        files = self.manifest()
        if files is not None:
            head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
            return sum(int(v["size"]) for k, v in files.items() if k.startswith(head))
        if self._fs is None:
            from fsspec.core import url_to_fs

            self._fs, self._fs_root = url_to_fs(self.url, **self.storage_options)
        path = f"{self._fs_root.rstrip('/')}/{prefix}"
        try:
            return int(self._fs.du(path, total=True))
        except TypeError:  # HTTP listings carry no sizes: ask for each file's
            return sum(int(self._fs.size(p) or 0) for p in self._fs.find(path))

    def check_byte_ranges(self) -> None:
        """Refuse an HTTP server that ignores Range requests (shards are read by byte range)."""
        from zarr.abc.store import RangeByteRequest
        from zarr.core.buffer import default_buffer_prototype

        buf = _sync(
            self.zstore.get(
                "zarr.json", prototype=default_buffer_prototype(), byte_range=RangeByteRequest(0, 1)
            )
        )
        if buf is not None and len(buf) != 1:
            raise SatError(
                f"the server of {self.url} ignores HTTP Range requests (asked for 1 byte, got "
                f"{len(buf)}); maps are read by byte range, so serve the store from a host that "
                "supports ranges (S3, nginx, any CDN; not `python -m http.server`)"
            )


def parse_manifest(raw: bytes, where: str) -> dict[str, dict[str, Any]]:
    """The ``files`` of a manifest (see :data:`MANIFEST_NAME`); StoreFormatError if malformed."""
    try:
        d = json.loads(raw.decode("utf-8"))
        ok = d.get("format") == MANIFEST_FORMAT and isinstance(d.get("files"), dict)
        files = d["files"] if ok else None
        ok = ok and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values()
        )
    except (UnicodeDecodeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise StoreFormatError(f"{where}/{MANIFEST_NAME} is not a valid manifest")
    return files


def _wrap_meta(what: str, fn):
    """Run ``fn``; turn zarr's missing-node and bad-metadata exceptions into SatErrors."""
    try:
        return fn()
    except SatError:
        raise
    except (KeyError, FileNotFoundError) as e:
        raise MapNotFoundError(f"{what} does not exist ({e})") from None
    except Exception as e:  # corrupt JSON, invalid zarr metadata, wrong node type ...
        raise StoreFormatError(
            f"cannot read the metadata of {what}: {type(e).__name__}: {e}"
        ) from None


def _req(attrs: Mapping[str, Any], key: str, what: str, kind: type | tuple[type, ...]) -> Any:
    if key not in attrs:
        raise StoreFormatError(f"{what} lacks the attribute {key!r}")
    v = attrs[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        raise StoreFormatError(f"{what} has a malformed attribute {key}={v!r}")
    return v


# ---- the store -----------------------------------------------------------------------------
class SaliencyStore:
    """A saliency store at a local path or fsspec URL. Create with :meth:`open`."""

    def __init__(self, loc: _Location, root: zarr.Group) -> None:
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
        loc = _Location(url, read_only=mode == "r", storage_options=storage_options)
        local = loc.local_root
        if loc.http and mode != "r":
            raise ReadOnlyError(
                f"stores served over HTTP(S) are read-only, so {loc.url} cannot be opened with "
                f"mode {mode!r}; write locally or to s3:// and publish with `sat cache copy`"
            )
        if mode in ("r", "r+"):
            if local is not None and not local.exists():
                raise StoreNotFoundError(f"no store at {loc.url}")
            if local is not None and not local.is_dir():
                raise StoreFormatError(f"{loc.url} is a file, not a saliency store")
            if not cls._has_root(loc):
                if local is not None:
                    raise StoreFormatError(f"{loc.url} is not a saliency store (no zarr.json)")
                raise StoreNotFoundError(f"no saliency store at {loc.url} (no zarr.json)")
            if loc.http:
                loc.check_byte_ranges()
            return cls._open_existing(loc)
        if cls._has_root(loc):
            if mode == "w":
                raise SatError(
                    f"a store already exists at {loc.url}; open it with mode 'a' to add to it"
                )
            return cls._open_existing(loc)
        if local is not None:
            if local.exists() and (not local.is_dir() or any(local.iterdir())):
                raise StoreFormatError(
                    f"{loc.url} exists and is not a saliency store; refusing to write into it"
                )
        elif loc.list_dir(""):
            raise StoreFormatError(
                f"{loc.url} is not empty and is not a saliency store; refusing to write into it"
            )
        root = zarr.create_group(
            loc.zstore, attributes={"format": FORMAT, "format_version": FORMAT_VERSION}
        )
        return cls(loc, root)

    @staticmethod
    def _has_root(loc: _Location) -> bool:
        try:
            return loc.exists("zarr.json")
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise StoreNotFoundError(f"cannot reach {loc.url}: {e}") from None

    @classmethod
    def _open_existing(cls, loc: _Location) -> SaliencyStore:
        mode = "r" if loc.read_only else "r+"
        root = _wrap_meta(
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
        return st.split(split)._attach(name, shards)

    def _require_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"cannot {what}: store {self.url} was opened read-only")

    def splits(self) -> list[str]:
        """Names of the splits, sorted."""
        return [n for n in self._loc.list_dir("") if self._loc.exists(f"{n}/zarr.json")]

    def split(self, name: str) -> Split:
        """The split ``name``; MapNotFoundError (listing the available splits) if absent."""
        if not _plain(name) or not self._loc.exists(f"{name}/zarr.json"):
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
        self._require_writable(f"create split {name!r}")
        _check_split_name(name)
        labels, ids_list, attrs = _split_attrs(
            labels, ids, fingerprint, image_shape, num_classes, class_names, dataset, chunk_size
        )
        if self._loc.exists(f"{name}/zarr.json"):
            sp = Split(self, name, allow_unready=True)
            if (
                sp.n != attrs["n"]
                or sp.fingerprint != fingerprint
                or sp.ids_sha256 != attrs["ids_sha256"]
            ):
                raise MismatchError(
                    f"split {name!r} of {self.url} holds other data: fingerprint "
                    f"{sp.fingerprint} (n={sp.n}) vs the given {fingerprint} (n={attrs['n']})"
                )
            if sp.image_shape != tuple(attrs["image_shape"]) or sp.num_classes != num_classes:
                raise MismatchError(
                    f"split {name!r} has image_shape {sp.image_shape} and {sp.num_classes} classes, "
                    f"given {tuple(attrs['image_shape'])} and {num_classes}"
                )
            if sp.ready and (not with_images or sp._has_images_array()):
                return sp
            group = sp._group
        else:
            group = self._root.create_group(name, attributes={**attrs, "ready": False})
        if not group.attrs.get("ready", False):
            _create_split_arrays(group, labels, ids_list, attrs["chunk_size"])
        if with_images and "images" not in _array_names(self._loc, name):
            c, h, w = attrs["image_shape"]
            group.create_array(
                "images",
                shape=(attrs["n"], c, h, w),
                dtype="uint8",
                chunks=(attrs["chunk_size"], c, h, w),
                compressors=_compressors(),
                fill_value=0,
                overwrite=True,
            )
            group.attrs.update({"images_complete": False})
        group.attrs.update({"ready": True})
        return Split(self, name)


def _compressors() -> list:
    # crc32c after zstd: the checksum covers the stored (compressed) bytes.
    return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]


def _array_names(loc: _Location, prefix: str) -> set[str]:
    return {n for n in loc.list_dir(prefix) if loc.exists(f"{prefix}/{n}/zarr.json")}


def _split_attrs(
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
        "dataset": _jsonable(dict(dataset or {}), "dataset description"),
    }
    return labels, ids_list, attrs


def _create_split_arrays(
    group: zarr.Group, labels: np.ndarray, ids: list[str], chunk_size: int
) -> None:
    n = labels.shape[0]
    lab = group.create_array(
        "labels",
        shape=(n,),
        dtype="int64",
        chunks=(min(n, 1 << 20),),
        compressors=_compressors(),
        fill_value=0,
        overwrite=True,
    )
    lab[:] = labels
    ida = group.create_array(
        "ids",
        shape=(n,),
        dtype=str,
        chunks=(min(n, 1 << 16),),
        compressors=_compressors(),
        overwrite=True,
    )
    ida[:] = np.array(ids, dtype=object)
    if "maps" not in group:
        group.create_group("maps")


def _check_range(start: int, stop: int, n: int, what: str) -> tuple[int, int]:
    if isinstance(start, (bool, np.bool_)) or isinstance(stop, (bool, np.bool_)):
        raise SatError(f"range bounds must be integers, got [{start!r}, {stop!r})")
    try:
        s, e = int(start), int(stop)
    except (TypeError, ValueError):
        raise SatError(f"range bounds must be integers, got [{start!r}, {stop!r})") from None
    if not 0 <= s <= e <= n:
        raise SatError(f"range [{s}, {e}) is outside {what} of {n} samples")
    return s, e


def _check_indices(idx: Sequence[int], n: int, what: str) -> np.ndarray:
    a = np.asarray(idx)
    if a.ndim != 1:
        raise SatError(f"indices must be a 1-D sequence, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise SatError(f"indices must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64)
    bad = (a < 0) | (a >= n)
    if bad.any():
        raise SatError(f"index {int(a[np.flatnonzero(bad)[0]])} is outside {what} of {n} samples")
    return a


# ---- splits --------------------------------------------------------------------------------
class Split:
    """One dataset split of a store: labels, ids, optional images and named maps.

    Attributes: ``name``, ``n``, ``fingerprint``, ``ids_sha256``, ``image_shape`` (C, H, W),
    ``num_classes``, ``class_names`` (list or None), ``dataset`` (dict), ``chunk_size``.
    """

    def __init__(self, store: SaliencyStore, name: str, allow_unready: bool = False) -> None:
        self.store = store
        self.name = name
        self._loc = store._loc
        what = f"split {name!r} of {store.url}"
        self._group = _wrap_meta(what, lambda: store._root[name])
        if not isinstance(self._group, zarr.Group):
            raise StoreFormatError(f"{what} is an array, not a group")
        a = self._group.attrs.asdict()
        self.n = _req(a, "n", what, int)
        self.fingerprint = _req(a, "fingerprint", what, str)
        self.ids_sha256 = _req(a, "ids_sha256", what, str)
        self.image_shape = tuple(_req(a, "image_shape", what, list))
        self.num_classes = _req(a, "num_classes", what, int)
        self.chunk_size = _req(a, "chunk_size", what, int)
        self.class_names = a.get("class_names")
        self.dataset = a.get("dataset") or {}
        self.ready = bool(a.get("ready", True))
        self._images_complete = bool(a.get("images_complete", False))
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

    def _array(self, name: str) -> zarr.Array:
        return _wrap_meta(f"{name} of {self._what()}", lambda: self._group[name])

    def _read(self, arr_name: str, fn):
        try:
            return fn()
        except SatError:
            raise
        except _DECODE_ERRORS as e:
            raise CorruptChunkError(f"{arr_name} of {self._what()} failed to decode: {e}") from None

    def labels(self) -> np.ndarray:
        """int64 (N,) class indices."""
        arr = self._array("labels")
        return self._read("labels", lambda: np.asarray(arr[:], dtype=np.int64))

    def ids(self) -> list[str]:
        """The N sample ids, as strings."""
        arr = self._array("ids")
        return self._read("ids", lambda: [str(x) for x in arr[:].tolist()])

    # ---- images ----
    def _has_images_array(self) -> bool:
        return self._loc.exists(f"{self.name}/images/zarr.json")  # no listing: works over HTTP

    def images_complete(self) -> bool:
        """True once :meth:`mark_images_complete` ran (re-read from the store)."""
        if not self._images_complete:
            a = _wrap_meta(self._what(), lambda: self.store._root[self.name]).attrs.asdict()
            self._images_complete = bool(a.get("images_complete", False))
        return self._images_complete and self._has_images_array()

    def has_images(self) -> bool:
        """True if the split holds a completely written ``images`` array."""
        return self.images_complete()

    def mark_images_complete(self) -> None:
        """Record that every chunk of ``images`` was written (call after the last :meth:`write_images`)."""
        self.store._require_writable("mark images complete")
        if not self._has_images_array():
            raise SatError(f"{self._what()} has no images array (create it with with_images=True)")
        self._group.attrs.update({"images_complete": True})
        self._images_complete = True

    def write_images(self, start: int, images: np.ndarray) -> None:
        """Write uint8 (B, C, H, W) images at sample ``start`` (a multiple of ``chunk_size``).

        ``B`` must cover whole chunks (or end at N), so every chunk is written in one piece.
        """
        self.store._require_writable("write images")
        if not self._has_images_array():
            raise SatError(f"{self._what()} has no images array (create it with with_images=True)")
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise SatError(f"images must be uint8, got dtype {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise SatError(
                f"images must be (B, {', '.join(map(str, self.image_shape))}), got {images.shape}"
            )
        s, e = _check_range(start, int(start) + images.shape[0], self.n, self._what())
        if s % self.chunk_size or (e % self.chunk_size and e != self.n) or e == s:
            raise SatError(
                f"image writes must cover whole chunks of {self.chunk_size}: got [{s}, {e}) of {self.n}"
            )
        self._array("images")[s:e] = images

    def _images_for_read(self) -> zarr.Array:
        if not self._has_images_array():
            raise SatError(f"{self._what()} holds no images")
        if not self.images_complete():
            raise IncompleteMapError(f"the images of {self._what()} were not completely written")
        return self._array("images")

    def read_images(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, C, H, W)."""
        arr = self._images_for_read()
        s, e = _check_range(start, stop, self.n, self._what())
        return self._read("images", lambda: arr[s:e])

    def read_images_indices(self, idx: Sequence[int]) -> np.ndarray:
        """uint8 (len(idx), C, H, W), in the order given (repeats allowed)."""
        arr = self._images_for_read()
        a = _check_indices(idx, self.n, self._what())
        if a.size == 0:
            return np.zeros((0, *self.image_shape), dtype=np.uint8)
        u, inv = np.unique(a, return_inverse=True)
        return self._read("images", lambda: arr.get_orthogonal_selection((u,)))[inv]

    # ---- maps ----
    def _map_key(self, name: str) -> str:
        return f"{self.name}/maps/{name}"

    def maps(self) -> list[str]:
        """Names of the maps in this split (complete or not), sorted."""
        prefix = f"{self.name}/maps"
        return [
            m for m in self._loc.list_dir(prefix) if self._loc.exists(f"{prefix}/{m}/zarr.json")
        ]

    def _require_map(self, name: str) -> str:
        if not _plain(name) or not self._loc.exists(f"{self._map_key(name)}/zarr.json"):
            raise MapNotFoundError(
                f"no map {name!r} in {self._what()}; available: {', '.join(self.maps()) or 'none'}"
            )
        return name

    def _map_group(self, name: str) -> zarr.Group:
        g = _wrap_meta(f"map {name!r} of {self._what()}", lambda: self._group[f"maps/{name}"])
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
        self.store._require_writable(f"create map {name!r}")
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
        key = self._map_key(name)
        lock = _WriterLock.acquire(self._loc, key, f"map {name!r} of {self._what()}", force_unlock)
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
                group = self._map_group(name)
                have = group.attrs.asdict()
                self._check_resume(name, have, want, chunk_size, shard_chunks)
                self._loc.remove_partial_files(key)  # left by a writer killed mid-write
                if not {"data", "done"} <= _array_names(self._loc, key):
                    _create_map_arrays(group, have)  # a creation killed before its arrays
                return MapWriter(self, name, lock=lock)
            if self._loc.exists(f"{key}/zarr.json"):
                # Arrays go first: a crash then leaves old attributes with no data, never new
                # provenance over old done flags.
                for arr in ("data", "done"):
                    self._loc.delete_dir(f"{key}/{arr}")
                group = self._map_group(name)
                group.attrs.put(want)
            else:
                # Not overwrite=True: that would delete the directory holding our lock file.
                group = zarr.create_group(self._loc.zstore, path=key, attributes=want)
            _create_map_arrays(group, want)
            return MapWriter(self, name, lock=lock)
        except BaseException:
            lock.release()
            raise

    def _check_resume(self, name: str, have: dict, want: dict, chunk_size, shard_chunks) -> None:
        hint = "; pass overwrite=True to replace it or choose another name"
        diff = _prov_diff(have.get("provenance") or {}, want["provenance"])
        if diff:
            raise MismatchError(
                f"map {name!r} of {self._what()} exists with other provenance ({'; '.join(diff)}){hint}"
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

    def open_map_writer(self, name: str, *, force_unlock: bool = False) -> MapWriter:
        """Resume writing an existing map (takes the writer lock; keeps its done chunks)."""
        self.store._require_writable(f"write map {name!r}")
        self._require_map(name)
        lock = _WriterLock.acquire(
            self._loc, self._map_key(name), f"map {name!r} of {self._what()}", force_unlock
        )
        try:
            return MapWriter(self, name, lock=lock)
        except BaseException:
            lock.release()
            raise

    def _attach(self, name: str, shards: Sequence[int] | None) -> MapWriter:
        self._require_map(name)
        if _WriterLock.read(self._loc, self._map_key(name)) is None:
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
        """
        self._require_map(name)
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
        if not allow_partial:
            done = r.done_chunks()
            if not (r.complete and done.all()):
                missing = np.flatnonzero(~done)
                if missing.size == 0:
                    raise IncompleteMapError(
                        f"{what} was never finalized (every chunk is written; run finalize())"
                    )
                first = ", ".join(str(int(k)) for k in missing[:5])
                raise IncompleteMapError(
                    f"{what} is incomplete: {missing.size} of {r.n_chunks} chunks missing "
                    f"(first: {first}); finish the precompute or pass allow_partial"
                )
        return r

    def inspect_map(self, name: str) -> MapReader:
        """A reader without the completeness and data checks of :meth:`open_map` (for inspection tools)."""
        self._require_map(name)
        return MapReader(self, name)

    def delete_map(self, name: str, *, force_unlock: bool = False) -> None:
        """Delete map ``name`` (takes its writer lock first, so a live writer blocks it)."""
        self.store._require_writable(f"delete map {name!r}")
        self._require_map(name)
        key = self._map_key(name)
        lock = _WriterLock.acquire(self._loc, key, f"map {name!r} of {self._what()}", force_unlock)
        lock.forget()  # the lock file goes with the directory
        # Metadata first: an interrupted delete leaves no half map that readers would list.
        self._loc.delete(f"{key}/zarr.json")
        self._loc.delete_dir(key)


def _create_map_arrays(group: zarr.Group, attrs: Mapping[str, Any]) -> None:
    n, cs, sc, nb = attrs["n"], attrs["chunk_size"], attrs["shard_chunks"], attrs["packed_nbytes"]
    inner = ShardingCodec(
        chunk_shape=(cs, nb),
        codecs=[BytesCodec(), *_compressors()],
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


# ---- the writer lock -----------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


class _WriterLock:
    """An exclusive writer lock for one map: a JSON file ``{pid, host, token, started}``.

    Local stores create it atomically (hard link of a complete temp file, falling back to
    ``O_CREAT | O_EXCL``). A lock whose process is dead on this host is stale and taken over;
    a lock from another host is only taken with ``force_unlock``. On fsspec stores the lock
    is a best-effort check-then-write of the same key (object stores have no atomic create).
    """

    def __init__(self, loc: _Location, prefix: str, info: dict[str, Any]) -> None:
        self._loc, self._prefix, self.info = loc, prefix, info
        self._released = False
        self._finalizer = weakref.finalize(
            self, _WriterLock._release_static, loc, prefix, info["token"], info["pid"]
        )

    @property
    def key(self) -> str:
        return f"{self._prefix}/{LOCK_NAME}"

    @staticmethod
    def read(loc: _Location, prefix: str) -> dict[str, Any] | None:
        """The lock's content, ``{}`` if unreadable, or None if there is no lock."""
        key = f"{prefix}/{LOCK_NAME}"
        try:
            if loc.local_root is not None:
                raw = (loc.local_root / key).read_bytes()
            else:
                raw = loc.get(key)
                if raw is None:
                    return None
        except FileNotFoundError:
            return None
        try:
            d = json.loads(raw.decode("utf-8"))
            return d if isinstance(d, dict) else {}
        except (UnicodeDecodeError, ValueError):
            return {}

    @classmethod
    def acquire(cls, loc: _Location, prefix: str, what: str, force_unlock: bool) -> _WriterLock:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": uuid.uuid4().hex,
            "started": _now(),
        }
        data = json.dumps(info).encode("utf-8")
        for _ in range(5):
            holder = cls.read(loc, prefix)
            if holder is not None:
                cls._refuse_or_break(loc, prefix, holder, what, force_unlock)
                continue
            if cls._create(loc, prefix, data):
                return cls(loc, prefix, info)
        raise WriterLockedError(
            f"could not take the writer lock of {what} (another writer races for it)"
        )

    @staticmethod
    def _create(loc: _Location, prefix: str, data: bytes) -> bool:
        if loc.local_root is None:
            loc.set(f"{prefix}/{LOCK_NAME}", data)
            return True
        d = loc.local_root / prefix
        d.mkdir(parents=True, exist_ok=True)
        path = d / LOCK_NAME
        tmp = d / f"{LOCK_NAME}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this filesystem
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _refuse_or_break(loc: _Location, prefix: str, holder: dict, what: str, force: bool) -> None:
        pid, host, started = holder.get("pid"), holder.get("host"), holder.get("started")
        here = socket.gethostname()
        if not holder:
            state = "unreadable"
        elif host == here and isinstance(pid, int):
            state = "alive" if _pid_alive(pid) else "dead"
        else:
            state = "elsewhere"
        if state == "alive":
            raise WriterLockedError(
                f"{what} is being written by pid {pid} on {host} since {started}"
            )
        if state != "dead" and not force:
            desc = (
                f"pid {pid} on host {host} since {started}" if holder else "an unreadable lock file"
            )
            raise WriterLockedError(
                f"{what} is locked by {desc}; if that writer is gone, pass force_unlock=True"
            )
        _WriterLock._break(loc, prefix, holder)

    @staticmethod
    def _break(loc: _Location, prefix: str, holder: dict) -> None:
        """Remove a stale lock, without removing a fresh one that replaced it meanwhile."""
        if loc.local_root is None:
            loc.delete(f"{prefix}/{LOCK_NAME}")
            return
        path = loc.local_root / prefix / LOCK_NAME
        aside = path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            try:
                moved = json.loads(aside.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                moved = {}
            if moved != holder:  # we moved somebody's fresh lock: put it back
                try:
                    os.link(aside, path)
                except OSError:
                    pass
        finally:
            aside.unlink(missing_ok=True)

    @staticmethod
    def _release_static(loc: _Location, prefix: str, token: str, pid: int) -> None:
        if os.getpid() != pid:
            return  # a forked child exiting must not release its parent's lock
        try:
            holder = _WriterLock.read(loc, prefix)
            if holder and holder.get("token") == token:
                if loc.local_root is not None:
                    (loc.local_root / prefix / LOCK_NAME).unlink(missing_ok=True)
                else:
                    loc.delete(f"{prefix}/{LOCK_NAME}")
        except OSError:
            pass  # the directory was removed, or the store is unreachable at exit

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._finalizer()

    def forget(self) -> None:
        """Drop the lock without touching storage (its directory is about to be deleted)."""
        self._released = True
        self._finalizer.detach()


# ---- map handles ---------------------------------------------------------------------------
class _MapBase:
    """Attributes shared by readers and writers, read from the map group's metadata."""

    def __init__(self, split: Split, name: str) -> None:
        self.split = split
        self.name = name
        self._what = f"map {name!r} of split {split.name!r} in {split.store.url}"
        self._group = split._map_group(name)
        a = self._group.attrs.asdict()
        w = self._what
        self.encoding = _req(a, "encoding", w, str)
        if self.encoding not in ENCODINGS:
            raise StoreFormatError(f"{w} has an unknown encoding {self.encoding!r}")
        self.channels = _req(a, "channels", w, int)
        self.shape = tuple(_req(a, "shape", w, list))
        self.n = _req(a, "n", w, int)
        self.chunk_size = _req(a, "chunk_size", w, int)
        self.shard_chunks = _req(a, "shard_chunks", w, int)
        self.fingerprint = _req(a, "fingerprint", w, str)
        self.ids_sha256 = _req(a, "ids_sha256", w, str)
        self.provenance: dict[str, Any] = dict(_req(a, "provenance", w, dict))
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
        self._data = _wrap_meta(f"data of {w}", lambda: self._group["data"])
        self._done = _wrap_meta(f"done of {w}", lambda: self._group["done"])
        if tuple(self._data.shape) != (self.n, self.packed_nbytes) or self._data.dtype != np.uint8:
            raise StoreFormatError(
                f"{w}: data is {self._data.dtype} {tuple(self._data.shape)}, attributes say "
                f"uint8 {(self.n, self.packed_nbytes)}"
            )
        if tuple(self._done.shape) != (self.n_chunks,):
            raise StoreFormatError(
                f"{w}: done has shape {tuple(self._done.shape)}, expected ({self.n_chunks},)"
            )

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
        except _DECODE_ERRORS:
            pass
        flags = np.zeros(self.n_chunks, dtype=bool)
        for c in range(0, self.n_chunks, self.shard_chunks):
            try:
                flags[c : c + self.shard_chunks] = self._done[c : c + self.shard_chunks] != 0
            except _DECODE_ERRORS as e:
                raise CorruptChunkError(
                    f"{self._what}: done flags of chunks {c}..{min(c + self.shard_chunks, self.n_chunks) - 1} "
                    f"failed to decode: {e}"
                ) from None
        return flags

    def _read_packed(self, s: int, e: int) -> np.ndarray:
        try:
            return np.asarray(self._data[s:e])
        except _DECODE_ERRORS:
            pass
        # Locate the chunk that fails, so the message names it.
        out = np.empty((e - s, self.packed_nbytes), dtype=np.uint8)
        for k in range(s // self.chunk_size, math.ceil(e / self.chunk_size)):
            cs, ce = max(s, k * self.chunk_size), min(e, (k + 1) * self.chunk_size)
            try:
                out[cs - s : ce - s] = self._data[cs:ce]
            except _DECODE_ERRORS as err:
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


class MapReader(_MapBase):
    """Reads one map. Get it from :meth:`Split.open_map`.

    Attributes: ``name``, ``encoding``, ``channels``, ``shape`` (C|1, H, W), ``n``,
    ``chunk_size``, ``n_chunks``, ``shard_chunks``, ``n_shards``, ``packed_nbytes`` (bytes per
    packed sample), ``provenance`` (dict), ``complete``, ``fingerprint``, ``ids_sha256``.

    With ``allow_partial``, chunks that were never written read as packed zeros (binary: all
    -1, ternary: all 0); :meth:`done_chunks` says which chunks are real.
    """

    def read_packed(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, packed_nbytes): packed rows, for unpacking on the training device."""
        s, e = _check_range(start, stop, self.n, self._what)
        return self._read_packed(s, e)

    def read(self, start: int, stop: int) -> np.ndarray:
        """int8 (stop - start, C|1, H, W), values in {-1, +1} or {-1, 0, +1}."""
        s, e = _check_range(start, stop, self.n, self._what)
        return self._unpack(self._read_packed(s, e), s)

    def read_packed_indices(self, idx: Sequence[int]) -> np.ndarray:
        """uint8 (len(idx), packed_nbytes) in the given order; each chunk is read once."""
        a = _check_indices(idx, self.n, self._what)
        if a.size == 0:
            return np.zeros((0, self.packed_nbytes), dtype=np.uint8)
        u, inv = np.unique(a, return_inverse=True)
        try:
            rows = np.asarray(self._data.get_orthogonal_selection((u, slice(None))))
        except _DECODE_ERRORS:
            rows = np.empty((u.size, self.packed_nbytes), dtype=np.uint8)
            chunks = u // self.chunk_size
            for k in np.unique(chunks):
                sel = chunks == k
                s, e = int(u[sel][0]), int(u[sel][-1]) + 1
                rows[sel] = self._read_packed(s, e)[u[sel] - s]
        return rows[inv]

    def read_indices(self, idx: Sequence[int]) -> np.ndarray:
        """int8 (len(idx), C|1, H, W) in the given order (unsorted and repeated indices allowed)."""
        a = _check_indices(idx, self.n, self._what)
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
        return self.split._loc.du(self.split._map_key(self.name))

    def codecs(self) -> list[dict[str, Any]]:
        """The data array's codec chain as stored in its metadata."""
        meta = self._data.metadata.to_dict()
        return json.loads(json.dumps(meta.get("codecs", []), default=str))


class MapWriter(_MapBase):
    """Writes the chunks of one map. Get it from :meth:`Split.create_map` / :meth:`Split.open_map_writer`.

    A context manager: leaving the ``with`` block (or :meth:`close`) releases the writer lock.
    Every write replaces whole chunks and sets their ``done`` flags afterwards, so a killed
    writer leaves each chunk either old or new and never marked done before its data exists.
    """

    def __init__(
        self, split: Split, name: str, lock: _WriterLock | None, shards: Sequence[int] | None = None
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
        self.split.store._require_writable(what)

    def pending_chunks(self) -> list[int]:
        """Chunks not written yet, ascending."""
        return [int(k) for k in np.flatnonzero(~self.done_chunks())]

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
        done = self._done_range(k0, k1)
        rewrite = not done.all()
        for j in np.flatnonzero(done):
            k = k0 + int(j)
            cs, ce = k * self.chunk_size, min((k + 1) * self.chunk_size, self.n)
            try:
                stored = np.asarray(self._data[cs:ce])
            except _DECODE_ERRORS:
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

    def _done_range(self, k0: int, k1: int) -> np.ndarray:
        try:
            return np.asarray(self._done[k0:k1]) != 0
        except _DECODE_ERRORS:
            return self.done_chunks()[k0:k1]  # raises CorruptChunkError naming the flags

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
        complete = bool(self.done_chunks().all())
        if complete != self.complete:
            self._group.attrs.update({"complete": complete})
            self.complete = complete
        return complete
