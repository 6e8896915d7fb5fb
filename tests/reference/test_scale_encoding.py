"""The int64 bit-copy encoding of float32 scales (msModelSlim deqscale2int64)."""

import numpy as np
import pytest

from ascend_quant.reference.scale_encoding import (
    decode_int64_as_float32, deq_scale_as_float32, encode_float32_as_int64,
)


def test_encoding_literal():
    enc = encode_float32_as_int64(np.array([1.0, 0.5, 2.0**-20], dtype=np.float32))
    assert enc.dtype == np.int64
    assert enc.tolist() == [0x3F800000, 0x3F000000, 0x35800000]


def test_round_trip_every_exponent_and_mantissa_pattern():
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(1, 0x7F800000, 4096, dtype=np.uint32),
                           np.array([1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF], np.uint32)])
    s = bits.view(np.float32)
    assert np.array_equal(decode_int64_as_float32(encode_float32_as_int64(s)).view(np.uint32), bits)
    # zero extension (vLLM Ascend's W4A8 process_scale) decodes the same for positive scales
    assert np.array_equal(decode_int64_as_float32(bits.astype(np.int64)).view(np.uint32), bits)


def test_negative_float_sign_extension_and_zero_extension_decode_alike():
    s = np.array([-1.5], dtype=np.float32)
    sign_ext = encode_float32_as_int64(s)
    zero_ext = s.view(np.uint32).astype(np.int64)
    assert sign_ext[0] < 0 < zero_ext[0]
    assert decode_int64_as_float32(sign_ext)[0] == decode_int64_as_float32(zero_ext)[0] == -1.5


def test_non_encodings_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"layers\.0\.deq_scale: int64 value 4294967296"):
        decode_int64_as_float32(np.array([2**32], dtype=np.int64), "layers.0.deq_scale")
    with pytest.raises(ValueError, match="expected float32 or int64"):
        deq_scale_as_float32(np.array([1.0], dtype=np.float16))
    assert deq_scale_as_float32(np.array([0.25], np.float32))[0] == 0.25
