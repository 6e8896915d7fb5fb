"""The exact integer GEMM and its int32 range check."""

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from ascend_quant.reference.integer_gemm import int_matmul


@given(st.integers(0, 5), st.integers(1, 40), st.integers(1, 7), st.data())
def test_matches_python_integer_sums(m, k, n, data):
    a = data.draw(hnp.arrays(np.int8, (m, k)))
    b = data.draw(hnp.arrays(np.int8, (n, k)))
    got = int_matmul(a, b)
    expect = [[sum(int(a[i, j]) * int(b[r, j]) for j in range(k)) for r in range(n)] for i in range(m)]
    assert got.dtype == np.int64 and got.tolist() == (expect if m else [])


def test_extreme_values_are_exact():
    k = 4096
    a = np.full((2, k), -128, dtype=np.int8)
    b = np.stack([np.full(k, -128, np.int8), np.full(k, 127, np.int8)])
    assert int_matmul(a, b).tolist() == [[k * 16384, -k * 16256]] * 2


def test_int32_overflow_is_reported_not_wrapped():
    k = 2**17 + 8
    a = np.full((1, k), -128, dtype=np.int8)
    with pytest.raises(OverflowError, match="w2 accumulator"):
        int_matmul(a, a, name="w2 accumulator")
    with pytest.raises(ValueError, match="inner dimensions differ"):
        int_matmul(np.zeros((1, 3), np.int8), np.zeros((2, 4), np.int8))
