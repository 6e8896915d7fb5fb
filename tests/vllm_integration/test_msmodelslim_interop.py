"""Real msModelSlim 26.1.0 output (CPU), loaded by vLLM through the plugin and compared with the
reference forward of the same directory, exactly as test_e2e_dense.py / test_e2e_moe.py (layer level
and model level, same bounds).

The fixtures (tests/vllm_integration/fixtures/msmodelslim/*, ~0.8 MB each) come from
scripts/make_msmodelslim_fixtures.py (msModelSlim is not run here: minutes per model). They exercise
what our own writer does not produce in exactly msModelSlim's way: smoothing folded into the norms
(iter_smooth / flex_smooth), ``input_offset`` stored float32, int64 ``deq_scale``, the W8A8_MIX
tensor set, ``weight_offset`` zeros, W4A8 experts packed two int4 per byte along N with
``scale_bias`` [N, 1] / [N, 16], and the router left FLOAT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "msmodelslim"
NAMES = ["qwen2_w8a8_dynamic", "qwen2_w8a8", "qwen2_w8a8_mix", "qwen2_w8a16", "qwen3_moe_w4a8"]


#: every fixture in float32; bf16 for one dense and the MoE fixture (keeps the suite short)
CASES = [(name, "float32") for name in NAMES] + [("qwen2_w8a8", "bfloat16"), ("qwen3_moe_w4a8", "bfloat16")]


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    # committed with the repository: a missing fixture is a broken checkout, not a reason to skip
    assert (path / "quant_model_description.json").is_file(), \
        f"{path} missing: regenerate with scripts/make_msmodelslim_fixtures.py"
    return path


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_msmodelslim_output_matches_reference(name, dtype, registered, support, models):
    path = _fixture(name)
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    algos = {v for k, v in json.loads((path / "quant_model_description.json").read_text()).items()
             if k.endswith(".weight") and isinstance(v, str)}
    with support.capture_quantized_io() as cap:
        gens = support.run_vllm(str(path), models.PROMPTS, dtype=dtype)
    checks = support.check_layers(str(path), cap.records, dtype=dtype, model_type=model_type)
    assert {c.algo for c in checks} == algos - {"FLOAT"}
    for c in checks:
        if c.algo == "W8A16":
            assert c.max_ratio <= 1.0, f"{c.prefix}: {c.max_ratio:.3g} x the weight-only bound"
        else:
            assert c.mismatches == 0, f"{c.prefix} ({c.algo}): {c.mismatches}/{c.elements} elements differ"
    result = support.compare_with_reference(str(path), gens, algo=name, dtype=dtype)
    print(result.summary())
    if dtype == "float32":
        support.assert_fp32(result, algos - {"FLOAT"})
    else:
        # dense W8A8: inputs of every quantized layer bit-identical (test_e2e_dense), 1 logit ulp;
        # MoE: vLLM's bf16-precision routing weights (test_e2e_moe.BF16_MOE_BOUND)
        import math

        ulp = 2.0 ** (math.floor(math.log2(result.max_abs_logit)) - 7)
        bound = 1.0 if model_type == "qwen3_moe" else 2 * ulp
        assert result.max_abs_dlogprob <= bound, result.summary()
        assert result.near_ties_only(bound), result.summary()
