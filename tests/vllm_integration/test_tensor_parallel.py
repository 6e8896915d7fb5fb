"""Tensor parallel 2 (two worker processes, gloo): W8A8_DYNAMIC on the dense model, W4A8_DYNAMIC
on the MoE model, float32, against the reference with vLLM's sharding emulated
(``load_reference_model(tp_size=2)``: row-parallel o_proj/down_proj and the experts' intermediate
dim run per rank on their slice, partial outputs summed like the all-reduce).

Per-token activation quantization of a row-parallel layer sees only its rank's half of the row,
so TP=2 is a different (equally valid) computation than TP=1; the emulation reproduces it, and the
bounds are the float32 ones of test_e2e_dense.py (``e2e_support.assert_fp32``: integer stages
bit-exact, only float op order differs; the two-term all-reduce is one float32 add on both sides).
Observed: see the printed summaries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("tp_runner.py")


def _run_tp(model_dir, env, support, models, tmp_path, tp=2):
    out = tmp_path / "gens.json"
    env = dict(env)
    env.update(support.VLLM_TEST_ENV)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    cmd = [sys.executable, str(RUNNER), model_dir, "float32", str(tp), str(out), json.dumps(models.PROMPTS),
           str(support.MAX_TOKENS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return support.generations_from_json(json.loads(out.read_text()))


@pytest.mark.parametrize("arch,algo", [("llama", "W8A8_DYNAMIC"), ("qwen3_moe", "W4A8_DYNAMIC")])
def test_tp2_matches_sharded_reference(arch, algo, quantized_model, plugin_entry_point, support, models, tmp_path,
                                       record_property):
    model_dir = quantized_model(arch, algo)
    gens = _run_tp(model_dir, plugin_entry_point, support, models, tmp_path)
    result = support.compare_with_reference(model_dir, gens, algo=f"{algo} TP2", dtype="float32", tp_size=2)
    record_property("max_abs_dlogprob", result.max_abs_dlogprob)
    print(result.summary())
    assert result.positions == len(models.PROMPTS) * support.MAX_TOKENS
    support.assert_fp32(result, [algo])
