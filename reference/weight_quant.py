"""Offline weight quantization, written exactly as msModelSlim's v1 exporter lays it out.

Every public quantizer takes a float weight ``[N, K]`` (``nn.Linear`` layout: N output
rows, K input columns) and returns the layer's checkpoint tensors keyed by suffix
(``"weight"``, ``"weight_scale"``, ...), with the names, dtypes and shapes of real
msModelSlim 26.1 output (docs: msmodelslim-real-output.md). The float ``bias`` that the
exporter also writes (as ``"FLOAT"``) is not returned: the checkpoint writer copies it
for every algorithm alike.

Numerics (msModelSlim ``calculate_int_qparam`` / ``int_quantize``, ``minmax`` method):

* The weight is converted to float32 first (exact for fp16/bf16/fp32, RNE for float64)
  and every step is a separately rounded float32 operation, as msModelSlim's torch ops
  on an fp32 model (bf16/fp16 models are upcast to fp32 before quantizing on CPU).
* Ranges always contain 0: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``.
* Symmetric: ``scale = max(f32(max(-lo, hi) / qmax), FLT_EPS)`` with qmax 127 (int8) or
  7 (int4), offset 0. Asymmetric (int8): ``scale = max(f32(f32(hi/255) - f32(lo/255)),
  FLT_EPS)``, ``offset = rint(f32(-lo / scale)) - 128`` (an integer stored as float32).
* ``q = sat(rint(f32(f32(w / scale) + offset)))`` into [-128, 127] (int8) or [-8, 7]
  (int4); rint is round-half-to-even (``torch.round``). Symmetric codes stay in
  [-qmax, qmax] without saturating.
* Dequantization is ``w = (q - offset) * scale`` (msModelSlim's convention; vLLM Ascend's
  W8A16 adds the offset instead, facts doc section 1.6 / 9.1: only symmetric checkpoints agree).
* ``FLT_EPS`` = float32 machine epsilon 2**-23 is msModelSlim's floor on every scale, so a
  zero row (or group) gets scale 2**-23 (positive and finite, as checkpoint validation
  requires) and quantizes to 0 (symmetric) or to ``q == offset == -128`` (asymmetric);
  both dequantize to exactly 0.
* Per-group scales/offsets are ``[N, ceil(K / g)]``, group j covering input columns
  ``[j*g, min((j+1)*g, K))``; a ragged last group is shorter (msModelSlim's GPTQ requires
  K % g == 0; the formula per group is the same).
"""

from __future__ import annotations

import inspect

import numpy as np

from . import algorithms as A
from .flatquant import transform_shapes, transform_weight
from .packing import (
    pack_int4_offset8_to_int32,
    pack_int4_to_int8,
    unpack_int8_to_int4,
    unpack_int32_offset8_to_int4,
)
from .rounding import (
    BFLOAT16,
    FLOAT16,
    FLOAT32,
    INT4_MAX,
    INT4_MIN,
    INT8_MAX,
    INT8_MIN,
    quantize_rint,
    rint,
    round_to_dtype,
)
from .scale_encoding import encode_float32_as_int64

__all__ = [
    "FLT_EPS",
    "SCALE_BIAS_CHUNKS",
    "calibrate_input_scale_offset",
    "dequantize",
    "quantize_int4_per_channel",
    "quantize_linear",
    "quantize_per_channel_int8",
    "quantize_w4a16",
    "quantize_w4a4_dynamic",
    "quantize_w4a4_flatquant",
    "quantize_w4a8_dynamic",
    "quantize_w8a16",
    "quantize_w8a8_dynamic",
    "quantize_w8a8_mix",
    "quantize_w8a8_static",
]

#: msModelSlim's lower bound on every scale: ``torch.finfo(torch.float32).eps`` = 2**-23.
FLT_EPS = np.float32(np.finfo(np.float32).eps)
#: W4A8 row-parallel ``scale_bias`` is split into this many equal K-chunks (TP <= 16).
SCALE_BIAS_CHUNKS = 16

_F32 = np.float32
_FLOAT_INPUTS = (FLOAT16, BFLOAT16, FLOAT32, np.dtype(np.float64))
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


# ---------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------

