"""Integrity checks of a saliency store: decode every chunk, check completeness and alignment.

``verify`` reads chunk by chunk and catches failures per chunk, so one corrupt chunk (a
crc32c mismatch) is reported by array and chunk index instead of aborting the check. It
only reads, so it works on read-only handles and remote stores. Given a folder of
verification records (:mod:`saliency_cache.verified`), a map's chunks whose bytes were
decoded and found valid before are not decoded again (their crc32c is still checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from saliency_cache.encoding import invalid_bytes
from saliency_cache.errors import MapNotFoundError, SatError
from saliency_cache.layout import DECODE_ERRORS
from saliency_cache.names import ids_digest
from saliency_cache.split import Split
from saliency_cache.store import SaliencyStore
from saliency_cache.verified import KnownChunks


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`verify`.

    ``kind`` is one of: ``metadata`` (missing or malformed attributes/arrays), ``corrupt``
    (a chunk fails its checksum or does not decode), ``invalid`` (decodes but holds bytes no
    valid map packs to, or labels outside the class range), ``missing`` (a map chunk never
    written), ``lost`` (the file of a chunk the store records as written is gone: a map shard
    holding done chunks, the done flags of a complete map, a labels / ids / complete images
    chunk), ``incomplete`` (a map or the images not marked complete), ``mismatch``
    (a map's n / fingerprint / ids do not match its split, or ids do not match ids_sha256).
    """

    split: str | None
    map: str | None
    chunk: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = "/".join(p for p in (self.split, self.map and f"maps/{self.map}") if p) or "store"
        chunk = "" if self.chunk is None else f" chunk {self.chunk}"
        return f"{where}{chunk}: {self.kind}: {self.message}"


def verify(
    store: SaliencyStore,
    split: str | None = None,
    map_name: str | None = None,
    *,
    records: Path | None = None,
) -> list[Problem]:
    """Check a store (or one split, or one map) and return every problem found (empty: clean).

    Args:
        store: an open store (read-only is enough).
        split: only this split (default: all).
        map_name: only this map (and not the split's own arrays). Without ``split``, the map
            is checked in every split that has it.
        records: a folder of verification records (:mod:`saliency_cache.verified`): map
            chunks whose stored bytes pass their crc32c and are listed there as decoded
            before are not decoded again, and the records are updated (where the folder is
            writable). None (the default): decode every chunk.

    Raises:
        MapNotFoundError: ``split`` or ``map_name`` does not exist.
    """
    splits = [split] if split is not None else store.splits()
    problems: list[Problem] = []
    found_map = False
    for name in splits:
        try:
            sp = store.split(name)
        except MapNotFoundError:
            if split is not None:
                raise
            continue
        except SatError as e:
            problems.append(Problem(name, None, None, "metadata", str(e)))
            continue
        if map_name is None:
            problems += _check_split(sp)
            maps = sp.maps()
        elif map_name in sp.maps():
            maps = [map_name]
        else:
            if split is not None:
                sp.require_map(map_name)  # raises, listing the available maps
            continue
        found_map = found_map or bool(maps)
        for m in maps:
            problems += _check_map(sp, m, records)
    if map_name is not None and not found_map:
        raise MapNotFoundError(f"no map {map_name!r} in any split of {store.url}")
    return problems


def _chunks(arr: zarr.Array) -> list[tuple[int, slice]]:
    """(index, slice along axis 0) of every (inner) chunk of ``arr``."""
    step = arr.chunks[0]
    return [
        (i, slice(s, min(s + step, arr.shape[0])))
        for i, s in enumerate(range(0, arr.shape[0], step))
    ]


