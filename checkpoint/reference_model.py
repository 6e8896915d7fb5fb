"""An independent forward pass of a quantized checkpoint: Hugging Face transformers with the NumPy
reference swapped in for every quantized layer.

:func:`load_reference_model` builds the HF model from the quantized directory's ``config.json``,
loads its ``FLOAT`` tensors (embeddings, norms, biases, unquantized layers) and replaces

* every quantized linear (``<prefix>.weight`` not FLOAT, lm_head and MoE router included) by a
  :class:`ReferenceLinear` running ``reference.linear.linear_forward`` on the checkpoint tensors;
* every MoE block whose experts are quantized by a :class:`ReferenceMoE` running the router
  (float, or quantized), ``reference.moe.route`` and ``reference.moe.moe_forward``.

Everything else (attention, RoPE, norms, residuals) is the transformers code in the model dtype.
It needs torch and transformers; the quantized math is the reference's, so it serves as the
expected value for the vLLM integration (and for inspecting a checkpoint's accuracy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import torch

from ..reference import algorithms as A
from ..reference.linear import linear_forward
from ..reference.moe import moe_forward, route
from ..reference.rounding import round_to_dtype
from .description import FLOAT
from .io import QuantizedCheckpoint, read_quantized_model

__all__ = ["ReferenceLinear", "ReferenceMoE", "load_reference_model", "shard_expert", "shard_input_dim"]


def _to_numpy(t: torch.Tensor, dt: np.dtype) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy().astype(dt, copy=False)


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # read-only memory maps of the checkpoint
        a = a.copy()
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NP_DTYPES = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
              torch.bfloat16: np.dtype(ml_dtypes.bfloat16)}


def _torch_dtype(dtype) -> torch.dtype:
    return _TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype


class ReferenceLinear(torch.nn.Module):
    """``y = reference.linear.linear_forward(algo, x, tensors, ...)`` as a torch module.

    ``x`` (model dtype) goes to NumPy, the reference computes ``y`` in the model dtype, and ``y``
    comes back unchanged. ``bias`` is the float bias as stored (rounded to the model dtype here,
    as vLLM holds it in a model-dtype parameter).
    """

    def __init__(self, algo: str, tensors: Mapping[str, np.ndarray], *, dtype, bias=None,
                 group_size: int | None = None, kv_consumer: bool = False, prefix: str = "",
                 row_parallel_tp: int = 1):
        super().__init__()
        self.algo, self.prefix = algo, prefix
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}
        self.torch_dtype = _torch_dtype(dtype)
        self.np_dtype = _NP_DTYPES[self.torch_dtype]
        self.bias = None if bias is None else round_to_dtype(np.asarray(bias).astype(np.float32), self.np_dtype)
        self.group_size = group_size or None
        self.kv_consumer = kv_consumer
        self.tp = int(row_parallel_tp)
        self.shards = [shard_input_dim(algo, self.tensors, r, self.tp, prefix) for r in range(self.tp)] \
            if self.tp > 1 else [self.tensors]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _to_numpy(x.reshape(-1, x.shape[-1]), self.np_dtype)
        k = x2.shape[1] // self.tp
        parts = []
        for r, tensors in enumerate(self.shards):
            # vLLM RowParallelLinear: rank r sees input columns [r*K/tp, (r+1)*K/tp); the bias and
            # quant_bias are applied on rank 0 only; the partial outputs are all-reduced (summed)
            parts.append(linear_forward(self.algo, np.ascontiguousarray(x2[:, r * k:(r + 1) * k]), tensors,
                                        dtype=self.np_dtype, bias=self.bias if r == 0 else None,
                                        group_size=self.group_size, kv_consumer=self.kv_consumer,
                                        add_quant_bias=r == 0))
        y = _all_reduce(parts, self.np_dtype)
        return _to_torch(y).reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"{self.prefix}: {self.algo}"


class ReferenceMoE(torch.nn.Module):
    """A MoE block computed by ``reference.moe``: ``router(x)`` -> ``route`` (softmax top-k,
    renormalized per ``renormalize``) -> ``moe_forward`` (quantized experts + combine)."""

    def __init__(self, algo: str, experts: list[dict], router: torch.nn.Module, *, top_k: int,
                 renormalize: bool, dtype, group_size: int | None = None, prefix: str = "", tp: int = 1):
        super().__init__()
        self.algo, self.prefix = algo, prefix
        self.experts = experts
        self.tp = int(tp)
        self.rank_experts = [[shard_expert(algo, e, r, self.tp, f"{prefix}.experts.{i}") for i, e in enumerate(experts)]
                             for r in range(self.tp)] if self.tp > 1 else [experts]
        self.router = router
        self.top_k, self.renormalize = top_k, renormalize
        self.torch_dtype = _torch_dtype(dtype)
        self.np_dtype = _NP_DTYPES[self.torch_dtype]
        self.group_size = group_size or None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router(x)
        w, ids = route(_to_numpy(logits, _NP_DTYPES[logits.dtype]), self.top_k, renormalize=self.renormalize)
        xn = _to_numpy(x, self.np_dtype)
        # vLLM TP MoE: each rank runs every expert on its slice of the intermediate dim and the
        # combined outputs are all-reduced (summed)
        parts = [moe_forward(self.algo, xn, experts, w, ids, dtype=self.np_dtype, group_size=self.group_size)
                 for experts in self.rank_experts]
        return _to_torch(_all_reduce(parts, self.np_dtype)).reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.prefix}: {self.algo}, {len(self.experts)} experts, top-{self.top_k}"


# ---------------------------------------------------------------------------------------
# tensor-parallel emulation (how vLLM shards the checkpoint tensors)
# ---------------------------------------------------------------------------------------

#: Projections vLLM runs as RowParallelLinear (input dim sharded).
ROW_PARALLEL = ("o_proj", "down_proj")


def _all_reduce(parts: list[np.ndarray], dt: np.dtype) -> np.ndarray:
    """Sum of the ranks' partial outputs in rank order, float32 adds (exact for two bf16/fp16
    values) rounded to the model dtype, as a gloo all-reduce of ``tp`` tensors."""
    if len(parts) == 1:
        return parts[0]
    acc = parts[0].astype(np.float32)
    for p in parts[1:]:
        acc = (acc + p.astype(np.float32)).astype(np.float32)
    return round_to_dtype(acc, dt)


def _cols(a: np.ndarray, r: int, tp: int, what: str) -> np.ndarray:
    n = a.shape[-1]
    if n % tp:
        raise ValueError(f"{what}: {n} columns cannot be split over tensor parallel {tp}")
    w = n // tp
    return np.ascontiguousarray(a[..., r * w:(r + 1) * w])


def _rows(a: np.ndarray, r: int, tp: int, what: str) -> np.ndarray:
    n = a.shape[0]
    if n % tp:
        raise ValueError(f"{what}: {n} rows cannot be split over tensor parallel {tp}")
    h = n // tp
    return np.ascontiguousarray(a[r * h:(r + 1) * h])


def shard_input_dim(algo: str, tensors: Mapping[str, np.ndarray], r: int, tp: int, prefix: str = "") -> dict:
    """Rank ``r``'s tensors of a row-parallel layer: everything with a K (input) axis is narrowed
    to columns ``[r*K/tp, (r+1)*K/tp)`` (per-group scales by groups, W4A8 ``scale_bias`` by its 16
    chunks, W4A16 packed words by words); per-row and per-tensor tensors are kept whole."""
    if algo == A.W4A4_FLATQUANT_DYNAMIC:
        raise ValueError(f"{prefix}: FlatQuant transforms act on the full input width; no row-parallel TP")
    out = {}
    for key, a in tensors.items():
        a = np.asarray(a)
        if key in ("weight", "weight_packed", "weight_scale_second", "weight_offset_second", "scale_bias") or (
                key in ("weight_scale", "weight_offset") and a.ndim == 2 and a.shape[1] > 1):
            out[key] = _cols(a, r, tp, f"{prefix}.{key}")
        elif key == "weight_shape":
            out[key] = np.array([a[0], a[1] // tp], dtype=a.dtype)
        else:
            out[key] = a
    return out


def shard_expert(algo: str, expert: Mapping[str, Mapping[str, np.ndarray]], r: int, tp: int, prefix: str = "") -> dict:
    """Rank ``r``'s slice of one expert: gate/up rows ``[r*I/tp, (r+1)*I/tp)`` (W4A8 v1.0.0 packs
    two rows per byte: bytes are sliced by half as many rows), down's input columns likewise
    (:func:`shard_input_dim`)."""
    out = {}
    for proj in ("gate_proj", "up_proj"):
        t = {}
        for key, a in expert[proj].items():
            a = np.asarray(a)
            if key == "weight_shape":
                t[key] = np.array([a[0] // tp, a[1]], dtype=a.dtype)
            elif a.ndim >= 1 and key != "input_scale" and key != "input_offset":
                t[key] = _rows(a, r, tp, f"{prefix}.{proj}.{key}")
            else:
                t[key] = a
        out[proj] = t
    out["down_proj"] = shard_input_dim(algo, expert["down_proj"], r, tp, f"{prefix}.down_proj")
    return out


# ---------------------------------------------------------------------------------------
# vLLM-CPU rounding points for the unquantized ops (bf16/fp16 models)
# ---------------------------------------------------------------------------------------
#
# In a bf16 model every op rounds its output to bf16, and transformers and vLLM's CPU kernels do
# not round at the same places. Those 1-ulp differences are then amplified by activation
# quantization (a code flip moves a value by 1/127, int4: 1/7, of the token's max), which would
# swamp the quantized layers we want to compare. With ``emulate_vllm_rounding`` the reference
# rounds where vLLM 0.32 on CPU rounds (found by comparing layer inputs inside the engine):
#
# * RoPE: vLLM's ``rotary_embedding`` kernel computes ``x*cos - y*sin`` in float32 from the
#   model-dtype cos/sin cache and rounds once (transformers: three roundings);
# * attention: float32 scores, softmax and weighted sum of the model-dtype q/k/v, one rounding of
#   the output (transformers eager: scores and probabilities rounded to the model dtype);
# * residual + RMSNorm: vLLM's ``fused_add_rms_norm`` normalizes the float32 sum of the branch
#   output and the residual and rounds the residual separately (transformers normalizes the
#   rounded sum). The first input norm and the norm formula itself are the same.

def _norm_from_fp32(norm: torch.nn.Module, s32: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """vLLM's native ``rms_norm`` on a float32 input: ``dt(x * rsqrt(mean(x^2) + eps)) * weight``."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    y = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    return (norm.weight * y.to(dt)).to(dt)


