"""FlatQuant: K = L*R decomposition, the Kronecker transform, int4 quantization with clipping."""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from ascend_quant.reference.flatquant import (
    decompose_dim, kronecker_transform, quantize_kronecker_int4, transform_shapes, transform_weight,
)


@pytest.mark.parametrize("k,expected", [
    (4096, (64, 64)), (2048, (32, 64)), (5120, (64, 80)), (8192, (64, 128)), (11008, (86, 128)),
    (13824, (108, 128)), (14336, (112, 128)), (18944, (128, 148)), (768, (24, 32)), (128, (8, 16)),
    (256, (16, 16)), (7, (1, 7)),
])
def test_decompose_dim_table(k, expected):
    assert decompose_dim(k) == expected


@given(st.integers(1, 20000).filter(lambda k: k % 4 != 2))
def test_decompose_dim_properties(k):
    left, right = decompose_dim(k)
    assert left * right == k and left <= right
    a = (left + right) // 2
    assert a >= math.isqrt(k - 1) if k > 1 else True


@pytest.mark.parametrize("k", [2, 6, 4098])
def test_decompose_dim_refuses_k_2_mod_4_instead_of_looping(k):
    with pytest.raises(ValueError, match="2 mod 4"):
        decompose_dim(k)


def test_transform_is_left_transposed_times_x_times_right():
    rng = np.random.default_rng(0)
    left, right = 3, 4
    lt = rng.integers(-2, 3, (left, left)).astype(np.float32)
    rt = rng.integers(-2, 3, (right, right)).astype(np.float32)
    x = rng.integers(-4, 5, (2, left * right)).astype(np.float32)
    got = kronecker_transform(x, lt, rt, "float32")
    for t in range(2):
        expect = lt.T @ x[t].reshape(left, right) @ rt  # small integers: exact
        assert np.array_equal(got[t].astype(np.float32), expect.reshape(-1))
    # the same as the row vector times kron(L, R)
    assert np.array_equal(got.astype(np.float32), (x @ np.kron(lt, rt)).astype(np.float16).astype(np.float32))
    # o_proj form: only a left factor over [heads, head_dim]
    got_o = kronecker_transform(x, lt, None, "float32")
    assert np.array_equal(got_o[0].astype(np.float32), (lt.T @ x[0].reshape(3, 4)).reshape(-1))


def test_transform_rounds_to_float16_and_factors_to_model_dtype():
    x = np.array([[1.0, 2.0**-12]], dtype=np.float32)
    ident = np.eye(1, dtype=np.float32)
    rt = np.array([[1.0, 0.0], [1.0 + 2.0**-12, 1.0]], dtype=np.float32)  # not representable in bf16
    out32 = kronecker_transform(x, ident, rt, "float32")
    assert out32.dtype == np.float16
    # column 0: 1 + 2^-12*(1+2^-12): fp16 has 10 mantissa bits -> 1.0
    assert out32[0, 0] == np.float16(1.0) and out32[0, 1] == np.float16(2.0**-12)
    # in a bf16 model the factor entry 1 + 2^-9 is first rounded to 1.0
    x_bf = np.array([[1.0, 0.5]], dtype=np.float32)
    rt_bf = np.array([[1.0, 0.0], [1.0 + 2.0**-9, 1.0]], dtype=np.float32)  # bf16: 1 + 2^-9 -> 1.0
    assert kronecker_transform(x_bf, ident, rt_bf, "float32")[0, 0] == np.float16(1.5 + 2.0**-10)
    assert kronecker_transform(x_bf, ident, rt_bf, "bfloat16")[0, 0] == np.float16(1.5)


def test_kronecker_int4_golden_with_clip():
    xt = np.array([[7.0, -3.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float16)
    q, s = quantize_kronecker_int4(xt, np.float32(1.0))
    assert q.tolist() == [[7, -4, 1, 0], [0, 0, 0, 0]]  # -3.5 tie -> -4 (even)
    assert s.tolist() == [1.0, 0.0]
    q, s = quantize_kronecker_int4(xt, np.float32(0.5))  # r = (7/0.5)/7 = 2
    assert q.tolist() == [[7, -7, 2, 0], [0, 0, 0, 0]]  # 14 saturates to 7
    assert s.tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_kronecker_int4(xt, np.float32(0.0))


def test_weight_transform_preserves_products():
    rng = np.random.default_rng(1)
    left, right = 4, 8
    lt = rng.normal(size=(left, left)) + 3 * np.eye(left)
    rt = rng.normal(size=(right, right)) + 3 * np.eye(right)
    w = rng.normal(size=(5, left * right))
    x = rng.normal(size=(3, left * right))
    xt = np.stack([(lt.T @ r.reshape(left, right) @ rt).reshape(-1) for r in x])
    assert np.allclose(xt @ transform_weight(w, lt, rt).T, x @ w.T, rtol=1e-10, atol=1e-10)  # float64 algebra
    xo = np.stack([(lt.T @ r.reshape(left, right)).reshape(-1) for r in x])
    assert np.allclose(xo @ transform_weight(w, lt, None).T, x @ w.T, rtol=1e-10, atol=1e-10)


def test_shape_errors_name_the_factor():
    with pytest.raises(ValueError, match=r"q_proj: left_trans \(4, 4\) x right_trans \(4, 4\) gives 16, expected K=32"):
        transform_shapes(np.eye(4), np.eye(4), 32, "q_proj")
    with pytest.raises(ValueError, match="left_trans must be square"):
        transform_shapes(np.ones((2, 3)), None, 6)
    with pytest.raises(ValueError, match="does not divide K=10"):
        transform_shapes(np.eye(4), None, 10)
