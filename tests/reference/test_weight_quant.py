"""Offline weight quantization in msModelSlim's v1 checkpoint layout."""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from ascend_quant.reference import algorithms as A
from ascend_quant.reference.packing import unpack_int8_to_int4, unpack_int32_offset8_to_int4
from ascend_quant.reference.weight_quant import (
    FLT_EPS,
    calibrate_input_scale_offset,
    dequantize,
    quantize_int4_per_channel,
    quantize_linear,
    quantize_per_channel_int8,
    quantize_w4a16,
    quantize_w4a4_dynamic,
    quantize_w4a4_flatquant,
    quantize_w4a8_dynamic,
    quantize_w8a16,
    quantize_w8a8_dynamic,
    quantize_w8a8_mix,
    quantize_w8a8_static,
)

F32 = np.float32
EPS = 2.0**-23  # msModelSlim's scale floor, torch.finfo(float32).eps

# Error-bound slack, in units of the scale (code units). All inputs are float32.
#  int8 symmetric: |w/s| <= 127(1+2^-24), so f32(w/s) is off by <= 2^-24*128 = 2^-17.
#  int4 symmetric: |w/s| <= 8, so the division is off by <= 2^-24*8 = 2^-21.
#  int8 asymmetric: f32(w/s) off by <= 2^-24*256 = 2^-16, "+ offset" by <= 2^-24*128
#  = 2^-17; the offset's own rint(-lo/s) and the two-division scale (relative error
#  <= 3*2^-24, times 255 codes < 2^-14) can push the end points past +-0.5 by < 2^-13
#  in total, where saturation then clips them: |q - (w/s + offset)| <= 0.5 + 2^-13.
SLACK_INT8_SYM = 2.0**-17
SLACK_INT4 = 2.0**-21
SLACK_INT8_ASYM = 2.0**-13


@st.composite
def weights(draw, n=(1, 6), k=(1, 40), n_mult=1, k_mult=1):
    """float32 [N, K] with magnitudes from subnormal to 2^40 and some all-zero rows."""
    rows = draw(st.integers(*n), label="N") * n_mult
    cols = draw(st.integers(*k), label="K") * k_mult
    base = draw(hnp.arrays(np.float32, (rows, cols),
                           elements=st.floats(-1e3, 1e3, width=32) | st.sampled_from([0.0, 0.5, -1.5])),
                label="base")
    exp = draw(st.sampled_from([0, 0, -8, 7, -135, 40]), label="exp")
    w = (base.astype(np.float64) * 2.0**exp).astype(np.float32)
    zero = draw(hnp.arrays(np.bool_, (rows,)), label="zero_rows")
    w[zero] = 0
    return w


# --------------------------------------------------------------------------- goldens

