"""vLLM MoE methods (``RoutedExperts``, vLLM 0.32) for W8A8_DYNAMIC, W8A8_MIX, W4A8_DYNAMIC, W4A16.

``create_weights`` registers ``w13_<suffix>`` ``[E, 2I, ...]`` and ``w2_<suffix>`` ``[E, H, ...]``
for every per-expert checkpoint tensor ``experts.{e}.{gate,up,down}_proj.<suffix>`` (vLLM's
expert loader puts gate rows in the first half of ``w13[e]``, up rows in the second, narrows
both by TP along I and ``w2`` along its input dim). Scales/offsets carry the loader attribute
``quant_method`` ("channel" = one value per output row, "group" = per group along K, "tensor" =
one value per projection); ``deq_scale`` arrives as int64 float32-bit patterns (see
:mod:`.params`). ``process_weights_after_loading`` rebuilds per-expert checkpoint dicts (this
rank's slices) and calls ``optimized.moe.prepare_moe``; ``apply`` receives vLLM's routing
(``topk_weights``, ``topk_ids``) and returns the routed output (vLLM adds shared experts and
does the TP all-reduce).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ..reference import algorithms as A
from .ops import new_key, register_layer
from .params import float32_bits_loader
from .registry import register_method

logger = init_logger(__name__)

__all__ = ["AscendFusedMoEMethod", "MOE_TENSORS"]

_I8, _I32, _I64, _F32 = torch.int8, torch.int32, torch.int64, torch.float32

#: Per algorithm: checkpoint suffix -> (loader kind, dtype, required, passed to prepare_moe).
#: Loader kind: "weight" (model weight), "channel", "group", "tensor", "input_scale" (vLLM
#: stores one value per expert), "bias" (int32 quant_bias, loaded like an expert bias),
#: "shape" (``weight_shape``).
MOE_TENSORS: dict[str, dict[str, tuple[str, torch.dtype, bool, bool]]] = {
    A.W8A8_DYNAMIC: {
        "weight": ("weight", _I8, True, True),
        "weight_scale": ("channel", _F32, True, True),
        "weight_offset": ("channel", _F32, False, True),
    },
    A.W4A8_DYNAMIC: {
        "weight": ("weight", _I8, True, True),
        "weight_scale": ("channel", _F32, True, True),
        "weight_offset": ("channel", _F32, False, True),
        "scale_bias": ("scale_bias", _F32, False, False),
        "weight_scale_second": ("group", _F32, False, True),
        "weight_offset_second": ("group", _F32, False, True),
    },
    A.W4A16: {
        "weight_packed": ("weight", _I32, True, True),
        "weight_scale": ("group", _F32, True, True),
        "weight_shape": ("shape", _I32, False, False),
    },
}
MOE_TENSORS[A.W8A8_MIX] = {
    **MOE_TENSORS[A.W8A8_DYNAMIC],
    "weight_scale": ("channel", _F32, True, True),
    # the static set is loaded but unused: vLLM Ascend's W8A8_MIX MoE runs the dynamic path (§5.4)
    "deq_scale": ("channel1d", _I64, False, False),
    "quant_bias": ("bias", _I32, False, False),
    "input_scale": ("input_scale", _F32, False, False),
    "input_offset": ("tensor", _F32, False, False),
}


def _moe_backend():
    """``(prepare_moe, apply_moe)`` from ``optimized.moe``; the NumPy reference as a fallback
    (emulation: correct but slow) when that module is not available."""
    try:
        from ..optimized.moe import apply_moe, prepare_moe
        return prepare_moe, apply_moe
    except ImportError:
        logger.warning_once("ascend_quant.optimized.moe not available: running MoE experts with the "
                            "NumPy reference (slow)")
        return _reference_prepare_moe, _reference_apply_moe


def _numpy(t: torch.Tensor):
    import ml_dtypes

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _reference_prepare_moe(algo, expert_tensors, *, dtype, group_size=None):
    from ..checkpoint.reference_model import _NP_DTYPES

    experts = [{p: {k: _numpy(v) for k, v in proj.items()} for p, proj in e.items()} for e in expert_tensors]
    return {"algo": algo, "experts": experts, "dtype": dtype, "np_dtype": _NP_DTYPES[dtype],
            "group_size": group_size}


def _reference_apply_moe(prepared, x, topk_weights, topk_ids):
    from ..checkpoint.reference_model import _to_torch
    from ..reference.moe import moe_forward

    y = moe_forward(prepared["algo"], _numpy(x), prepared["experts"], _numpy(topk_weights.float()),
                    topk_ids.cpu().numpy(),
                    dtype=prepared["np_dtype"], group_size=prepared["group_size"])
    return _to_torch(y).to(x.device)


class AscendFusedMoEMethod(FusedMoEMethodBase):
    """Base of the per-algorithm MoE methods (see the module docstring)."""

    algo: str = ""

    def __init__(self, quant_config, prefix: str, moe_config):
        super().__init__(moe_config)
        self.quant_config = quant_config
        self.prefix = prefix
        self.prepared = None
        self.key = new_key(prefix)

    # -- parameters --------------------------------------------------------------------

    def _suffixes(self) -> dict[str, tuple[str, torch.dtype, bool, bool]]:
        table = MOE_TENSORS[self.algo]
        desc = self.quant_config.description
        ids = desc.expert_ids(self.prefix)
        first = f"{self.prefix}.{ids[0] if ids else 0}.gate_proj"
        present = set(desc.module_tensors(first)) - {"bias"}
        if present <= {"weight", "weight_packed"}:
            return {s: t for s, t in table.items() if t[2]}
        unknown = sorted(present - set(table))
        if unknown:
            raise ValueError(f"{first}: tensor(s) {unknown} are not part of {self.algo} MoE; expected "
                             f"{', '.join(table)} ({desc.source})")
        missing = sorted(s for s, t in table.items() if t[2] and s not in present)
        if missing:
            raise ValueError(f"{first}: {self.algo} MoE needs tensor(s) {missing}, which the description "
                             f"does not list ({desc.source})")
        return {s: t for s, t in table.items() if s in present}

    def _shapes(self, suffix: str, kind: str, e: int, h: int, i: int, tp: int) -> tuple[tuple, tuple]:
        desc = self.quant_config.description
        packed = self.algo == A.W4A8_DYNAMIC and desc.version == "1.0.0"
        if kind == "weight":
            if self.algo == A.W4A16:
                return (e, 2 * i, h // 8), (e, h, i // 8)
            if packed:
                return (e, i, h), (e, h // 2, i)
            return (e, 2 * i, h), (e, h, i)
        if kind == "channel":
            return (e, 2 * i, 1), (e, h, 1)
        if kind == "channel1d" or kind == "bias":
            return (e, 2 * i), (e, h)
        if kind == "scale_bias":
            # vLLM's expert loader sends every name containing "bias" down its expert-bias path:
            # w13 rows are TP-narrowed like the weight, w2 is copied whole (all 16 K-chunks; this
            # rank's 16/tp chunks would be [r*16/tp, (r+1)*16/tp) -- unused by the math)
            if 16 % tp:
                raise ValueError(f"{self.prefix}: W4A8 scale_bias has 16 chunks; tensor parallel {tp} must divide 16")
            return (e, 2 * i, 1), (e, h, 16)
        if kind == "group":
            g = desc.group_size or (32 if self.algo == A.W4A16 else 256)
            if h % g or i % g:
                raise ValueError(f"{self.prefix}.{suffix}: group size {g} must divide H={h} and this rank's I={i}")
            return (e, 2 * i, h // g), (e, h, i // g)
        if kind == "input_scale":
            return (e, 1), (e, 1)
        if kind == "tensor":
            return (e, 2), (e,)
        if kind == "shape":
            return (e, 2), (e, 2)
        raise AssertionError(kind)

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        extra_weight_attrs.pop("unpadded_hidden_size", None)
        extra_weight_attrs.pop("global_num_experts", None)
        if self.moe.moe_parallel_config.use_ep:
            raise NotImplementedError(f"{self.prefix}: expert parallelism is not supported by the ascend "
                                      "MoE methods; use tensor parallelism")
        self.params_dtype = params_dtype
        self.num_experts, self.hidden, self.inter = num_experts, hidden_size, intermediate_size_per_partition
        tp = self.moe.moe_parallel_config.tp_size
        self.suffixes = self._suffixes()
        loader = extra_weight_attrs["weight_loader"]
        for suffix, (kind, dtype, _, _) in self.suffixes.items():
            s13, s2 = self._shapes(suffix, kind, num_experts, hidden_size, intermediate_size_per_partition, tp)
            for stem, shape in (("w13", s13), ("w2", s2)):
                param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                layer.register_parameter(f"{stem}_{suffix}", param)
                attrs = dict(extra_weight_attrs)
                if kind == "channel1d":
                    attrs["weight_loader"] = float32_bits_loader(loader)
                    attrs["quant_method"] = "channel"
                elif kind in ("channel", "group", "tensor"):
                    attrs["quant_method"] = kind
                set_weight_attrs(param, attrs)

    def get_fused_moe_quant_config(self, layer):
        return None

    # -- loading -----------------------------------------------------------------------

    def _expert_dicts(self, layer) -> list[dict[str, dict[str, torch.Tensor]]]:
        i, h = self.inter, self.hidden
        experts = []
        for e in range(self.num_experts):
            gate, up, down = {}, {}, {}
            for suffix, (kind, _, _, used) in self.suffixes.items():
                if not used:
                    continue
                w13 = getattr(layer, f"w13_{suffix}").data[e]
                w2 = getattr(layer, f"w2_{suffix}").data[e]
                half = w13.shape[0] // 2
                gate[suffix], up[suffix] = w13[:half], w13[half:]
                down[suffix] = w2
            if self.algo == A.W4A16:
                gate["weight_shape"] = up["weight_shape"] = torch.tensor([i, h], dtype=torch.int32)
                down["weight_shape"] = torch.tensor([h, i], dtype=torch.int32)
            experts.append({"gate_proj": gate, "up_proj": up, "down_proj": down})
        return experts

    def process_weights_after_loading(self, layer) -> None:
        prepare_moe, _ = _moe_backend()
        g = self.quant_config.description.group_size
        try:
            self.prepared = prepare_moe(self.algo, self._expert_dicts(layer), dtype=self.params_dtype,
                                        group_size=g if g > 0 else None)
        except ValueError as e:
            raise ValueError(f"{self.prefix} ({self.algo} MoE): {e}") from None
        for suffix in self.suffixes:
            delattr(layer, f"w13_{suffix}")
            delattr(layer, f"w2_{suffix}")
        register_layer(self.key, self)

    # -- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        _, apply_moe = _moe_backend()
        return apply_moe(self.prepared, x, topk_weights, topk_ids)

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.ascend_quant.moe(x, topk_weights, topk_ids, self.key)
        return self.forward(x, topk_weights, topk_ids)


def _moe(algo: str):
    def wrap(cls):
        cls.algo = algo
        return register_method(algo, "moe")(cls)
    return wrap


@_moe(A.W8A8_DYNAMIC)
class AscendW8A8DynamicFusedMoEMethod(AscendFusedMoEMethod):
    """W8A8_DYNAMIC experts: int8 per-channel weights, per-token int8 activations (facts §5.5)."""


@_moe(A.W8A8_MIX)
class AscendW8A8MixFusedMoEMethod(AscendFusedMoEMethod):
    """W8A8_MIX experts: the W8A8_DYNAMIC path on every instance (vLLM Ascend 0.23, §5.4); the
    static tensors are loaded and ignored."""


@_moe(A.W4A8_DYNAMIC)
class AscendW4A8DynamicFusedMoEMethod(AscendFusedMoEMethod):
    """W4A8_DYNAMIC experts: int4 weights (v1.0.0 packed along N), per-token int8 activations (§5.7)."""


@_moe(A.W4A16)
class AscendW4A16FusedMoEMethod(AscendFusedMoEMethod):
    """W4A16 experts (LLM-Compressor pack-quantized): weight-only int4 per group (§5.8)."""
