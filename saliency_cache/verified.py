"""A local record of the map chunks whose bytes were decoded and found valid, so that a later
check of the same map decodes only the chunks that changed.

Training checks every map it streams before its first step
(:func:`trainer.loader.check_map_integrity`): each written chunk must pass its crc32c and
decode to bytes a valid map packs to. Decoding every chunk on every start makes a start cost
O(N) in zarr calls (about a millisecond per chunk: 8 s for two maps of 1,000,000 samples).
With a record, a check still reads every shard file whole and recomputes each chunk's
crc32c against the one stored after it, so bit rot and truncated, replaced or corrupt files
are refused on every start; what it skips is decompressing and validating the values of a
chunk whose (length, crc32c) the record lists, i.e. bytes that an earlier check already
decoded. Chunks not listed are decoded from the bytes just read and, if valid, listed.
Any chunk that fails here is handed back to the caller's full check, which reports it.

Where records live: the folder named by ``$SAT_VERIFY_CACHE`` (``off`` turns records off),
else ``$XDG_CACHE_HOME/sat-pipeline/verified`` (``~/.cache/...``): one JSON file per map,
named by a hash of the store's location, split and map. Never inside the store: teams share
stores read-only. A record that cannot be read (absent, malformed, of another map layout)
counts as empty; one that cannot be written is not written. Either way the check then
decodes those chunks, as without a record, so no record is ever needed and a read-only or
full cache folder only costs time; the folder can be deleted at any time (a record is about
30 bytes per chunk, e.g. 100 KB for a map of 1,000,000 samples).

What a record cannot catch: a chunk changed to other bytes of the same length and the same
crc32c (a 2^-32 chance for a random change, but not a defence against deliberate forgery;
a record file edited by hand can vouch for anything, like any cache the user owns).

numpy, numcodecs and the crc32c module zarr uses only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from saliency_cache.encoding import invalid_bytes

if TYPE_CHECKING:
    from saliency_cache.maps import MapBase

CACHE_ENV = "SAT_VERIFY_CACHE"
RECORD_FORMAT = "sat-verified-chunks"
RECORD_VERSION = 1
_EMPTY = np.iinfo(np.uint64).max  # a shard index entry of a chunk the shard does not hold


def default_cache_dir() -> Path | None:
    """The folder of verification records (see the module docstring), or None if turned off."""
    v = os.environ.get(CACHE_ENV)
    if v is not None and v.strip().lower() in ("off", "0", "none"):
        return None
    if v:
        return Path(v).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sat-pipeline" / "verified"


def _standard_layout(reader: MapBase) -> bool:
    """True if the map's data array has the store's codec chain (see ``create_map_arrays``),
    which is the only one :class:`KnownChunks` decodes itself."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

    codecs = reader.data_array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sc = codecs[0]
    return (
        tuple(sc.chunk_shape) == (reader.chunk_size, reader.packed_nbytes)
        and [type(c) for c in sc.codecs] == [BytesCodec, ZstdCodec, Crc32cCodec]
        and [type(c) for c in sc.index_codecs] == [BytesCodec, Crc32cCodec]
        and str(getattr(sc.index_location, "value", sc.index_location)) == "end"
        and tuple(reader.data_array.shards or ()) == (
            reader.chunk_size * reader.shard_chunks, reader.packed_nbytes)
    )


