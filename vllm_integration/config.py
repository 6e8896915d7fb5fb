"""``AscendQuantConfig``: vLLM's quantization config for msModelSlim checkpoints (name "ascend").

How vLLM reaches it (vLLM 0.32, vllm-cpu-platform-notes.md):

* ``--quantization ascend`` (``LLM(quantization="ascend")``): :meth:`get_config_filenames` names
  no file, so vLLM does not parse the description itself (it would fail on a missing or invalid
  file with a bare ``json`` error naming neither file nor directory); it builds
  ``AscendQuantConfig()`` and calls :meth:`maybe_update_config` with the model directory.
* ``config.json`` with ``"quantization_config": {"quant_method": "ascend"}``: vLLM calls
  :meth:`from_config` with that dict, then :meth:`maybe_update_config`.
  :meth:`override_quantization_method` claims exactly such configs and nothing else.

**Load-time validation.** :meth:`maybe_update_config` runs in ``VllmConfig.__post_init__``, in the
process that builds the engine config (``LLM()``'s, or the API server of ``vllm serve``), before
the model is built and before any weight is read. For a local directory it runs the checkpoint
validator of ``ascend-quant inspect`` (:func:`checkpoint.validate.validate_checkpoint`, the same
code) and raises its :class:`~checkpoint.errors.CheckpointError`: every problem, each naming the
directory, the tensor or key, what was expected and what was found. It parses the shard headers
and reads only the tensors a value check needs (scales, offsets, biases, FlatQuant factors, int4
weights stored one per byte) through one read-only memory map per shard; nothing is written.
``ASCEND_QUANT_VALIDATE=headers`` limits it to names, dtypes and shapes (shard headers only).
vLLM's pydantic config wraps a ``ValueError`` raised there into a ``ValidationError`` whose text
holds the message; :func:`find_checkpoint_error` gets the original back (``ascend-quant serve``
prints it and exits 1).

:meth:`get_quant_method` resolves each layer's algorithm from the description (fused modules
through :data:`checkpoint.description.PACKED_MODULES_MODEL_MAPPING`; all shards must agree),
maps FLOAT layers to vLLM's unquantized methods and looks the method class up in the algorithm
map (:mod:`.registry`). Follows vLLM Ascend's ``AscendModelSlimConfig`` (facts doc §3.2-§3.4)
except where noted in the methods.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..checkpoint.description import DESCRIPTION_FILE, FLOAT, TOP_LEVEL_KEYS, QuantDescription, packed_modules_for
from ..checkpoint.errors import CheckpointError
from . import linear_method as _linear  # noqa: F401  (registers the linear methods)
from . import moe_method as _moe  # noqa: F401  (registers the MoE methods)
from .registry import get_method_class

logger = init_logger(__name__)

__all__ = ["ASCEND_QUANTIZATION_METHOD", "VALIDATE_ENV", "AscendQuantConfig", "find_checkpoint_error"]

ASCEND_QUANTIZATION_METHOD = "ascend"
#: Environment variable choosing the load-time validation: "values" (default) or "headers".
VALIDATE_ENV = "ASCEND_QUANT_VALIDATE"


def _is_marker(cfg: Any) -> bool:
    """A ``quantization_config`` that points at a description file instead of holding one."""
    return (isinstance(cfg, dict) and cfg.get("quant_method") == ASCEND_QUANTIZATION_METHOD
            and not any(k not in TOP_LEVEL_KEYS and isinstance(v, str) for k, v in cfg.items()))


class AscendQuantConfig(QuantizationConfig):
    """Quantization config of an msModelSlim checkpoint; holds its :class:`QuantDescription`."""

    def __init__(self, description: QuantDescription | None = None):
        super().__init__()
        self.description_or_none = description
        self.model_type: str | None = None
        self._kv_consumer: bool | None = None

    def __repr__(self) -> str:
        src = self.description_or_none.source if self.description_or_none else "<not loaded>"
        return f"AscendQuantConfig({src})"

    # -- vLLM interface ----------------------------------------------------------------

    def get_name(self) -> str:
        return ASCEND_QUANTIZATION_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        # vLLM Ascend: int8, fp16, bf16; the portable kernels also run float32 models
        return [torch.int8, torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # vLLM Ascend raises here (no CUDA); our kernels are portable torch, any device works
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        # no file: vLLM then calls AscendQuantConfig() and maybe_update_config(model_dir), which
        # reads and validates the description with the rest of the directory (module docstring)
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AscendQuantConfig:
        """From the description dict, or from a ``{"quant_method": "ascend"}`` marker (the
        description is then read by :meth:`maybe_update_config`)."""
        if _is_marker(config):
            return cls(None)
        return cls(QuantDescription.from_dict(config, source=DESCRIPTION_FILE))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        # Claim only our own marker. vLLM Ascend also claims any quantization_config without a
        # quant_method when an NPU is present (facts doc §3.2): that would take foreign checkpoints.
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == ASCEND_QUANTIZATION_METHOD:
            return ASCEND_QUANTIZATION_METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        if hf_config is not None:
            text = getattr(hf_config, "get_text_config", lambda: hf_config)()
            self.model_type = getattr(text, "model_type", None) or getattr(hf_config, "model_type", None)
        if os.path.isdir(model_name):
            report = _validate_model_dir(model_name)
            if report.description is not None:
                if self.description_or_none is None:
                    self.description_or_none = QuantDescription.from_dict(
                        report.description.to_dict(), source=os.path.join(model_name, DESCRIPTION_FILE))
                self._check_unsupported()
            report.raise_if_errors()
            return
        if self.description_or_none is None:
            self.description_or_none = _find_description(model_name, revision)
        self._check_unsupported()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.description_or_none is not None:
            self.description_or_none = self.description_or_none.renamed(hf_to_vllm_mapper.map_name)

    # -- our state ---------------------------------------------------------------------

    @property
    def description(self) -> QuantDescription:
        if self.description_or_none is None:
            raise ValueError(f"ascend quantization: no {DESCRIPTION_FILE} loaded (config.json only names the "
                             "method; the description file must sit in the model directory)")
        return self.description_or_none

    @property
    def kv_consumer(self) -> bool:
        """Decode-only instance in PD disaggregation (``kv_transfer_config.is_kv_consumer``):
        W8A8_MIX linears run their static path there, the dynamic one otherwise (§5.4)."""
        if self._kv_consumer is None:
            from vllm.config import get_current_vllm_config_or_none

            cfg = get_current_vllm_config_or_none()
            kv = getattr(cfg, "kv_transfer_config", None) if cfg is not None else None
            self._kv_consumer = bool(kv is not None and kv.is_kv_consumer)
        return self._kv_consumer

    def _check_unsupported(self) -> None:
        top = self.description.top_level
        for key in ("kv_cache_type", "kv_quant_type", "fa_quant_type", "indexer_quant_type"):
            if top.get(key):
                raise NotImplementedError(
                    f"{self.description.source}: {key}={top[key]!r} (quantized KV cache / attention) is not "
                    "supported by ascend_quant; only linear and MoE layers are"
                )

    def _packed_modules(self) -> dict[str, tuple[str, ...]]:
        model_type = self.model_type
        if model_type is None:
            from vllm.config import get_current_vllm_config_or_none

            cfg = get_current_vllm_config_or_none()
            if cfg is not None and cfg.model_config is not None:
                hf = cfg.model_config.hf_text_config
                model_type = self.model_type = getattr(hf, "model_type", None)
        mapping = packed_modules_for(model_type, self.packed_modules_mapping)
        mapping.setdefault("experts", ("experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj"))
        return mapping

    def layer_algorithm(self, prefix: str) -> str | None:
        return self.description.layer_algorithm(prefix, self._packed_modules())

    # -- dispatch ----------------------------------------------------------------------

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            ParallelLMHead,
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )

        from .linear_method import AscendEmbeddingMethod

        desc = self.description
        packed = self._packed_modules()
        if isinstance(layer, LinearBase):
            algo = desc.layer_algorithm(prefix, packed)
            if algo is None:
                raise ValueError(f"{desc.source}: no '{prefix}.weight' entry (or entries for its fused shards) "
                                 f"for linear layer {prefix!r}")
            if algo == FLOAT:
                return UnquantizedLinearMethod()
            cls = get_method_class(algo, "linear")
            return cls(self, prefix, desc.shard_prefixes(prefix, packed))
        if isinstance(layer, RoutedExperts):
            algo = desc.layer_algorithm(prefix, packed)
            if algo is None:
                raise ValueError(f"{desc.source}: no expert entries '{prefix}.<e>.<proj>.weight' for MoE layer "
                                 f"{prefix!r}")
            if algo == FLOAT:
                return UnquantizedFusedMoEMethod(layer.moe_config)
            cls = get_method_class(algo, "moe")
            return cls(self, prefix, layer.moe_config)
        if isinstance(layer, ParallelLMHead):
            algo = desc.layer_algorithm(prefix)
            if algo is None or algo == FLOAT:
                return UnquantizedEmbeddingMethod()
            cls = get_method_class(algo, "linear")
            return AscendEmbeddingMethod(cls(self, prefix, [prefix]))
        if isinstance(layer, VocabParallelEmbedding):
            algo = desc.layer_algorithm(prefix)
            if algo not in (None, FLOAT):
                raise ValueError(f"{desc.source}: {prefix!r} is quantized ({algo}); quantized embedding lookups "
                                 "are not supported (vLLM Ascend has none either)")
            return UnquantizedEmbeddingMethod()
        return None


def _validate_model_dir(model_dir: str):
    """:func:`checkpoint.validate.validate_checkpoint` of ``model_dir`` (warnings logged, errors in
    the returned report), with the mode of :data:`VALIDATE_ENV`."""
    from ..checkpoint.validate import validate_checkpoint

    mode = os.environ.get(VALIDATE_ENV, "values").strip().lower() or "values"
    if mode not in ("values", "headers"):
        raise ValueError(f"{VALIDATE_ENV}={mode!r}: expected 'values' (default) or 'headers'")
    t0 = time.perf_counter()
    report = validate_checkpoint(model_dir, check_values=mode == "values")
    for w in report.warnings:
        logger.warning("%s: %s", model_dir, w)
    logger.info("ascend quantization: validated %s (%s, %d modules) in %.2f s: %s", model_dir, mode,
                len(report.modules), time.perf_counter() - t0,
                "ok" if report.ok else f"{len(report.errors)} problem(s)")
    return report


def find_checkpoint_error(exc: BaseException | None) -> CheckpointError | None:
    """The :class:`CheckpointError` behind ``exc``: itself, its ``__cause__``/``__context__`` chain,
    or the error pydantic wrapped into a ``ValidationError`` (vLLM's configs are pydantic
    dataclasses; a ``ValueError`` raised while one is built comes back wrapped). None if absent."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointError):
            return e
        todo += [e.__cause__, e.__context__]
        errors = getattr(e, "errors", None)
        if callable(errors) and type(e).__name__ == "ValidationError":
            try:
                todo += [(err.get("ctx") or {}).get("error") for err in errors()]
            except Exception:  # not pydantic's: nothing to unwrap
                pass
    return None


def _find_description(model_name: str, revision: str | None) -> QuantDescription:
    """Read the description next to the weights: a local directory, else the HF hub cache/download."""
    if os.path.isdir(model_name):
        return QuantDescription.load(model_name)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model_name, DESCRIPTION_FILE, revision=revision)
    except Exception as e:  # offline, missing file, no such repo
        raise ValueError(f"{model_name}: cannot find {DESCRIPTION_FILE} ({type(e).__name__}: {e})") from None
    return QuantDescription.load(path)