def test_per_channel_int8_symmetric_golden():
    w = np.array([[63.5, -31.75, 0.25, 10.0],     # amax 63.5 -> scale 0.5; -63.5, 0.5 are ties
                  [0.0, 0.0, 0.0, 0.0]], F32)     # zero row -> scale eps, q 0
    q, s, o = quantize_per_channel_int8(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and o.dtype == np.float32
    assert q.tolist() == [[127, -64, 0, 20], [0, 0, 0, 0]]
    assert s.shape == (2, 1) and s.tolist() == [[0.5], [EPS]]
    assert o.tolist() == [[0.0], [0.0]]


def test_per_channel_int8_asymmetric_golden():
    w = np.array([[-127.5, 127.5, 0.5, -3.5],     # scale 0.5+0.5 = 1; offset rint(127.5)-128 = 0
                  [0.0, 51.0, 102.0, 255.0]], F32)  # lo clamps to 0: scale 1, offset -128
    q, s, o = quantize_per_channel_int8(w, symmetric=False)
    # 127.5 -> 128 (tie to even) saturates to 127; 0.5 -> 0 and -3.5 -> -4 (ties to even)
    assert q.tolist() == [[-128, 127, 0, -4], [-128, -77, -26, 127]]
    assert s.tolist() == [[1.0], [1.0]] and o.tolist() == [[0.0], [-128.0]]
    deq = dequantize(A.W8A16, {"weight": q, "weight_scale": s, "weight_offset": o})
    assert deq.tolist() == [[-128.0, 127.0, 0.0, -4.0], [0.0, 51.0, 102.0, 255.0]]


def test_asymmetric_zero_row_is_offset_minus_128_and_dequantizes_to_zero():
    q, s, o = quantize_per_channel_int8(np.zeros((1, 3), F32), symmetric=False)
    assert q.tolist() == [[-128] * 3] and s.tolist() == [[EPS]] and o.tolist() == [[-128.0]]


def test_w8a16_per_group_ragged_golden():
    w = np.array([[127.0, -63.5, 254.0, 1.0, -254.0],   # groups [127,-63.5] [254,1] [-254]: scales 1, 2, 2
                  [0.0, 0.0, 31.75, -0.125, 0.0]], F32)  # groups zero, [31.75,-0.125] (scale .25), zero
    t = quantize_w8a16(w, symmetric=True, group_size=2)
    assert set(t) == {"weight", "weight_scale", "weight_offset"}
    assert t["weight"].tolist() == [[127, -64, 127, 0, -127], [0, 0, 127, 0, 0]]  # 0.5, -0.5 -> 0
    assert t["weight_scale"].dtype == np.float32 and t["weight_scale"].shape == (2, 3)
    assert t["weight_scale"].tolist() == [[1.0, 2.0, 2.0], [EPS, 0.25, EPS]]
    assert t["weight_offset"].tolist() == [[0.0] * 3] * 2
    deq = dequantize(A.W8A16, t, group_size=2)
    assert deq.tolist() == [[127.0, -64.0, 254.0, 0.0, -254.0], [0.0, 0.0, 31.75, 0.0, 0.0]]


def test_w8a16_per_channel_symmetric_matches_primitive():
    w = np.array([[63.5, -31.75, 0.25, 10.0]], F32)
    t = quantize_w8a16(w)
    assert t["weight"].tolist() == [[127, -64, 0, 20]] and t["weight_scale"].tolist() == [[0.5]]
    assert t["weight_offset"].shape == (1, 1)


W_STATIC = np.array([[63.5, -31.75, 0.25, 10.0],   # scale 0.5, q [127,-64,0,20], sum 83
                     [-127.0, 0.0, 127.0, 2.0]], F32)  # scale 1, q [-127,0,127,2], sum 2


def test_w8a8_static_golden_and_real_tensor_set():
    t = quantize_w8a8_static(W_STATIC, 0.25, 3, bias=np.array([1.0, -2.0], F32))
    assert set(t) == {"weight", "quant_bias", "input_scale", "input_offset", "deq_scale"}
    assert t["weight"].tolist() == [[127, -64, 0, 20], [-127, 0, 127, 2]]
    # deq = 0.25*[0.5, 1] = [0.125, 0.25]; quant_bias = bias/deq - 3*sum(q) = [8-249, -8-6]
    assert t["quant_bias"].dtype == np.int32 and t["quant_bias"].tolist() == [-241, -14]
    assert t["deq_scale"].dtype == np.int64
    assert t["deq_scale"].tolist() == [0x3E000000, 0x3E800000]  # fp32 bits of 0.125, 0.25
    assert t["input_scale"].dtype == np.float32 and t["input_scale"].tolist() == [0.25]
    assert t["input_offset"].dtype == np.float32 and t["input_offset"].tolist() == [3.0]
    f = quantize_w8a8_static(W_STATIC, np.array([0.25], F32), np.array([3.0], F32), deq_scale_dtype="float32")
    assert f["deq_scale"].dtype == np.float32 and f["deq_scale"].tolist() == [0.125, 0.25]
    assert f["quant_bias"].tolist() == [-249, -6]  # no bias: -offset * sum(q)


def test_w8a8_static_quant_bias_rounds_half_to_even():
    # bias/deq = 2.5 and 3.5 with input_offset 0 -> 2 and 4
    t = quantize_w8a8_static(W_STATIC, 0.25, 0, bias=np.array([0.3125, 0.875], F32))
    assert t["quant_bias"].tolist() == [2, 4]


def test_w8a8_mix_adds_weight_scale_and_zero_offset():
    t = quantize_w8a8_mix(W_STATIC, 0.25, 3, bias=np.array([1.0, -2.0], F32))
    assert set(t) == {"weight", "quant_bias", "input_scale", "input_offset", "deq_scale",
                      "weight_scale", "weight_offset"}
    assert t["quant_bias"].tolist() == [-241, -14]
    assert t["weight_scale"].tolist() == [[0.5], [1.0]] and t["weight_offset"].tolist() == [[0.0], [0.0]]
    assert dequantize(A.W8A8_MIX, t).tolist() == [[63.5, -32.0, 0.0, 10.0], [-127.0, 0.0, 127.0, 2.0]]


def test_w8a8_dynamic_golden():
    t = quantize_w8a8_dynamic(W_STATIC)
    assert set(t) == {"weight", "weight_scale", "weight_offset"}
    assert t["weight"].tolist() == [[127, -64, 0, 20], [-127, 0, 127, 2]]
    assert t["weight_scale"].tolist() == [[0.5], [1.0]] and t["weight_offset"].tolist() == [[0.0], [0.0]]


def test_calibrate_input_scale_offset_golden():
    # lo = -1, hi = 3: scale = f32(3/255) - f32(-1/255); offset = rint(1/scale) - 128 = 64 - 128
    s, o = calibrate_input_scale_offset([np.array([-1.0, 2.0], F32), np.array([[3.0]], F32)])
    assert s.dtype == np.float32 and s.shape == (1,) and o.shape == (1,)
    assert s[0] == F32(F32(3) / F32(255)) - F32(F32(-1) / F32(255))
    assert o.tolist() == [-64.0]
    # all-positive samples: lo clamps to 0 -> offset -128; scale = hi/255
    s2, o2 = calibrate_input_scale_offset(np.array([0.5, 2.55], F32))
    assert s2[0] == F32(F32(2.55) / F32(255)) and o2.tolist() == [-128.0]


W_INT4 = np.array([[7.0, -3.5, 0.5, 1.5],           # scale 1: ties -3.5 -> -4, 0.5 -> 0, 1.5 -> 2
                   [0.875, -0.0625, 0.1875, 0.0]], F32)  # scale 0.125: -0.5 -> 0, 1.5 -> 2


def test_int4_per_channel_and_w4a4_dynamic_golden():
    q, s = quantize_int4_per_channel(W_INT4)
    assert q.dtype == np.int8 and q.tolist() == [[7, -4, 0, 2], [7, 0, 2, 0]]
    assert s.tolist() == [[1.0], [0.125]]
    t = quantize_w4a4_dynamic(W_INT4)
    assert set(t) == {"weight", "weight_scale", "weight_offset"}
    assert t["weight"].tolist() == q.tolist() and t["weight_offset"].tolist() == [[0.0], [0.0]]


def test_w4a8_per_channel_golden_packed_along_output_dim():
    t = quantize_w4a8_dynamic(W_INT4)
    assert set(t) == {"weight", "weight_scale", "weight_offset", "scale_bias"}
    # byte[0, k] = (q[0,k] & 0xF) | (q[1,k] << 4): 0x77, 0x0C, 0x20, 0x02
    assert t["weight"].dtype == np.int8 and t["weight"].tolist() == [[0x77, 0x0C, 0x20, 0x02]]
    assert t["weight_scale"].tolist() == [[1.0], [0.125]] and t["weight_offset"].tolist() == [[0.0], [0.0]]
    # 8 * sum(q*s): 8*(7-4+0+2)*1 = 40, 8*(7+0+2+0)*0.125 = 9
    assert t["scale_bias"].dtype == np.float32 and t["scale_bias"].tolist() == [[40.0], [9.0]]


def test_w4a8_row_parallel_scale_bias_golden():
    w = np.zeros((2, 16), F32)
    w[0, :4] = [7.0, -3.5, 0.5, 1.5]
    w[1, 12:] = [0.875, -0.0625, 0.1875, 0.0]
    t = quantize_w4a8_dynamic(w, row_parallel=True)
    # 16 chunks of one column: scale_bias[n, c] = 8 * q[n, c] * s[n]
    assert t["scale_bias"].shape == (2, 16)
    assert t["scale_bias"][0].tolist() == [56.0, -32.0, 0.0, 16.0] + [0.0] * 12
    assert t["scale_bias"][1].tolist() == [0.0] * 12 + [7.0, 0.0, 2.0, 0.0]


def test_w4a8_two_step_golden():
    t = quantize_w4a8_dynamic(W_STATIC, group_size=2)
    assert set(t) == {"weight", "weight_scale", "weight_offset", "scale_bias",
                      "weight_scale_second", "weight_offset_second"}
    # q8 = [[127,-64,0,20], [-127,0,127,2]], s1 = [0.5, 1]
    s2a, s2b = F32(127) / F32(7), F32(20) / F32(7)
    assert t["weight_scale"].tolist() == [[0.5], [1.0]]
    assert t["weight_scale_second"].dtype == np.float32
    assert t["weight_scale_second"].tolist() == [[s2a, s2b], [s2a, s2a]]
    assert t["weight_offset_second"].dtype == np.float32 and not t["weight_offset_second"].any()
    # q4 = rint(q8/s2): [[7, -3.53->-4, 0, 7], [-7, 0, 7, 0.11->0]]
    q4 = unpack_int8_to_int4(t["weight"], axis=0)
    assert q4.tolist() == [[7, -4, 0, 7], [-7, 0, 7, 0]]
    assert t["weight"].tolist() == [[-105, 12, 112, 7]]  # 0x97, 0x0C, 0x70, 0x07
    # scale_bias uses bf16 scales: bf16(127/7) = 18.125, bf16(20/7) = 2.859375, bf16(0.5) = 0.5
    # row 0: 8*0.5*(7*18.125 - 4*18.125 + 7*2.859375) = 297.5625; row 1: 8*(-7+7)*18.125 = 0
    assert t["scale_bias"].tolist() == [[297.5625], [0.0]]
    deq = dequantize(A.W4A8_DYNAMIC, t, group_size=2)
    expect = q4 * np.array([[s2a, s2a, s2b, s2b], [s2a] * 4], np.float64) * np.array([[0.5], [1.0]])
    assert np.array_equal(deq, expect)  # 0 ulp: 4+24+24 bit products are exact in float64


def test_w4a16_golden_pack_quantized():
    t = quantize_w4a16(W_INT4.reshape(1, 8), group_size=4)
    assert set(t) == {"weight_packed", "weight_scale", "weight_shape"}
    # q = [7,-4,0,2, 7,0,2,0]; stored q+8 = [15,4,8,10, 15,8,10,8], element i in bits 4i..4i+3
    assert t["weight_packed"].dtype == np.int32
    assert t["weight_packed"].view(np.uint32).tolist() == [[0x8A8FA84F]]
    assert t["weight_scale"].dtype == np.float32 and t["weight_scale"].tolist() == [[1.0, 0.125]]
    assert t["weight_shape"].dtype == np.int32 and t["weight_shape"].tolist() == [1, 8]
    assert dequantize(A.W4A16, t, group_size=4).tolist() == [[7, -4, 0, 2, 0.875, 0, 0.25, 0]]


def test_flatquant_golden_scaled_and_permuted_factors():
    w = np.array([[14.0, -7.0, 1.0, 3.0]], F32)  # K = 4 = 2 x 2
    # left = 2I: W' = (2I)^{-1} W = W/2 = [7, -3.5, 0.5, 1.5] -> q [7,-4,0,2], scale 1
    t = quantize_w4a4_flatquant(w, 2 * np.eye(2), np.eye(2), 0.5)
    assert set(t) == {"weight", "weight_scale", "weight_offset", "clip_ratio", "left_trans", "right_trans"}
    assert t["weight"].tolist() == [[7, -4, 0, 2]] and t["weight_scale"].tolist() == [[1.0]]
    assert t["clip_ratio"].dtype == np.float32 and t["clip_ratio"].tolist() == [0.5]
    assert t["left_trans"].dtype == np.float32 and t["left_trans"].tolist() == [[2, 0], [0, 2]]
    # o_proj form: a row-swap left factor alone; P^{-1} = P swaps the [2, 2] view's rows
    p = np.array([[0.0, 1.0], [1.0, 0.0]])
    t2 = quantize_w4a4_flatquant(np.array([[1.0, 3.0, 14.0, -7.0]], F32), p, None, 1.0)
    assert set(t2) == {"weight", "weight_scale", "weight_offset", "clip_ratio", "left_trans"}
    # W' = [14, -7, 1, 3]: scale 2, codes 7, -3.5 -> -4, 0.5 -> 0, 1.5 -> 2
    assert t2["weight"].tolist() == [[7, -4, 0, 2]] and t2["weight_scale"].tolist() == [[2.0]]
    assert dequantize(A.W4A4_FLATQUANT_DYNAMIC, t2).tolist() == [[14, -8, 0, 4]]


# --------------------------------------------------------------------------- properties

@given(weights(), st.booleans())
def test_int8_dequant_error_bound_and_symmetric_idempotence(w, symmetric):
    q, s, o = quantize_per_channel_int8(w, symmetric)
    assert np.all(s > 0) and np.all(np.isfinite(s)) and np.all(o == np.rint(o))
    deq = (q.astype(np.float64) - o) * s
    slack = SLACK_INT8_SYM if symmetric else SLACK_INT8_ASYM
    assert np.all(np.abs(deq - w) <= s.astype(np.float64) * (0.5 + slack))
    zero = ~w.any(axis=1)
    assert np.all(s[zero] == F32(EPS)) and np.all(deq[zero] == 0)
    if symmetric:
        assert np.abs(q).max() <= 127
        q2, s2, _ = quantize_per_channel_int8(deq)  # float64 in, rounded once to float32
        assert np.array_equal(q2, q) and np.array_equal(s2, s)


@given(weights(k=(1, 70)), st.integers(1, 24), st.booleans())
def test_w8a16_per_group_ragged_error_bound_and_idempotence(w, g, symmetric):
    t = quantize_w8a16(w, symmetric, g)
    n, k = w.shape
    groups = -(-k // g)
    assert t["weight_scale"].shape == (n, groups) == t["weight_offset"].shape
    deq = dequantize(A.W8A16, t, group_size=g)
    s = np.repeat(t["weight_scale"].astype(np.float64), g, axis=1)[:, :k]
    slack = SLACK_INT8_SYM if symmetric else SLACK_INT8_ASYM
    assert np.all(np.abs(deq - w) <= s * (0.5 + slack))
    # each group equals the per-channel quantization of that column slice
    for j in range(groups):
        q1, s1, o1 = quantize_per_channel_int8(w[:, j * g:(j + 1) * g], symmetric)
        assert np.array_equal(t["weight"][:, j * g:(j + 1) * g], q1)
        assert np.array_equal(t["weight_scale"][:, j:j + 1], s1)
        assert np.array_equal(t["weight_offset"][:, j:j + 1], o1)
    if symmetric:
        t2 = quantize_w8a16(deq, True, g)
        assert np.array_equal(t2["weight"], t["weight"])
        assert np.array_equal(t2["weight_scale"], t["weight_scale"])


@given(weights())
def test_int4_error_bound_and_idempotence(w):
    q, s = quantize_int4_per_channel(w)
    assert np.abs(q).max() <= 7 and np.all(s > 0)
    deq = q.astype(np.float64) * s
    assert np.all(np.abs(deq - w) <= s.astype(np.float64) * (0.5 + SLACK_INT4))
    q2, s2 = quantize_int4_per_channel(deq)
    assert np.array_equal(q2, q) and np.array_equal(s2, s)
    t = quantize_w4a4_dynamic(w)
    assert np.array_equal(dequantize(A.W4A4_DYNAMIC, t), deq)


@given(weights(k=(1, 9), k_mult=8), st.sampled_from([0, 8, 16, 32, 5, 12]))
def test_w4a16_roundtrip_error_bound_and_idempotence(w, g):
    t = quantize_w4a16(w, group_size=g)
    n, k = w.shape
    q = unpack_int32_offset8_to_int4(t["weight_packed"], axis=1)
    gg = k if g == 0 else g
    s = np.repeat(t["weight_scale"].astype(np.float64), gg, axis=1)[:, :k]
    assert t["weight_scale"].shape == (n, -(-k // gg))
    deq = dequantize(A.W4A16, t, group_size=g)
    assert np.array_equal(deq, q * s)
    assert np.all(np.abs(deq - w) <= s * (0.5 + SLACK_INT4))
    t2 = quantize_w4a16(deq, group_size=g)
    assert np.array_equal(t2["weight_packed"], t["weight_packed"])
    assert np.array_equal(t2["weight_scale"], t["weight_scale"])


def _independent_scale_bias(terms: np.ndarray, chunks: int) -> np.ndarray:
    """8 * sum per K-chunk with math.fsum (exact), rounded once to float32."""
    n, k = terms.shape
    parts = terms.reshape(n, chunks, k // chunks)
    return np.array([[F32(8 * math.fsum(map(float, parts[i, c]))) for c in range(chunks)]
                     for i in range(n)], np.float32)


@given(weights(n=(1, 3), k=(1, 4), n_mult=2, k_mult=16), st.booleans())
def test_w4a8_per_channel_packing_and_scale_bias(w, row_parallel):
    t = quantize_w4a8_dynamic(w, row_parallel=row_parallel)
    n, k = w.shape
    q, s = quantize_int4_per_channel(w)
    assert t["weight"].shape == (n // 2, k)
    assert np.array_equal(unpack_int8_to_int4(t["weight"], axis=0), q)
    b = t["weight"].view(np.uint8)  # independent nibble rule: row 2j low, 2j+1 high
    assert np.array_equal(b & 0xF, q[0::2].view(np.uint8) & 0xF)
    assert np.array_equal(b >> 4, q[1::2].view(np.uint8) & 0xF)
    assert np.array_equal(t["weight_scale"], s) and not t["weight_offset"].any()
    # 0 ulp: the f32 terms q*s are multiples of ulp(s) below 2^27 ulp(s), so both the
    # float64 sum and fsum are exact; each side rounds the exact sum once to float32.
    terms = (q.astype(np.float32) * s).astype(np.float32)
    expect = _independent_scale_bias(terms, 16 if row_parallel else 1)
    assert t["scale_bias"].shape == ((n, 16) if row_parallel else (n, 1))
    assert np.array_equal(t["scale_bias"], expect)


@given(weights(n=(1, 3), k=(1, 3), n_mult=2, k_mult=16), st.sampled_from([4, 8, 16]), st.booleans())
def test_w4a8_two_step_bound_and_scale_bias(w, g, row_parallel):
    t = quantize_w4a8_dynamic(w, group_size=g, row_parallel=row_parallel)
    n, k = w.shape
    q4 = unpack_int8_to_int4(t["weight"], axis=0)
    s1 = t["weight_scale"].astype(np.float64)
    s2 = np.repeat(t["weight_scale_second"].astype(np.float64), g, axis=1)
    assert t["weight_scale_second"].shape == (n, k // g) and np.all(s2 > 0)
    deq = dequantize(A.W4A8_DYNAMIC, t, group_size=g)
    assert np.array_equal(deq, q4 * s2 * s1)
    # two roundings: float -> q8*s1 (<= s1(0.5+2^-17)), q8 -> q4*s2 (<= s2(0.5+2^-21) codes of s1)
    assert np.all(np.abs(deq - w) <= s1 * (0.5 + SLACK_INT8_SYM) + s1 * s2 * (0.5 + SLACK_INT4))
    # scale_bias over f32(f32(q4 * bf16(s2)) * bf16(s1)); terms have <= 19 significant bits
    # and a bounded exponent span, so float64 and fsum sums are exact: 0 ulp.
    b2 = t["weight_scale_second"].astype(ml_dtypes.bfloat16).astype(np.float32)
    b1 = t["weight_scale"].astype(ml_dtypes.bfloat16).astype(np.float32)
    terms = ((q4.astype(np.float32) * np.repeat(b2, g, axis=1)).astype(np.float32) * b1).astype(np.float32)
    assert np.array_equal(t["scale_bias"], _independent_scale_bias(terms, 16 if row_parallel else 1))


@given(weights(n=(1, 4), k=(1, 24)), st.floats(2.0**-10, 4.0, width=32), st.integers(-128, 127),
       hnp.arrays(np.float32, st.just(1), elements=st.floats(-100, 100, width=32)), st.booleans())
def test_w8a8_quant_bias_matches_float32_formula_and_exact_value(w, s_in, o_in, b1, with_bias):
    n = w.shape[0]
    bias = np.resize(b1, n) * np.arange(1, n + 1, dtype=F32) if with_bias else None
    try:
        t = quantize_w8a8_static(w, s_in, o_in, bias=bias, deq_scale_dtype="float32")
    except ValueError as e:  # only legitimate failure: quant_bias beyond int32
        assert "quant_bias" in str(e)
        _, ws, _ = quantize_per_channel_int8(w)
        exact = (0 if bias is None else bias.astype(np.float64)) / (np.float64(F32(s_in)) * ws[:, 0])
        assert np.max(np.abs(exact)) > 2.0**31 * 0.99
        return
    q, ws, _ = quantize_per_channel_int8(w)
    deq = t["deq_scale"]
    b = np.zeros(n, F32) if bias is None else bias
    for i in range(n):  # independent float32 route, one scalar op at a time
        d = F32(F32(s_in) * ws[i, 0])
        assert deq[i] == d
        corr = F32(F32(int(q[i].astype(np.int64).sum())) * F32(o_in))
        v = F32(F32(b[i] / d) - corr)
        assert t["quant_bias"][i] == int(np.rint(v))
    # against the exact float64 value: |v32 - v64| <= 2^-23(|b/d| + |S*o|) (three float32
    # roundings of relative size 2^-24 each, generously), then rint moves it <= 0.5
    qsum = q.astype(np.int64).sum(axis=1).astype(np.float64)
    v64 = b.astype(np.float64) / deq.astype(np.float64) - qsum * o_in
    tol = 0.5 + 2.0**-22 * (np.abs(b / deq.astype(np.float64)) + np.abs(qsum * o_in))
    assert np.all(np.abs(t["quant_bias"] - v64) <= tol)
    mix = quantize_w8a8_mix(w, s_in, o_in, bias=bias, deq_scale_dtype="int64")
    assert np.array_equal(mix["deq_scale"], deq.view(np.int32).astype(np.int64))
    assert np.array_equal(mix["quant_bias"], t["quant_bias"])


@given(hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e4, 1e4, width=32)))
def test_calibration_maps_samples_into_int8(x):
    s, o = calibrate_input_scale_offset(x)
    assert s[0] > 0 and o[0] == np.rint(o[0]) and -128 <= o[0] <= 127
    q = np.clip(np.rint(((x / s[0]).astype(F32) + o[0]).astype(F32)), -128, 127)
    assert np.all(np.abs((q - o[0]) * np.float64(s[0]) - x) <= np.float64(s[0]) * (0.5 + SLACK_INT8_ASYM))


@given(weights(n=(1, 3), k=(1, 4), n_mult=2, k_mult=16),
       st.sampled_from([A.W8A16, A.W8A8_DYNAMIC, A.W8A8_MIX, A.W4A8_DYNAMIC, A.W4A4_DYNAMIC, A.W4A16]))
def test_dispatcher_and_dequantize_agree_with_direct_calls(w, algo):
    opts = {A.W8A8_MIX: {"input_scale": 0.5, "input_offset": 0}}.get(algo, {})
    t = quantize_linear(algo, w, **opts)
    gs = 32 if algo == A.W4A16 else 0
    deq = dequantize(algo, t, group_size=gs)
    assert deq.shape == w.shape and deq.dtype == np.float64
    if algo == A.W4A16:
        s = np.repeat(t["weight_scale"].astype(np.float64), 32, axis=1)[:, : w.shape[1]]
    else:
        s = t["weight_scale"].astype(np.float64)
    slack = SLACK_INT4 if algo in (A.W4A8_DYNAMIC, A.W4A4_DYNAMIC, A.W4A16) else SLACK_INT8_SYM
    assert np.all(np.abs(deq - w) <= s * (0.5 + slack))


# --------------------------------------------------------------------------- dtypes, errors

@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_input_dtypes_are_converted_to_float32_first(dtype):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 16)).astype(dtype)
    ref = w.astype(np.float32)  # exact for fp16/bf16, RNE for float64
    for fn in (quantize_w8a8_dynamic, quantize_w4a4_dynamic, quantize_w4a8_dynamic):
        a, b = fn(w), fn(ref)
        assert all(np.array_equal(a[key], b[key]) for key in b)


def test_zero_weight_everywhere_gives_positive_scales():
    w = np.zeros((2, 16), F32)
    for algo, opts in [(A.W8A16, {"group_size": 4}), (A.W8A8, {"input_scale": 1.0, "input_offset": 0}),
                       (A.W4A8_DYNAMIC, {"group_size": 8, "row_parallel": True}), (A.W4A16, {"group_size": 8})]:
        t = quantize_linear(algo, w, **opts)
        for key, v in t.items():
            if key.endswith("scale") or key == "weight_scale_second":
                dec = v.astype(np.int32).view(np.float32) if v.dtype == np.int64 else v
                assert np.all(np.isfinite(dec)) and np.all(np.asarray(dec, np.float32) > 0), (algo, key)
    assert not quantize_w8a8_static(w, 1.0, 0)["quant_bias"].any()


def test_weight_errors_name_the_tensor_and_index():
    w = np.ones((3, 4), F32)
    w[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight: non-finite value nan at index \(1, 2\)"):
        quantize_w8a8_dynamic(w, name="layers.0.q_proj.weight")
    w64 = np.ones((2, 2))
    w64[0, 1] = 1e39
    with pytest.raises(ValueError, match=r"weight: value 1e\+39 at index \(0, 1\) overflows float32"):
        quantize_w4a4_dynamic(w64)
    with pytest.raises(ValueError, match="weight: expected a 2-D array"):
        quantize_w8a16(np.ones(4, F32))
    with pytest.raises(ValueError, match="weight: expected a float16/bfloat16/float32/float64 array, got dtype int"):
        quantize_w8a16(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="non-empty"):
        quantize_w8a16(np.ones((0, 2), F32))
    with pytest.raises(ValueError, match="group_size: expected a non-negative int"):
        quantize_w8a16(np.ones((2, 2), F32), group_size=-1)
    with pytest.raises(ValueError, match="group_size: expected a non-negative int"):
        quantize_w8a16(np.ones((2, 2), F32), group_size=True)


def test_int4_layout_errors():
    with pytest.raises(ValueError, match="weight: W4A8 packs two output rows per byte; N must be even, got N=3"):
        quantize_w4a8_dynamic(np.ones((3, 16), F32))
    with pytest.raises(ValueError, match="K divisible by 16, got K=20"):
        quantize_w4a8_dynamic(np.ones((2, 20), F32), row_parallel=True)
    with pytest.raises(ValueError, match="group_size: W4A8 per-group needs K divisible"):
        quantize_w4a8_dynamic(np.ones((2, 20), F32), group_size=8)
    with pytest.raises(ValueError, match="K must be a multiple of 8, got K=12"):
        quantize_w4a16(np.ones((2, 12), F32))


def test_flatquant_errors_name_the_factor():
    w = np.ones((2, 8), F32)
    with pytest.raises(ValueError, match="left_trans .* x right_trans .* expected K=8"):
        quantize_w4a4_flatquant(w, np.eye(2), np.eye(2), 1.0)
    with pytest.raises(ValueError, match="left_trans must be square"):
        quantize_w4a4_flatquant(w, np.ones((2, 4)), np.eye(4), 1.0)
    with pytest.raises(ValueError, match="left_trans size 3 does not divide K=8"):
        quantize_w4a4_flatquant(w, np.eye(3), None, 1.0)
    with pytest.raises(ValueError, match="right_trans: matrix is singular"):
        quantize_w4a4_flatquant(w, np.eye(2), np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="right_trans: non-finite"):
        quantize_w4a4_flatquant(w, np.eye(2), np.full((4, 4), np.inf), 1.0)
    for c in (0.0, 1.5):
        with pytest.raises(ValueError, match="clip_ratio: must lie in"):
            quantize_w4a4_flatquant(w, np.eye(2), np.eye(4), c)


def test_flatquant_preserves_the_product_with_transformed_activations():
    rng = np.random.default_rng(7)
    left = np.eye(4) + 0.1 * rng.standard_normal((4, 4))
    right = np.eye(8) + 0.1 * rng.standard_normal((8, 8))
    w = rng.standard_normal((3, 32)).astype(F32)
    t = quantize_w4a4_flatquant(w, left, right, 0.9)
    assert t["left_trans"].shape == (4, 4) and t["right_trans"].shape == (8, 8)
    wt = dequantize(A.W4A4_FLATQUANT_DYNAMIC, t)
    x = rng.standard_normal(32)
    xt = (t["left_trans"].astype(np.float64).T @ x.reshape(4, 8) @ t["right_trans"].astype(np.float64)).reshape(32)
    # the int4 error is what separates <X', Q'> from <X, W>: bound it with the codes' half-step
    err = np.abs(wt @ xt - w.astype(np.float64) @ x)
    bound = 0.5 * t["weight_scale"][:, 0] * np.abs(xt).sum() * (1 + 1e-5) + 1e-9 * np.abs(w).sum(axis=1)
    assert np.all(err <= bound)


def test_static_parameter_errors():
    w = np.ones((2, 4), F32)
    with pytest.raises(ValueError, match="input_offset: must be an integer in \\[-128, 127\\], got 2.5"):
        quantize_w8a8_static(w, 0.1, 2.5)
    with pytest.raises(ValueError, match="input_offset: must be an integer"):
        quantize_w8a8_static(w, 0.1, 128)
    with pytest.raises(ValueError, match="input_scale: must be > 0"):
        quantize_w8a8_static(w, 0.0, 0)
    with pytest.raises(ValueError, match="input_scale: expected a single value"):
        quantize_w8a8_static(w, np.ones(2), 0)
    with pytest.raises(ValueError, match=r"bias: expected shape \(N,\) = \(2,\), got \(3,\)"):
        quantize_w8a8_static(w, 0.1, 0, bias=np.ones(3))
    with pytest.raises(ValueError, match="quant_bias: .* does not fit int32"):
        quantize_w8a8_static(w, 1e-3, 0, bias=np.array([1e30, 0.0]))
    with pytest.raises(ValueError, match="deq_scale: input_scale \\* weight_scale = 0.0"):
        quantize_w8a8_static(np.zeros((2, 4), F32), 1e-39, 0)
    with pytest.raises(ValueError, match="deq_scale_dtype"):
        quantize_w8a8_static(w, 0.1, 0, deq_scale_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"x_samples\[1\]: non-finite"):
        calibrate_input_scale_offset([np.ones(2), np.array([np.nan])])


def test_dispatcher_and_dequantize_errors():
    w = np.ones((2, 16), F32)
    with pytest.raises(ValueError, match="unsupported algorithm ID 'W2A2'; supported: .*W8A16.*W4A4_DYNAMIC"):
        quantize_linear("W2A2", w)
    with pytest.raises(ValueError, match=r"W8A16: unknown option\(s\) \['groupsize'\]"):
        quantize_linear(A.W8A16, w, groupsize=4)
    with pytest.raises(ValueError, match=r"W8A8: missing required option\(s\) \['input_scale', 'input_offset'\]"):
        quantize_linear(A.W8A8, w)
    with pytest.raises(ValueError, match="unsupported algorithm ID 'FLOAT'"):
        dequantize(A.FLOAT, {})
    t = quantize_w8a16(w, group_size=4)
    with pytest.raises(ValueError, match="weight_scale: has 4 groups per row; pass group_size"):
        dequantize(A.W8A16, t)
    with pytest.raises(ValueError, match=r"weight_scale: expected ceil\(K/group_size\) = ceil\(16/8\) = 2 groups, got 4"):
        dequantize(A.W8A16, t, group_size=8)
    with pytest.raises(ValueError, match="W8A8: checkpoint has no weight_scale"):
        dequantize(A.W8A8, quantize_w8a8_static(w, 0.1, 0))
    with pytest.raises(ValueError, match="W4A16: missing tensor 'weight_shape'"):
        dequantize(A.W4A16, {"weight_packed": np.zeros((2, 2), np.int32)})
    with pytest.raises(ValueError, match="weight: expected dtype int8, got int32"):
        dequantize(A.W8A8_DYNAMIC, {"weight": np.zeros((2, 2), np.int32)})
    t4 = quantize_w4a8_dynamic(w, group_size=8)
    with pytest.raises(ValueError, match="weight_scale_second: 2 groups imply group_size 8, got 4"):
        dequantize(A.W4A8_DYNAMIC, t4, group_size=4)
