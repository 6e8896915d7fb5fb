"""vLLM with ``quantization="ascend"`` on a tiny dense model, every linear algorithm ID, float32 and
bfloat16, against the independent reference forward (transformers with the NumPy reference in every
quantized layer, ``checkpoint.reference_model``).

The model (tiny_models.py: llama, hidden 128, 2 layers) is quantized by the reference quantizers
into msModelSlim's layout (``checkpoint.quantize_model``), loaded by vLLM through the plugin, and
generates 12 greedy tokens for 3 prompts. Two checks per run:

* layer level: every call of a quantized layer inside the engine (its input, vLLM's output) is
  recomputed by ``reference.linear.linear_forward`` from the checkpoint read from disk
  independently of vLLM's loaders. int8/int4-activation algorithms: bit-identical (0 ulp; the
  optimized kernels run the reference's integer stages and float32 epilogue op by op). W8A16 /
  W4A16: within the elementwise bound of ``optimized/weight_only.py`` (``e2e_support.weight_only_bound``).
* model level: the reference teacher-forces vLLM's tokens; its argmax must equal vLLM's token and
  its logprob must be within the bound below.

Bounds, model level:

* float32 (``e2e_support.assert_fp32``): the integer stages agree bit-exactly and logprobs are
  float32 on both sides; what differs is the float32 operation order of the unquantized ops
  (vLLM's CPU attention, norms, GEMM blocking vs transformers), a few float32 ulps per op, ~1e-6
  on the logprobs (``FP32_MEDIAN_BOUND`` = 1e-4 on the median over all positions). Rarely such a
  difference lands an activation within ~1e-6 (relative) of a quantization rounding boundary and
  one code moves by 1 step (1/127 of the token's max for int8, 1/7 for int4): the layer output
  moves by ``step * w_q[:, k] * s_w`` and the rest of the sequence inherits it through the KV
  cache. We measured one such flip in ~30 float32 runs x 36 positions (real msModelSlim
  W8A8_DYNAMIC fixture, prompt 0, tokens 10-11: 7e-3 then 2.5e-2). The max bound allows a few
  flips of that size: 0.1 with int8 activations, 1.0 with int4 ones (18x larger steps), 5e-3 for
  weight-only models (no activation quantization, nothing to flip). A wrong scale, offset sign or
  shard order moves every position by >= 1 and fails the median bound first.
* bfloat16: ``checkpoint.reference_model`` rounds the unquantized ops where vLLM's CPU kernels do
  (float32 RoPE and attention, fused residual-add + RMSNorm; with transformers' own rounding the
  inputs of the quantized layers already differ by 1 bf16 ulp after the first attention and the
  int4 paths drift by > 1 logprob). The inputs of every quantized layer are then bit-identical,
  so what remains is the float lm_head GEMM (summation order; one bf16 rounding of a logit may
  differ: 1 ulp = 2^-8 * 2^floor(log2|logit|)) and, for W8A16 / W4A16, their in-bound float
  differences (a few bf16 ulps per layer output, no activation quantization to amplify them).
  Bound: ``BF16_ULPS`` ulps of the largest logit, times 2 (log-softmax). Observed: 0 for every
  int8/int4-activation algorithm, <= 0.09 for the weight-only ones (logits up to ~25).
  Token mismatches are allowed only as near-ties (the reference's preference <= 2 * bound).
"""

from __future__ import annotations

import math

import pytest

from ascend_quant.reference.algorithms import LINEAR_ALGORITHMS, W4A16, W8A16

BF16_ULPS = {"exact": 1, "weight-only": 2}


def bf16_bound(algo: str, max_abs_logit: float) -> float:
    ulp = 2.0 ** (math.floor(math.log2(max(max_abs_logit, 1e-30))) - 7)
    return 2 * BF16_ULPS["weight-only" if algo in (W8A16, W4A16) else "exact"] * ulp


def check_layers(support, model_dir, cap, dtype, arch):
    checks = support.check_layers(model_dir, cap.records, dtype=dtype, model_type=arch)
    assert checks, "no quantized layer ran"
    for c in checks:
        if c.algo in (W8A16, W4A16):
            assert c.max_ratio <= 1.0, f"{c.prefix} ({c.algo}): |dy| reaches {c.max_ratio:.3g} x the weight-only bound"
        else:
            assert c.mismatches == 0, (f"{c.prefix} ({c.algo}): {c.mismatches}/{c.elements} elements differ from the "
                                       f"reference (max |dy| {c.max_abs:.3g}); expected bit-identical")
    return checks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("algo", LINEAR_ALGORITHMS)
def test_dense_matches_reference(algo, dtype, registered, quantized_model, support, models, record_property):
    model_dir = quantized_model("llama", algo)
    with support.capture_quantized_io() as cap:
        gens = support.run_vllm(model_dir, models.PROMPTS, dtype=dtype)
    check_layers(support, model_dir, cap, dtype, "llama")
    result = support.compare_with_reference(model_dir, gens, algo=algo, dtype=dtype)
    record_property("max_abs_dlogprob", result.max_abs_dlogprob)
    print(result.summary())
    assert result.positions == len(models.PROMPTS) * support.MAX_TOKENS
    if dtype == "float32":
        support.assert_fp32(result, [algo])
    else:
        bound = bf16_bound(algo, result.max_abs_logit)
        assert result.max_abs_dlogprob <= bound, f"bound {bound:.3g}: " + result.summary()
        assert result.near_ties_only(bound), f"bound {bound:.3g}: " + result.summary()


def test_qwen2_biases_and_quantized_lm_head(registered, quantized_model, support, models):
    """qwen2 (q/k/v biases) with W8A8 everywhere (the float bias is folded into quant_bias and must
    not be added again) and a W8A8_DYNAMIC lm_head (vLLM pads the vocabulary of ParallelLMHead)."""
    model_dir = quantized_model("qwen2", "W8A8", overrides=(("lm_head", "W8A8_DYNAMIC"),))
    with support.capture_quantized_io() as cap:
        gens = support.run_vllm(model_dir, models.PROMPTS, dtype="float32")
    checks = check_layers(support, model_dir, cap, "float32", "qwen2")
    assert "lm_head" in {c.prefix for c in checks}
    result = support.compare_with_reference(model_dir, gens, algo="W8A8+lm_head", dtype="float32")
    print(result.summary())
    support.assert_fp32(result, ["W8A8", "W8A8_DYNAMIC"])


def test_fused_shards_with_different_flatquant_factors_are_rejected_at_load(registered, quantized_model, support,
                                                                           models):
    """q/k/v (and gate/up) with their own FlatQuant factors, which msModelSlim never writes: vLLM
    Ascend loads one factor pair per fused layer (the last shard's) and would compute a silently
    wrong answer, so the load-time validator refuses the checkpoint, naming the shards."""
    from ascend_quant.vllm_integration.config import find_checkpoint_error

    model_dir = quantized_model("llama", "W4A4_FLATQUANT_DYNAMIC", flatquant_shared=False)
    with pytest.raises(Exception) as ei:
        support.run_vllm(model_dir, models.PROMPTS, dtype="float32")
    err = find_checkpoint_error(ei.value)
    assert err is not None, f"expected the project's CheckpointError, got {type(ei.value).__name__}: {ei.value}"
    assert "k_proj.left_trans: differs from model.layers.0.self_attn.q_proj.left_trans" in str(err)
    assert "share one left_trans" in str(err)
