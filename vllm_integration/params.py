"""Checkpoint-layout parameters for vLLM's loaders.

Linear layers (weight-loader v2) use vLLM's parameter classes, so column/row sharding and fused
shards load the way vLLM loads every other quantized format:

================  ======================================================  ===========================
kind              vLLM class                                              used for
================  ======================================================  ===========================
``weight``        ``ModelWeightParameter(output_dim=0, input_dim=1)``     int8 ``[N, K]`` weights
``packed_out``    ``PackedvLLMParameter(packed_dim=0, factor 2)``         W4A8 ``[N/2, K]`` (2 int4/byte)
``packed_in``     ``PackedvLLMParameter(packed_dim=1, factor 8)``         W4A16 ``[N, K/8]`` int32
``channel``       ``ChannelQuantScaleParameter(output_dim=0)``            ``[N, 1]`` / ``[N]`` per row
``group``         ``GroupQuantScaleParameter(output_dim=0, input_dim=1)``  ``[N, G]`` per group along K
``tensor``        :class:`ShardedTensorParameter`                         per-tensor values, one per
                                                                          fused shard (any shape)
================  ======================================================  ===========================

``float32_bits``: a ``deq_scale`` parameter is int64 and a float32 checkpoint tensor is stored as
its bit pattern (msModelSlim writes int64 words for fp32/fp16 sources and float32 for bf16 ones;
copying float32 into int64 would convert the value), see :func:`float32_bits_loader`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)

__all__ = ["KINDS", "ShardedTensorParameter", "float32_bits_loader", "load_sharded_tensor", "make_param",
           "to_float32_bits"]

KINDS = ("weight", "packed_out", "packed_in", "channel", "group", "tensor")
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def to_float32_bits(t: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 holding its bit pattern (``deqscale2int64``); other dtypes unchanged."""
    if t.dtype == torch.float32:
        return t.contiguous().view(torch.int32).to(torch.int64)
    return t


def float32_bits_loader(base: Callable) -> Callable:
    """Wrap a weight loader so float32 tensors arrive as their int64 bit patterns."""

    def load(param, loaded_weight, *args, **kwargs):
        return base(param, to_float32_bits(loaded_weight), *args, **kwargs)

    load.__wrapped__ = base  # type: ignore[attr-defined]
    if getattr(base, "supports_moe_loading", False):
        load.supports_moe_loading = True  # type: ignore[attr-defined]
    return load


class ShardedTensorParameter(BasevLLMParameter):
    """Per-tensor checkpoint values of a layer, one per logical shard (q/k/v, gate/up).

    ``shard_values[i]`` holds shard ``i``'s tensor with the checkpoint's own shape (FlatQuant's
    ``left_trans`` size is only known from the file). Row- and column-parallel layers receive the
    whole tensor (a per-tensor value is not sharded). vLLM Ascend registers these as
    ``PerTensorScaleParameter`` of shape ``[1]`` with the v1 loaders, so the last shard loaded wins
    (facts doc §3.7); we keep every shard and let the method check or use them.
    """

    def __new__(cls, num_shards: int, shard_names: Sequence[str]):
        return super().__new__(cls, data=torch.empty(0))

    def __init__(self, num_shards: int, shard_names: Sequence[str]):
        super().__init__(data=self.data, weight_loader=load_sharded_tensor)
        self.shard_values: list[torch.Tensor | None] = [None] * num_shards
        self.shard_names = list(shard_names)

    def loaded(self) -> bool:
        return all(v is not None for v in self.shard_values)


def _shard_indices(param: ShardedTensorParameter, shard_id) -> list[int]:
    n = len(param.shard_values)
    if shard_id is None:
        return list(range(n))  # one value for the whole (fused-on-disk or unfused) module
    ids = shard_id if isinstance(shard_id, (tuple, list)) else (shard_id,)
    out = []
    for s in ids:
        i = _QKV_INDEX[s] if isinstance(s, str) else int(s)
        if not 0 <= i < n:
            raise ValueError(f"shard id {shard_id!r} out of range for a module with {n} shard(s)")
        out.append(i)
    return out


def load_sharded_tensor(param: ShardedTensorParameter, loaded_weight: torch.Tensor, shard_id=None, **kwargs) -> None:
    """Weight loader of :class:`ShardedTensorParameter` (``shard_id``: None, int, "q"/"k"/"v")."""
    value = loaded_weight.detach().clone()
    for i in _shard_indices(param, shard_id):
        param.shard_values[i] = value


def make_param(kind: str, shape: Sequence[int], dtype: torch.dtype, weight_loader: Callable, *,
               shard_names: Sequence[str] = (), float32_bits: bool = False) -> torch.nn.Parameter:
    """A parameter of ``kind`` (:data:`KINDS`) with ``torch.empty(shape, dtype)`` data."""
    if kind == "tensor":
        return ShardedTensorParameter(max(1, len(shard_names)), shard_names)
    loader = float32_bits_loader(weight_loader) if float32_bits else weight_loader
    data = torch.empty(tuple(shape), dtype=dtype)
    if kind == "weight":
        return ModelWeightParameter(data=data, output_dim=0, input_dim=1, weight_loader=loader)
    if kind == "packed_out":
        return PackedvLLMParameter(data=data, packed_factor=2, packed_dim=0, output_dim=0, input_dim=1,
                                   weight_loader=loader)
    if kind == "packed_in":
        return PackedvLLMParameter(data=data, packed_factor=8, packed_dim=1, output_dim=0, input_dim=1,
                                   weight_loader=loader)
    if kind == "channel":
        return ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=loader)
    if kind == "group":
        return GroupQuantScaleParameter(data=data, output_dim=0, input_dim=1, weight_loader=loader)
    raise ValueError(f"unknown parameter kind {kind!r}; expected one of {', '.join(KINDS)}")
