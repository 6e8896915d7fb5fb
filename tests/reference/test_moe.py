"""MoE routing (moe_gating_top_k), per-expert quantized SwiGLU MLPs and the combine.

Experts are built here by hand (per-channel / per-group symmetric quantization written
out in the test), packed with bit arithmetic written in the test, and the expected MoE
output comes from an independent per-token route: Python-int dot products, float32
scalar ops in the documented order, math.exp for SiLU, math.fsum for float sums.
"""

import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from ascend_quant.reference.activation_quant import quantize_dynamic_per_token
from ascend_quant.reference.moe import expert_mlp, moe_forward, moe_layer_forward, route, swiglu
from ascend_quant.reference.rounding import round_to_dtype

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
f32 = np.float32

E, H, I, T, TOPK = 4, 16, 8, 5, 2


# ----------------------------------------------------------------------------------
# Routing goldens (hand-computed)
# ----------------------------------------------------------------------------------

def test_softmax_golden_renormalize_and_scaling_once():
    # exp(ln [1, 3, 2, 2]) / 8 = [1/8, 3/8, 2/8, 2/8]: the float32 logit errors (< 2^-25
    # relative in exp) stay below half an ulp of these dyadic values, so p is exact.
    logits = np.log(np.array([[1.0, 3.0, 2.0, 2.0]])).astype(np.float32)
    # top-2: 3/8 (id 1), then the 2/8 tie between ids 2 and 3 -> lower index 2
    w, ids = route(logits, 2, renormalize=False)
    assert ids.dtype == np.int32 and w.dtype == np.float32
    assert ids.tolist() == [[1, 2]] and w.tolist() == [[0.375, 0.25]]
    w, ids = route(logits, 2)  # 0.375 / 0.625, 0.25 / 0.625 (+1e-20 is below f64 resolution)
    assert ids.tolist() == [[1, 2]] and w.tolist() == [[f32(0.6), f32(0.4)]]
    # routed_scaling_factor applied once: 2.5 * [0.6, 0.4] = [1.5, 1.0] (twice: [3.75, 2.5])
    w, _ = route(logits, 2, routed_scaling_factor=2.5)
    assert w.tolist() == [[1.5, 1.0]]
    w, _ = route(logits, 2, renormalize=False, routed_scaling_factor=2.5)
    assert w.tolist() == [[0.9375, 0.625]]


def test_sigmoid_golden():
    # sigmoid(ln 7) = 7/8, sigmoid(ln 3) = 3/4, sigmoid(0) = 1/2; sigmoid(-ln 3) = 1/4.
    # The float32 logits move p by < 2e-8, under half an ulp at 1/2..1, so p is exact.
    logits = np.array([[0.0, math.log(3), -math.log(3), math.log(7)]], np.float32)
    w, ids = route(logits, 2, scoring_func="sigmoid", renormalize=False)
    assert ids.tolist() == [[3, 1]] and w.tolist() == [[0.875, 0.75]]
    w, ids = route(logits, 2, scoring_func="sigmoid")  # 0.875/1.625 = 7/13, 0.75/1.625 = 6/13
    assert ids.tolist() == [[3, 1]] and w.tolist() == [[f32(7 / 13), f32(6 / 13)]]


def test_ties_go_to_the_lower_index():
    assert route(np.zeros((1, 4), np.float32), 2)[1].tolist() == [[0, 1]]
    assert route(np.array([[1, 2, 2, 2]], np.float32), 2)[1].tolist() == [[1, 2]]
    assert route(np.array([[2, 2, 1, 2]], np.float32), 3)[1].tolist() == [[0, 1, 3]]
    w, ids = route(np.zeros((2, 4), np.float32), 4, renormalize=False)
    assert ids.tolist() == [[0, 1, 2, 3]] * 2 and (w == 0.25).all()


def _sig(v) -> float:
    return 1.0 / (1.0 + math.exp(-float(v)))


# E = 8 sigmoid experts in 4 groups of 2; bias +0.6 on group 3 only.
#   p ~ g0 [.881, .269]  g1 [.731, .622]  g2 [.5, .5]  g3 [.269, .182] (+.6 -> [.869, .782])
# group score = sum of top-2 biased: g0 1.150, g1 1.353, g2 1.0, g3 1.651 -> keep g3, g1
# (ranking by the max instead would keep g0 = .881 and g3 = .869: a different answer).
GROUPED_LOGITS = np.array([[2.0, -1.0, 1.0, 0.5, 0.0, 0.0, -1.0, -1.5]], np.float32)
GROUPED_BIAS = np.array([0, 0, 0, 0, 0, 0, 0.6, 0.6], np.float32)


