"""Held-out windows and perplexity from logprobs, against hand-computed expectations."""

from __future__ import annotations

import math

import pytest

from ascend_quant.evaluation.perplexity import perplexity_from_logprobs, text_windows


def test_windows_by_hand():
    # ids 0..9, seq 4: starts 0, 4, 8 -> [0..4], [4..8], [8, 9]
    assert text_windows(list(range(10)), 4) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    # ids 0..6, seq 3: starts 0, 3 (6 is not < len-1 = 6) -> the last window ends exactly at the text's end
    assert text_windows(list(range(7)), 3) == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert text_windows(list(range(10)), 4, max_windows=2) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert text_windows([5], 4) == []


@pytest.mark.parametrize("n,seq", [(2, 1), (7, 3), (10, 4), (129, 128), (7223, 128), (300, 7)])
def test_every_token_after_the_first_is_predicted_once(n, seq):
    ids = [(i * 7919) % 2048 for i in range(n)]
    windows = text_windows(ids, seq)
    targets = [t for w in windows for t in w[1:]]
    assert targets == ids[1:]
    assert all(2 <= len(w) <= seq + 1 for w in windows)


def test_embedded_heldout_window_count():
    # scripts/eval_perplexity.py on the 7,223-token held-out text: 57 windows, 7,222 predicted tokens
    windows = text_windows(list(range(7223)), 128)
    assert len(windows) == 57 and sum(len(w) - 1 for w in windows) == 7222


def test_perplexity_by_hand():
    # p = 1/2 and 1/4: exp(-(ln 1/2 + ln 1/4) / 2) = exp(ln 8 / 2) = sqrt(8). A two-term float64 sum, one
    # division and one exp are each within 2^-53 relative; the result is within ~4 * 2^-53 * ln 8 relative,
    # far below 1e-12.
    ppl, n = perplexity_from_logprobs([[math.log(0.5)], [math.log(0.25)]])
    assert n == 2
    assert abs(ppl - math.sqrt(8)) <= 1e-12 * math.sqrt(8)
    # certain predictions: perplexity exactly 1 (exp(-0) = 1)
    assert perplexity_from_logprobs([[0.0, 0.0, 0.0]]) == (1.0, 3)


@pytest.mark.parametrize("bad", [float("-inf"), float("nan"), 0.5])
def test_perplexity_rejects_non_logprobs(bad):
    with pytest.raises(ValueError, match=r"window 1, target 0"):
        perplexity_from_logprobs([[-1.0], [bad]])


def test_perplexity_of_nothing():
    with pytest.raises(ValueError, match="no predicted tokens"):
        perplexity_from_logprobs([[], []])
