"""Bit packing of sign saliency maps (pure numpy, vectorised).

A map sample is an ``int8`` array of any shape (usually ``(C, H, W)`` or ``(1, H, W)``).
Packing flattens it in C order and stores it as one row of ``packed_nbytes(shape, encoding)``
bytes, so a batch ``(B, *shape)`` becomes ``uint8 (B, nbytes)``. Rows never share bytes.

Bit layout (the trainer re-implements the decoder on the GPU, so this is the contract):

``binary`` (values in {-1, +1}), 1 bit per element, 8 elements per byte.
    Element ``j`` of the flattened sample lives in byte ``j // 8`` at bit ``7 - j % 8``
    (most significant bit first, i.e. ``np.packbits(v > 0, bitorder="big")``).
    Bit 1 means +1, bit 0 means -1. Padding bits after the last element are 0.

``ternary`` (values in {-1, 0, +1}), 2 bits per element, 4 elements per byte.
    Element ``j`` lives in byte ``j // 4`` at bits ``7 - 2*(j % 4)`` (high) and
    ``6 - 2*(j % 4)`` (low), i.e. the first element of a byte is its two most significant
    bits. Codes: ``0b00`` -> 0, ``0b01`` -> +1, ``0b10`` -> -1; ``0b11`` is invalid and is
    rejected on decode. Padding codes after the last element are ``0b00``.

Example: the binary sample ``[+1, -1, -1, +1, +1, +1, -1, -1, +1]`` packs to the two bytes
``0b10011100, 0b10000000``; the ternary sample ``[+1, -1, 0, +1, -1]`` packs to
``0b01100001, 0b10000000``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from saliency_cache.errors import CorruptChunkError, SatError

ENCODINGS = ("binary", "ternary")
# Elements per byte and the values an encoding can hold.
ELEMENTS_PER_BYTE = {"binary": 8, "ternary": 4}
VALUES = {"binary": (-1, 1), "ternary": (-1, 0, 1)}
BITS_PER_ELEMENT = {"binary": 1, "ternary": 2}


def check_encoding(encoding: str) -> str:
    """Return ``encoding`` if it is ``"binary"`` or ``"ternary"``; raise SatError otherwise."""
    if encoding not in ENCODINGS:
        raise SatError(f"unknown map encoding {encoding!r}; choose binary or ternary")
    return encoding


def _numel(shape: Sequence[int]) -> int:
    dims = tuple(int(s) for s in shape)
    if any(d < 1 for d in dims):
        raise SatError(f"map shape must have positive dimensions, got {tuple(shape)}")
    return math.prod(dims)


def packed_nbytes(shape: Sequence[int], encoding: str) -> int:
    """Bytes one packed sample of ``shape`` occupies: ceil(numel / 8) binary, ceil(numel / 4) ternary."""
    return -(-_numel(shape) // ELEMENTS_PER_BYTE[check_encoding(encoding)])


def _first_bad(values: np.ndarray, bad: np.ndarray) -> str:
    pos = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), values.shape)
    return f"{values[pos].item()!r} at index {tuple(int(p) for p in pos)}"


def _as_int8(values: np.ndarray, encoding: str) -> np.ndarray:
    """Validate that ``values`` hold only the encoding's values and return them as int8."""
    allowed = VALUES[encoding]
    kind = values.dtype.kind
    if kind == "b":
        raise SatError(
            f"map values must be integers in {set(allowed)}, got a bool array (which sign is True?)"
        )
    if kind not in "iuf":
        raise SatError(f"map values must be int8 in {set(allowed)}, got dtype {values.dtype}")
    if kind == "f":
        bad = ~np.isin(values, allowed)  # NaN is never in the set
    elif values.dtype == np.int8:
        bad = (values != 1) & (values != -1)
        if encoding == "ternary":
            bad &= values != 0
    else:
        bad = ~np.isin(values, allowed)
    if bad.any():
        raise SatError(
            f"{encoding} map holds the value {_first_bad(values, bad)}; "
            f"only {', '.join(f'{v:+d}' if v else '0' for v in allowed)} are allowed"
        )
    return values.astype(np.int8, copy=False)


