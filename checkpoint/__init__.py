"""msModelSlim-layout checkpoints (ascend_quant.checkpoint): the description file, reading and
writing quantized model directories, and quantizing a float model with the reference quantizers.

Modules: ``description`` (``quant_model_description.json``: load, validate, per-layer algorithm
lookup including fused modules), ``io`` (safetensors shards + index + description, read back
read-only), ``quantize_model`` (float HF model dir -> quantized dir). ``description`` and ``io``
need only NumPy and ml_dtypes; ``quantize_model`` imports torch/transformers only to collect
calibration activations.
"""
