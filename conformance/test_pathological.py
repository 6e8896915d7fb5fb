"""Pathological activations, explicitly, on every linear and MoE algorithm ID, every backend and
every kernel of it (the Hypothesis properties draw these rows too; here each one is always there,
and the specified behaviour of docs/numerics.md §4 is asserted directly, not only agreement).

One batch per layer interleaves ordinary rows with one row of each pathological kind:

``zero`` / ``negzero``   all +0.0 / all -0.0
``huge`` / ``neg_huge``  one element +-1e30 (float16: +-65504, its largest finite value)
``max`` / ``neg_max``    one element +-(largest finite value of the model dtype)
``all_max``              every element +-(largest finite value), alternating signs
``inf`` / ``neg_inf``    one element +-inf
``nan``                  one element NaN
``inf_nan``              +inf, -inf and NaN in one row

For each layer (several checkpoint variants per ID: symmetric/asymmetric, per-channel/per-group,
static with ``add_quant_bias`` on and off, W8A8_MIX in both roles), model dtype and kernel:

1. the reference and the backend agree as the contract says (``checks.check_linear``: 0 ulp for
   the integer-activation IDs, the weight-only bound otherwise);
2. on both sides: an all-zero row is **exactly** the bias (bitwise; the static IDs fold the bias
   into ``quant_bias``, so there it is ``dt(f32(q0 * colsum(W) + quant_bias) * deq_scale)`` with
   ``q0`` the code of 0.0); a row holding NaN or +-inf has no finite output (all NaN for the
   integer-activation IDs); a finite huge row never gives NaN (except where FlatQuant's float16
   transform overflows, which is then a NaN row); the ordinary rows are bitwise what they are
   in the same batch without the pathological rows;
3. ``M = 0`` gives an empty ``[0, N]`` output of the model dtype;
4. static quantization saturates: codes +127 / -128 for huge and infinite values, 0 for NaN.

The MoE IDs get the same batch (tokens) through ``test_moe_conformance.check_moe``.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest

from ascend_quant.optimized import apply_linear, prepare_linear
from ascend_quant.optimized.dispatch import KERNELS, family_of
from ascend_quant.reference import activation_quant as ra
from ascend_quant.reference import flatquant as rf
from ascend_quant.reference import linear as rl
from ascend_quant.reference import moe as rmoe
from ascend_quant.reference import weight_quant as wq
from ascend_quant.reference.algorithms import LINEAR_ALGORITHMS
from ascend_quant.reference.flatquant import decompose_dim
from ascend_quant.reference.rounding import round_to_dtype
from ascend_quant.reference.scale_encoding import deq_scale_as_float32

from . import backends as B
from . import moe_strategies as mh
from . import strategies as hh
from .assertions import assert_bitexact, to_numpy
from .checks import check_linear
from .test_moe_conformance import check_moe

KINDS = ("zero", "negzero", "huge", "neg_huge", "max", "neg_max", "all_max", "inf", "neg_inf", "nan", "inf_nan")
NONFINITE = ("inf", "neg_inf", "nan", "inf_nan")
HUGE = ("huge", "neg_huge", "max", "neg_max", "all_max")
_DTYPES = ("bfloat16", "float16", "float32")
K, N = 128, 32      # K % 16 == 0 and N % 16 == 0: every CPU weight-only kernel can run


def _dtype_max(dtype: str) -> float:
    """The largest finite value of the model dtype."""
    return float(ml_dtypes.finfo(hh.np_dtype(dtype)).max)


def _row(kind: str, k: int, dtype: str, rng: np.random.Generator) -> np.ndarray:
    r = rng.standard_normal(k) * 2.0 ** int(rng.integers(-4, 3))
    j = int(rng.integers(k))
    big = _dtype_max(dtype)
    huge = big if dtype == "float16" else 1e30
    if kind == "normal":
        return r
    if kind in ("zero", "negzero"):
        return np.full(k, 0.0 if kind == "zero" else -0.0)
    if kind in ("huge", "neg_huge", "max", "neg_max"):
        r[j] = (huge if kind in ("huge", "neg_huge") else big) * (-1.0 if kind.startswith("neg") else 1.0)
        return r
    if kind == "all_max":
        return np.where(np.arange(k) % 2 == 0, big, -big)
    if kind in ("inf", "neg_inf", "nan"):
        r[j] = {"inf": np.inf, "neg_inf": -np.inf, "nan": np.nan}[kind]
        return r
    if kind == "inf_nan":
        r[[0, k // 2, k - 1]] = [np.inf, np.nan, -np.inf]
        return r
    raise ValueError(kind)


def _as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 -> the model dtype, exactly for our values (all are representable)."""
    with np.errstate(over="ignore"):
        return round_to_dtype(x, hh.np_dtype(dtype))