def pack(values: np.ndarray, encoding: str) -> np.ndarray:
    """Pack a batch of maps.

    Args:
        values: ``(B, *shape)`` array with values in {-1, +1} (binary) or {-1, 0, +1}
            (ternary). int8 is expected; other integer or float dtypes are accepted when
            every value is exactly one of those (so NaN or 0.5 is refused).
        encoding: ``"binary"`` or ``"ternary"``.

    Returns:
        ``uint8 (B, packed_nbytes(shape, encoding))``, laid out as the module docstring says.

    Raises:
        SatError: an unknown encoding, a scalar input, or a value outside the encoding's set
            (the message quotes the first bad value and its index).
    """
    check_encoding(encoding)
    values = np.asarray(values)
    if values.ndim < 2:
        raise SatError(f"pack expects a batch (B, *shape), got an array of shape {values.shape}")
    v = _as_int8(values, encoding)
    b = v.shape[0]
    flat = np.ascontiguousarray(v).reshape(b, math.prod(v.shape[1:]))
    if encoding == "binary":
        return np.packbits(flat > 0, axis=1, bitorder="big")
    # int8 -> its uint8 bit pattern: 0 -> 0, +1 -> 1, -1 -> 0xFF; keeping the two low bits
    # gives {0, 1, 3} and x - (x >> 1) turns 3 into the code 0b10.
    x = flat.view(np.uint8) & 0x03
    codes = x - (x >> 1)
    n = flat.shape[1]
    pad = -n % 4
    if pad:
        codes = np.concatenate([codes, np.zeros((b, pad), dtype=np.uint8)], axis=1)
    q = codes.reshape(b, (n + pad) // 4, 4)
    return (q[..., 0] << 6) | (q[..., 1] << 4) | (q[..., 2] << 2) | q[..., 3]


def _tables() -> dict[str, np.ndarray]:
    """256-row lookup tables: packed byte -> the int8 values it holds, viewed as one wide word."""
    b = np.arange(256, dtype=np.uint8)
    binary = (np.unpackbits(b[:, None], axis=1).astype(np.int8) * 2 - 1).astype(np.int8)
    decode = np.array([0, 1, -1, 0], dtype=np.int8)  # code 0b11 is caught before lookup
    ternary = np.stack([decode[(b >> s) & 3] for s in (6, 4, 2, 0)], axis=1)
    # A (256, 8) int8 table viewed as (256,) uint64 turns the lookup into one 8-byte gather
    # per packed byte; the bytes land in memory in element order whatever the endianness.
    return {
        "binary": np.ascontiguousarray(binary).view(np.uint64).reshape(256),
        "ternary": np.ascontiguousarray(ternary).view(np.uint32).reshape(256),
    }


_TABLES: dict[str, np.ndarray] = {}


def lookup_table(encoding: str) -> np.ndarray:
    """``int8 (256, k)`` table: row ``b`` holds the ``k`` values (8 binary, 4 ternary) packed in byte ``b``.

    Rows of bytes holding the invalid ternary code ``0b11`` decode those elements to 0;
    :func:`unpack` refuses such bytes before looking them up.
    """
    check_encoding(encoding)
    if not _TABLES:
        _TABLES.update(_tables())
    k = ELEMENTS_PER_BYTE[encoding]
    return _TABLES[encoding].view(np.int8).reshape(256, k)


def invalid_bytes(packed: np.ndarray, encoding: str, shape: Sequence[int]) -> np.ndarray:
    """Bool mask (B,) of rows that no valid sample packs to.

    A row is invalid when a ternary byte holds the code ``0b11`` or when a padding bit/code
    after the last element is not zero.
    """
    check_encoding(encoding)
    packed = np.asarray(packed)
    bad = np.zeros(packed.shape[0], dtype=bool)
    if encoding == "ternary":
        bad |= ((packed & (packed >> 1) & 0x55) != 0).any(axis=1)
    n = _numel(shape)
    per = ELEMENTS_PER_BYTE[encoding]
    tail = n % per
    if tail:
        used_bits = tail * BITS_PER_ELEMENT[encoding]
        pad_mask = np.uint8((1 << (8 - used_bits)) - 1)
        bad |= (packed[:, -1] & pad_mask) != 0
    return bad


def _check_packed(packed: np.ndarray, encoding: str, shape: Sequence[int]) -> np.ndarray:
    packed = np.asarray(packed)
    nbytes = packed_nbytes(shape, encoding)
    if packed.dtype != np.uint8:
        raise SatError(f"packed maps must be uint8, got dtype {packed.dtype}")
    if packed.ndim != 2 or packed.shape[1] != nbytes:
        raise SatError(
            f"packed {encoding} maps of shape {tuple(shape)} must be (B, {nbytes}), "
            f"got {packed.shape}"
        )
    return packed


def unpack(
    packed: np.ndarray, encoding: str, shape: Sequence[int], validate: bool = True
) -> np.ndarray:
    """Unpack rows written by :func:`pack`.

    Args:
        packed: ``uint8 (B, packed_nbytes(shape, encoding))``.
        encoding: ``"binary"`` or ``"ternary"``.
        shape: the per-sample shape, e.g. ``(3, 32, 32)``.
        validate: refuse rows with the invalid ternary code ``0b11`` or non-zero padding.

    Returns:
        ``int8 (B, *shape)`` with values in {-1, +1} or {-1, 0, +1}.

    Raises:
        SatError: wrong dtype or row length.
        CorruptChunkError: a row no valid sample packs to (names the first such row).
    """
    check_encoding(encoding)
    packed = _check_packed(packed, encoding, shape)
    shape = tuple(int(s) for s in shape)
    if validate:
        bad = invalid_bytes(packed, encoding, shape)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CorruptChunkError(
                f"packed {encoding} row {row} holds bytes no valid map packs to "
                f"(first bytes {packed[row, :8].tolist()})"
            )
    if not _TABLES:
        _TABLES.update(_tables())
    b = packed.shape[0]
    wide = _TABLES[encoding][packed]  # (B, nbytes) uint64 / uint32
    vals = wide.view(np.int8).reshape(b, packed.shape[1] * ELEMENTS_PER_BYTE[encoding])
    n = math.prod(shape)
    if vals.shape[1] != n:
        vals = vals[:, :n]
    return np.ascontiguousarray(vals).reshape(b, *shape)


def value_counts(packed: np.ndarray, encoding: str, shape: Sequence[int]) -> dict[int, int]:
    """Counts of -1, 0 and +1 in packed rows, computed from a byte histogram (no unpacking).

    Returns ``{-1: n_neg, 0: n_zero, 1: n_pos}``; padding is excluded.
    """
    check_encoding(encoding)
    packed = _check_packed(packed, encoding, shape)
    hist = np.bincount(packed.reshape(-1), minlength=256).astype(np.int64)
    table = lookup_table(encoding).astype(np.int64)
    pos = int(hist @ (table == 1).sum(axis=1))
    total = packed.shape[0] * _numel(shape)
    if encoding == "binary":
        return {-1: total - pos, 0: 0, 1: pos}
    neg = int(hist @ (table == -1).sum(axis=1))
    return {-1: neg, 0: total - pos - neg, 1: pos}
