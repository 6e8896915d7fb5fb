"""vLLM offline decode throughput: a quantized model (``quantization="ascend"``) vs the same model in bf16.

    .venv/bin/python -P bench/e2e_decode.py prepare --arch dense --algo W8A8_DYNAMIC
    .venv/bin/python -P bench/e2e_decode.py measure --arch dense --algo W8A8_DYNAMIC [--json OUT]
    .venv/bin/python -P bench/e2e_decode.py measure --arch moe --algo W4A8_DYNAMIC --profile

``prepare`` builds / quantizes the model of bench/e2e_models.py (cached). ``measure`` runs in
one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine lives in this process, so vLLM's
thread binding, the profiler and ``apply_model`` all see the model) two vLLM engines side by
side, the bf16 model and the quantized one, and interleaves them round by round (ABBA order),
as bench/benchlib.py does for kernels: load from other processes hits both alike, and the
speed-up is a ratio of medians over rounds.

Decode throughput, prefill separated: per batch size ``B`` and round, ``generate`` is timed with
``max_tokens = S`` and ``S + N`` (``ignore_eos``, greedy, ``B`` fixed distinct prompts, prefix
caching off); both include the same prefill and the same ``S - 1`` first decode steps, so

    decode tokens/s = B * N / (t(S + N) - t(S)).

Defaults: ``S = 8``, ``N = 64`` (``AQ_E2E_TOKENS``), 3 rounds (``AQ_E2E_ROUNDS``) after one
untimed warm-up of each generate (oneDNN primitives for each M, first touch), torch threads
``AQ_BENCH_THREADS`` (2, the cores; 1 on a loaded machine, as for the kernel benchmarks).
Engines run eager (``enforce_eager``: the same Python path for both; ``--compile`` gives vLLM's
default torch.compile). Every generated sequence is checked to have exactly ``max_tokens`` tokens.

Also reported: resident weight bytes after loading (our prepared layers'
``resident_bytes()`` plus every remaining parameter; bf16: the parameters), split into the
decoder's linear/MoE layers and the rest, and the weight bytes one decode step reads at
``B = 1`` (MoE: the top-k of the experts), from which the achieved GB/s of a step follows.

``--profile``: torch.profiler over one batch-1 and one batch-16 ``generate`` of each engine;
prints the top operators by self CPU time (what dominates a step when the speed-up is missed).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e_models  # noqa: E402

ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
#: The issue's end-to-end target: quantized decode tokens/s >= 1.5x bf16, batch 1 and 16.
TARGET_RATIO = 1.5
ALGOS = ("W8A8_DYNAMIC", "W4A8_DYNAMIC")
BATCHES = (1, 16)
SHORT = 8
KV_CACHE_BYTES = 256 * 2**20     # batch 16 x 128 tokens x 8 layers x K+V x 4 x 64 x bf16 = 67 MB

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "vLLM Ascend quantizes weights and activations to int8 and int4.",
    "msModelSlim writes a quant model description next to the safetensors shards.",
    "A tiny model with random weights still produces deterministic greedy tokens.",
    "Per-token dynamic quantization scales each row by its maximum absolute value.",
    "Static quantization uses a calibrated input scale and an integer offset.",
    "Mixture of experts layers route every token to the top two experts.",
    "Hello world! 0123456789 + - * / = ( ) [ ] { } < > , . ; : ? ' \"",
]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def prompts_for(batch: int) -> list[str]:
    """``batch`` distinct prompts (distinct so that no two sequences share KV blocks)."""
    return [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(batch)]


# --------------------------------------------------------------------------------------
# resident bytes
# --------------------------------------------------------------------------------------


def weight_bytes(model, spec: e2e_models.ModelSpec) -> dict:
    """Bytes held by the loaded model's weights: ``layers`` = the decoder's linear and MoE
    expert layers (what quantization changes; routers stay float), ``experts`` = the MoE part
    of it, ``other`` = embeddings, norms, routers, lm_head, rotary caches; ``step_b1`` = weight
    bytes one decode step reads at batch 1 (MoE: top_k/E of the experts).

    vLLM-CPU's unquantized linear moves its bf16 weight into a oneDNN handler and leaves an
    empty parameter: such a layer counts ``in x out`` elements of its dtype (what the handler
    holds, packed)."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    from ascend_quant.vllm_integration.linear_method import AscendEmbeddingMethod, AscendLinearMethod
    from ascend_quant.vllm_integration.moe_method import AscendFusedMoEMethod

    seen: set[int] = set()

    def tensor_bytes(ts) -> int:
        total = 0
        for t in ts:
            if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    layers = experts = other = 0
    for name, mod in model.named_modules():
        own = tensor_bytes(list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)))
        method = getattr(mod, "quant_method", None)
        if isinstance(method, AscendLinearMethod):
            own += method.resident_bytes()
        elif isinstance(method, AscendEmbeddingMethod):
            own += method.linear_method.resident_bytes()
        elif isinstance(method, AscendFusedMoEMethod):
            own += method.prepared.resident_bytes()
        elif isinstance(mod, LinearBase) and getattr(mod, "weight", None) is not None and mod.weight.numel() == 0:
            k = getattr(mod, "input_size_per_partition", None) or mod.input_size
            n = getattr(mod, "output_size_per_partition", None) or mod.output_size
            own += k * n * mod.weight.element_size()
        is_expert = ".experts" in name           # vLLM 0.32: <layer>.mlp.experts.routed_experts
        is_layer = ".layers." in name and not name.endswith(".mlp.gate") and (isinstance(mod, LinearBase) or is_expert)
        if is_layer and is_expert:
            experts += own
        elif is_layer:
            layers += own
        else:
            other += own
    frac = spec.top_k / spec.experts if spec.experts else 1.0
    return {"layers": layers + experts, "experts": experts, "other": other, "total": layers + experts + other,
            "step_b1": int(layers + experts * frac + other)}


