"""The NumPy reference path (``reference.linear.linear_forward``), small sizes only.

The reference is the executable spec (float64 / exact integer sums in NumPy), not a fast
path: these rows show how far it is from bf16 ``F.linear`` and from the optimized kernels
(``ratio_bf16`` and ``ratio_optimized`` are far below 1). M = 1, K = N = 1024.
"""

from __future__ import annotations

import ml_dtypes
import pytest
import torch
import torch.nn.functional as F

import benchlib as bl

N = K = 1024
M = 1


@pytest.mark.parametrize("algo", bl.ALGOS)
def test_bench_reference(benchmark, algo: str):
    from ascend_quant.reference.linear import linear_forward

    benchmark.group = f"reference numpy n{N} k{K} M={M}"
    w = bl.float_weight(N, K)
    algo, tensors, opts = bl.checkpoint(algo, w)
    p = bl.prepare_copies(algo, tensors, 1, **opts)[0]
    x = bl.activations(M, K)
    x_np = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    wb = torch.from_numpy(w).bfloat16()
    ref_opts = {k: v for k, v in opts.items() if k == "group_size"}
    meas = bl.measure(benchmark, lambda: linear_forward(algo, x_np, tensors, dtype="bfloat16", **ref_opts),
                      {"bf16": lambda: F.linear(x, wb), "optimized": lambda: p(x)}, m=M,
                      cand_name=f"reference-{algo}", rounds=min(bl.settings.rounds, 7))
    t = meas.median()
    benchmark.extra_info.update(
        kind="reference", label=algo, algo=algo, m=M, n=N, k=K, ms=t * 1e3, bf16_ms=meas.median("bf16") * 1e3,
        ratio_bf16=meas.ratio("bf16"), optimized_ms=meas.median("optimized") * 1e3,
        ratio_optimized=meas.ratio("optimized"), rounds=meas.rounds, iqr_rel=meas.iqr_rel(),
        load_before=meas.load_before, load_after=meas.load_after)
