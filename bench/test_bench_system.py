"""Machine limits measured in the same run: streaming read bandwidth.

The M=1 linear is a weight-streaming GEMV, so its ceiling is ``weight_bytes / read
bandwidth``; bench/report.py divides by the best of these rows. A 1 GiB tensor (32x the
L3 cache) is reduced with vectorized ops. Not ``int8_tensor.sum()``: that widens every byte
to int64 one at a time and measured 0.1 GB/s here, a compute limit, not a memory one.
"""

from __future__ import annotations

import pytest
import torch

import benchlib as bl

NBYTES = 2**30

READS = {
    "int64-sum": lambda a: a.view(torch.int64).sum(),
    "f32-amax": lambda a: a.view(torch.float32).amax(),   # 0x01010101: a normal float32
}


@pytest.fixture(scope="module")
def big() -> torch.Tensor:
    return torch.ones(NBYTES, dtype=torch.int8)


@pytest.mark.parametrize("method", list(READS))
def test_bench_stream_read(benchmark, big: torch.Tensor, method: str):
    benchmark.group = "system"
    fn = READS[method]
    meas = bl.measure(benchmark, lambda: fn(big), {}, m=1, cand_name=f"stream-{method}", required=(),
                      rounds=min(bl.settings.rounds, 7))
    t = meas.median()
    benchmark.extra_info.update(kind="stream", label=method, bytes=NBYTES, ms=t * 1e3, gbs=NBYTES / t / 1e9,
                                best_gbs=NBYTES / min(meas.candidate) / 1e9, rounds=meas.rounds,
                                iqr_rel=meas.iqr_rel(), load_before=meas.load_before, load_after=meas.load_after)
