"""Conformance of the MoE (``optimized.moe``) against ``reference.moe``: routing and the
experts of W8A8_DYNAMIC, W8A8_MIX, W4A8_DYNAMIC and W4A16, stage by stage.

Contract checked here (derivations next to each assertion):

* routing: scores within 1 float32 ulp; selection + renormalization given the reference's
  scores bit-exact; ``route`` == ``select_experts(routing_scores)``;
* int8/int4 algorithms: activation codes, per-expert int32 accumulators (fed the
  reference's int8 activations, and full-range random codes), gate_up epilogue, re-quantized
  codes/scales and the down epilogue (each fed our previous stage) bit-exact; SwiGLU within
  1 ulp of ``reference.moe.swiglu`` on our ``h``; the output bit-exact whenever SwiGLU agreed
  bitwise, else within :func:`_requant_bound` propagated through the combine;
* W4A16: float GEMMs within ``optimized/weight_only.py``'s bound per stage, and the output
  within that bound propagated through SwiGLU and the combine;
* SwiGLU internals: the float32 fast path equals the float64 path bitwise, float64 values
  are rounded once to bf16/fp16; deliberate bugs (unrounded scales or router weights,
  swapped gate/up, double rounding, no midpoint fallback) are caught, and a real 1-ulp
  SwiGLU difference stays within the derived bound.

Every failure carries a copy-pasteable repro (``assertions.repro``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.control import current_build_context, event

from ascend_quant.optimized import moe as om
from ascend_quant.reference import activation_quant as ra
from ascend_quant.reference import moe as rmoe
from ascend_quant.reference.integer_gemm import int_matmul
from ascend_quant.reference.rounding import BFLOAT16, round_to_dtype

from . import moe_strategies as mh
from . import strategies as hh
from .assertions import assert_bitexact, assert_within_abs, assert_within_ulp, repro, to_numpy, ulp_of
from .backends import to_torch
from .checks import weight_only_bound

_REPO = Path(__file__).resolve().parents[1]
_U = 2.0**-24          # float32 unit roundoff
_SILU_LIP = 1.0999     # sup |d silu / dg| (silu' ranges over [-0.0998, 1.0998])


def _event(label: str) -> None:
    """``hypothesis.event`` inside a property; nothing in the explicit examples."""
    try:
        current_build_context()
    except Exception:
        return
    event(label)


# --------------------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------------------

def _reference_scores(logits: np.ndarray, scoring_func: str) -> np.ndarray:
    """The reference's float32 scores ``p [T, E]``: ``route`` with every expert selected, no
    renormalization and no scaling returns ``w = f32(f64(p) * 1.0) = p`` exactly."""
    w, ids = rmoe.route(logits, logits.shape[1], renormalize=False, scoring_func=scoring_func)
    p = np.zeros_like(w)
    np.put_along_axis(p, ids.astype(np.int64), w, axis=1)
    return p


def _torch_kwargs(kw: dict, backend: str) -> dict:
    return {k: (to_torch(v, backend) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


def check_route(backend: str, logits: np.ndarray, top_k: int, kw: dict) -> None:
    """``optimized.moe.route`` against ``reference.moe.route``."""
    with repro(f"check_route({backend!r}, logits, {top_k}, {kw!r})", logits=logits):
        w_ref, ids_ref = rmoe.route(logits, top_k, **kw)
        lt = to_torch(logits, backend)
        w, ids = om.route(lt, top_k, **_torch_kwargs(kw, backend))
        if logits.shape[0] == 0:
            _event("empty batch")
            assert_bitexact(w, w_ref, what="weights (empty batch)")
            assert_bitexact(ids, ids_ref, what="ids (empty batch)")
            return
        sf = kw.get("scoring_func", "softmax")
        p_ref = _reference_scores(logits, sf)
        p = om.routing_scores(lt, sf)
        # <= 1 ulp: both evaluate the same float64 formula and round once to float32; exp
        # (Sleef vs NumPy, <= 1 ulp each) and the float64 sum order differ, moving the float64
        # value by <= (E + 3) 2^-52 relative, which can move the float32 rounding by one step
        assert_within_ulp(p, p_ref, 1, what="routing scores", why="float64 exp/sum, one rounding to float32")
        _event("routing scores bit-identical" if to_numpy(p).tobytes() == p_ref.tobytes() else "scores differ")
        bias = kw.get("e_score_correction_bias")
        bias_t = None if bias is None else to_torch(round_to_dtype(bias, logits.dtype).astype(np.float32), backend)
        sel = dict(renormalize=kw.get("renormalize", True), use_grouped_topk=kw.get("use_grouped_topk", False),
                   num_expert_group=kw.get("num_expert_group"), topk_group=kw.get("topk_group"),
                   e_score_correction_bias=bias_t, routed_scaling_factor=kw.get("routed_scaling_factor", 1.0))
        # 0 ulp given the reference's scores: same float32 add/sum for biased and group scores,
        # the same stable order (ties: lower index), the same float64 ops for the renormalization
        w_iso, ids_iso = om.select_experts(to_torch(p_ref, backend), top_k, **sel)
        assert_bitexact(ids_iso, ids_ref, what="expert ids from the reference's scores")
        assert_bitexact(w_iso, w_ref, what="weights from the reference's scores")
        w_own, ids_own = om.select_experts(p, top_k, **sel)
        assert_bitexact(ids, ids_own, what="route == select_experts(routing_scores)")
        assert_bitexact(w, w_own, what="route weights == select_experts(routing_scores)")


@given(data=st.data())
def test_route_matches_reference(backend, data):
    logits, top_k, kw = data.draw(mh.routing_case(), label="routing")
    check_route(backend, logits, top_k, kw)


# --------------------------------------------------------------------------------------
# experts: bounds
# --------------------------------------------------------------------------------------

def _abs_rowsum(eff: dict, which: str) -> np.ndarray:
    """``A[n] = sum_k |q[n, k]| * S[n, k]``: the dequantized weight's absolute row sums."""
    return (np.abs(eff["q" + which].astype(np.float64)) * eff["S" + which]).sum(axis=1)


