"""Bit packing of binary / ternary maps: round trips, the documented bit layout, validation."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from saliency_cache.encoding import (
    VALUES,
    invalid_bytes,
    lookup_table,
    pack,
    packed_nbytes,
    unpack,
    value_counts,
)
from saliency_cache.errors import CorruptChunkError, SatError

SHAPES = [(3, 5, 7), (1, 4, 4), (2, 3), (3, 8, 8), (1,)]


@pytest.mark.parametrize("encoding", ["binary", "ternary"])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(encoding, shape):
    rng = np.random.default_rng(0)
    values = rng.choice(VALUES[encoding], size=(11, *shape)).astype(np.int8)
    packed = pack(values, encoding)
    assert packed.dtype == np.uint8
    assert packed.shape == (11, packed_nbytes(shape, encoding))
    out = unpack(packed, encoding, shape)
    assert out.dtype == np.int8 and out.shape == values.shape
    np.testing.assert_array_equal(out, values)


def test_packed_nbytes():
    assert packed_nbytes((3, 32, 32), "binary") == 384
    assert packed_nbytes((3, 32, 32), "ternary") == 768
    assert packed_nbytes((1, 3, 3), "binary") == 2  # 9 bits -> 2 bytes
    assert packed_nbytes((1, 3, 3), "ternary") == 3  # 9 codes -> 3 bytes
    with pytest.raises(SatError, match="positive"):
        packed_nbytes((3, 0, 4), "binary")


def test_documented_bit_layout():
    # The trainer decodes on the GPU from this layout; these bytes are the contract.
    b = pack(np.array([[1, -1, -1, 1, 1, 1, -1, -1, 1]], dtype=np.int8), "binary")
    assert b.tolist() == [[0b10011100, 0b10000000]]
    t = pack(np.array([[1, -1, 0, 1, -1]], dtype=np.int8), "ternary")
    assert t.tolist() == [[0b01100001, 0b10000000]]


def test_binary_matches_numpy_packbits_big_endian():
    rng = np.random.default_rng(1)
    v = rng.choice([-1, 1], size=(4, 3, 3, 5)).astype(np.int8)
    expected = np.packbits((v > 0).reshape(4, -1), axis=1, bitorder="big")
    np.testing.assert_array_equal(pack(v, "binary"), expected)


@pytest.mark.parametrize("encoding", ["binary", "ternary"])
def test_lookup_table_matches_pack(encoding):
    k = 8 if encoding == "binary" else 4
    combos = np.array(list(itertools.product(VALUES[encoding], repeat=k)), dtype=np.int8)
    byte = pack(combos, encoding)[:, 0]
    assert len(set(byte.tolist())) == len(combos)  # every group has its own byte
    np.testing.assert_array_equal(lookup_table(encoding)[byte], combos)


def test_rows_are_independent():
    # A batch packs to the same rows as its samples one by one (no bits shared across rows).
    rng = np.random.default_rng(2)
    v = rng.choice([-1, 0, 1], size=(5, 1, 3, 3)).astype(np.int8)
    whole = pack(v, "ternary")
    for i in range(5):
        np.testing.assert_array_equal(whole[i : i + 1], pack(v[i : i + 1], "ternary"))


@pytest.mark.parametrize(
    "encoding,values,quoted",
    [
        ("binary", [[1, 0, -1]], "0 at index (0, 1)"),
        ("binary", [[1, 1, 2]], "2 at index (0, 2)"),
        ("ternary", [[1, -2, 0]], "-2 at index (0, 1)"),
        ("ternary", [[3, 0, 0]], "3 at index (0, 0)"),
    ],
)
def test_pack_rejects_values_and_quotes_them(encoding, values, quoted):
    with pytest.raises(SatError, match=re.escape(f"holds the value {quoted}")):
        pack(np.array(values, dtype=np.int8), encoding)


def test_pack_rejects_nan_and_fractions_but_takes_exact_floats():
    with pytest.raises(SatError, match="nan"):
        pack(np.array([[1.0, np.nan]]), "binary")
    with pytest.raises(SatError, match="0.5"):
        pack(np.array([[1.0, 0.5]]), "ternary")
    np.testing.assert_array_equal(
        pack(np.array([[1.0, -1.0, 0.0, 1.0]]), "ternary"),
        pack(np.array([[1, -1, 0, 1]], dtype=np.int8), "ternary"),
    )
    # Wider integer dtypes are fine when the values are.
    v = np.array([[1, -1, -1, 1]], dtype=np.int64)
    np.testing.assert_array_equal(pack(v, "binary"), pack(v.astype(np.int8), "binary"))


def test_pack_rejects_bad_inputs():
    with pytest.raises(SatError, match="bool"):
        pack(np.array([[True, False]]), "binary")
    with pytest.raises(SatError, match="batch"):
        pack(np.array([1, -1], dtype=np.int8), "binary")
    with pytest.raises(SatError, match="unknown map encoding 'quaternary'"):
        pack(np.ones((1, 4), dtype=np.int8), "quaternary")


def test_unpack_rejects_invalid_ternary_code_and_padding():
    with pytest.raises(CorruptChunkError, match="row 1"):
        unpack(np.array([[0b01100001], [0b00001100]], dtype=np.uint8), "ternary", (4,))
    # 5 ternary elements use the top 2 bits of the second byte; the rest must be zero.
    with pytest.raises(CorruptChunkError, match="row 0"):
        unpack(np.array([[0, 0b10000001]], dtype=np.uint8), "ternary", (5,))
    # 9 binary elements use 1 bit of the second byte.
    with pytest.raises(CorruptChunkError):
        unpack(np.array([[0xFF, 0b10000001]], dtype=np.uint8), "binary", (9,))
    np.testing.assert_array_equal(
        unpack(np.array([[0xFF, 0b10000000]], dtype=np.uint8), "binary", (9,)), np.ones((1, 9))
    )
    mask = invalid_bytes(np.array([[0b11000000], [0b01000000]], dtype=np.uint8), "ternary", (4,))
    assert mask.tolist() == [True, False]


def test_unpack_rejects_wrong_dtype_and_width():
    with pytest.raises(SatError, match="uint8"):
        unpack(np.zeros((2, 2), dtype=np.int16), "binary", (1, 4, 4))
    with pytest.raises(SatError, match=r"\(B, 2\)"):
        unpack(np.zeros((2, 3), dtype=np.uint8), "binary", (1, 4, 4))


@pytest.mark.parametrize("encoding", ["binary", "ternary"])
def test_value_counts_from_packed_bytes(encoding):
    rng = np.random.default_rng(3)
    v = rng.choice(VALUES[encoding], size=(7, 1, 3, 3)).astype(np.int8)  # 9 elements: padding
    counts = value_counts(pack(v, encoding), encoding, (1, 3, 3))
    assert counts == {k: int((v == k).sum()) for k in (-1, 0, 1)}


def test_empty_batch_round_trips():
    v = np.zeros((0, 1, 2, 2), dtype=np.int8)
    p = pack(v, "ternary")
    assert p.shape == (0, 1)
    assert unpack(p, "ternary", (1, 2, 2)).shape == (0, 1, 2, 2)
