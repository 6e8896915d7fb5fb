"""Rounding and casts: the bit-level building blocks every algorithm uses.

All rounding to integers is round-half-to-even (``rint``; AscendC ``CAST_RINT``,
``torch.round``), and every cast to an integer type saturates.  Float-to-float
narrowing (fp32/fp64 -> bf16/fp16/fp32) is round-to-nearest-even, applied once:
a value computed in float64 is rounded straight to the target type, never via
float32 first (``ml_dtypes`` narrows float64 -> bfloat16 through float32, which
double-rounds; :func:`round_to_dtype` avoids that with a round-to-odd step).

Model dtypes are named ``"float32"``, ``"float16"`` or ``"bfloat16"``; the
NumPy dtype for each comes from :func:`model_dtype`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)

_MODEL_DTYPES = {
    "float32": FLOAT32, "fp32": FLOAT32,
    "float16": FLOAT16, "fp16": FLOAT16, "half": FLOAT16,
    "bfloat16": BFLOAT16, "bf16": BFLOAT16,
}

INT8_MIN, INT8_MAX = -128, 127
INT4_MIN, INT4_MAX = -8, 7


def model_dtype(dtype) -> np.dtype:
    """The NumPy dtype of a model dtype given by name or dtype (fp32, fp16, bf16 only)."""
    if isinstance(dtype, str):
        try:
            return _MODEL_DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(
                f"unknown model dtype {dtype!r}; expected one of float32, float16, bfloat16"
            ) from None
    dt = np.dtype(dtype)
    if dt not in (FLOAT32, FLOAT16, BFLOAT16):
        raise ValueError(f"model dtype must be float32, float16 or bfloat16, got {dt}")
    return dt


def rint(x: np.ndarray) -> np.ndarray:
    """Round half to even, elementwise, keeping the float dtype (``np.rint``)."""
    return np.rint(x)


def _round_f64_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: truncate, and set the last bit if inexact.

    Rounding to odd into a format with at least two more bits than the final
    target makes the following RNE narrowing (to bf16 or fp16) correctly rounded.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
    back = f.astype(np.float64)
    # truncate toward zero where RNE went away from zero
    away = np.isfinite(x) & np.isfinite(back) & (np.abs(back) > np.abs(x))
    f = np.where(away, np.nextafter(f, np.float32(0)), f)
    inexact = np.isfinite(x) & np.isfinite(f) & (f.astype(np.float64) != x)
    bits = f.view(np.uint32) | np.where(inexact, np.uint32(1), np.uint32(0))
    return bits.view(np.float32)


def round_to_dtype(x, dtype) -> np.ndarray:
    """Round float values to ``dtype`` (fp32, fp16 or bf16) to nearest, ties to even.

    Accepts float16/bfloat16/float32/float64 input. NaN stays NaN, values beyond the
    target's range become +-inf (IEEE overflow), -0.0 stays -0.0.
    """
    dt = model_dtype(dtype)
    x = np.asarray(x)
    if x.dtype == dt:
        return x.copy()
    if x.dtype == np.float64 and dt != FLOAT32:
        x = _round_f64_to_odd_f32(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dt)


def round_through(x, dtype) -> np.ndarray:
    """``float32(dtype(x))``: the exact float32 image of ``x`` rounded to ``dtype``.

    This is vLLM Ascend's load-time rounding: parameters declared with the model
    dtype receive the checkpoint's float32 values by ``copy_``, so they are rounded
    (RNE) once at load; later ``.to(float32)`` copies are exact images of that value.
    """
    return round_to_dtype(np.asarray(x, dtype=np.float32), dtype).astype(np.float32)


def saturating_cast(x: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Integral-valued floats -> int8, clamped to ``[qmin, qmax]``; NaN -> 0.

    ``x`` must already be rounded. +-inf saturate to the bounds. The NaN rule is
    ours (the NPU's float->int conversion of NaN is not documented); it is applied
    identically by every backend.
    """
    x = np.asarray(x)
    x = np.where(np.isnan(x), 0, x)
    return np.clip(x, qmin, qmax).astype(np.int8)


def quantize_rint(x: np.ndarray, qmin: int = INT8_MIN, qmax: int = INT8_MAX) -> np.ndarray:
    """``sat(rint(x))`` into int8 storage: round half to even, NaN -> 0, saturate."""
    return saturating_cast(rint(x), qmin, qmax)
