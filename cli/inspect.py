"""``ascend-quant inspect DIR``: validate a quantized model directory and summarise it.

Runs :func:`ascend_quant.checkpoint.validate.validate_checkpoint` (read-only) and prints one row
per module (MoE experts of one layer folded into one row) and one per algorithm ID: stored bytes
and the compression ratio against the same modules in bfloat16. Exit status 0 when the checkpoint
is valid; 1 with every problem on stderr (one line each: directory, tensor or key, expected,
found) otherwise.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "format_report", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="DIR", help="quantized model directory (msModelSlim layout)")
    p.add_argument("--no-values", action="store_true",
                   help="check names, dtypes and shapes only (read shard headers, not tensor data)")
    p.add_argument("--modules", choices=("all", "quantized", "none"), default="quantized",
                   help="which per-module rows to print (default: quantized modules only)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ratio(bf16: int, stored: int) -> str:
    return f"{bf16 / stored:.2f}x" if stored and bf16 else "-"


def _rows(report, which: str) -> list[tuple]:
    folded: dict[str, list] = {}
    rows: list[tuple] = []
    for m in report.modules.values():
        if which == "quantized" and m.algorithm == "FLOAT":
            continue
        if m.expert_of is not None:
            f = folded.get(m.expert_of)
            if f is None:
                f = folded[m.expert_of] = [m.expert_of, set(), 0, 0, 0, set()]
                rows.append(f)  # placeholder, filled below
            f[1].add(m.algorithm)
            f[2] += 1
            f[3] += m.bytes
            f[4] += m.bf16_bytes
            f[5].add(m.prefix.rsplit(".", 2)[-2])
            continue
        shape = f"{m.n} x {m.k}" if m.n is not None and m.k is not None else "-"
        rows.append((m.prefix, m.algorithm, shape, m.bytes, m.bf16_bytes))
    out = []
    for r in rows:
        if isinstance(r, list):
            name = f"{r[0]} ({len(r[5])} experts, {r[2]} projections)"
            out.append((name, "/".join(sorted(r[1])), "-", r[3], r[4]))
        else:
            out.append(r)
    return out


def format_report(report, modules: str = "quantized") -> str:
    """The text printed for a valid checkpoint."""
    desc = report.description
    lines = []
    top = desc.top_level if desc is not None else {}
    lines.append(f"{report.where}: valid quantized checkpoint (version {top.get('version', '-')!s}, "
                 f"group_size {top.get('group_size', 0)!s}, {len(report.modules)} modules)")
    if modules != "none":
        rows = _rows(report, modules)
        if rows:
            w = max(len("module"), *(len(r[0]) for r in rows))
            lines.append("")
            lines.append(f"{'module':<{w}}  {'algorithm':<22}  {'N x K':>11}  {'bytes':>10}  {'vs bf16':>8}")
            for name, algo, shape, b, b16 in rows:
                lines.append(f"{name:<{w}}  {algo:<22}  {shape:>11}  {_size(b):>10}  {_ratio(b16, b):>8}")
    lines.append("")
    lines.append(f"{'algorithm':<24}  {'modules':>7}  {'bytes':>10}  {'bf16 bytes':>10}  {'ratio':>7}")
    for algo, row in sorted(report.by_algorithm().items(), key=lambda kv: (kv[0] == "FLOAT", kv[0])):
        lines.append(f"{algo:<24}  {row['modules']:>7}  {_size(row['bytes']):>10}  {_size(row['bf16_bytes']):>10}  "
                     f"{_ratio(row['bf16_bytes'], row['bytes']):>7}")
    lines.append(f"{'total':<24}  {len(report.modules):>7}  {_size(report.total_bytes):>10}  "
                 f"{_size(report.total_bf16_bytes):>10}  {_ratio(report.total_bf16_bytes, report.total_bytes):>7}")
    for w in report.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ascend_quant.checkpoint.validate import validate_checkpoint

    report = validate_checkpoint(args.model_dir, check_values=not args.no_values)
    if report.errors:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        for e in report.errors:
            print(f"error: {e}", file=sys.stderr)
        print(f"{args.model_dir}: INVALID ({len(report.errors)} problem(s))", file=sys.stderr)
        return 1
    print(format_report(report, args.modules))
    return 0
