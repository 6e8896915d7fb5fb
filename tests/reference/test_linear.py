"""The linear forward of every algorithm ID from checkpoint tensors.

Golden vectors are built by hand (literal tensors, expected outputs worked out in the
comments); every expected value is exactly representable in the output dtype, so
outputs are compared bit-exactly ("0 ulp: the expected value is the correctly rounded
result of the specified op sequence").
"""

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ascend_quant.reference import weight_quant as wq
from ascend_quant.reference.activation_quant import quantize_dynamic_per_token
from ascend_quant.reference.algorithms import LINEAR_ALGORITHMS
from ascend_quant.reference.flatquant import kronecker_transform, transform_weight
from ascend_quant.reference.linear import (
    EXPECTED_TENSORS, linear_forward, validate_tensors, w4a4_dynamic_linear, w4a4_flatquant_linear,
    w4a8_dynamic_linear, w4a16_linear, w8a8_dynamic_linear, w8a8_mix_linear, w8a8_static_linear,
    w8a16_linear,
)
from ascend_quant.reference.packing import unpack_int32_offset8_to_int4
from ascend_quant.reference.scale_encoding import encode_float32_as_int64

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)


def bf(values):
    return np.array(values, dtype=np.float64).astype(np.float32).astype(BF16)


def f32(values):
    return np.array(values, dtype=np.float32)


def i8(values):
    return np.array(values, dtype=np.int8)


def assert_bits(y, expected, dt):
    """0 ulp: same dtype, same shape, same bit patterns (NaN compared as NaN)."""
    expected = np.array(expected, dtype=np.float64).astype(np.float32).astype(dt)
    assert y.dtype == dt and y.shape == expected.shape
    assert np.array_equal(y.astype(np.float64), expected.astype(np.float64), equal_nan=True), (y, expected)


# ---------------------------------------------------------------------------------------
# W8A16
# ---------------------------------------------------------------------------------------

W8A16_PER_CHANNEL = {
    "weight": i8([[10, -20, 30, 127], [104, 0, 0, 0], [127, 127, 3, 2]]),
    "weight_scale": f32([[0.5], [0.1], [1.0]]),   # 0.1 -> bf16 0.10009765625 = 205/2048 at load
    "weight_offset": f32([[2.0], [0.0], [0.0]]),
}


def test_w8a16_per_channel_golden_bf16():
    x = bf([[1, 2, -1, 0.5], [1, 2, 0, 2.0**-20]])
    y = w8a16_linear(x, W8A16_PER_CHANNEL, dtype="bfloat16", bias=bf([0.5, 0, 0]))
    # row 0 = (q - 2) * 0.5 = [4, -11, 14, 62.5] (msModelSlim's minus; vLLM Ascend's "+offset" would
    #   give [6, -9, 16, 64.5] and y[0,0] = 4.75):
    #   x0: 4 - 22 - 14 + 31.25 + 0.5 = -0.25;  x1: 4 - 22 + 0 + 62.5*2^-20 + 0.5 = -17.4999... -> -17.5
    # row 1 = 104 * 205/2048 = 10.41015625 -> bf16 step 1/16: 166.56 steps -> 10.4375 (with the
    #   unrounded f32 scale 0.1 it would be 10.4 -> 10.375: the load-time rounding matters)
    # row 2: x0: 127 + 254 - 3 + 1 = 379, bf16 step 2: tie -> 380 (even);
    #   x1: 381 + 2 * 2^-20 = 381 + 2^-19: rounded once -> 382 (via float32 first: 381 is a tie -> 380)
    assert_bits(y, [[-0.25, 10.4375, 380], [-17.5, 10.4375, 382]], BF16)


def test_w8a16_per_group_and_ragged_last_group_fp16():
    t = {"weight": i8([[1, 2, 3, 4, 5, 6]]), "weight_scale": f32([[0.5, 0.25]]), "weight_offset": f32([[1, -2]])}
    # g = 6/2 = 3: w = [(0, 1, 2) * 0.5, (6, 7, 8) * 0.25] = [0, 0.5, 1, 1.5, 1.75, 2]
    y = w8a16_linear(np.array([[2, -1, 0.5, 1, -2, 4]], F16), t, dtype="float16")
    assert_bits(y, [[0 - 0.5 + 0.5 + 1.5 - 3.5 + 8]], F16)  # 6.0
    ragged = {"weight": i8([[1, 2, 3, 4, 5]]), "weight_scale": f32([[0.5, 0.25]]), "weight_offset": f32([[1, -2]])}
    x5 = np.array([[2, -1, 0.5, 1, -2]], F16)
    # group_size 3 over K=5: groups [0:3] and [3:5]: w = [0, 0.5, 1, 1.5, 1.75] -> -0.5 + 0.5 + 1.5 - 3.5
    assert_bits(w8a16_linear(x5, ragged, dtype="float16", group_size=3), [[-2.0]], F16)
    with pytest.raises(ValueError, match="weight_scale: 2 groups do not divide K=5.*pass group_size"):
        w8a16_linear(x5, ragged, dtype="float16")
    with pytest.raises(ValueError, match="weight_scale: group_size 2 gives ceil.*= 3 groups"):
        w8a16_linear(x5, ragged, dtype="float16", group_size=2)


# ---------------------------------------------------------------------------------------
# W4A16
# ---------------------------------------------------------------------------------------

# q row 0 = [1, -2, 3, -4, 5, -6, 7, -8] -> stored q + 8 = [9, 6, 11, 4, 13, 2, 15, 0], nibble j at
# bits 4j -> 0x0F2D4B69; q row 1 = [0]*4 + [1]*4 -> [8]*4 + [9]*4 -> 0x99998888
W4A16_PACKED = np.array([[0x0F2D4B69], [0x99998888]], dtype=np.uint32).view(np.int32)