def _requant_bound(a: np.ndarray, s2: np.ndarray, mid) -> np.ndarray:
    """Per row: ``c`` such that ``|o_hat_opt[n] - o_hat_ref[n]| <= c * A[n]`` when every element
    of our SwiGLU output ``a`` is within 1 ulp of the reference's (``o_hat = s2 * S2 * (q2 . w2)``,
    the exact value before the epilogue roundings).

    With ``m = max|a|`` and ``U = ulp_mid(m)`` (every element, and the max, moves by <= U):
    ``r = 127/m`` moves by <= ``127 U / (m (m - U))`` plus two float32 roundings, so the
    pre-rint value ``a * r`` moves by ``X <= 254 U / (m - U) + 4 * 127 * 2^-24`` and each code
    by ``dq <= floor(X) + 1`` (saturation only shrinks it); ``s2 = f32(m / 127)`` moves by
    ``ds2 <= U / 127 + 2^-23 (s2 + U / 127)``. Then
    ``|o_hat_opt - o_hat_ref| <= ((s2 + ds2) dq + 127 ds2) * A``. Independently
    ``|o_hat| <= 127 s2 A`` on each side gives ``c <= (2 m + U)(1 + 2^-20)``; the smaller wins.
    Non-finite rows (NaN scale on both sides) get 0: their NaN positions are compared exactly.
    """
    af = np.abs(a.astype(np.float64))
    finite = np.all(np.isfinite(af), axis=1)
    m = np.where(finite, af.max(axis=1, initial=0.0), 0.0)
    u = ulp_of(m, mid)
    s2 = np.where(np.isfinite(s2), s2.astype(np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = 254.0 * u / (m - u) + 4 * 127 * _U
        dq = np.floor(x) + 1
        ds2 = u / 127 + 2 * _U * (s2 + u / 127)
        fine = np.where(m > u, (s2 + ds2) * dq + 127 * ds2, np.inf)
    return np.where(finite, np.minimum(fine, (2 * m + u) * (1 + 2.0**-20)), 0.0)


def _epilogue_bound(d_hat: np.ndarray, o: np.ndarray, mid) -> np.ndarray:
    """``|o_opt - o_ref|`` from ``|o_hat_opt - o_hat_ref| <= d_hat``: each side's ``o`` is
    ``mid`` of <= 3 float32 roundings of ``o_hat`` (``f32(acc)``, ``* S``, ``* s2``; per-group: the
    float64 group sum rounded to float32), so ``|o - o_hat| <= 3.01 * 2^-24 |o_hat| + ulp/2``;
    both sides together: ``d_hat (1 + 2^-20) + 2^-20 |o| + ulp_mid(2 (|o| + d_hat))``."""
    oa = np.abs(np.where(np.isfinite(o.astype(np.float64)), o.astype(np.float64), 0.0))
    return np.where(d_hat > 0, d_hat * (1 + 2.0**-20) + 2.0**-20 * oa + ulp_of(2 * (oa + d_hat), mid), 0.0)


def _combine_bound(b_rows: np.ndarray, o_rows: np.ndarray, case: mh.MoECase, order: np.ndarray, y: np.ndarray):
    """``|y_opt - y_ref|`` from per-row bounds ``b_rows`` on the expert outputs (sorted order).

    ``y = dt(sum_j f32(w_j * f32(o_j)))`` with ``w = f32(dt(topk_weights))`` on both sides:
    ``|dy| <= sum_j |w_j| b_j + 2 (k + 1) 2^-24 sum_j |w_j| (|o_j| + b_j) + ulp_dt(2 (|y| + sum_j |w_j| b_j))``
    (k products and k float32 additions on each side, then one rounding to ``dt`` each).
    """
    t, k = case.topk_ids.shape
    w = np.abs(round_to_dtype(case.topk_weights, case.dtype).astype(np.float64)).reshape(-1)
    b = np.zeros((t * k, b_rows.shape[1]))
    oa = np.zeros_like(b)
    b[order] = b_rows
    oa[order] = np.abs(np.nan_to_num(o_rows.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    wb = (w[:, None] * b).reshape(t, k, -1).sum(axis=1)
    wo = (w[:, None] * (oa + b)).reshape(t, k, -1).sum(axis=1)
    ya = np.abs(np.nan_to_num(y.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    return np.where(wb > 0, wb + 2 * (k + 1) * _U * wo + ulp_of(2 * (ya + wb), case.dtype), 0.0)


def _same_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows equal bitwise (NaN payloads ignored)."""
    bits = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    eq = (a.view(bits) == b.view(bits)) | (np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64)))
    return np.all(eq, axis=1)


# --------------------------------------------------------------------------------------
# experts: the check
# --------------------------------------------------------------------------------------

def _repro_call(case: mh.MoECase, backend: str) -> tuple[str, dict]:
    lay = case.layout
    call = (f"import sys; sys.path.insert(0, {str(_REPO)!r})\n"
            "    from conformance.moe_strategies import MoECase, build_experts\n"
            "    from conformance.test_moe_conformance import check_moe\n"
            f"    check_moe({backend!r}, MoECase({case.algo!r}, {case.dtype!r}, build_experts({case.algo!r}, "
            f"{lay['E']}, {lay['H']}, {lay['I']}, {lay['seed']}, mode={lay['mode']!r}, group={lay['group']}, "
            f"packed={lay['packed']}, scale_dtype={lay['scale_dtype']!r}), x, topk_weights, topk_ids, "
            f"{case.group_size!r}, {lay!r}))")
    return call, dict(x=case.x, topk_weights=case.topk_weights, topk_ids=case.topk_ids)


def _int_stages(case, p, tr, tok, eid, effs, mid) -> None:
    """Integer stages and float32 epilogues of the int8/int4 algorithms, each bit-exact."""
    x = case.x
    with np.errstate(all="ignore"):
        xq_ref, s0_ref = ra.quantize_dynamic_per_token(x)
    xq_rows, s0_rows = xq_ref[tok], s0_ref[tok]
    # 0 ulp: npu_dynamic_quant, identical float32 op sequence (optimized.activation_quant)
    assert_bitexact(tr["xq"], xq_rows, what="activation codes (sorted rows)")
    assert_bitexact(tr["s0"], s0_rows, what="activation scales (sorted rows)")
    h, a = to_numpy(tr["h"]), to_numpy(tr["a"])
    with np.errstate(all="ignore"):
        q2_ref, s2_ref = ra.quantize_dynamic_per_token(a)
    # 0 ulp: the re-quantization of OUR SwiGLU output (stage isolation)
    assert_bitexact(tr["q2"], q2_ref, what="re-quantized codes q2 (from our a)")
    assert_bitexact(tr["s2"], s2_ref, what="re-quantized scales s2 (from our a)")
    o = to_numpy(tr["o"])
    rng = np.random.default_rng(len(eid))
    for e in np.unique(eid):
        rows = np.flatnonzero(eid == e)
        eff = effs[e]
        for which, codes in (("13", xq_rows[rows]), ("2", q2_ref[rows])):
            # exact int32 accumulators of our prepared kernels, fed the reference's int8 codes,
            # plus random full-range rows (-128 and 127 included)
            extra = rng.integers(-128, 128, (3, codes.shape[1])).astype(np.int8)
            extra[0], extra[1] = -128, 127
            for feed in (codes, extra):
                g = eff["g" + which]
                expect = np.stack([int_matmul(feed[:, j * g:(j + 1) * g], eff["q" + which][:, j * g:(j + 1) * g])
                                   for j in range(feed.shape[1] // g)])
                got = p.accumulators(int(e), "w" + which, torch.from_numpy(feed))
                assert_bitexact(got, expect, what=f"experts.{e} w{which} int32 accumulators (exact)")
        # epilogues, 0 ulp: the reference's float32 ops (and float64 group sums) in its order
        for which, feed, s_tok, out in (("13", xq_rows[rows], s0_rows[rows], h[rows]),
                                        ("2", q2_ref[rows], s2_ref[rows], o[rows])):
            g = eff["g" + which]
            q, s_el = eff["q" + which], eff["S" + which]
            scale_g = s_el[:, ::g].T.astype(np.float32)                        # [G, N]
            with np.errstate(all="ignore"):
                if case.algo == "W4A8_DYNAMIC":
                    t = rmoe._grouped_w4_matmul(feed, rmoe._W4A8Proj(q, scale_g), "acc")
                    expect = round_to_dtype((t * s_tok[:, None]).astype(np.float32), BFLOAT16)
                else:
                    expect = rmoe._dyn_matmul_epilogue(int_matmul(feed, q), scale_g[0], s_tok, mid)
            assert_bitexact(out, expect, what=f"experts.{e} w{which} epilogue output (0 ulp: same float32 ops)")


def _w4a16_bounds(case, p, tr, tok, eid, effs, mid) -> np.ndarray:
    """Stage bounds of the weight-only path; returns the per-row bound on ``o`` (sorted rows).

    h: ``optimized/weight_only.py`` bound vs the reference's ``dt(f64(x) @ f64(w13)^T)``;
    a: ``|d(silu(g) u)| <= L B_g |u| + (|silu(g)| + L B_g) B_u`` (``L`` = sup|silu'|) plus the two
    roundings (``ulp_dt`` at twice the magnitude) and the 1-ulp SwiGLU ``exp`` effect;
    o: kernel bound on our ``a`` plus ``sum_k |da_k| |w2[n, k]|`` plus one ulp.
    """
    x_rows = case.x[tok]
    h, a, o = to_numpy(tr["h"]), to_numpy(tr["a"]), to_numpy(tr["o"])
    inter = a.shape[1]
    b_o = np.zeros(o.shape)
    for e in np.unique(eid):
        rows = np.flatnonzero(eid == e)
        eff = effs[e]
        w13, w2 = eff["q13"] * eff["S13"], eff["q2"] * eff["S2"]
        with np.errstate(all="ignore"):
            h_ref = round_to_dtype(x_rows[rows].astype(np.float64) @ w13.T, mid)
        b_h = weight_only_bound(p.kernel, case.dtype, x_rows[rows], w13, None, h_ref)
        assert_within_abs(h[rows], h_ref, b_h, what=f"experts.{e} gate_up output h",
                          why="weight-only float GEMM: optimized/weight_only.py bound")
        with np.errstate(all="ignore"):
            o_iso = round_to_dtype(a[rows].astype(np.float64) @ w2.T, mid)
        b_o_iso = weight_only_bound(p.kernel, case.dtype, a[rows], w2, None, o_iso)
        assert_within_abs(o[rows], o_iso, b_o_iso, what=f"experts.{e} down output o (from our a)",
                          why="weight-only float GEMM: optimized/weight_only.py bound")
        g, u = h[rows, :inter].astype(np.float64), h[rows, inter:].astype(np.float64)
        bg, bu = b_h[:, :inter], b_h[:, inter:]
        with np.errstate(all="ignore"):
            silu = np.abs(g / (1 + np.exp(-g)))
            da = _SILU_LIP * bg * np.abs(u) + (silu + _SILU_LIP * bg) * bu
            da = da + 2 * ulp_of(2 * (np.abs(a[rows].astype(np.float64)) + da), mid)
            da = np.nan_to_num(da, nan=0.0, posinf=0.0)
            b_o[rows] = b_o_iso + da @ np.abs(w2).T + ulp_of(2 * (np.abs(o_iso.astype(np.float64)) + b_o_iso), mid)
    return np.nan_to_num(b_o, nan=0.0, posinf=np.inf)


def check_moe(backend: str, case: mh.MoECase, *, kernel: str | None = None) -> str:
    """``apply_moe`` against ``reference.moe.moe_forward`` stage by stage (module docstring).
    Returns ``"bitexact"`` or ``"bound"`` (which end-to-end assertion applied)."""
    algo, dt = case.algo, case.dtype
    mid = BFLOAT16 if algo == "W4A8_DYNAMIC" else hh.np_dtype(dt)
    call, arrays = _repro_call(case, backend)
    with repro(call, **arrays):
        try:
            with np.errstate(all="ignore"):
                y_ref = rmoe.moe_forward(algo, case.x, case.experts, case.topk_weights, case.topk_ids, dtype=dt,
                                         group_size=case.group_size)
        except (ValueError, OverflowError) as exc:
            _event(f"reference raised {type(exc).__name__}: {str(exc)[:60]}")
            with pytest.raises(type(exc)):
                p = om.prepare_moe(algo, case.experts, dtype=dt, group_size=case.group_size, backend=backend)
                om.apply_moe(p, to_torch(case.x, backend), to_torch(case.topk_weights, backend),
                             to_torch(case.topk_ids, backend))
            return "error"
        p = om.prepare_moe(algo, case.experts, dtype=dt, group_size=case.group_size, backend=backend, kernel=kernel)
        tr: dict = {}
        y = to_numpy(om.apply_moe(p, to_torch(case.x, backend), to_torch(case.topk_weights, backend),
                                  to_torch(case.topk_ids, backend), trace=tr))
        # without a trace, small batches take the fused native path (optimized.moe._fused_int_stages):
        # the same values as the staged path checked below, bit for bit
        y_plain = to_numpy(om.apply_moe(p, to_torch(case.x, backend), to_torch(case.topk_weights, backend),
                                        to_torch(case.topk_ids, backend)))
        assert_bitexact(y_plain, y, what=f"{algo} MoE output without trace vs with trace")
        if case.x.shape[0] == 0:
            _event("empty batch")
            assert_bitexact(y, y_ref, what="empty batch")
            return "bitexact"
        k = case.topk_ids.shape[1]
        order = to_numpy(tr["order"])
        tok, eid = order // k, case.topk_ids.reshape(-1)[order]
        effs = {int(e): mh.effective_weights(algo, case.experts[e], dt) for e in np.unique(eid)}
        h, a = to_numpy(tr["h"]), to_numpy(tr["a"])
        with np.errstate(all="ignore"):
            a_iso = rmoe.swiglu(h, mid)
        # <= 1 ulp: same float64 formula and one rounding; only exp differs (<= 1 float64 ulp)
        assert_within_ulp(a, a_iso, 1, what="SwiGLU output (from our h)", why="float64 exp, one rounding")
        same = _same_rows(a, a_iso)
        if algo == "W4A16":
            b_rows = _w4a16_bounds(case, p, tr, tok, eid, effs, mid)
        else:
            _int_stages(case, p, tr, tok, eid, effs, mid)
            if same.all():
                # 0 ulp: every stage above is bit-exact and the combine is the same float32 ops
                # in the same order (increasing j), rounded once to dt
                _event("output bit-identical")
                assert_bitexact(y, y_ref, what=f"{algo} MoE output (0 ulp: SwiGLU agreed bitwise)")
                return "bitexact"
            # rows whose SwiGLU output agreed bitwise give identical o (bound 0); the others
            # move by at most _requant_bound * A[n] before the epilogue roundings
            rowsum = np.stack([_abs_rowsum(effs[int(e)], "2") for e in eid])
            d_hat = np.where(same[:, None], 0.0, _requant_bound(a, to_numpy(tr["s2"]), mid)[:, None] * rowsum)
            b_rows = _epilogue_bound(d_hat, to_numpy(tr["o"]), mid)
        bound = _combine_bound(b_rows, to_numpy(tr["o"]), case, order, y)
        identical = bool(_same_rows(y.reshape(1, -1), y_ref.reshape(1, -1))[0])  # NaN payloads aside
        _event("output bit-identical" if identical else "output within the bound")
        assert_within_abs(y, y_ref, bound, what=f"{algo} MoE output",
                          why="SwiGLU 1-ulp / weight-only bound propagated through requant, GEMM and combine")
        return "bitexact" if identical else "bound"


@pytest.mark.parametrize("algo", mh.MOE_ALGOS)
@given(data=st.data())
def test_moe_matches_reference(backend, algo, data):
    check_moe(backend, data.draw(mh.moe_case(algo), label="case"))


# --------------------------------------------------------------------------------------
# explicit examples (not Hypothesis)
# --------------------------------------------------------------------------------------

_LARGER = [("W8A8_DYNAMIC", 0, True), ("W8A8_MIX", 0, True), ("W4A8_DYNAMIC", 0, True),
           ("W4A8_DYNAMIC", 64, True), ("W4A8_DYNAMIC", 0, False), ("W4A16", 32, True)]


@pytest.mark.parametrize("algo,group,packed", _LARGER, ids=[f"{a}-g{g}-{'packed' if p else 'unpacked'}"
                                                            for a, g, p in _LARGER])
def test_moe_larger_shapes(backend, algo, group, packed):
    """E = 8, top-2, H = 256, I = 128, T = 33 with duplicate routing and edge rows."""
    e, h, i, t = 8, 256, 128, 33
    experts = mh.build_experts(algo, e, h, i, seed=7, mode="quantized", group=group, packed=packed)
    x = hh.make_activations(t, h, "bfloat16", seed=3, special=[(0, "ties"), (5, "zero"), (9, "spike")])
    rng = np.random.default_rng(5)
    ids = rng.integers(0, e, (t, 2)).astype(np.int32)
    ids[3] = [4, 4]
    w = rng.uniform(0, 1, (t, 2)).astype(np.float32)
    case = mh.MoECase(algo, "bfloat16", experts, x, w, ids, group or None,
                      dict(mode="quantized", group=group, packed=packed, scale_dtype="float32", seed=7, E=e, H=h, I=i))
    check_moe(backend, case)


def test_moe_accumulators_beyond_2_pow_24(backend):
    """|acc| = 127 * 127 * 1100 > 2^24: f32(acc) must be the RNE of the exact int32 sum."""
    e, h, i, t = 2, 1100, 16, 3
    experts = mh.build_experts("W8A8_DYNAMIC", e, h, i, seed=1)
    for ex in experts:
        ex["gate_proj"]["weight"][:] = 127
        ex["up_proj"]["weight"][:] = -127
    x = np.full((t, h), 3.0, np.float32)
    x[1, ::2] = -3.0
    case = mh.MoECase("W8A8_DYNAMIC", "float32", experts, x, np.ones((t, 2), np.float32),
                      np.array([[0, 1]] * t, np.int32), None,
                      dict(mode="codes", group=0, packed=True, scale_dtype="float32", seed=1, E=e, H=h, I=i))
    check_moe(backend, case)


# --------------------------------------------------------------------------------------
# the checks can fail, and the bound branch holds for a real 1-ulp SwiGLU difference
# --------------------------------------------------------------------------------------

def _fixed_case(algo: str, dtype: str = "bfloat16", t: int = 17) -> mh.MoECase:
    e, h, i, group = 4, 32, 16, (16 if algo == "W4A16" else 0)
    experts = mh.build_experts(algo, e, h, i, seed=11, mode="codes", group=group)
    x = hh.make_activations(t, h, dtype, seed=12, special=[(1, "zero"), (2, "ties")])
    rng = np.random.default_rng(13)
    ids = rng.integers(0, e, (t, 2)).astype(np.int32)
    w = rng.uniform(0.1, 1, (t, 2)).astype(np.float32)
    return mh.MoECase(algo, dtype, experts, x, w, ids, None,
                      dict(mode="codes", group=group, packed=True, scale_dtype="float32", seed=11, E=e, H=h, I=i))


@pytest.mark.parametrize("algo", mh.MOE_ALGOS)
def test_bound_holds_for_a_one_ulp_swiglu_difference(algo, monkeypatch):
    """Nudge the largest |a| of every row by one ulp (what a different exp could do, at
    worst on the row maximum, which moves s2 and every code): the output then differs from
    the reference's and must stay within the derived bound."""
    real = om.swiglu

    def nudged(hh_, dtype):
        a = real(hh_, dtype)
        idx = a.float().abs().argmax(dim=1, keepdim=True)
        v = a.gather(1, idx)
        a.scatter_(1, idx, torch.nextafter(v, torch.where(v >= 0, torch.full_like(v, float("inf")),
                                                          torch.full_like(v, float("-inf")))))
        return a

    monkeypatch.setattr(om, "swiglu", nudged)
    case = _fixed_case(algo)
    assert check_moe("torch-portable", case) == "bound"


def _caught(fn, *args, **kw) -> bool:
    try:
        fn(*args, **kw)
    except AssertionError:
        return True
    return False


def test_suite_catches_unrounded_weight_scales(monkeypatch):
    """W8A8 scales are declared in the model dtype: skipping that load-time rounding is a bug."""
    monkeypatch.setattr(om, "_round_through", lambda t, dt: t.to(torch.float32))
    assert _caught(check_moe, "torch-portable", _fixed_case("W8A8_DYNAMIC"))


def test_suite_catches_swapped_gate_and_up(monkeypatch):
    real = om.swiglu
    monkeypatch.setattr(om, "swiglu", lambda h, dtype: real(torch.cat([h[:, h.shape[1] // 2:],
                                                                       h[:, :h.shape[1] // 2]], dim=1), dtype))
    assert _caught(check_moe, "torch-portable", _fixed_case("W4A8_DYNAMIC"))


def test_suite_catches_unrounded_topk_weights(monkeypatch):
    """vLLM Ascend casts topk_weights to the model dtype before the combine."""
    monkeypatch.setattr(om, "_weights_in_dt", lambda w, dt: w.to(torch.float32))
    assert _caught(check_moe, "torch-portable", _fixed_case("W8A8_DYNAMIC"))


def test_swiglu_rounds_once():
    """g = 37: sigmoid(g) = 1 exactly in float64 (e^-37 < 2^-53), so a = 37 * u exactly, with
    u = 1 + 28340 * 2^-23 (float32): a = 37.125 + 4.77e-7, just above the bf16 tie 37.125.
    Rounded once: 37.25. Through float32 first (PyTorch's float64 -> bf16): 37.125, whose
    tie then goes to even, 37.0."""
    h = np.array([[37.0, 1 + 28340 * 2.0**-23]], np.float32)
    ref = rmoe.swiglu(h, BFLOAT16)
    assert float(ref[0, 0]) == 37.25
    assert_bitexact(om.swiglu(torch.from_numpy(h), torch.bfloat16), ref, what="SwiGLU rounded once")


@given(data=st.data())
def test_swiglu_rounding_fast_path_is_exact(data):
    """``optimized.activation_quant.round_f64_to_dtype`` (the SwiGLU's final rounding: float32
    first, exact fallback on float32 midpoints of the target) against the reference's single rounding, on float64 values at, next to, and a
    few float64 ulps around midpoints of bf16/fp16 (subnormal ones included), plus random,
    huge (overflow), tiny, infinite and NaN values. 0 ulp: both are correctly rounded."""
    dt = data.draw(st.sampled_from(("bfloat16", "float16")), label="dtype")
    npdt = hh.np_dtype(dt)
    rng = np.random.default_rng(data.draw(hh.seeds, label="seed"))
    bits = rng.integers(0, 0x7C00 if dt == "float16" else 0x7F80, 64).astype(np.uint16)
    lo = bits.view(npdt).astype(np.float64)
    hi = (bits + 1).view(npdt).astype(np.float64)
    mid = (lo + hi) / 2                                                # exact in float64
    steps = rng.integers(-3, 4, (64, 1)) * np.ldexp(1.0, np.frexp(mid)[1][:, None] - 53)
    near = (mid[:, None] + steps).reshape(-1)
    rel = mid * (1 + rng.choice([-1, 1], 64) * 2.0 ** rng.integers(-40, -20, 64).astype(np.float64))
    extra = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300, 65520.0, 65519.99, 3.4e38, 5e-324,
                      2.0**-25, 2.0**-25 * (1 + 2.0**-40), 2.0**-134, 2.0**-133 * 1.5])
    x = np.concatenate([near, rel, rng.standard_normal(64) * 2.0 ** rng.integers(-30, 30, 64), extra])
    x = x * rng.choice([-1.0, 1.0], x.size)
    with np.errstate(all="ignore"):
        expect = round_to_dtype(x, npdt)
    from ascend_quant.optimized.activation_quant import round_f64_to_dtype

    got = round_f64_to_dtype(torch.from_numpy(x), om.torch_model_dtype(dt))
    with repro(f"round_f64_to_dtype(torch.from_numpy(x), {dt!r})", x=x):
        assert_bitexact(got, expect, what=f"float64 -> {dt} rounded once")


@given(data=st.data())
def test_swiglu_fast_path_equals_float64_path(data):
    """``optimized.moe.swiglu``'s float32 fast path with float64 recomputation near rounding
    midpoints must give exactly the float64 path's result (0 ulp: it falls back wherever the
    float32 error, < 5 ulps, could change the target's rounding). Inputs: every kind of bit
    pattern (NaN, inf, subnormals), ordinary values, and g in [17, 80) where float32 sees
    sigmoid(g) = 1 while float64 does not, with u making g * u an exact bf16/fp16 midpoint
    (the fast path must hand those to float64, whose value lies just below the midpoint)."""
    dt = data.draw(st.sampled_from(("bfloat16", "float16")), label="dtype")
    npdt = hh.np_dtype(dt)
    rng = np.random.default_rng(data.draw(hh.seeds, label="seed"))
    kind = data.draw(st.sampled_from(("bits", "normal", "sigmoid_one")), label="kind")
    n = 4096
    if kind == "bits":
        h = rng.integers(0, 2**16, (2, n)).astype(np.uint16).view(npdt)
    elif kind == "normal":
        h = (rng.standard_normal((2, n)) * 2.0 ** rng.integers(-20, 8)).astype(np.float32).astype(npdt)
    else:
        g = rng.uniform(17, 80, n).astype(np.float32).astype(npdt)
        h = np.stack([g, rng.standard_normal(n).astype(np.float32).astype(npdt)])
    ht = to_torch(np.ascontiguousarray(h.T.reshape(-1, 2 * 64)), "torch-portable")
    tdt = om.torch_model_dtype(dt)
    half = ht.shape[1] // 2
    with repro(f"swiglu(h, {dt!r}) vs _swiglu_f64", h=to_numpy(ht)):
        assert_bitexact(om._swiglu_fast(ht[:, :half], ht[:, half:], tdt),
                        om._swiglu_f64(ht[:, :half], ht[:, half:], tdt), what="fast SwiGLU == float64 SwiGLU")


def test_suite_catches_double_rounded_swiglu(monkeypatch):
    monkeypatch.setattr(om, "round_f64_to_dtype", lambda x, dt: x.to(torch.float32).to(dt))
    assert _caught(test_swiglu_rounds_once)


# --------------------------------------------------------------------------------------
# errors: same ValueError as the reference, and our layout rule
# --------------------------------------------------------------------------------------

def _mutated(algo, path, value):
    experts = mh.build_experts(algo, 2, 16, 8, seed=3, group=8 if algo == "W4A16" else 0)
    e, proj, key = path
    if value is None:
        del experts[e][proj][key]
    else:
        experts[e][proj][key] = value
    return experts


_BAD = [
    ("W8A8_DYNAMIC", (1, "down_proj", "weight_scale"), np.ones((16, 2), np.float32)),
    ("W8A8_DYNAMIC", (0, "gate_proj", "weight"), None),
    ("W8A8_DYNAMIC", (1, "up_proj", "weight_scale"), np.full((8, 1), 1e-30, np.float32)),   # 0 in fp16
    ("W4A8_DYNAMIC", (1, "gate_proj", "weight"), np.full((8, 16), 9, np.int8)),             # int4 out of range
    ("W4A16", (0, "down_proj", "weight_packed"), np.zeros((16, 2), np.int64)),
]


@pytest.mark.parametrize("algo,path,value", _BAD, ids=[f"{a}-{'.'.join(map(str, p))}" for a, p, _ in _BAD])
def test_prepare_errors_match_the_reference(algo, path, value):
    experts = _mutated(algo, path, value)
    x = np.zeros((1, 16), np.float16)
    with pytest.raises(ValueError) as ref_err:
        rmoe.moe_forward(algo, x, experts, np.ones((1, 1), np.float32), np.zeros((1, 1), np.int32), dtype="float16")
    with pytest.raises(ValueError) as opt_err:
        om.prepare_moe(algo, experts, dtype="float16", backend="torch-portable")
    assert str(opt_err.value) == str(ref_err.value)


def test_mixed_expert_layouts_are_rejected():
    experts = mh.build_experts("W4A8_DYNAMIC", 2, 16, 8, seed=3)
    experts[1]["down_proj"]["weight"] = mh.build_experts("W4A8_DYNAMIC", 1, 16, 8, seed=3, packed=False)[0][
        "down_proj"]["weight"]
    rmoe.moe_forward("W4A8_DYNAMIC", np.zeros((1, 16), BFLOAT16), experts, np.ones((1, 1), np.float32),
                     np.zeros((1, 1), np.int32), dtype="bfloat16")  # the reference accepts it per expert
    with pytest.raises(ValueError, match=r"experts\.1\..*one layout"):
        om.prepare_moe("W4A8_DYNAMIC", experts, dtype="bfloat16", backend="torch-portable")


@pytest.mark.parametrize("mutate,match", [
    (lambda x, w, ids: (x, w, ids + 5), r"topk_ids: expert id \d+ at \(0, 0\) is outside \[0, E\)"),
    (lambda x, w, ids: (x.float(), w, ids), "x: expected the model dtype"),
    (lambda x, w, ids: (x, w[:, :1], ids), r"topk_ids: expected topk_weights' shape"),
    (lambda x, w, ids: (x, w, ids.float()), "topk_ids: expected an integer tensor"),
    (lambda x, w, ids: (x[:, :8], w, ids), "x: width 8 does not match"),
])
def test_apply_errors(mutate, match):
    p = om.prepare_moe("W8A8_DYNAMIC", mh.build_experts("W8A8_DYNAMIC", 2, 16, 8, seed=3), dtype="bfloat16",
                       backend="torch-portable")
    x = torch.zeros((2, 16), dtype=torch.bfloat16)
    w = torch.ones((2, 2))
    ids = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        om.apply_moe(p, *mutate(x, w, ids))


def test_resident_bytes_hold_no_float_weights():
    e, h, i = 4, 64, 32
    for algo in mh.MOE_ALGOS:
        p = om.prepare_moe(algo, mh.build_experts(algo, e, h, i, seed=1, group=16 if algo == "W4A16" else 0),
                           dtype="bfloat16", backend="torch-portable")
        weights = e * 3 * h * i                                     # one byte per int8 / int4-in-int8 code
        assert weights <= p.resident_bytes() <= weights + e * 3 * (h + i) * 16, (algo, p.resident_bytes())
