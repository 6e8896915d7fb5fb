"""PyTorch-optimized quantization kernels (ascend_quant.optimized).

Public entry points (imported lazily, so ``import ascend_quant.optimized`` does not import
torch)::

    from ascend_quant.optimized import prepare_linear, apply_linear
    p = prepare_linear("W8A8_DYNAMIC", tensors, dtype="bfloat16", bias=b)   # once per layer
    y = apply_linear(p, x)                                                    # per call

Modules: ``activation_quant`` (static / dynamic / FlatQuant activation quantization),
``packing`` (int4 pack/unpack), ``int_gemm`` (exact int8 GEMMs), ``weight_only`` (W8A16 /
W4A16 kernels and their bound), ``prepare`` (prepare/apply per algorithm), ``dispatch``
(backends and kernel choice), ``npu`` (torch_npu wrappers).
"""

from __future__ import annotations

__all__ = ["PreparedLinear", "apply_linear", "prepare_linear", "available_backends", "backend_status"]


def __getattr__(name: str):
    if name in ("PreparedLinear", "apply_linear", "prepare_linear"):
        from . import prepare

        return getattr(prepare, name)
    if name in ("available_backends", "backend_status"):
        from . import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