def _first_bad_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _as_f32(x, name: str, ndim: int | None = None) -> np.ndarray:
    """Finite float array (fp16/bf16/fp32/fp64) -> float32, else ValueError naming ``name``."""
    a = np.asarray(x)
    if a.dtype not in _FLOAT_INPUTS:
        raise ValueError(
            f"{name}: expected a float16/bfloat16/float32/float64 array, got dtype {a.dtype}"
        )
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.dtype == np.float64:
        bad = ~np.isfinite(a)
        if bad.any():
            idx = _first_bad_index(bad)
            raise ValueError(f"{name}: non-finite value {a[idx]} at index {idx}")
        f = round_to_dtype(a, FLOAT32)
        over = ~np.isfinite(f)
        if over.any():
            idx = _first_bad_index(over)
            raise ValueError(f"{name}: value {float(a[idx])!r} at index {idx} overflows float32")
        return f
    f = a.astype(np.float32)
    bad = ~np.isfinite(f)
    if bad.any():
        idx = _first_bad_index(bad)
        raise ValueError(f"{name}: non-finite value {f[idx]} at index {idx}")
    return f


def _as_weight(w, name: str) -> np.ndarray:
    f = _as_f32(w, name, ndim=2)
    if f.shape[0] == 0 or f.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, K] weight, got shape {f.shape}")
    return f


def _check_group_size(group_size, name: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"{name}: expected a non-negative int, got {group_size!r}")
    if group_size < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {group_size}")
    return int(group_size)


def _scalar_f32(x, name: str) -> np.float32:
    """One finite real value (shape [], [1], ...) rounded once to float32."""
    a = np.asarray(x)
    if a.size != 1:
        raise ValueError(f"{name}: expected a single value (shape [1]), got shape {a.shape}")
    if a.dtype != BFLOAT16 and not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real number, got dtype {a.dtype}")
    v = np.float32(a.reshape(-1).astype(np.float64)[0])
    if not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite float32 value, got {a.reshape(-1)[0]}")
    return v


# ---------------------------------------------------------------------------------------
# min/max quantization primitives (float32, msModelSlim op order)
# ---------------------------------------------------------------------------------------

