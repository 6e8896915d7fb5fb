"""Exhaustive round trips of every int4 packing: every nibble pair, every byte value,
and word layouts checked against literal hex values written by hand."""

import numpy as np
import pytest

from ascend_quant.reference.packing import (
    pack_int4_offset8_to_int32,
    pack_int4_to_int8,
    pack_int4_to_int32,
    unpack_int8_to_int4,
    unpack_int32_offset8_to_int4,
    unpack_int32_to_int4,
)

ALL_PAIRS = np.array([(lo, hi) for lo in range(-8, 8) for hi in range(-8, 8)], dtype=np.int8)


def test_every_nibble_pair_packs_to_the_documented_byte():
    packed = pack_int4_to_int8(ALL_PAIRS, axis=1)[:, 0]
    expected = ((ALL_PAIRS[:, 1].astype(np.int32) & 0xF) << 4) | (ALL_PAIRS[:, 0].astype(np.int32) & 0xF)
    assert np.array_equal(packed.view(np.uint8), expected.astype(np.uint8))
    assert np.array_equal(unpack_int8_to_int4(packed[:, None], axis=1), ALL_PAIRS)


def test_every_byte_value_round_trips():
    every_byte = np.arange(256, dtype=np.uint8).view(np.int8)
    nibbles = unpack_int8_to_int4(every_byte)
    assert nibbles.min() == -8 and nibbles.max() == 7
    assert np.array_equal(pack_int4_to_int8(nibbles).view(np.uint8), np.arange(256, dtype=np.uint8))


def test_int32_word_layout_literal():
    # element j in bits [4j, 4j+4), two's complement: -8 -> 0x8, -1 -> 0xF
    q = np.array([-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int8)
    words = pack_int4_to_int32(q).view(np.uint32)
    assert words.tolist() == [0xFEDCBA98, 0x76543210]
    assert np.array_equal(unpack_int32_to_int4(pack_int4_to_int32(q)), q)


def test_four_int8_bytes_view_as_the_int32_word():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(5, 64), dtype=np.int8)
    as_bytes = pack_int4_to_int8(q).view(np.int32)  # little-endian reinterpretation
    assert np.array_equal(as_bytes, pack_int4_to_int32(q))


def test_every_int32_nibble_position_round_trips():
    # each of the 16 values in each of the 8 positions, others zero
    q = np.zeros((16 * 8, 8), dtype=np.int8)
    for pos in range(8):
        q[pos * 16:(pos + 1) * 16, pos] = np.arange(-8, 8)
    words = pack_int4_to_int32(q)[:, 0].view(np.uint32)
    for pos in range(8):
        expect = (np.arange(-8, 8) & 0xF).astype(np.uint32) << np.uint32(4 * pos)
        assert np.array_equal(words[pos * 16:(pos + 1) * 16], expect)
    assert np.array_equal(unpack_int32_to_int4(pack_int4_to_int32(q)), q)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_pack_along_any_axis_round_trips(axis):
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, size=(16, 24), dtype=np.int8)
    assert np.array_equal(unpack_int32_to_int4(pack_int4_to_int32(q, axis=axis), axis=axis), q)
    assert np.array_equal(unpack_int8_to_int4(pack_int4_to_int8(q, axis=axis), axis=axis), q)
    # packing along axis 0 is packing the transpose along its last axis
    if axis == 0:
        assert np.array_equal(pack_int4_to_int8(q, axis=0), pack_int4_to_int8(q.T).T)


def test_offset8_pack_quantized_literal_and_round_trip():
    q = np.array([-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int8)
    words = pack_int4_offset8_to_int32(q).view(np.uint32)
    assert words.tolist() == [0x76543210, 0xFEDCBA98]  # stored = q + 8
    every_word_nibble = np.arange(16, dtype=np.uint32)
    w = (every_word_nibble[:, None] << (4 * np.arange(8, dtype=np.uint32))).sum(axis=1).astype(np.uint32)
    unpacked = unpack_int32_offset8_to_int4(w.view(np.int32)[:, None])
    assert np.array_equal(unpacked, np.repeat((every_word_nibble.astype(np.int8) - 8)[:, None], 8, axis=1))


def test_out_of_range_and_ragged_inputs_are_named_errors():
    with pytest.raises(ValueError, match=r"w13_weight: int4 values must lie in \[-8, 7\]"):
        pack_int4_to_int32(np.full(8, 8, dtype=np.int8), name="w13_weight")
    with pytest.raises(ValueError, match="length 10 along axis 0 is not a multiple of 8"):
        pack_int4_to_int32(np.zeros(10, dtype=np.int8))
    with pytest.raises(ValueError, match="not a multiple of 2"):
        pack_int4_to_int8(np.zeros((3, 4), dtype=np.int8), axis=0)
    with pytest.raises(ValueError, match="integer array"):
        pack_int4_to_int8(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="expected int32"):
        unpack_int32_to_int4(np.zeros(4, dtype=np.int8))
