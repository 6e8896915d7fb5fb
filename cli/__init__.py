"""Command-line interface (ascend_quant.cli)."""
