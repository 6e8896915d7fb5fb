"""ascend_quant.checkpoint (work in progress)."""
