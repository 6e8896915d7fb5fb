"""vLLM linear methods for every linear algorithm ID, and the quantized lm_head method.

One class per algorithm ID (registered in :mod:`.registry` under layer type "linear"), all
sharing :class:`AscendLinearMethod`:

* ``create_weights`` registers the layer's checkpoint tensors in msModelSlim's layout (names,
  dtypes, shapes) with vLLM's parameter classes (:mod:`.params`), so TP sharding and fused shards
  (qkv, gate_up) load like any vLLM quantized format. Which optional tensors exist (e.g. W8A8
  ``weight_scale``, FlatQuant ``right_trans``) is read from the description.
* ``process_weights_after_loading`` hands the loaded tensors to
  ``optimized.prepare_linear`` (validation, load-time rounding, packing) and frees them.
* ``apply`` runs ``optimized.apply_linear``; under ``torch.compile`` it goes through the opaque
  custom op ``torch.ops.ascend_quant.linear`` so the graph is never broken.

Scale and offset parameters are declared float32 (the checkpoint dtype): the model-dtype
rounding vLLM Ascend gets by declaring them in ``params_dtype`` (facts doc §1.1) is done by
``prepare_linear``, only where vLLM Ascend does it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)

from ..reference import algorithms as A
from .ops import new_key, register_layer
from .params import ShardedTensorParameter, make_param
from .registry import register_method

logger = init_logger(__name__)

__all__ = ["AscendEmbeddingMethod", "AscendLinearMethod", "TensorSpec"]

_I8, _I32, _I64, _F32 = torch.int8, torch.int32, torch.int64, torch.float32


@dataclass(frozen=True)
class TensorSpec:
    """How one checkpoint tensor of a linear layer is registered.

    ``kind``: see :mod:`.params`. ``cols``: second dimension for ``channel``/``group`` kinds
    (``None``: a 1-D ``[N]`` tensor; ``"groups"``: computed by the method). ``required``: the
    method fails without it. ``float32_bits``: int64 parameter receiving float32 bit patterns.
    """

    kind: str
    dtype: torch.dtype
    cols: int | str | None = 1
    required: bool = True
    float32_bits: bool = False


_STATIC_SET = {
    "weight": TensorSpec("weight", _I8),
    "input_scale": TensorSpec("tensor", _F32),
    "input_offset": TensorSpec("tensor", _F32),
    "deq_scale": TensorSpec("channel", _I64, cols=None, float32_bits=True),
    "quant_bias": TensorSpec("channel", _I32, cols=None),
}
_OPTIONAL_WEIGHT_SCALE = {
    "weight_scale": TensorSpec("channel", _F32, required=False),
    "weight_offset": TensorSpec("channel", _F32, required=False),
}


# --------------------------------------------------------------------------------------
# the base method
# --------------------------------------------------------------------------------------

class AscendLinearMethod(LinearMethodBase):
    """Base of the per-algorithm linear methods (see the module docstring).

    Subclasses set :attr:`algo` and :meth:`tensor_specs`. State lives on the method instance,
    which vLLM creates once per layer.
    """

    algo: str = ""

    def __init__(self, quant_config, prefix: str, shard_prefixes: list[str] | None = None):
        super().__init__()
        self.quant_config = quant_config
        self.prefix = prefix
        self.shard_prefixes = shard_prefixes or [prefix]
        self.kv_consumer = quant_config.kv_consumer
        self.prepared: list = []
        self.split_sizes: list[int] | None = None
        self.out_features = 0
        self.bias_baked: torch.Tensor | None = None
        self._variants: dict[int | None, list] = {}
        self.key = new_key(prefix)

    # -- parameters --------------------------------------------------------------------

    def tensor_specs(self, layer: torch.nn.Module, n: int, k: int) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def _present_suffixes(self) -> set[str] | None:
        """Suffixes the description lists for this module (first shard); None when it lists only
        ``.weight`` (a minimal description: register the required tensors)."""
        desc = self.quant_config.description
        found = set(desc.module_tensors(self.shard_prefixes[0])) - {"bias"}
        if found <= {"weight", "weight_packed"}:
            return None
        return found

    def _selected_specs(self, layer, n: int, k: int) -> dict[str, TensorSpec]:
        specs = self.tensor_specs(layer, n, k)
        present = self._present_suffixes()
        if present is None:
            return {s: t for s, t in specs.items() if t.required}
        unknown = sorted(present - set(specs))
        if unknown:
            raise ValueError(
                f"{self.shard_prefixes[0]}: tensor(s) {unknown} are not part of {self.algo}; expected "
                f"{', '.join(specs)} ({self.quant_config.description.source})"
            )
        missing = sorted(s for s, t in specs.items() if t.required and s not in present)
        if missing:
            raise ValueError(f"{self.shard_prefixes[0]}: {self.algo} needs tensor(s) {missing}, which the "
                             f"description does not list ({self.quant_config.description.source})")
        return {s: t for s, t in specs.items() if s in present}

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        weight_loader = extra_weight_attrs.pop("weight_loader")
        n, k = sum(output_partition_sizes), input_size_per_partition
        self.out_features = n
        self.partition_sizes = list(output_partition_sizes)
        self.params_dtype = params_dtype
        names = self.shard_prefixes if len(self.shard_prefixes) == len(output_partition_sizes) else \
            [f"{self.prefix}[{i}]" for i in range(len(output_partition_sizes))]
        self.specs = self._selected_specs(layer, n, k)
        for suffix, spec in self.specs.items():
            if spec.kind == "tensor":
                shape: tuple[int, ...] = ()
            elif spec.kind == "packed_out":
                shape = (n // 2, k)
            elif spec.kind == "packed_in":
                shape = (n, -(-k // 8))
            elif spec.kind == "weight":
                shape = (n, k)
            else:
                cols = self.groups(layer, k, suffix) if spec.cols == "groups" else spec.cols
                shape = (n,) if cols is None else (n, cols)
            kind = spec.kind
            if kind == "group" and shape[1] == 1:
                kind = "channel"  # one group: per-channel (a [N, 1] tensor is not split along K)
            param = make_param(kind, shape, spec.dtype, weight_loader, shard_names=names,
                               float32_bits=spec.float32_bits)
            layer.register_parameter(suffix, param)
            if extra_weight_attrs and not isinstance(param, ShardedTensorParameter):
                for key, value in extra_weight_attrs.items():
                    setattr(param, key, value)

    def groups(self, layer, k: int, suffix: str) -> int:
        """Number of scale columns of a per-group tensor for this partition's ``K``."""
        raise NotImplementedError(suffix)

    def _group_count(self, layer, k: int, g: int, suffix: str) -> int:
        if g <= 0 or g >= k:
            return 1
        tp = getattr(layer, "tp_size", 1)
        if isinstance(layer, RowParallelLinear) and tp > 1 and k % g:
            raise ValueError(f"{self.prefix}.{suffix}: group size {g} does not divide this rank's K={k} "
                             f"(tensor parallel {tp}); the per-group scales cannot be split")
        return -(-k // g)

    # -- loading -----------------------------------------------------------------------

    def _collect(self, layer) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """(tensors shared by every shard, per-shard per-tensor values)."""
        dense: dict[str, torch.Tensor] = {}
        per_tensor: dict[str, list[torch.Tensor]] = {}
        for suffix, spec in self.specs.items():
            param = getattr(layer, suffix)
            if isinstance(param, ShardedTensorParameter):
                if not param.loaded():
                    missing = [nm for nm, v in zip(param.shard_names, param.shard_values) if v is None]
                    raise ValueError(f"{self.prefix}.{suffix}: not loaded for shard(s) {missing}")
                per_tensor[suffix] = list(param.shard_values)
            else:
                dense[suffix] = param.data
        shards = len(self.partition_sizes)
        per_shard = [{s: v[i] for s, v in per_tensor.items()} for i in range(shards)]
        return dense, per_shard

    def _prepare_one(self, tensors: dict, bias: torch.Tensor | None, layer):
        from ..optimized import prepare_linear

        tp_rank = getattr(layer, "tp_rank", 0)
        add_quant_bias = not (isinstance(layer, RowParallelLinear) and tp_rank > 0)
        g = self.quant_config.description.group_size
        try:
            return prepare_linear(self.algo, tensors, dtype=self.params_dtype, bias=bias,
                                  group_size=g if g > 0 else None, add_quant_bias=add_quant_bias,
                                  kv_consumer=self.kv_consumer)
        except ValueError as e:
            raise ValueError(f"{self.prefix} ({self.algo}): {e}") from None

    def _tensors_for_prepare(self, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(dense)

    def _prepare(self, layer, bias: torch.Tensor | None) -> list:
        dense, per_shard = self._collect(layer)
        dense = self._tensors_for_prepare(dense)
        same = all(
            all(torch.equal(per_shard[0][s], p[s]) if per_shard[0][s].shape == p[s].shape else False
                for s in per_shard[0])
            for p in per_shard[1:]
        )
        if same:
            self.split_sizes = None
            return [self._prepare_one({**dense, **per_shard[0]}, bias, layer)]
        # shards with different per-tensor values (e.g. q/k/v input_scale): one prepared linear per
        # shard, outputs concatenated (vLLM Ascend keeps only the last shard's value, §3.7)
        logger.info("%s: shards carry different per-tensor values; running them as %d linears",
                    self.prefix, len(per_shard))
        self.split_sizes = list(self.partition_sizes)
        out = []
        offset = 0
        for size, values in zip(self.partition_sizes, per_shard):
            part = {s: self._rows(s, t, offset, size) for s, t in dense.items()}
            b = None if bias is None else bias[offset:offset + size]
            out.append(self._prepare_one({**part, **values}, b, layer))
            offset += size
        return out

    def _rows(self, suffix: str, t: torch.Tensor, offset: int, size: int) -> torch.Tensor:
        spec = self.specs.get(suffix)
        if spec is not None and spec.kind == "packed_out":
            if offset % 2 or size % 2:
                raise ValueError(f"{self.prefix}.{suffix}: shard sizes must be even to split packed int4 rows")
            return t[offset // 2:(offset + size) // 2]
        return t[offset:offset + size]

    def _bias_for(self, layer) -> torch.Tensor | None:
        """The bias vLLM will pass to ``apply`` (RowParallel: rank 0 only; not with skip_bias_add)."""
        bias = getattr(layer, "bias", None)
        if bias is None or getattr(layer, "skip_bias_add", False):
            return None
        if isinstance(layer, RowParallelLinear) and getattr(layer, "tp_rank", 0) > 0:
            return None
        return bias

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        bias = self._bias_for(layer)
        self.prepared = self._prepare(layer, None if bias is None else bias.data)
        self.bias_baked = bias
        self._variants = {None if bias is None else id(bias): self.prepared}
        for suffix in self.specs:  # the prepared linear holds its own copies
            delattr(layer, suffix)
        register_layer(self.key, self)

    # -- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, prepared: list | None = None) -> torch.Tensor:
        from ..optimized import apply_linear

        prepared = prepared if prepared is not None else self.prepared
        if len(prepared) == 1:
            y = apply_linear(prepared[0], x)
        else:
            y = torch.cat([apply_linear(p, x) for p in prepared], dim=-1)
        if y.shape[-1] < self.out_features:  # lm_head: zero logits for vLLM's vocabulary padding
            y = torch.nn.functional.pad(y, (0, self.out_features - y.shape[-1]))
        return y

    def _prepared_for_bias(self, bias: torch.Tensor | None) -> list:
        key = None if bias is None else id(bias)
        if key not in self._variants:
            raise ValueError(
                f"{self.prefix}: apply() got a different bias than the layer's (prepared with "
                f"{'no bias' if self.bias_baked is None else 'the layer bias'}); the bias is folded in at load"
            )
        return self._variants[key]

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.ascend_quant.linear(x, self.key)
        if (bias is None) != (self.bias_baked is None) or (bias is not None and bias is not self.bias_baked):
            return self.forward(x, self._prepared_for_bias(bias))
        return self.forward(x)

    def resident_bytes(self) -> int:
        return sum(p.resident_bytes() for p in self.prepared)


# --------------------------------------------------------------------------------------
# per-algorithm methods
# --------------------------------------------------------------------------------------

def _linear(algo: str):
    def wrap(cls):
        cls.algo = algo
        cls = register_weight_loader_v2_supported_method(cls)
        return register_method(algo, "linear")(cls)
    return wrap


@_linear(A.W8A16)
class AscendW8A16LinearMethod(AscendLinearMethod):
    """W8A16: int8 weight, per-channel or per-group ``weight_scale``/``weight_offset`` (facts §5.1)."""

    def tensor_specs(self, layer, n, k):
        return {"weight": TensorSpec("weight", _I8),
                "weight_scale": TensorSpec("group", _F32, cols="groups"),
                "weight_offset": TensorSpec("group", _F32, cols="groups")}

    def groups(self, layer, k, suffix):
        return self._group_count(layer, k, self.quant_config.description.group_size, suffix)


@_linear(A.W4A16)
class AscendW4A16LinearMethod(AscendLinearMethod):
    """W4A16 (LLM-Compressor pack-quantized): ``weight_packed`` int32 ``[N, K/8]``, per-group
    ``weight_scale``; ``weight_shape`` is loaded but the prepared layer uses this rank's (N, K)."""

    def tensor_specs(self, layer, n, k):
        return {"weight_packed": TensorSpec("packed_in", _I32),
                "weight_scale": TensorSpec("group", _F32, cols="groups"),
                "weight_shape": TensorSpec("tensor", _I64, required=False)}

    def groups(self, layer, k, suffix):
        g = int(self.quant_config.description.top_level.get("group_size", 32))  # vLLM Ascend's default
        return self._group_count(layer, k, g, suffix)

    def _prepare_one(self, tensors, bias, layer):
        tensors = dict(tensors)
        tensors.pop("weight_shape", None)  # the checkpoint's full (N, K); K here is per partition
        k = self._k
        tensors["weight_shape"] = torch.tensor([tensors["weight_packed"].shape[0], k], dtype=torch.int32)
        return super()._prepare_one(tensors, bias, layer)

    def create_weights(self, layer, input_size_per_partition, *args, **kwargs):
        self._k = input_size_per_partition
        super().create_weights(layer, input_size_per_partition, *args, **kwargs)


@_linear(A.W8A8)
class AscendW8A8LinearMethod(AscendLinearMethod):
    """W8A8 static: ``input_scale``/``input_offset`` per tensor, ``deq_scale``, ``quant_bias`` (§5.2)."""

    def tensor_specs(self, layer, n, k):
        return {**_STATIC_SET, **_OPTIONAL_WEIGHT_SCALE}


@_linear(A.W8A8_DYNAMIC)
class AscendW8A8DynamicLinearMethod(AscendLinearMethod):
    """W8A8_DYNAMIC: per-channel int8 weight, per-token int8 activations (§5.3)."""

    def tensor_specs(self, layer, n, k):
        return {"weight": TensorSpec("weight", _I8), "weight_scale": TensorSpec("channel", _F32),
                "weight_offset": TensorSpec("channel", _F32, required=False)}


@_linear(A.W8A8_MIX)
class AscendW8A8MixLinearMethod(AscendLinearMethod):
    """W8A8_MIX (PD-mix, §5.4): the static set plus ``weight_scale``; static on KV-consumer
    (decode-only) instances, dynamic otherwise."""

    def tensor_specs(self, layer, n, k):
        return {**_STATIC_SET, "weight_scale": TensorSpec("channel", _F32),
                "weight_offset": TensorSpec("channel", _F32, required=False)}


@_linear(A.W4A8_DYNAMIC)
class AscendW4A8DynamicLinearMethod(AscendLinearMethod):
    """W4A8_DYNAMIC: int4 weights (v1.0.0: two per byte along N), per-token int8 activations."""

    def tensor_specs(self, layer, n, k):
        desc = self.quant_config.description
        packed = desc.version == "1.0.0"  # vLLM Ascend's rule (§5.6)
        row = isinstance(layer, RowParallelLinear)
        tp = getattr(layer, "tp_size", 1)
        if row and 16 % tp:
            raise ValueError(f"{self.prefix}: W4A8 scale_bias has 16 K-chunks; tensor parallel {tp} must divide 16")
        return {
            "weight": TensorSpec("packed_out" if packed else "weight", _I8),
            "weight_scale": TensorSpec("channel", _F32),
            "weight_offset": TensorSpec("channel", _F32, required=False),
            "scale_bias": TensorSpec("group" if row else "channel", _F32, cols=16 // tp if row else 1,
                                     required=False),
            "weight_scale_second": TensorSpec("group", _F32, cols="groups", required=False),
            "weight_offset_second": TensorSpec("group", _F32, cols="groups", required=False),
        }

    def groups(self, layer, k, suffix):
        g = int(self.quant_config.description.top_level.get("group_size", 256))  # vLLM Ascend's default
        if g <= 0:
            raise ValueError(f"{self.prefix}.{suffix}: per-group W4A8 tensors need a top-level group_size > 0")
        return self._group_count(layer, k, g, suffix)


@_linear(A.W4A4_DYNAMIC)
class AscendW4A4DynamicLinearMethod(AscendLinearMethod):
    """W4A4_DYNAMIC: int4 weights (one per byte), per-token int4 activations (§5.10)."""

    def tensor_specs(self, layer, n, k):
        return {"weight": TensorSpec("weight", _I8), "weight_scale": TensorSpec("channel", _F32),
                "weight_offset": TensorSpec("channel", _F32, required=False)}


@_linear(A.W4A4_FLATQUANT_DYNAMIC)
class AscendW4A4FlatQuantDynamicLinearMethod(AscendLinearMethod):
    """W4A4_FLATQUANT_DYNAMIC: Kronecker transform (``left_trans``, ``right_trans``; o_proj only
    ``left_trans``), per-token int4 with ``clip_ratio`` (§5.9, §7)."""

    def tensor_specs(self, layer, n, k):
        if isinstance(layer, RowParallelLinear) and getattr(layer, "tp_size", 1) > 1:
            raise ValueError(
                f"{self.prefix}: W4A4_FLATQUANT_DYNAMIC transforms act on the full input width; a "
                "row-parallel layer with tensor parallel > 1 sees only part of it (facts doc §9.13)"
            )
        return {"weight": TensorSpec("weight", _I8), "weight_scale": TensorSpec("channel", _F32),
                "weight_offset": TensorSpec("channel", _F32, required=False),
                "left_trans": TensorSpec("tensor", _F32), "right_trans": TensorSpec("tensor", _F32, required=False),
                "clip_ratio": TensorSpec("tensor", _F32)}


# --------------------------------------------------------------------------------------
# quantized lm_head
# --------------------------------------------------------------------------------------

class AscendEmbeddingMethod(LinearMethodBase):
    """A quantized ``lm_head`` (``ParallelLMHead``): the algorithm's linear method on the rows this
    rank loaded. vLLM pads the vocabulary; padded rows get no checkpoint data, so the prepared
    linear covers only the loaded rows and the logits are zero-padded (vLLM drops the padding).
    No embedding lookup: a quantized ``embed_tokens`` is refused by the config."""

    def __init__(self, linear_method: AscendLinearMethod):
        super().__init__()
        self.linear_method = linear_method

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        self.linear_method.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                          output_size, params_dtype, **extra_weight_attrs)

    def process_weights_after_loading(self, layer) -> None:
        lm = self.linear_method
        rows = layer.num_org_embeddings_per_partition
        self.padded = lm.out_features
        for suffix, spec in lm.specs.items():
            if spec.kind == "tensor":
                continue
            param = getattr(layer, suffix)
            keep = rows // 2 if spec.kind == "packed_out" else rows
            param.data = param.data[:keep].contiguous()
        lm.partition_sizes = [rows]
        lm.process_weights_after_loading(layer)
        lm.out_features = self.padded

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear_method.apply(layer, x, bias)

    def embedding(self, layer, input_):  # pragma: no cover - vLLM never calls it for lm_head
        raise NotImplementedError("a quantized lm_head has no embedding lookup")


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the prepared quantized layers of a loaded vLLM model."""
    total = 0
    for module in model.modules():
        method: Callable | None = getattr(module, "quant_method", None)
        if isinstance(method, AscendLinearMethod):
            total += method.resident_bytes()
        elif isinstance(method, AscendEmbeddingMethod):
            total += method.linear_method.resident_bytes()
    return total
