"""Activation quantization: static per-tensor (``npu_quantize``) and dynamic per-token
(``npu_dynamic_quant``), int8 and int4.

Every value here is computed with float32 operations in the order the CANN kernels
use, each operation rounded separately (no fused multiply-add), then rounded half
to even and saturated. Integer outputs are int8 arrays (int4 values in [-8, 7] are
carried unpacked in int8; pack them with :mod:`.packing` where a format needs it).

Edge values (our specification; the NPU leaves them undefined):

* an all-zero row (dynamic) quantizes to zeros with scale 0, so the linear output
  is exactly the bias;
* a row holding NaN or +-inf (dynamic) quantizes to zeros with scale NaN, so the
  output row is NaN: a non-finite activation is never hidden;
* static quantization saturates +-inf to the int8 bounds and maps NaN to 0
  (per element, the per-tensor scale is fixed).
"""

from __future__ import annotations

import numpy as np

from .rounding import INT4_MAX, INT4_MIN, INT8_MAX, INT8_MIN, quantize_rint, round_to_dtype, model_dtype

_QRANGE = {8: (INT8_MIN, INT8_MAX), 4: (INT4_MIN, INT4_MAX)}


def static_quant_params(input_scale, input_offset, dtype) -> tuple[np.float32, np.float32]:
    """The multiplier and offset vLLM Ascend's W8A8 feeds ``npu_quantize``.

    At load time ``input_scale`` and ``input_offset`` are rounded to the model dtype
    ``dt`` and the reciprocal is computed in ``dt``: ``recip = dt(1 / dt(input_scale))``
    (a division in float32, rounded to ``dt``). Returns ``(float32(recip), float32(dt(offset)))``.
    """
    dt = model_dtype(dtype)
    s = np.asarray(input_scale, dtype=np.float32).reshape(-1)
    o = np.asarray(input_offset, dtype=np.float32).reshape(-1)
    if s.size != 1 or o.size != 1:
        raise ValueError(f"input_scale/input_offset must hold one value each, got {s.size} and {o.size}")
    s_dt = round_to_dtype(s, dt).astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = round_to_dtype(np.float32(1.0) / s_dt, dt).astype(np.float32)
    off = round_to_dtype(o, dt).astype(np.float32)
    return recip[0], off[0]


def quantize_static(x: np.ndarray, recip: np.float32, offset: np.float32, bits: int = 8) -> np.ndarray:
    """``npu_quantize(div_mode=False)``: ``q = sat(rint(f32(x) * f32(recip) + f32(offset)))``.

    The multiply and the add are two separately rounded float32 operations.
    Use :func:`static_quant_params` to get ``recip`` and ``offset`` from checkpoint tensors.
    """
    lo, hi = _QRANGE[bits]
    xf = np.asarray(x).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = (xf * np.float32(recip)).astype(np.float32)
        v = (v + np.float32(offset)).astype(np.float32)
    return quantize_rint(v, lo, hi)


def row_absmax(x) -> tuple[np.ndarray, ...]:
    """Per-row statistics every per-token quantizer starts from.

    Returns ``(xf, finite, m, usable, safe_m)``: ``xf = f32(x)``; ``finite`` whether the row
    has no NaN/inf; ``m = max|xf|`` over the finite entries; ``usable = finite & (m > 0)``;
    ``safe_m`` = ``m`` where usable, else 1 (so divisions by it never warn).
    """
    xf = np.asarray(x).astype(np.float32)
    finite = np.all(np.isfinite(xf), axis=-1)
    m = np.max(np.abs(np.where(np.isfinite(xf), xf, 0)), axis=-1, initial=np.float32(0)).astype(np.float32)
    usable = finite & (m > 0)
    safe_m = np.where(usable, m, np.float32(1)).astype(np.float32)
    return xf, finite, m, usable, safe_m


def quantize_dynamic_per_token(x: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``npu_dynamic_quant``: symmetric per-row quantization over the last axis.

    ``m = max|f32(x)|``; ``r = f32(qmax) / m`` (float32 division);
    ``q = sat(rint(f32(x) * r))``; ``scale = m / f32(qmax)`` (float32), with
    ``qmax`` = 127 (int8) or 7 (int4); codes are clamped to the symmetric range
    ``[-qmax, qmax]`` (reached only when ``qmax / m`` overflows float32, i.e. for rows whose
    largest magnitude is a tiny subnormal: the codes then saturate to +-qmax and the scale
    underflows towards 0). The NPU returns ``1/r`` in some tiling paths
    and ``m * (1/qmax)`` in others (both within 1 ulp of ours); we fix ``m / qmax``.
    Zero rows -> q = 0, scale = 0; rows with NaN/inf -> q = 0, scale = NaN.
    Returns ``(q int8 [..., K], scale float32 [...])``.
    """
    _, hi = _QRANGE[bits]
    xf, finite, m, usable, safe_m = row_absmax(x)
    with np.errstate(over="ignore", invalid="ignore"):
        r = (np.float32(hi) / safe_m).astype(np.float32)
        v = (np.where(usable[..., None], xf, np.float32(0)) * r[..., None]).astype(np.float32)
    q = quantize_rint(v, -hi, hi)
    scale = np.where(usable, (m / np.float32(hi)).astype(np.float32), np.float32(0))
    scale = np.where(finite, scale, np.float32(np.nan)).astype(np.float32)
    return q, scale