def pathological_batch(k: int, dtype: str, seed: int | np.random.Generator,
                       kinds: tuple[str, ...] = KINDS) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(x, clean, where)``: ``x`` interleaves ordinary rows with one row of every kind
    (``where[kind]`` = its row); ``clean`` is ``x`` with those rows replaced by ordinary ones."""
    rng = np.random.default_rng(seed)
    rows, clean, where = [], [], {}
    for kind in kinds:
        rows.append(_row("normal", k, dtype, rng))
        clean.append(rows[-1])
        where[kind] = len(rows)
        rows.append(_row(kind, k, dtype, rng))
        clean.append(_row("normal", k, dtype, rng))
    rows.append(_row("normal", k, dtype, rng))
    clean.append(rows[-1])
    return _as_dtype(np.array(rows), dtype), _as_dtype(np.array(clean), dtype), where


# --------------------------------------------------------------------------------------
# layers: every algorithm ID, several checkpoint variants
# --------------------------------------------------------------------------------------

def _weights(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)) * 2.0 ** rng.integers(-6, 1, size=(N, 1))
    w[3] = 0.0                                                     # a zero output channel
    return w.astype(np.float32)


def _variants() -> list[tuple[str, str, dict, dict]]:
    """``(algo, variant, tensors, options)`` covering every linear ID."""
    w = _weights(1)
    bias = np.random.default_rng(2).standard_normal(N).astype(np.float32)
    left, right = decompose_dim(K)
    rng = np.random.default_rng(3)
    lf = (np.eye(left) + 0.2 * rng.standard_normal((left, left)) / np.sqrt(left)).astype(np.float32)
    rt = (np.eye(right) + 0.2 * rng.standard_normal((right, right)) / np.sqrt(right)).astype(np.float32)
    heads = (np.eye(4) + 0.2 * rng.standard_normal((4, 4)) / 2).astype(np.float32)   # o_proj: [heads, heads]
    s_in, o_in = np.float32(0.02), np.float32(-5.0)
    out = [
        ("W8A16", "per-channel-sym", wq.quantize_w8a16(w, symmetric=True), {}),
        ("W8A16", "group64-asym", wq.quantize_w8a16(w, symmetric=False, group_size=64), {"group_size": 64}),
        ("W4A16", "group32", wq.quantize_w4a16(w, group_size=32), {"group_size": 32}),
        ("W4A16", "per-channel", wq.quantize_w4a16(w), {}),
        ("W8A8", "quant-bias", wq.quantize_w8a8_static(w, s_in, o_in, bias=bias), {}),
        ("W8A8", "no-quant-bias", wq.quantize_w8a8_static(w, s_in, o_in, bias=bias), {"add_quant_bias": False}),
        ("W8A8_DYNAMIC", "", wq.quantize_w8a8_dynamic(w), {}),
        ("W8A8_MIX", "dynamic", wq.quantize_w8a8_mix(w, s_in, o_in, bias=bias), {}),
        ("W8A8_MIX", "kv-consumer", wq.quantize_w8a8_mix(w, s_in, o_in, bias=bias), {"kv_consumer": True}),
        ("W4A8_DYNAMIC", "per-channel", wq.quantize_w4a8_dynamic(w), {}),
        ("W4A8_DYNAMIC", "group32", wq.quantize_w4a8_dynamic(w, group_size=32), {"group_size": 32}),
        ("W4A4_DYNAMIC", "", wq.quantize_w4a4_dynamic(w), {}),
        ("W4A4_FLATQUANT_DYNAMIC", "", wq.quantize_w4a4_flatquant(w, lf, rt, 0.9), {}),
        ("W4A4_FLATQUANT_DYNAMIC", "o_proj", wq.quantize_w4a4_flatquant(w, heads, None, 1.0), {}),
    ]
    assert {v[0] for v in out} == set(LINEAR_ALGORITHMS)
    return out


VARIANTS = _variants()
_STATIC = lambda algo, opts: algo == "W8A8" or (algo == "W8A8_MIX" and opts.get("kv_consumer"))  # noqa: E731


def _bias_for(algo: str, opts: dict, dtype: str) -> np.ndarray | None:
    if _STATIC(algo, opts):
        return None                            # folded into quant_bias (the float bias is ignored)
    b = np.random.default_rng(4).standard_normal(N)
    b[5] = 0.0                                 # +0.0 bias entry: +0 + +0 stays +0
    return _as_dtype(b, dtype)


def expected_zero_row(algo: str, tensors: dict, opts: dict, bias, dtype: str) -> np.ndarray:
    """The specified output of an all-zero activation row, computed from the checkpoint tensors
    (independently of ``reference.linear``).

    Per-token IDs: codes 0 and scale 0, so ``dt(f32(+0) + f32(bias))`` = the bias (+0.0 without
    one). Weight-only: ``dt(sum 0 * w + bias)`` = the bias. Static IDs: the code of 0.0 is
    ``q0 = sat(rint(offset))`` (``0 * recip + offset``), so the row is
    ``dt(f32(q0 * sum_k W[n, k] + quant_bias[n]) * deq_scale[n])``: msModelSlim's folded bias.
    """
    dt = hh.np_dtype(dtype)
    if _STATIC(algo, opts):
        recip, off = ra.static_quant_params(tensors["input_scale"], tensors["input_offset"], dtype)
        q0 = int(np.clip(np.rint(np.float32(0.0) * recip + off), -128, 127))
        acc = q0 * tensors["weight"].astype(np.int64).sum(axis=1)
        if opts.get("add_quant_bias", True):
            acc = acc + tensors["quant_bias"].astype(np.int64)
        deq = deq_scale_as_float32(tensors["deq_scale"], "deq_scale")
        return round_to_dtype((acc.astype(np.float32) * deq).astype(np.float32), dt)
    b32 = np.zeros(N, np.float32) if bias is None else bias.astype(np.float32)
    return round_to_dtype((np.float32(0.0) + b32).astype(np.float32), dt)


def assert_specified_rows(y: np.ndarray, y_clean: np.ndarray, x: np.ndarray, where: dict, algo: str, tensors: dict,
                          opts: dict, bias, dtype: str, who: str) -> None:
    """docs/numerics.md §4 on one implementation's output ``y`` for the batch ``x``."""
    yf = y.astype(np.float64)
    zero = expected_zero_row(algo, tensors, opts, bias, dtype)
    for kind in ("zero", "negzero"):
        row = y[where[kind]]
        if family_of(algo) == "weight-only" and bias is None:
            # float sums of +-0 products: the sign of a zero sum is not specified
            assert (row.astype(np.float64) == 0).all(), f"{who}: {kind} row is not zero: {row}"
        else:
            assert_bitexact(row, zero, what=f"{who}: {algo} {kind} row = exactly the bias")
    for kind in NONFINITE:
        row = yf[where[kind]]
        if family_of(algo) == "weight-only":
            assert not np.isfinite(row).any(), f"{who}: {kind} row has finite outputs {row}"
            if kind == "nan":
                assert np.isnan(row).all(), f"{who}: NaN row has non-NaN outputs {row}"
        else:
            assert np.isnan(row).all(), f"{who}: {algo} {kind} row is not all NaN: {row}"
    for kind in HUGE:
        row = yf[where[kind]]
        if algo == "W4A4_FLATQUANT_DYNAMIC":
            with np.errstate(all="ignore"):
                xt = rf.kronecker_transform(x[where[kind]][None], tensors["left_trans"], tensors.get("right_trans"),
                                            dtype)
            if not np.isfinite(xt.astype(np.float64)).all():   # the float16 transform overflowed
                assert np.isnan(row).all(), f"{who}: {kind} row with an overflowing X' is not all NaN"
                continue
        if family_of(algo) == "weight-only" and kind == "all_max":
            continue   # +-max * w products: the exact sum may be finite, inf, or (float32 kernels) NaN
        assert not np.isnan(row).any(), f"{who}: {algo} {kind} (finite) row gives NaN: {row}"
    normal = [i for i in range(x.shape[0]) if i not in where.values()]
    assert_bitexact(y[normal], y_clean[normal], what=f"{who}: ordinary rows next to pathological ones")


