"""compare_logprobs against hand-computed top-1 agreement, |dlogprob| and perplexities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ascend_quant.evaluation.reference_agreement import compare_logprobs


def _rows():
    # vocabulary of 3; window [0, 1, 2] predicts token 1 (row 0) and token 2 (row 1)
    return [np.log(np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]))]


def test_compare_by_hand():
    window = [[0, 1, 2]]
    # vLLM: logprob of token 1 off by +0.01, of token 2 off by -0.2; argmax 1 (= reference's 1), then 2
    # (reference's argmax of row 1 is 0): 1 match of 2
    vllm_targets = [[math.log(0.5) + 0.01, math.log(0.3) - 0.2]]
    a = compare_logprobs(vllm_targets, [[1, 2]], _rows(), window)
    assert a.positions == 2 and a.top1_matches == 1 and a.top1_agreement == 0.5
    # the deltas are differences of float64 logs of the same values: within a few ulps of 0.01 and 0.2
    assert abs(a.max_abs_dlogprob - 0.2) <= 1e-12
    assert abs(a.mean_abs_dlogprob - 0.105) <= 1e-12
    # reference: exp(-(ln .5 + ln .3) / 2) = 1 / sqrt(.15); vLLM: that times exp((0.2 - 0.01) / 2)
    assert abs(a.ppl_reference - 1 / math.sqrt(0.15)) <= 1e-12 * a.ppl_reference
    assert abs(a.ppl_vllm - math.exp(0.095) / math.sqrt(0.15)) <= 1e-12 * a.ppl_vllm
    js = a.to_json()
    assert js["top1_agreement"] == 0.5 and js["positions"] == 2


def test_identical_sides_agree_exactly():
    rows = _rows()
    window = [[0, 1, 2]]
    targets = [[float(rows[0][0, 1]), float(rows[0][1, 2])]]
    a = compare_logprobs(targets, [[1, 0]], rows, window)
    assert a.top1_agreement == 1.0 and a.max_abs_dlogprob == 0.0 and a.ppl_vllm == a.ppl_reference


def test_length_mismatch_names_the_window():
    with pytest.raises(ValueError, match="window 0: 3 tokens predict 2, got 1 vLLM logprobs"):
        compare_logprobs([[-1.0]], [[1, 0]], _rows(), [[0, 1, 2]])
    with pytest.raises(ValueError, match="2 windows"):
        compare_logprobs([[-1.0, -1.0]], [[1, 0]], _rows(), [[0, 1, 2], [0, 1]])