class KnownChunks:
    """The chunks of one map whose current bytes are known good, checked shard by shard.

    Get it from :meth:`open`; ask :meth:`good` for each chunk marked written, then
    :meth:`save`. ``decoded`` and ``vouched`` count the chunks decoded here and the ones the
    record spared.
    """

    def __init__(self, reader: MapBase, path: Path | None, identity: dict,
                 known: dict[int, tuple[int, int]]) -> None:
        self._r = reader
        self._path = path
        self._identity = identity
        self._known = known
        self._now: dict[int, tuple[int, int]] = {}  # chunks found good by this check
        self._shard: tuple[int, bytes | None, np.ndarray | None] | None = None
        self.decoded = 0
        self.vouched = 0

    @classmethod
    def open(cls, reader: MapBase, cache_dir: Path | None) -> KnownChunks | None:
        """The record of ``reader``'s map in ``cache_dir`` (empty if there is none, or
        ``cache_dir`` is None); None if the map's codecs are not the store's own."""
        if not _standard_layout(reader):
            return None
        loc = reader.split.store.location
        where = str(getattr(loc, "root", None) or loc.url)
        identity = {
            "format": RECORD_FORMAT, "version": RECORD_VERSION, "store": where,
            "split": reader.split.name, "map": reader.name, "n": reader.n,
            "encoding": reader.encoding, "shape": list(reader.shape),
            "chunk_size": reader.chunk_size, "shard_chunks": reader.shard_chunks,
        }
        path = None
        if cache_dir is not None:
            key = json.dumps([where, reader.split.name, reader.name]).encode()
            path = Path(cache_dir) / f"{hashlib.sha256(key).hexdigest()[:32]}.json"
        return cls(reader, path, identity, _load(path, identity))

    def good(self, k: int) -> bool:
        """True if chunk ``k``'s stored bytes pass their crc32c and are known to decode to
        valid rows (listed in the record, or decoded here now). False means: not shown good
        here (absent, failing its crc32c or its decoding); the caller's own check decides."""
        r = self._r
        s = k // r.shard_chunks
        if self._shard is None or self._shard[0] != s:
            self._shard = (s, *self._read_shard(s))
        _, raw, index = self._shard
        if raw is None or index is None:
            return False
        off, nbytes = (int(v) for v in index[k - s * r.shard_chunks])
        if off == _EMPTY or nbytes < 4 or off + nbytes > len(raw) - index.nbytes - 4:
            return False
        body = raw[off : off + nbytes - 4]
        crc = _crc32c(body)
        if crc != int.from_bytes(raw[off + nbytes - 4 : off + nbytes], "little"):
            return False  # corrupt: the full check reports it
        key = (nbytes, crc)
        if self._known.get(k) == key:
            self.vouched += 1
        elif self._decodes(k, body):
            self.decoded += 1
        else:
            return False
        self._now[k] = key
        return True

    def _read_shard(self, s: int) -> tuple[bytes | None, np.ndarray | None]:
        """(bytes of shard file ``s``, its index uint64 (shard_chunks, 2) of offset, nbytes)
        or Nones if the file is absent or its index fails its crc32c."""
        raw = self._r.split.store.location.get(self._r.shard_files()[s])
        size = 16 * self._r.shard_chunks + 4
        if raw is None or len(raw) < size:
            return None, None
        body, stored = raw[-size:-4], raw[-4:]
        if _crc32c(body) != int.from_bytes(stored, "little"):
            return None, None
        return raw, np.frombuffer(body, dtype="<u8").reshape(-1, 2)

    def _decodes(self, k: int, compressed: bytes) -> bool:
        """True if the zstd bytes of chunk ``k`` decode to one chunk of valid packed rows."""
        from numcodecs import Zstd

        r = self._r
        try:
            flat = np.frombuffer(Zstd().decode(compressed), dtype=np.uint8)
        except Exception:  # noqa: BLE001 - any failure is the full check's to report
            return False
        if flat.size != r.chunk_size * r.packed_nbytes:
            return False
        rows = flat.reshape(r.chunk_size, r.packed_nbytes)[: min(r.chunk_size, r.n - k * r.chunk_size)]
        return not invalid_bytes(rows, r.encoding, r.shape).any()

    def save(self) -> None:
        """Write the record of the chunks found good by this check, if it changed; silently
        nothing where the folder cannot be written."""
        if self._path is None or self._now == self._known:
            return
        doc = {**self._identity,
               "chunks": {str(k): list(v) for k, v in sorted(self._now.items())}}
        tmp = None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, self._path)  # two checks at once: one record wins, whole
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _crc32c(data: bytes) -> int:
    import google_crc32c  # what zarr's crc32c codec uses

    return google_crc32c.value(data)


def _load(path: Path | None, identity: dict) -> dict[int, tuple[int, int]]:
    """``{chunk: (nbytes, crc32c)}`` from the record at ``path``; empty if there is none, it
    does not parse, or it describes another map or layout."""
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
        if {k: doc.get(k) for k in identity} != identity:
            return {}
        return {int(k): (int(v[0]), int(v[1])) for k, v in doc["chunks"].items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}
