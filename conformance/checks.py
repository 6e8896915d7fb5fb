"""The property bodies: each check runs one backend and the reference on the same inputs and
asserts agreement (bit-exact, or within the bound derived next to the assertion).

They are plain functions so that the Hypothesis tests, the explicit large-shape examples
and the deliberate-bug tests run exactly the same comparison. Failures carry a
reproduction (``assertions.repro``).
"""

from __future__ import annotations

import numpy as np

from ascend_quant.reference import activation_quant as ra
from ascend_quant.reference import flatquant as rf
from ascend_quant.reference import linear as rl
from ascend_quant.reference import packing as rp
from ascend_quant.reference.integer_gemm import int_matmul
from ascend_quant.reference.rounding import round_through, round_to_dtype

from . import backends as B
from .assertions import assert_bitexact, assert_within_abs, assert_within_ulp, repro, to_numpy, ulp_of

__all__ = ["check_dynamic_quant", "check_static_quant", "check_kronecker", "check_packing", "check_linear",
           "weight_only_bound"]

_REF_PACK = {
    "int32": (rp.pack_int4_to_int32, rp.unpack_int32_to_int4),
    "int8": (rp.pack_int4_to_int8, rp.unpack_int8_to_int4),
    "offset8": (rp.pack_int4_offset8_to_int32, rp.unpack_int32_offset8_to_int4),
}


def check_dynamic_quant(backend: str, x: np.ndarray, bits: int) -> None:
    """npu_dynamic_quant: q and scale bit-exact (0 ulp: identical float32 op sequence)."""
    with repro(f"check_dynamic_quant({backend!r}, x, {bits})", x=x):
        with np.errstate(all="ignore"):
            q_ref, s_ref = ra.quantize_dynamic_per_token(x, bits)
        q, s = B.quantize_dynamic(backend, x, bits)
        assert_bitexact(q, q_ref, what=f"int{bits} codes")
        assert_bitexact(s, s_ref, what="per-token scale")


def check_static_quant(backend: str, x: np.ndarray, input_scale: np.ndarray, input_offset: np.ndarray,
                       dtype: str) -> None:
    """npu_quantize: load-time (recip, offset) and q bit-exact."""
    with repro(f"check_static_quant({backend!r}, x, input_scale, input_offset, {dtype!r})",
               x=x, input_scale=input_scale, input_offset=input_offset):
        with np.errstate(all="ignore"):
            recip_ref, off_ref = ra.static_quant_params(input_scale, input_offset, dtype)
        recip, off = B.static_params(backend, input_scale, input_offset, dtype)
        assert_bitexact(np.float32(recip), np.float32(recip_ref), what="recip = dt(1 / dt(input_scale))")
        assert_bitexact(np.float32(off), np.float32(off_ref), what="offset = dt(input_offset)")
        q_ref = ra.quantize_static(x, recip_ref, off_ref)
        assert_bitexact(B.quantize_static(backend, x, recip_ref, off_ref), q_ref, what="int8 codes")


def check_kronecker(backend: str, x: np.ndarray, left: np.ndarray, right: np.ndarray | None, clip: np.ndarray,
                    dtype: str) -> None:
    """npu_kronecker_quant, stage by stage.

    1. Transform ``X' = fp16(L^T X R)``: both sides evaluate exact products in float64 and
       round once to fp16; only the float64 summation order may differ, so each value may
       differ by at most 1 fp16 ulp, and only where the float64 sum lies within
       ``(L + R) 2^-53 sum|L||X||R|`` of an fp16 rounding boundary (in practice: never).
    2. Quantization fed the reference's ``X'`` (stage isolation): q and scale bit-exact.
    3. End to end: wherever ``X'`` agrees bitwise, the codes and scales agree bitwise.
    """
    with repro(f"check_kronecker({backend!r}, x, left, right, clip, {dtype!r})",
               x=x, left=left, right=right, clip=clip):
        with np.errstate(all="ignore"):
            xt_ref = rf.kronecker_transform(x, left, right, dtype)
            q_ref, s_ref = rf.quantize_kronecker_int4(xt_ref, clip)
        l_dt = round_through(left, dtype)
        r_dt = None if right is None else round_through(right, dtype)
        xt = B.kronecker_transform(backend, x, l_dt, r_dt)
        assert_within_ulp(xt, xt_ref, 1, what="transformed activations X' (fp16)",
                          why="float64 sums in another order, rounded once to fp16")
        q_iso, s_iso = B.quantize_kronecker(backend, xt_ref, clip)
        assert_bitexact(q_iso, q_ref, what="int4 codes from the reference X'")
        assert_bitexact(s_iso, s_ref, what="scales from the reference X'")
        same_rows = np.all(xt.view(np.uint16) == xt_ref.view(np.uint16), axis=1) if xt.size else np.ones(0, bool)
        q, s = B.quantize_kronecker(backend, xt, clip)
        assert_bitexact(q[same_rows], q_ref[same_rows], what="int4 codes end to end (rows with identical X')")
        assert_bitexact(s[same_rows], s_ref[same_rows], what="scales end to end (rows with identical X')")


