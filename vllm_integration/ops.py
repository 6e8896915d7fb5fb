"""Opaque custom ops for ``torch.compile``: ``torch.ops.ascend_quant.linear`` / ``.moe``.

vLLM compiles the model forward (unless ``enforce_eager``) with a full graph; our kernels have
data-dependent Python control flow (validation, kernel choice per M), so the methods call them
through these ops under compilation. Each op takes the layer's key (a string) and finds the method
in a registry of weak references; the fake (meta) implementations give the output shape:
``[..., N]`` for a linear, ``x``'s shape for MoE.
"""

from __future__ import annotations

import itertools
import weakref

import torch

__all__ = ["new_key", "register_layer"]

_LAYERS: dict[str, weakref.ref] = {}
_KEYS = itertools.count()
_DEFINED = False


def new_key(prefix: str) -> str:
    return f"{prefix}@{next(_KEYS)}"


def _method(layer: str):
    method = _LAYERS[layer]()
    if method is None:
        raise RuntimeError(f"ascend_quant layer {layer!r} no longer exists")
    return method


def _linear_impl(x: torch.Tensor, layer: str) -> torch.Tensor:
    return _method(layer).forward(x)


def _linear_fake(x: torch.Tensor, layer: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _method(layer).out_features))


def _moe_impl(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: str) -> torch.Tensor:
    return _method(layer).forward(x, topk_weights, topk_ids)


def _moe_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: str) -> torch.Tensor:
    return torch.empty_like(x)


def _define() -> None:
    global _DEFINED
    if _DEFINED:
        return
    if not hasattr(torch.ops.ascend_quant, "linear"):
        torch.library.define("ascend_quant::linear", "(Tensor x, str layer) -> Tensor")
        torch.library.impl("ascend_quant::linear", "CompositeExplicitAutograd")(_linear_impl)
        torch.library.register_fake("ascend_quant::linear")(_linear_fake)
    if not hasattr(torch.ops.ascend_quant, "moe"):
        torch.library.define("ascend_quant::moe",
                             "(Tensor x, Tensor topk_weights, Tensor topk_ids, str layer) -> Tensor")
        torch.library.impl("ascend_quant::moe", "CompositeExplicitAutograd")(_moe_impl)
        torch.library.register_fake("ascend_quant::moe")(_moe_fake)
    _DEFINED = True


def register_layer(key: str, method) -> None:
    """Make ``method`` (with ``forward`` and, for linears, ``out_features``) reachable by ``key``."""
    _define()
    _LAYERS[key] = weakref.ref(method)
