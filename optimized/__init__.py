"""ascend_quant.optimized (work in progress)."""
