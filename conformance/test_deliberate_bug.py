"""The suite must catch deliberate bugs: round half away from zero in the optimized
quantizers, and swapped nibbles in the optimized packing.

Each test patches one private helper of ``ascend_quant.optimized`` and shows that the
conformance check functions (the exact bodies of the Hypothesis properties) then fail:
on a hand-made tie, and on an example found by the suite's own strategies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, find, settings, strategies as st

from ascend_quant.optimized import activation_quant as oa
from ascend_quant.optimized import packing as op
from ascend_quant.optimized import vnni_gemv
from ascend_quant.reference import weight_quant as wq

from . import strategies as hh
from .checks import check_dynamic_quant, check_linear, check_packing, check_static_quant

_FIND = settings(max_examples=500, database=None, suppress_health_check=list(HealthCheck), deadline=None)


def _round_half_away(v: torch.Tensor, lo: int, hi: int, *, may_be_nan: bool = True) -> torch.Tensor:
    """The bug: ``sign(v) * floor(|v| + 0.5)`` instead of ``torch.round`` (half to even)."""
    v = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return torch.nan_to_num(v, nan=0.0).clamp(lo, hi).to(torch.int8)


@pytest.fixture
def half_away(monkeypatch):
    monkeypatch.setattr(oa, "_rint_sat", _round_half_away)
    # the onednn-gemv kernel quantizes natively (its quantizer is checked against this one in
    # test_vnni_gemv.py); without the native library the layers run the patched torch quantizer
    monkeypatch.setattr(vnni_gemv, "library", lambda: (None, "disabled by test_deliberate_bug"))


def _fails(fn, *args, **kw) -> bool:
    try:
        fn(*args, **kw)
    except AssertionError:
        return True
    return False


# m = 127 -> r = 1 exactly: 2.5, 0.5 and -2.5 are ties where half-even and half-away differ
TIE_ROW = np.array([[127.0, 2.5, 0.5, -2.5, 3.5, 1.0]], dtype=np.float32)


def test_sanity_unpatched_checks_pass(backend):
    check_dynamic_quant(backend, TIE_ROW, 8)
    check_packing(backend, "int8", np.array([[1, -2, 7, -8]], np.int8), axis=1)


def test_round_half_away_is_caught_by_dynamic_quant_check(backend, half_away):
    with pytest.raises(AssertionError, match="int8 codes"):
        check_dynamic_quant(backend, TIE_ROW, 8)


def test_round_half_away_is_caught_by_static_quant_check(backend, half_away):
    x = np.array([[0.25, -0.75, 1.25]], np.float32)          # x * 2 = 0.5, -1.5, 2.5 (ties)
    with pytest.raises(AssertionError, match="int8 codes"):
        check_static_quant(backend, x, np.array([0.5], np.float32), np.array([0.0], np.float32), "float32")


def test_round_half_away_is_caught_by_linear_check(backend, half_away):
    rng = np.random.default_rng(0)
    tensors = wq.quantize_w8a8_dynamic(rng.standard_normal((8, TIE_ROW.shape[1])).astype(np.float32))
    with pytest.raises(AssertionError, match="W8A8_DYNAMIC output"):
        check_linear(backend, "W8A8_DYNAMIC", tensors, TIE_ROW, "float32")


def test_round_half_away_is_found_by_the_strategies(backend, half_away):
    """The suite's own activation strategy finds a failing example for the bug."""
    @st.composite
    def xs(draw):
        dtype = draw(hh.dtypes)
        return draw(hh.activations(draw(st.integers(1, 8)), draw(st.integers(1, 32)), dtype))
    find(xs(), lambda x: _fails(check_dynamic_quant, backend, x, 8), settings=_FIND)


def test_swapped_nibbles_are_caught_by_packing_check(backend, monkeypatch):
    monkeypatch.setattr(op, "_SHIFTS8", (4, 0, 12, 8, 20, 16, 28, 24))   # odd element in the low nibble
    q = np.array([[1, -2, 7, -8, 0, 3, -1, 5]], np.int8)
    for kind in ("int8", "int32", "offset8"):
        with pytest.raises(AssertionError, match="packed"):
            check_packing(backend, kind, q, axis=1)