def test_w4a16_golden_per_group_bf16():
    t = {"weight_packed": W4A16_PACKED, "weight_scale": f32([[0.5, 0.25], [1.0, 0.1]]),
         "weight_shape": np.array([2, 8], np.int32)}
    x = bf([[1] * 8, [2, 0, 0, 0, 0, 0, 0, 1]])
    y = w4a16_linear(x, t, dtype="bfloat16", bias=None)
    # x0: row 0 = (1-2+3-4)*0.5 + (5-6+7-8)*0.25 = -1.5; row 1 = 4 * bf16(0.1) = 4 * 205/2048 = 0.400390625
    # x1: row 0 = 2*0.5 - 8*0.25 = -1; row 1 = 205/2048 = 0.10009765625 (exact in bf16)
    assert_bits(y, [[-1.5, 0.400390625], [-1.0, 0.10009765625]], BF16)


def test_w4a16_weight_shape_crops_padding_and_bias():
    t = {"weight_packed": W4A16_PACKED, "weight_scale": f32([[0.5], [1.0]]), "weight_shape": np.array([2, 6], np.int64)}
    y = w4a16_linear(bf([[1] * 6]), t, dtype="bfloat16", bias=bf([0.25, -3]))
    # K = 6: row 0 = (1-2+3-4+5-6)*0.5 + 0.25 = -1.25; row 1 = (0+0+0+0+1+1)*1 - 3 = -1
    assert_bits(y, [[-1.25, -1.0]], BF16)
    bad = dict(t, weight_shape=np.array([2, 16], np.int32))
    with pytest.raises(ValueError, match="weight_shape: .*ceil\\(K/8\\) = 1"):
        w4a16_linear(bf([[1] * 16]), bad, dtype="bfloat16")


# ---------------------------------------------------------------------------------------
# W8A8 static, W8A8_DYNAMIC, W8A8_MIX
# ---------------------------------------------------------------------------------------

W8A8_STATIC = {
    "weight": i8([[1, 2, 3, 4], [-1, 0, 1, 2]]),
    "input_scale": f32([0.5]),      # recip = 2 in every dtype
    "input_offset": f32([3.0]),
    "deq_scale": f32([0.25, 0.125]),
    "quant_bias": np.array([7, -3], np.int32),
}


def test_w8a8_static_golden_quant_bias_added_once():
    x = bf([[1.0, -2.0, 0.75, 100.0], [0, 0, 0, 0]])
    # x*2 + 3 = [5, -1, 4.5, 203] -> q = [5, -1, 4 (tie, even), 127 (saturated)]; zero row -> q = [3]*4
    # acc = [5-2+12+508, -5+0+4+254] = [523, 253]; zero row: [3*10, 3*2] = [30, 6]
    y = w8a8_static_linear(x, W8A8_STATIC, dtype="bfloat16")
    # + quant_bias [7, -3]: [530, 250] * [0.25, 0.125] = [132.5 -> 132 (bf16 step 1, tie to even), 31.25]
    # zero row: [37, 3] * deq = [9.25, 0.375]
    assert_bits(y, [[132, 31.25], [9.25, 0.375]], BF16)
    y_rank1 = w8a8_static_linear(x, W8A8_STATIC, dtype="bfloat16", add_quant_bias=False)
    # [523, 253] * deq = [130.75 -> 131, 31.625]; zero row [7.5, 0.75]
    assert_bits(y_rank1, [[131, 31.625], [7.5, 0.75]], BF16)
    # fp16 output: 132.5 is exact there
    y16 = w8a8_static_linear(x.astype(F16), W8A8_STATIC, dtype="float16")
    assert_bits(y16, [[132.5, 31.25], [9.25, 0.375]], F16)


def test_w8a8_static_int64_and_float32_deq_scale_identical():
    t64 = dict(W8A8_STATIC, deq_scale=encode_float32_as_int64(f32([0.25, 0.125])))
    rng = np.random.default_rng(1)
    x = rng.normal(0, 20, (5, 4)).astype(np.float16)
    a = w8a8_static_linear(x, W8A8_STATIC, dtype="float16")
    b = w8a8_static_linear(x, t64, dtype="float16")
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16))  # same float32 value: bit-identical
    bad = dict(W8A8_STATIC, deq_scale=np.array([2**40, 1], np.int64))
    with pytest.raises(ValueError, match="deq_scale: int64 value"):
        w8a8_static_linear(x, bad, dtype="float16")


def test_w8a8_static_edge_rows_and_overflow_is_reported():
    # codes per element: 0*2 + 3 -> q = 3; 1e30 saturates to 127; but a row holding NaN or +-inf
    # gives a NaN row (docs/numerics.md §4), although its codes (NaN -> 0, inf -> 127) are finite
    x = bf([[0, 0, 0, 0], [1e30, 0, 0, 0], [np.nan, 0, 0, 0], [0, 0, -np.inf, 0]])
    y = w8a8_static_linear(x, W8A8_STATIC, dtype="bfloat16")
    # zero row: q = [3, 3, 3, 3]: acc = [30, 6] + [7, -3] = [37, 3] -> [9.25, 0.375] (the folded bias)
    # huge row: q = [127, 3, 3, 3]: acc = [154, -118] + [7, -3] = [161, -121] -> [40.25, -15.125]
    assert_bits(y, [[9.25, 0.375], [40.25, -15.125], [np.nan, np.nan], [np.nan, np.nan]], BF16)
    big = dict(W8A8_STATIC, weight=np.full((2, 4), 127, np.int8),
               quant_bias=np.array([2**31 - 1, 0], np.int32))
    with pytest.raises(OverflowError, match="accumulator \\+ quant_bias"):
        w8a8_static_linear(bf([[100, 100, 100, 100]]), big, dtype="bfloat16")


W8A8_DYN = {"weight": i8([[1, 2, 3, 4], [-1, 1, -1, 1]]), "weight_scale": f32([[0.1], [0.75]])}
X_DYN = bf([[254, -3, 5, 1], [0, 0, 0, 0], [np.nan, 1, 1, 1], [1, np.inf, 0, 0]])


