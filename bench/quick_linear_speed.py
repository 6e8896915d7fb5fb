"""Quick speed check (not a pytest test): each optimized linear vs bf16 ``F.linear``.

    python bench/quick_linear_speed.py [--k 4096] [--n 4096] [--m 1 256] [--runs 9] [--layers 4]

Model dtype bf16, K = N = 4096 by default; checkpoint tensors from the reference
quantizers. Everything runs in one process, interleaved (baseline, then each kernel, per
round), and the median over rounds is reported. Two regimes:

* ``hot``: the same layer every call (its int8 weight, 16 MiB, can stay in a 32 MiB L3;
  the bf16 weight, 32 MiB, cannot), which flatters the quantized kernels at small M;
* ``cold``: ``--layers`` distinct copies called in rotation (>= 64 MiB of weights), closer
  to a model's decode step.

Prints one table row per algorithm and M: kernel chosen, ms, and speed-up over bf16.
On a machine shared with other busy processes, wall-clock times mostly measure the
scheduler; ``--threads 1 --clock cpu`` measures the CPU time our calls consume instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ascend_quant.optimized import prepare_linear
from ascend_quant.reference import weight_quant as wq
from ascend_quant.reference.algorithms import LINEAR_ALGORITHMS
from ascend_quant.reference.flatquant import decompose_dim


def checkpoint(algo: str, w: np.ndarray, rng: np.random.Generator) -> tuple[dict, dict]:
    n, k = w.shape
    if algo == "W8A16":
        return wq.quantize_w8a16(w), {}
    if algo == "W4A16":
        return wq.quantize_w4a16(w, group_size=128), {"group_size": 128}
    if algo in ("W8A8", "W8A8_MIX"):
        fn = wq.quantize_w8a8_static if algo == "W8A8" else wq.quantize_w8a8_mix
        return fn(w, np.float32(0.03), np.float32(0), bias=np.zeros(n, np.float32)), {}
    if algo == "W4A4_FLATQUANT_DYNAMIC":
        left_n, right_n = decompose_dim(k)
        lt = np.eye(left_n, dtype=np.float32) + 0.05 * rng.standard_normal((left_n, left_n)).astype(np.float32)
        rt = np.eye(right_n, dtype=np.float32) + 0.05 * rng.standard_normal((right_n, right_n)).astype(np.float32)
        return wq.quantize_w4a4_flatquant(w, lt, rt, 0.95), {}
    return wq.quantize_linear(algo, w), {}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = time.perf_counter


def timed(fn, x) -> float:
    t = CLOCK()
    fn(x)
    return CLOCK() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--layers", type=int, default=4, help="distinct copies for the cold regime")
    ap.add_argument("--algos", nargs="+", default=list(LINEAR_ALGORITHMS))
    ap.add_argument("--kernels", nargs="*", default=[], help="extra ALGO:KERNEL rows (forced kernels)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (robust on a shared, loaded machine: "
                         "other processes' time is not counted; with N threads it sums their CPU time)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    k, n = args.k, args.n
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, K={k} N={n}, "
          f"bf16 model dtype, median of {args.runs} rounds; load average {os.getloadavg()[0]:.2f}")
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    wb = [torch.from_numpy(w).to(torch.bfloat16) + 0 for _ in range(args.layers)]
    rows = [(a, None) for a in args.algos] + [tuple(s.split(":")) for s in args.kernels]
    prepared = {}
    for algo, kern in rows:
        t, opts = checkpoint(algo, w, rng)
        layers = [prepare_linear(algo, t, dtype="bfloat16", kernel=kern, **opts) for _ in range(args.layers)]
        prepared[(algo, kern)] = layers
        print(f"prepared {algo}{'' if kern is None else ' [' + kern + ']'}: {layers[0].explain().splitlines()[0]}; "
              f"resident {layers[0].resident_bytes() / 2**20:.1f} MiB (bf16 weight {n * k * 2 / 2**20:.0f} MiB)")
    vllm_bf16 = None
    try:
        import vllm._custom_ops as ops
        handlers = [ops.create_onednn_mm(x.t(), 32) for x in wb]
        vllm_bf16 = lambda i, x: ops.onednn_mm(handlers[i], x, None)  # noqa: E731
    except Exception as e:  # noqa: BLE001
        print(f"(vLLM bf16 onednn_mm unavailable: {type(e).__name__})")

    print()
    print(f"{'algorithm':<34} {'M':>4} {'regime':<5} {'kernel':<14} {'ms':>8} {'bf16 ms':>8} {'speed-up':>8}"
          + ("  vLLM-bf16 ms" if vllm_bf16 else ""))
    for m in args.m:
        x = torch.randn(m, k).to(torch.bfloat16)
        for regime in ("hot", "cold"):
            idx = [0] * args.runs * args.layers if regime == "hot" else list(range(args.layers)) * args.runs
            base, vb = [], []
            times = {key: [] for key in prepared}
            for key, layers in prepared.items():  # warm-up (primitive creation, caches)
                layers[0](x), layers[-1](x)
            F.linear(x, wb[0])
            for rnd in range(args.runs):
                sel = idx[rnd * args.layers:(rnd + 1) * args.layers] if regime == "cold" else [0]
                for i in sel:
                    base.append(timed(lambda v: F.linear(v, wb[i]), x))
                    if vllm_bf16:
                        vb.append(timed(lambda v: vllm_bf16(i, v), x))
                    for key, layers in prepared.items():
                        times[key].append(timed(layers[i], x))
            b = statistics.median(base) * 1e3
            for (algo, kern), ts in times.items():
                p = prepared[(algo, kern)][0]
                name = p.kernel
                if name == "auto":
                    name = "auto:" + p.state["kernel_for_m"](m)
                ms = statistics.median(ts) * 1e3
                label = algo if kern is None else f"{algo} [{kern}]"
                extra = f"  {statistics.median(vb) * 1e3:12.2f}" if vllm_bf16 else ""
                print(f"{label:<34} {m:>4} {regime:<5} {name:<14} {ms:8.2f} {b:8.2f} {b / ms:7.2f}x{extra}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
