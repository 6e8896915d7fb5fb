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

__all__ = ["ReferenceLinear", "ReferenceMoE", "load_reference_model"]


def _to_numpy(t: torch.Tensor, dt: np.dtype) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy().astype(dt, copy=False)


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
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
                 group_size: int | None = None, kv_consumer: bool = False, prefix: str = ""):
        super().__init__()
        self.algo, self.prefix = algo, prefix
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}
        self.torch_dtype = _torch_dtype(dtype)
        self.np_dtype = _NP_DTYPES[self.torch_dtype]
        self.bias = None if bias is None else round_to_dtype(np.asarray(bias).astype(np.float32), self.np_dtype)
        self.group_size = group_size or None
        self.kv_consumer = kv_consumer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _to_numpy(x.reshape(-1, x.shape[-1]), self.np_dtype)
        y = linear_forward(self.algo, x2, self.tensors, dtype=self.np_dtype, bias=self.bias,
                           group_size=self.group_size, kv_consumer=self.kv_consumer)
        return _to_torch(y).reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"{self.prefix}: {self.algo}"


class ReferenceMoE(torch.nn.Module):
    """A MoE block computed by ``reference.moe``: ``router(x)`` -> ``route`` (softmax top-k,
    renormalized per ``renormalize``) -> ``moe_forward`` (quantized experts + combine)."""

    def __init__(self, algo: str, experts: list[dict], router: torch.nn.Module, *, top_k: int,
                 renormalize: bool, dtype, group_size: int | None = None, prefix: str = ""):
        super().__init__()
        self.algo, self.prefix = algo, prefix
        self.experts = experts
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
        y = moe_forward(self.algo, _to_numpy(x, self.np_dtype), self.experts, w, ids,
                        dtype=self.np_dtype, group_size=self.group_size)
        return _to_torch(y).reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.prefix}: {self.algo}, {len(self.experts)} experts, top-{self.top_k}"


def _set_submodule(root, path: str, module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _float_router(weight: np.ndarray, torch_dt) -> torch.nn.Module:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = _to_torch(np.asarray(weight)).to(torch_dt)
    return lin


def load_reference_model(quantized_dir: str | os.PathLike | QuantizedCheckpoint, *, dtype="float32",
                         kv_consumer: bool = False, attn_implementation: str = "eager"):
    """The HF causal-LM of ``quantized_dir`` with reference modules for its quantized layers.

    Args:
        dtype: model dtype ("float32", "bfloat16", "float16" or a torch dtype).
        kv_consumer: W8A8_MIX layers run their static path (decode instance in PD disaggregation).
        attn_implementation: transformers attention backend (eager: plain torch ops).

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
        _set_submodule(model, prefix, ReferenceLinear(algo, tensors, dtype=torch_dt, bias=bias,
                                                      group_size=group_size, kv_consumer=kv_consumer,
                                                      prefix=prefix))

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
                           group_size=group_size, prefix=block_prefix)
        _set_submodule(model, block_prefix, moe)
    missing = [m for m in missing if not any(m.startswith(p + ".") for p in list(quantized) + list(experts))
               and not m.endswith(("rotary_emb.inv_freq",)) and "mlp.gate." not in m]
    if missing and not (getattr(config, "tie_word_embeddings", False) and missing == ["lm_head.weight"]):
        raise ValueError(f"{ckpt.path}: tensors missing for the HF model: {missing[:5]}")
    return model
