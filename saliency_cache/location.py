"""Where a store lives: one small interface, a local and an fsspec implementation.

:class:`Location` is the interface the store layer uses for raw file operations (exists,
list, get/set/delete, sizes, the writer lock's atomic create); everything else goes through
the zarr store it wraps (:attr:`Location.zstore`). :class:`LocalLocation` works on a
directory with plain file-system calls (atomic creates, staged writes); :class:`FsspecLocation`
works on any fsspec URL (``s3://``, ``https://``, ``memory://``, ...), where HTTP is
read-only and a static host without directory listings is listed from the store's manifest.
:func:`open_location` picks the implementation for a URL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import zarr

from saliency_cache.errors import SatError, StoreFormatError

# What zarr's local store leaves behind when a write is killed: "<name>.<uuid hex>.partial".
PARTIAL_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")
# Written by ``sat cache copy`` next to the root zarr.json: every key of the copy with its size
# and sha256, so hosts without directory listings (static HTTP) can still list splits and maps.
MANIFEST_NAME = ".sat-manifest.json"
MANIFEST_FORMAT = "sat-saliency-cache-manifest"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

RootState = Literal["absent", "file", "empty", "nonempty"]


def sync(coro):
    """Run one of zarr's coroutines to completion on zarr's event loop."""
    from zarr.core.sync import sync as _zarr_sync

    return _zarr_sync(coro)


async def _collect(it) -> list:
    return [x async for x in it]


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


def open_location(
    url: str | os.PathLike, read_only: bool, storage_options: dict | None = None
) -> Location:
    """A :class:`FsspecLocation` for URLs (``scheme://...``), a :class:`LocalLocation` otherwise."""
    url = os.fspath(url)
    cls = FsspecLocation if _URL_RE.match(url) else LocalLocation
    return cls(url, read_only, storage_options)


class Location(ABC):
    """A zarr store plus the raw file operations the store layer needs. Keys are ``/``-paths
    relative to the store's root (``"train/maps/m/zarr.json"``)."""

    remote: bool = False  # reached over a network (messages and defaults differ)
    http: bool = False  # served over HTTP(S): read-only, read by byte ranges

    def __init__(self, url: str, read_only: bool, storage_options: dict | None) -> None:
        self.url = url
        self.read_only = read_only
        self.storage_options = dict(storage_options or {})
        self._zstore = None

    @property
    def zstore(self) -> zarr.abc.store.Store:
        """The zarr store over this location (created on first use)."""
        if self._zstore is None:
            self._zstore = self._make_zstore()
        return self._zstore

    @abstractmethod
    def _make_zstore(self) -> zarr.abc.store.Store: ...

    # ---- reading ----
    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if the file ``key`` exists."""

    @abstractmethod
    def list_dir(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (files and sub-directories), sorted."""

    @abstractmethod
    def list_keys(self) -> list[str]:
        """Every file key of the location, sorted (raises SatError if it cannot be listed)."""

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys of ``keys`` that are not there, in the order given."""
        return [k for k in keys if not self.exists(k)]

    def get(self, key: str) -> bytes | None:
        """The bytes of file ``key``, or None if it does not exist."""
        from zarr.core.buffer import default_buffer_prototype

        buf = sync(self.zstore.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def get_suffix(self, key: str, n: int) -> bytes | None:
        """The last ``n`` bytes of file ``key`` (all of it if shorter), or None if absent."""
        from zarr.abc.store import SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype

        buf = sync(
            self.zstore.get(
                key, prototype=default_buffer_prototype(), byte_range=SuffixByteRequest(n)
            )
        )
        return None if buf is None else buf.to_bytes()

    @abstractmethod
    def du(self, prefix: str) -> int:
        """Bytes on disk under ``prefix`` (the sum of file sizes)."""

    @abstractmethod
    def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        """``{key: size in bytes or None if absent}``, read fresh (no cached listings)."""

    @abstractmethod
    def root_state(self) -> RootState:
        """What is at the root: nothing, a plain file, an empty or a non-empty directory."""

    def manifest(self) -> dict[str, dict[str, Any]] | None:
        """``{key: {"size", "sha256"}}`` from a published copy's manifest, or None."""
        return None

    def check_byte_ranges(self) -> None:
        """Refuse a host that cannot serve byte ranges (a no-op where reads are ranged natively)."""
        return None

    def overlaps(self, other: Location) -> bool:
        """True if one location lies inside the other (or they are the same)."""
        a, b = self.url.rstrip("/"), other.url.rstrip("/")
        return a == b or b.startswith(a + "/") or a.startswith(b + "/")

    # ---- writing ----
    def set(self, key: str, data: bytes) -> None:
        """Write file ``key`` (replacing it)."""
        from zarr.core.buffer import default_buffer_prototype

        sync(self.zstore.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def delete(self, key: str) -> None:
        """Delete file ``key`` (no error if it is absent)."""
        sync(self.zstore.delete(key))

    @abstractmethod
    def delete_dir(self, prefix: str) -> None:
        """Delete everything under ``prefix``."""

    def remove_partial_files(self, prefix: str) -> int:
        """Delete the temporary files a killed write left under ``prefix``; only for a caller
        holding the writer lock. Returns how many were removed (0 where writes are not staged)."""
        return 0

    # ---- the writer lock's primitives ----
    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create file ``key`` holding ``data`` unless it exists; False if it existed.

        Atomic where the location allows it; on object stores a best-effort write.
        """

    @abstractmethod
    def remove_if(self, key: str, still_same: Callable[[bytes], bool]) -> None:
        """Delete file ``key`` if ``still_same(its bytes)``; where possible without deleting a
        file that replaced it meanwhile."""


class LocalLocation(Location):
    """A store in a local directory (``root``, absolute, so a change of cwd changes nothing)."""

    def __init__(self, url: str, read_only: bool, storage_options: dict | None) -> None:
        super().__init__(url, read_only, storage_options)
        self.root = Path(url).absolute()

    def _make_zstore(self):
        return zarr.storage.LocalStore(self.root, read_only=self.read_only)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list_dir(self, prefix: str) -> list[str]:
        d = self.root / prefix
        return sorted(os.listdir(d)) if d.is_dir() else []

    def list_keys(self) -> list[str]:
        return sorted(
            Path(dirpath, f).relative_to(self.root).as_posix()
            for dirpath, _dirs, fs in os.walk(self.root)
            for f in fs
        )

    def get(self, key: str) -> bytes | None:
        # Plain file reads: the writer lock is read (and released) at interpreter exit too,
        # when zarr's event loop may be gone.
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def du(self, prefix: str) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.root / prefix):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except FileNotFoundError:  # a temp file replaced meanwhile
                    pass
        return total

    def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for key in keys:
            p = self.root / key
            out[key] = p.stat().st_size if p.is_file() else None
        return out

    def root_state(self) -> RootState:
        if not self.root.exists():
            return "absent"
        if not self.root.is_dir():
            return "file"
        return "nonempty" if any(self.root.iterdir()) else "empty"

    def overlaps(self, other: Location) -> bool:
        if not isinstance(other, LocalLocation):
            return super().overlaps(other)
        a, b = self.root.resolve(), other.root.resolve()
        return a == b or a in b.parents or b in a.parents

    def delete_dir(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)

    def remove_partial_files(self, prefix: str) -> int:
        # zarr's local store writes "<name>.<uuid hex>.partial" and renames it into place.
        if not (self.root / prefix).is_dir():
            return 0
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root / prefix):
            for f in files:
                if PARTIAL_RE.search(f):
                    Path(dirpath, f).unlink(missing_ok=True)
                    removed += 1
        return removed

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # A hard link of a complete temp file: the lock never exists half-written.
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
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

    def remove_if(self, key: str, still_same: Callable[[bytes], bool]) -> None:
        # Move it aside first, so a fresh file that replaced it meanwhile can be put back.
        path = self.root / key
        aside = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            if not still_same(aside.read_bytes()):
                try:
                    os.link(aside, path)
                except OSError:
                    pass
        finally:
            aside.unlink(missing_ok=True)


class FsspecLocation(Location):
    """A store at an fsspec URL. Writes are not staged and the lock is best-effort (object
    stores have no atomic create); HTTP(S) locations are read-only."""

    remote = True

    def __init__(self, url: str, read_only: bool, storage_options: dict | None) -> None:
        super().__init__(url, read_only, storage_options)
        self.http = url.lower().startswith(("http://", "https://"))
        self._fs = None
        self._manifest: dict[str, dict[str, Any]] | None | bool = False  # False: not read yet

    def _make_zstore(self):
        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=self.read_only
        )

    def _filesystem(self):
        if self._fs is None:
            from fsspec.core import url_to_fs

            self._fs, self._fs_root = url_to_fs(self.url, **self.storage_options)
        return self._fs, self._fs_root.rstrip("/")

    def exists(self, key: str) -> bool:
        return bool(sync(self.zstore.exists(key)))

    def missing(self, keys: Iterable[str]) -> list[str]:
        # Asked of the host itself, never of the manifest: a file lost after publishing
        # must not pass because the manifest still lists it.
        keys = list(keys)

        async def _all():
            import asyncio

            return await asyncio.gather(*(self.zstore.exists(k) for k in keys))

        # One concurrent round of existence checks (HEAD requests), not one after another.
        found = sync(_all()) if keys else []
        return [k for k, ok in zip(keys, found, strict=True) if not ok]

    def list_dir(self, prefix: str) -> list[str]:
        try:
            # HTTP listings name sub-directories with a trailing "/".
            names = {n.rstrip("/") for n in sync(_collect(self.zstore.list_dir(prefix)))}
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

    def list_keys(self) -> list[str]:
        try:
            keys = sync(_collect(self.zstore.list_prefix("")))
        except FileNotFoundError:
            keys = []
        except Exception:  # e.g. HTTP 403 on directories: the manifest may still list the files
            if self.manifest() is None:
                raise
            keys = []
        keys = [k for k in keys if k and not k.endswith("/")]
        if "zarr.json" not in keys:
            files = self.manifest()
            if files is None:
                raise SatError(
                    f"cannot list the files of {self.url}: the host gives no directory listings "
                    f"and the store has no {MANIFEST_NAME} (copy it from its origin instead)"
                )
            keys = list(files)
        return sorted(keys)

    def manifest(self) -> dict[str, dict[str, Any]] | None:
        if self._manifest is False:
            self._manifest = None
            if self.read_only:
                raw = self.get(MANIFEST_NAME)
                if raw is not None:
                    self._manifest = parse_manifest(raw, self.url)
        return self._manifest

    def du(self, prefix: str) -> int:
        files = self.manifest()
        if files is not None:
            head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
            return sum(int(v["size"]) for k, v in files.items() if k.startswith(head))
        fs, root = self._filesystem()
        path = f"{root}/{prefix}"
        try:
            return int(fs.du(path, total=True))
        except TypeError:  # HTTP listings carry no sizes: ask for each file's
            return sum(int(fs.size(p) or 0) for p in fs.find(path))

    def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        fs, root = self._filesystem()
        fs.invalidate_cache()
        listed = fs.find(root, detail=True)
        by_key = {p[len(root) + 1 :]: info.get("size") for p, info in listed.items()}
        return {k: by_key.get(k) for k in keys}

    def root_state(self) -> RootState:
        return "nonempty" if self.list_dir("") else "empty"

    def check_byte_ranges(self) -> None:
        """Refuse an HTTP server that ignores Range requests (shards are read by byte range)."""
        if not self.http:
            return
        from zarr.abc.store import RangeByteRequest
        from zarr.core.buffer import default_buffer_prototype

        buf = sync(
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

    def delete_dir(self, prefix: str) -> None:
        sync(self.zstore.delete_dir(prefix))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        self.set(key, data)  # check-then-write: the caller checked that there was no lock
        return True

    def remove_if(self, key: str, still_same: Callable[[bytes], bool]) -> None:
        raw = self.get(key)
        if raw is not None and still_same(raw):
            self.delete(key)