def _read_chunks(
    sp: Split,
    name: str,
    arr: zarr.Array,
    problems: list[Problem],
    want_values: bool = True,
    skip: frozenset[int] = frozenset(),
) -> list:
    """Decode ``arr`` chunk by chunk; return the decoded parts (None for failed chunks and
    for the chunks starting at a sample in ``skip``, whose files are lost)."""
    parts = []
    for i, sl in _chunks(arr):
        if sl.start in skip:
            parts.append(None)
            continue
        try:
            v = arr[sl]
            parts.append(v if want_values else True)
        except DECODE_ERRORS as e:
            problems.append(
                Problem(
                    sp.name,
                    None,
                    i,
                    "corrupt",
                    f"{name} chunk {i} (samples {sl.start}..{sl.stop - 1}) failed to decode: {e}",
                )
            )
            parts.append(None)
    return parts


def _check_split(sp: Split) -> list[Problem]:
    problems: list[Problem] = []

    def meta(msg: str) -> None:
        problems.append(Problem(sp.name, None, None, "metadata", msg))

    arrays = {}
    for name, dtype, shape in (("labels", np.int64, (sp.n,)), ("ids", None, (sp.n,))):
        try:
            arr = sp.array(name)
        except SatError as e:
            meta(str(e))
            continue
        if tuple(arr.shape) != shape or (dtype is not None and arr.dtype != dtype):
            meta(f"{name} is {arr.dtype} {tuple(arr.shape)}, expected {shape}")
            continue
        arrays[name] = arr
    lost = {name: _lost_files(sp, name, problems) for name in arrays}
    if "labels" in arrays:
        parts = _read_chunks(sp, "labels", arrays["labels"], problems, skip=lost["labels"])
        for (i, _), v in zip(_chunks(arrays["labels"]), parts, strict=True):
            if v is not None and ((v < 0) | (v >= sp.num_classes)).any():
                bad = int(v[(v < 0) | (v >= sp.num_classes)][0])
                problems.append(
                    Problem(
                        sp.name,
                        None,
                        i,
                        "invalid",
                        f"labels chunk {i} holds label {bad} outside [0, {sp.num_classes})",
                    )
                )
    if "ids" in arrays:
        parts = _read_chunks(sp, "ids", arrays["ids"], problems, skip=lost["ids"])
        if all(p is not None for p in parts):
            ids = [str(x) for p in parts for x in p.tolist()]
            digest = ids_digest(ids)
            if digest != sp.ids_sha256:
                problems.append(
                    Problem(
                        sp.name,
                        None,
                        None,
                        "mismatch",
                        f"ids hash to {digest}, the split records {sp.ids_sha256}",
                    )
                )
    if sp.has_images_array():
        try:
            arr = sp.array("images")
        except SatError as e:
            meta(str(e))
        else:
            shape = (sp.n, *sp.image_shape)
            if tuple(arr.shape) != shape or arr.dtype != np.uint8:
                meta(f"images are {arr.dtype} {tuple(arr.shape)}, expected uint8 {shape}")
            else:
                # Chunks of unfinished images may be unwritten: only complete ones must exist.
                skip = _lost_files(sp, "images", problems) if sp.images_complete() else frozenset()
                _read_chunks(sp, "images", arr, problems, want_values=False, skip=skip)
                if not sp.images_complete():
                    problems.append(
                        Problem(
                            sp.name,
                            None,
                            None,
                            "incomplete",
                            "images were not marked completely written",
                        )
                    )
    return problems


def _lost_files(sp: Split, name: str, problems: list[Problem]) -> frozenset[int]:
    """Report every lost chunk file of ``name`` (a ``lost`` problem each); return the first
    samples of the chunks they held."""
    gone = sp.missing_files(name)
    for s, e, key in gone:
        problems.append(
            Problem(
                sp.name,
                None,
                None,
                "lost",
                f"{name} chunk file {sp.store.url}/{key} (samples {s}..{e - 1}) is missing",
            )
        )
    return frozenset(s for s, _, _ in gone)