def _kernels(backend: str, algo: str) -> list[str | None]:
    """Every kernel of the backend's family, forced; weight-only also ``None`` (``auto``: the
    kernel picked per call by M). The int family's default is one of its forced kernels."""
    forced = [k for k in KERNELS[(backend, family_of(algo))] if k != "auto"]
    return ([None] if family_of(algo) == "weight-only" else []) + forced


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("algo,variant,tensors,opts", VARIANTS,
                         ids=[f"{a}-{v}" if v else a for a, v, _, _ in VARIANTS])
def test_pathological_rows_linear(backend, algo, variant, tensors, opts, dtype):
    x, clean, where = pathological_batch(K, dtype, seed=zlib.crc32(f"{algo}/{variant}/{dtype}".encode()))
    bias = _bias_for(algo, opts, dtype)
    with np.errstate(all="ignore"):
        y_ref = rl.linear_forward(algo, x, tensors, dtype=dtype, bias=bias, **opts)
        y_ref_clean = rl.linear_forward(algo, clean, tensors, dtype=dtype, bias=bias, **opts)
    assert_specified_rows(y_ref, y_ref_clean, x, where, algo, tensors, opts, bias, dtype, "reference")
    ran = []
    for kernel in _kernels(backend, algo):
        try:
            p = prepare_linear(algo, tensors, dtype=dtype, bias=bias, backend=backend, kernel=kernel, **opts)
        except ValueError as e:       # a kernel that cannot implement this layer says why
            if kernel is None or len(_kernels(backend, algo)) == 1:
                raise
            assert "can run" in str(e) or "not available" in str(e) or "cannot" in str(e), e
            continue
        who = f"{backend}/{p.kernel}"
        check_linear(backend, algo, tensors, x, dtype, bias, kernel=kernel, **opts)
        y = to_numpy(apply_linear(p, B.to_torch(x, backend)))
        y_clean = to_numpy(apply_linear(p, B.to_torch(clean, backend)))
        assert_specified_rows(y, y_clean, x, where, algo, tensors, opts, bias, dtype, who)
        empty = to_numpy(apply_linear(p, B.to_torch(x[:0], backend)))
        assert empty.shape == (0, N) and empty.dtype == hh.np_dtype(dtype), (who, empty.shape, empty.dtype)
        ran.append(p.kernel)
    assert ran, f"no kernel of {backend} ran {algo}"


