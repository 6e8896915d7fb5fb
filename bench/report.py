"""Turn pytest-benchmark JSON from bench/ into bench/results/{linear.md, results.json, linear_speedup.png}.

    python bench/report.py RUN.json [GATES.json ...] [--out bench/results]

Reads the ``extra_info`` each benchmark row stores (see bench/benchlib.py) and the
``ascend_quant_skips`` list bench/conftest.py adds (rows not timed, and why). Writes:

* ``linear.md``: per algorithm and M, ms and the same-run speed-up over bf16 ``F.linear``
  and over the algorithm's peer; the M = 1 weight stream as a fraction of the read
  bandwidth measured in the same run; resident weight bytes; every target of the issue,
  met or missed; model shapes; MoE; activation quantization; the NumPy reference; gates;
* ``results.json``: the same rows, machine facts and target verdicts, machine-readable;
* ``linear_speedup.png``: speed-up over bf16 per algorithm and M (log scale), drawn by the
  small PNG writer below (matplotlib is not a dependency of this project).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import struct
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402  (targets, algorithm list, peers: one source of truth)

#: The issue's streaming limit for this machine kind (GB/s), the reference for every decode
#: kernel's "achieved fraction"; the read bandwidth measured in the same run is shown beside it.
STREAM_LIMIT_GBS = 36.0
from e2e_decode import TARGET_RATIO as E2E_TARGET  # noqa: E402  (imports no vLLM)

# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def load(paths: list[Path]) -> tuple[dict, list[dict], list[dict]]:
    machine: dict = {}
    rows: list[dict] = []
    skips: list[dict] = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        if not machine:
            machine = dict(d.get("machine_info", {}))
            machine["datetime"] = d.get("datetime")
            machine["commit"] = d.get("commit_info", {}).get("id")
        for b in d.get("benchmarks", []):
            e = dict(b.get("extra_info", {}))
            st = b.get("stats", {})
            e.update(name=b["name"], group=b.get("group"), source=str(p),
                     stats={k: st.get(k) for k in ("median", "min", "max", "iqr", "rounds")})
            rows.append(e)
        skips += d.get("ascend_quant_skips", [])
    return machine, rows, skips


def _find(rows, **kw) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _fmt_ratio(v) -> str:
    return "" if v is None else f"{v:.2f}×"


def _fmt_ms(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _skip_reason(skips, **kw) -> str | None:
    for s in skips:
        if all(s.get(k) == v for k, v in kw.items()):
            return s["reason"]
    return None


def _short_skip(reason: str) -> str:
    if "per call" in reason:
        return "not timed (" + reason.split(":", 1)[1].split("per call")[0].strip() + "/call)"
    return "n/a"


# --------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------


def bandwidth(rows) -> tuple[float | None, str]:
    st = [r for r in rows if r.get("kind") == "stream"]
    if not st:
        return None, "no stream row in this run"
    best = max(st, key=lambda r: r["gbs"])
    return best["gbs"], f"{best['label']} over 1 GiB, median {best['gbs']:.1f} GB/s"


def ratio_vs(rows, algo_row: dict, against: str, stat: str = "") -> float | None:
    """The algorithm row's speed-up over ``against`` ("bf16" or a peer name): interleaved in
    its own test when that is its peer, else via bf16 (``ratio_bf16 / peer's ratio_bf16``).
    ``stat``: "" (ratio of medians) or "_min" (ratio of minimums)."""
    if against == "bf16":
        return algo_row.get("ratio_bf16" + stat)
    if algo_row.get("peer") == against and algo_row.get("ratio_peer" + stat) is not None:
        return algo_row["ratio_peer" + stat]
    pr = _find(rows, kind="peer", label=against, shape=algo_row["shape"], n=algo_row["n"], k=algo_row["k"],
               m=algo_row["m"])
    if pr is None or algo_row.get("ratio_bf16" + stat) is None or pr.get("ratio_bf16" + stat) is None:
        return None
    return algo_row["ratio_bf16" + stat] / pr["ratio_bf16" + stat]


def evaluate_targets(rows) -> list[dict]:
    out = []
    sq = bl.SQUARE
    ms = sorted({r["m"] for r in rows if r.get("kind") == "linear" and r.get("shape") == sq.name})
    for (algo, m, against), target in bl.TARGETS.items():
        want_ms = ms if m is None else [m]
        got, got_min = [], []
        for mm in want_ms:
            r = _find(rows, kind="linear", label=algo, shape=sq.name, m=mm)
            got.append((mm, None if r is None else ratio_vs(rows, r, against)))
            got_min.append((mm, None if r is None else ratio_vs(rows, r, against, "_min")))
        measured = [(mm, v) for mm, v in got if v is not None]
        missing = [mm for mm, v in got if v is None]
        ok_med = bool(measured) and not missing and all(v >= target for _, v in measured)
        mins = [v for _, v in got_min if v is not None]
        ok_min = len(mins) == len(want_ms) and all(v >= target for v in mins)
        if not measured:
            verdict = "not measured"
        elif ok_med and ok_min:
            verdict = "met"
        elif ok_med or ok_min:
            # under load the two disagree: longer calls (usually the baseline) are preempted
            # more often, which inflates the median ratio in favour of the faster kernel
            verdict = "met (median only)" if ok_med else "met (min only)"
        else:
            verdict = "MISSED"
        out.append({"algo": algo, "m": m, "against": against, "target": target, "ratios": got,
                    "ratios_min": got_min,
                    "min_ratio": min((v for _, v in measured), default=None), "verdict": verdict,
                    "not_measured_m": missing})
    return out


# --------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------

SHORT = {"W4A16": "W4A16", "W8A16": "W8A16", "W8A8": "W8A8", "W8A8_DYNAMIC": "W8A8D", "W4A8_DYNAMIC": "W4A8D",
         "W4A4_FLATQUANT_DYNAMIC": "W4A4FQ", "W8A8_MIX": "W8A8MIX", "W4A4_DYNAMIC": "W4A4D",
         "vllm-onednn-w8a8-dyn": "VLLM-W8A8", "vllm-int4-w4a8": "VLLM-W4A8", "vllm-wna16-w4a16": "VLLM-W4A16",
         "torch-int8pack-w8a16": "T-INT8PACK", "vllm-sgl-w8a8-dyn": "VLLM-SGL", "torch-int4pack-w4a16": "T-INT4PACK",
         "vllm-onednn-w8a8-static": "VLLM-W8A8S", "vllm-bf16-onednn": "VLLM-BF16"}


def md_report(machine, rows, skips, bw, bw_note, targets) -> str:
    ab = machine.get("ascend_quant_bench", {})
    lin = [r for r in rows if r.get("kind") in ("linear", "peer", "bf16")]
    loads = [v for r in rows for v in (r.get("load_before"), r.get("load_after")) if isinstance(v, (int, float))]
    iqrs = [r["iqr_rel"] for r in lin if isinstance(r.get("iqr_rel"), float) and not math.isnan(r["iqr_rel"])]
    sq = bl.SQUARE
    L: list[str] = []
    L.append("# Benchmark results: quantized linear, MoE and activation kernels")
    L.append("")
    L.append("Generated by `bench/report.py` from pytest-benchmark JSON (commands: bench/README.md).")
    L.append("")
    isa = ", ".join(k for k, v in ab.get("isa", {}).items() if v) or "?"
    L.append(f"- Run: {machine.get('datetime', '?')}, commit {str(machine.get('commit') or '?')[:12]}; "
             f"CPU {ab.get('cpu_model', machine.get('cpu', {}).get('brand_raw', '?'))} "
             f"({ab.get('cpu_count', '?')} cores; {isa}; AMX {'yes' if ab.get('amx') else 'no'}), "
             f"L3 {ab.get('l3_bytes', 0) / 2**20:.0f} MiB")
    L.append(f"- torch {ab.get('torch', '?')}, vLLM {ab.get('vllm', '?')}, torch threads {ab.get('torch_threads', '?')}; "
             f"cache regime **{ab.get('cache_regime', '?')}** (each weight rotated over enough copies to exceed "
             f"2× L3, as in a model forward), up to {ab.get('rounds', '?')} interleaved rounds per row "
             f"(fewer where one round is slow), medians")
    if loads:
        L.append(f"- Noise: load average {min(loads):.1f}–{max(loads):.1f} during the run "
                 f"({ab.get('cpu_count', 2)} cores); median IQR/median of the linear rows "
                 f"{statistics.median(iqrs) * 100:.0f}% (max {max(iqrs) * 100:.0f}%)" if iqrs else "")
    L.append(f"- Read bandwidth measured in this run: **{bw:.1f} GB/s** ({bw_note})" if bw else
             f"- Read bandwidth: not measured ({bw_note})")
    L.append("")
    L.append("Ratios are same-run speed-ups (median time of the reference ÷ median time of the row): "
             "\\>1 is faster. `×bf16`: over bf16 `torch.nn.functional.linear`; `×peer`: over the "
             "algorithm's vLLM-CPU/torch peer kernel (named in the peer table), interleaved in the same test.")
    L.append("")

    # --- targets
    L.append("## Targets of the issue")
    L.append("")
    L.append("`met` needs both the ratio of medians and the ratio of minimums at or above the target; "
             "`met (median only)` / `met (min only)` when they disagree. They agree on a quiet machine. "
             "Under load the median ratio is biased towards the faster kernel (a longer call is preempted "
             "more often), while the minimum estimates an undisturbed call.")
    L.append("")
    L.append("| algorithm | M | against | target | measured (median) | measured (min) | verdict |")
    L.append("|---|---|---|---|---|---|---|")

    def cells(pairs):
        return ", ".join(f"M={mm}: {v:.2f}×" if v is not None else f"M={mm}: –" for mm, v in pairs)

    for t in targets:
        L.append(f"| {t['algo']} | {t['m'] if t['m'] is not None else 'every'} | {t['against']} | "
                 f"≥ {t['target']:.1f}× | {cells(t['ratios'])} | {cells(t.get('ratios_min', []))} | "
                 f"{t['verdict']} |")
    L.append("")

    # --- end to end (details in e2e.md)
    e2e_t = e2e_targets(rows)
    if e2e_t:
        L.append(f"End to end (vLLM decode tokens/s ≥ {E2E_TARGET:g}× bf16; details, bytes and rounds in `e2e.md`):")
        L.append("")
        L.append("| model | algorithm | batch | speed-up (medians) | best rounds | verdict |")
        L.append("|---|---|---|---|---|---|")
        for t in e2e_t:
            L.append(f"| {t['model']} | {t['algo']} | {t['batch']} | {t['ratio']:.2f}× | {_fmt_ratio(t['ratio_best'])} | "
                     f"{t['verdict']} |")
        L.append("")

    # --- square table
    ms = sorted({r["m"] for r in lin if r.get("shape") == sq.name})
    if ms:
        L.append(f"## Linear, K = N = {sq.k}: ms and speed-up over bf16")
        L.append("")
        L.append("Cells: median ms · **ratio of medians** (ratio of minimums).")
        L.append("")
        L.append("| row | kernel | " + " | ".join(f"M={m}" for m in ms) + " |")
        L.append("|---|---|" + "---|" * len(ms))
        labels = [r["label"] for r in lin if r.get("shape") == sq.name and r["kind"] == "linear"]
        labels = list(dict.fromkeys(labels))
        for s in skips:
            if s.get("kind") == "linear" and s.get("shape") == sq.name and s.get("label") not in labels:
                labels.append(s["label"])
        order = [("bf16", "bf16")] + [("linear", lab) for lab in labels] + \
            [("peer", p) for p in dict.fromkeys(r["label"] for r in lin if r["kind"] == "peer"
                                                 and r.get("shape") == sq.name)]
        for kind, lab in order:
            cells, kernels = [], []
            for m in ms:
                r = _find(rows, kind=kind, label=lab, shape=sq.name, m=m)
                if r is None:
                    why = _skip_reason(skips, label=lab, m=m, shape=sq.name) or _skip_reason(skips, label=lab,
                                                                                             shape=sq.name)
                    cells.append(_short_skip(why) if why else "–")
                    continue
                kernels.append(r.get("kernel", ""))
                if kind == "bf16":
                    cells.append(f"{_fmt_ms(r['ms'])} ms ({r['tops'] * 1e3:.0f} GFLOP/s)")
                else:
                    mn = r.get("ratio_bf16_min")
                    cells.append(f"{_fmt_ms(r['ms'])} ms · **{_fmt_ratio(r['ratio_bf16'])}**"
                                 + (f" ({_fmt_ratio(mn)} min)" if mn is not None else ""))
            kern = "/".join(dict.fromkeys(k for k in kernels if k)) or ("peer" if kind == "peer" else "")
            name = lab if kind != "peer" else f"peer: {lab}"
            L.append(f"| {name} | {kern} | " + " | ".join(cells) + " |")
        L.append("")

        # --- peers
        L.append(f"## Linear, K = N = {sq.k}: speed-up over the peer kernel")
        L.append("")
        L.append("`×peer` is interleaved in the algorithm's own test; `×best peer` divides by the fastest "
                 "peer row of that algorithm (via bf16, so across tests).")
        L.append("")
        L.append("| algorithm | peer | " + " | ".join(f"M={m} ×peer / ×best peer" for m in ms) + " |")
        L.append("|---|---|" + "---|" * len(ms))
        for lab in labels:
            base = lab.split("[")[0].split(":")[0]
            peers = bl.LINEAR_PEERS.get(base, ())
            cells = []
            for m in ms:
                r = _find(rows, kind="linear", label=lab, shape=sq.name, m=m)
                if r is None:
                    cells.append("–")
                    continue
                best = None
                for p in peers:
                    v = ratio_vs(rows, r, p)
                    if v is not None and (best is None or v < best[0]):
                        best = (v, p)
                rp = r.get("ratio_peer")
                cells.append(f"{_fmt_ratio(rp) or '–'} / {_fmt_ratio(best[0]) if best else '–'}"
                             + (f" ({best[1]})" if best and best[1] != (peers[0] if peers else None) else ""))
            L.append(f"| {lab} | {peers[0] if peers else '–'} | " + " | ".join(cells) + " |")
        L.append("")
        L.append("Peers: " + "; ".join(f"`{p.name}`: {p.what}" for p in bl.PEER_SPECS.values()) + ".")
        L.append("")

        # --- M=1 streaming and resident bytes
        L.append(f"## M = 1: weight streaming and resident bytes (K = N = {sq.k})")
        L.append("")
        L.append("A decode-step GEMV reads every weight byte once, so `resident bytes / time` against the "
                 "read bandwidth measured in the same run is the fraction of the memory limit reached "
                 "(over 100%: part of the weights stayed in cache). Resident bytes: "
                 "`prepared.resident_bytes()` (weights as the kernel holds them, scales, bias, transforms) "
                 "vs the bf16 weight; read: the part the M=1 kernel streams (`benchlib.stream_bytes`).")
        L.append("")
        L.append(f"`of {STREAM_LIMIT_GBS:g} GB/s`: the same against the issue's streaming limit for this machine "
                 f"kind ({STREAM_LIMIT_GBS:g} GB/s: a 4096 × 4096 weight takes ≥ 0.93 ms in bf16, ≥ 0.47 ms in "
                 "int8, ≥ 0.23 ms in int4).")
        L.append("")
        L.append("| row | resident MiB | resident / bf16 | MiB read at M=1 | M=1 ms | GB/s | fraction of read bandwidth "
                 f"| of {STREAM_LIMIT_GBS:g} GB/s |")
        L.append("|---|---|---|---|---|---|---|---|")
        for kind, lab in order:
            r = _find(rows, kind=kind, label=lab, shape=sq.name, m=1)
            if r is None:
                continue
            frac = f"{r['weight_gbs'] / bw * 100:.0f}%" if bw else "–"
            L.append(f"| {lab} | {r['weight_bytes'] / 2**20:.1f} | {r['weight_bytes'] / (2 * sq.n * sq.k):.2f} | "
                     f"{r.get('stream_bytes', r['weight_bytes']) / 2**20:.1f} | "
                     f"{_fmt_ms(r['ms'])} | {r['weight_gbs']:.1f} | {frac} | "
                     f"{r['weight_gbs'] / STREAM_LIMIT_GBS * 100:.0f}% |")
        L.append("")

    # --- model shapes
    shapes = list(dict.fromkeys((r["shape"], r["n"], r["k"]) for r in lin if r.get("shape") != sq.name))
    if shapes:
        mms = sorted({r["m"] for r in lin if r.get("shape") != sq.name})
        L.append("## Model shapes (Qwen3-8B; TP 2 splits column-parallel N, row-parallel K): speed-up over bf16")
        L.append("")
        algos = [a for a in bl.ALGOS if any(r.get("label") == a and r.get("shape") != sq.name for r in lin)]
        L.append("| shape | N × K | M | bf16 ms | " + " | ".join(algos) + " |")
        L.append("|---|---|---|---|" + "---|" * len(algos))
        slower = []
        for name, n, k in shapes:
            for m in mms:
                b = _find(rows, kind="bf16", shape=name, m=m)
                cells = []
                for a in algos:
                    r = _find(rows, kind="linear", label=a, shape=name, m=m)
                    if r is None:
                        why = _skip_reason(skips, label=a, shape=name, m=m)
                        cells.append(_short_skip(why) if why else "–")
                        continue
                    cells.append(_fmt_ratio(r["ratio_bf16"]))
                    if r["ratio_bf16"] < 1:
                        slower.append(f"{a} {name} M={m} ({r['ratio_bf16']:.2f}×)")
                L.append(f"| {name} | {n} × {k} | {m} | {_fmt_ms(b['ms']) if b else '–'} | " + " | ".join(cells) + " |")
        L.append("")
        L.append(f"Slower than bf16 on model shapes: {len(slower)} cells" + (": " + "; ".join(slower) if slower else "."))
        L.append("")
        if 1 in mms:
            L.append(f"Decode (M = 1) on model shapes: weight GB/s streamed · fraction of the {STREAM_LIMIT_GBS:g} GB/s "
                     "limit" + (f" · fraction of the {bw:.1f} GB/s read bandwidth measured in this run" if bw else ""))
            L.append("")
            L.append("| shape | bf16 | " + " | ".join(algos) + " |")
            L.append("|---|---|" + "---|" * len(algos))

            def stream_cell(r):
                if r is None:
                    return "–"
                return (f"{r['weight_gbs']:.1f} · {r['weight_gbs'] / STREAM_LIMIT_GBS * 100:.0f}%"
                        + (f" · {r['weight_gbs'] / bw * 100:.0f}%" if bw else ""))
            for name, n, k in shapes:
                cells = [stream_cell(_find(rows, kind="bf16", shape=name, m=1))]
                cells += [stream_cell(_find(rows, kind="linear", label=a, shape=name, m=1)) for a in algos]
                L.append(f"| {name} | " + " | ".join(cells) + " |")
            L.append("")

    # --- MoE
    moe = [r for r in rows if r.get("kind") == "moe"]
    moe_skips = [s for s in skips if s.get("kind") == "moe"]
    if moe or moe_skips:
        L.append("## MoE layer (E = 8, top-2, H = 2048, I = 1408, bf16)")
        L.append("")
        L.append("`×loop`: over a naive per-expert bf16 loop; `×vLLM`: over vLLM-CPU's `cpu_fused_moe` on bf16 "
                 "weights (interleaved). Resident: quantized experts vs bf16 experts.")
        L.append("")
        ts = sorted({r["m"] for r in moe} | {s["m"] for s in moe_skips if "m" in s})
        L.append("| algorithm | kernel | resident / bf16 | " + " | ".join(f"T={t}" for t in ts) + " |")
        L.append("|---|---|---|" + "---|" * len(ts))
        for a in dict.fromkeys([r["label"] for r in moe] + [s.get("label") for s in moe_skips if s.get("label")]):
            cells, kern, res = [], "", ""
            for t in ts:
                r = _find(moe, label=a, m=t)
                if r is None:
                    why = _skip_reason(moe_skips, label=a, m=t)
                    cells.append(_short_skip(why) if why else "–")
                    continue
                kern = r.get("kernel", "")
                res = f"{r['weight_bytes'] / 2**20:.0f} / {r['bf16_bytes'] / 2**20:.0f} MiB"
                cells.append(f"{_fmt_ms(r['ms'])} ms · {_fmt_ratio(r['ratio_bf16'])} loop · "
                             f"**{_fmt_ratio(r.get('ratio_peer')) or '–'} vLLM**")
            L.append(f"| {a} | {kern} | {res} | " + " | ".join(cells) + " |")
        for s in moe_skips:
            if "label" not in s:
                L.append(f"\nMoE not measured: {s['reason']}")
        L.append("")

    # --- activation
    act = [r for r in rows if r.get("kind") == "activation"]
    if act:
        ams = sorted({r["m"] for r in act})
        L.append("## Activation quantization and the FlatQuant transform alone (K = 4096)")
        L.append("")
        L.append("`×vLLM`: speed-up over vLLM-CPU's dynamic per-token int8 quantization "
                 "(`onednn_scaled_int8_quant`), interleaved. `% of linear`: this op's time over the "
                 "algorithm's whole linear forward at the same M (K = N = 4096) from this run.")
        L.append("")
        L.append("| op | " + " | ".join(f"M={m}" for m in ams) + " |")
        L.append("|---|" + "---|" * len(ams))
        owner = {"dynamic-int8": "W8A8_DYNAMIC", "dynamic-int4": "W4A4_DYNAMIC", "static-int8": "W8A8",
                 "kron-transform": "W4A4_FLATQUANT_DYNAMIC", "kron-quant-int4": "W4A4_FLATQUANT_DYNAMIC",
                 "kron-total": "W4A4_FLATQUANT_DYNAMIC"}
        for op in dict.fromkeys(r["label"] for r in act):
            cells = []
            for m in ams:
                r = _find(act, label=op, m=m)
                if r is None:
                    cells.append("–")
                    continue
                share = ""
                lr = _find(rows, kind="linear", label=owner.get(op), shape=sq.name, m=m)
                if lr:
                    share = f" · {r['ms'] / lr['ms'] * 100:.0f}% of linear"
                cells.append(f"{_fmt_ms(r['ms'])} ms · {r['gbs']:.1f} GB/s · {_fmt_ratio(r['ratio_peer'])} vLLM{share}")
            L.append(f"| {op} | " + " | ".join(cells) + " |")
        L.append("")

    # --- reference
    ref = [r for r in rows if r.get("kind") == "reference"]
    if ref:
        L.append(f"## NumPy reference path (M = {ref[0]['m']}, N = K = {ref[0]['n']})")
        L.append("")
        L.append("| algorithm | reference ms | bf16 ms | optimized ms | reference ×bf16 | reference ×optimized |")
        L.append("|---|---|---|---|---|---|")
        for r in ref:
            L.append(f"| {r['label']} | {_fmt_ms(r['ms'])} | {_fmt_ms(r['bf16_ms'])} | {_fmt_ms(r['optimized_ms'])} | "
                     f"{_fmt_ratio(r['ratio_bf16'])} | {_fmt_ratio(r['ratio_optimized'])} |")
        L.append("")

    # --- gates
    gates = [r for r in rows if r.get("kind") == "gate"]
    if gates:
        L.append("## Gates (bench/test_gates.py)")
        L.append("")
        L.append("| gate | kernel | floor | target | best ratio | attempts (median / min ratio) |")
        L.append("|---|---|---|---|---|---|")
        for r in gates:
            att = ", ".join(f"{a[1]:.2f}× / {a[2]:.2f}×" if len(a) > 4 else f"{a[0]:.2f}×"
                            for a in r.get("attempts", []))
            ok = "pass" if r.get("ratio", 0) >= r["floor"] else "**FAIL**"
            L.append(f"| {r['gate']} | {r.get('kernel', '')} | {r['floor']:.2f}× | {r['target']:.1f}× | "
                     f"{r.get('ratio', 0):.2f}× ({ok}) | {att} |")
        L.append("")

    other = [s for s in skips if s.get("kind") not in ("moe",)]
    if other:
        L.append("## Rows not timed")
        L.append("")
        for s in other:
            L.append(f"- `{s.get('test', '?')}`: {s['reason']}")
        L.append("")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------
# PNG (no matplotlib): RGB canvas, 5x7 bitmap font, zlib-compressed PNG
# --------------------------------------------------------------------------------------

_FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    "_": "00000 00000 00000 00000 00000 00000 11111", ":": "00000 01100 01100 00000 01100 01100 00000",
    "/": "00000 00001 00010 00100 01000 10000 00000", "%": "11000 11001 00010 00100 01000 10011 00011",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    "=": "00000 00000 11111 00000 11111 00000 00000", "x": "00000 00000 10001 01010 00100 01010 10001",
    ",": "00000 00000 00000 00000 01100 00100 01000", " ": "00000 00000 00000 00000 00000 00000 00000",
}


class Canvas:
    def __init__(self, w: int, h: int, bg=(255, 255, 255)):
        self.w, self.h = w, h
        self.px = bytearray(bytes(bg) * (w * h))

    def rect(self, x0, y0, x1, y1, c) -> None:
        x0, x1 = sorted((int(x0), int(x1)))
        y0, y1 = sorted((int(y0), int(y1)))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(self.w, x1), min(self.h, y1)
        row = bytes(c) * (x1 - x0)
        for y in range(y0, y1):
            i = (y * self.w + x0) * 3
            self.px[i:i + len(row)] = row

    def text(self, x, y, s: str, c=(0, 0, 0), scale: int = 2) -> int:
        for ch in s:
            g = _FONT.get(ch, _FONT.get(ch.upper(), _FONT[" "]))
            for ry, bits in enumerate(g.split()):
                for rx, b in enumerate(bits):
                    if b == "1":
                        self.rect(x + rx * scale, y + ry * scale, x + (rx + 1) * scale, y + (ry + 1) * scale, c)
            x += 6 * scale
        return x

    def save(self, path: Path) -> None:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
        path.write_bytes(png)


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def chart(rows, skips, path: Path) -> bool:
    sq = bl.SQUARE
    lin = [r for r in rows if r.get("kind") in ("linear", "peer") and r.get("shape") == sq.name]
    if not lin:
        return False
    ms = sorted({r["m"] for r in lin})
    groups = [a for a in bl.ALGOS if any(r["label"] == a for r in lin)]
    groups += [p for p in ("vllm-onednn-w8a8-dyn", "vllm-int4-w4a8", "vllm-wna16-w4a16", "torch-int8pack-w8a16")
               if any(r["label"] == p for r in lin)]
    vals = {(g, m): (_find(lin, label=g, m=m) or {}).get("ratio_bf16") for g in groups for m in ms}
    got = [v for v in vals.values() if v]
    lo = 2.0 ** max(-7, math.floor(math.log2(min(got + [0.5]))))
    hi = 2.0 ** min(5, math.ceil(math.log2(max(got + [2.0]))))
    W, H = 1200, 560
    left, right, top, bottom = 90, W - 20, 80, H - 90
    c = Canvas(W, H)
    c.text(left, 14, f"SPEED-UP OVER BF16 F.LINEAR, K=N={sq.k} (LOG SCALE, SAME-RUN MEDIANS)", scale=2)

    def y_of(v: float) -> float:
        return bottom - (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo)) * (bottom - top)

    e = math.log2(lo)
    while e <= math.log2(hi) + 1e-9:
        v = 2.0 ** e
        y = y_of(v)
        c.rect(left, y, right, y + (2 if v == 1 else 1), (0, 0, 0) if v == 1 else (210, 210, 210))
        lab = f"{v:g}x" if v >= 0.1 else f"1/{round(1 / v)}x"
        c.text(8, y - 7, lab, scale=2)
        e += 1
    gw = (right - left) / len(groups)
    bw_ = gw * 0.8 / len(ms)
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + gw * 0.1
        for mi, m in enumerate(ms):
            v = vals[(g, m)]
            xa, xb = x0 + mi * bw_, x0 + (mi + 1) * bw_ - 2
            if v:
                c.rect(xa, y_of(1.0), xb, y_of(min(max(v, lo), hi)), _COLORS[mi % len(_COLORS)])
            else:
                c.text(int(xa), int(y_of(1.0)) + 4, "x", c=_COLORS[mi % len(_COLORS)], scale=1)
        lab = SHORT.get(g, g)
        sc = 2 if 12 * len(lab) <= gw - 4 else 1                 # the larger font where it fits
        c.text(int(left + gi * gw + (gw - 6 * sc * len(lab)) / 2), bottom + 12 + (4 if sc == 1 else 0), lab,
               c=(0, 0, 0) if g in bl.ALGOS else (110, 110, 110), scale=sc)
    x = left
    for mi, m in enumerate(ms):
        c.rect(x, H - 40, x + 16, H - 24, _COLORS[mi % len(_COLORS)])
        x = c.text(x + 22, H - 39, f"M={m}", scale=2) + 24
    c.text(x + 20, H - 39, "GREY LABELS: PEERS. X: NOT TIMED", c=(110, 110, 110), scale=2)
    c.save(path)
    return True



# --------------------------------------------------------------------------------------
# end to end (bench/test_bench_e2e.py rows, kind "e2e")
# --------------------------------------------------------------------------------------


def e2e_targets(rows) -> list[dict]:
    """One verdict per (model, algorithm, batch): the issue's ``>= 1.5x bf16`` decode tokens/s.
    ``met`` needs the ratio of medians over rounds and the ratio of the best rounds at or above
    the target (as for the kernels: they agree on a quiet machine)."""
    out = []
    for r in rows:
        if r.get("kind") != "e2e":
            continue
        target = r.get("target", E2E_TARGET)
        for b in r["rows"]:
            med, best = b["ratio_bf16"], b.get("ratio_bf16_best")
            ok_med, ok_best = med >= target, best is not None and best >= target
            verdict = ("met" if ok_med and ok_best else "met (median only)" if ok_med
                       else "met (best rounds only)" if ok_best else "MISSED")
            out.append({"model": r["model"], "algo": r["label"], "batch": b["batch"], "target": target,
                        "ratio": med, "ratio_best": best, "tok_s": b["tok_s"], "bf16_tok_s": b["bf16_tok_s"],
                        "verdict": verdict})
    return out


def md_e2e(machine, rows) -> str | None:
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if not e2e:
        return None
    ab = machine.get("ascend_quant_bench", {})
    isa = ", ".join(k for k, v in ab.get("isa", {}).items() if v) or "?"
    loads = [v for r in e2e for v in (r.get("load_before"), r.get("load_after")) if isinstance(v, (int, float))]
    r0 = e2e[0]
    L: list[str] = []
    L.append("# End to end: vLLM decode throughput, quantized vs bf16")
    L.append("")
    L.append("Generated by `bench/report.py` from `bench/test_bench_e2e.py` rows (the work is done by "
             "`bench/e2e_decode.py`; models: `bench/e2e_models.py`).")
    L.append("")
    L.append(f"- Run: {machine.get('datetime', '?')}, commit {str(machine.get('commit') or '?')[:12]}; "
             f"CPU {ab.get('cpu_model', '?')} ({ab.get('cpu_count', '?')} cores; {isa}; "
             f"AMX {'yes' if ab.get('amx') else 'no'}); torch {ab.get('torch', '?')}, vLLM {ab.get('vllm', '?')}")
    L.append(f"- vLLM offline `LLM.generate`, one process holding both engines (bf16, and the same model "
             f"quantized with `quantization=\"ascend\"`), dtype bfloat16, "
             f"{'torch.compile' if r0.get('compile') else 'eager (`enforce_eager`)'}, "
             f"{r0.get('torch_threads', '?')} torch threads, greedy, `ignore_eos`, distinct prompts, prefix "
             "caching off")
    L.append(f"- Decode tokens/s = B × {r0['new_tokens']} / (t({r0['short_tokens']} + {r0['new_tokens']} tokens) − "
             f"t({r0['short_tokens']} tokens)): the prefill and the first decode steps cancel. "
             f"{r0['rounds']} rounds per engine after a warm-up, the two engines interleaved (ABBA); "
             "speed-up = ratio of the medians over rounds; `best rounds` = ratio of each engine's fastest round")
    if loads:
        L.append(f"- Noise: load average {min(loads):.1f}–{max(loads):.1f} during these rows "
                 f"({ab.get('cpu_count', 2)} cores)")
    L.append("")

    models = list(dict.fromkeys(r["model"] for r in e2e))
    L.append("## Models (random weights, fixed seed; 400-token vocabulary, lm_head kept in bf16)")
    L.append("")
    L.append("| model | architecture | layers | hidden | attention | MLP | bf16 weights (decoder layers) |")
    L.append("|---|---|---|---|---|---|---|")
    for mname in models:
        r = _find(e2e, model=mname)
        sp, wf = r["spec"], r["bf16_weight_bytes"]
        mlp = (f"{sp['experts']} experts, top-{sp['top_k']}, intermediate {sp['moe_intermediate']}" if sp.get("experts")
               else f"intermediate {sp['intermediate']}")
        L.append(f"| {mname} | {sp['arch']} | {sp['layers']} | {sp['hidden']} | {sp['heads']} q / {sp['kv_heads']} kv "
                 f"heads of {sp['head_dim']} | {mlp} | {wf['total'] / 2**20:.0f} MiB ({wf['layers'] / 2**20:.0f} MiB) |")
    L.append("")

    L.append(f"## Decode tokens/s and speed-up over bf16 (target ≥ {E2E_TARGET:g}×)")
    L.append("")
    L.append("| model | algorithm | batch | bf16 tok/s | quantized tok/s | speed-up (medians) | best rounds | verdict |")
    L.append("|---|---|---|---|---|---|---|---|")
    for t in e2e_targets(rows):
        L.append(f"| {t['model']} | {t['algo']} | {t['batch']} | {t['bf16_tok_s']:.1f} | {t['tok_s']:.1f} | "
                 f"**{t['ratio']:.2f}×** | {_fmt_ratio(t['ratio_best'])} | {t['verdict']} |")
    L.append("")

    L.append("## Resident weight bytes after loading, and the decode step against the streaming limit")
    L.append("")
    L.append("Decoder layers: the linear and MoE expert layers (what quantization changes: our prepared layers' "
             "`resident_bytes()`, vLLM's bf16 weights); total adds embeddings, norms, routers, lm_head. "
             "Read per step at B = 1: the weights one decode step reads (MoE: the top-k of the experts); "
             f"GB/s = that × steps/s; fraction of the issue's {STREAM_LIMIT_GBS:g} GB/s.")
    L.append("")
    L.append("| model | weights | decoder layers MiB | vs bf16 | total MiB | read per step (B=1) MiB | B=1 GB/s | "
             f"of {STREAM_LIMIT_GBS:g} GB/s | kernels |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for mname in models:
        rs = [r for r in e2e if r["model"] == mname]
        wf = rs[0]["bf16_weight_bytes"]
        b1 = [next((b for b in r["rows"] if b["batch"] == 1), None) for r in rs]
        f_gbs = statistics.median([b["bf16_weight_gbs"] for b in b1 if b and "bf16_weight_gbs" in b] or [float("nan")])
        L.append(f"| {mname} | bf16 | {wf['layers'] / 2**20:.0f} | 1.00 | {wf['total'] / 2**20:.0f} | "
                 f"{wf['step_b1'] / 2**20:.0f} | {f_gbs:.1f} | {f_gbs / STREAM_LIMIT_GBS * 100:.0f}% | vLLM |")
        for r, b in zip(rs, b1):
            wq = r["weight_bytes"]
            gbs = b.get("weight_gbs", float("nan")) if b else float("nan")
            kern = ", ".join(f"{k}: {v}" for k, v in r.get("kernels", {}).items())
            L.append(f"| {mname} | {r['label']} | {wq['layers'] / 2**20:.0f} | {wq['layers'] / wf['layers']:.3f} | "
                     f"{wq['total'] / 2**20:.0f} | {wq['step_b1'] / 2**20:.0f} | {gbs:.1f} | "
                     f"{gbs / STREAM_LIMIT_GBS * 100:.0f}% | {kern} |")
    L.append("")
    L.append("bf16 GB/s is the median over the rows of that model (each row measures bf16 again, interleaved "
             "with its quantized engine).")
    L.append("")

    L.append("## Every round (tokens/s)")
    L.append("")
    L.append("| model | algorithm | batch | quantized, per round | bf16, per round | load before → after |")
    L.append("|---|---|---|---|---|---|")
    for r in e2e:
        for b in r["rows"]:
            L.append(f"| {r['model']} | {r['label']} | {b['batch']} | "
                     + ", ".join(f"{v:.1f}" for v in b["tok_s_rounds"]) + " | "
                     + ", ".join(f"{v:.1f}" for v in b["bf16_tok_s_rounds"])
                     + f" | {r.get('load_before')} → {r.get('load_after')} |")
    L.append("")

    prof = [r for r in e2e if r.get("profile")]
    if prof:
        L.append("## Where a decode step goes (torch.profiler, top operators by self CPU time)")
        L.append("")
        for r in prof:
            for eng, per_b in r["profile"].items():
                for b, ops in per_b.items():
                    top = "; ".join(f"`{o['op'][:60]}` {o['share'] * 100:.0f}%" for o in ops[:8])
                    L.append(f"- {r['model']} {eng} B={b}: {top}")
        L.append("")
    return "\n".join(L) + "\n"


def chart_e2e(rows, path: Path) -> bool:
    """Speed-up over bf16 per (model, algorithm), bars for each batch size, the target as a line."""
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if not e2e:
        return False
    groups = [(r["model"], r["label"]) for r in e2e]
    batches = sorted({b["batch"] for r in e2e for b in r["rows"]})
    vals = {(r["model"], r["label"], b["batch"]): b["ratio_bf16"] for r in e2e for b in r["rows"]}
    finite = [v for v in vals.values() if v and math.isfinite(v)]
    hi = min(8.0, max(2.0, math.ceil(max(finite + [0.0]) * 2) / 2))      # bars over 8x are clipped
    step = 0.5 if hi <= 4 else 1.0
    W, H = 1000, 520
    left, right, top, bottom = 80, W - 20, 70, H - 100
    c = Canvas(W, H)
    c.text(left, 14, "VLLM DECODE TOKENS/S, QUANTIZED OVER BF16 (SAME-RUN MEDIANS)", scale=2)

    def y_of(v: float) -> float:
        return bottom - v / hi * (bottom - top)

    v = 0.0
    while v <= hi + 1e-9:
        y = y_of(v)
        c.rect(left, y, right, y + 1, (210, 210, 210))
        c.text(8, y - 7, f"{v:g}x", scale=2)
        v += step
    c.rect(left, y_of(1.0), right, y_of(1.0) + 2, (0, 0, 0))
    gw = (right - left) / len(groups)
    bw_ = gw * 0.7 / len(batches)
    for gi, (mname, algo) in enumerate(groups):
        x0 = left + gi * gw + gw * 0.15
        for bi, b in enumerate(batches):
            val = vals.get((mname, algo, b))
            if val and math.isfinite(val):
                c.rect(x0 + bi * bw_, y_of(0), x0 + (bi + 1) * bw_ - 3, y_of(min(val, hi)), _COLORS[bi % len(_COLORS)])
                lab = f"{val:.2f}x"
                c.text(int(x0 + bi * bw_ + (bw_ - 3 - 12 * len(lab)) / 2), int(y_of(min(val, hi))) - 18, lab, scale=2)
        lab = f"{mname} {SHORT.get(algo, algo)}"
        c.text(int(left + gi * gw + (gw - 6 * len(lab) * 2) / 2), bottom + 12, lab, scale=2)
    yt = y_of(E2E_TARGET)
    for x in range(left, right, 16):
        c.rect(x, yt, x + 9, yt + 2, (214, 39, 40))
    c.text(right - 150, int(yt) - 18, f"TARGET {E2E_TARGET:g}X", c=(214, 39, 40), scale=2)
    x = left
    for bi, b in enumerate(batches):
        c.rect(x, H - 40, x + 16, H - 24, _COLORS[bi % len(_COLORS)])
        x = c.text(x + 22, H - 39, f"BATCH {b}", scale=2) + 24
    c.save(path)
    return True


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    machine, rows, skips = load(args.json)
    bw, bw_note = bandwidth(rows)
    targets = evaluate_targets(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear.md").write_text(md_report(machine, rows, skips, bw, bw_note, targets))
    drew = chart(rows, skips, args.out / "linear_speedup.png")
    e2e_md = md_e2e(machine, rows)
    e2e_t = e2e_targets(rows)
    if e2e_md:
        (args.out / "e2e.md").write_text(e2e_md)
        chart_e2e(rows, args.out / "e2e_speedup.png")
    (args.out / "results.json").write_text(json.dumps(
        {"machine": machine, "read_bandwidth_gbs": bw, "stream_limit_gbs": STREAM_LIMIT_GBS, "targets": targets,
         "e2e_targets": e2e_t, "rows": rows, "not_timed": skips},
        indent=1, default=str) + "\n")
    print(f"wrote {args.out / 'linear.md'}, {args.out / 'results.json'}"
          + (f", {args.out / 'linear_speedup.png'}" if drew else " (no linear rows: no chart)")
          + (f", {args.out / 'e2e.md'}, {args.out / 'e2e_speedup.png'}" if e2e_md else ""))
    for t in e2e_t:
        print(f"  target e2e {t['model']:<6} {t['algo']:<14} B={t['batch']:<3} >= {t['target']:.1f}x bf16 decode tok/s: "
              f"{t['verdict']} ({t['ratio']:.2f}x)")
    missed = [t for t in targets if not t["verdict"].startswith("met")]
    for t in targets:
        print(f"  target {t['algo']:<24} M={t['m'] if t['m'] is not None else 'all':<4} vs {t['against']:<22} "
              f">= {t['target']:.1f}x: {t['verdict']}"
              + (f" (lowest median ratio {t['min_ratio']:.2f}x)" if t["min_ratio"] is not None else ""))
    print(f"{len(targets) - len(missed)} of {len(targets)} targets met by at least one statistic, "
          f"{sum(t['verdict'] == 'met' for t in targets)} by both")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
