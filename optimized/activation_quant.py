"""Activation quantization in PyTorch: static per-tensor, dynamic per-token (int8/int4)
and the FlatQuant Kronecker transform + clipped int4 quantization.

Counterpart of ``reference/activation_quant.py`` and ``reference/flatquant.py``; every
function matches its reference bit-exactly (same float32 op sequence, each operation
rounded separately, ``torch.round`` = round half to even, NaN -> 0, saturation), except
:func:`kronecker_transform`, whose float64 matrix products may sum in another order
(bound in its docstring). All functions are vectorized over rows (no Python loops).

Traps avoided on purpose (each would break bit-exactness):

* ``scalar / tensor`` in PyTorch is ``tensor.reciprocal() * scalar`` (two roundings);
  every division here is a true IEEE float32 ``tensor / tensor``.
* ``float64 -> float16`` in PyTorch goes through float32 (double rounding); the
  transform rounds float64 to float32 *to odd* first, which makes the final RNE
  narrowing correctly rounded (same trick as ``reference.rounding.round_to_dtype``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "QRANGE",
    "static_quant_params",
    "quantize_static",
    "quantize_dynamic_per_token",
    "kronecker_transform",
    "quantize_kronecker_int4",
    "kronecker_quant",
    "round_f64_to_dtype",
    "torch_model_dtype",
]

#: (qmin, qmax) per bit width; int4 values are carried unpacked in int8.
QRANGE = {8: (-128, 127), 4: (-8, 7)}

_TORCH_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def torch_model_dtype(dtype) -> torch.dtype:
    """The torch dtype of a model dtype given by name, torch dtype or NumPy/ml_dtypes dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
        raise ValueError(f"model dtype must be float32, float16 or bfloat16, got {dtype}")
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name                # numpy / ml_dtypes dtypes and scalar types
        except TypeError:
            name = str(dtype)
    try:
        return _TORCH_DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown model dtype {dtype!r}; expected float32, float16 or bfloat16") from None


def _f32(value) -> torch.Tensor:
    """A 0-dim float32 tensor (so every scalar operation happens in float32)."""
    return torch.as_tensor(value, dtype=torch.float32).reshape(())