def _qparams(x: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """msModelSlim ``calculate_int_qparam`` over the last axis of float32 ``x``."""
    lo = np.minimum(x.min(axis=-1), _F32(0))
    hi = np.maximum(x.max(axis=-1), _F32(0))
    if symmetric:
        qmax = _F32(2 ** (bits - 1) - 1)
        scale = np.maximum(np.maximum(-lo, hi) / qmax, FLT_EPS).astype(np.float32)
        offset = np.zeros_like(scale)
    else:
        bound = _F32(2**bits - 1)
        scale = np.maximum((hi / bound) - (lo / bound), FLT_EPS).astype(np.float32)
        offset = (rint(-lo / scale) + _F32(-(2 ** (bits - 1)))).astype(np.float32)
    return scale, offset


def _quantize(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int) -> np.ndarray:
    """msModelSlim ``int_quantize``: ``sat(rint(f32(f32(x / scale) + offset)))``."""
    lo, hi = (INT8_MIN, INT8_MAX) if bits == 8 else (INT4_MIN, INT4_MAX)
    v = ((x / scale[..., None]).astype(np.float32) + offset[..., None]).astype(np.float32)
    return quantize_rint(v, lo, hi)


def _quantize_grouped(w: np.ndarray, bits: int, symmetric: bool, group_size: int):
    """Per-group (``group_size > 0``) or per-channel (0) min/max quantization of ``[N, K]``.

    Returns ``(q int8 [N, K], scale f32 [N, G], offset f32 [N, G])``. The ragged last
    group is zero-padded for the reduction: the range always contains 0, so padding
    changes neither scale nor offset.
    """
    n, k = w.shape
    g = k if group_size == 0 else min(group_size, k)
    groups = -(-k // g)
    padded = np.zeros((n, groups * g), dtype=np.float32)
    padded[:, :k] = w
    x = padded.reshape(n, groups, g)
    scale, offset = _qparams(x, bits, symmetric)
    q = _quantize(x, scale, offset, bits).reshape(n, groups * g)[:, :k]
    return np.ascontiguousarray(q), scale, offset


def quantize_per_channel_int8(w, symmetric: bool = True, *, name: str = "weight"):
    """Per-output-channel int8 min/max quantization (msModelSlim ``minmax``).

    Args:
        w: float weight ``[N, K]`` (fp16/bf16/fp32/fp64; converted to float32 first).
        symmetric: symmetric (offset 0) or asymmetric (integral offset).
        name: tensor name used in error messages.

    Returns:
        ``(q int8 [N, K], scale f32 [N, 1], offset f32 [N, 1])``.

    Numerics (float32, each op rounded):
        symmetric: ``scale = max(max|w_row| / 127, 2**-23)``, ``q = rint(w / scale)``
        (always within [-127, 127]); asymmetric: ``lo = min(w_row, 0)``,
        ``hi = max(w_row, 0)``, ``scale = max(hi/255 - lo/255, 2**-23)``,
        ``offset = rint(-lo / scale) - 128``, ``q = sat_int8(rint(w / scale + offset))``.
        Dequantize with ``(q - offset) * scale``; the error is at most ``scale/2`` plus
        float32 rounding slack (codes can saturate only within that slack).
    """
    f = _as_weight(w, name)
    return _quantize_grouped(f, 8, bool(symmetric), 0)


def quantize_int4_per_channel(w, *, name: str = "weight"):
    """Per-output-channel symmetric int4: ``scale = max(max|w_row| / 7, 2**-23)``.

    Returns ``(q int8 [N, K] with values in [-7, 7], scale f32 [N, 1])``;
    ``q = rint(f32(w / scale))`` (saturation to [-8, 7] never triggers).
    """
    f = _as_weight(w, name)
    q, scale, _ = _quantize_grouped(f, 4, True, 0)
    return q, scale


# ---------------------------------------------------------------------------------------
# W8A16 / W8A8 family
# ---------------------------------------------------------------------------------------

def quantize_w8a16(w, symmetric: bool = True, group_size: int = 0, *, name: str = "weight"):
    """W8A16: ``weight`` int8 [N, K], ``weight_scale``/``weight_offset`` f32 [N, G].

    ``group_size == 0``: per channel (G = 1, msModelSlim ``default-w8a16.yaml``).
    ``group_size = g > 0``: per group of g input columns, G = ceil(K / g), ragged last
    group allowed (msModelSlim writes per-group/asymmetric W8A16 only via GPTQ, whose
    codes differ; its scale/offset formula per group is the one used here). Offsets are
    zeros when symmetric and integral float32 values when asymmetric. The exporter
    also writes the top-level description key ``group_size`` = g.

    Dequantization: ``(weight - weight_offset) * weight_scale`` per group. vLLM Ascend's
    W8A16 computes ``(weight + weight_offset) * scale`` (facts doc 9.1): wrong for
    asymmetric checkpoints, which we do not replicate here.
    """
    g = _check_group_size(group_size)
    f = _as_weight(w, name)
    q, scale, offset = _quantize_grouped(f, 8, bool(symmetric), g)
    return {"weight": q, "weight_scale": scale, "weight_offset": offset}


def quantize_w8a8_dynamic(w, *, name: str = "weight"):
    """W8A8_DYNAMIC: ``weight`` int8 [N, K], ``weight_scale`` f32 [N, 1], zero ``weight_offset``.

    Per-channel symmetric int8 (:func:`quantize_per_channel_int8`); activations are
    quantized per token at run time.
    """
    q, scale, offset = quantize_per_channel_int8(w, True, name=name)
    return {"weight": q, "weight_scale": scale, "weight_offset": offset}


def calibrate_input_scale_offset(x_samples, *, name: str = "x_samples"):
    """Per-tensor asymmetric int8 activation parameters from calibration samples.

    Statistic (msModelSlim ``ActPerTensorMinmax`` with ``aggregation_type: max``): the
    global minimum and maximum over every value of every sample (``x_samples`` is one
    array of any shape or a sequence of arrays), the range extended to contain 0.
    Then, in float32: ``scale = max(hi/255 - lo/255, 2**-23)``,
    ``offset = rint(-lo / scale) - 128``, so that ``q = sat_int8(rint(x / scale + offset))``
    maps [lo, hi] onto [-128, 127] (vLLM Ascend quantizes with ``x * (1/scale) + offset``).

    Returns ``(input_scale f32 [1], input_offset f32 [1])`` (offset integral, in [-128, 127]).
    """
    if isinstance(x_samples, (list, tuple)):
        if not x_samples:
            raise ValueError(f"{name}: no calibration samples")
        arrays = [_as_f32(x, f"{name}[{i}]").reshape(-1) for i, x in enumerate(x_samples)]
        flat = np.concatenate(arrays)
    else:
        flat = _as_f32(x_samples, name).reshape(-1)
    if flat.size == 0:
        raise ValueError(f"{name}: no calibration values")
    scale, offset = _qparams(flat[None, :], 8, symmetric=False)
    return scale.reshape(1), offset.reshape(1)


def _static_common(w, input_scale, input_offset, bias, deq_scale_dtype, name):
    if deq_scale_dtype not in ("float32", "int64"):
        raise ValueError(
            f"deq_scale_dtype: expected 'float32' (bf16 source models) or 'int64' "
            f"(fp32/fp16 source models), got {deq_scale_dtype!r}"
        )
    q, wscale, woffset = quantize_per_channel_int8(w, True, name=name)
    n = q.shape[0]
    s_in = _scalar_f32(input_scale, "input_scale")
    if not s_in > 0:
        raise ValueError(f"input_scale: must be > 0, got {s_in}")
    o_in = _scalar_f32(input_offset, "input_offset")
    if o_in != np.rint(o_in) or not INT8_MIN <= o_in <= INT8_MAX:
        raise ValueError(f"input_offset: must be an integer in [-128, 127], got {o_in}")
    if bias is None:
        b = np.zeros(n, dtype=np.float32)
    else:
        b = _as_f32(bias, "bias", ndim=1)
        if b.shape != (n,):
            raise ValueError(f"bias: expected shape (N,) = ({n},), got {b.shape}")

    deq = (s_in * wscale[:, 0]).astype(np.float32)
    bad = ~(np.isfinite(deq) & (deq > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"deq_scale: input_scale * weight_scale = {deq[i]} at row {i} is not a positive "
            "finite float32"
        )
    # msModelSlim: round(bias / deq_scale - sum_k(q) * input_offset), all float32 torch ops.
    # The row sum is exact in int64; rounding it to float32 equals torch's float32 sum
    # whenever |sum| <= 2**24 (always for K <= 131072).
    qsum = q.astype(np.int64).sum(axis=1).astype(np.float32)
    correction = (qsum * o_in).astype(np.float32)
    with np.errstate(over="ignore"):
        v = ((b / deq).astype(np.float32) - correction).astype(np.float32)
    r = rint(v.astype(np.float64))
    bad = ~(np.isfinite(r) & (r >= _INT32_MIN) & (r <= _INT32_MAX))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"quant_bias: bias/deq_scale - input_offset*sum(q) = {v[i]} at row {i} does not fit int32"
        )
    out = {
        "weight": q,
        "quant_bias": r.astype(np.int32),
        "input_scale": np.array([s_in], dtype=np.float32),
        "input_offset": np.array([o_in], dtype=np.float32),
        "deq_scale": deq if deq_scale_dtype == "float32" else encode_float32_as_int64(deq),
    }
    return out, wscale, woffset


def quantize_w8a8_static(w, input_scale, input_offset, bias=None, deq_scale_dtype: str = "int64",
                         *, name: str = "weight"):
    """W8A8 (static per-tensor activations), real msModelSlim 26.1 tensor set.

    Returns ``weight`` int8 [N, K] (per-channel symmetric), ``input_scale`` f32 [1],
    ``input_offset`` f32 [1] (integral), ``deq_scale`` [N] and ``quant_bias`` int32 [N];
    **no** ``weight_scale``/``weight_offset`` (real output).

    Numerics (msModelSlim ``on_w8a8_static``, float32 torch ops reproduced one by one):
        ``deq_scale = f32(input_scale * weight_scale)``;
        ``quant_bias = int32(rint(f32(f32(bias / deq_scale) - f32(sum_k q[n,k] * input_offset))))``
        with ``bias = 0`` when None (bias given in any float dtype is first rounded to
        float32, the exporter's bias dtype). A result outside int32 raises ValueError.
        ``deq_scale_dtype``: ``"int64"`` stores the float32 bit pattern widened to int64
        (msModelSlim for fp32/fp16 source models, its default), ``"float32"`` stores it
        plainly (bf16 source models).
    """
    out, _, _ = _static_common(w, input_scale, input_offset, bias, deq_scale_dtype, name)
    return out


def quantize_w8a8_mix(w, input_scale, input_offset, bias=None, deq_scale_dtype: str = "int64",
                      *, name: str = "weight"):
    """W8A8_MIX ("PD-mix"): the W8A8 static set plus ``weight_scale`` f32 [N, 1] and a zero
    ``weight_offset`` f32 [N, 1] (msModelSlim ``on_w8a8_pd_mix``; vLLM Ascend runs the
    dynamic path with ``weight_scale`` unless the instance is a KV consumer)."""
    out, wscale, woffset = _static_common(w, input_scale, input_offset, bias, deq_scale_dtype, name)
    out["weight_scale"] = wscale
    out["weight_offset"] = woffset
    return out


# ---------------------------------------------------------------------------------------
# int4 family
# ---------------------------------------------------------------------------------------

def _scale_bias(deq: np.ndarray, row_parallel: bool, name: str) -> np.ndarray:
    """msModelSlim ``process_scale(name, deq_weight, 16)``: ``8 * sum_k deq[n, k]``.

    Column-parallel (q/k/v/gate/up): ``[N, 1]``. Row-parallel (o/down): the K axis is cut
    into 16 equal chunks, one sum each, ``[N, 16]``. The float32 terms are summed in
    float64 and the sum rounded once to float32 (msModelSlim sums in float32 with torch's
    order; the two agree to a few float32 ulps of ``sum |terms|``).
    """
    n, k = deq.shape
    if row_parallel:  # K % 16 == 0 checked by the caller
        parts = deq.astype(np.float64).reshape(n, SCALE_BIAS_CHUNKS, k // SCALE_BIAS_CHUNKS)
        total = parts.sum(axis=2)
    else:
        total = deq.astype(np.float64).sum(axis=1, keepdims=True)
    with np.errstate(over="ignore"):
        sb = (total.astype(np.float32) * _F32(8)).astype(np.float32)
    if not np.all(np.isfinite(sb)):
        raise ValueError(f"scale_bias: overflows float32 for {name}")
    return sb


def quantize_w4a8_dynamic(w, group_size: int = 0, row_parallel: bool = False, *, name: str = "weight"):
    """W4A8_DYNAMIC, description ``version`` "1.0.0" layout (packed along the output dim).

    ``group_size == 0`` (what msModelSlim 26.1's v1 exporter writes): direct per-channel
    float -> int4 (:func:`quantize_int4_per_channel`). Tensors:
      ``weight`` int8 [N/2, K]: byte row j = output rows 2j (low nibble) and 2j+1 (high);
      ``weight_scale`` f32 [N, 1]; ``weight_offset`` zeros f32 [N, 1];
      ``scale_bias`` f32 [N, 1] (``row_parallel=False``) or [N, 16] (True; K % 16 == 0),
      ``8 * sum_k f32(q[n,k] * scale[n])`` over all of K or over each of 16 equal K-chunks.

    ``group_size = g > 0``: msModelSlim's older two-step scheme (ComplexQuantifier with
    the new packed layout; K % g == 0 required). float -> int8 per channel (``s1``
    = ``weight_scale`` [N, 1], ``weight_offset`` zeros), then int8 -> int4 per group of g
    input columns: ``s2 = max(f32(max|q8_group| / 7), 2**-23)``, ``q4 = rint(f32(q8 / s2))``
    (in [-7, 7]); extra tensors ``weight_scale_second`` f32 [N, K/g] and
    ``weight_offset_second`` zeros **f32** [N, K/g] (old exports wrote int64; vLLM Ascend
    declares it in the model dtype and never reads it, and every offset here is float32).
    Effective weight ``q4 * s2 * s1``; ``scale_bias`` as above but over
    ``f32(f32(q4 * bf16(s2)) * bf16(s1))``: the exporter rounds both scales to bf16 there.
    N must be even.
    """
    g = _check_group_size(group_size)
    f = _as_weight(w, name)
    n, k = f.shape
    if n % 2:
        raise ValueError(f"{name}: W4A8 packs two output rows per byte; N must be even, got N={n}")
    if row_parallel and k % SCALE_BIAS_CHUNKS:
        raise ValueError(
            f"{name}: row-parallel W4A8 scale_bias needs K divisible by {SCALE_BIAS_CHUNKS}, got K={k}"
        )
    if g == 0:
        q4, s1, _ = _quantize_grouped(f, 4, True, 0)
        deq = (q4.astype(np.float32) * s1).astype(np.float32)
        extra = {}
    else:
        if k % g:
            raise ValueError(f"group_size: W4A8 per-group needs K divisible by group_size, got K={k}, g={g}")
        q8, s1, _ = _quantize_grouped(f, 8, True, 0)
        groups = k // g
        x = q8.astype(np.float32).reshape(n, groups, g)
        s2, _ = _qparams(x, 4, True)
        q4 = _quantize(x, s2, np.zeros_like(s2), 4).reshape(n, k)
        b2 = round_to_dtype(s2, BFLOAT16).astype(np.float32)
        b1 = round_to_dtype(s1, BFLOAT16).astype(np.float32)
        first = (q4.astype(np.float32).reshape(n, groups, g) * b2[..., None]).astype(np.float32)
        deq = (first.reshape(n, k) * b1).astype(np.float32)
        extra = {"weight_scale_second": s2, "weight_offset_second": np.zeros_like(s2)}
    out = {
        "weight": pack_int4_to_int8(q4, axis=0, name=name),
        "weight_scale": s1,
        "weight_offset": np.zeros_like(s1),
        "scale_bias": _scale_bias(deq, bool(row_parallel), name),
    }
    out.update(extra)
    return out


def quantize_w4a4_dynamic(w, *, name: str = "weight"):
    """W4A4_DYNAMIC: ``weight`` int8 [N, K] **unpacked** int4 in [-7, 7], ``weight_scale``
    f32 [N, 1] (``max|w_row| / 7``), zero ``weight_offset`` f32 [N, 1]."""
    q, scale = quantize_int4_per_channel(w, name=name)
    return {"weight": q, "weight_scale": scale, "weight_offset": np.zeros_like(scale)}


def quantize_w4a4_flatquant(w, left_trans, right_trans, clip_ratio, *, name: str = "weight"):
    """W4A4_FLATQUANT_DYNAMIC: transform the weight, then per-channel int4.

    The factors are first rounded to float32 (they are stored so), then
    ``W' = flatquant.transform_weight(W, left_trans, right_trans)`` (each output row
    viewed ``[L, R]`` becomes ``L^{-1} W R^{-T}``, float64) so that
    ``<left^T X right, W'> = <X, W>``; ``W'`` is rounded to float32 and quantized as
    :func:`quantize_w4a4_dynamic`. Returns ``weight`` int8 [N, K] (-7..7),
    ``weight_scale`` and zero ``weight_offset`` f32 [N, 1], ``clip_ratio`` f32 [1] (in
    (0, 1]), ``left_trans`` f32 [L, L] and, unless ``right_trans`` is None (the o_proj
    form, ``left_trans`` = [num_heads, num_heads] only), ``right_trans`` f32 [R, R].
    msModelSlim computes ``W'`` in float32 from learned factors, so only the layout (not
    the codes) can be compared with its files.
    """
    f = _as_weight(w, name)
    k = f.shape[1]
    lt = _as_f32(left_trans, "left_trans", ndim=2)
    rt = None if right_trans is None else _as_f32(right_trans, "right_trans", ndim=2)
    transform_shapes(lt, rt, k, name)
    c = _scalar_f32(clip_ratio, "clip_ratio")
    if not 0 < c <= 1:
        raise ValueError(f"clip_ratio: must lie in (0, 1], got {c}")
    for label, m in (("left_trans", lt), ("right_trans", rt)):
        if m is not None and np.linalg.matrix_rank(m.astype(np.float64)) < m.shape[0]:
            raise ValueError(f"{label}: matrix is singular; FlatQuant factors must be invertible")
    wt = transform_weight(f, lt, rt)
    out = quantize_w4a4_dynamic(wt, name=f"{name} (transformed)")
    out["clip_ratio"] = np.array([c], dtype=np.float32)
    out["left_trans"] = lt
    if rt is not None:
        out["right_trans"] = rt
    return out


def quantize_w4a16(w, group_size: int = 32, *, name: str = "weight"):
    """W4A16 in LLM-Compressor ``pack-quantized`` layout (what vLLM Ascend's W4A16 MoE reads).

    Returns ``weight_packed`` int32 [N, K/8] (``q + 8`` nibbles, 8 per word along K, element
    8j+i in bits [4i, 4i+4); K % 8 == 0 required), ``weight_scale`` f32 [N, ceil(K/g)]
    (``group_size == 0``: one group, [N, 1]), ``weight_shape`` int32 [2] = (N, K).

    Per group, symmetric: ``scale = max(f32(max|w_group| / 7), 2**-23)``,
    ``q = rint(f32(w / scale))`` in [-7, 7]; ragged last group allowed. LLM-Compressor
    itself uses ``scale = max|w| / 7.5`` with ``q = clamp(round(w / scale), -8, 7)`` (the
    full int4 range, +max clipped to 7), stores the scale in the model dtype (bf16) and
    replaces a zero scale by that dtype's eps; its checkpoints dequantize the same way.
    """
    g = _check_group_size(group_size)
    f = _as_weight(w, name)
    n, k = f.shape
    if k % 8:
        raise ValueError(f"{name}: W4A16 packs 8 int4 per int32 along K; K must be a multiple of 8, got K={k}")
    q, scale, _ = _quantize_grouped(f, 4, True, g)
    return {
        "weight_packed": pack_int4_offset8_to_int32(q, axis=1, name="weight_packed"),
        "weight_scale": scale,
        "weight_shape": np.array([n, k], dtype=np.int32),
    }


# ---------------------------------------------------------------------------------------
# dequantization and dispatch
# ---------------------------------------------------------------------------------------

def _get(tensors: dict, key: str, algo: str, dtype=None, shape=None) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"{algo}: missing tensor {key!r} (have {sorted(tensors)})")
    t = np.asarray(tensors[key])
    if dtype is not None and t.dtype != np.dtype(dtype):
        raise ValueError(f"{key}: expected dtype {np.dtype(dtype)}, got {t.dtype}")
    if shape is not None and t.shape != tuple(shape):
        raise ValueError(f"{key}: expected shape {tuple(shape)}, got {t.shape}")
    return t


def _group_columns(k: int, groups: int, group_size: int, key: str) -> np.ndarray:
    """Index of the group owning each of the K columns, for a [N, groups] scale tensor."""
    if groups == 1:
        if group_size and -(-k // group_size) != 1:
            raise ValueError(f"{key}: one group but group_size={group_size} gives ceil(K/g)={-(-k // group_size)}")
        return np.zeros(k, dtype=np.int64)
    if group_size <= 0:
        raise ValueError(f"{key}: has {groups} groups per row; pass group_size (description 'group_size')")
    if -(-k // group_size) != groups:
        raise ValueError(
            f"{key}: expected ceil(K/group_size) = ceil({k}/{group_size}) = {-(-k // group_size)} groups, got {groups}"
        )
    return np.arange(k) // group_size


def _affine(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, group_size: int, key: str) -> np.ndarray:
    n, k = q.shape
    if scale.ndim != 2 or scale.shape[0] != n:
        raise ValueError(f"{key}: expected shape (N, G) with N={n}, got {scale.shape}")
    cols = _group_columns(k, scale.shape[1], group_size, key)
    s = scale.astype(np.float64)[:, cols]
    qf = q.astype(np.float64)
    if offset is not None:
        if offset.shape != scale.shape:
            raise ValueError(f"weight_offset: expected shape {scale.shape}, got {offset.shape}")
        qf = qf - offset.astype(np.float64)[:, cols]
    return qf * s


def dequantize(algo: str, tensors: dict, group_size: int = 0) -> np.ndarray:
    """The exact float weight ``[N, K]`` (float64) a layer's checkpoint tensors represent.

    * W8A16, W8A8_DYNAMIC, W8A8_MIX, W4A4_DYNAMIC: ``(weight - weight_offset) * weight_scale``
      (per group when ``weight_scale`` has G > 1 columns: pass ``group_size``).
    * W8A8 (static): needs ``weight_scale`` (real W8A8 checkpoints have none, and
      ``deq_scale = f32(input_scale * weight_scale)`` does not give it back exactly):
      raises ValueError without it.
    * W4A8_DYNAMIC: ``weight`` unpacked along the output axis (axis 0); ``q4 * s1``, or
      ``q4 * s2[group] * s1`` when ``weight_scale_second`` is present (exact in float64).
    * W4A4_FLATQUANT_DYNAMIC: the **transformed** weight ``W' = q * weight_scale``.
    * W4A16: ``unpack(weight_packed) * weight_scale`` per group (``group_size`` needed when
      G > 1); ``weight_shape`` must match.

    Every product is exact in float64 (at most 9 + 24 + 24 significant bits).
    """
    g = _check_group_size(group_size)
    if algo in (A.W8A16, A.W8A8_DYNAMIC, A.W8A8_MIX, A.W4A4_DYNAMIC, A.W4A4_FLATQUANT_DYNAMIC, A.W8A8):
        q = _get(tensors, "weight", algo, np.int8)
        if q.ndim != 2:
            raise ValueError(f"weight: expected [N, K], got shape {q.shape}")
        if algo == A.W8A8 and "weight_scale" not in tensors:
            raise ValueError(
                "W8A8: checkpoint has no weight_scale (real msModelSlim output); the float weight "
                "is not recoverable exactly from deq_scale / input_scale"
            )
        scale = _get(tensors, "weight_scale", algo, np.float32)
        offset = None
        if "weight_offset" in tensors:
            offset = _get(tensors, "weight_offset", algo, np.float32)
        return _affine(q, scale, offset, g, "weight_scale")
    if algo == A.W4A8_DYNAMIC:
        packed = _get(tensors, "weight", algo, np.int8)
        if packed.ndim != 2:
            raise ValueError(f"weight: expected packed [N/2, K], got shape {packed.shape}")
        q = unpack_int8_to_int4(packed, axis=0)
        n, k = q.shape
        s1 = _get(tensors, "weight_scale", algo, np.float32, (n, 1)).astype(np.float64)
        if "weight_scale_second" not in tensors:
            return q.astype(np.float64) * s1
        s2 = _get(tensors, "weight_scale_second", algo, np.float32)
        if s2.ndim != 2 or s2.shape[0] != n or k % s2.shape[1]:
            raise ValueError(f"weight_scale_second: expected shape (N, K/g) with N={n}, K={k}, got {s2.shape}")
        gs = k // s2.shape[1]
        if g and g != gs:
            raise ValueError(f"weight_scale_second: {s2.shape[1]} groups imply group_size {gs}, got {g}")
        cols = np.arange(k) // gs
        return q.astype(np.float64) * s2.astype(np.float64)[:, cols] * s1
    if algo == A.W4A16:
        packed = _get(tensors, "weight_packed", algo, np.int32)
        if packed.ndim != 2:
            raise ValueError(f"weight_packed: expected [N, K/8], got shape {packed.shape}")
        q = unpack_int32_offset8_to_int4(packed, axis=1)
        shape = _get(tensors, "weight_shape", algo, np.int32, (2,))
        if tuple(int(v) for v in shape) != q.shape:
            raise ValueError(f"weight_shape: {shape.tolist()} does not match unpacked weight_packed {list(q.shape)}")
        scale = _get(tensors, "weight_scale", algo, np.float32)
        return _affine(q, scale, None, g, "weight_scale")
    raise ValueError(
        f"unsupported algorithm ID {algo!r}; supported: {', '.join(A.LINEAR_ALGORITHMS)}"
    )


_QUANTIZERS = {
    A.W8A16: quantize_w8a16,
    A.W8A8: quantize_w8a8_static,
    A.W8A8_DYNAMIC: quantize_w8a8_dynamic,
    A.W8A8_MIX: quantize_w8a8_mix,
    A.W4A8_DYNAMIC: quantize_w4a8_dynamic,
    A.W4A4_DYNAMIC: quantize_w4a4_dynamic,
    A.W4A4_FLATQUANT_DYNAMIC: quantize_w4a4_flatquant,
    A.W4A16: quantize_w4a16,
}


def quantize_linear(algo: str, w, **options) -> dict[str, np.ndarray]:
    """Quantize one linear weight ``[N, K]`` with the quantizer of algorithm ID ``algo``.

    ``options`` are that quantizer's keyword arguments (e.g. ``group_size`` for W8A16,
    ``input_scale``/``input_offset``/``bias`` for W8A8, ``left_trans``/``right_trans``/
    ``clip_ratio`` for FlatQuant). Unknown IDs or options raise ValueError listing what is
    accepted.
    """
    fn = _QUANTIZERS.get(algo)
    if fn is None:
        raise ValueError(
            f"unsupported algorithm ID {algo!r}; supported: {', '.join(A.LINEAR_ALGORITHMS)}"
        )
    params = inspect.signature(fn).parameters
    accepted = [p for p in params if p != "w"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{algo}: unknown option(s) {unknown}; accepted: {accepted}")
    missing = [p for p, v in params.items()
               if p != "w" and v.default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ValueError(f"{algo}: missing required option(s) {missing}")
    return fn(w, **options)
