"""Copy a saliency store between locations: local paths and fsspec URLs (HTTP only as a source).

This is how a team publishes a store for others: it copies the store's files byte for byte
(no re-encoding; every zarr file keeps its bytes), writes a manifest of every copied key with
its size and sha256 (``.sat-manifest.json``, which lets hosts without directory listings,
such as static HTTP servers, list splits and maps), writes the root ``zarr.json`` last (so an
interrupted copy is not a store), and runs :func:`saliency_cache.verify.verify` on the copy
before reporting success.

Only numpy, zarr and numcodecs (through the store layer) and fsspec are imported: no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from saliency_cache.errors import IncompleteMapError, MapNotFoundError, ReadOnlyError, SatError
from saliency_cache.layout import FORMAT
from saliency_cache.location import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PARTIAL_RE,
    Location,
    open_location,
)
from saliency_cache.lock import LOCK_NAME
from saliency_cache.store import SaliencyStore

_KEEP_PROBLEMS_PARTIAL = ("missing", "incomplete")  # what --allow-partial accepts in the copy


class CopyError(SatError):
    """The copy was written but does not match its source (verification failed)."""


def copy_store(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    src_options: dict | None = None,
    dst_options: dict | None = None,
    overwrite: bool = False,
    splits: Sequence[str] | None = None,
    maps: Sequence[str] | None = None,
    allow_partial: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Copy the store at ``src`` to ``dst`` byte for byte, then verify the copy.

    (Long on purpose: the refusals, the copy and the verification share the state that a
    failure has to undo, the files written so far at ``dst``.)

    Args:
        src: path or fsspec URL of an existing store (``https://`` works when the host lists
            directories or the store carries a manifest).
        dst: path or fsspec URL to copy to; must be empty or absent (HTTP is refused).
        src_options, dst_options: fsspec storage options (credentials, ``endpoint_url``, ...).
        overwrite: replace an existing *saliency store* at ``dst`` (anything else non-empty is
            always refused, so a mistyped path never deletes unrelated files).
        splits: copy only these splits (default: all).
        maps: copy only these maps of the copied splits (default: all). Splits keep their
            labels, ids and images.
        allow_partial: also copy maps (and images) whose writing has not finished; refused
            by default, because readers would refuse them anyway.
        progress: show a progress bar on stderr.

    Returns:
        ``{"src", "dst", "files", "bytes", "splits": {split: [maps]}, "seconds",
        "verified": True, "partial": [problems accepted with allow_partial]}``.

    Raises:
        SatError: bad input (no store at ``src``, unknown split or map, ``dst`` not empty,
            ``dst`` over HTTP or the same place as ``src``); IncompleteMapError for
            unfinished maps; CopyError if the copy fails verification.
    """
    t0 = time.perf_counter()
    src_store = SaliencyStore.open(src, "r", storage_options=src_options)
    src_loc = src_store.location
    dst_loc = open_location(dst, read_only=False, storage_options=dst_options)
    if dst_loc.http:
        raise ReadOnlyError(
            f"cannot copy to {dst_loc.url}: HTTP(S) locations are read-only; copy to a local "
            "path or s3:// and serve that"
        )
    if src_loc.overlaps(dst_loc):
        raise SatError(f"source {src_loc.url} and destination {dst_loc.url} overlap")
    selection = _select(src_store, splits, maps, allow_partial)
    keys = [k for k in src_loc.list_keys() if not _skip(k)]
    if splits or maps:
        keys = [k for k in keys if _wanted(k, selection, whole_splits=not maps)]
    if "zarr.json" not in keys:
        raise SatError(f"found no root zarr.json among the files of {src_loc.url}")
    _prepare_destination(dst_loc, overwrite)

    # Root metadata last: until it exists, the destination is not a store a reader would open.
    order = sorted(k for k in keys if k != "zarr.json")
    files: dict[str, dict[str, Any]] = {}
    total = 0
    bar = _progress_bar(len(keys) + 1, f"copy {src_loc.url} -> {dst_loc.url}", progress)
    try:
        root_bytes = None
        for key in [*order, "zarr.json"]:
            data = src_loc.get(key)
            if data is None:
                raise SatError(f"{src_loc.url}/{key} disappeared while copying")
            if key == "zarr.json":
                root_bytes = data
            else:
                dst_loc.set(key, data)
            files[key] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            total += len(data)
            bar.update(1)
        dst_loc.set(MANIFEST_NAME, manifest_bytes(files))
        dst_loc.set("zarr.json", root_bytes)
        bar.update(1)
    finally:
        bar.close()

    _check_files(dst_loc, files)
    partial = _verify_copy(dst_loc, dst_options, allow_partial)
    return {
        "src": src_loc.url,
        "dst": dst_loc.url,
        "files": len(files),
        "bytes": total,
        "splits": {s: sorted(m) for s, m in selection.items()},
        "seconds": time.perf_counter() - t0,
        "verified": True,
        "partial": partial,
    }


