"""``ascend-quant walkthrough``: every algorithm of the NumPy reference, end to end, on one layer.

For each algorithm ID: quantize a seeded random float weight into msModelSlim's checkpoint
tensors, run the reference linear forward on seeded activations, and report the checkpoint
bytes against bf16 and the error against the float product (SQNR in dB). Then the same for
a small MoE layer with each MoE algorithm ID. Pure NumPy: no torch, no vLLM.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((reference - approx) ** 2))
    signal = float(np.sum(reference ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def _linear_options(algo: str, x: np.ndarray, k: int, rng: np.random.Generator, group_size: int) -> dict:
    from ascend_quant.reference import flatquant, weight_quant

    if algo in ("W8A8", "W8A8_MIX"):
        scale, offset = weight_quant.calibrate_input_scale_offset(x)
        return {"input_scale": scale, "input_offset": offset, "deq_scale_dtype": "float32"}
    if algo == "W4A4_FLATQUANT_DYNAMIC":
        left, right = flatquant.decompose_dim(k)
        # a well-conditioned transform: identity plus a small random perturbation
        lt = np.eye(left) + 0.05 * rng.standard_normal((left, left))
        rt = np.eye(right) + 0.05 * rng.standard_normal((right, right))
        return {"left_trans": lt.astype(np.float32), "right_trans": rt.astype(np.float32),
                "clip_ratio": np.float32(1.0)}
    if algo in ("W4A16",):
        return {"group_size": group_size}
    if algo == "W4A8_DYNAMIC":
        return {"group_size": 0}
    return {}


def linear_rows(m: int, k: int, n: int, dtype: str, seed: int, group_size: int) -> list[dict]:
    from ascend_quant.reference import LINEAR_ALGORITHMS, linear_forward, quantize_linear
    from ascend_quant.reference.rounding import round_to_dtype

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    bias = round_to_dtype(0.1 * rng.standard_normal(n).astype(np.float32), dtype)
    x = round_to_dtype(rng.standard_normal((m, k)).astype(np.float32), dtype)
    y_float = x.astype(np.float64) @ w.astype(np.float64).T + bias.astype(np.float64)
    rows = []
    for algo in LINEAR_ALGORITHMS:
        opts = _linear_options(algo, x, k, rng, group_size)
        quant_opts = {key: v for key, v in opts.items() if key not in ("left_trans", "right_trans", "clip_ratio")}
        if algo == "W4A4_FLATQUANT_DYNAMIC":
            tensors = quantize_linear(algo, w, left_trans=opts["left_trans"], right_trans=opts["right_trans"],
                                      clip_ratio=opts["clip_ratio"])
        elif algo in ("W8A8", "W8A8_MIX"):
            tensors = quantize_linear(algo, w, bias=bias.astype(np.float32), **quant_opts)
        else:
            tensors = quantize_linear(algo, w, **quant_opts)
        t0 = time.perf_counter()
        fwd_kwargs = {} if algo == "W8A8" else {"bias": bias}
        if algo == "W4A16":
            fwd_kwargs["group_size"] = group_size
        y = linear_forward(algo, x, tensors, dtype=dtype, **fwd_kwargs)
        elapsed = time.perf_counter() - t0
        nbytes = sum(np.asarray(t).nbytes for t in tensors.values())
        rows.append({
            "algorithm": algo,
            "checkpoint bytes": nbytes,
            "vs bf16": nbytes / (n * k * 2),
            "SQNR dB": _sqnr_db(y_float, y.astype(np.float64)),
            "max |err|": float(np.max(np.abs(y.astype(np.float64) - y_float))),
            "ms": elapsed * 1e3,
        })
    return rows


def moe_rows(tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: str, seed: int) -> list[dict]:
    from ascend_quant.reference import MOE_ALGORITHMS, moe_layer_forward, quantize_linear
    from ascend_quant.reference.moe import swiglu
    from ascend_quant.reference.rounding import round_to_dtype

    rng = np.random.default_rng(seed)
    x = round_to_dtype(rng.standard_normal((tokens, hidden)).astype(np.float32), dtype)
    logits = rng.standard_normal((tokens, experts)).astype(np.float32)
    floats = [{p: (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
               for p, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter)))} for _ in range(experts)]
    from ascend_quant.reference import route
    weights, ids = route(logits, top_k)
    y_float = np.zeros((tokens, hidden))
    xf = x.astype(np.float64)
    for t in range(tokens):
        for j in range(top_k):
            e = floats[ids[t, j]]
            h = np.concatenate([xf[t] @ e["gate_proj"].T.astype(np.float64), xf[t] @ e["up_proj"].T.astype(np.float64)])
            a = swiglu(h[None, :], "float32").astype(np.float64)[0]
            y_float[t] += weights[t, j] * (a @ e["down_proj"].T.astype(np.float64))
    rows = []
    for algo in MOE_ALGORITHMS:
        opts = {"group_size": 32} if algo == "W4A16" else {}
        if algo == "W8A8_MIX":
            scale, offset = np.array([0.05], np.float32), np.array([0.0], np.float32)
            opts = {"input_scale": scale, "input_offset": offset}
        experts_q = []
        for e in floats:
            per = {}
            for proj, w in e.items():
                extra = {"row_parallel": proj == "down_proj"} if algo == "W4A8_DYNAMIC" else {}
                per[proj] = quantize_linear(algo, w, **opts, **extra)
            experts_q.append(per)
        t0 = time.perf_counter()
        y = moe_layer_forward(algo, x, logits, experts_q, top_k, dtype=dtype)
        elapsed = time.perf_counter() - t0
        nbytes = sum(np.asarray(t).nbytes for e in experts_q for p in e.values() for t in p.values())
        rows.append({
            "algorithm": algo,
            "checkpoint bytes": nbytes,
            "vs bf16": nbytes / (experts * 3 * hidden * inter * 2),
            "SQNR dB": _sqnr_db(y_float, y.astype(np.float64)),
            "max |err|": float(np.max(np.abs(y.astype(np.float64) - y_float))),
            "ms": elapsed * 1e3,
        })
    return rows


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'algorithm':<24} {'bytes':>10} {'vs bf16':>8} {'SQNR dB':>8} {'max |err|':>10} {'ms':>8}")
    for r in rows:
        print(f"{r['algorithm']:<24} {r['checkpoint bytes']:>10d} {r['vs bf16']:>8.3f} {r['SQNR dB']:>8.1f} "
              f"{r['max |err|']:>10.4f} {r['ms']:>8.1f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--m", type=int, default=16, help="tokens (rows of x), default 16")
    parser.add_argument("--k", type=int, default=512, help="input features, default 512")
    parser.add_argument("--n", type=int, default=256, help="output features, default 256")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--group-size", type=int, default=128, help="W4A16 group size, default 128")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print("ascend-quant reference walkthrough (NumPy only): quantize one layer with every algorithm ID,")
    print(f"run the reference forward, compare with the float product. dtype={args.dtype}, seed={args.seed}")
    _print_table(f"Linear  M={args.m} K={args.k} N={args.n}",
                 linear_rows(args.m, args.k, args.n, args.dtype, args.seed, args.group_size))
    _print_table("MoE  tokens=8 hidden=128 intermediate=64 experts=8 top_k=2",
                 moe_rows(8, 128, 64, 8, 2, args.dtype, args.seed))
    print("\nbytes: checkpoint tensors as msModelSlim writes them (W4A4 stores one int4 per byte on disk).")
    return 0
