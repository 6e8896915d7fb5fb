"""vLLM plugin integration (ascend_quant.vllm_integration).

``register()`` is the ``vllm.general_plugins`` entry point: it registers
:class:`~.config.AscendQuantConfig` under the quantization name ``"ascend"``. vLLM calls it in
every process it starts (engine, workers, CLI), so it is idempotent. Importing this package does
not import vLLM; ``register()`` does.

Modules: ``config`` (the quantization config), ``linear_method`` / ``moe_method`` (the methods),
``registry`` (algorithm map), ``params`` (checkpoint-layout parameters), ``serve`` (the
``ascend-quant serve`` launcher).
"""

from __future__ import annotations

__all__ = ["register"]

_registered = False


def register() -> None:
    """Register the "ascend" quantization config with vLLM (safe to call any number of times)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import ASCEND_QUANTIZATION_METHOD, AscendQuantConfig

    register_quantization_config(ASCEND_QUANTIZATION_METHOD)(AscendQuantConfig)
    _registered = True
