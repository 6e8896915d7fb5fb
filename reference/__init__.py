"""The executable specification of vLLM Ascend / msModelSlim quantization, in NumPy.

Pure NumPy + ml_dtypes (importing it never imports torch). One module per concept:

* :mod:`.rounding` -- round half to even, saturating casts, single-rounding float narrowing,
  vLLM Ascend's load-time rounding of scales to the model dtype.
* :mod:`.packing` -- int4 nibbles in int32 words / int8 bytes, and the ``+8`` pack-quantized form.
* :mod:`.scale_encoding` -- float32 scales stored as int64 bit patterns (``deq_scale``).
* :mod:`.activation_quant` -- static per-tensor and dynamic per-token int8/int4 quantization.
* :mod:`.flatquant` -- the Kronecker transform, its int4 quantization, the offline weight transform.
* :mod:`.integer_gemm` -- the exact int32-accumulating GEMM.
* :mod:`.weight_quant` -- offline weight quantization as msModelSlim writes it.
* :mod:`.linear` -- the linear forward of every algorithm ID from checkpoint tensors.
* :mod:`.moe` -- routing and the per-expert MLP of the MoE algorithm IDs.
* :mod:`.algorithms` -- the algorithm IDs and the layer types each covers.

What is bit-exact and what is bounded is written down in ``docs/numerics.md``.
"""

from .algorithms import LINEAR_ALGORITHMS, MOE_ALGORITHMS
from .linear import EXPECTED_TENSORS, linear_forward, validate_tensors
from .moe import moe_forward, moe_layer_forward, route
from .weight_quant import dequantize, quantize_linear

__all__ = [
    "EXPECTED_TENSORS", "LINEAR_ALGORITHMS", "MOE_ALGORITHMS", "dequantize", "linear_forward",
    "moe_forward", "moe_layer_forward", "quantize_linear", "route", "validate_tensors",
]
