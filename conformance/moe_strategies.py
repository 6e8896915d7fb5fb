"""Hypothesis strategies for the MoE conformance properties (routing and experts).

Experts are built two ways (drawn):

``quantized``  float weights quantized by the reference's msModelSlim quantizers
               (``reference.weight_quant``): int4 codes in [-7, 7], int8 in [-127, 127];
``codes``      random codes over the **full** range (int8 -128..127, int4 -8..7) with random
               positive scales stored as float32, float16 or bfloat16, packed with the
               reference's packers.

Shapes stay small (E in {1, 2, 4, 8}, T in {0, 1, 3, 17}, H and I below ~48) and ragged
where the format allows: any H, I for W8A8; W4A8 per-channel any K (odd N forces the
unpacked one-int4-per-byte layout), per-group K = g * n; W4A16 K a multiple of 8 and of
the group size. Activations carry the edge rows of ``strategies.activations`` (zero,
-0.0, constant, spike, exact .5 ties, saturating, subnormal, tiny max, non-finite).
Routing: ids with duplicates, distinct ids, or every token on one expert; weights
including 0 (a token whose weights are all zero), given in float32 or the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from ascend_quant.reference import packing as rp
from ascend_quant.reference import weight_quant as wq
from ascend_quant.reference.rounding import FLOAT16, round_through

from . import strategies as hh

__all__ = ["MOE_ALGOS", "MoECase", "moe_case", "routing_case", "build_experts", "effective_weights",
           "MOE_T", "MOE_E"]

MOE_ALGOS = ("W8A8_DYNAMIC", "W8A8_MIX", "W4A8_DYNAMIC", "W4A16")
MOE_T = (0, 1, 3, 17)
MOE_E = (1, 2, 4, 8)
_SCALE_DTYPES = (np.dtype(np.float32), FLOAT16, hh.np_dtype("bfloat16"))


@dataclass
class MoECase:
    """One drawn MoE example: checkpoint dicts plus the routed batch."""

    algo: str
    dtype: str
    experts: list                    # E dicts {"gate_proj", "up_proj", "down_proj"} -> numpy tensors
    x: np.ndarray                    # [T, H] model dtype
    topk_weights: np.ndarray         # [T, k]
    topk_ids: np.ndarray             # [T, k] int32
    group_size: int | None = None
    layout: dict = field(default_factory=dict)   # how the experts were built (for repro notes)

    @property
    def hidden(self) -> int:
        return self.x.shape[1]


# --------------------------------------------------------------------------------------
# experts
# --------------------------------------------------------------------------------------

def _scale(rng: np.random.Generator, shape, lo: float, hi: float, dtype: np.dtype) -> np.ndarray:
    """Positive scales ``2^u`` (u uniform in [lo, hi]) stored in ``dtype`` (finite, > 0 there)."""
    return np.exp2(rng.uniform(lo, hi, size=shape)).astype(np.float32).astype(dtype)


def _projection(algo: str, n: int, k: int, rng: np.random.Generator, *, mode: str, group: int,
                packed: bool, scale_dtype: np.dtype) -> dict:
    if algo in ("W8A8_DYNAMIC", "W8A8_MIX"):
        if mode == "quantized":
            t = wq.quantize_w8a8_dynamic((rng.standard_normal((n, k)) * 2.0 ** rng.integers(-6, 1)).astype(np.float32))
        else:
            t = {"weight": rng.integers(-128, 128, (n, k)).astype(np.int8),
                 "weight_scale": _scale(rng, (n, 1), -12, -4, scale_dtype),
                 "weight_offset": np.zeros((n, 1), np.float32)}
        if algo == "W8A8_MIX":  # static-path tensors: loaded, never used by the MoE
            t.update(input_scale=np.array([0.05], np.float32), input_offset=np.array([3.0], np.float32),
                     deq_scale=np.full(n, 12345, np.int64), quant_bias=rng.integers(-9, 9, n).astype(np.int32))
        return t
    if algo == "W4A8_DYNAMIC":
        if mode == "quantized":
            w = (rng.standard_normal((n, k)) * 2.0 ** rng.integers(-6, 1)).astype(np.float32)
            t = wq.quantize_w4a8_dynamic(w, group_size=group) if n % 2 == 0 else None
            if t is not None:
                if not packed:  # older export: one int4 per byte
                    t["weight"] = rp.unpack_int8_to_int4(t["weight"], axis=0)
                return t
        q = rng.integers(-8, 8, (n, k)).astype(np.int8)
        t = {"weight_scale": _scale(rng, (n, 1), -10, -3, np.dtype(np.float32)),
             "weight_offset": np.zeros((n, 1), np.float32)}
        if group:
            t["weight_scale_second"] = _scale(rng, (n, k // group), -4, 1, np.dtype(np.float32))
            t["weight_offset_second"] = np.zeros((n, k // group), np.float32)
        t["weight"] = rp.pack_int4_to_int8(q, axis=0) if packed and n % 2 == 0 else q
        return t
    # W4A16 (LLM-Compressor pack-quantized)
    g = group or k
    if mode == "quantized":
        t = wq.quantize_w4a16((rng.standard_normal((n, k)) * 2.0 ** rng.integers(-6, 1)).astype(np.float32),
                              group_size=g)
        t["weight_scale"] = t["weight_scale"].astype(scale_dtype)
        return t
    q = rng.integers(-8, 8, (n, k)).astype(np.int8)
    return {"weight_packed": rp.pack_int4_offset8_to_int32(q, axis=1),
            "weight_scale": _scale(rng, (n, k // g), -8, -2, scale_dtype),
            "weight_shape": np.array([n, k], np.int32)}


def build_experts(algo: str, num_experts: int, hidden: int, inter: int, seed: int, *, mode: str = "codes",
                  group: int = 0, packed: bool = True, scale_dtype=np.float32) -> list[dict]:
    """``num_experts`` checkpoint dicts (gate/up ``[I, H]``, down ``[H, I]``) built from ``seed``.

    ``group``: W4A8 per-group / W4A16 group size (0 = per-channel; must divide the K of each
    projection), ``packed``: W4A8 two int4 per byte along N (where N is even).
    """
    rng = np.random.default_rng(seed)
    kw = dict(mode=mode, packed=packed, scale_dtype=np.dtype(scale_dtype))
    return [{"gate_proj": _projection(algo, inter, hidden, rng, group=group, **kw),
             "up_proj": _projection(algo, inter, hidden, rng, group=group, **kw),
             "down_proj": _projection(algo, hidden, inter, rng, group=group, **kw)}
            for _ in range(num_experts)]


def effective_weights(algo: str, expert: dict, dtype: str) -> dict:
    """Codes and dequantization scales of one expert as the reference documents them (for the
    integer-stage oracle and the bounds): ``q13 [2I, H]``, ``q2 [H, I]`` (int8 / int4 values),
    ``S13 [2I, H]``, ``S2 [H, I]`` float64 per-element scales (W8A8 ``round_through(s, dt)``;
    W4A8 float32 per-channel or ``fp16(s1 * s2)`` per group; W4A16 ``round_through(s, dt)``)
    and the group sizes ``g13``, ``g2`` (K when per-channel)."""
    out = {}
    for key, names in (("13", ("gate_proj", "up_proj")), ("2", ("down_proj",))):
        qs, ss = [], []
        for name in names:
            t = expert[name]
            if algo == "W4A16":
                w = t["weight_packed"]
                q = rp.unpack_int32_offset8_to_int4(w, axis=1)
                s = round_through(t["weight_scale"].astype(np.float32), dtype).astype(np.float64)
            else:
                w = t["weight"]
                n = t["weight_scale"].shape[0]
                q = rp.unpack_int8_to_int4(w, axis=0) if (algo == "W4A8_DYNAMIC" and w.shape[0] != n) else w
                s1 = t["weight_scale"].astype(np.float32).reshape(n, 1)
                second = t.get("weight_scale_second") if algo == "W4A8_DYNAMIC" else None
                if algo != "W4A8_DYNAMIC":
                    s = round_through(s1, dtype).astype(np.float64)
                elif second is None:
                    s = s1.astype(np.float64)
                else:  # process_scale: f32(s1 * s2) rounded to fp16 (reference.moe docstring)
                    s = (s1 * second.astype(np.float32)).astype(np.float32).astype(np.float16).astype(np.float64)
            g = q.shape[1] // s.shape[1]
            qs.append(q)
            ss.append(np.repeat(s, g, axis=1))
        out["q" + key] = np.concatenate(qs, axis=0)
        out["S" + key] = np.concatenate(ss, axis=0)
        out["g" + key] = q.shape[1] // (s.shape[1])
    return out


# --------------------------------------------------------------------------------------
# whole cases
# --------------------------------------------------------------------------------------

@st.composite
def _shape(draw, algo: str):
    """``(H, I, group, packed, mode)`` per the format's constraints (ragged where allowed)."""
    mode = draw(st.sampled_from(("codes", "quantized")), label="weights")
    if algo in ("W8A8_DYNAMIC", "W8A8_MIX"):
        return draw(st.integers(1, 48), label="H"), draw(st.integers(1, 32), label="I"), 0, True, mode
    if algo == "W4A8_DYNAMIC":
        group = draw(st.sampled_from((0, 0, 8, 16, 32)), label="group_size")
        packed = draw(st.booleans(), label="packed")
        if group:
            h = group * draw(st.integers(1, 3), label="H/g")
            i = group * draw(st.integers(1, 2), label="I/g")
        else:
            h, i = draw(st.integers(1, 48), label="H"), draw(st.integers(1, 32), label="I")
        if mode == "quantized" and (h % 2 or i % 2):  # the msModelSlim quantizer packs: N even
            mode = "codes"
        return h, i, group, packed, mode
    group = draw(st.sampled_from((0, 8, 16, 32)), label="group_size")
    unit = max(group, 8)
    h = unit * draw(st.integers(1, max(1, 48 // unit)), label="H/unit")
    i = unit * draw(st.integers(1, max(1, 32 // unit)), label="I/unit")
    return h, i, group, True, mode


@st.composite
def routing_arrays(draw, num_tokens: int, num_experts: int, top_k: int, dtype: str):
    """``(topk_weights [T, k], topk_ids int32 [T, k])``: duplicates, distinct or one expert."""
    rng = np.random.default_rng(draw(hh.seeds, label="route_seed"))
    kind = draw(st.sampled_from(("duplicates", "distinct", "one_expert")), label="ids_kind")
    if kind == "duplicates":
        ids = rng.integers(0, num_experts, (num_tokens, top_k))
    elif kind == "distinct":
        ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)]) if num_tokens \
            else np.zeros((0, top_k), np.int64)
    else:
        ids = np.full((num_tokens, top_k), rng.integers(num_experts))
    wkind = draw(st.sampled_from(("uniform", "special", "zero_token")), label="weights_kind")
    w = rng.uniform(0.0, 1.0, (num_tokens, top_k))
    if wkind == "special":
        w = rng.choice([0.0, 0.25, 0.3, 1.0, 1.7, 1.0 / 3], size=(num_tokens, top_k))
    elif wkind == "zero_token" and num_tokens:
        w[rng.integers(num_tokens)] = 0.0
    wdt = draw(st.sampled_from(("float32", dtype)), label="weights_dtype")
    return w.astype(np.float32).astype(hh.np_dtype(wdt)), ids.astype(np.int32)


@st.composite
def moe_case(draw, algo: str | None = None, *, max_t: int = 17) -> MoECase:
    """A whole MoE example for ``algo`` (drawn when None)."""
    algo = algo or draw(st.sampled_from(MOE_ALGOS), label="algo")
    dtype = draw(hh.dtypes, label="dtype")
    num_experts = draw(st.sampled_from(MOE_E), label="E")
    top_k = draw(st.integers(1, min(2, num_experts)), label="top_k")
    hidden, inter, group, packed, mode = draw(_shape(algo), label="shape")
    scale_dtype = draw(st.sampled_from(_SCALE_DTYPES), label="scale_dtype")
    seed = draw(hh.seeds, label="experts_seed")
    experts = build_experts(algo, num_experts, hidden, inter, seed, mode=mode, group=group, packed=packed,
                            scale_dtype=scale_dtype)
    num_tokens = draw(st.sampled_from([t for t in MOE_T if t <= max_t]), label="T")
    # W4A16 runs float GEMMs: a saturating row (~1e30) can overflow float32 partial sums where the
    # reference's float64 sum stays finite; that row kind is for the exact (integer) paths
    kinds = tuple(k for k in hh.ROW_KINDS if not (algo == "W4A16" and k == "saturate"))
    x = draw(hh.activations(num_tokens, hidden, dtype, allow_nonfinite=True, kinds=kinds), label="x")
    w, ids = draw(routing_arrays(num_tokens, num_experts, top_k, dtype), label="routing")
    gs_opt = draw(st.sampled_from((None, group)), label="group_size_arg") if group else None
    layout = dict(mode=mode, group=group, packed=packed, scale_dtype=np.dtype(scale_dtype).name, seed=seed,
                  E=num_experts, H=hidden, I=inter)
    return MoECase(algo, dtype, experts, x, w, ids, gs_opt, layout)


@st.composite
def routing_case(draw):
    """``(logits [T, E], top_k, kwargs)`` for ``route``: softmax/sigmoid, grouped with a
    correction bias, renormalize on/off, scaling factor, exact ties in the logits."""
    num_experts = draw(st.sampled_from((1, 2, 4, 6, 8, 16, 32)), label="E")
    num_tokens = draw(st.sampled_from((0, 1, 3, 17, 64)), label="T")
    dtype = draw(hh.dtypes, label="logits_dtype")
    rng = np.random.default_rng(draw(hh.seeds, label="logits_seed"))
    spread = draw(st.sampled_from((0.01, 1.0, 8.0, 40.0)), label="spread")
    logits = rng.standard_normal((num_tokens, num_experts)) * spread
    ties = draw(st.sampled_from(("none", "pairs", "all_equal", "coarse")), label="ties")
    if ties == "pairs" and num_experts > 1:
        logits[:, 1::2] = logits[:, 0::2][:, : logits[:, 1::2].shape[1]]
    elif ties == "all_equal":
        logits[:] = logits[:, :1]
    elif ties == "coarse":
        logits = np.round(logits * 2) / 2
    kw: dict = {"scoring_func": draw(st.sampled_from(("softmax", "sigmoid")), label="scoring_func"),
                "renormalize": draw(st.booleans(), label="renormalize"),
                "routed_scaling_factor": draw(st.sampled_from((1.0, 2.5, 0.7)), label="routed_scaling_factor")}
    groups = [g for g in (2, 4, 8) if num_experts % g == 0 and num_experts // g >= 2]
    if groups and draw(st.booleans(), label="grouped"):
        g = draw(st.sampled_from(groups), label="num_expert_group")
        kept = draw(st.integers(1, g), label="topk_group")
        kw.update(use_grouped_topk=True, num_expert_group=g, topk_group=kept)
        top_k = draw(st.integers(1, min(4, kept * (num_experts // g))), label="top_k")
    else:
        top_k = draw(st.integers(1, min(4, num_experts)), label="top_k")
    if draw(st.booleans(), label="with_bias"):
        bias = rng.standard_normal(num_experts) * draw(st.sampled_from((0.01, 0.3)), label="bias_scale")
        if draw(st.booleans(), label="bias_ties"):
            bias = np.round(bias * 4) / 4
        kw["e_score_correction_bias"] = bias.astype(np.float32)
    return logits.astype(np.float32).astype(hh.np_dtype(dtype)), top_k, kw
