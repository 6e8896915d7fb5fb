"""ascend_quant.vllm_integration (work in progress)."""
