"""Float narrowing (RNE, single rounding), load-time rounding, saturating integer casts."""

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ascend_quant.reference.rounding import (
    BFLOAT16, model_dtype, quantize_rint, round_through, round_to_dtype, saturating_cast,
)


def bf16_by_bit_arithmetic(f32: np.ndarray) -> np.ndarray:
    """Independent route: the classic integer RNE on the float32 bit pattern (finite inputs)."""
    bits = f32.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (rounded.astype(np.uint32) << 16).astype(np.uint32).view(np.float32)


def nearest_even_exact(x: float, grid: np.ndarray) -> float:
    """Independent route for float64 inputs: exact rational comparison against neighbours."""
    fx = Fraction(x)
    below = grid[grid <= x].max()
    above = grid[grid >= x].min()
    if below == above:
        return float(below)
    db, da = fx - Fraction(float(below)), Fraction(float(above)) - fx
    if db != da:
        return float(below if db < da else above)
    # tie: the one with an even last mantissa bit
    last_bit = np.array([below], dtype=np.float32).astype(BFLOAT16).view(np.uint16)[0] & 1
    return float(above if last_bit else below)


def test_float32_to_bf16_matches_bit_arithmetic_on_every_upper_half():
    # every bf16 pattern with each interesting low-half: exact ties, just below, just above
    hi = np.arange(0, 2**16, dtype=np.uint32) << 16
    hi = hi[np.isfinite(hi.view(np.float32))]
    for low in (0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
        f = (hi | np.uint32(low)).view(np.float32)
        f = f[np.isfinite(bf16_by_bit_arithmetic(f))]
        got = round_to_dtype(f, "bfloat16").astype(np.float32)
        assert np.array_equal(got.view(np.uint32), bf16_by_bit_arithmetic(f).view(np.uint32)), hex(low)


def test_float64_to_bf16_is_single_rounding():
    # 1 + 2^-8 is a bf16 tie; a tiny extra above it must round up. ml_dtypes rounds via
    # float32 and gets this wrong (rounds down); we must not.
    x = np.array([1 + 2.0**-8 + 2.0**-30, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 - 2.0**-40])
    got = round_to_dtype(x, "bfloat16").astype(np.float64)
    assert got.tolist() == [1 + 2.0**-7, 1.0, 1 + 2.0**-6, 1.0]
    assert float(np.array(x[0]).astype(ml_dtypes.bfloat16)) == 1.0  # the double rounding we avoid


def _finite_grid(dtype) -> np.ndarray:
    patterns = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16).view(dtype)
    with np.errstate(invalid="ignore"):
        values = patterns.astype(np.float64)
    return np.unique(values[np.isfinite(values)])


GRID_BF16 = _finite_grid(BFLOAT16)
GRID_F16 = _finite_grid(np.float16)


@given(st.floats(min_value=-3e38, max_value=3e38, allow_nan=False, width=64)
       | st.sampled_from([1 + 2.0**-8 + 2.0**-50, 1 + 2.0**-11 - 2.0**-60, 2.0**-133 * 1.5, 65520.0 - 1e-9]))
def test_float64_to_bf16_and_fp16_against_exact_rationals(x):
    if abs(x) <= GRID_BF16.max():
        assert float(round_to_dtype(np.array([x]), "bfloat16")[0]) == nearest_even_exact(x, GRID_BF16)
    if abs(x) <= 65504:
        grid_f16 = GRID_F16
        got = float(round_to_dtype(np.array([x]), "float16")[0])
        fx = Fraction(x)
        below, above = grid_f16[grid_f16 <= x].max(), grid_f16[grid_f16 >= x].min()
        if below == above:
            assert got == below
        else:
            db, da = fx - Fraction(float(below)), Fraction(float(above)) - fx
            if db != da:
                assert got == (below if db < da else above)
            else:
                even = below if (np.array([below]).astype(np.float16).view(np.uint16)[0] & 1) == 0 else above
                assert got == even


def test_specials_survive_narrowing():
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 1e39, 5e-324], dtype=np.float64)
    got = round_to_dtype(x, "bfloat16").astype(np.float64)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf
    assert got[3] == 0 and np.signbit(got[3])
    assert got[4] == np.inf  # beyond bf16 range -> inf (IEEE overflow)
    assert got[5] == 0


def test_round_through_is_the_float32_image_of_the_model_dtype_value():
    s = np.array([0.1, 1 / 3, 3.0e-5], dtype=np.float32)
    assert round_through(s, "float32").tobytes() == s.tobytes()
    assert np.array_equal(round_through(s, "bfloat16"), s.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.array_equal(round_through(s, "float16"), s.astype(np.float16).astype(np.float32))
    assert round_through(s, "bf16").dtype == np.float32


def test_quantize_rint_ties_to_even_saturates_and_zeroes_nan():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 300, -129, np.inf, -np.inf, np.nan, -0.0])
    assert quantize_rint(v).tolist() == [0, 2, 2, 0, -2, -2, 126, 127, 127, -128, 127, -128, 0, 0]
    assert quantize_rint(np.array([7.5, -8.5, 6.5]), -8, 7).tolist() == [7, -8, 6]
    assert saturating_cast(np.array([3.0, -200.0]), -128, 127).dtype == np.int8


def test_model_dtype_names_and_rejections():
    assert model_dtype("bf16") == BFLOAT16 and model_dtype("float16") == np.float16
    with pytest.raises(ValueError, match="unknown model dtype 'int8'"):
        model_dtype("int8")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        model_dtype(np.float64)
