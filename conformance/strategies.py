"""Hypothesis strategies of the conformance suite (the "hh" of array-api-tests).

They aim at edge cases on purpose: M in {0, 1, 2, 3, 17, 64, 257} plus draws; K ragged
with respect to the group size (``n*g + r``, ``r`` in {0, 1, g-1}, or {0, 8, g-8} where K
must be a multiple of 8); group sizes {32, 64, 128, 256}; model dtypes fp16/bf16/fp32.

Activation rows are built from a drawn seed (NumPy generator, so large arrays stay cheap)
plus up to six drawn *special rows* placed at drawn indices:

``zero``       all zeros (dynamic quant: q = 0, scale = 0)
``negzero``    all -0.0
``constant``   one value repeated
``spike``      small values and one large spike
``ties``       ``qmax * 2^e`` once and ``(q + 0.5) * 2^e`` elsewhere: every ``x * r`` is an
               exact .5 tie (round-half-even vs half-away differ on odd ``q``)
``saturate``   huge magnitudes (static quant saturates; fp16 uses 65504)
``subnormal``  subnormal values of the dtype
``tiny_max``   a row whose max is so small that ``qmax / m`` overflows float32 (inf * x)
``nonfinite``  one NaN or +-inf (only where ``allow_nonfinite``)

Ties for the static quantizer come from power-of-two input scales (:func:`static_params`):
``recip = 2^j`` exactly, ``offset`` integral, rows ``(q + 0.5) * 2^-j``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

__all__ = [
    "M_EDGE", "GROUP_SIZES", "DTYPES", "ROW_KINDS", "np_dtype", "m_values", "dtypes", "k_ragged",
    "group_sizes", "activations", "make_activations", "static_params", "float_weights", "seeds",
    "flatquant_factors", "TIE_KINDS",
]

M_EDGE = (0, 1, 2, 3, 17, 64, 257)
GROUP_SIZES = (32, 64, 128, 256)
DTYPES = ("bfloat16", "float16", "float32")
ROW_KINDS = ("zero", "negzero", "constant", "spike", "ties", "saturate", "subnormal", "tiny_max")
TIE_KINDS = ("ties",)

_NP = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
#: largest power-of-two exponent e such that 127.5 * 2^e is finite in the dtype, smallest normal exponent
_EXP_RANGE = {"bfloat16": (-120, 120), "float16": (-14, 8), "float32": (-120, 120)}


def np_dtype(name: str) -> np.dtype:
    return _NP[name]


seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from(DTYPES)
group_sizes = st.sampled_from(GROUP_SIZES)


def m_values(max_m: int = 257) -> st.SearchStrategy[int]:
    """The edge set plus ordinary draws."""
    edge = [m for m in M_EDGE if m <= max_m]
    return st.one_of(st.sampled_from(edge), st.integers(1, min(40, max_m)))


@st.composite
def k_ragged(draw, g: int, *, multiple_of: int = 1, max_k: int = 600, min_k: int = 1):
    """``K = n * g + r`` with ``r`` in {0, 1, g-1} (or {0, m, g-m} when K must be a multiple of m)."""
    rs = (0, 1, g - 1) if multiple_of == 1 else (0, multiple_of, g - multiple_of)
    r = draw(st.sampled_from(rs), label="r")
    n = draw(st.integers(0, max(0, (max_k - r) // g)), label="n")
    k = n * g + r
    if k < min_k:
        k = g
    return k


def _scale_exp(rng: np.random.Generator, dtype: str) -> int:
    lo, hi = _EXP_RANGE[dtype]
    return int(rng.integers(max(lo, -12), min(hi, 6) + 1))


def _row(kind: str, k: int, dtype: str, rng: np.random.Generator, qmax: int) -> np.ndarray:
    dt = _NP[dtype]
    if kind == "zero":
        return np.zeros(k)
    if kind == "negzero":
        return np.full(k, -0.0)
    if kind == "constant":
        return np.full(k, float(rng.choice([-1, 1])) * 2.0 ** _scale_exp(rng, dtype) * float(rng.uniform(0.5, 1)))
    if kind == "spike":
        r = rng.standard_normal(k) * 2.0 ** -6
        r[rng.integers(k)] = float(rng.choice([-1, 1])) * 2.0 ** min(_EXP_RANGE[dtype][1], 8) * 3
        return r
    if kind == "ties":
        e = _scale_exp(rng, dtype)
        q = rng.integers(-qmax, qmax, size=k).astype(np.float64)      # q + 0.5 in [-qmax+0.5, qmax-0.5]
        r = (q + 0.5) * 2.0 ** e
        r[rng.integers(k)] = float(rng.choice([-1, 1])) * qmax * 2.0 ** e
        return r
    if kind == "saturate":
        big = float(np.finfo(np.float16).max) if dtype == "float16" else 1e30
        return rng.choice([-1.0, 1.0], size=k) * big * rng.uniform(0.5, 1, size=k)
    if kind == "subnormal":
        tiny = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149}[dtype]
        return rng.integers(-40, 41, size=k).astype(np.float64) * tiny
    if kind == "tiny_max":
        # max |x| ~ 2^-130: 127 / m overflows float32 (fp16 cannot hold it: use its smallest subnormal)
        tiny = 2.0**-24 if dtype == "float16" else 2.0**-130
        return rng.integers(-3, 4, size=k).astype(np.float64) * tiny
    if kind == "nonfinite":
        r = rng.standard_normal(k)
        r[rng.integers(k)] = float(rng.choice([np.nan, np.inf, -np.inf]))
        return r
    if kind == "normal":
        return rng.standard_normal(k) * 2.0 ** _scale_exp(rng, dtype)
    raise ValueError(kind)


def make_activations(m: int, k: int, dtype: str, seed: int, special: list[tuple[int, str]],
                     base: str = "normal", qmax: int = 127) -> np.ndarray:
    """Rows of kind ``base`` from ``seed``, then the ``(row, kind)`` specials; in ``dtype``."""
    rng = np.random.default_rng(seed)
    x = np.zeros((m, k))
    for i in range(m):
        x[i] = _row(base, k, dtype, rng, qmax)
    for i, kind in special:
        if i < m:
            x[i] = _row(kind, k, dtype, rng, qmax)
    with np.errstate(over="ignore"):
        return x.astype(np.float32).astype(_NP[dtype]) if dtype != "float32" else x.astype(np.float32)


@st.composite
def activations(draw, m: int, k: int, dtype: str, *, qmax: int = 127, allow_nonfinite: bool = False,
                kinds=ROW_KINDS):
    """An activation matrix ``[m, k]`` in ``dtype`` with edge rows (see the module docstring)."""
    seed = draw(seeds, label="x_seed")
    base = draw(st.sampled_from(("normal", "ties")), label="x_base")
    all_kinds = tuple(kinds) + (("nonfinite",) if allow_nonfinite else ())
    special = draw(st.lists(st.tuples(st.integers(0, max(m - 1, 0)), st.sampled_from(all_kinds)),
                            max_size=min(m, 6)), label="x_special_rows")
    return make_activations(m, k, dtype, seed, special, base, qmax)


@st.composite
def static_params(draw, dtype: str):
    """``(input_scale f32 [1], input_offset f32 [1])``: power-of-two scales (exact ties) or random."""
    if draw(st.booleans(), label="pow2_scale"):
        j = draw(st.integers(-6, 6), label="scale_exp")
        scale = np.float32(2.0 ** -j)
    else:
        scale = np.float32(draw(st.floats(float(np.float32(1e-3)), 4.0, width=32), label="scale"))
    offset = np.float32(draw(st.integers(-128, 127), label="offset"))
    return np.array([scale], np.float32), np.array([offset], np.float32)


@st.composite
def float_weights(draw, n: int, k: int):
    """A float32 weight ``[n, k]`` with random row magnitudes, maybe a zero row and a spike."""
    seed = draw(seeds, label="w_seed")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * (2.0 ** rng.integers(-8, 2, size=(n, 1)))
    if n > 1 and draw(st.booleans(), label="w_zero_row"):
        w[rng.integers(n)] = 0.0
    if draw(st.booleans(), label="w_spike"):
        w[rng.integers(n), rng.integers(k)] *= 50.0
    return w.astype(np.float32)


@st.composite
def flatquant_factors(draw, left: int, right: int | None):
    """Invertible FlatQuant factors: identity, signed permutation (exact transforms, ties survive)
    or a random well-conditioned matrix ``I + 0.2 * G``."""
    def one(size: int, label: str):
        kind = draw(st.sampled_from(("identity", "signed_perm", "random")), label=f"{label}_kind")
        rng = np.random.default_rng(draw(seeds, label=f"{label}_seed"))
        if kind == "identity":
            return np.eye(size, dtype=np.float32)
        if kind == "signed_perm":
            p = np.eye(size)[rng.permutation(size)] * rng.choice([-1.0, 1.0], size=(size, 1))
            return p.astype(np.float32)
        return (np.eye(size) + 0.2 * rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    return one(left, "left"), (None if right is None else one(right, "right"))