def test_grouped_topk_with_correction_bias():
    p = [f32(_sig(v)) for v in GROUPED_LOGITS[0]]
    kw = dict(scoring_func="sigmoid", use_grouped_topk=True, num_expert_group=4, topk_group=2)
    # kept g3, g1; biased scores e6 .869, e7 .782, e2 .731, e3 .622 -> [6, 7, 2]
    w, ids = route(GROUPED_LOGITS, 3, renormalize=False, e_score_correction_bias=GROUPED_BIAS, **kw)
    assert ids.tolist() == [[6, 7, 2]]
    assert w.tolist() == [[p[6], p[7], p[2]]]  # the UNBIASED scores (0 ulp: same float32 value)
    # unbiased ranking keeps g1 (1.353) and g0 (1.150) -> e0 .881, e2 .731, e3 .622
    assert route(GROUPED_LOGITS, 3, renormalize=False, **kw)[1].tolist() == [[0, 2, 3]]
    # ungrouped with bias: e0 .881, e6 .869, e7 .782
    assert route(GROUPED_LOGITS, 3, scoring_func="sigmoid",
                 e_score_correction_bias=GROUPED_BIAS)[1].tolist() == [[0, 6, 7]]
    # renormalized + scaled: one float64 expression rounded once; independent: math.fsum
    w, _ = route(GROUPED_LOGITS, 3, e_score_correction_bias=GROUPED_BIAS, routed_scaling_factor=2.0, **kw)
    sel = [float(p[6]), float(p[7]), float(p[2])]
    expect = [f32(v / math.fsum(sel) * 2.0) for v in sel]
    # <= 1 ulp: fsum is exact, the reference sums 3 float32 values in float64 (exact here:
    # they have 24-bit mantissas within 2 binades), so both round the same real number
    assert np.array_equal(w[0], np.array(expect, np.float32))


def test_bias_is_rounded_to_the_logits_dtype():
    # bf16(0.6) = bf16(0.6015) = 0.6015625: with bf16 logits the two experts tie (-> id 0);
    # with float32 logits the bias keeps its precision and expert 1 wins.
    bias = np.array([0.6, 0.6015], np.float32)
    logits = np.zeros((1, 2), np.float32)
    assert route(logits, 1, scoring_func="sigmoid", e_score_correction_bias=bias)[1].tolist() == [[1]]
    assert route(logits.astype(BF16), 1, scoring_func="sigmoid",
                 e_score_correction_bias=bias)[1].tolist() == [[0]]


def test_route_empty_batch_and_single_group():
    w, ids = route(np.zeros((0, 6), np.float32), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and ids.dtype == np.int32
    logits = np.array([[0.1, 0.3, 0.2]], np.float32)
    ref = route(logits, 2)
    one_group = route(logits, 2, use_grouped_topk=True, num_expert_group=1, topk_group=1)
    assert np.array_equal(ref[0], one_group[0]) and np.array_equal(ref[1], one_group[1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=5), r"top_k must be in \[1, 4\]"),
    (dict(top_k=0), r"top_k must be in \[1, 4\]"),
    (dict(scoring_func="softplus"), "scoring_func"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(use_grouped_topk=True, num_expert_group=2), "needs num_expert_group and topk_group"),
    (dict(use_grouped_topk=True, num_expert_group=3, topk_group=1), "does not divide"),
    (dict(use_grouped_topk=True, num_expert_group=4, topk_group=1), ">= 2 experts"),
    (dict(use_grouped_topk=True, num_expert_group=2, topk_group=3), r"topk_group must be in \[1, 2\]"),
    (dict(top_k=3, use_grouped_topk=True, num_expert_group=2, topk_group=1), "exceeds the experts"),
    (dict(num_expert_group=2, topk_group=1), "use_grouped_topk=False"),
    (dict(e_score_correction_bias=np.zeros(3, np.float32)), r"e_score_correction_bias: expected shape \(E,\)"),
    (dict(e_score_correction_bias=np.array([0, np.nan, 0, 0], np.float32)), "NaN or inf"),
])
def test_route_argument_errors(kwargs, match):
    kwargs = {"top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        route(np.zeros((3, 4), np.float32), **kwargs)


def test_route_input_errors():
    with pytest.raises(ValueError, match="2-D"):
        route(np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="dtype"):
        route(np.zeros((2, 4), np.int32), 1)
    with pytest.raises(ValueError, match=r"non-finite value at index \(1, 2\)"):
        route(np.array([[0, 0, 0, 0], [0, 0, np.inf, 0]], np.float32), 1)


@given(
    logits=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.just(8)),
                      elements=st.floats(-6, 6, width=32)),
    top_k=st.integers(1, 4),
    scoring=st.sampled_from(["softmax", "sigmoid"]),
    grouped=st.booleans(),
    renormalize=st.booleans(),
    bias=st.none() | hnp.arrays(np.float32, 8, elements=st.sampled_from([0.0, 0.125, -0.25, 0.5])),
)
def test_route_matches_bruteforce(logits, top_k, scoring, grouped, renormalize, bias):
    """Independent route: Python floats, sorted() with key (-score, index)."""
    kw = dict(use_grouped_topk=True, num_expert_group=4, topk_group=2) if grouped else {}
    w, ids = route(logits, top_k, scoring_func=scoring, renormalize=renormalize,
                   e_score_correction_bias=bias, routed_scaling_factor=1.5, **kw)
    for t, row in enumerate(logits):
        z = [float(v) for v in row]
        if scoring == "softmax":
            m = max(z)
            ex = [math.exp(v - m) for v in z]
            s = math.fsum(ex)
            p = [f32(v / s) for v in ex]
        else:
            p = [f32(_sig(v)) for v in z]
        pb = [f32(p[e] + (bias[e] if bias is not None else f32(0))) for e in range(8)]
        allowed = set(range(8))
        if grouped:
            gscore = [f32(sorted(pb[2 * g: 2 * g + 2])[1] + sorted(pb[2 * g: 2 * g + 2])[0]) for g in range(4)]
            keep = sorted(range(4), key=lambda g: (-gscore[g], g))[:2]
            allowed = {e for g in keep for e in (2 * g, 2 * g + 1)}
        expect_ids = sorted(allowed, key=lambda e: (-pb[e], e))[:top_k]
        # ids: exact. p differs from route's only by float64 evaluation order before the one
        # float32 rounding, which can flip p by 1 ulp only at a rounding boundary (deterministic
        # in practice for these inputs; a flip would need a 1-ulp near-tie as well).
        assert ids[t].tolist() == expect_ids
        sel = [float(p[e]) for e in expect_ids]
        expect_w = [v / (math.fsum(sel) + 1e-20) * 1.5 if renormalize else v * 1.5 for v in sel]
        # <= 1 ulp of float32: both sides round (nearly) the same real number once
        np.testing.assert_array_max_ulp(w[t], np.array(expect_w, np.float32), maxulp=1)


