"""The algorithm IDs of vLLM Ascend's ``quant_model_description.json`` that this
project implements, and which layer types each one covers.

IDs are the exact strings msModelSlim writes on ``<module>.weight`` entries.
vLLM Ascend has no W4A16 linear scheme (only MoE, for LLM-Compressor
checkpoints); we implement W4A16 for plain linear layers too.
"""

from __future__ import annotations

W4A16 = "W4A16"
W8A16 = "W8A16"
W8A8 = "W8A8"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
W4A8_DYNAMIC = "W4A8_DYNAMIC"
W4A4_FLATQUANT_DYNAMIC = "W4A4_FLATQUANT_DYNAMIC"
W8A8_MIX = "W8A8_MIX"
W4A4_DYNAMIC = "W4A4_DYNAMIC"
FLOAT = "FLOAT"

LINEAR_ALGORITHMS: tuple[str, ...] = (
    W4A16, W8A16, W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC, W4A4_FLATQUANT_DYNAMIC, W8A8_MIX, W4A4_DYNAMIC,
)
MOE_ALGORITHMS: tuple[str, ...] = (W4A16, W8A8_DYNAMIC, W4A8_DYNAMIC, W8A8_MIX)


def check_algorithm(algo: str, layer_type: str = "linear") -> str:
    """Return ``algo`` if it is supported for ``layer_type`` ("linear" or "moe"), else raise
    ``ValueError`` listing the supported IDs."""
    table = {"linear": LINEAR_ALGORITHMS, "moe": MOE_ALGORITHMS}
    if layer_type not in table:
        raise ValueError(f"unknown layer type {layer_type!r}; expected 'linear' or 'moe'")
    if algo not in table[layer_type]:
        raise ValueError(
            f"unsupported algorithm ID {algo!r} for {layer_type} layers; supported: {', '.join(table[layer_type])}"
        )
    return algo
