"""The demo's one table, as aligned text (terminal), Markdown (results.md) and its column definitions.

A result row is a plain dict (the rows of ``results.json``, built by
:mod:`.algorithm_comparison`); the float model's row comes first and every quantized row is read
against it. Keys used here:

``algorithm`` · ``weight_bytes`` (bytes of the ``*.safetensors`` files on disk) · ``size_ratio``
(``weight_bytes`` / the float model's) · ``ppl`` (held-out perplexity through vLLM) · ``ppl_ratio``
(``ppl`` / the float model's) · ``agreement`` (:meth:`.reference_agreement.Agreement.to_json`) ·
``decode_tokens_per_s`` · ``speed_ratio`` (decode tokens/s / the float model's, same run) ·
``error`` (a failed row: every other cell is ``-``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["COLUMNS", "COLUMN_DEFINITIONS", "markdown_table", "table_cells", "text_table"]

COLUMNS = ("algorithm", "size MiB", "size vs float", "ppl", "ppl vs float", "top-1 agree", "max |dlogp|",
           "decode tok/s", "speed vs float")

COLUMN_DEFINITIONS = {
    "size MiB": "bytes of the checkpoint's *.safetensors files on disk, in MiB (2^20 bytes)",
    "size vs float": "that size divided by the float model's (embeddings, norms and lm_head stay in the model dtype)",
    "ppl": "held-out perplexity computed from vLLM's prompt logprobs (exp of the mean negative log-likelihood "
           "over every predicted token of consecutive windows, scripts/eval_perplexity.py's windowing)",
    "ppl vs float": "that perplexity divided by the float model's",
    "top-1 agree": "teacher-forced on the agreement windows: fraction of positions where vLLM's most likely next "
                   "token equals the reference forward's (checkpoint.reference_model: transformers + the NumPy "
                   "reference in every quantized layer)",
    "max |dlogp|": "on the same positions: max |log p_vLLM(true next token) - log p_reference(true next token)| "
                   "(natural log)",
    "decode tok/s": "batch 1, greedy, ignore_eos: n / (min time of 1+n tokens - min time of 1 token) over the "
                    "repeats",
    "speed vs float": "decode tok/s divided by the float model's in the same run (the faster of its two "
                      "measurements, at the start and at the end of the run)",
}


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _dlogprob(v) -> str:
    """A logprob difference: ``0`` when exact, two significant digits below 0.01, else 3 decimals."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.1e}" if abs(v) < 0.01 else f"{v:.3f}"


def table_cells(rows: Sequence[Mapping]) -> list[list[str]]:
    """One list of cell strings per row, in :data:`COLUMNS` order (a failed row: ``-`` after its name)."""
    out = []
    for r in rows:
        if r.get("error"):
            out.append([str(r["algorithm"]), *(["-"] * (len(COLUMNS) - 2)), "failed"])
            continue
        agreement = r.get("agreement") or {}
        out.append([
            str(r["algorithm"]),
            _num(None if r.get("weight_bytes") is None else r["weight_bytes"] / 2**20, ".2f"),
            _num(r.get("size_ratio"), ".3f"),
            _num(r.get("ppl"), ".2f"),
            _num(r.get("ppl_ratio"), ".4f"),
            _num(None if agreement.get("top1_agreement") is None else 100 * agreement["top1_agreement"], ".1f")
            + ("%" if agreement.get("top1_agreement") is not None else ""),
            _dlogprob(agreement.get("max_abs_dlogprob")),
            _num(r.get("decode_tokens_per_s"), ".1f"),
            _num(r.get("speed_ratio"), ".2f"),
        ])
    return out


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A GitHub Markdown table (numbers right-aligned; ``|`` inside a cell escaped), ending with a newline."""
    def md(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [md(COLUMNS), "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += [md(cells) for cells in table_cells(rows)]
    return "\n".join(lines) + "\n"


def text_table(rows: Sequence[Mapping]) -> str:
    """The same table for a terminal: columns padded to their widest cell, two spaces apart, the
    first column left-aligned and the numbers right-aligned; ends with a newline."""
    cells = [list(COLUMNS)] + table_cells(rows)
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]) + "\n"
