"""Format constants and the small checks every part of the store shares.

Also the store's list of file kinds (:data:`FILE_KINDS`) and :func:`chunk_file_keys`, which
names the files an array's chunks live in, so the store can tell a chunk that was never
written (zarr reads it as the fill value) from one whose file went missing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from saliency_cache.errors import MapNotFoundError, SatError, StoreFormatError

FORMAT = "sat-saliency-cache"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 256  # samples per chunk: the unit of a write, a read and a done flag
DEFAULT_SHARD_CHUNKS = 64  # chunks per shard file: a 50,000-sample map is 4 files
ZSTD_LEVEL = 3
# What zarr/numcodecs raise when a chunk fails its checksum or does not decode.
DECODE_ERRORS = (ValueError, RuntimeError, TypeError, EOFError, AssertionError)

# Every kind of file a store holds, as a key pattern: ``<node>`` is any group or array path
# with its trailing "/" (empty for the root), ``<split>``, ``<map>`` and ``<i>`` (a chunk or
# shard index) one path component each. Fault-injection tests are parametrised over this
# table, so a new kind of file is listed here and is then covered by them.
FILE_KINDS: dict[str, str] = {
    "metadata": "<node>zarr.json",
    "map_shard": "<split>/maps/<map>/data/c/<i>/0",
    "done_flags": "<split>/maps/<map>/done/c/<i>",
    "images": "<split>/images/c/<i>/0/0/0",
    "labels": "<split>/labels/c/<i>",
    "ids": "<split>/ids/c/<i>",
}


def compressors() -> list:
    """The chunk codecs of every array but ``done``: zstd, then crc32c over the stored bytes."""
    return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]


def chunk_file_keys(arr: zarr.Array) -> list[str]:
    """Store keys of the files holding ``arr``'s chunks (shards for sharded arrays), in order.

    File ``i`` along axis 0 holds samples ``[i * step, (i + 1) * step)`` where ``step`` is
    ``(arr.shards or arr.chunks)[0]``; the trailing axes are one chunk wide in every array
    of this store, but the grid is enumerated in full all the same.
    """
    step = arr.shards or arr.chunks
    grid = [range(math.ceil(n / c)) for n, c in zip(arr.shape, step, strict=True)]
    return [
        f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}" for coords in itertools.product(*grid)
    ]


def wrap_meta(what: str, fn, file: str | None = None):
    """Run ``fn``; turn zarr's missing-node and bad-metadata exceptions into SatErrors.

    ``file`` (the metadata file ``fn`` reads, as a path or URL) is named in the message.
    """
    where = f" ({file})" if file else ""
    try:
        return fn()
    except SatError:
        raise
    except (KeyError, FileNotFoundError) as e:
        if file:
            raise MapNotFoundError(f"{what} does not exist: {file} is missing") from None
        raise MapNotFoundError(f"{what} does not exist ({e})") from None
    except Exception as e:  # corrupt JSON, invalid zarr metadata, wrong node type ...
        raise StoreFormatError(
            f"cannot read the metadata of {what}{where}: {type(e).__name__}: {e}"
        ) from None


def req_attr(attrs: Mapping[str, Any], key: str, what: str, kind: type | tuple[type, ...]) -> Any:
    """``attrs[key]``, or StoreFormatError if it is absent or not of type ``kind``."""
    if key not in attrs:
        raise StoreFormatError(f"{what} lacks the attribute {key!r}")
    v = attrs[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        raise StoreFormatError(f"{what} has a malformed attribute {key}={v!r}")
    return v


def check_range(start: int, stop: int, n: int, what: str) -> tuple[int, int]:
    """``(start, stop)`` as ints if ``0 <= start <= stop <= n``, else SatError."""
    if isinstance(start, (bool, np.bool_)) or isinstance(stop, (bool, np.bool_)):
        raise SatError(f"range bounds must be integers, got [{start!r}, {stop!r})")
    try:
        s, e = int(start), int(stop)
    except (TypeError, ValueError):
        raise SatError(f"range bounds must be integers, got [{start!r}, {stop!r})") from None
    if not 0 <= s <= e <= n:
        raise SatError(f"range [{s}, {e}) is outside {what} of {n} samples")
    return s, e


def check_indices(idx: Sequence[int], n: int, what: str) -> np.ndarray:
    """int64 (len(idx),): ``idx`` checked to be 1-D integers in ``[0, n)``."""
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
