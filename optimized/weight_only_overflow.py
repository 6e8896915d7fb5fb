"""Float32 overflow in the weight-only kernels: rows recomputed in float64.

The weight-only specification (``reference.linear.w8a16_linear`` / ``w4a16_linear``,
``reference.moe`` W4A16) sums ``x[m, k] * w[n, k]`` in float64 and rounds once. The fast
kernels (``optimized.weight_only``) accumulate in float32 (some sum ``x * q`` before
scaling, up to 127x larger): with activations near the top of the float32/bf16 range
(|x| ~ 1e38) a product or a partial sum overflows to +-inf, or +inf and -inf meet and give
NaN, where the float64 sum is finite or an infinity of the other sign. The bound of
``optimized.weight_only`` assumes no overflow, so those rows are outside it.

:func:`redo_overflowed_rows` restores the specification there: a row whose output holds a
non-finite value although its input row is finite is recomputed as
``dt(sum_k f64(x) * f64(w) + f64(bias))`` with the exact dequantized weight
``(q - o) * s`` (float64), rounded once (``activation_quant.round_f64_to_dtype``). The check
costs one pass over the ``[M, N]`` output per call; rows with NaN/inf inputs keep the
kernel's IEEE result (no finite value, as the reference).
"""

from __future__ import annotations

import torch

from .activation_quant import round_f64_to_dtype

__all__ = ["redo_overflowed_rows", "exact_weight_f64"]


def exact_weight_f64(wts) -> torch.Tensor:
    """``(f64(q) - f64(o)) * f64(s)`` ``[N, K]`` per group (exact: a product of two short floats)."""
    n, k = wts.shape
    s = wts.scale.to(torch.float64).repeat_interleave(wts.group, dim=1)[:, :k]
    w = wts.q_rows(0, n).to(torch.float64)
    if wts.offset is not None:
        w = w - wts.offset.to(torch.float64).repeat_interleave(wts.group, dim=1)[:, :k]
    return w * s


def redo_overflowed_rows(wts, x: torch.Tensor, y: torch.Tensor, bias32: torch.Tensor | None) -> torch.Tensor:
    """``y`` (a kernel's output for ``x``) with its overflowed rows recomputed in float64 (in place)."""
    if y.numel() == 0 or bool(torch.isfinite(y).all()):
        return y
    rows = (~torch.isfinite(y).all(dim=1)) & torch.isfinite(x).all(dim=1)
    if not bool(rows.any()):
        return y
    idx = rows.nonzero().reshape(-1)
    y64 = x[idx].to(torch.float64) @ exact_weight_f64(wts).to(y.device).t()
    if bias32 is not None:
        y64 = y64 + bias32.to(torch.float64)
    y[idx] = round_f64_to_dtype(y64, y.dtype)
    return y