def test_w8a8_dynamic_golden_bias_zero_and_nan_rows():
    y = w8a8_dynamic_linear(X_DYN, W8A8_DYN, dtype="bfloat16", bias=bf([0.5, -1.0]))
    # row 0: m = 254, r = 0.5, s = 2; q = [127, -2 (-1.5), 2 (2.5), 0 (0.5)]: ties to even
    # acc = [127-4+6+0, -127-2-2+0] = [129, -131]; s_w = bf16(0.1) = 205/2048, 0.75
    # n0: 129*205/2048 = 12.91259765625; *2 = 25.8251953125; +0.5 = 26.3251953125 -> bf16 step 1/8 -> 26.375
    #     (with the f32 scale 0.1: 26.3 -> 26.25)
    # n1: -131*0.75 = -98.25; *2 = -196.5; -1 = -197.5 -> bf16 step 1: tie -> -198 (even)
    # zero row -> exactly the bias; NaN/inf rows -> NaN
    assert_bits(y, [[26.375, -198], [0.5, -1], [np.nan, np.nan], [np.nan, np.nan]], BF16)
    y_nb = w8a8_dynamic_linear(X_DYN[:2], W8A8_DYN, dtype="bfloat16")
    # 25.8251953125 -> 25.875; -196.5 -> -196 (tie, even); zero row -> +0.0
    assert_bits(y_nb, [[25.875, -196], [0, 0]], BF16)
    y16 = w8a8_dynamic_linear(X_DYN[:1].astype(F16), W8A8_DYN, dtype="float16", bias=np.array([0.5, -1], F16))
    # fp16(0.1) = 819/8192: 129*819/8192*2 + 0.5 = 26.293701171875 -> fp16 step 1/64 -> 26.296875; -197.5 exact
    assert_bits(y16, [[26.296875, -197.5]], F16)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["bfloat16", "float16", "float32"]))
