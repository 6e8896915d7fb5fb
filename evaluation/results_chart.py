"""The demo's chart: accuracy (held-out perplexity) against checkpoint size and against decode speed.

Two panels sharing the perplexity axis (lower is better): left, checkpoint size relative to the
float model; right, decode tokens/s relative to the float model (same run). One labelled point
per algorithm ID, the float model as a star at (1, its perplexity). Rendered with matplotlib's
Agg backend (no display needed); rows that failed are left out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = ["write_chart"]


def write_chart(rows: Sequence[Mapping], path: str | os.PathLike, *, title: str) -> None:
    """Write the PNG chart of ``rows`` (the float row first, see :mod:`.results_table`) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if not r.get("error") and r.get("ppl") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    panels = (("size_ratio", "checkpoint size relative to the float model (smaller is better)"),
              ("speed_ratio", "decode tokens/s relative to the float model (larger is better)"))
    ppls = [r["ppl"] for r in good]
    y_span = (max(ppls) - min(ppls)) or 1.0
    for ax, (key, label) in zip(axes, panels):
        pts = [(r, r[key]) for r in good if r.get(key) is not None]
        xs = [x for _, x in pts]
        x_span = ((max(xs) - min(xs)) if xs else 0.0) or 1.0
        placed: list[tuple[float, float]] = []
        for r, x in pts:
            is_float = r.get("kind") == "float"
            ax.scatter([x], [r["ppl"]], marker="*" if is_float else "o", s=180 if is_float else 50,
                       color="black" if is_float else "tab:blue", zorder=3)
            # labels of points closer than ~4 % of both spans are stacked upwards instead of overlapping
            near = sum(abs(x - px) < 0.04 * x_span and abs(r["ppl"] - py) < 0.04 * y_span for px, py in placed)
            placed.append((x, r["ppl"]))
            ax.annotate(str(r["algorithm"]), (x, r["ppl"]), textcoords="offset points", xytext=(5, 4 + 10 * near),
                        fontsize=8)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("held-out perplexity through vLLM (lower is better)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