def _rope_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _attention_forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                       **kwargs):
    """Llama-family self-attention (q/k/v/o projections, optional q_norm/k_norm, GQA, causal) with
    vLLM-CPU rounding points: float32 RoPE and attention, one rounding each."""
    dt = hidden_states.dtype
    lead = hidden_states.shape[:-1]
    shape = (*lead, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _rope_fp32(q, cos, sin), _rope_fp32(k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)
    vf = v.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(2, 3)) * self.scaling
    length, total = scores.shape[-2], scores.shape[-1]
    causal = torch.ones(length, total, dtype=torch.bool, device=scores.device).tril(total - length)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    out = torch.matmul(probs, vf).to(dt).transpose(1, 2).reshape(*lead, -1)
    return self.o_proj(out), None


def _decoder_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                     use_cache=False, position_embeddings=None, **kwargs):
    """Pre-norm decoder layer with vLLM's fused residual-add + RMSNorm (the float32 sum is carried
    to the next norm on the returned tensor)."""
    dt = hidden_states.dtype
    s32 = getattr(hidden_states, "_aq_sum32", None)
    residual = hidden_states
    h = self.input_layernorm(hidden_states) if s32 is None else _norm_from_fp32(self.input_layernorm, s32, dt)
    h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache,
                          position_embeddings=position_embeddings, **kwargs)
    s32 = residual.float() + h.float()
    residual = s32.to(dt)
    h = self.mlp(_norm_from_fp32(self.post_attention_layernorm, s32, dt))
    s32 = residual.float() + h.float()
    out = s32.to(dt)
    out._aq_sum32 = s32
    return out


