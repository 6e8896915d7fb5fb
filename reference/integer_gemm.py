"""The exact integer GEMM: int8/int4 x int8/int4 with an int32 accumulator.

The NPU cube accumulates exactly in int32. Here the product is computed exactly
(float64 matrix product of small integers: every partial sum is an integer below
2**53, so the result is exact in any summation order) and returned as int64,
after checking that every value fits the int32 accumulator the hardware has.
"""

from __future__ import annotations

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def int_matmul(a: np.ndarray, b_t: np.ndarray, name: str = "accumulator") -> np.ndarray:
    """``acc[m, n] = sum_k a[m, k] * b_t[n, k]`` exactly, as int64 within the int32 range.

    ``a`` is ``[M, K]`` activations, ``b_t`` is ``[N, K]`` weights in checkpoint
    orientation (``nn.Linear`` layout); both hold integers (int8 storage for int4 too).
    Raises ``OverflowError`` naming ``name`` if a sum leaves the int32 range (the NPU
    would wrap silently).
    """
    a = np.asarray(a)
    b_t = np.asarray(b_t)
    if a.shape[-1] != b_t.shape[-1]:
        raise ValueError(f"{name}: inner dimensions differ: activations K={a.shape[-1]}, weight K={b_t.shape[-1]}")
    if a.shape[-1] >= 2**37:
        raise ValueError(f"{name}: K={a.shape[-1]} too large for an exact float64 product")
    acc = (a.astype(np.float64) @ b_t.astype(np.float64).T)
    check_int32(acc, name)
    return acc.astype(np.int64)


def check_int32(acc: np.ndarray, name: str = "accumulator") -> None:
    """Raise ``OverflowError`` if any value of ``acc`` is outside the int32 range."""
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise OverflowError(
            f"{name}: value range [{acc.min():.0f}, {acc.max():.0f}] exceeds the int32 accumulator"
        )