# ----------------------------------------------------------------------------------
# Building experts by hand
# ----------------------------------------------------------------------------------

def _q_sym(w: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.rint(w / scale), -qmax - 1, qmax).astype(np.int8)


def _pack_pairs_along_rows(q: np.ndarray) -> np.ndarray:
    """int4 [N, K] -> int8 [N/2, K]: row 2j in the low nibble, row 2j+1 in the high one."""
    lo = q[0::2].astype(np.int16) & 0xF
    hi = (q[1::2].astype(np.int16) & 0xF) << 4
    return (lo | hi).astype(np.uint8).view(np.int8)


def _pack_offset8_along_k(q: np.ndarray) -> np.ndarray:
    """int4 [N, K] -> int32 [N, K/8] words holding q + 8, element i of each 8 at bits 4i."""
    u = (q.astype(np.int64) + 8).reshape(q.shape[0], -1, 8)
    words = sum(u[:, :, i] << (4 * i) for i in range(8))
    return words.astype(np.uint32).view(np.int32)


def _build_projection(algo, w, rng, *, per_group=False, unpacked=False, group=8, scale_dtype=F32):
    """(checkpoint tensors, plain ints and scales for the reference) for a float [N, K] weight."""
    n, k = w.shape
    if algo in ("W8A8_DYNAMIC", "W8A8_MIX"):
        s = (np.abs(w).max(axis=1, keepdims=True) / 127).astype(np.float32)
        q = _q_sym(w, s, 127)
        ck = {"weight": q, "weight_scale": s, "weight_offset": np.zeros((n, 1), np.float32)}
        if algo == "W8A8_MIX":  # static tensors: loaded and never used by the MoE
            ck.update(input_scale=np.array([0.05], np.float32), input_offset=np.array([3.0], np.float32),
                      deq_scale=np.full(n, 12345, np.int64), quant_bias=rng.integers(-9, 9, n).astype(np.int32))
        return ck, {"q": q, "s": s[:, 0]}
    if algo == "W4A8_DYNAMIC":
        if not per_group:
            s = (np.abs(w).max(axis=1, keepdims=True) / 7).astype(np.float32)
            q = _q_sym(w, s, 7)
            ck = {"weight_scale": s, "weight_offset": np.zeros((n, 1), np.float32),
                  "scale_bias": np.full((n, 1), 99.0, np.float32)}  # unused by the math
            ck["weight"] = q if unpacked else _pack_pairs_along_rows(q)
            return ck, {"q": q, "s1": s[:, 0], "s2": None}
        s1 = (np.abs(w).max(axis=1, keepdims=True) / 127).astype(np.float32)
        q8 = _q_sym(w, s1, 127).astype(np.float32).reshape(n, k // group, group)
        s2 = np.maximum(np.abs(q8).max(axis=2) / 7, 1).astype(np.float32)  # [N, G]
        q = _q_sym(q8, s2[:, :, None], 7).reshape(n, k)
        ck = {"weight_scale": s1, "weight_scale_second": s2, "weight_offset": np.zeros((n, 1), np.float32),
              "weight_offset_second": np.zeros(s2.shape, np.int64)}
        ck["weight"] = q if unpacked else _pack_pairs_along_rows(q)
        return ck, {"q": q, "s1": s1[:, 0], "s2": s2}
    # W4A16 pack-quantized
    s = (np.abs(w.reshape(n, k // group, group)).max(axis=2) / 7).astype(scale_dtype)  # [N, G]
    q = _q_sym(w.reshape(n, k // group, group), s.astype(np.float32)[:, :, None], 7).reshape(n, k)
    ck = {"weight_packed": _pack_offset8_along_k(q), "weight_scale": s,
          "weight_shape": np.array([n, k], np.int32)}
    return ck, {"q": q, "s": s.astype(np.float32)}


def _build_experts(algo, seed=0, e=E, h=H, i=I, **kw):
    rng = np.random.default_rng(seed)
    cks, plains = [], []
    for _ in range(e):
        ck, pl = {}, {}
        for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            w = (rng.standard_normal(shape) * rng.uniform(0.05, 0.5)).astype(np.float32)
            ck[name], pl[name] = _build_projection(algo, w, rng, **kw)
        cks.append(ck)
        plains.append(pl)
    return cks, plains


def _inputs(dt, seed=1, t=T, e=E, k=TOPK):
    rng = np.random.default_rng(seed)
    # x on the grid j/64, |j| <= 255 (8 significant bits: exact in bf16/fp16)
    x = (rng.integers(-255, 256, (t, H)) / 64).astype(dt)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.05, 1.0, (t, k)).astype(np.float32)
    return x, w, ids


# ----------------------------------------------------------------------------------
# Independent per-token reference
# ----------------------------------------------------------------------------------

def _to(v, dt) -> float:
    """Round one float (float64 or float32) to dt once, back as a Python float."""
    return float(round_to_dtype(np.array(v, np.float64), dt).astype(np.float64))


def _dot(a, b) -> int:
    return sum(int(u) * int(v) for u, v in zip(a, b))


def _silu_mul(g: float, u: float) -> float:
    return g / (1.0 + math.exp(-g)) * u


def _dyn_linear_row(xq_row, s_tok, q, s_w, out_dt):
    """o[n] = out_dt((f32(acc) * f32(s_w[n])) * s_tok) with a Python-int accumulator."""
    return [_to(f32(f32(f32(_dot(xq_row, q[n])) * f32(s_w[n])) * s_tok), out_dt) for n in range(q.shape[0])]


def _w4a8_row(xq_row, s_tok, plain, raw=False):
    """bf16(f32(t * s_tok)), t = f32(sum_g f64(f32(acc_g)) * f64(S[g, n])), groups in order."""
    q, s1, s2 = plain["q"], plain["s1"], plain["s2"]
    n, k = q.shape
    if s2 is None:
        scales = s1[None, :]  # [1, N]
    else:
        prod = (s1[:, None] * s2).astype(np.float32)  # f32(s1 * s2), then fp16 and back
        scales = (prod if raw else prod.astype(np.float16).astype(np.float32)).T  # [G, N]
    g = k // scales.shape[0]
    out = []
    for col in range(n):
        tot = 0.0
        for grp in range(scales.shape[0]):
            acc = _dot(xq_row[grp * g:(grp + 1) * g], q[col, grp * g:(grp + 1) * g])
            tot += float(f32(acc)) * float(scales[grp, col])
        out.append(_to(f32(f32(tot) * s_tok), BF16))
    return out


def _expert_row(algo, x_row, pl, dt, raw=False):
    """One token through one expert, returned in the expert's output dtype as floats.

    ``raw=True`` skips the load-time scale rounding (dt for W8A8, fp16 for W4A8 per-group):
    used only to show that the rounding is observable.
    """
    gate, up, down = pl["gate_proj"], pl["up_proj"], pl["down_proj"]
    if algo in ("W8A8_DYNAMIC", "W8A8_MIX"):
        xq, s0 = quantize_dynamic_per_token(x_row[None, :])
        sd = lambda s: [float(f32(v) if raw else np.asarray(v, dt).astype(np.float32)) for v in s]  # noqa: E731
        hg = _dyn_linear_row(xq[0], s0[0], gate["q"], sd(gate["s"]), dt)
        hu = _dyn_linear_row(xq[0], s0[0], up["q"], sd(up["s"]), dt)
        a = np.array([_to(_silu_mul(g, u), dt) for g, u in zip(hg, hu)]).astype(dt)
        q2, s2 = quantize_dynamic_per_token(a[None, :])
        return _dyn_linear_row(q2[0], s2[0], down["q"], sd(down["s"]), dt)
    if algo == "W4A8_DYNAMIC":
        xq, s0 = quantize_dynamic_per_token(x_row[None, :])
        hg, hu = _w4a8_row(xq[0], s0[0], gate, raw), _w4a8_row(xq[0], s0[0], up, raw)
        a = np.array([_to(_silu_mul(g, u), BF16) for g, u in zip(hg, hu)]).astype(BF16)
        q2, s2 = quantize_dynamic_per_token(a[None, :])
        return _w4a8_row(q2[0], s2[0], down, raw)

    # W4A16: w = q * dt(scale); sums with math.fsum (exact), rounded once to dt
    def lin(v, p):
        q, s = p["q"], np.asarray(p["s"], dt).astype(np.float64)
        g = q.shape[1] // s.shape[1]
        return [_to(math.fsum(float(v[kk]) * float(q[n, kk]) * s[n, kk // g] for kk in range(q.shape[1])), dt)
                for n in range(q.shape[0])]

    xr = x_row.astype(np.float64)
    hg, hu = lin(xr, gate), lin(xr, up)
    a = [_to(_silu_mul(g, u), dt) for g, u in zip(hg, hu)]
    return lin(a, down)


def _reference_moe(algo, x, plains, w, ids, dt, raw=False):
    y = np.zeros(x.shape, np.float64)
    wd = np.asarray(w).astype(dt).astype(np.float32)  # the weights in the model dtype
    for t in range(x.shape[0]):
        acc = [f32(0)] * x.shape[1]
        for j in range(ids.shape[1]):
            o = _expert_row(algo, x[t], plains[ids[t, j]], dt, raw)
            acc = [f32(acc[c] + f32(wd[t, j] * f32(o[c]))) for c in range(x.shape[1])]
        y[t] = [float(v) for v in acc]
    return np.array(y, np.float32).astype(dt)


def _bytes_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------------
# MoE forward against the reference
# ----------------------------------------------------------------------------------

CASES = [
    ("W8A8_DYNAMIC", {}),
    ("W8A8_MIX", {}),
    ("W4A8_DYNAMIC", {}),                                  # v1.0.0 per-channel, packed [N/2, K]
    ("W4A8_DYNAMIC", {"unpacked": True}),                  # older export, one int4 per byte
    ("W4A8_DYNAMIC", {"per_group": True}),                 # two-step, packed
    ("W4A8_DYNAMIC", {"per_group": True, "unpacked": True}),
    ("W4A16", {}),
    ("W4A16", {"scale_dtype": BF16}),                      # LLM-Compressor writes bf16 scales
]


@pytest.mark.parametrize("dt", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo, kw", CASES, ids=[f"{a}-{'-'.join(k) or 'default'}" for a, k in CASES])
def test_moe_forward_matches_per_token_reference(algo, kw, dt):
    experts, plains = _build_experts(algo, **kw)
    x, w, ids = _inputs(dt)
    y = moe_forward(algo, x, experts, w, ids, dtype=dt)
    expect = _reference_moe(algo, x, plains, w, ids, dt)
    # 0 ulp: the reference performs the same rounded operations (int sums exact; each float32
    # op and each dt rounding identical). The float64 stages (SiLU, W4A16 sums) differ only
    # in evaluation order before ONE rounding to dt, which cannot move the result unless the
    # float64 value sits within ~2^-45 of a dt rounding boundary (fixed data: deterministic).
    assert _bytes_equal(y, expect), np.abs(y.astype(np.float64) - expect.astype(np.float64)).max()


_EXPERT_CACHE: dict = {}


def _cached_experts(algo, kw_items):
    key = (algo, kw_items)
    if key not in _EXPERT_CACHE:
        _EXPERT_CACHE[key] = _build_experts(algo, seed=21, **dict(kw_items))
    return _EXPERT_CACHE[key]


@given(data=st.data())
def test_moe_forward_property_against_reference(data):
    algo, kw = data.draw(st.sampled_from(CASES), label="case")
    dt = data.draw(st.sampled_from([BF16, F16]), label="dtype")
    experts, plains = _cached_experts(algo, tuple(sorted(kw.items())))
    t = data.draw(st.integers(0, 4), label="T")
    k = data.draw(st.integers(1, 3), label="k")
    x = data.draw(hnp.arrays(np.float32, (t, H), elements=st.floats(-4, 4, width=32)), label="x").astype(dt)
    if t and data.draw(st.booleans(), label="zero_row"):
        x[0] = 0
    ids = data.draw(hnp.arrays(np.int32, (t, k), elements=st.integers(0, E - 1)), label="ids")  # duplicates allowed
    w = data.draw(hnp.arrays(np.float32, (t, k), elements=st.sampled_from([0.0, 0.25, 0.3, 1.0, 1.7])), label="w")
    y = moe_forward(algo, x, experts, w, ids, dtype=dt)
    # 0 ulp, as in test_moe_forward_matches_per_token_reference (same rounded op sequence;
    # float64 stages differ only in evaluation order before one rounding to dt)
    assert _bytes_equal(y, _reference_moe(algo, x, plains, w, ids, dt))


def _unpack_pairs_along_rows(b: np.ndarray) -> np.ndarray:
    u = b.view(np.uint8).astype(np.int16)
    lo, hi = u & 0xF, u >> 4
    q = np.empty((2 * b.shape[0], b.shape[1]), np.int16)
    q[0::2], q[1::2] = np.where(lo >= 8, lo - 16, lo), np.where(hi >= 8, hi - 16, hi)
    return q.astype(np.int8)


def _unpack_offset8_along_k(words: np.ndarray) -> np.ndarray:
    u = words.view(np.uint32).astype(np.int64)
    nib = np.stack([((u >> (4 * i)) & 0xF) - 8 for i in range(8)], axis=-1)  # [N, K/8, 8]
    return nib.reshape(words.shape[0], -1).astype(np.int8)


@pytest.mark.parametrize("algo, opts", [
    ("W8A8_DYNAMIC", {}),
    ("W8A8_MIX", {"input_scale": np.array([0.02], np.float32), "input_offset": np.array([-3.0], np.float32)}),
    ("W4A8_DYNAMIC", {"group_size": 0}),
    ("W4A8_DYNAMIC", {"group_size": 8}),
    ("W4A16", {"group_size": 8}),
], ids=["w8a8", "w8a8_mix", "w4a8_channel", "w4a8_group8", "w4a16_g8"])
def test_experts_from_weight_quant(algo, opts):
    """Experts as reference.weight_quant (msModelSlim layouts) writes them, incl. scale_bias [H, 16]."""
    from ascend_quant.reference.weight_quant import quantize_linear

    rng = np.random.default_rng(31)
    inter = 16  # row-parallel scale_bias splits down_proj's K = I into 16 chunks
    experts, plains = [], []
    for _ in range(E):
        ex, pl = {}, {}
        for name, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter))):
            w = (rng.standard_normal(shape) * 0.2).astype(np.float32)
            kw = dict(opts)
            if algo == "W4A8_DYNAMIC":
                kw["row_parallel"] = name == "down_proj"
            ck = quantize_linear(algo, w, **kw)
            ex[name] = ck
            if algo == "W4A16":
                pl[name] = {"q": _unpack_offset8_along_k(ck["weight_packed"]), "s": ck["weight_scale"]}
            elif algo == "W4A8_DYNAMIC":
                pl[name] = {"q": _unpack_pairs_along_rows(ck["weight"]), "s1": ck["weight_scale"][:, 0],
                            "s2": ck.get("weight_scale_second")}
            else:
                pl[name] = {"q": ck["weight"], "s": ck["weight_scale"][:, 0]}
        experts.append(ex)
        plains.append(pl)
    if algo == "W4A8_DYNAMIC":
        assert experts[0]["down_proj"]["scale_bias"].shape == (H, 16)
    x, w, ids = _inputs(BF16, seed=32)
    y = moe_forward(algo, x, experts, w, ids, dtype=BF16, group_size=opts.get("group_size"))
    assert _bytes_equal(y, _reference_moe(algo, x, plains, w, ids, BF16))  # 0 ulp: as the main test


def test_w8a8_mix_is_w8a8_dynamic_for_both_pd_roles():
    experts, _ = _build_experts("W8A8_MIX")
    dyn = [{p: {k: v for k, v in proj.items() if k in ("weight", "weight_scale")} for p, proj in ex.items()}
           for ex in experts]
    x, w, ids = _inputs(BF16)
    base = moe_forward("W8A8_DYNAMIC", x, dyn, w, ids, dtype=BF16)
    for kv_consumer in (False, True):
        assert _bytes_equal(moe_forward("W8A8_MIX", x, experts, w, ids, dtype=BF16, kv_consumer=kv_consumer), base)


def test_w8a8_float32_model_and_bf16_scale_rounding():
    experts, plains = _build_experts("W8A8_DYNAMIC", seed=3)
    x32, w, ids = _inputs(F32)
    y = moe_forward("W8A8_DYNAMIC", x32, experts, w, ids, dtype=F32)
    assert _bytes_equal(y, _reference_moe("W8A8_DYNAMIC", x32, plains, w, ids, F32))  # 0 ulp: same ops
    # bf16 model: scales are rounded to bf16 at load, and that is visible in the output
    xb = x32.astype(BF16)
    yb = moe_forward("W8A8_DYNAMIC", xb, experts, w, ids, dtype=BF16)
    assert _bytes_equal(yb, _reference_moe("W8A8_DYNAMIC", xb, plains, w, ids, BF16))
    assert not _bytes_equal(yb, _reference_moe("W8A8_DYNAMIC", xb, plains, w, ids, BF16, raw=True))


def test_w4a8_intermediates_are_bf16_even_for_fp16_models():
    experts, plains = _build_experts("W4A8_DYNAMIC", seed=5)
    x, _, _ = _inputs(F16)
    o = expert_mlp("W4A8_DYNAMIC", x, experts[0], dtype=F16)
    assert o.dtype == BF16
    expect = np.array([_expert_row("W4A8_DYNAMIC", row, plains[0], F16) for row in x], np.float32).astype(BF16)
    assert _bytes_equal(o, expect)  # 0 ulp: same op sequence (see the main test)


def test_w4a8_per_group_scale_is_rounded_to_fp16():
    experts, plains = _build_experts("W4A8_DYNAMIC", seed=7, per_group=True)
    x, w, ids = _inputs(BF16)
    y = moe_forward("W4A8_DYNAMIC", x, experts, w, ids, dtype=BF16)
    assert _bytes_equal(y, _reference_moe("W4A8_DYNAMIC", x, plains, w, ids, BF16))
    # the float32 products s1 * s2 need more than fp16's 11 bits, and it shows in the output
    assert not _bytes_equal(y, _reference_moe("W4A8_DYNAMIC", x, plains, w, ids, BF16, raw=True))


def test_combine_zero_weights_zero_rows_and_duplicates():
    experts, plains = _build_experts("W8A8_DYNAMIC", seed=11)
    x, w, ids = _inputs(BF16, seed=12)
    x[2] = 0                       # zero row: dynamic quant gives q = 0, scale = 0
    w[3] = 0                       # token routed to no local expert (EP zeroes the weights)
    ids[4] = [1, 1]                # the same expert twice
    y = moe_forward("W8A8_DYNAMIC", x, experts, w, ids, dtype=BF16)
    assert _bytes_equal(y[2], np.zeros(H, BF16)) and _bytes_equal(y[3], np.zeros(H, BF16))  # +0.0, not -0.0
    assert _bytes_equal(y, _reference_moe("W8A8_DYNAMIC", x, plains, w, ids, BF16))


def test_empty_batch():
    experts, _ = _build_experts("W4A16")
    y = moe_forward("W4A16", np.zeros((0, H), BF16), experts, np.zeros((0, 2), np.float32),
                    np.zeros((0, 2), np.int32), dtype="bfloat16")
    assert y.shape == (0, H) and y.dtype == BF16


def test_nonfinite_token_stays_in_its_row():
    experts, _ = _build_experts("W8A8_DYNAMIC")
    x, w, ids = _inputs(BF16)
    x[1, 3] = np.inf
    y = moe_forward("W8A8_DYNAMIC", x, experts, w, ids, dtype=BF16).astype(np.float32)
    assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, axis=0)).all()


def test_moe_layer_forward_is_route_then_forward():
    experts, _ = _build_experts("W4A8_DYNAMIC")
    x, _, _ = _inputs(BF16)
    logits = np.random.default_rng(4).standard_normal((T, E)).astype(np.float32)
    w, ids = route(logits, 2, scoring_func="sigmoid", routed_scaling_factor=2.0)
    a = moe_layer_forward("W4A8_DYNAMIC", x, logits, experts, 2, dtype=BF16, scoring_func="sigmoid",
                          routed_scaling_factor=2.0)
    assert _bytes_equal(a, moe_forward("W4A8_DYNAMIC", x, experts, w, ids, dtype=BF16))


def test_swiglu_golden_and_no_overflow_warnings():
    h = np.array([[0.0, 2.0, -1000.0, 1000.0, 5.0, 3.0, 7.0, 0.5]], np.float32)  # gate | up
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = swiglu(h, F32)
    # silu(0)*5 = 0; silu(2)*3 = 6/(1+e^-2); silu(-1000) = -1000*e^-1000 -> -0.0 (underflow) * 7;
    # silu(1000) = 1000 exactly in float64 -> *0.5 = 500
    assert a.dtype == F32
    assert a[0, 0] == 0 and a[0, 1] == f32(6 / (1 + math.exp(-2))) and a[0, 2] == 0 and a[0, 3] == 500
    assert np.isnan(swiglu(np.array([[-np.inf, 1.0]], np.float32), F32)[0, 0])  # -inf * 0, as torch


# ----------------------------------------------------------------------------------
# Validation errors
# ----------------------------------------------------------------------------------

def _call(algo="W8A8_DYNAMIC", mutate=None, x=None, w=None, ids=None, **kw):
    experts, _ = _build_experts(algo, **{k: v for k, v in kw.items() if k in ("per_group", "unpacked")})
    if mutate:
        mutate(experts)
    x0, w0, ids0 = _inputs(BF16)
    extra = {k: v for k, v in kw.items() if k not in ("per_group", "unpacked")}
    return moe_forward(algo, x0 if x is None else x, experts, w0 if w is None else w,
                       ids0 if ids is None else ids, dtype=BF16, **extra)


def _set(e, proj, key, value):
    def f(experts):
        if value is None:
            del experts[e][proj][key]
        else:
            experts[e][proj][key] = value(experts[e][proj][key]) if callable(value) else value
    return f


@pytest.mark.parametrize("algo, mutate, match", [
    ("W8A8_DYNAMIC", _set(2, "down_proj", "weight_scale", np.ones((H, 2), np.float32)),
     r"experts\.2\.down_proj\.weight_scale: expected shape \(N, 1\) = \(16, 1\), got \(16, 2\)"),
    ("W8A8_DYNAMIC", _set(1, "up_proj", "weight", None), r"experts\.1\.up_proj: missing tensor 'weight'"),
    ("W8A8_DYNAMIC", _set(3, "gate_proj", "weight", np.zeros((6, H), np.int8)),
     r"experts\.3\.gate_proj\.weight: expected shape \(N, K\) = \(8, 16\), got \(6, 16\)"),
    ("W8A8_DYNAMIC", _set(0, "gate_proj", "weight", lambda a: a.astype(np.int16)),
     r"experts\.0\.gate_proj\.weight: expected dtype int8"),
    ("W8A8_DYNAMIC", _set(3, "down_proj", "weight_scale", lambda a: a * 0),
     r"experts\.3\.down_proj\.weight_scale: scales must be finite and > 0"),
    ("W8A8_DYNAMIC", _set(3, "down_proj", "weight_scale", lambda a: a * 1e-39),   # fp32 subnormal > 0
     r"experts\.3\.down_proj\.weight_scale: scales must be finite and > 0 after rounding"),
    ("W8A8_DYNAMIC", _set(1, "gate_proj", "weight_offset", lambda a: a + 1),
     r"experts\.1\.gate_proj\.weight_offset: .* must be all zeros"),
    ("W4A8_DYNAMIC", _set(2, "down_proj", "weight", np.zeros((3, I), np.int8)),
     r"experts\.2\.down_proj\.weight: expected shape \(N/2, K\) = \(8, 8\) packed, or \(N, K\) = \(16, 8\)"),
    ("W4A8_DYNAMIC", _set(0, "up_proj", "weight", np.full((I, H), 9, np.int8)),
     r"experts\.0\.up_proj\.weight: unpacked int4 values must lie in \[-8, 7\]"),
    ("W4A16", _set(1, "gate_proj", "weight_scale", np.ones((I, 3), np.float32)),
     r"experts\.1\.gate_proj\.weight_scale: expected shape \(N, K/g\)"),
    ("W4A16", _set(1, "down_proj", "weight_shape", np.array([H, 16], np.int32)),
     r"experts\.1\.down_proj\.weight_shape: expected \[N, K\] = \[16, 8\]"),
    ("W4A16", _set(0, "gate_proj", "weight_packed", lambda a: a.view(np.uint32)),
     r"experts\.0\.gate_proj\.weight_packed: expected dtype int32"),
])
def test_expert_tensor_errors_name_expert_and_projection(algo, mutate, match):
    # also: the broken expert need not be routed to (all experts are validated)
    with pytest.raises(ValueError, match=match):
        _call(algo, mutate, ids=np.zeros((T, 2), np.int32) + np.array([0, 1], np.int32))


def test_w4a8_group_size_consistency_errors():
    with pytest.raises(ValueError, match=r"group_size=0 \(per-channel\) but 'weight_scale_second' is present"):
        _call("W4A8_DYNAMIC", per_group=True, group_size=0)
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight_scale_second: expected shape"):
        _call("W4A8_DYNAMIC", per_group=True, group_size=4)
    with pytest.raises(ValueError, match="needs per-group scales 'weight_scale_second'"):
        _call("W4A8_DYNAMIC", group_size=8)
    big = _set(0, "down_proj", "weight_scale_second", lambda a: a * 1e8)  # s1*s2 overflows fp16
    with pytest.raises(ValueError, match=r"weight_scale \* weight_scale_second: .* after rounding to float16"):
        _call("W4A8_DYNAMIC", big, per_group=True)
    # explicit, matching group sizes are accepted and change nothing
    assert _bytes_equal(_call("W4A8_DYNAMIC", per_group=True, group_size=8), _call("W4A8_DYNAMIC", per_group=True))
    assert _bytes_equal(_call("W4A16", group_size=8), _call("W4A16"))
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \(N, K/g\) = \(8, 16/4\)"):
        _call("W4A16", group_size=4)


def test_routing_and_input_errors():
    x, w, ids = _inputs(BF16)
    with pytest.raises(ValueError, match=r"topk_ids: expert id 4 at \(2, 1\) is outside \[0, E\) = \[0, 4\)"):
        bad = ids.copy()
        bad[2, 1] = 4
        _call(ids=bad)
    with pytest.raises(ValueError, match="topk_ids: expert id -1"):
        _call(ids=-np.ones((T, 2), np.int32))
    with pytest.raises(ValueError, match="topk_ids: expected shape"):
        _call(ids=ids[:, :1])
    with pytest.raises(ValueError, match="topk_ids: expected an integer array"):
        _call(ids=ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"k = 5 must be in \[1, E\]"):
        _call(w=np.ones((T, 5), np.float32), ids=np.zeros((T, 5), np.int32))
    with pytest.raises(ValueError, match=r"x: expected the model dtype bfloat16, got float16"):
        _call(x=x.astype(np.float16))
    with pytest.raises(ValueError, match=r"x: width 12 does not match the experts' hidden size H = 16"):
        _call(x=x[:, :12])
    with pytest.raises(ValueError, match="unsupported algorithm ID 'W8A16' for moe"):
        _call("W8A16")
    experts, _ = _build_experts("W8A8_DYNAMIC")
    with pytest.raises(ValueError, match="expert_tensors: expected a list"):
        moe_forward("W8A8_DYNAMIC", x, experts[0], w, ids, dtype=BF16)
    del experts[2]["down_proj"]
    with pytest.raises(ValueError, match=r"experts\.2: missing projection\(s\) down_proj"):
        moe_forward("W8A8_DYNAMIC", x, experts, w, ids, dtype=BF16)
    with pytest.raises(ValueError, match="router_logits: expected E = 4 columns"):
        moe_layer_forward("W8A8_DYNAMIC", x, np.zeros((T, 3), np.float32), _build_experts("W8A8_DYNAMIC")[0], 2,
                          dtype=BF16)
