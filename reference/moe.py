"""Mixture-of-experts layers: routing, the per-expert quantized SwiGLU MLP and the combine.

``route`` is the fused ``moe_gating_top_k`` op (facts doc §6.1); ``moe_forward`` runs, for
each expert, ``down(SwiGLU(gate_up(x)))`` with the quantized math of one MoE algorithm ID
(W8A8_DYNAMIC §5.5, W8A8_MIX §5.4, W4A8_DYNAMIC §5.7, W4A16 §5.8, flow §6.2-§6.3) and the
weighted sum per token. Experts arrive in msModelSlim checkpoint form: a list with one dict
per expert, ``{"gate_proj": {...}, "up_proj": {...}, "down_proj": {...}}``, each holding the
tensors of ``mlp.experts.{e}.{gate,up,down}_proj.*`` (weights ``[out, in]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .activation_quant import quantize_dynamic_per_token
from .algorithms import W4A8_DYNAMIC, W4A16, W8A8_DYNAMIC, W8A8_MIX, check_algorithm
from .integer_gemm import int_matmul
from .packing import unpack_int8_to_int4, unpack_int32_offset8_to_int4
from .rounding import BFLOAT16, FLOAT16, FLOAT32, INT4_MAX, INT4_MIN, model_dtype, round_through, round_to_dtype

__all__ = ["route", "moe_forward", "moe_layer_forward", "expert_mlp", "swiglu"]

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_ROUTER_DTYPES = (FLOAT32, FLOAT16, BFLOAT16)
_RENORM_EPS = 1e-20  # the `eps` vLLM Ascend passes to moe_gating_top_k


# --------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------


def _sigmoid_f64(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` in float64 without overflow: ``exp(-|z|)`` is always <= 1."""
    ez = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def route(
    router_logits: np.ndarray,
    top_k: int,
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    use_grouped_topk: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias: np.ndarray | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Select ``top_k`` experts per token: vLLM Ascend's fused ``moe_gating_top_k`` (§6.1).

    Args:
        router_logits: ``[T, E]`` float32, float16 or bfloat16 (the router's output dtype).
        top_k: experts per token, ``1 <= top_k <= E`` (grouped: ``<= topk_group * E/G``).
        renormalize: divide the selected weights by their sum (+1e-20).
        scoring_func: ``"softmax"`` or ``"sigmoid"``.
        use_grouped_topk: DeepSeek-style group-limited routing with ``num_expert_group``
            groups ``G`` (``E % G == 0``, ``E/G >= 2``) of which ``topk_group`` are kept.
        e_score_correction_bias: ``[E]``; used for **selection only** (weights are unbiased).
        routed_scaling_factor: finite, > 0; multiplies the final weights once.

    Returns:
        ``(topk_weights float32 [T, k], topk_ids int32 [T, k])``, each row ordered by
        decreasing (biased) score.

    Numerics (op sequence):

    1. ``z = float64(router_logits)`` (exact). softmax: ``p = exp(z - max z) / sum exp(..)``;
       sigmoid: ``p = 1 / (1 + exp(-z))`` (overflow-free form); both in float64, then
       rounded **once** to float32. The kernel computes in float32 (``exp(z - max)``,
       ``ReduceSum``, multiply by ``f32(1/sum)``); ours is within a few float32 ulps and
       independent of summation order.
    2. ``bias`` is first rounded to the logits dtype (vLLM Ascend casts
       ``e_score_correction_bias.to(router_logits.dtype)``), then ``p_b = f32(p + bias)``
       (one float32 add, as the kernel's ``Add``). Without bias ``p_b = p``.
    3. Grouped: experts ``[g*E/G, (g+1)*E/G)`` form group ``g``; its score is
       ``f32(top1 + top2)`` of its biased scores (``group_select_mode=1``, the kernel's
       pair sum); the ``topk_group`` best groups are kept, the others' experts masked.
    4. The ``top_k`` largest ``p_b`` among the unmasked experts are selected. **Ties go to
       the lower index** (groups and experts alike): a stable descending sort. The
       kernel's ``Sort`` tie order is not documented; we fix this one.
    5. ``w = p`` (unbiased) of the selected experts. With ``renormalize``:
       ``w = f32(f64(w) / (sum_j f64(w_j) + 1e-20) * routed_scaling_factor)``, else
       ``w = f32(f64(w) * routed_scaling_factor)``: float64, rounded once (the kernel does
       float32 ``ReduceSum``, ``+eps``, ``Div``, ``Muls``; ours is within a few ulps).

    Departures from vLLM Ascend, each deliberate:

    * ``routed_scaling_factor`` is applied exactly once. vLLM Ascend's native fallback
      (``_native_select_experts``) applies it, and ``select_experts`` applies it again
      when it is not 1.0 (quirk §9.10); the fused op applies it once, as we do.
    * The native fallback (taken for sigmoid with ``renormalize=False``) ranks groups by
      their **max** score and, ungrouped, uses the biased score as weight; we always
      follow the fused op's semantics above. The fused kernel itself renormalizes sigmoid
      scores even when ``renorm=0``; we honour ``renormalize`` as given.
    * vLLM Ascend's fused path passes ``num_expert_group``/``topk_group`` to the kernel even
      when ``use_grouped_topk`` is False; to keep that unambiguous we reject such calls
      (grouping with 1 group of which 1 is kept is accepted: it is the ungrouped case).
    * The kernel returns the weights in the logits dtype (``CAST_RINT``); we return
      float32 and :func:`moe_forward` rounds them to the model dtype, as vLLM Ascend does
      before dispatch (identical when the logits are float32 or in the model dtype).
    * Non-finite logits or bias raise ``ValueError`` (the kernel's result is undefined).

    Example: logits ``[[0, ln 3]]``, top_k 1, softmax -> p = [0.25, 0.75];
    renormalized -> ``([[1.0]], [[1]])``; without renormalization ``([[0.75]], [[1]])``.
    """
    logits = np.asarray(router_logits)
    if logits.ndim != 2:
        raise ValueError(f"router_logits: expected a 2-D array [T, E], got shape {logits.shape}")
    if logits.dtype not in _ROUTER_DTYPES:
        raise ValueError(f"router_logits: dtype must be float32, float16 or bfloat16, got {logits.dtype}")
    num_tokens, num_experts = logits.shape
    if num_experts < 1:
        raise ValueError("router_logits: needs at least one expert (E >= 1)")
    top_k = _check_int(top_k, "top_k", 1, num_experts)
    if scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
    rsf = float(routed_scaling_factor)
    if not (np.isfinite(rsf) and rsf > 0):
        raise ValueError(f"routed_scaling_factor must be finite and > 0, got {routed_scaling_factor!r}")

    if use_grouped_topk:
        if num_expert_group is None or topk_group is None:
            raise ValueError("use_grouped_topk=True needs num_expert_group and topk_group")
        groups = _check_int(num_expert_group, "num_expert_group", 1)
        if num_experts % groups:
            raise ValueError(f"num_expert_group={groups} does not divide the number of experts E={num_experts}")
        per_group = num_experts // groups
        if groups > 1 and per_group < 2:
            raise ValueError(
                f"num_expert_group={groups}: each group needs >= 2 experts (groups are ranked by "
                f"the sum of their top-2 scores), got {per_group}"
            )
        kept = _check_int(topk_group, "topk_group", 1, groups)
        if top_k > kept * per_group:
            raise ValueError(
                f"top_k={top_k} exceeds the experts in the kept groups: topk_group * E/G = {kept * per_group}"
            )
    else:
        extra = {k: v for k, v in (("num_expert_group", num_expert_group), ("topk_group", topk_group))
                 if v is not None and v != 1}
        if extra:
            raise ValueError(
                f"{', '.join(f'{k}={v}' for k, v in extra.items())} given with use_grouped_topk=False; "
                "vLLM Ascend's fused op would group anyway: pass use_grouped_topk=True or None"
            )
        groups, kept, per_group = 1, 1, num_experts

    bias32 = None
    if e_score_correction_bias is not None:
        b = np.asarray(e_score_correction_bias)
        if b.shape != (num_experts,):
            raise ValueError(
                f"e_score_correction_bias: expected shape (E,) = ({num_experts},), got {b.shape}"
            )
        if not np.issubdtype(b.dtype, np.floating) and b.dtype != BFLOAT16:
            raise ValueError(f"e_score_correction_bias: expected a float array, got dtype {b.dtype}")
        if not np.all(np.isfinite(b.astype(np.float64))):
            raise ValueError("e_score_correction_bias: contains NaN or inf")
        bias32 = round_to_dtype(b, logits.dtype).astype(np.float32)

    if num_tokens == 0:
        return np.zeros((0, top_k), np.float32), np.zeros((0, top_k), np.int32)

    z = logits.astype(np.float64)
    if not np.all(np.isfinite(z)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(z))[0])
        raise ValueError(f"router_logits: non-finite value at index {bad}")

    if scoring_func == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p64 = e / e.sum(axis=1, keepdims=True)
    else:
        p64 = _sigmoid_f64(z)
    p = p64.astype(np.float32)  # the one rounding of the scores
    pb = p if bias32 is None else (p + bias32[None, :]).astype(np.float32)

    score = pb
    if groups > 1:
        grouped = pb.reshape(num_tokens, groups, per_group)
        top2 = -np.sort(-grouped, axis=2)[:, :, :2]
        group_score = (top2[:, :, 0] + top2[:, :, 1]).astype(np.float32)
        group_order = np.argsort(-group_score, axis=1, kind="stable")
        keep = np.zeros((num_tokens, groups), dtype=bool)
        np.put_along_axis(keep, group_order[:, :kept], True, axis=1)
        expert_keep = np.repeat(keep, per_group, axis=1)
        score = np.where(expert_keep, pb, np.float32(-np.inf)).astype(np.float32)

    order = np.argsort(-score, axis=1, kind="stable")  # ties: lower index first
    ids = order[:, :top_k]
    w = np.take_along_axis(p, ids, axis=1).astype(np.float64)
    if renormalize:
        total = np.zeros((num_tokens, 1), np.float64)
        for j in range(top_k):  # fixed order: increasing j
            total = total + w[:, j : j + 1]
        w = w / (total + _RENORM_EPS) * rsf
    else:
        w = w * rsf
    return w.astype(np.float32), ids.astype(np.int32)


# --------------------------------------------------------------------------------------
# Expert tensors: validation and load-time preparation
# --------------------------------------------------------------------------------------


def _shape_error(name: str, expected, got) -> ValueError:
    return ValueError(f"{name}: expected shape {expected}, got {tuple(got)}")


def _get(proj: Mapping, key: str, name: str, algo: str, needed: str) -> np.ndarray:
    if key not in proj:
        raise ValueError(f"{name}: missing tensor '{key}' ({algo} needs {needed})")
    return np.asarray(proj[key])


def _check_float(a: np.ndarray, name: str) -> None:
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == BFLOAT16):
        raise ValueError(f"{name}: expected a float tensor, got dtype {a.dtype}")


def _check_scale(s: np.ndarray, name: str, after: str = "") -> None:
    """Scales must be finite and > 0 (``after``: the load-time rounding that was applied)."""
    bad = ~(np.isfinite(s) & (s > 0))
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        what = f" after {after}" if after else ""
        raise ValueError(f"{name}: scales must be finite and > 0{what}, found {float(s[i])!r} at index {i}")


def _check_zero(proj: Mapping, key: str, name: str, algo: str) -> None:
    """Offsets of symmetric checkpoints: unused by the math, so they must be zero."""
    if key in proj:
        a = np.asarray(proj[key])
        if a.size and np.any(a.astype(np.float64) != 0):
            raise ValueError(
                f"{name}.{key}: {algo} weights are symmetric, so {key} must be all zeros "
                "(vLLM Ascend never reads it)"
            )


def _per_channel_scale(proj: Mapping, name: str, algo: str, needed: str, n: int) -> np.ndarray:
    """``weight_scale`` ``[N, 1]`` (or ``[N]``) as float32 ``[N]`` (exact for f32/f16/bf16)."""
    s = _get(proj, "weight_scale", name, algo, needed)
    if s.shape not in ((n, 1), (n,)):
        raise _shape_error(f"{name}.weight_scale", f"(N, 1) = ({n}, 1)", s.shape)
    _check_float(s, f"{name}.weight_scale")
    s = s.reshape(n).astype(np.float32)
    _check_scale(s, f"{name}.weight_scale")
    return s


@dataclass(frozen=True)
class _W8Proj:
    q: np.ndarray      # int8 [N, K]
    scale: np.ndarray  # float32 [N], rounded to the model dtype (load time)


@dataclass(frozen=True)
class _W4A8Proj:
    q: np.ndarray      # int8 [N, K], values in [-8, 7]
    scale: np.ndarray  # float32 [G, N]: per-channel (G = 1) or fp16-rounded s1*s2


@dataclass(frozen=True)
class _W4A16Proj:
    q: np.ndarray      # int8 [N, K], values in [-8, 7]
    scale: np.ndarray  # float32 [N, G], rounded to the model dtype (load time)


def _parse_w8(proj: Mapping, name: str, algo: str, n: int, k: int, dt, materialize: bool) -> _W8Proj | None:
    needed = "weight int8 [N, K] and weight_scale [N, 1]"
    w = _get(proj, "weight", name, algo, needed)
    if w.dtype != np.int8:
        raise ValueError(f"{name}.weight: expected dtype int8, got {w.dtype}")
    if w.shape != (n, k):
        raise _shape_error(f"{name}.weight", f"(N, K) = ({n}, {k})", w.shape)
    s = round_through(_per_channel_scale(proj, name, algo, needed, n), dt)  # declared in dt (§5.5)
    _check_scale(s, f"{name}.weight_scale", f"rounding to the model dtype {dt}")
    _check_zero(proj, "weight_offset", name, algo)
    return _W8Proj(w, s) if materialize else None


def _parse_w4a8(
    proj: Mapping, name: str, algo: str, n: int, k: int, group_size: int | None, dt, materialize: bool
) -> _W4A8Proj | None:
    needed = "weight int8 [N/2, K] (or [N, K] unpacked), weight_scale [N, 1], optional weight_scale_second [N, K/g]"
    w = _get(proj, "weight", name, algo, needed)
    if w.dtype != np.int8:
        raise ValueError(f"{name}.weight: expected dtype int8, got {w.dtype}")
    packed = n % 2 == 0 and w.shape == (n // 2, k)
    if not packed and w.shape != (n, k):
        raise _shape_error(
            f"{name}.weight", f"(N/2, K) = ({n // 2}, {k}) packed, or (N, K) = ({n}, {k}) unpacked", w.shape
        )
    if not packed and w.size and (w.min() < INT4_MIN or w.max() > INT4_MAX):
        raise ValueError(
            f"{name}.weight: unpacked int4 values must lie in [{INT4_MIN}, {INT4_MAX}], "
            f"found range [{w.min()}, {w.max()}]"
        )
    s1 = _per_channel_scale(proj, name, algo, needed, n)  # float32 params: not rounded to dt
    _check_zero(proj, "weight_offset", name, algo)
    _check_zero(proj, "weight_offset_second", name, algo)
    second = proj.get("weight_scale_second")
    if second is None:
        if group_size not in (None, 0):
            raise ValueError(
                f"{name}: group_size={group_size} needs per-group scales 'weight_scale_second' [N, K/g], "
                "which are missing (per-channel checkpoints have group_size 0)"
            )
        if not materialize:
            return None
        q = unpack_int8_to_int4(w, axis=0) if packed else w
        return _W4A8Proj(q, s1[None, :])
    s2 = np.asarray(second)
    _check_float(s2, f"{name}.weight_scale_second")
    if group_size == 0:
        raise ValueError(f"{name}: group_size=0 (per-channel) but 'weight_scale_second' is present")
    if s2.ndim != 2 or s2.shape[0] != n or s2.shape[1] < 1 or k % s2.shape[1]:
        raise _shape_error(f"{name}.weight_scale_second", f"(N, K/g) with K = {k}, N = {n}", s2.shape)
    if group_size is not None and (k % group_size or s2.shape[1] != k // group_size):
        raise _shape_error(
            f"{name}.weight_scale_second", f"(N, K/g) = ({n}, {k}/{group_size})", s2.shape
        )
    s2 = s2.astype(np.float32)
    _check_scale(s2, f"{name}.weight_scale_second")
    # vLLM Ascend process_scale (per-group): S = f32(s1 * s2), rounded to fp16 and back.
    with np.errstate(over="ignore", under="ignore"):
        prod = (s1[:, None] * s2).astype(np.float32)  # [N, G]
    scale = round_to_dtype(prod, FLOAT16).astype(np.float32)
    _check_scale(scale, f"{name}.weight_scale * weight_scale_second", "rounding to float16 (process_scale)")
    if not materialize:
        return None
    scale = scale.T.copy()  # [G, N]
    q = unpack_int8_to_int4(w, axis=0) if packed else w
    return _W4A8Proj(q, scale)


def _parse_w4a16(
    proj: Mapping, name: str, algo: str, n: int, k: int, group_size: int | None, dt, materialize: bool
) -> _W4A16Proj | None:
    needed = "weight_packed int32 [N, K/8], weight_scale [N, K/g]"
    if k % 8:
        raise ValueError(f"{name}: K = {k} is not a multiple of 8 (pack-quantized int32 words)")
    w = _get(proj, "weight_packed", name, algo, needed)
    if w.dtype != np.int32:
        raise ValueError(f"{name}.weight_packed: expected dtype int32, got {w.dtype}")
    if w.shape != (n, k // 8):
        raise _shape_error(f"{name}.weight_packed", f"(N, K/8) = ({n}, {k // 8})", w.shape)
    s = _get(proj, "weight_scale", name, algo, needed)
    _check_float(s, f"{name}.weight_scale")
    if s.ndim != 2 or s.shape[0] != n or s.shape[1] < 1 or k % s.shape[1]:
        raise _shape_error(f"{name}.weight_scale", f"(N, K/g) with N = {n}, K = {k}", s.shape)
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"{name}: W4A16 needs group_size >= 1 (or None to infer it), got {group_size}")
        if k % group_size or s.shape[1] != k // group_size:
            raise _shape_error(f"{name}.weight_scale", f"(N, K/g) = ({n}, {k}/{group_size})", s.shape)
    if "weight_shape" in proj:
        ws = np.asarray(proj["weight_shape"])
        if ws.shape != (2,) or not np.issubdtype(ws.dtype, np.integer) or ws.tolist() != [n, k]:
            raise ValueError(f"{name}.weight_shape: expected [N, K] = [{n}, {k}], got {ws.tolist()}")
    s = round_through(s.astype(np.float32), dt)  # declared in dt (§5.8)
    _check_scale(s, f"{name}.weight_scale", f"rounding to the model dtype {dt}")
    if not materialize:
        return None
    return _W4A16Proj(unpack_int32_offset8_to_int4(w, axis=1), s)


def _parse_projection(algo, proj, name, n, k, group_size, dt, materialize):
    if not isinstance(proj, Mapping):
        raise ValueError(f"{name}: expected a dict of tensors, got {type(proj).__name__}")
    if algo in (W8A8_DYNAMIC, W8A8_MIX):
        return _parse_w8(proj, name, algo, n, k, dt, materialize)
    if algo == W4A8_DYNAMIC:
        return _parse_w4a8(proj, name, algo, n, k, group_size, dt, materialize)
    if algo == W4A16:
        return _parse_w4a16(proj, name, algo, n, k, group_size, dt, materialize)
    raise ValueError(f"unsupported MoE algorithm ID {algo!r}")


def _parse_expert(algo, expert, index, hidden, inter, group_size, dt, materialize):
    """Validate (and with ``materialize`` unpack) one expert's three projections."""
    if not isinstance(expert, Mapping):
        raise ValueError(f"experts.{index}: expected a dict with gate_proj, up_proj, down_proj")
    missing = [p for p in _PROJECTIONS if p not in expert]
    if missing:
        raise ValueError(f"experts.{index}: missing projection(s) {', '.join(missing)}")
    dims = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return {
        p: _parse_projection(algo, expert[p], f"experts.{index}.{p}", *dims[p], group_size, dt, materialize)
        for p in _PROJECTIONS
    }


def _rows_of_scale(expert_tensors: Sequence, proj: str, what: str) -> int:
    """Rows of expert 0's ``<proj>.weight_scale``: I (gate_proj) or H (down_proj)."""
    first = expert_tensors[0]
    if not isinstance(first, Mapping) or not isinstance(first.get(proj), Mapping):
        raise ValueError(f"experts.0: expected a dict with gate_proj, up_proj, down_proj (missing {proj})")
    if "weight_scale" not in first[proj]:
        raise ValueError(f"experts.0.{proj}: missing tensor 'weight_scale' (it gives the {what})")
    s = np.asarray(first[proj]["weight_scale"])
    if s.ndim not in (1, 2) or s.shape[0] < 1:
        raise ValueError(f"experts.0.{proj}.weight_scale: expected shape (N, ...) with N >= 1, got {s.shape}")
    return int(s.shape[0])


def _intermediate_size(expert_tensors: Sequence) -> int:
    return _rows_of_scale(expert_tensors, "gate_proj", "intermediate size I")


def _check_hidden(x: np.ndarray, expert_tensors: Sequence, name: str) -> None:
    hidden = _rows_of_scale(expert_tensors, "down_proj", "hidden size H")
    if x.shape[1] != hidden:
        raise ValueError(
            f"{name}: width {x.shape[1]} does not match the experts' hidden size H = {hidden} "
            "(rows of experts.0.down_proj.weight_scale)"
        )


def _check_group_size(group_size) -> int | None:
    if group_size is None:
        return None
    return _check_int(group_size, "group_size", 0)


# --------------------------------------------------------------------------------------
# Per-expert MLP
# --------------------------------------------------------------------------------------


def swiglu(h: np.ndarray, dtype) -> np.ndarray:
    """SwiGLU with the first half as gate: ``a = dt(silu(g) * u)``, ``g, u = h[..., :I], h[..., I:]``.

    Numerics: ``g, u`` are taken as float64 (exact); ``silu(g) = g * sigmoid(g)`` with the
    overflow-free sigmoid ``1/(1+e^-|g|)`` / ``e^-|g|/(1+e^-|g|)``; the product with ``u`` in
    float64; **one** rounding to ``dtype``. ``npu_swiglu`` computes in float32 and rounds
    to the input dtype; ours is the correctly rounded value to within float64 error (the
    two can differ by 1 ulp of ``dtype``). ``g = -inf`` gives NaN (``-inf * 0``), as in torch.
    """
    dt = model_dtype(dtype)
    h = np.asarray(h)
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu: last dimension must be even (gate | up), got {h.shape[-1]}")
    half = h.shape[-1] // 2
    g = h[..., :half].astype(np.float64)
    u = h[..., half:].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        a = g * _sigmoid_f64(g) * u
    return round_to_dtype(a, dt)


def _dyn_matmul_epilogue(acc: np.ndarray, w_scale: np.ndarray, tok_scale: np.ndarray, out_dt) -> np.ndarray:
    """``out_dt((f32(acc) * s_w[n]) * s_tok[m])``: two float32 multiplies, one narrowing."""
    with np.errstate(invalid="ignore", over="ignore"):
        v = (acc.astype(np.float32) * w_scale[None, :]).astype(np.float32)
        v = (v * tok_scale[:, None]).astype(np.float32)
    return round_to_dtype(v, out_dt)


def _grouped_w4_matmul(xq: np.ndarray, proj: _W4A8Proj, name: str) -> np.ndarray:
    """``t[m, n] = f32(sum_g f64(f32(acc_g[m, n])) * f64(S[g, n]))``, groups summed in order.

    Each product is exact in float64; with one group (per-channel) the result is exactly
    the float32 product ``f32(acc) * S`` (as :func:`.linear.w4a8_dynamic_linear`).
    """
    groups = proj.scale.shape[0]
    k = xq.shape[1]
    g = k // groups
    total = np.zeros((xq.shape[0], proj.q.shape[0]), np.float64)
    for j in range(groups):
        acc = int_matmul(xq[:, j * g : (j + 1) * g], proj.q[:, j * g : (j + 1) * g], name)
        with np.errstate(invalid="ignore", over="ignore"):
            total = total + acc.astype(np.float32).astype(np.float64) * proj.scale[j].astype(np.float64)[None, :]
    return total.astype(np.float32)


def _run_expert(algo: str, x_rows: np.ndarray, prep: dict, dt: np.dtype, index: int) -> np.ndarray:
    gate, up, down = prep["gate_proj"], prep["up_proj"], prep["down_proj"]
    prefix = f"experts.{index}"
    if algo in (W8A8_DYNAMIC, W8A8_MIX):
        xq, s0 = quantize_dynamic_per_token(x_rows)
        w13 = np.concatenate([gate.q, up.q], axis=0)
        s13 = np.concatenate([gate.scale, up.scale])
        acc1 = int_matmul(xq, w13, f"{prefix}.gate_up accumulator")
        h = _dyn_matmul_epilogue(acc1, s13, s0, dt)
        a = swiglu(h, dt)
        q2, s2 = quantize_dynamic_per_token(a)
        acc2 = int_matmul(q2, down.q, f"{prefix}.down_proj accumulator")
        return _dyn_matmul_epilogue(acc2, down.scale, s2, dt)
    if algo == W4A8_DYNAMIC:
        out_dt = BFLOAT16  # vLLM Ascend forces bf16 gmm outputs for W4A8 (moe_mlp.py "TODO w4a8")
        xq, s0 = quantize_dynamic_per_token(x_rows)
        w13 = _W4A8Proj(np.concatenate([gate.q, up.q], axis=0), np.concatenate([gate.scale, up.scale], axis=1))
        t1 = _grouped_w4_matmul(xq, w13, f"{prefix}.gate_up accumulator")
        with np.errstate(invalid="ignore", over="ignore"):
            h = round_to_dtype((t1 * s0[:, None]).astype(np.float32), out_dt)
        a = swiglu(h, out_dt)
        q2, s2 = quantize_dynamic_per_token(a)
        t2 = _grouped_w4_matmul(q2, down, f"{prefix}.down_proj accumulator")
        with np.errstate(invalid="ignore", over="ignore"):
            return round_to_dtype((t2 * s2[:, None]).astype(np.float32), out_dt)
    # W4A16: weight-only, dequantized weights with dt-rounded scales, float64 sums.
    def dequant(p: _W4A16Proj) -> np.ndarray:
        g = p.q.shape[1] // p.scale.shape[1]
        s = np.repeat(p.scale.astype(np.float64), g, axis=1)
        return p.q.astype(np.float64) * s

    w13 = np.concatenate([dequant(gate), dequant(up)], axis=0)
    with np.errstate(invalid="ignore", over="ignore"):
        h = round_to_dtype(x_rows.astype(np.float64) @ w13.T, dt)
        a = swiglu(h, dt)
        return round_to_dtype(a.astype(np.float64) @ dequant(down).T, dt)


def _intermediate_dtype(algo: str, dt: np.dtype) -> np.dtype:
    return BFLOAT16 if algo == W4A8_DYNAMIC else dt


def expert_mlp(
    algo: str,
    x_rows: np.ndarray,
    expert: Mapping,
    *,
    dtype,
    group_size: int | None = None,
    kv_consumer: bool = False,
    expert_index: int = 0,
) -> np.ndarray:
    """One expert's ``down(SwiGLU(gate_up(x_rows)))`` for the MoE algorithm ``algo``.

    Args:
        x_rows: ``[M, H]`` in the model dtype: the rows routed to this expert.
        expert: ``{"gate_proj": {...}, "up_proj": {...}, "down_proj": {...}}`` checkpoint
            tensors (see :func:`moe_forward` for each algorithm's keys and shapes).
        dtype: model dtype (float32, float16, bfloat16).
        expert_index: only used to name the expert in error messages.

    Returns:
        ``[M, H]`` in the model dtype, except W4A8_DYNAMIC: **bfloat16** whatever the model
        dtype (vLLM Ascend v0.23 forces ``output_dtype=torch.bfloat16`` for both W4A8
        grouped matmuls). The op sequences are documented in :func:`moe_forward`.
    """
    check_algorithm(algo, "moe")
    dt = model_dtype(dtype)
    group_size = _check_group_size(group_size)
    x_rows = np.asarray(x_rows)
    if x_rows.ndim != 2 or x_rows.dtype != dt:
        raise ValueError(f"x_rows: expected a 2-D {dt} array [M, H], got {x_rows.dtype} {x_rows.shape}")
    _check_hidden(x_rows, [expert], "x_rows")
    inter = _intermediate_size([expert])
    prep = _parse_expert(algo, expert, expert_index, x_rows.shape[1], inter, group_size, dt, True)
    del kv_consumer  # W8A8_MIX MoE always runs the dynamic path (see moe_forward)
    return _run_expert(algo, x_rows, prep, dt, expert_index)


# --------------------------------------------------------------------------------------
# Dispatch + combine
# --------------------------------------------------------------------------------------


def moe_forward(
    algo: str,
    x: np.ndarray,
    expert_tensors: Sequence[Mapping],
    topk_weights: np.ndarray,
    topk_ids: np.ndarray,
    *,
    dtype,
    group_size: int | None = None,
    kv_consumer: bool = False,
) -> np.ndarray:
    """Quantized MoE experts and combine (vLLM Ascend AllGather path, §6.2-§6.3).

    Args:
        algo: ``"W8A8_DYNAMIC"``, ``"W8A8_MIX"``, ``"W4A8_DYNAMIC"`` or ``"W4A16"``.
        x: ``[T, H]`` hidden states in the model dtype.
        expert_tensors: ``E`` dicts ``{"gate_proj", "up_proj", "down_proj"}`` -> tensors:

            ============  ==========================================================
            algorithm     tensors per projection (N = out, K = in)
            ============  ==========================================================
            W8A8_DYNAMIC  ``weight`` int8 [N, K]; ``weight_scale`` [N, 1]
            W8A8_MIX      same (``deq_scale``, ``input_scale``, ... are ignored)
            W4A8_DYNAMIC  ``weight`` int8 [N/2, K] (two int4 per byte along N, even row
                          in the low nibble) or [N, K] (one int4 per byte, older
                          exports); ``weight_scale`` [N, 1]; per-group two-step adds
                          ``weight_scale_second`` [N, K/g]. ``scale_bias`` is
                          ignored; offsets must be zero.
            W4A16         ``weight_packed`` int32 [N, K/8] (``q + 8`` nibbles along K);
                          ``weight_scale`` [N, K/g]; optional ``weight_shape`` = [N, K]
            ============  ==========================================================

            gate/up are ``[I, H]``, down is ``[H, I]``; scales may be float32, float16 or
            bfloat16 (msModelSlim writes float32), other keys are ignored.
        topk_weights: ``[T, k]`` float (from :func:`route`).
        topk_ids: ``[T, k]`` integers in ``[0, E)``.
        dtype: model dtype.
        group_size: W4A16 / W4A8_DYNAMIC only; ``None`` infers it from the scale shapes,
            otherwise it must match them (``0`` = per-channel, W4A8 only). Ignored by W8A8.
        kv_consumer: W8A8_MIX only, and without effect: vLLM Ascend 0.23's
            ``AscendW8A8PDMixFusedMoeMethod`` is the W8A8_DYNAMIC MoE for every instance
            (no static MoE exists since v0.13), so both roles run the dynamic path below.

    Returns:
        ``[T, H]`` in the model dtype.

    Numerics, per expert ``e`` and its rows (token order; ``dt`` = model dtype):

    * **W8A8_DYNAMIC / W8A8_MIX**: ``(xq, s0) = npu_dynamic_quant(x_rows)`` (multiply by
      ``f32(127/max)``, rint); ``acc1 = xq @ [gate; up]^T`` (exact int32);
      ``h = dt((f32(acc1) * s13[n]) * s0[m])`` with ``s13 = round_through(scale, dt)``
      (declared in ``dt``, §1.1); ``a = swiglu(h)`` (:func:`swiglu`, gate = first half);
      ``(q2, s2) = npu_dynamic_quant(a)``; ``o = dt((f32(q2 @ down^T) * s2w[n]) * s2[m])``.
      Alternatives in vLLM Ascend, not followed (quirk §9.5): the dispatch-time quant of
      ``npu_moe_init_routing_custom`` (division by ``max/127``; a large-row path truncates
      to fp16 then rounds away), and Triton ``swiglu_quant`` (quotient rounded to bf16,
      then **truncated** to int8) for the second quantization.
    * **W4A8_DYNAMIC**: as W8A8 but with int4 weights and float32 scales (not rounded to
      ``dt``): per-channel ``S[n] = weight_scale``; per-group two-step
      ``S[g, n] = f32(fp16(f32(s1[n] * s2[n, g])))`` (vLLM Ascend ``process_scale`` rounds
      the per-group product to **fp16**; we follow it, §9.4).
      ``t[m, n] = f32(sum_g f64(f32(acc_g[m, n])) * f64(S[g, n]))`` (exact int32 group
      sums, exact float64 products, summed in group order, one rounding; per-channel this
      is the float32 product ``f32(acc) * S``, as the W4A8 linear); ``h = bf16(f32(t * s0[m]))``;
      SwiGLU and quantization as above on bf16 ``h``; ``o = bf16(f32(t2 * s2[m]))``.
      Intermediates are **bfloat16 for any model dtype** (vLLM Ascend forces bf16 gmm
      outputs for W4A8). The A8W4 kernel's hi/lo nibble split with fp16 group accumulation
      (§2.5, §9.6) and the fused ``grouped_matmul_swiglu_quant_v2`` (per-channel, custom
      ops) are not emulated: this is the mathematical reference.
    * **W4A16** (weight-only): ``w_deq = q4 * round_through(scale, dt)`` (vLLM Ascend
      declares the scales in ``dt``); ``h = dt(f64(x_rows) @ f64(w13_deq)^T)`` (float64
      sums, rounded once); ``a = swiglu(h)`` in ``dt``; ``o = dt(f64(a) @ f64(w2_deq)^T)``.

    Combine (``npu_moe_token_unpermute``): ``w = dt(topk_weights)`` (vLLM Ascend casts the
    weights to the model dtype before dispatch), then per token
    ``acc = 0; for j in 0..k-1: acc = f32(acc + f32(f32(w[t, j]) * f32(o[t, j])))``
    (float32, increasing ``j``; the product is exact for bf16/fp16) and ``y = dt(acc)``.
    A token whose weights are all zero gets ``+0.0`` rows (if its expert outputs are finite).

    Validation (every expert, before any math): shapes and dtypes per the table; scales
    finite and > 0 in the checkpoint and after their load-time rounding (to ``dt``, or
    fp16 for W4A8 per-group); ``weight_offset`` / ``weight_offset_second``, if present, all
    zero (symmetric checkpoints; vLLM Ascend never reads them); unpacked int4 in [-8, 7].
    Errors name the tensor, e.g. ``experts.3.down_proj.weight_scale: expected shape ...``.

    Edge cases: ``T = 0`` returns ``[0, H]``; zero rows of ``x`` give zero expert outputs
    (dynamic quant of a zero row is ``q = 0, scale = 0``); a non-finite row of ``x`` gives
    NaN outputs for the tokens that use it (NaN scale, see :mod:`.activation_quant`).
    Only experts with routed rows are unpacked; all are validated.
    """
    check_algorithm(algo, "moe")
    dt = model_dtype(dtype)
    group_size = _check_group_size(group_size)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-D array [T, H], got shape {x.shape}")
    if x.dtype != dt:
        raise ValueError(f"x: expected the model dtype {dt}, got {x.dtype}")
    num_tokens, hidden = x.shape
    if isinstance(expert_tensors, Mapping) or not isinstance(expert_tensors, Sequence):
        raise ValueError("expert_tensors: expected a list with one dict per expert")
    num_experts = len(expert_tensors)
    if num_experts == 0:
        raise ValueError("expert_tensors: needs at least one expert")
    _check_hidden(x, expert_tensors, "x")
    inter = _intermediate_size(expert_tensors)
    for e, expert in enumerate(expert_tensors):
        _parse_expert(algo, expert, e, hidden, inter, group_size, dt, False)

    w = np.asarray(topk_weights)
    ids = np.asarray(topk_ids)
    if w.ndim != 2 or w.shape[0] != num_tokens:
        raise _shape_error("topk_weights", f"(T, k) with T = {num_tokens}", w.shape)
    if ids.shape != w.shape:
        raise _shape_error("topk_ids", f"topk_weights' shape {w.shape}", ids.shape)
    _check_float(w, "topk_weights")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"topk_ids: expected an integer array, got dtype {ids.dtype}")
    top_k = w.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"topk_ids: k = {top_k} must be in [1, E] = [1, {num_experts}]")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        bad = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= num_experts))[0])
        raise ValueError(f"topk_ids: expert id {int(ids[bad])} at {bad} is outside [0, E) = [0, {num_experts})")

    mid_dt = _intermediate_dtype(algo, dt)
    flat_ids = ids.reshape(-1)
    expert_out = np.zeros((num_tokens * top_k, hidden), mid_dt)
    for e in np.unique(flat_ids):
        rows = np.flatnonzero(flat_ids == e)  # increasing t*k + j: token order
        prep = _parse_expert(algo, expert_tensors[e], int(e), hidden, inter, group_size, dt, True)
        expert_out[rows] = _run_expert(algo, x[rows // top_k], prep, dt, int(e))

    w32 = round_to_dtype(w, dt).astype(np.float32)
    o32 = expert_out.astype(np.float32).reshape(num_tokens, top_k, hidden)
    acc = np.zeros((num_tokens, hidden), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for j in range(top_k):
            acc = (acc + (w32[:, j : j + 1] * o32[:, j, :]).astype(np.float32)).astype(np.float32)
    return round_to_dtype(acc, dt)


def moe_layer_forward(
    algo: str,
    x: np.ndarray,
    router_logits: np.ndarray,
    expert_tensors: Sequence[Mapping],
    top_k: int,
    *,
    dtype,
    group_size: int | None = None,
    kv_consumer: bool = False,
    **route_kwargs,
) -> np.ndarray:
    """``moe_forward(algo, x, experts, *route(router_logits, top_k, **route_kwargs))``.

    ``route_kwargs`` are :func:`route`'s keyword arguments (``renormalize``,
    ``scoring_func``, ``use_grouped_topk``, ``num_expert_group``, ``topk_group``,
    ``e_score_correction_bias``, ``routed_scaling_factor``). Returns ``[T, H]`` in ``dtype``.
    """
    x = np.asarray(x)
    logits = np.asarray(router_logits)
    if logits.ndim == 2 and x.ndim == 2 and logits.shape[0] != x.shape[0]:
        raise ValueError(f"router_logits: expected {x.shape[0]} rows (one per token of x), got {logits.shape[0]}")
    if logits.ndim == 2 and logits.shape[1] != len(expert_tensors):
        raise ValueError(
            f"router_logits: expected E = {len(expert_tensors)} columns (one per expert), got {logits.shape[1]}"
        )
    weights, ids = route(logits, top_k, **route_kwargs)
    return moe_forward(
        algo, x, expert_tensors, weights, ids, dtype=dtype, group_size=group_size, kv_consumer=kv_consumer
    )
