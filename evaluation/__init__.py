"""Measuring quantized checkpoints end to end: what ``ascend-quant demo`` reports.

One module per role: :mod:`.perplexity` (held-out windows and perplexity from per-token
logprobs), :mod:`.vllm_measurement` (one vLLM engine in a child process: prompt logprobs and
decode speed), :mod:`.reference_agreement` (vLLM against the independent reference forward),
:mod:`.results_table` (the table as text, Markdown and JSON), :mod:`.results_chart` (the PNG
chart) and :mod:`.algorithm_comparison` (the whole run: quantize, validate, measure, per
algorithm ID).
"""