def check_packing(backend: str, kind: str, q: np.ndarray, axis: int) -> None:
    """pack and unpack bit-exact (bytes compared), and the round trip restores q."""
    ref_pack, ref_unpack = _REF_PACK[kind]
    with repro(f"check_packing({backend!r}, {kind!r}, q, {axis})", q=q):
        words_ref = ref_pack(q, axis=axis)
        words = B.pack(backend, kind, q, axis)
        assert_bitexact(words, words_ref, what=f"packed {kind} words")
        back = B.unpack(backend, kind, words_ref, axis)
        assert_bitexact(back, ref_unpack(words_ref, axis=axis), what=f"unpacked {kind} values")
        assert_bitexact(back, q.astype(np.int8), what="round trip")


def _exact_weight(algo: str, tensors: dict, dtype: str, k: int, group_size) -> np.ndarray:
    """The reference's dequantized weight (float64), with its load-time dtype rounding."""
    if algo == "W8A16":
        q = tensors["weight"].astype(np.float64)
        s = round_through(tensors["weight_scale"], dtype).astype(np.float64)
        o = round_through(tensors["weight_offset"], dtype).astype(np.float64)
    else:
        q = rp.unpack_int32_offset8_to_int4(tensors["weight_packed"], axis=1)[:, :k].astype(np.float64)
        s = round_through(tensors["weight_scale"], dtype).astype(np.float64)
        o = np.zeros_like(s)
    groups = s.shape[1]
    g = k if groups == 1 else (group_size or k // groups)
    cols = np.minimum(np.arange(k) // g, groups - 1)
    return (q - o[:, cols]) * s[:, cols]


def weight_only_bound(kernel: str, dtype: str, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                      y_ref: np.ndarray) -> np.ndarray:
    """The elementwise bound of ``optimized/weight_only.py`` (derivation in its docstring):
    ``delta + c * ulp_dt(2 S + delta)``, ``delta = (rel_w + (K + 3) 2^-24 1.01) S + (2K + 4) 2^-150``
    (+ the subnormal-flush term for kernels that flush), ``S = |x| @ |w|^T + |b|``."""
    from ascend_quant.optimized.activation_quant import torch_model_dtype
    from ascend_quant.optimized.weight_only import weight_only_bound_params

    rel_w, c, ftz = weight_only_bound_params(kernel, torch_model_dtype(dtype))
    k = x.shape[1]
    xa = np.abs(x.astype(np.float64))
    xa = np.where(np.isfinite(xa), xa, 0.0)
    s = xa @ np.abs(w).T
    if bias is not None:
        s = s + np.abs(round_to_dtype(bias, dtype).astype(np.float64))[None, :]
    delta = (rel_w + (k + 3) * 2.0**-24 * 1.01) * s + (2 * k + 4) * 2.0**-150
    if ftz:  # subnormal inputs read as zero, subnormal products/partial sums flushed
        delta = delta + np.where(xa < 2.0**-126, xa, 0.0) @ np.abs(w).T + (k + 1) * 2.0**-126
    return delta + c * ulp_of(2 * s + delta, dtype)


def check_linear(backend: str, algo: str, tensors: dict, x: np.ndarray, dtype: str, bias: np.ndarray | None = None,
                 *, kernel: str | None = None, group_size=None, kv_consumer: bool = False,
                 add_quant_bias: bool = True) -> None:
    """The optimized linear against ``reference.linear.linear_forward``.

    int8/int4-activation algorithms: 0 ulp (bit-exact): exact integer GEMM, the same
    float32 epilogue ops in the same order, one RNE rounding to the model dtype.
    W4A4_FLATQUANT_DYNAMIC: bit-exact where the transform agrees bitwise (see
    :func:`check_kronecker`); otherwise the reference is re-run from our transform (stage
    isolation) and must agree bitwise. W8A16/W4A16: within ``weight_only_bound``.
    """
    from ascend_quant.optimized import apply_linear, prepare_linear

    opts = dict(group_size=group_size, kv_consumer=kv_consumer, add_quant_bias=add_quant_bias)
    arrays = {f"t_{key}": v for key, v in tensors.items()}
    call = (f"check_linear({backend!r}, {algo!r}, {{{', '.join(f'{k[2:]!r}: {k}' for k in arrays)}}}, x, "
            f"{dtype!r}, bias, kernel={kernel!r}, group_size={group_size!r}, kv_consumer={kv_consumer!r}, "
            f"add_quant_bias={add_quant_bias!r})")
    with repro(call, x=x, bias=bias, **arrays):
        try:
            with np.errstate(all="ignore"):
                y_ref = rl.linear_forward(algo, x, tensors, dtype=dtype, bias=bias, **opts)
        except (ValueError, OverflowError) as e:
            import pytest
            with pytest.raises(type(e)):
                p = prepare_linear(algo, tensors, dtype=dtype, bias=bias, backend=backend, kernel=kernel, **opts)
                apply_linear(p, B.to_torch(x, backend))
            return
        p = prepare_linear(algo, tensors, dtype=dtype, bias=bias, backend=backend, kernel=kernel, **opts)
        y = to_numpy(apply_linear(p, B.to_torch(x, backend)))
        if algo in ("W8A16", "W4A16") and x.shape[0]:
            k = x.shape[1]
            w = _exact_weight(algo, tensors, dtype, k, group_size)
            pick = p.state.get("kernel_for_m")
            kname = pick(x.shape[0]) if pick is not None else p.kernel
            bound = weight_only_bound(kname, dtype, x, w, bias, y_ref)
            assert_within_abs(y, y_ref, bound, what=f"{algo} output ({kname})",
                              why="weight-only float stage: optimized/weight_only.py bound")
            return
        if algo == "W4A4_FLATQUANT_DYNAMIC" and y.size:
            _flatquant_stages(backend, tensors, x, dtype, bias, y, y_ref)
            return
        assert_bitexact(y, y_ref, what=f"{algo} output (0 ulp: same float32 epilogue order)")


def _flatquant_stages(backend, tensors, x, dtype, bias, y, y_ref) -> None:
    from ascend_quant.reference.linear import _acc_times_scale, _bias_f32, _pertoken_epilogue

    left = tensors["left_trans"]
    right = tensors.get("right_trans")
    with np.errstate(all="ignore"):
        xt_ref = rf.kronecker_transform(x, left, right, dtype)
    xt = B.kronecker_transform(backend, x, round_through(left, dtype), None if right is None else round_through(right, dtype))
    assert_within_ulp(xt, xt_ref, 1, what="FlatQuant X'", why="float64 summation order, one fp16 rounding")
    if np.array_equal(xt.view(np.uint16), xt_ref.view(np.uint16)):
        assert_bitexact(y, y_ref, what="W4A4_FLATQUANT_DYNAMIC output (0 ulp)")
        return
    # stage isolation: the reference's integer stage and epilogue fed our X'
    dt = np.dtype(y_ref.dtype)
    with np.errstate(all="ignore"):
        q, s_tok = rf.quantize_kronecker_int4(xt, tensors["clip_ratio"])
        acc = int_matmul(q, tensors["weight"])
        y_iso = _pertoken_epilogue(_acc_times_scale(acc, tensors["weight_scale"].reshape(-1)), s_tok,
                                   _bias_f32(bias, dt, y.shape[1]), dt)
    assert_bitexact(y, y_iso, what="W4A4_FLATQUANT_DYNAMIC output from our X' (0 ulp)")
