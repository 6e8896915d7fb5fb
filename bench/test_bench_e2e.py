"""End to end: vLLM offline decode tokens/s, quantized (``quantization="ascend"``) vs bf16.

The issue's mid-size random models (bench/e2e_models.py: hidden 2048, 8 layers, dense Llama
and 8-expert top-2 Qwen3-MoE) with W8A8_DYNAMIC and W4A8_DYNAMIC, batch 1 and 16, target
>= 1.5x the same model in bf16. Each test runs ``bench/e2e_decode.py`` in a child process
(``prepare``: build / quantize, cached across runs; then ``measure``: both engines in that one
child, interleaved round by round, decode separated from prefill by differencing two lengths).
A child per test keeps vLLM's engines, its thread binding and its memory out of this pytest
process and frees everything between tests (peak ~3 GB RSS for ``moe``).

pytest-benchmark's own statistics of a row are the child's wall time (one round); the numbers
are in ``extra_info`` (kind ``e2e``), which bench/report.py turns into results/e2e.md.

Knobs: ``AQ_E2E_ARCHS`` (default ``dense,moe``; ``dense`` with ``AQ_BENCH_SCOPE=quick``),
``AQ_E2E_ROUNDS`` (3), ``AQ_E2E_TOKENS`` (64 decode tokens), ``AQ_E2E_CACHE`` (model cache),
``AQ_E2E_PROFILE=1`` (adds the top operators of each engine to the row).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import benchlib as bl
import e2e_decode

SCRIPT = Path(e2e_decode.__file__).resolve()
ARCHS = tuple(a for a in os.environ.get("AQ_E2E_ARCHS", "dense,moe" if bl.SCOPE == "full" else "dense").split(",") if a)
PREPARE_TIMEOUT_S = 1800
MEASURE_TIMEOUT_S = 3600


def _child(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Run e2e_decode.py; its stderr (progress lines ``[e2e] ...``, vLLM's warnings) goes to this
    process's stderr: live with ``pytest -s``, else in pytest's captured output of the test."""
    cmd = [sys.executable, "-P", str(SCRIPT), *args]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[2:])} failed with exit status {p.returncode} (its stderr is above)")
    return p


@pytest.mark.parametrize("algo", e2e_decode.ALGOS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bench_e2e_decode(benchmark, arch: str, algo: str, tmp_path: Path):
    benchmark.group = "e2e"
    try:
        import vllm  # noqa: F401, PLC0415
    except Exception as e:  # vLLM optional
        bl.record_skip(f"vLLM not importable ({type(e).__name__}: {str(e)[:100]})", kind="e2e", arch=arch, label=algo)
    _child(["prepare", "--arch", arch, "--algo", algo], PREPARE_TIMEOUT_S)
    out = tmp_path / "e2e.json"
    args = ["measure", "--arch", arch, "--algo", algo, "--json", str(out)]
    if os.environ.get("AQ_E2E_PROFILE") == "1":
        args.append("--profile")
    done: list[subprocess.CompletedProcess] = []
    benchmark.pedantic(lambda: done.append(_child(args, MEASURE_TIMEOUT_S)), rounds=1, iterations=1,
                       warmup_rounds=0)
    res = json.loads(out.read_text())
    benchmark.extra_info.update(res)
    print("\n" + done[0].stdout.strip())
    for row in res["rows"]:
        assert row["tok_s"] > 0 and row["bf16_tok_s"] > 0, row