def manifest_bytes(files: dict[str, dict[str, Any]]) -> bytes:
    """The manifest for ``{key: {"size", "sha256"}}`` (no timestamp: equal stores, equal bytes)."""
    doc = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "files": {k: files[k] for k in sorted(files)},
    }
    return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode("utf-8")


# ---- what to copy ---------------------------------------------------------------------------
def _select(
    st: SaliencyStore, splits: Sequence[str] | None, maps: Sequence[str] | None, allow_partial: bool
) -> dict[str, set[str]]:
    """{split: maps to copy}, after refusing unknown names and unfinished maps and images."""
    names = list(dict.fromkeys(splits)) if splits else st.splits()
    if not names:
        raise SatError(f"store {st.url} has no splits to copy")
    want_maps = list(dict.fromkeys(maps)) if maps else None
    out: dict[str, set[str]] = {}
    for name in names:
        sp = st.split(name)  # MapNotFoundError naming the available splits
        have = sp.maps()
        chosen = have if want_maps is None else [m for m in want_maps if m in have]
        if splits and want_maps is not None and len(chosen) < len(want_maps):
            missing = next(m for m in want_maps if m not in have)
            sp.require_map(missing)  # raises, listing the split's maps
        if not allow_partial:
            if sp.has_images_array() and not sp.images_complete():
                raise IncompleteMapError(
                    f"the images of split {name!r} of {st.url} were not completely written; "
                    "finish the precompute or pass --allow-partial"
                )
            for m in chosen:
                sp.open_map(m)  # IncompleteMapError / MismatchError naming the map
        out[name] = set(chosen)
    if want_maps is not None:
        found = set().union(*out.values())
        lost = [m for m in want_maps if m not in found]
        if lost:
            raise MapNotFoundError(
                f"no map {lost[0]!r} in split(s) {', '.join(out)} of {st.url}"
            )
    return out


def _wanted(key: str, selection: dict[str, set[str]], whole_splits: bool) -> bool:
    if key == "zarr.json":
        return True
    parts = key.split("/")
    if parts[0] not in selection:
        return False
    if whole_splits or len(parts) < 3 or parts[1] != "maps" or parts[2] == "zarr.json":
        return True
    return parts[2] in selection[parts[0]]


def _skip(key: str) -> bool:
    """Bookkeeping that must not travel: writer locks, killed writes, the old manifest."""
    base = key.rsplit("/", 1)[-1]
    return (
        key == MANIFEST_NAME
        or base == LOCK_NAME
        or base.startswith(f"{LOCK_NAME}.")
        or bool(PARTIAL_RE.search(base))
    )


# ---- where it goes --------------------------------------------------------------------------
def _prepare_destination(dst: Location, overwrite: bool) -> None:
    """Refuse a non-empty destination; with ``overwrite``, empty one that holds a store."""
    state = dst.root_state()
    if state == "file":
        raise SatError(f"destination {dst.url} is a file")
    empty = state in ("absent", "empty")
    if empty:
        return
    if not overwrite:
        raise SatError(f"destination {dst.url} is not empty; pass --overwrite to replace a store")
    raw = dst.get("zarr.json") if dst.exists("zarr.json") else None
    try:
        is_store = raw is not None and json.loads(raw)["attributes"]["format"] == FORMAT
    except (ValueError, KeyError, TypeError):
        is_store = False
    if not is_store:
        raise SatError(
            f"destination {dst.url} is not empty and is not a saliency store; refusing to "
            "delete it even with --overwrite"
        )
    dst.delete("zarr.json")  # first: an interrupted overwrite leaves no half store behind
    dst.delete_dir("")


def _check_files(dst: Location, files: dict[str, dict[str, Any]]) -> None:
    """Every copied key is at the destination with its size."""
    sizes = dst.sizes(files)
    for key, want in files.items():
        if sizes[key] != want["size"]:
            raise CopyError(
                f"{dst.url}/{key} has {sizes[key]} bytes after the copy, the source has "
                f"{want['size']}"
            )


def _verify_copy(dst: Location, options: dict | None, allow_partial: bool) -> list[str]:
    from saliency_cache.verify import verify

    problems = verify(SaliencyStore.open(dst.url, "r", storage_options=options))
    accepted = [p for p in problems if allow_partial and p.kind in _KEEP_PROBLEMS_PARTIAL]
    bad = [p for p in problems if p not in accepted]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CopyError(f"the copy at {dst.url} failed verification: {bad[0]}{more}")
    return [str(p) for p in accepted]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="file")