def test_w8a8_dynamic_matches_scalar_float32_op_sequence(seed, dtype):
    """Independent route: Python ints for acc, NumPy float32 scalars for each op in order."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    m, n, k = 3, 4, 7
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    sw = rng.uniform(1e-3, 2e-2, (n, 1)).astype(np.float32)
    x = rng.normal(0, 3, (m, k)).astype(np.float32).astype(dt)
    b = rng.normal(0, 1, n).astype(np.float32).astype(dt)
    y = w8a8_dynamic_linear(x, {"weight": w, "weight_scale": sw}, dtype=dtype, bias=b)
    xq, s = quantize_dynamic_per_token(x, 8)  # stage isolation: the quantizer has its own tests
    swr = sw.reshape(-1).astype(dt).astype(np.float32)
    for i in range(m):
        for j in range(n):
            acc = sum(int(xq[i, t]) * int(w[j, t]) for t in range(k))
            v = np.float32(np.float32(acc) * swr[j])
            v = np.float32(v * s[i])
            v = np.float32(v + np.float32(b[j]))
            assert np.array_equal(np.array([v]).astype(dt).astype(np.float64), y[i:i + 1, j].astype(np.float64))


W8A8_MIX_T = {
    "weight": i8([[1, 2, 3, 4], [-1, 1, -1, 1]]),
    "input_scale": f32([2.0]), "input_offset": f32([0.0]),
    "deq_scale": encode_float32_as_int64(f32([0.25, 0.5])), "quant_bias": np.array([1, 0], np.int32),
    "weight_scale": f32([[0.1], [0.75]]), "weight_offset": f32([[0], [0]]),
}


def test_w8a8_mix_both_modes_golden():
    x = X_DYN[:2]
    b = bf([0.5, -1.0])
    # kv_consumer: static. recip 0.5, offset 0: q = [127, -2, 2, 0] (same codes as dynamic), acc [129, -131]
    # + quant_bias [1, 0]: [130*0.25, -131*0.5] = [32.5, -65.5]; zero row: [0.25, 0]; float bias ignored
    y_static = w8a8_mix_linear(x, W8A8_MIX_T, dtype="bfloat16", bias=b, kv_consumer=True)
    assert_bits(y_static, [[32.5, -65.5], [0.25, 0]], BF16)
    assert_bits(w8a8_mix_linear(x, W8A8_MIX_T, dtype="bfloat16", kv_consumer=True, add_quant_bias=False),
                [[32.25, -65.5], [0, 0]], BF16)
    # otherwise dynamic, with weight_scale and the float bias: the W8A8_DYNAMIC golden
    y_dyn = w8a8_mix_linear(x, W8A8_MIX_T, dtype="bfloat16", bias=b)
    assert_bits(y_dyn, [[26.375, -198], [0.5, -1]], BF16)
    assert np.array_equal(y_static, linear_forward("W8A8_MIX", x, W8A8_MIX_T, dtype="bf16", bias=b, kv_consumer=True),
                          equal_nan=True)


# ---------------------------------------------------------------------------------------
# W4A8_DYNAMIC
# ---------------------------------------------------------------------------------------

# int4 weights (rows = output channels):
W4 = [[1, -1, 7, -8],     # acc with q = [127, -2, 2, 0]: 127 + 2 + 14 = 143
      [2, 0, -3, 1],      # 254 - 6 = 248
      [3, 0, 0, 0],       # 381
      [-1, -2, -3, -4]]   # -127 + 4 - 6 = -129
# packed along N: byte row j = W4[2j] low nibble | W4[2j+1] high nibble
#   row 0: 0x21=33, 0x0F=15, 0xD7=-41, 0x18=24;  row 1: 0xF3=-13, 0xE0=-32, 0xD0=-48, 0xC1=-63
W4_PACKED = i8([[33, 15, -41, 24], [-13, -32, -48, -63]])
W4A8_BIAS = bf([0.5, 0, 1, 0])


def test_w4a8_per_channel_golden_packed_and_unpacked():
    t = {"weight": W4_PACKED, "weight_scale": f32([[0.5], [0.25], [0.1], [0.125]]),
         "weight_offset": f32([[0]] * 4), "scale_bias": f32([[9.0]] * 4)}
    x = X_DYN[:2]  # q = [127, -2, 2, 0], s_tok = 2
    y = w4a8_dynamic_linear(x, t, dtype="bfloat16", bias=W4A8_BIAS)
    # t = acc * S = [71.5, 62, f32(381 * f32(0.1)) = 38.1..., -16.125]; *2 + bias = [143.5, 124, 77.2.., -32.25]
    # bf16: 143.5 -> 144 (tie, even); 77.2 -> 77.0 (step 0.5; scale kept float32 -- a bf16-rounded
    # scale 0.10009765625 would give 77.27 -> 77.5); scale_bias is not used
    assert_bits(y, [[144, 124, 77.0, -32.25], [0.5, 0, 1, 0]], BF16)
    unpacked = dict(t, weight=i8(W4))  # older exports: one int4 per byte
    assert np.array_equal(w4a8_dynamic_linear(x, unpacked, dtype="bfloat16", bias=W4A8_BIAS), y)


def test_w4a8_per_group_golden_and_per_channel_equivalence():
    s1 = f32([[0.5], [0.25], [0.1], [0.125]])
    t = {"weight": W4_PACKED, "weight_scale": s1,
         "weight_scale_second": f32([[1, 2], [0.5, 4], [1, 1], [2, 0.25]]),
         "weight_offset_second": np.zeros((4, 2), np.int64)}
    x = X_DYN[:2]
    y = w4a8_dynamic_linear(x, t, dtype="bfloat16", bias=W4A8_BIAS)
    # g = 2, S = s1 * s2 = [[0.5, 1], [0.125, 1], [0.1, 0.1], [0.25, 0.03125]]
    # acc per group (q = [127, -2 | 2, 0]): [129 | 14], [254 | -6], [381 | 0], [-123 | -6]
    # t = [64.5 + 14, 31.75 - 6, 381*0.1, -30.75 - 0.1875] = [78.5, 25.75, 38.1.., -30.9375]
    # *2 + bias = [157.5 -> 158, 51.5, 77.2 -> 77.0, -61.875 -> -62 (bf16 step 0.25, tie to even)]
    assert_bits(y, [[158, 51.5, 77.0, -62], [0.5, 0, 1, 0]], BF16)
    ones = dict(t, weight_scale_second=np.ones((4, 2), np.float32))
    per_channel = {"weight": W4_PACKED, "weight_scale": s1}
    rng = np.random.default_rng(2)
    xr = rng.normal(0, 5, (6, 4)).astype(np.float32).astype(BF16)
    # with s2 = 1 the per-group sum of exact products equals f32(acc) * s1: bit-identical
    assert np.array_equal(w4a8_dynamic_linear(xr, ones, dtype="bfloat16", bias=W4A8_BIAS),
                          w4a8_dynamic_linear(xr, per_channel, dtype="bfloat16", bias=W4A8_BIAS))


# ---------------------------------------------------------------------------------------
# W4A4_DYNAMIC and FlatQuant
# ---------------------------------------------------------------------------------------

W4A4_T = {"weight": i8([[1, 2, 3, 4], [-1, 1, -1, 1], [7, -8, 0, 0], [3, 0, 0, 0]]),
          "weight_scale": f32([[0.5], [0.25], [1.0], [0.1]])}
W4A4_BIAS = bf([0.25, 0, 1.5, 0])
X4 = bf([[14, -3, 5, 1]])
# per-token int4: m = 14, r = 0.5, s = 2; q = [7, -2 (-1.5), 2 (2.5), 0 (0.5)]
# acc = [7-4+6, -7-2-2, 49+16, 21] = [9, -11, 65, 21]
# *s_w*2 + bias = [9.25, -5.5, 131.5 -> 132 (tie, even), 4.2 -> 4.1875 (bf16 step 1/32;
#   a bf16-rounded scale would give 4.204 -> 4.21875)]
W4A4_GOLDEN = [[9.25, -5.5, 132, 4.1875]]


def test_w4a4_dynamic_golden_zero_nan_rows():
    x = np.concatenate([X4, bf([[0, 0, 0, 0], [np.nan, 0, 0, 0]])])
    y = w4a4_dynamic_linear(x, W4A4_T, dtype="bfloat16", bias=W4A4_BIAS)
    assert_bits(y, W4A4_GOLDEN + [[0.25, 0, 1.5, 0], [np.nan] * 4], BF16)


def test_w4a4_dynamic_has_no_fp16_intermediate():
    # vLLM Ascend rounds to fp16 first: 65 * 1000 * 2 = 130000 > 65504 would be inf there.
    t = {"weight": W4A4_T["weight"][2:3], "weight_scale": f32([[1000.0]])}
    y = w4a4_dynamic_linear(X4, t, dtype="bfloat16")
    assert_bits(y, [[130048]], BF16)  # bf16 step 512 above 2^16: 130000/512 = 253.9 -> 254*512


def test_flatquant_identity_transforms_equal_w4a4():
    t = dict(W4A4_T, left_trans=np.eye(2, dtype=np.float32), right_trans=np.eye(2, dtype=np.float32),
             clip_ratio=f32([1.0]))
    y = w4a4_flatquant_linear(X4, t, dtype="bfloat16", bias=W4A4_BIAS)
    assert_bits(y, W4A4_GOLDEN, BF16)  # X' = fp16(X) = X, scale m*1/7 = 2: the W4A4_DYNAMIC codes


def test_flatquant_transforms_clip_and_oproj_form():
    base = dict(W4A4_T, clip_ratio=f32([1.0]))
    # X viewed [[14, -3], [5, 1]]. left = diag(2, 1), right = swap: X @ R = [[-3, 14], [1, 5]],
    # L^T (X R) = [[-6, 28], [1, 5]] -> x' = [-6, 28, 1, 5]; m = 28, s = 4, q = [-2 (-1.5), 7, 0, 1]
    # acc = [-2+14+4, 2+7+1, -14-56, -6] = [16, 10, -70, -6]; *s_w*4 + bias:
    # [32.25, 10, -278.5 -> -278 (bf16 step 2), f32(-6*f32(0.1))*4 = -2.4000001 -> -2.40625 (step 1/64)]
    t = dict(base, left_trans=f32([[2, 0], [0, 1]]), right_trans=f32([[0, 1], [1, 0]]))
    assert_bits(w4a4_flatquant_linear(X4, t, dtype="bfloat16", bias=W4A4_BIAS),
                [[32.25, 10, -278, -2.40625]], BF16)
    # non-symmetric factors, to pin the transposes (X' = left^T X right, both as stored):
    # left = [[1, 1], [0, 1]], right = I, x = [7, -3, 7, 1]: left^T X = [[7, -3], [14, -2]] (left X would be
    # [[14, -2], [7, 1]]); m = 14, s = 2, q = [4 (3.5), -2 (-1.5), 7, -1]; acc = [17, -14, 44, 12]
    # -> [17.25, -7, 89.5, f32(12*f32(0.1))*2 = 2.4000001 -> 2.40625]
    t = dict(base, left_trans=f32([[1, 1], [0, 1]]), right_trans=np.eye(2, dtype=np.float32))
    assert_bits(w4a4_flatquant_linear(bf([[7, -3, 7, 1]]), t, dtype="bfloat16", bias=W4A4_BIAS),
                [[17.25, -7, 89.5, 2.40625]], BF16)
    # left = I, right = [[1, 0], [1, 1]], x = [10, 4, -3, 1]: X right = [[14, 4], [-2, 1]] (X right^T would be
    # [[10, 14], [-3, -2]]); s = 2, q = [7, 2, -1, 0 (0.5)]; acc = [8, -4, 33, 21] -> [8.25, -2, 67.5, 4.1875]
    t = dict(base, left_trans=np.eye(2, dtype=np.float32), right_trans=f32([[1, 0], [1, 1]]))
    assert_bits(w4a4_flatquant_linear(bf([[10, 4, -3, 1]]), t, dtype="bfloat16", bias=W4A4_BIAS),
                [[8.25, -2, 67.5, 4.1875]], BF16)
    # o_proj form: left only (2 heads of size 2), swap heads: x' = [5, 1, 14, -3]; s = 2, q = [2, 0, 7, -2]
    # acc = [2+21-8, -2-7-2, 14, 6] = [15, -11, 14, 6]; *s_w*2 + bias = [15.25, -5.5, 29.5, 1.2 -> 1.203125]
    t = dict(base, left_trans=f32([[0, 1], [1, 0]]))
    assert_bits(w4a4_flatquant_linear(X4, t, dtype="bfloat16", bias=W4A4_BIAS),
                [[15.25, -5.5, 29.5, 1.203125]], BF16)
    # clip 0.5, identity: r = (7/0.5)/14 = 1, q = [7 (14 saturates), -3, 5, 1], s = 14*0.5/7 = 1
    # acc = [7-6+15+4, -7-3-5+1, 49+24, 21] = [20, -14, 73, 21] -> [10.25, -3.5, 74.5, 2.1 -> 2.09375]
    t = dict(base, left_trans=np.eye(2, dtype=np.float32), right_trans=np.eye(2, dtype=np.float32),
             clip_ratio=f32([0.5]))
    assert_bits(w4a4_flatquant_linear(X4, t, dtype="bfloat16", bias=W4A4_BIAS),
                [[10.25, -3.5, 74.5, 2.09375]], BF16)
    with pytest.raises(ValueError, match="left_trans/right_trans: left_trans size 3 does not divide K=4"):
        w4a4_flatquant_linear(X4, dict(base, left_trans=np.eye(3, dtype=np.float32)), dtype="bfloat16")


# ---------------------------------------------------------------------------------------
# Every algorithm: M = 0, zero rows, NaN rows, dispatch
# ---------------------------------------------------------------------------------------

CASES = {
    "W8A16": (W8A16_PER_CHANNEL, 4, 3),
    "W4A16": ({"weight_packed": W4A16_PACKED, "weight_scale": f32([[0.5, 0.25], [1.0, 0.1]])}, 8, 2),
    "W8A8": (W8A8_STATIC, 4, 2),
    "W8A8_DYNAMIC": (W8A8_DYN, 4, 2),
    "W8A8_MIX": (W8A8_MIX_T, 4, 2),
    "W4A8_DYNAMIC": ({"weight": W4_PACKED, "weight_scale": f32([[0.5], [0.25], [0.1], [0.125]])}, 4, 4),
    "W4A4_DYNAMIC": (W4A4_T, 4, 4),
    "W4A4_FLATQUANT_DYNAMIC": (dict(W4A4_T, left_trans=f32([[2, 0], [0, 1]]), right_trans=f32([[0, 1], [1, 0]]),
                                    clip_ratio=f32([1.0])), 4, 4),
}
DYNAMIC = ["W8A8_DYNAMIC", "W8A8_MIX", "W4A8_DYNAMIC", "W4A4_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC"]


def test_cases_cover_every_algorithm():
    assert sorted(CASES) == sorted(LINEAR_ALGORITHMS) == sorted(EXPECTED_TENSORS)


@pytest.mark.parametrize("algo", sorted(CASES))
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_empty_batch(algo, dtype):
    t, k, n = CASES[algo]
    y = linear_forward(algo, np.zeros((0, k), dtype), t, dtype=dtype, bias=np.ones(n, dtype))
    assert y.dtype == dtype and y.shape == (0, n)


@pytest.mark.parametrize("algo", DYNAMIC)
def test_zero_row_gives_exactly_the_bias_and_nan_row_gives_nan(algo):
    t, k, n = CASES[algo]
    bias = bf(np.linspace(-3.5, 2.25, n))
    x = np.zeros((3, k), BF16)
    x[1, 0] = np.nan
    x[2, k - 1] = -np.inf
    y = linear_forward(algo, x, t, dtype="bfloat16", bias=bias)
    assert np.array_equal(y[0].view(np.uint16), bias.view(np.uint16))
    assert np.isnan(y[1:].astype(np.float32)).all()


@pytest.mark.parametrize("algo", ["W8A16", "W4A16"])
def test_weight_only_propagates_nan(algo):
    t, k, n = CASES[algo]
    x = np.ones((2, k), BF16)
    x[1, 0] = np.nan
    y = linear_forward(algo, x, t, dtype="bfloat16")
    assert np.isfinite(y[0].astype(np.float32)).all() and np.isnan(y[1].astype(np.float32)).all()


def test_dispatch_matches_direct_calls_and_ignores_float_bias_for_static():
    x = X_DYN[:2]
    assert np.array_equal(linear_forward("W8A8", x, W8A8_STATIC, dtype="bf16", bias=bf([100, 100])),
                          w8a8_static_linear(x, W8A8_STATIC, dtype="bf16"))
    assert np.array_equal(linear_forward("W8A8", x, W8A8_STATIC, dtype="bf16", add_quant_bias=False),
                          w8a8_static_linear(x, W8A8_STATIC, dtype="bf16", add_quant_bias=False))
    assert np.array_equal(linear_forward("W8A8_DYNAMIC", x, W8A8_DYN, dtype="bf16", bias=bf([1, 2])),
                          w8a8_dynamic_linear(x, W8A8_DYN, dtype="bf16", bias=bf([1, 2])))
    assert np.array_equal(linear_forward("W4A4_DYNAMIC", X4, W4A4_T, dtype="bf16", bias=W4A4_BIAS),
                          w4a4_dynamic_linear(X4, W4A4_T, dtype="bf16", bias=W4A4_BIAS))
    for algo in ("W8A8S", "FLOAT", "w8a8"):
        with pytest.raises(ValueError, match=f"unsupported algorithm ID '{algo}' for linear layers"):
            linear_forward(algo, x, W8A8_DYN, dtype="bf16")


# ---------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------

def test_missing_and_unknown_tensors_are_named():
    t = {k: v for k, v in W8A8_STATIC.items() if k != "deq_scale"}
    with pytest.raises(ValueError, match="deq_scale: missing tensor for W8A8; W8A8 needs weight, input_scale, "
                                         "input_offset, deq_scale, quant_bias"):
        w8a8_static_linear(X_DYN[:1], t, dtype="bf16")
    with pytest.raises(ValueError, match="weight_scales: not a tensor of W8A8_DYNAMIC; expected weight, weight_scale"):
        w8a8_dynamic_linear(X_DYN[:1], dict(W8A8_DYN, weight_scales=f32([1])), dtype="bf16")
    with pytest.raises(ValueError, match="bias: .*pass it as bias="):
        w8a8_dynamic_linear(X_DYN[:1], dict(W8A8_DYN, bias=bf([0, 0])), dtype="bf16")
    with pytest.raises(ValueError, match="right_trans: missing|left_trans: missing"):
        w4a4_flatquant_linear(X4, dict(W4A4_T, clip_ratio=f32([1])), dtype="bf16")


def test_wrong_dtype_and_shape_are_named_with_expected_and_found():
    with pytest.raises(ValueError, match="weight: expected dtype int8, got float32"):
        w8a8_dynamic_linear(X_DYN[:1], dict(W8A8_DYN, weight=W8A8_DYN["weight"].astype(np.float32)), dtype="bf16")
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \(N, 1\) = \(2, 1\), got \(2, 2\)"):
        w8a8_dynamic_linear(X_DYN[:1], dict(W8A8_DYN, weight_scale=np.ones((2, 2), np.float32)), dtype="bf16")
    with pytest.raises(ValueError, match="weight_scale: expected dtype float32, got bfloat16"):
        w8a8_dynamic_linear(X_DYN[:1], dict(W8A8_DYN, weight_scale=bf([[1], [1]])), dtype="bf16")
    with pytest.raises(ValueError, match="deq_scale: expected dtype int64 or float32, got float16"):
        w8a8_static_linear(X_DYN[:1], dict(W8A8_STATIC, deq_scale=np.ones(2, np.float16)), dtype="bf16")
    with pytest.raises(ValueError, match=r"quant_bias: expected shape \(N,\) = \(2,\), got \(3,\)"):
        w8a8_static_linear(X_DYN[:1], dict(W8A8_STATIC, quant_bias=np.zeros(3, np.int32)), dtype="bf16")
    with pytest.raises(ValueError, match=r"weight: expected shape \(N/2, K\) = \(2, K\) or "
                                         r"\(N, K\) = \(4, K\), got \(3, 4\)"):
        w4a8_dynamic_linear(X4, {"weight": np.zeros((3, 4), np.int8), "weight_scale": np.ones((4, 1), np.float32)},
                            dtype="bf16")


def test_x_width_dtype_and_bias_are_checked():
    with pytest.raises(ValueError, match="x: width 3 does not match the weight's input features K = 4"):
        w8a8_dynamic_linear(bf([[1, 2, 3]]), W8A8_DYN, dtype="bf16")
    with pytest.raises(ValueError, match="x: dtype float32 differs from the model dtype bfloat16"):
        w8a8_dynamic_linear(f32([[1, 2, 3, 4]]), W8A8_DYN, dtype="bf16")
    with pytest.raises(ValueError, match=r"x: expected a 2-D \[M, K\] array"):
        w8a8_dynamic_linear(bf([1, 2, 3, 4]), W8A8_DYN, dtype="bf16")
    with pytest.raises(ValueError, match=r"bias: expected shape \(N,\) = \(2,\), got \(3,\)"):
        w8a8_dynamic_linear(X4, W8A8_DYN, dtype="bf16", bias=bf([1, 2, 3]))
    with pytest.raises(ValueError, match="bias: expected dtype bfloat16 .* or float32, got float16"):
        w8a8_dynamic_linear(X4, W8A8_DYN, dtype="bf16", bias=np.ones(2, np.float16))
    # a float32 bias is rounded to the model dtype, as vLLM's bias parameter holds it
    assert np.array_equal(w8a8_dynamic_linear(X4, W8A8_DYN, dtype="bf16", bias=f32([0.1, 0.2])),
                          w8a8_dynamic_linear(X4, W8A8_DYN, dtype="bf16", bias=bf([0.1, 0.2])))


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_or_non_finite_scales_are_refused(bad):
    with pytest.raises(ValueError, match=r"weight_scale: scales must be finite and > 0, found .* at index \(1, 0\)"):
        w8a8_dynamic_linear(X4, dict(W8A8_DYN, weight_scale=f32([[0.1], [bad]])), dtype="bf16")
    with pytest.raises(ValueError, match="input_scale: scales must be finite and > 0"):
        w8a8_static_linear(X4, dict(W8A8_STATIC, input_scale=f32([bad])), dtype="bf16")
    with pytest.raises(ValueError, match="deq_scale: scales must be finite and > 0"):
        w8a8_static_linear(X4, dict(W8A8_STATIC, deq_scale=encode_float32_as_int64(f32([0.25, bad]))), dtype="bf16")


def test_scale_destroyed_by_load_time_rounding_is_refused():
    # 1e-8 is below fp16's smallest subnormal (2^-24 ~ 6e-8): vLLM Ascend would load 0
    with pytest.raises(ValueError, match="weight_scale: scale .* becomes 0.0 when rounded to the model dtype float16"):
        w8a8_dynamic_linear(X4.astype(F16), dict(W8A8_DYN, weight_scale=f32([[1e-8], [1]])), dtype="float16")
    with pytest.raises(ValueError, match="input_scale: .* when rounded to the model dtype float16"):
        w8a8_static_linear(X4.astype(F16), dict(W8A8_STATIC, input_scale=f32([1e5])), dtype="float16")


def test_int4_range_nonzero_offsets_and_clip_are_checked():
    with pytest.raises(ValueError, match=r"weight: W4A4_DYNAMIC weights are int4 values in \[-8, 7\]"
                                         r".*found range \[-9, 7\]"):
        w4a4_dynamic_linear(X4, dict(W4A4_T, weight=i8([[1, 2, 3, 4], [-9, 1, 1, 1], [7, 0, 0, 0], [0] * 4])),
                            dtype="bf16")
    with pytest.raises(ValueError, match=r"weight: W4A8_DYNAMIC weights are int4 values in \[-8, 7\]"
                                         r".*found range \[0, 8\]"):
        w4a8_dynamic_linear(X4, {"weight": i8([[8, 0, 0, 0]] * 4), "weight_scale": f32([[1]] * 4)}, dtype="bf16")
    with pytest.raises(ValueError, match="weight_offset: W8A8_DYNAMIC weights are symmetric, so weight_offset "
                                         "must be all zeros"):
        w8a8_dynamic_linear(X4, dict(W8A8_DYN, weight_offset=f32([[0], [1]])), dtype="bf16")
    with pytest.raises(ValueError, match=r"clip_ratio: clip ratio must lie in \(0, 1\]"):
        w4a4_flatquant_linear(X4, dict(CASES["W4A4_FLATQUANT_DYNAMIC"][0], clip_ratio=f32([1.5])), dtype="bf16")


def test_validate_tensors_returns_dimensions():
    assert validate_tensors("W4A8_DYNAMIC", {"weight": W4_PACKED, "weight_scale": f32([[1]] * 4),
                                             "weight_scale_second": f32([[1, 1]] * 4),
                                             "scale_bias": f32([[0] * 16] * 4)}) == {"N": 4, "K": 4, "G2": 2, "C": 16}
    dims = validate_tensors("W4A4_FLATQUANT_DYNAMIC", CASES["W4A4_FLATQUANT_DYNAMIC"][0])
    assert dims == {"N": 4, "K": 4, "L": 2, "R": 2}
    for algo, table in EXPECTED_TENSORS.items():
        for name, spec in table.items():
            assert spec.describe() and spec.dtypes and spec.shapes, (algo, name)


# ---------------------------------------------------------------------------------------
# Accuracy against the float product, with tensors from weight_quant
# ---------------------------------------------------------------------------------------


U = {BF16: 2.0**-8, F16: 2.0**-11, F32: 2.0**-24}  # unit roundoff of the output dtype
SLACK = 1 + 2.0**-12  # covers the float32 rounding inside quantizers (<= qmax * 2^-23 of a step)


def _dt_scale_error(scale, dt):
    """|f32(dt(s)) - s|: the load-time rounding of a model-dtype scale (0 for float32 scales)."""
    return np.abs(scale.astype(dt).astype(np.float64) - scale.astype(np.float64))


@given(st.sampled_from(sorted(LINEAR_ALGORITHMS)), st.sampled_from([BF16, F16, F32]), st.integers(0, 2**32 - 1))
def test_close_to_the_float_product_within_the_quantization_bound(algo, dt, seed):
    """|y - (x @ w^T + b)| <= sum_k (|x_k| + ex_k) * ew_k + ex_k * |w_k| + rounding.

    With x^ = x + dx, w^ = w + dw (the values the quantized product really multiplies):
    x^ w^ - x w = x^ dw + dx w, so |y - y_float| <= sum_k |x^_k| |dw_k| + |dx_k| |w_k|, where
    |dw| <= step_w / 2 + |q| * |dt(s) - s| (round-to-nearest codes; plus the load-time scale
    rounding where the algorithm rounds scales to dt) and |dx| <= step_x / 2 (dynamic: the
    per-token step max|x| / qmax; static: input_scale, plus |x| * 3u for the dt-rounded
    reciprocal; weight-only: 0). Then the output rounding u * |y| and float32 epilogue slack.
    A sign error in an offset, a wrong scale or a wrong group would exceed the bound.
    """
    rng = np.random.default_rng(seed)
    n = 4
    k = 64 if algo in ("W4A16", "W4A4_FLATQUANT_DYNAMIC") else int(rng.integers(1, 40))
    m = 3
    w = rng.normal(0, 0.5, (n, k)).astype(np.float32)
    x = rng.normal(0, 2, (m, k)).astype(np.float32).astype(dt)
    b = rng.normal(0, 1, n).astype(np.float32).astype(dt)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ex = np.zeros((m, k))
    bias, kw, extra = b, {}, 0.0
    if algo == "W8A16":
        g = int(rng.choice([0, 8]))
        t = wq.quantize_w8a16(w, symmetric=bool(rng.integers(2)), group_size=g)
        s, o = t["weight_scale"], t["weight_offset"]
        cols = np.arange(k) // (g or k)
        q_o = np.abs(t["weight"].astype(np.float64) - o[:, cols])
        ew = s[:, cols] / 2 * SLACK + q_o * _dt_scale_error(s, dt)[:, cols]
        kw = {"group_size": g}
    elif algo == "W4A16":
        t = wq.quantize_w4a16(w, group_size=16)
        q = unpack_int32_offset8_to_int4(t["weight_packed"], axis=1).astype(np.float64)
        s = t["weight_scale"]
        cols = np.arange(k) // 16
        ew = s[:, cols] / 2 * SLACK + np.abs(q) * _dt_scale_error(s, dt)[:, cols]
    elif algo in ("W8A8", "W8A8_MIX") and (algo == "W8A8" or rng.integers(2)):
        s_in, off = wq.calibrate_input_scale_offset(x)
        fn = wq.quantize_w8a8_static if algo == "W8A8" else wq.quantize_w8a8_mix
        t = fn(w, s_in, off, bias=b.astype(np.float32), deq_scale_dtype=str(rng.choice(["int64", "float32"])))
        q = t["weight"].astype(np.float64)
        s_w = np.abs(w64).max(axis=1, keepdims=True) / 127  # the weight step (recomputed: W8A8 has no weight_scale)
        ew = np.broadcast_to(s_w / 2 * (1 + 2.0**-10), (n, k))
        ex = s_in[0] / 2 * SLACK + np.abs(x64) * 3 * U[dt]
        deq = np.abs(s_in[0] * s_w[:, 0])
        extra = deq / 2 * (1 + 2.0**-10) + np.abs(b.astype(np.float64)) * 2.0**-22  # quant_bias rounding
        kw = {"kv_consumer": True} if algo == "W8A8_MIX" else {}
        bias = b if algo == "W8A8_MIX" else None
    elif algo in ("W8A8_DYNAMIC", "W8A8_MIX"):
        t = wq.quantize_w8a8_mix(w, f32([0.05]), f32([0.0])) if algo == "W8A8_MIX" else wq.quantize_w8a8_dynamic(w)
        q, s = t["weight"].astype(np.float64), t["weight_scale"]
        ew = s / 2 * SLACK + np.abs(q) * _dt_scale_error(s, dt)
        ex = np.broadcast_to(np.abs(x64).max(axis=1, keepdims=True) / 127 / 2 * SLACK, (m, k))
    elif algo == "W4A8_DYNAMIC":
        g = int(rng.choice([0, 8])) if k % 8 == 0 else 0
        t = wq.quantize_w4a8_dynamic(w, group_size=g)
        s1 = t["weight_scale"].astype(np.float64)
        if g:
            s2 = t["weight_scale_second"].astype(np.float64)[:, np.arange(k) // g]
            ew = s1 / 2 * SLACK + s1 * s2 / 2 * SLACK  # two steps: int8 rounding, then int4 rounding
        else:
            ew = np.broadcast_to(s1 / 2 * SLACK, (n, k))
        ex = np.broadcast_to(np.abs(x64).max(axis=1, keepdims=True) / 127 / 2 * SLACK, (m, k))
    elif algo == "W4A4_DYNAMIC":
        t = wq.quantize_w4a4_dynamic(w)
        ew = np.broadcast_to(t["weight_scale"] / 2 * SLACK, (n, k))
        ex = np.broadcast_to(np.abs(x64).max(axis=1, keepdims=True) / 7 / 2 * SLACK, (m, k))
    else:  # FlatQuant: bound in the transformed domain, where x' . w' = x . w exactly
        left, right = 8, 8
        lt = (np.eye(left) + rng.normal(0, 0.2, (left, left))).astype(np.float32).astype(BF16).astype(np.float32)
        rt = (np.eye(right) + rng.normal(0, 0.2, (right, right))).astype(np.float32).astype(BF16).astype(np.float32)
        t = wq.quantize_w4a4_flatquant(w, lt, rt, f32([1.0]))
        # factors are bf16 values, so rounding them to dt at load changes nothing
        x64 = kronecker_transform(x, lt, rt, F32).astype(np.float64)   # x' (fp16 of the exact value)
        xe = np.einsum("ji,mjr->mir", lt.astype(np.float64), x.astype(np.float64).reshape(m, left, right)
                       @ rt.astype(np.float64)).reshape(m, k)           # exact x'
        w64 = transform_weight(w, lt, rt)
        ew = np.broadcast_to(t["weight_scale"] / 2 * SLACK, (n, k)) + np.abs(w64) * 2.0**-23
        ex = np.abs(x64).max(axis=1, keepdims=True) / 7 / 2 * SLACK + np.abs(xe - x64)
        x64 = xe
    y = linear_forward(algo, x, t, dtype=dt, bias=bias, **kw).astype(np.float64)
    y_float = x64 @ w64.T + b.astype(np.float64)
    err_bound = ((np.abs(x64) + ex) @ ew.T + ex @ np.abs(w64).T) + extra
    scale_of_terms = (np.abs(x64) + ex) @ (np.abs(w64) + ew).T + np.abs(b.astype(np.float64))
    bound = err_bound + U[dt] * (np.abs(y_float) + err_bound) + 2.0**-20 * scale_of_terms
    assert np.all(np.abs(y - y_float) <= bound), (np.abs(y - y_float) - bound).max()


def _round_fraction_bf16(v: Fraction) -> float:
    """Correct RNE rounding of an exact rational to bf16 (normal range), by integer arithmetic."""
    if v == 0:
        return 0.0
    e = abs(v).numerator.bit_length() - abs(v).denominator.bit_length()
    while Fraction(2) ** e > abs(v):
        e -= 1
    while Fraction(2) ** (e + 1) <= abs(v):
        e += 1
    ulp = Fraction(2) ** (e - 7)
    n, r = divmod(v / ulp, 1)
    n = int(n) + (1 if r > Fraction(1, 2) or (r == Fraction(1, 2) and int(n) % 2) else 0)
    return float(n * ulp)


@given(st.integers(0, 2**32 - 1))
def test_w8a16_is_the_exact_sum_rounded_once(seed):
    """Independent route (Fractions): with small binary values the float64 sum is exact, so the
    bf16 result must equal the exact rational result rounded once (0 ulp)."""
    rng = np.random.default_rng(seed)
    n, k, g = 3, 12, 4
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    s = (rng.integers(1, 256, (n, k // g)) / 1024).astype(np.float32)   # bf16-exact (8 bits)
    o = rng.integers(-5, 6, (n, k // g)).astype(np.float32)
    x = (rng.integers(-255, 256, (2, k)) / 64).astype(np.float32).astype(BF16)
    b = (rng.integers(-255, 256, n) / 32).astype(np.float32).astype(BF16)
    y = w8a16_linear(x, {"weight": q, "weight_scale": s, "weight_offset": o}, dtype="bf16", bias=b)
    for i in range(2):
        for j in range(n):
            exact = Fraction(float(b[j])) + sum(
                Fraction(float(x[i, c])) * (int(q[j, c]) - Fraction(float(o[j, c // g])))
                * Fraction(float(s[j, c // g])) for c in range(k))
            assert float(y[i, j]) == _round_fraction_bf16(exact)
