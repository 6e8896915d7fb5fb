"""Held-out perplexity: how the text is cut into windows, and perplexity from per-token logprobs.

The windowing is the one of ``scripts/eval_perplexity.py`` and ``scripts/train_embedded_model.py``:
the token ids are cut into consecutive, non-overlapping windows of ``seq`` inputs plus one
target (``ids[s : s + seq + 1]`` for ``s = 0, seq, 2·seq, …``); inside a window every token from
the second on is predicted from the tokens before it in the same window, so the first token of a
window has no context from the previous one and each token id after the first is predicted
exactly once over the whole text. Perplexity is ``exp(−mean log p(target))`` over every predicted
token, so a model's number here is directly comparable with those scripts' (the embedded model's
recorded 47.74 uses windows of 128).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["perplexity_from_logprobs", "text_windows"]


def text_windows(ids: Sequence[int], seq: int, max_windows: int | None = None) -> list[list[int]]:
    """The windows ``ids[s : s + seq + 1]`` for ``s = 0, seq, 2·seq, …`` (the last one may be
    shorter; one with fewer than 2 tokens predicts nothing and is dropped), at most
    ``max_windows`` of them from the start of the text."""
    if seq < 1:
        raise ValueError(f"seq: expected a window of at least 1 input token, got {seq}")
    windows = []
    for start in range(0, len(ids) - 1, seq):
        if max_windows is not None and len(windows) >= max_windows:
            break
        chunk = [int(t) for t in ids[start:start + seq + 1]]
        if len(chunk) >= 2:
            windows.append(chunk)
    return windows


def perplexity_from_logprobs(logprobs: Sequence[Sequence[float]]) -> tuple[float, int]:
    """``(exp(−Σ logprob / n), n)`` over every per-token logprob of every window.

    ``logprobs[w][i]`` is the natural-log probability the model gave to the ``i+1``-th token of
    window ``w`` (the first token has none). A non-finite logprob (−inf: the model gave the true
    token probability 0, NaN: a broken forward) or a positive one (not a log probability) is an
    error naming its window and position: a perplexity is never silently computed from it.
    """
    total, n = 0.0, 0
    for w, row in enumerate(logprobs):
        for i, lp in enumerate(row):
            lp = float(lp)
            if not math.isfinite(lp) or lp > 0.0:
                raise ValueError(f"logprob of window {w}, target {i}: {lp!r} is not a finite log probability (<= 0)")
            total += lp
            n += 1
    if n == 0:
        raise ValueError("perplexity: no predicted tokens (empty text or windows of one token)")
    return math.exp(-total / n), n