def kernels(model) -> dict:
    """The kernel each kind of prepared layer runs (first of each projection kind)."""
    from ascend_quant.vllm_integration.linear_method import AscendLinearMethod
    from ascend_quant.vllm_integration.moe_method import AscendFusedMoEMethod

    out = {}
    for name, mod in model.named_modules():
        method = getattr(mod, "quant_method", None)
        kind = name.rsplit(".", 1)[-1]
        if kind in out:
            continue
        if isinstance(method, AscendLinearMethod):
            p = method.prepared[0]
            out[kind] = f"{p.backend}:{p.kernel}"
        elif isinstance(method, AscendFusedMoEMethod):
            out[kind] = f"{method.prepared.backend}:{method.prepared.kernel}"
    return out


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


class Engine:
    def __init__(self, label: str, model_dir: Path, spec: e2e_models.ModelSpec, *, quantized: bool,
                 max_batch: int, max_len: int, compile_: bool):
        from vllm import LLM

        kw = dict(dtype="bfloat16", enforce_eager=not compile_, max_model_len=max_len, max_num_seqs=max_batch,
                  seed=0, kv_cache_memory_bytes=KV_CACHE_BYTES, enable_prefix_caching=False,
                  disable_log_stats=True)
        if quantized:
            kw["quantization"] = "ascend"
        t0 = time.perf_counter()
        self.label, self.llm = label, LLM(model=str(model_dir), **kw)
        self.build_s = time.perf_counter() - t0
        self.bytes = self.llm.apply_model(lambda m: weight_bytes(m, spec))[0]
        self.kernels = self.llm.apply_model(kernels)[0] if quantized else {}

    def generate(self, batch: int, max_tokens: int) -> float:
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts_for(batch), sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [max_tokens] * batch:
            raise RuntimeError(f"{self.label}: expected {batch} x {max_tokens} tokens, got {got}")
        return dt


