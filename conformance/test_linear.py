"""Conformance of the quantized linear of every algorithm ID, against reference.linear.

Checkpoint tensors come from the reference quantizers (reference.weight_quant) applied
to random float weights; activations carry the edge rows of ``strategies.activations``.
Int8/int4-activation algorithms are compared bit-exactly, W8A16/W4A16 within the bound
of optimized/weight_only.py (see ``checks.check_linear``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, reject, strategies as st

from ascend_quant.optimized.dispatch import KERNELS, choose_kernel, family_of
from ascend_quant.reference import weight_quant as wq
from ascend_quant.reference.algorithms import LINEAR_ALGORITHMS
from ascend_quant.reference.flatquant import decompose_dim

from . import strategies as hh
from .checks import check_linear

_INT_ACT = ("W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W4A8_DYNAMIC", "W4A4_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC")
#: K for per-channel formats: odd/small edges (K = 1 hits a torch._int_mm stride bug) plus draws
_K_ANY = st.one_of(st.sampled_from([1, 2, 3, 7, 17, 33, 129, 255, 257]), st.integers(1, 300))


@st.composite
def linear_case(draw, algo: str, max_m: int = 257):
    """``(tensors, x, dtype, bias, options)`` for one algorithm, shapes per its format constraints."""
    dtype = draw(hh.dtypes, label="dtype")
    opts: dict = {}
    qmax = 127
    if algo == "W8A16":
        g = draw(st.sampled_from((0,) + hh.GROUP_SIZES), label="group_size")
        k = draw(hh.k_ragged(g), label="K") if g else draw(_K_ANY, label="K")
        n = draw(st.integers(1, 40), label="N")
        w = draw(hh.float_weights(n, k), label="w")
        t = wq.quantize_w8a16(w, symmetric=draw(st.booleans(), label="symmetric"), group_size=g)
        opts["group_size"] = g if g else None
    elif algo == "W4A16":
        g = draw(st.sampled_from((0,) + hh.GROUP_SIZES), label="group_size")
        k = draw(hh.k_ragged(g, multiple_of=8, min_k=8), label="K") if g else 8 * draw(st.integers(1, 40), label="K/8")
        n = draw(st.integers(1, 40), label="N")
        t = wq.quantize_w4a16(draw(hh.float_weights(n, k), label="w"), group_size=g)
        opts["group_size"] = g if g else None
    elif algo in ("W8A8", "W8A8_MIX"):
        k = draw(_K_ANY, label="K")
        n = draw(st.integers(1, 40), label="N")
        scale, offset = draw(hh.static_params(dtype), label="input_scale/offset")
        b = np.random.default_rng(draw(hh.seeds)).standard_normal(n).astype(np.float32)
        fn = wq.quantize_w8a8_static if algo == "W8A8" else wq.quantize_w8a8_mix
        try:
            t = fn(draw(hh.float_weights(n, k), label="w"), scale, offset, bias=b,
                   deq_scale_dtype=draw(st.sampled_from(["int64", "float32"]), label="deq_scale_dtype"))
        except ValueError:  # the exporter refuses: quant_bias = bias/deq_scale overflows int32
            reject()
        if algo == "W8A8_MIX":
            opts["kv_consumer"] = draw(st.booleans(), label="kv_consumer")
        opts["add_quant_bias"] = draw(st.booleans(), label="add_quant_bias")
    elif algo == "W8A8_DYNAMIC":
        k, n = draw(_K_ANY, label="K"), draw(st.integers(1, 40), label="N")
        t = wq.quantize_w8a8_dynamic(draw(hh.float_weights(n, k), label="w"))
    elif algo == "W4A8_DYNAMIC":
        g = draw(st.sampled_from((0,) + hh.GROUP_SIZES), label="group_size")
        row_parallel = draw(st.booleans(), label="row_parallel")
        if g:  # two-step per-group needs K % g == 0
            k = g * draw(st.integers(1, max(1, 512 // g)), label="K/g")
        else:
            k = draw(_K_ANY, label="K")
        if row_parallel:
            k = -(-k // 16) * 16 if not g else k * (16 // np.gcd(k, 16))
        n = 2 * draw(st.integers(1, 20), label="N/2")
        t = wq.quantize_w4a8_dynamic(draw(hh.float_weights(n, k), label="w"), group_size=g, row_parallel=row_parallel)
        opts["group_size"] = g if g else None
    elif algo == "W4A4_DYNAMIC":
        k, n = draw(_K_ANY, label="K"), draw(st.integers(1, 40), label="N")
        t = wq.quantize_w4a4_dynamic(draw(hh.float_weights(n, k), label="w"))
        qmax = 7
    elif algo == "W4A4_FLATQUANT_DYNAMIC":
        if draw(st.booleans(), label="o_proj_form"):
            left_n = draw(st.integers(1, 8), label="heads")
            k, right_n = left_n * draw(st.integers(1, 24), label="head_dim"), None
        else:
            k = draw(st.integers(1, 300).map(lambda v: v + 1 if v % 4 == 2 else v), label="K")
            left_n, right_n = decompose_dim(k)
        n = draw(st.integers(1, 40), label="N")
        left, right = draw(hh.flatquant_factors(left_n, right_n), label="factors")
        clip = draw(st.sampled_from([1.0, 0.9, 0.5]), label="clip")
        t = wq.quantize_w4a4_flatquant(draw(hh.float_weights(n, k), label="w"), left, right, clip)
        qmax = 7
    else:  # pragma: no cover
        raise AssertionError(algo)
    m = draw(hh.m_values(max_m), label="M")
    x = draw(hh.activations(m, k, dtype, qmax=qmax, allow_nonfinite=True), label="x")
    bias = None
    if draw(st.booleans(), label="with_bias"):
        b = np.random.default_rng(draw(hh.seeds, label="bias_seed")).standard_normal(n)
        bias = b.astype(np.float32).astype(hh.np_dtype(dtype))
    return t, x, dtype, bias, opts


@pytest.mark.parametrize("algo", LINEAR_ALGORITHMS)
@given(data=st.data())
def test_linear_matches_reference(backend, algo, data):
    tensors, x, dtype, bias, opts = data.draw(linear_case(algo), label="case")
    check_linear(backend, algo, tensors, x, dtype, bias, **opts)


# -- a few explicit large shapes (not Hypothesis: one example each) ---------------------

_LARGE = [(1, 2048, 64), (64, 1031, 48), (3, 4096, 16)]


@pytest.mark.parametrize("algo", LINEAR_ALGORITHMS)
@pytest.mark.parametrize("m,k,n", _LARGE, ids=[f"M{m}-K{k}-N{n}" for m, k, n in _LARGE])
def test_linear_large_shapes(backend, algo, m, k, n):
    rng = np.random.default_rng(m * 7919 + k)
    dtype = "bfloat16"
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    if algo == "W4A16":
        k = k // 8 * 8
        w = w[:, :k]
        t, opts = wq.quantize_w4a16(w, group_size=128), {"group_size": 128}
    elif algo == "W8A16":
        t, opts = wq.quantize_w8a16(w, group_size=128), {"group_size": 128}
    elif algo in ("W8A8", "W8A8_MIX"):
        fn = wq.quantize_w8a8_static if algo == "W8A8" else wq.quantize_w8a8_mix
        t, opts = fn(w, np.float32(0.05), np.float32(-7)), {}
    elif algo == "W4A8_DYNAMIC":
        t, opts = wq.quantize_w4a8_dynamic(w), {}
    elif algo == "W4A4_FLATQUANT_DYNAMIC":
        if k % 4 == 2 or k == 1031:
            k = 1024
            w = w[:, :k]
        left_n, right_n = decompose_dim(k)
        left = np.eye(left_n, dtype=np.float32) + 0.05 * rng.standard_normal((left_n, left_n)).astype(np.float32)
        right = np.eye(right_n, dtype=np.float32) + 0.05 * rng.standard_normal((right_n, right_n)).astype(np.float32)
        t, opts = wq.quantize_w4a4_flatquant(w, left, right, 0.95), {}
    else:
        t, opts = wq.quantize_linear(algo, w), {}
    x = hh.make_activations(m, k, dtype, seed=k, special=[(0, "ties"), (m - 1, "spike")])
    bias = rng.standard_normal(n).astype(np.float32).astype(hh.np_dtype(dtype))
    check_linear(backend, algo, t, x, dtype, bias, **opts)


@pytest.mark.parametrize("algo", ["W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"])
def test_accumulators_beyond_2_pow_24_stay_exact(backend, algo):
    """Saturated activations x saturated weights: |acc| ~ 127*127*K > 2^24 (float32 loses
    integers there): the static path must switch to its exact accumulator, the per-token
    paths must still give f32(acc) rounded once."""
    k, n, m = 2100, 16, 3
    w = np.full((n, k), 0.5, np.float32)
    w[1::2] = -0.5
    dtype = "float32"
    x = np.full((m, k), 100.0, np.float32)
    x[1] = -100.0
    if algo == "W8A8":
        t = wq.quantize_w8a8_static(w, np.float32(100.0 / 127), np.float32(0), bias=np.ones(n, np.float32))
        check_linear(backend, algo, t, x, dtype)
    else:
        t = wq.quantize_linear(algo, w)
        check_linear(backend, algo, t, x, dtype, None)


# -- every kernel of every backend, forced ----------------------------------------------

_ALL_KERNELS = sorted({k for names in KERNELS.values() for k in names})
_FORCED_ALGOS = ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "W8A16", "W4A16")


@pytest.mark.parametrize("kernel", _ALL_KERNELS)
@given(data=st.data())
def test_forced_kernel_matches_reference(backend, kernel, data):
    """Each kernel of the backend, forced, on a few algorithms (int family: static with its
    exact-accumulator path, per-token, W4A8 per-group; weight-only: per-channel/per-group)."""
    if kernel not in KERNELS[(backend, "int")] + KERNELS[(backend, "weight-only")]:
        pytest.skip(f"{kernel} is not a kernel of backend {backend}")
    algo = data.draw(st.sampled_from(_FORCED_ALGOS), label="algo")
    family = family_of(algo)
    if kernel not in KERNELS[(backend, family)]:
        return  # a kernel of the other family: nothing to check for this draw
    tensors, x, dtype, bias, opts = data.draw(linear_case(algo, max_m=64), label="case")
    try:
        choose_kernel(algo, backend=backend, kernel=kernel, k=x.shape[1],
                      can_weight_only=lambda name: (True, None))
    except ValueError as e:
        pytest.skip(f"{kernel} on {backend}: {e}")
    try:
        check_linear(backend, algo, tensors, x, dtype, bias, kernel=kernel, **opts)
    except ValueError as e:  # the kernel cannot implement this layer (e.g. int8pack-mm: K % 16)
        if "no weight-only kernel" not in str(e) and "can run" not in str(e):
            raise