# --------------------------------------------------------------------------------------
# static quantization saturates
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("scale,offset", [(0.02, -5.0), (1.0, 0.0), (2.0**-6, 127.0), (4.0, -128.0)])
def test_static_quant_saturates(backend, dtype, scale, offset):
    """|x| / scale >> 127: codes +127 / -128 (per element, whatever the offset); +-inf likewise;
    NaN -> 0. The reference and the backend give exactly these codes."""
    big = _dtype_max(dtype)
    vals = np.array([big, -big, 1e4 if dtype == "float16" else 1e30, -1e4 if dtype == "float16" else -1e30,
                     np.inf, -np.inf, np.nan, 0.0])
    want = np.array([127, -128, 127, -128, 127, -128, 0], np.int8)
    x = _as_dtype(np.tile(vals, (3, 1)), dtype)
    recip, off = ra.static_quant_params(np.array([scale], np.float32), np.array([offset], np.float32), dtype)
    q0 = np.int8(np.clip(np.rint(np.float32(0) * recip + off), -128, 127))
    want = np.tile(np.append(want, q0), (3, 1))
    assert_bitexact(ra.quantize_static(x, recip, off), want, what="reference static codes")
    assert_bitexact(B.quantize_static(backend, x, recip, off), want, what=f"{backend} static codes")