def measure(arch: str, algo: str, *, batches=BATCHES, rounds: int, new_tokens: int, compile_: bool,
            threads: int | None = None, profile: bool = False, log=print) -> dict:
    import torch

    from ascend_quant.vllm_integration import register

    if threads:
        # in-process engines use this process's intra-op pool (vLLM's OpenMP binding applies to the
        # worker processes it spawns); vLLM's CPU worker disables torch.set_num_threads once it starts
        torch.set_num_threads(threads)
    register()   # the entry point does it too; explicit so a stale install cannot skip it
    spec = e2e_models.SPECS[arch]
    dirs = {"bf16": e2e_models.float_model(spec), algo: e2e_models.quantized_model(spec, algo)}
    max_len = 64 + SHORT + new_tokens
    load0 = loadavg()
    engines = {}
    for label, d in dirs.items():
        engines[label] = Engine(label, d, spec, quantized=label != "bf16", max_batch=max(batches), max_len=max_len,
                                compile_=compile_)
        e = engines[label]
        log(f"[e2e] {arch} {label}: engine built in {e.build_s:.1f} s; weights {e.bytes['total'] / 2**20:.0f} MiB "
            f"(decoder layers {e.bytes['layers'] / 2**20:.0f} MiB); kernels {e.kernels or 'vLLM bf16'}")
    threads = torch.get_num_threads()
    for e in engines.values():                      # warm-up: every (batch, length) once
        for b in batches:
            for n in (SHORT, SHORT + new_tokens):
                e.generate(b, n)
    per_round: dict[tuple[str, int], list[float]] = {(lab, b): [] for lab in engines for b in batches}
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for lab in order:
            for b in batches:
                t_short = engines[lab].generate(b, SHORT)
                t_long = engines[lab].generate(b, SHORT + new_tokens)
                # a longer generate that is not slower (a tiny model under load) gives no rate: NaN
                per_round[(lab, b)].append(b * new_tokens / (t_long - t_short) if t_long > t_short else math.nan)
        log(f"[e2e] round {r + 1}/{rounds}: " + ", ".join(
            f"{lab} B={b} {per_round[(lab, b)][-1]:.1f} tok/s" for lab in engines for b in batches))
    load1 = loadavg()
    rows = []
    for b in batches:
        q = [v for v in per_round[(algo, b)] if math.isfinite(v)]
        f = [v for v in per_round[("bf16", b)] if math.isfinite(v)]
        if not q or not f:
            raise RuntimeError(f"{arch} B={b}: no round where {SHORT + new_tokens} tokens took longer than {SHORT} "
                               "(decode too short to time: raise --new-tokens)")
        qm, fm = statistics.median(q), statistics.median(f)
        rows.append({
            "batch": b, "tok_s": qm, "bf16_tok_s": fm, "ratio_bf16": qm / fm,
            "ratio_bf16_best": max(q) / max(f),     # best round of each: the least disturbed
            "tok_s_rounds": per_round[(algo, b)], "bf16_tok_s_rounds": per_round[("bf16", b)],
            "step_ms": b / qm * 1e3, "bf16_step_ms": b / fm * 1e3,
        })
    eq, ef = engines[algo], engines["bf16"]
    result = {
        "kind": "e2e", "arch": arch, "label": algo, "model": spec.name, "spec": spec.__dict__,
        "rounds": rounds, "short_tokens": SHORT, "new_tokens": new_tokens, "batches": list(batches),
        "compile": compile_, "torch_threads": threads, "load_before": load0, "load_after": load1,
        "target": TARGET_RATIO, "rows": rows,
        "weight_bytes": eq.bytes, "bf16_weight_bytes": ef.bytes, "kernels": eq.kernels,
        "build_s": {k: round(e.build_s, 1) for k, e in engines.items()},
    }
    for row in rows:
        if row["batch"] == 1:
            row["weight_gbs"] = eq.bytes["step_b1"] * row["tok_s"] / 1e9
            row["bf16_weight_gbs"] = ef.bytes["step_b1"] * row["bf16_tok_s"] / 1e9
    if profile:
        result["profile"] = {lab: profile_engine(e, batches, SHORT + new_tokens) for lab, e in engines.items()}
    for e in engines.values():
        del e.llm
    engines.clear()
    gc.collect()
    return result


def profile_engine(engine: Engine, batches, max_tokens: int, top: int = 25) -> dict:
    """Top operators by self CPU time over one ``generate`` per batch size."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for b in batches:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(b, max_tokens)
        ka = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ka) or 1.0
        rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[str(b)] = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                        "calls": e.count} for e in rows]
        print(f"\n[e2e profile] {engine.label} B={b}, {max_tokens} tokens: top ops by self CPU time")
        for r in out[str(b)]:
            print(f"  {r['share'] * 100:5.1f}%  {r['self_ms']:9.1f} ms  {r['calls']:7d}  {r['op'][:90]}")
    return out


def summary(res: dict) -> str:
    lines = [f"{res['model']} {res['label']} vs bf16 ({res['rounds']} rounds, {res['new_tokens']} decode tokens, "
             f"threads {res['torch_threads']}, load {res['load_before']}-{res['load_after']}):"]
    for r in res["rows"]:
        lines.append(f"  B={r['batch']:<3} {res['label']} {r['tok_s']:8.1f} tok/s  bf16 {r['bf16_tok_s']:8.1f} tok/s  "
                     f"x{r['ratio_bf16']:.2f} (best rounds x{r['ratio_bf16_best']:.2f}; target x{res['target']})")
    wq, wf = res["weight_bytes"], res["bf16_weight_bytes"]
    lines.append(f"  weights: decoder layers {wq['layers'] / 2**20:.0f} MiB vs bf16 {wf['layers'] / 2**20:.0f} MiB "
                 f"({wq['layers'] / wf['layers']:.3f}); total {wq['total'] / 2**20:.0f} vs {wf['total'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("prepare", "measure"))
    ap.add_argument("--arch", default="dense", choices=sorted(e2e_models.SPECS))
    ap.add_argument("--algo", default="W8A8_DYNAMIC")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--rounds", type=int, default=_env_int("AQ_E2E_ROUNDS", 3))
    ap.add_argument("--new-tokens", type=int, default=_env_int("AQ_E2E_TOKENS", 64))
    ap.add_argument("--compile", action="store_true", help="vLLM's torch.compile instead of eager")
    ap.add_argument("--threads", type=int, default=_env_int("AQ_BENCH_THREADS", 2),
                    help="torch intra-op threads of both engines (default AQ_BENCH_THREADS or 2, the cores)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if args.command == "prepare":
        print(e2e_models.float_model(args.arch))
        print(e2e_models.quantized_model(args.arch, args.algo))
        return 0
    res = measure(args.arch, args.algo, batches=tuple(int(b) for b in args.batches.split(",")), rounds=args.rounds,
                  new_tokens=args.new_tokens, compile_=args.compile, threads=args.threads, profile=args.profile,
                  log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(summary(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