def _check_map(sp: Split, name: str, records: Path | None = None) -> list[Problem]:
    """Every problem of one map: metadata, completeness, lost files, checksums, values.
    With ``records`` (see :func:`verify`), chunks known good there are not decoded again.

    One function on purpose: the checks run in order and each later one needs what the earlier
    ones established (a readable map, its done flags), so splitting it would pass that state
    around instead."""
    problems: list[Problem] = []

    def add(kind: str, msg: str, chunk: int | None = None) -> None:
        problems.append(Problem(sp.name, name, chunk, kind, msg))

    try:
        r = sp.inspect_map(name)
    except SatError as e:
        add("metadata", str(e))
        return problems
    if r.shape[1:] != sp.image_shape[1:] or r.shape[0] not in (1, sp.image_shape[0]):
        add("metadata", f"map shape {r.shape} does not fit images of shape {sp.image_shape}")
    if r.channels != r.shape[0]:
        add("metadata", f"channels {r.channels} but shape {r.shape}")
    if r.data_array.chunks[0] != r.chunk_size:
        add(
            "metadata",
            f"data chunks hold {r.data_array.chunks[0]} samples, attributes say {r.chunk_size}",
        )
    for key, mine, theirs in (
        ("n", r.n, sp.n),
        ("fingerprint", r.fingerprint, sp.fingerprint),
        ("ids_sha256", r.ids_sha256, sp.ids_sha256),
    ):
        if mine != theirs:
            add("mismatch", f"map has {key} {mine!r}, the split has {theirs!r}")
    done = np.zeros(r.n_chunks, dtype=bool)
    for c in range(0, r.n_chunks, r.shard_chunks):
        hi = min(c + r.shard_chunks, r.n_chunks)
        try:
            done[c:hi] = np.asarray(r.done_array[c:hi]) != 0
        except DECODE_ERRORS as e:
            add("corrupt", f"done flags of chunks {c}..{hi - 1} failed to decode: {e}")
    url = sp.store.url
    unflagged: set[int] = set()  # chunks whose done flags were lost with their file
    for key in r.lost_done_files():
        add("lost", f"done flags file {url}/{key} is missing, but the map is marked complete")
        i = int(key.rsplit("/", 1)[-1])
        unflagged.update(range(i * r.shard_chunks, min((i + 1) * r.shard_chunks, r.n_chunks)))
    try:
        lost = r.lost_chunks()
    except SatError:  # the done flags of a lost shard do not decode: reported above
        lost = {}
    for key in dict.fromkeys(lost.values()):
        ks = [k for k, v in lost.items() if v == key]
        add(
            "lost",
            f"shard file {url}/{key} {r.lost_reason(key)}, with {len(ks)} chunks marked written "
            f"({ks[0]}..{ks[-1]})",
            ks[0],
        )
    known = KnownChunks.open(r, records) if records is not None else None
    for k in range(r.n_chunks):
        s, e = k * r.chunk_size, min((k + 1) * r.chunk_size, r.n)
        if k in lost or k in unflagged:
            continue
        if not done[k] and k not in unflagged:
            add("missing", f"chunk {k} (samples {s}..{e - 1}) was never written", k)
            continue
        if known is not None and known.good(k):
            continue  # its bytes pass their crc32c and decode to valid rows
        try:
            rows = np.asarray(r.data_array[s:e])
        except DECODE_ERRORS as err:
            add("corrupt", f"data chunk {k} (samples {s}..{e - 1}) failed to decode: {err}", k)
            continue
        bad = invalid_bytes(rows, r.encoding, r.shape)
        if bad.any():
            add(
                "invalid",
                f"data chunk {k}: sample {s + int(np.flatnonzero(bad)[0])} holds bytes "
                f"no valid {r.encoding} map packs to",
                k,
            )
    if known is not None:
        known.save()
    if done.all() and not r.complete:
        add("incomplete", "every chunk is written but the map was never finalized")
    elif r.complete and not done.all():
        add(
            "incomplete",
            f"marked complete but {int((~done).sum())} of {r.n_chunks} chunks are missing",
        )
    elif not r.complete:
        add("incomplete", f"{int((~done).sum())} of {r.n_chunks} chunks missing")
    return problems
