"""Static per-tensor and dynamic per-token activation quantization."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

from ascend_quant.reference.activation_quant import (
    quantize_dynamic_per_token, quantize_static, static_quant_params,
)

finite_rows = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 33)),
                         elements=st.floats(-1e4, 1e4, width=32))


def test_dynamic_int8_golden_rows():
    x = np.array([[1.0, -2.0, 0.5, 0.0],      # m=2: r=63.5, 0.5*63.5=31.75 -> 32, 1*63.5=63.5 -> 64 (tie, even)
                  [0.0, 0.0, 0.0, 0.0],       # zero row
                  [3.0, 1.5, -0.75, 0.375]],  # m=3: r=127/3
                 dtype=np.float32)
    q, s = quantize_dynamic_per_token(x)
    assert q.dtype == np.int8 and s.dtype == np.float32
    r = np.float32(127) / np.float32(3)
    row2 = [127, int(np.rint(np.float32(1.5) * r)), int(np.rint(np.float32(-0.75) * r)), int(np.rint(np.float32(0.375) * r))]
    assert q.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0], row2]
    assert row2 == [127, 64, -32, 16]  # 63.5 -> 64, -31.75 -> -32, 15.875 -> 16
    assert s.tolist() == [np.float32(2) / np.float32(127), 0.0, np.float32(3) / np.float32(127)]


def test_dynamic_int4_golden_and_ties():
    x = np.array([[7.0, 3.5, -0.5, 2.5, 1.5, -1.5]], dtype=np.float32)  # m=7: r=1, values are ties
    q, s = quantize_dynamic_per_token(x, bits=4)
    assert q.tolist() == [[7, 4, 0, 2, 2, -2]]
    assert s.tolist() == [1.0]


def test_nonfinite_rows_give_nan_scale_and_zero_codes():
    x = np.array([[1.0, np.nan], [np.inf, 1.0], [-np.inf, 0.0], [1.0, 2.0]], dtype=np.float32)
    q, s = quantize_dynamic_per_token(x)
    assert q[:3].tolist() == [[0, 0]] * 3 and q[3].tolist() == [64, 127]
    assert np.isnan(s[:3]).all() and np.isfinite(s[3])


def test_empty_batch_and_leading_dims():
    q, s = quantize_dynamic_per_token(np.zeros((0, 5), np.float32))
    assert q.shape == (0, 5) and s.shape == (0,)
    q3, s3 = quantize_dynamic_per_token(np.ones((2, 3, 4), ml_dtypes.bfloat16))
    assert q3.shape == (2, 3, 4) and (q3 == 127).all() and s3.shape == (2, 3)


@given(finite_rows, st.sampled_from([8, 4]))
def test_dynamic_error_bound_and_requantization_identity(x, bits):
    q, s = quantize_dynamic_per_token(x, bits)
    qmax = 127 if bits == 8 else 7
    assert np.abs(q).max(initial=0) <= qmax
    # rows whose qmax/m overflows float32 (subnormal maxima) saturate instead: tested below
    nonzero = (s > 0) & (np.abs(x).max(axis=1) >= qmax / np.finfo(np.float32).max)
    # |q*s - x| <= s/2, plus float32 slack: r = f32(qmax/m) and the product x*r are each
    # rounded (relative 2^-24 each), so q may sit up to |x*r|*2^-23 <= qmax*2^-23 code
    # units past the exact rounding point; in x units that is s*qmax*2^-23.
    err = np.abs(q.astype(np.float64) * s[:, None] - x.astype(np.float64))
    bound = s[:, None].astype(np.float64) * (0.5 + qmax * 2.0**-23)
    assert np.all(err[nonzero] <= bound[nonzero])
    # the max element always maps to +-qmax
    rows = np.flatnonzero(nonzero)
    assert np.all(np.abs(q[rows]).max(axis=1) == qmax)
    # requantizing the dequantized row in float32 reproduces the codes
    deq = (q.astype(np.float32) * s[:, None]).astype(np.float32)
    q2, _ = quantize_dynamic_per_token(deq, bits)
    assert np.array_equal(q2[rows], q[rows])


def test_subnormal_row_maximum_saturates_symmetrically():
    x = np.array([[-1e-45, 0.0, 1e-45]], dtype=np.float32)  # 127 / 1e-45 overflows float32
    q8, s8 = quantize_dynamic_per_token(x, 8)
    q4, s4 = quantize_dynamic_per_token(x, 4)
    assert q8.tolist() == [[-127, 0, 127]] and q4.tolist() == [[-7, 0, 7]]
    assert s8[0] == 0 and s4[0] == 0  # 1e-45 / 127 underflows: the output is the bias


def test_static_params_follow_vllm_ascend_load_time_rounding():
    # input_scale 0.013 in bf16 is 0.01300048828125; 1/that = 76.92019..., in bf16 -> 77.0
    recip, off = static_quant_params(np.float32(0.013), np.float32(-3.0), "bfloat16")
    assert recip == np.float32(77.0) and off == np.float32(-3.0)
    recip32, _ = static_quant_params(np.array([0.013], np.float32), np.array([5.0], np.float32), "float32")
    assert recip32 == np.float32(1) / np.float32(0.013)
    recip16, _ = static_quant_params(np.float32(0.013), np.float32(0), "float16")
    s16 = np.float32(np.float16(0.013))
    assert recip16 == np.float32(np.float16(np.float32(1) / s16))
    with pytest.raises(ValueError, match="one value each"):
        static_quant_params(np.ones(2, np.float32), np.zeros(1, np.float32), "bf16")


def test_static_quantization_golden_with_offset_and_saturation():
    recip, off = np.float32(4.0), np.float32(-3.0)
    x = np.array([0.125, 0.375, -0.125, 100.0, -100.0, np.inf, -np.inf, np.nan, -0.0], np.float32)
    # x*4 - 3: -2.5 -> -2 (tie, even), -1.5 -> -2, -3.5 -> -4, 397 -> 127, -403 -> -128
    assert quantize_static(x, recip, off).tolist() == [-2, -2, -4, 127, -128, 127, -128, 0, -3]


@given(hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-50, 50, width=32)),
       st.floats(0.125, 2.0, width=32), st.integers(-20, 20))
def test_static_matches_two_separately_rounded_float32_ops(x, scale, offset):
    recip, off = static_quant_params(np.float32(scale), np.float32(offset), "float32")
    q = quantize_static(x, recip, off)
    prod = np.float32(x) * recip  # float32 op 1
    expect = np.clip(np.rint(np.float32(prod + off)), -128, 127)  # float32 op 2, then rint
    assert np.array_equal(q, expect.astype(np.int8))