# --------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------

_MOE = [("W8A8_DYNAMIC", 0), ("W8A8_MIX", 0), ("W4A8_DYNAMIC", 0), ("W4A8_DYNAMIC", 16), ("W4A16", 16)]
_MOE_KINDS = ("zero", "negzero", "huge", "neg_huge", "max", "neg_max", "inf", "neg_inf", "nan", "inf_nan")


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("algo,group", _MOE, ids=[f"{a}-g{g}" for a, g in _MOE])
def test_pathological_tokens_moe(backend, algo, group, dtype):
    """Every MoE ID: the reference and the backend agree (``check_moe``); a zero token's output is
    exactly 0 (+0.0 for the integer IDs), a NaN/inf token's has no finite value (all NaN for the
    integer IDs), ordinary tokens are bitwise what they are without the pathological ones.
    (Huge finite tokens may overflow an intermediate h in the model dtype: then NaN, on both sides.)"""
    e, h, i = 4, 32, 16
    experts = mh.build_experts(algo, e, h, i, seed=5, mode="quantized", group=group)
    rng = np.random.default_rng(6)
    x, x_clean, where = pathological_batch(h, dtype, rng, _MOE_KINDS)   # draws from rng, then routing does
    t = x.shape[0]
    ids = np.stack([rng.permutation(e)[:2] for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (t, 2)).astype(np.float32)
    layout = dict(mode="quantized", group=group, packed=True, scale_dtype="float32", seed=5, E=e, H=h, I=i)
    case = mh.MoECase(algo, dtype, experts, x, w, ids, group or None, layout)
    check_moe(backend, case)
    from ascend_quant.optimized import moe as om

    p = om.prepare_moe(algo, experts, dtype=dtype, group_size=group or None, backend=backend)
    with np.errstate(all="ignore"):
        outs = {"reference": (rmoe.moe_forward(algo, x, experts, w, ids, dtype=dtype, group_size=group or None),
                              rmoe.moe_forward(algo, x_clean, experts, w, ids, dtype=dtype, group_size=group or None))}
    run = lambda xx: to_numpy(om.apply_moe(p, B.to_torch(xx, backend), B.to_torch(w, backend),  # noqa: E731
                                           B.to_torch(ids, backend)))
    outs[f"{backend}/{p.kernel}"] = (run(x), run(x_clean))
    for who, (y, y_clean) in outs.items():
        yf = y.astype(np.float64)
        for kind in ("zero", "negzero"):
            if algo == "W4A16":
                assert (yf[where[kind]] == 0).all(), f"{who}: {kind} token output {yf[where[kind]]}"
            else:
                assert_bitexact(y[where[kind]], np.zeros(h, y.dtype), what=f"{who}: {kind} token = +0.0")
        for kind in ("inf", "neg_inf", "nan", "inf_nan"):
            row = yf[where[kind]]
            if algo == "W4A16":
                assert not np.isfinite(row).any(), f"{who}: {kind} token has finite outputs {row}"
            else:
                assert np.isnan(row).all(), f"{who}: {kind} token is not all NaN: {row}"
        normal = [j for j in range(t) if j not in where.values()]
        assert_bitexact(y[normal], y_clean[normal], what=f"{who}: ordinary tokens next to pathological ones")
    empty = to_numpy(om.apply_moe(p, B.to_torch(x[:0], backend), B.to_torch(w[:0], backend),
                                  B.to_torch(ids[:0], backend)))
    assert empty.shape == (0, h) and empty.dtype == hh.np_dtype(dtype)