def static_quant_params(input_scale, input_offset, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-time W8A8 activation parameters: ``recip = dt(1 / dt(input_scale))``, ``dt(offset)``.

    Matches ``reference.activation_quant.static_quant_params`` bit-exactly: the scale is
    rounded to the model dtype ``dt`` (RNE), the reciprocal is an IEEE float32 division of
    that value, rounded to ``dt``. Returns two 0-dim float32 tensors.
    """
    dt = torch_model_dtype(dtype)
    s = torch.as_tensor(input_scale).reshape(-1)
    o = torch.as_tensor(input_offset).reshape(-1)
    if s.numel() != 1 or o.numel() != 1:
        raise ValueError(f"input_scale/input_offset must hold one value each, got {s.numel()} and {o.numel()}")
    s_dt = s.to(torch.float32).to(dt).to(torch.float32)
    recip = (torch.ones_like(s_dt) / s_dt).to(dt).to(torch.float32)
    off = o.to(torch.float32).to(dt).to(torch.float32)
    return recip.reshape(()), off.reshape(())


def _rint_sat(v: torch.Tensor, lo: int, hi: int, *, may_be_nan: bool = True) -> torch.Tensor:
    """``sat(rint(v))`` -> int8, NaN -> 0. ``v`` (float32) is consumed (modified in place)."""
    v.round_()
    if may_be_nan:
        torch.nan_to_num_(v, nan=0.0)
    v.clamp_(lo, hi)
    return v.to(torch.int8)


def quantize_static(x: torch.Tensor, recip, offset, bits: int = 8) -> torch.Tensor:
    """``q = sat(rint(f32(x) * f32(recip) + f32(offset)))`` as int8 (``npu_quantize``).

    Matches ``reference.activation_quant.quantize_static`` bit-exactly: the multiply and
    the add are two separately rounded float32 operations; NaN -> 0, +-inf saturate.
    """
    lo, hi = QRANGE[bits]
    v = x.to(torch.float32, copy=True)
    v.mul_(_f32(recip))
    v.add_(_f32(offset))
    return _rint_sat(v, lo, hi)


_QMAX_CACHE: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _qmax_like(m: torch.Tensor, qmax: int) -> torch.Tensor:
    """``qmax`` as a float32 tensor shaped like ``m`` (cached per size: one op less per call)."""
    key = (m.numel(), qmax, m.device)
    t = _QMAX_CACHE.get(key)
    if t is None:
        if len(_QMAX_CACHE) > 64:
            _QMAX_CACHE.clear()
        t = _QMAX_CACHE[key] = torch.full((m.numel(),), float(qmax), dtype=torch.float32, device=m.device)
    return t.view(m.shape)


def quantize_dynamic_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization over the last axis (``npu_dynamic_quant``).

    Matches ``reference.activation_quant.quantize_dynamic_per_token`` bit-exactly:
    ``m = max|f32(x)|``; ``r = f32(qmax) / m`` (IEEE float32 division, not a reciprocal
    multiply); ``q = clamp(rint(f32(x) * r), -qmax, qmax)`` (the clamp acts only when ``r``
    overflows for a tiny subnormal ``m``); ``scale = m / f32(qmax)``. Zero rows give
    q = 0, scale = 0; rows holding NaN/inf give q = 0, scale = NaN.
    Returns ``(q int8 [..., K], scale float32 [...])``.

    A row is finite iff its ``amax|x|`` is finite (``amax`` propagates NaN and inf), so the
    row maximum over finite entries the reference uses equals ``amax`` on every row whose
    result depends on it.
    """
    hi = QRANGE[bits][1]
    xf = x.to(torch.float32)
    lead, k = xf.shape[:-1], xf.shape[-1]
    if k == 0 or xf.numel() == 0:
        return torch.zeros(xf.shape, dtype=torch.int8), torch.zeros(lead, dtype=torch.float32)
    m = xf.abs().amax(dim=-1)                         # max |x| per row (NaN, inf propagate)
    qmax = _qmax_like(m, hi)
    r = qmax / m                                      # IEEE division per row
    if bool((r / r == 1).all()):
        # every row usable (finite m > 0) and no r overflow: r / r == 1 exactly for finite
        # r != 0 (0, inf, NaN fail). No NaN can appear and nothing needs masking: the same
        # values as the general path below in fewer ops (per-call overhead matters at M = 1)
        v = xf.mul_(r.unsqueeze(-1)) if xf is not x else xf * r.unsqueeze(-1)
        return _rint_sat(v, -hi, hi, may_be_nan=False), m / qmax
    finite = torch.isfinite(m)
    usable = finite & (m > 0)
    all_usable = bool(usable.all())
    safe_m = m if all_usable else torch.where(usable, m, torch.ones_like(m))
    r = qmax / safe_m                                 # IEEE division per row
    # r = inf when m is subnormal enough: then x*r is inf (saturates) or 0*inf = NaN (-> 0)
    may_be_nan = not bool(torch.isfinite(r).all())
    # in place when xf is our own float32 copy; never modify the caller's tensor
    v = xf.mul_(r.unsqueeze(-1)) if xf is not x else xf * r.unsqueeze(-1)
    if not all_usable:
        v.masked_fill_(~usable.unsqueeze(-1), 0.0)
    # symmetric clamp [-qmax, qmax]: reached only when r overflows (tiny subnormal m)
    q = _rint_sat(v, -hi, hi, may_be_nan=may_be_nan)
    scale = m / qmax
    if not all_usable:
        scale = torch.where(usable, scale, torch.zeros_like(scale))
        scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale


#: float32 bits that are zero whenever a float32 value is a rounding midpoint of ``dt`` (it
#: then has at most p + 1 significant bits: 9 for bfloat16, 12 for float16).
_MIDPOINT_LOW_BITS = {torch.bfloat16: 0x7FFF, torch.float16: 0xFFF}


def round_f64_to_dtype(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """Round float64 -> ``dt`` (float16/bfloat16/float32) once, ties to even.

    PyTorch narrows float64 -> half through float32 (double rounding). ``f = f32(x)`` then
    ``dt(f)`` is nevertheless the correctly rounded value unless ``f`` is exactly a rounding
    midpoint of ``dt`` while ``x`` is not: ``dt``'s values and midpoints are float32 values
    and rounding to float32 is monotonic, so ``f`` never crosses one. Midpoints have their low
    float32 bits zero (:data:`_MIDPOINT_LOW_BITS`); only the elements with those bits zero and
    ``f != x`` (rare: about 2^-12 of generic data for float16) take the exact path, which
    rounds to float32 *to odd* first (truncate, set the last bit when inexact), making the
    following RNE narrowing correctly rounded (as ``reference.rounding.round_to_dtype``).
    """
    if dt == torch.float32:
        return x.to(torch.float32)
    f = x.to(torch.float32, memory_format=torch.contiguous_format)
    out = f.to(dt)
    idx = ((f.view(torch.int32) & _MIDPOINT_LOW_BITS[dt]) == 0).reshape(-1).nonzero().reshape(-1)
    if idx.numel():
        xs = x.reshape(-1)[idx]
        inexact = f.view(-1)[idx].to(torch.float64) != xs      # f == x rounds directly
        idx, xs = idx[inexact], xs[inexact]
        if idx.numel():
            out.view(-1)[idx] = _round_f64_to_dtype_via_odd(xs, dt)
    return out


def _round_f64_to_dtype_via_odd(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The exact path of :func:`round_f64_to_dtype` (every element; ~12 passes over ``x``)."""
    f = x.to(torch.float32)
    back = f.to(torch.float64)
    finite = torch.isfinite(x) & torch.isfinite(back)
    away = finite & (back.abs() > x.abs())
    f = torch.where(away, torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = finite & (f.to(torch.float64) != x)
    bits = f.view(torch.int32) | inexact.to(torch.int32)
    return bits.view(torch.float32).to(dt)


def kronecker_transform(x: torch.Tensor, left_trans: torch.Tensor, right_trans: torch.Tensor | None,
                        dtype=None) -> torch.Tensor:
    """``float16(left^T @ X @ right)`` per token (X = the row viewed row-major as ``[L, R]``).

    ``left_trans``/``right_trans`` must already be rounded to the model dtype (prepare does
    that once) and may be float32 or float64 tensors. ``right_trans=None`` is the o_proj
    form (no right factor, ``R = K / L``). The products are evaluated in float64 and rounded
    once to float16, as ``reference.flatquant.kronecker_transform``. All tokens go through
    two GEMMs (``left^T @ [L, M R]``, then ``right^T @ [R, L M]``) rather than M small batched
    products (~2x faster at M = 256, K = 4096, one thread).

    Bound: every product of two model-dtype values is exact in float64; only the float64
    sums may be ordered differently from NumPy's. Each result therefore differs from the
    reference's float64 value by at most ``gamma * (|L|^T |X| |R|)`` with
    ``gamma = (L + R) * 2^-53``, and the float16 results can differ (by one fp16 ulp)
    only where that value lies within this distance of an fp16 rounding boundary. Where
    the float64 sums are exact (e.g. power-of-two data, identity or sign factors) the
    result is bit-exact.
    """
    m, k = x.shape
    left = left_trans.shape[0]
    right = k // left
    # [M, L, R] -> [L, M R] (reordered in the model dtype: fewer bytes than float64), so that
    # left^T multiplies every token in one GEMM. "Wide" products (64 x 64 by 64 x many) run
    # ~2x faster than "tall" ones (many x 64 by 64 x 64) in float64 here (MKL on AMD Zen 4).
    xl = x.reshape(m, left, right).transpose(0, 1).contiguous().reshape(left, m * right).to(torch.float64)
    u = torch.mm(left_trans.to(torch.float64).t(), xl)                      # [L, M R]: (L^T X_m)[a, b]
    if right_trans is None:                                                 # o_proj form
        return round_f64_to_dtype(u.reshape(left, m, right), torch.float16).transpose(0, 1).reshape(m, k)
    ur = u.reshape(left, m, right).permute(2, 0, 1).reshape(right, left * m)   # [R, L M]
    o = torch.mm(right_trans.to(torch.float64).t(), ur)                     # [R, L M]: (L^T X_m R)[a, j] at [j, (a, m)]
    # round in this layout (elementwise), then reorder the float16 result (4x fewer bytes)
    return round_f64_to_dtype(o.reshape(right, left, m), torch.float16).permute(2, 1, 0).reshape(m, k)


def quantize_kronecker_int4(xt: torch.Tensor, clip_ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped int4 quantization of the transformed (float16) activations.

    Matches ``reference.flatquant.quantize_kronecker_int4`` bit-exactly:
    ``m = max|X'|``; ``scale = f32(f32(m * clip) / 7)``; ``r = f32(f32(7 / clip) / m)``;
    ``q = sat_int4(rint(f32(X') * r))``; zero rows -> (0, 0), non-finite rows -> (0, NaN).
    Returns ``(q int8 [M, K] in [-8, 7], scale float32 [M])``.
    """
    c = _f32(torch.as_tensor(clip_ratio, dtype=torch.float32).reshape(-1)[0])
    if not (bool(torch.isfinite(c)) and 0 < float(c) <= 1):
        raise ValueError(f"clip_ratio must lie in (0, 1], got {float(c)}")
    xf = xt.to(torch.float32)
    lead = xf.shape[:-1]
    if xf.shape[-1] == 0 or xf.numel() == 0:
        return torch.zeros(xf.shape, dtype=torch.int8), torch.zeros(lead, dtype=torch.float32)
    m = xf.abs().amax(dim=-1)
    finite = torch.isfinite(m)
    usable = finite & (m > 0)
    all_usable = bool(usable.all())
    safe_m = m if all_usable else torch.where(usable, m, torch.ones_like(m))
    seven = _f32(7.0)
    r = (seven / c) / safe_m
    may_be_nan = not bool(torch.isfinite(r).all())
    v = xf.mul_(r.unsqueeze(-1)) if xf is not xt else xf * r.unsqueeze(-1)
    if not all_usable:
        v.masked_fill_(~usable.unsqueeze(-1), 0.0)
    q = _rint_sat(v, -8, 7, may_be_nan=may_be_nan)
    scale = (m * c) / seven
    if not all_usable:
        scale = torch.where(usable, scale, torch.zeros_like(scale))
        scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale


def kronecker_quant(x: torch.Tensor, left_trans: torch.Tensor, right_trans: torch.Tensor | None,
                    clip_ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """``npu_kronecker_quant``: :func:`kronecker_transform` then :func:`quantize_kronecker_int4`."""
    return quantize_kronecker_int4(kronecker_transform(x, left_trans, right_trans), clip_ratio)