def _final_norm_forward(self, hidden_states):
    s32 = getattr(hidden_states, "_aq_sum32", None)
    if s32 is None:
        return type(self).forward(self, hidden_states)
    return _norm_from_fp32(self, s32, hidden_states.dtype)


def _emulate_vllm_rounding(model) -> None:
    import types

    inner = model.get_submodule("model")
    for layer in inner.layers:
        missing = [a for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
                   if not hasattr(layer, a)]
        attn = getattr(layer, "self_attn", None)
        if missing or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise ValueError(f"emulate_vllm_rounding: {type(layer).__name__} is not a llama-family decoder layer")
        layer.forward = types.MethodType(_decoder_forward, layer)
        attn.forward = types.MethodType(_attention_forward, attn)
    inner.norm.forward = types.MethodType(_final_norm_forward, inner.norm)


def _set_submodule(root, path: str, module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _float_router(weight: np.ndarray, torch_dt) -> torch.nn.Module:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = _to_torch(np.asarray(weight)).to(torch_dt)
    return lin


def load_reference_model(quantized_dir: str | os.PathLike | QuantizedCheckpoint, *, dtype="float32",
                         kv_consumer: bool = False, attn_implementation: str = "eager",
                         emulate_vllm_rounding: bool | None = None, tp_size: int = 1):
    """The HF causal-LM of ``quantized_dir`` with reference modules for its quantized layers.

    Args:
        dtype: model dtype ("float32", "bfloat16", "float16" or a torch dtype).
        kv_consumer: W8A8_MIX layers run their static path (decode instance in PD disaggregation).
        attn_implementation: transformers attention backend (eager: plain torch ops).
        emulate_vllm_rounding: round the unquantized ops (RoPE, attention, residual + norm) where
            vLLM's CPU kernels do (see the comment above :func:`_norm_from_fp32`); default: for
            bf16/fp16 models (in float32 both sides differ only by summation order). Llama-family
            decoder layers only.
        tp_size: emulate vLLM's tensor parallelism for the quantized math: row-parallel
            projections (o_proj, down_proj) run per rank on their input slice and are summed;
            MoE experts run per rank on their intermediate slice and are summed. (Column-parallel
            layers and attention are unaffected: their per-rank results are exact slices.)

    Returns ``model`` (eval mode). MoE blocks must follow the Qwen3-MoE layout (``mlp.gate``
    router, ``mlp.experts``; ``config.num_experts_per_tok``, ``config.norm_topk_prob``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = quantized_dir if isinstance(quantized_dir, QuantizedCheckpoint) else read_quantized_model(quantized_dir)
    desc = ckpt.description
    torch_dt = _torch_dtype(dtype)
    config = AutoConfig.from_pretrained(ckpt.path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dt, attn_implementation=attn_implementation)
    model.eval()
    group_size = desc.group_size or None

    # modules whose weight is quantized
    quantized: dict[str, str] = {}
    for name, algo in desc.items():
        if algo != FLOAT and name.endswith((".weight", ".weight_packed")):
            quantized[name.rsplit(".", 1)[0]] = algo
    experts: dict[str, str] = {}
    for prefix, algo in list(quantized.items()):
        head, sep, rest = prefix.partition(".experts.")
        if sep and rest.split(".")[0].isdigit():
            experts[head + ".experts"] = algo
            del quantized[prefix]

    # FLOAT tensors go into the HF model as they are
    state = {}
    for name, arr in ckpt.tensors.items():
        if desc[name] != FLOAT:
            continue
        state[name] = _to_torch(np.array(arr)).to(torch_dt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{ckpt.path}: FLOAT tensors the HF model does not have: {unexpected[:5]}")

    modules = dict(model.named_modules())
    for prefix, algo in quantized.items():
        if prefix not in modules:
            raise ValueError(f"{ckpt.path}: quantized module {prefix!r} not found in the HF model")
        bias_name = f"{prefix}.bias"
        bias = np.asarray(ckpt.tensors[bias_name]) if bias_name in ckpt.tensors else None
        tensors = ckpt.module_tensors(prefix)
        tensors.pop("bias", None)
        row_tp = tp_size if prefix.rsplit(".", 1)[-1] in ROW_PARALLEL else 1
        _set_submodule(model, prefix, ReferenceLinear(algo, tensors, dtype=torch_dt, bias=bias,
                                                      group_size=group_size, kv_consumer=kv_consumer,
                                                      prefix=prefix, row_parallel_tp=row_tp))

    text_cfg = getattr(config, "text_config", None) or config
    for experts_prefix, algo in experts.items():
        A.check_algorithm(algo, "moe")
        block_prefix = experts_prefix.rsplit(".", 1)[0]
        ids = desc.expert_ids(experts_prefix)
        expert_list = []
        for e in ids:
            expert_list.append({p: {k: v for k, v in ckpt.module_tensors(f"{experts_prefix}.{e}.{p}").items()
                                    if k != "bias"}
                                for p in ("gate_proj", "up_proj", "down_proj")})
        router_prefix = f"{block_prefix}.gate"
        if router_prefix in quantized:
            router = model.get_submodule(router_prefix)
        else:
            router = _float_router(ckpt.tensors[f"{router_prefix}.weight"], torch_dt)
        moe = ReferenceMoE(algo, expert_list, router, top_k=int(text_cfg.num_experts_per_tok),
                           renormalize=bool(getattr(text_cfg, "norm_topk_prob", True)), dtype=torch_dt,
                           group_size=group_size, prefix=block_prefix, tp=tp_size)
        _set_submodule(model, block_prefix, moe)
    if emulate_vllm_rounding is None:
        emulate_vllm_rounding = torch_dt != torch.float32
    if emulate_vllm_rounding:
        _emulate_vllm_rounding(model)
    missing = [m for m in missing if not any(m.startswith(p + ".") for p in list(quantized) + list(experts))
               and not m.endswith(("rotary_emb.inv_freq",)) and "mlp.gate." not in m]
    if missing and not (getattr(config, "tie_word_embeddings", False) and missing == ["lm_head.weight"]):
        raise ValueError(f"{ckpt.path}: tensors missing for the HF model: {missing[:5]}")
    return model
