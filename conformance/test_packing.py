"""Conformance of int4 packing: every nibble pair, every byte and word, random shapes/axes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from .checks import check_packing
from . import backends as B
from .assertions import assert_bitexact

ALL_PAIRS = np.array([(lo, hi) for lo in range(-8, 8) for hi in range(-8, 8)], dtype=np.int8)


@pytest.mark.parametrize("kind", ["int32", "int8", "offset8"])
def test_every_nibble_value_packs_like_the_reference(backend, kind):
    per = 2 if kind == "int8" else 8
    q = np.resize(ALL_PAIRS.reshape(-1), (256 * 2 // per, per)).astype(np.int8)
    check_packing(backend, kind, q, axis=1)


def test_every_byte_unpacks_like_the_reference(backend):
    from ascend_quant.reference.packing import unpack_int8_to_int4
    every = np.arange(256, dtype=np.uint8).view(np.int8).reshape(16, 16)
    for axis in (0, 1):
        assert_bitexact(B.unpack(backend, "int8", every, axis), unpack_int8_to_int4(every, axis=axis),
                        what=f"unpack every byte along axis {axis}")


@given(data=st.data())
def test_packing_matches_reference(backend, data):
    kind = data.draw(st.sampled_from(["int32", "int8", "offset8"]), label="kind")
    per = 2 if kind == "int8" else 8
    ndim = data.draw(st.integers(1, 3), label="ndim")
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    shape = [data.draw(st.integers(1, 5), label=f"dim{i}") for i in range(ndim)]
    shape[axis] = per * data.draw(st.integers(1, 6), label="words")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    q = rng.integers(-8, 8, size=shape).astype(np.int8)
    check_packing(backend, kind, q, axis)


@given(data=st.data())
def test_unpack_random_words_matches_reference(backend, data):
    from ascend_quant.reference.packing import unpack_int32_offset8_to_int4, unpack_int32_to_int4
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    words = rng.integers(-(2**31), 2**31, size=(data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))),
                         dtype=np.int64).astype(np.int32)
    axis = data.draw(st.sampled_from([0, 1, -1]), label="axis")
    assert_bitexact(B.unpack(backend, "int32", words, axis), unpack_int32_to_int4(words, axis=axis), what="int32 unpack")
    assert_bitexact(B.unpack(backend, "offset8", words, axis), unpack_int32_offset8_to_int4(words, axis=axis),
                    what="offset8 unpack")


@pytest.mark.parametrize("kind,length", [("int32", 7), ("int8", 3), ("offset8", 9)])
def test_ragged_length_is_rejected_like_the_reference(backend, kind, length):
    q = np.zeros((2, length), dtype=np.int8)
    with pytest.raises(ValueError, match="multiple of"):
        B.pack(backend, kind, q, axis=1)
