"""Meta-tests: the strategies really produce the edge cases they promise, and every
assertion helper fails on a one-bit or one-ulp change (array-api-tests ``meta_tests``)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, find, settings, strategies as st

from ascend_quant.reference.activation_quant import quantize_dynamic_per_token

from . import strategies as hh
from .assertions import assert_bitexact, assert_within_abs, assert_within_ulp, repro, ulp_distance, ulp_of

_FIND = settings(max_examples=2000, database=None, suppress_health_check=list(HealthCheck), deadline=None)


def _has_exact_tie(x: np.ndarray, bits: int) -> bool:
    """True if some |x * r| (the dynamic quantizer's float32 product) is exactly 2j + 0.5:
    a tie that round-half-even and round-half-away send to different codes."""
    qmax = 127 if bits == 8 else 7
    xf = x.astype(np.float32)
    m = np.max(np.abs(np.where(np.isfinite(xf), xf, 0)), axis=-1, initial=np.float32(0)).astype(np.float32)
    ok = (m > 0) & np.all(np.isfinite(xf), axis=-1)
    with np.errstate(all="ignore"):
        v = (xf * (np.float32(qmax) / np.where(ok, m, 1)).astype(np.float32)[:, None]).astype(np.float32)
    a = np.where(ok[:, None] & np.isfinite(v), np.abs(v), 0)
    fl = np.floor(a)
    return bool(np.any(ok[:, None] & (a - fl == 0.5) & (fl % 2 == 0) & (a < qmax)))


@st.composite
def _any_x(draw):
    dtype = draw(hh.dtypes)
    m = draw(hh.m_values(64))
    k = draw(st.integers(1, 64))
    return draw(hh.activations(m, k, dtype, allow_nonfinite=True))


def test_strategies_produce_exact_ties_that_separate_rounding_modes():
    x = find(_any_x(), lambda a: _has_exact_tie(a, 8), settings=_FIND)
    q, _ = quantize_dynamic_per_token(x, 8)
    # the same tie rounded half away from zero gives a different code somewhere
    xf = x.astype(np.float32)
    m = np.max(np.abs(xf), axis=-1).astype(np.float32)
    v = (xf * (np.float32(127) / np.where(m > 0, m, 1)).astype(np.float32)[:, None]).astype(np.float32)
    away = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -128, 127).astype(np.int8)
    assert not np.array_equal(q, np.where(m[:, None] > 0, away, 0))


def test_strategies_produce_int4_ties():
    @st.composite
    def x4(draw):
        return draw(hh.activations(draw(hh.m_values(16)), draw(st.integers(2, 32)), draw(hh.dtypes), qmax=7))
    find(x4(), lambda a: _has_exact_tie(a, 4), settings=_FIND)


@pytest.mark.parametrize("kind,pred", [
    ("zero row", lambda a: a.shape[0] > 0 and bool(np.any(np.all(a.astype(np.float64) == 0, axis=1)))),
    ("-0.0", lambda a: bool(np.any(np.signbit(a.astype(np.float32)) & (a.astype(np.float32) == 0)))),
    ("constant row", lambda a: a.shape[1] > 1 and bool(np.any(np.all(a == a[:, :1], axis=1) & (a[:, 0].astype(np.float32) != 0)))),
    ("subnormal", lambda a: bool(np.any((np.abs(a.astype(np.float64)) > 0) & (np.abs(a.astype(np.float64)) < 2.0**-126)))),
    ("non-finite", lambda a: bool(np.any(~np.isfinite(a.astype(np.float64))))),
    ("M = 0", lambda a: a.shape[0] == 0),
    ("M = 257", lambda a: a.shape[0] == 257),
])
def test_strategies_produce_edge_rows(kind, pred):
    @st.composite
    def xs(draw):
        dtype = draw(hh.dtypes)
        return draw(hh.activations(draw(hh.m_values()), draw(st.integers(1, 16)), dtype, allow_nonfinite=True))
    find(xs(), pred, settings=_FIND)


@pytest.mark.parametrize("g", hh.GROUP_SIZES)
def test_k_ragged_hits_every_remainder(g):
    for r in (0, 1, g - 1):
        find(hh.k_ragged(g), lambda k, r=r: k % g == r and k > g, settings=_FIND)
    for r in (0, 8, g - 8):
        find(hh.k_ragged(g, multiple_of=8, min_k=8), lambda k, r=r: k % g == r and k % 8 == 0, settings=_FIND)


def test_static_params_produce_power_of_two_scales():
    find(hh.static_params("bfloat16"), lambda p: float(np.log2(p[0][0])).is_integer(), settings=_FIND)


# -- the assertion helpers fail on the smallest change ----------------------------------

_SAMPLES = {
    "float32": np.array([1.0, -2.5, 3e-41, 0.0, 65504.0], np.float32),
    "float16": np.array([1.0, -2.5, 6e-8, 0.0, 65504.0], np.float16),
    "bfloat16": np.array([1.0, -2.5, 1e-39, 0.0, 3e38], np.float32).astype(ml_dtypes.bfloat16),
}
_UINT = {2: np.uint16, 4: np.uint32}


@pytest.mark.parametrize("dtype", list(_SAMPLES))
@pytest.mark.parametrize("i", range(5))
def test_bitexact_fails_on_one_bit(dtype, i):
    a = _SAMPLES[dtype].copy()
    assert_bitexact(a, a.copy())
    b = a.copy()
    b.view(_UINT[a.dtype.itemsize])[i] ^= 1            # one ulp (last mantissa bit)
    with pytest.raises(AssertionError):
        assert_bitexact(b, a)
    c = a.copy()
    c.view(_UINT[a.dtype.itemsize])[i] ^= 1 << (8 * a.dtype.itemsize - 1)   # sign bit: +0 vs -0 too
    with pytest.raises(AssertionError):
        assert_bitexact(c, a)


def test_bitexact_integers_and_shapes():
    q = np.arange(-8, 8, dtype=np.int8)
    for j in range(q.size):
        r = q.copy()
        r[j] ^= 1
        with pytest.raises(AssertionError):
            assert_bitexact(r, q)
    with pytest.raises(AssertionError):
        assert_bitexact(q.astype(np.int32), q)
    with pytest.raises(AssertionError):
        assert_bitexact(q.reshape(4, 4), q)
    with pytest.raises(AssertionError):
        assert_bitexact(np.array([np.nan, 1.0], np.float32), np.array([1.0, 1.0], np.float32))
    assert_bitexact(np.array([np.nan], np.float32), np.array([-np.nan], np.float32))   # payload not compared


@pytest.mark.parametrize("dtype", list(_SAMPLES))
def test_within_ulp_counts_exactly(dtype):
    a = _SAMPLES[dtype].copy()
    b = a.copy()
    b.view(_UINT[a.dtype.itemsize])[0] += 1
    assert ulp_distance(b, a).tolist() == [1, 0, 0, 0, 0]
    assert_within_ulp(b, a, 1)
    with pytest.raises(AssertionError):
        assert_within_ulp(b, a, 0)
    # crossing zero: +smallest subnormal vs -smallest subnormal is 2 ulp
    z = np.zeros(2, a.dtype)
    z.view(_UINT[a.dtype.itemsize])[0] = 1
    z.view(_UINT[a.dtype.itemsize])[1] = 1 | (1 << (8 * a.dtype.itemsize - 1))
    assert ulp_distance(z[:1], z[1:]).tolist() == [2]
    with pytest.raises(AssertionError):
        assert_within_ulp(z[:1], z[1:], 1)


def test_within_abs_fails_just_past_the_bound():
    e = np.array([1.0, 2.0], np.float32)
    a = np.nextafter(e, np.float32(3))
    gap = (a.astype(np.float64) - e.astype(np.float64))
    assert_within_abs(a, e, gap)
    with pytest.raises(AssertionError):
        assert_within_abs(a, e, gap * 0.999)
    with pytest.raises(AssertionError):
        assert_within_abs(np.array([np.nan, 2.0], np.float32), e, 10.0)


def test_ulp_of_matches_numpy_spacing():
    v = np.array([1.0, 3.0, 1e-3, 65504.0, 1e-7, 0.0])
    for name, dt in (("float32", np.float32), ("float16", np.float16)):
        with np.errstate(over="ignore"):
            expected = np.abs(np.spacing(v.astype(dt))).astype(np.float64)
        finite = np.isfinite(expected)           # numpy's spacing at the largest value is inf
        assert np.array_equal(ulp_of(v, name)[finite], expected[finite]), name


def test_repro_note_is_copy_pasteable(tmp_path, monkeypatch):
    from . import assertions
    monkeypatch.setattr(assertions, "REPRO_DIR", tmp_path)
    small = np.array([1.0, 2.5], np.float32)
    with pytest.raises(AssertionError) as info:
        with repro("f(x)", x=small, bits=8):
            raise AssertionError("boom")
    assert "x = np.array([1. , 2.5], dtype=np.float32)" in str(info.value) and "bits = 8" in str(info.value)
    big = np.arange(100, dtype=np.float32)
    with pytest.raises(AssertionError) as info:
        with repro("f(x)", x=big):
            raise AssertionError("boom")
    assert str(tmp_path) in str(info.value)
    path = next(tmp_path.glob("*.npz"))
    assert np.array_equal(np.load(path)["x"], big)
