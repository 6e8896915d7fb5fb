"""The quantized linear forward of every algorithm ID, from checkpoint tensors.

Each function takes ``x`` ``[M, K]`` in the model dtype ``dt`` (float32, float16 or
bfloat16) and the layer's checkpoint tensors as msModelSlim writes them (a dict keyed
by suffix: ``"weight"``, ``"weight_scale"``, ...; weights ``[N, K]``, scales float32),
and returns ``y`` ``[M, N]`` in ``dt``. :data:`EXPECTED_TENSORS` is the one table of
the tensors each algorithm reads (dtype and shape rule); :func:`validate_tensors`
checks a dict against it. Integer stages come from :mod:`.integer_gemm` and
:mod:`.activation_quant`; float epilogues are written out op by op below.
Sections cited as "facts §x" are those of the project's vllm-ascend-quantization-facts.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .activation_quant import quantize_dynamic_per_token, quantize_static, static_quant_params
from .algorithms import (
    W4A4_DYNAMIC, W4A4_FLATQUANT_DYNAMIC, W4A8_DYNAMIC, W4A16, W8A8, W8A8_DYNAMIC, W8A8_MIX, W8A16,
    check_algorithm,
)
from .flatquant import kronecker_transform, quantize_kronecker_int4, transform_shapes
from .integer_gemm import check_int32, int_matmul
from .packing import unpack_int8_to_int4, unpack_int32_offset8_to_int4
from .rounding import FLOAT32, INT4_MAX, INT4_MIN, model_dtype, round_through, round_to_dtype
from .scale_encoding import deq_scale_as_float32

__all__ = [
    "DIMENSIONS", "EXPECTED_TENSORS", "TensorSpec", "linear_forward", "resolve_group_size", "validate_tensors",
    "w4a4_dynamic_linear", "w4a4_flatquant_linear", "w4a8_dynamic_linear", "w4a16_linear",
    "w8a8_dynamic_linear", "w8a8_mix_linear", "w8a8_static_linear", "w8a16_linear",
]


# --------------------------------------------------------------------------------------
# The table of expected tensors
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor of one algorithm must look like.

    Attributes:
        dtypes: accepted NumPy dtype names.
        shapes: accepted shape rules (alternatives, first match wins); each rule is a tuple
            of dimension tokens: a symbol of :data:`DIMENSIONS` (bound on first use, equal
            afterwards), ``"X/2"`` (half of symbol X), a literal integer, or ``"*"`` (any).
        required: whether the algorithm fails without it.
        values: value rule checked by :func:`validate_tensors`: ``"scale"`` (finite and
            > 0; an int64 ``deq_scale`` is decoded first), ``"zero"`` (all zero: present in
            the file but unused by the math), ``"finite"``, ``"int4"`` (integers in
            [-8, 7]), ``"clip"`` (in (0, 1]) or ``None`` (anything).
        use: one line on the tensor's role.
    """

    dtypes: tuple[str, ...]
    shapes: tuple[tuple[str, ...], ...]
    required: bool = True
    values: str | None = None
    use: str = ""

    def describe(self) -> str:
        shapes = " or ".join(_rule_text(r) for r in self.shapes)
        return f"{' or '.join(self.dtypes)}, shape {shapes}"


#: Symbols used in shape rules.
DIMENSIONS: dict[str, str] = {
    "N": "output features",
    "K": "input features (the width of x)",
    "G": "groups of weight_scale along K (1 = per-channel)",
    "G2": "groups of weight_scale_second along K (W4A8 two-step per-group)",
    "P": "int32 words per weight row (W4A16 pack-quantized, ceil(K/8))",
    "C": "columns of W4A8 scale_bias (1 for q/k/v/gate/up, 16 for o/down)",
    "L": "FlatQuant left factor size",
    "R": "FlatQuant right factor size (L*R = K)",
}

_F32 = ("float32",)
_FLOATS = ("float32", "float16", "bfloat16")
_SCALAR = ((), ("1",))
_NK = (("N", "K"),)
_N1 = (("N", "1"),)

_WEIGHT_I8 = TensorSpec(("int8",), _NK, use="int8 weight [out, in]")
_WEIGHT_I4 = TensorSpec(("int8",), _NK, values="int4", use="int4 values, one per int8 byte")
_SCALE_N1 = TensorSpec(_F32, _N1, values="scale", use="per-channel weight scale")
_ZERO_OFFSET_N1 = TensorSpec(_F32, _N1, required=False, values="zero",
                             use="symmetric weights: written as zeros, not used")
_STATIC = {
    "input_scale": TensorSpec(_F32, _SCALAR, values="scale", use="per-tensor activation scale"),
    "input_offset": TensorSpec(("float32", "int8"), _SCALAR, values="finite",
                               use="per-tensor activation offset (integral; added in the quantized domain)"),
    "deq_scale": TensorSpec(("int64", "float32"), (("N",),), values="scale",
                            use="input_scale * weight_scale; int64 = float32 bits widened"),
    "quant_bias": TensorSpec(("int32",), (("N",),),
                             use="round(bias/deq_scale - input_offset*sum_k W[n,k]) (float bias folded in)"),
}

#: Per algorithm ID: checkpoint suffix -> :class:`TensorSpec`, in checking order.
EXPECTED_TENSORS: dict[str, dict[str, TensorSpec]] = {
    W8A16: {
        "weight": _WEIGHT_I8,
        "weight_scale": TensorSpec(_F32, (("N", "G"),), values="scale",
                                   use="per-channel (G=1) or per-group weight scale"),
        "weight_offset": TensorSpec(_F32, (("N", "G"),), values="finite",
                                    use="weight zero point: w = (q - offset) * scale"),
    },
    W4A16: {
        "weight_packed": TensorSpec(("int32",), (("N", "P"),),
                                    use="pack-quantized int4 (q + 8, 8 per int32 along K)"),
        "weight_scale": TensorSpec(_FLOATS, (("N", "G"),), values="scale",
                                   use="per-group (or per-channel) weight scale"),
        "weight_shape": TensorSpec(("int32", "int64"), (("2",),), required=False,
                                   use="(N, K) of the unpacked weight"),
    },
    W8A8: {
        "weight": _WEIGHT_I8,
        **_STATIC,
        "weight_scale": TensorSpec(_F32, _N1, required=False, values="scale", use="not used by W8A8"),
        "weight_offset": _ZERO_OFFSET_N1,
    },
    W8A8_DYNAMIC: {
        "weight": _WEIGHT_I8,
        "weight_scale": _SCALE_N1,
        "weight_offset": _ZERO_OFFSET_N1,
    },
    W8A8_MIX: {
        "weight": _WEIGHT_I8,
        **_STATIC,
        "weight_scale": TensorSpec(_F32, _N1, values="scale", use="weight scale of the dynamic path"),
        "weight_offset": _ZERO_OFFSET_N1,
    },
    W4A8_DYNAMIC: {
        # weight_scale first: it fixes N, which tells the packed from the unpacked layout
        "weight_scale": TensorSpec(_F32, _N1, values="scale",
                                   use="per-channel scale (first step of two-step per-group)"),
        "weight": TensorSpec(("int8",), (("N/2", "K"), ("N", "K")),
                             use="int4 packed 2 per byte along N (v1.0.0), or 1 per byte (older exports)"),
        "weight_scale_second": TensorSpec(_F32, (("N", "G2"),), required=False, values="scale",
                                          use="per-group second-step scale"),
        "weight_offset": _ZERO_OFFSET_N1,
        "weight_offset_second": TensorSpec(("float32", "int64", "int32", "float16", "bfloat16"),
                                           (("N", "G2"),), required=False, values="zero",
                                           use="symmetric: zeros, not used"),
        "scale_bias": TensorSpec(_F32, (("N", "C"),), required=False,
                                 use="A8W4 kernel split correction 8*sum_k w; not used by the math"),
    },
    W4A4_DYNAMIC: {
        "weight": _WEIGHT_I4,
        "weight_scale": _SCALE_N1,
        "weight_offset": _ZERO_OFFSET_N1,
    },
    W4A4_FLATQUANT_DYNAMIC: {
        "weight": _WEIGHT_I4,
        "weight_scale": _SCALE_N1,
        "weight_offset": _ZERO_OFFSET_N1,
        "left_trans": TensorSpec(_FLOATS, (("L", "L"),), values="finite", use="P_L as learned"),
        "right_trans": TensorSpec(_FLOATS, (("R", "R"),), required=False, values="finite",
                                  use="P_R as learned; absent for o_proj"),
        "clip_ratio": TensorSpec(_F32, _SCALAR, values="clip", use="activation clipping ratio"),
    },
}


def _rule_text(rule: tuple[str, ...]) -> str:
    if len(rule) == 1:
        return f"({rule[0]},)"
    return "(" + ", ".join(rule) + ")"


def _dim_value(token: str, dims: dict[str, int]) -> int | None:
    """The value a token stands for given the bound dims (None if unknown)."""
    if token.isdigit():
        return int(token)
    if "/" in token:
        sym, div = token.split("/")
        return dims[sym] // int(div) if sym in dims and dims[sym] % int(div) == 0 else None
    return dims.get(token)


def _unify(rule: tuple[str, ...], shape: tuple[int, ...], dims: dict[str, int]) -> dict[str, int] | None:
    """Bindings extending ``dims`` under which ``shape`` matches ``rule``, or None."""
    if len(rule) != len(shape):
        return None
    out = dict(dims)
    for token, v in zip(rule, shape):
        if token == "*":
            continue
        if token.isdigit():
            if v != int(token):
                return None
            continue
        sym, div = (token.split("/")[0], int(token.split("/")[1])) if "/" in token else (token, 1)
        if sym in out:
            if out[sym] != v * div:
                return None
        else:
            if v <= 0:
                return None
            out[sym] = v * div
    return out


def _resolved(rule: tuple[str, ...], dims: dict[str, int]) -> str:
    vals = [_dim_value(t, dims) if t != "*" else None for t in rule]
    parts = [str(v) if v is not None else t for v, t in zip(vals, rule)]
    return "(" + ", ".join(parts) + (",)" if len(parts) == 1 else ")")


def _shape_error(name: str, spec: TensorSpec, shape: tuple[int, ...], dims: dict[str, int]) -> str:
    alts = " or ".join(f"{_rule_text(r)} = {_resolved(r, dims)}" if _rule_text(r) != _resolved(r, dims)
                       else _rule_text(r) for r in spec.shapes)
    hint = " (dimensions must be positive)" if 0 in shape else ""
    return f"{name}: expected shape {alts}, got {shape}{hint}"


def _check_values(algo: str, name: str, spec: TensorSpec, a: np.ndarray) -> None:
    if spec.values is None or a.size == 0:
        return
    if spec.values == "scale":
        f = deq_scale_as_float32(a, name) if a.dtype == np.int64 else a.astype(np.float64)
        bad = ~(np.isfinite(f) & (f > 0))
        if bad.any():
            i = np.unravel_index(int(np.argmax(bad)), f.shape)
            raise ValueError(f"{name}: scales must be finite and > 0, found {float(f[i])!r} at index "
                             f"{tuple(map(int, i))}")
    elif spec.values == "zero":
        nz = a.astype(np.float64) != 0
        if nz.any():
            i = np.unravel_index(int(np.argmax(nz)), a.shape)
            raise ValueError(
                f"{name}: {algo} weights are symmetric, so {name} must be all zeros (it is not used by the "
                f"math; vLLM Ascend ignores it), found {float(a[i])!r} at index {tuple(map(int, i))}"
            )
    elif spec.values == "finite":
        if not np.isfinite(a.astype(np.float64)).all():
            raise ValueError(f"{name}: values must be finite")
    elif spec.values == "int4":
        lo, hi = int(a.min()), int(a.max())
        if lo < INT4_MIN or hi > INT4_MAX:
            raise ValueError(
                f"{name}: {algo} weights are int4 values in [{INT4_MIN}, {INT4_MAX}] (one per int8), "
                f"found range [{lo}, {hi}]"
            )
    elif spec.values == "clip":
        c = a.astype(np.float64).reshape(-1)
        if not (np.isfinite(c).all() and (c > 0).all() and (c <= 1).all()):
            raise ValueError(f"{name}: clip ratio must lie in (0, 1], got {c.tolist()}")


def validate_tensors(algo: str, tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Check a layer's tensors against :data:`EXPECTED_TENSORS` ``[algo]``.

    Checks, in table order: no unknown names (a ``"bias"`` entry is refused: pass the
    float bias as ``bias=``), every required tensor present, dtype, shape rule (binding
    the symbols of :data:`DIMENSIONS` on first use) and value rule. Returns the bound
    dimensions (``{"N": ..., "K": ..., ...}``). Raises ``ValueError`` naming the tensor.
    """
    check_algorithm(algo, "linear")
    table = EXPECTED_TENSORS[algo]
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors: expected a dict of checkpoint tensors, got {type(tensors).__name__}")
    needed = ", ".join(k for k, s in table.items() if s.required)
    optional = ", ".join(k for k, s in table.items() if not s.required) or "none"
    for key in tensors:
        if key == "bias":
            raise ValueError(
                "bias: the float bias is not a checkpoint tensor of the quantized layer here; pass it as "
                "bias= (W8A8 static ignores it: it is folded into quant_bias)"
            )
        if key not in table:
            raise ValueError(f"{key}: not a tensor of {algo}; expected {needed} (optional: {optional})")
    for key, spec in table.items():
        if spec.required and key not in tensors:
            raise ValueError(f"{key}: missing tensor for {algo}; {algo} needs {needed} (optional: {optional})")
    dims: dict[str, int] = {}
    for key, spec in table.items():
        if key not in tensors:
            continue
        a = np.asarray(tensors[key])
        if a.dtype.name not in spec.dtypes:
            raise ValueError(f"{key}: expected dtype {' or '.join(spec.dtypes)}, got {a.dtype}")
        for rule in spec.shapes:
            bound = _unify(rule, a.shape, dims)
            if bound is not None:
                dims = bound
                break
        else:
            raise ValueError(_shape_error(key, spec, a.shape, dims))
        _check_values(algo, key, spec, a)
    return dims


# --------------------------------------------------------------------------------------
# Shared checks and helpers
# --------------------------------------------------------------------------------------

def _check_x(x, dt: np.dtype, k: int) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != dt:
        raise ValueError(f"x: dtype {x.dtype} differs from the model dtype {dt}")
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-D [M, K] array with K = {k}, got shape {x.shape}")
    if x.shape[1] != k:
        raise ValueError(f"x: width {x.shape[1]} does not match the weight's input features K = {k}")
    return x


def _bias_f32(bias, dt: np.dtype, n: int) -> np.ndarray | None:
    """The float bias as vLLM holds it (a model-dtype parameter), as exact float32 values."""
    if bias is None:
        return None
    b = np.asarray(bias)
    if b.dtype not in (dt, FLOAT32):
        raise ValueError(f"bias: expected dtype {dt} (model dtype) or float32, got {b.dtype}")
    if b.shape != (n,):
        raise ValueError(f"bias: expected shape (N,) = ({n},), got {b.shape}")
    return round_to_dtype(b, dt).astype(np.float32)


def _scale_in_dtype(name: str, scale: np.ndarray, dt: np.dtype) -> np.ndarray:
    """vLLM Ascend's load-time rounding of a model-dtype scale; refuse scales it destroys."""
    s = round_through(scale, dt)
    bad = ~(np.isfinite(s) & (s > 0))
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), s.shape)
        raise ValueError(
            f"{name}: scale {float(np.asarray(scale)[i])!r} at index {tuple(map(int, i))} becomes {float(s[i])!r} "
            f"when "
            f"rounded to the model dtype {dt} at load"
        )
    return s


def resolve_group_size(name: str, k: int, groups: int, group_size: int | None) -> int:
    """Group size along K of a ``[N, groups]`` scale (``groups == 1``: per-channel, g = K).

    ``group_size=None`` infers ``K / groups``, which is only unambiguous when it divides K.
    ``group_size=0`` (msModelSlim's top-level value for per-channel) means per-channel.
    With a ragged last group, ``groups == ceil(K / group_size)``.
    """
    if group_size is None:
        if k % groups:
            raise ValueError(
                f"{name}: {groups} groups do not divide K={k}, so the group size is ambiguous; "
                "pass group_size (the description's top-level group_size)"
            )
        return k // groups
    g = int(group_size)
    if g < 0:
        raise ValueError(f"group_size: must be >= 0, got {g}")
    if g == 0 or g >= k:
        g = k
    if -(-k // g) != groups:
        raise ValueError(f"{name}: group_size {group_size} gives ceil(K/g) = {-(-k // g)} groups for K={k}, "
                         f"but the tensor has {groups}")
    return g


def _expand_groups(a: np.ndarray, g: int, k: int) -> np.ndarray:
    """``[N, G]`` per-group values -> ``[N, K]`` (column k takes group k // g)."""
    return np.repeat(a, g, axis=1)[:, :k]


def _empty(n: int, dt: np.dtype) -> np.ndarray:
    return np.zeros((0, n), dtype=dt)


def _float64_matmul_once(x: np.ndarray, w_deq: np.ndarray, bias32: np.ndarray | None, dt) -> np.ndarray:
    y = x.astype(np.float64) @ w_deq.T
    if bias32 is not None:
        y = y + bias32.astype(np.float64)[None, :]
    return round_to_dtype(y, dt)


def _pertoken_epilogue(t: np.ndarray, s_tok: np.ndarray, bias32: np.ndarray | None, dt) -> np.ndarray:
    """``dt((t * s_tok[m]) + f32(bias[n]))``: float32 ops, each rounded, then RNE to dt."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = (t * s_tok[:, None]).astype(np.float32)
        if bias32 is not None:
            y = (y + bias32[None, :]).astype(np.float32)
    return round_to_dtype(y, dt)


def _acc_times_scale(acc: np.ndarray, s_w: np.ndarray) -> np.ndarray:
    """``f32(acc) * s_w[n]`` as one float32 multiply (int32 -> float32 conversion is RNE)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (acc.astype(np.float32) * s_w[None, :]).astype(np.float32)


# --------------------------------------------------------------------------------------
# Weight-only
# --------------------------------------------------------------------------------------

def w8a16_linear(x, tensors, *, dtype, bias=None, group_size=None) -> np.ndarray:
    """W8A16 (weight-only int8) linear: ``y = x @ ((q - offset) * scale)^T + bias``.

    Numerics (``dt`` = model dtype):
      1. ``s = f32(dt(weight_scale))``, ``o = f32(dt(weight_offset))``: vLLM Ascend declares
         both in ``dt``, so the checkpoint's float32 values are rounded at load (facts §1.1).
      2. ``w[n, k] = (f64(q[n, k]) - f64(o[n, g(k)])) * f64(s[n, g(k)])`` with
         ``g(k) = k // group_size``; exact in float64 for integral offsets.
      3. ``y = dt(sum_k f64(x[m, k]) * w[n, k] + f64(dt(bias[n])))``, evaluated in float64
         and rounded once (RNE) to ``dt``.

    Scale shapes: ``[N, 1]`` per-channel or ``[N, G]`` per-group, ``G = ceil(K / g)``
    (the last group may be ragged; pass ``group_size`` then, see ``resolve_group_size``).

    Offset sign: msModelSlim defines ``w = (q - weight_offset) * weight_scale``; vLLM Ascend
    passes ``weight_offset`` unnegated to ``npu_weight_quant_batchmatmul``, which *adds* it
    (facts §1.6, §5.1, §9.1), so it is right only for symmetric (zero-offset) checkpoints.
    We deliberately follow the producer. vLLM Ascend supports only per-channel W8A16; we
    also do per-group (msModelSlim GPTQ exports).

    Float stage: the NPU's in-kernel precision is undocumented (facts §2.4). This is the
    exact value rounded once (up to the float64 summation error, <= K*2^-53*sum|x*w|), so
    backends are compared within a bound, not bit-exactly.
    """
    dt = model_dtype(dtype)
    dims = validate_tensors(W8A16, tensors)
    n, k = dims["N"], dims["K"]
    x = _check_x(x, dt, k)
    bias32 = _bias_f32(bias, dt, n)
    g = resolve_group_size("weight_scale", k, dims["G"], group_size)
    s = _scale_in_dtype("weight_scale", tensors["weight_scale"], dt)
    o = round_through(tensors["weight_offset"], dt)
    if not np.isfinite(o).all():
        raise ValueError(f"weight_offset: an offset overflows the model dtype {dt} at load")
    if x.shape[0] == 0:
        return _empty(n, dt)
    q = np.asarray(tensors["weight"]).astype(np.float64)
    w = (q - _expand_groups(o.astype(np.float64), g, k)) * _expand_groups(s.astype(np.float64), g, k)
    return _float64_matmul_once(x, w, bias32, dt)


def w4a16_linear(x, tensors, *, dtype, bias=None, group_size=None) -> np.ndarray:
    """W4A16 (weight-only int4, LLM-Compressor pack-quantized) linear.

    Numerics (``dt`` = model dtype):
      1. ``q = unpack_int32_offset8_to_int4(weight_packed, axis=1)`` ``[N, 8P]`` (stored
         ``q + 8``, 8 per int32 along K), cropped to ``K = weight_shape[1]`` when
         ``weight_shape`` is given (else ``K = 8P``).
      2. ``s = f32(dt(weight_scale))`` (vLLM Ascend's W4A16 scale parameter is ``dt``).
      3. ``w[n, k] = f64(q[n, k]) * f64(s[n, g(k)])`` (exact); no offset (symmetric;
         vLLM Ascend's offsets are zeros).
      4. ``y = dt(sum_k f64(x) * w + f64(dt(bias)))``, float64, rounded once to ``dt``.

    ``group_size`` is inferred from ``weight_scale``'s shape when None (vLLM Ascend reads
    the description's ``group_size``, default 32). vLLM Ascend has W4A16 only for MoE
    (facts §5.8); we also implement linear layers with the same per-expert math. Float
    stage: backends are bounded, not bit-exact (as :func:`w8a16_linear`).
    """
    dt = model_dtype(dtype)
    dims = validate_tensors(W4A16, tensors)
    n, words = dims["N"], dims["P"]
    k = 8 * words
    if "weight_shape" in tensors:
        ws = np.asarray(tensors["weight_shape"]).astype(np.int64).tolist()
        if ws[0] != n or not (0 < ws[1] <= k and -(-ws[1] // 8) == words):
            raise ValueError(f"weight_shape: {ws} does not describe weight_packed of shape {(n, words)} "
                             f"(expected [N, K] with N = {n} and ceil(K/8) = {words})")
        k = ws[1]
    x = _check_x(x, dt, k)
    bias32 = _bias_f32(bias, dt, n)
    g = resolve_group_size("weight_scale", k, dims["G"], group_size)
    s = _scale_in_dtype("weight_scale", tensors["weight_scale"], dt)
    if x.shape[0] == 0:
        return _empty(n, dt)
    q = unpack_int32_offset8_to_int4(np.asarray(tensors["weight_packed"]), axis=1)[:, :k]
    w = q.astype(np.float64) * _expand_groups(s.astype(np.float64), g, k)
    return _float64_matmul_once(x, w, bias32, dt)


# --------------------------------------------------------------------------------------
# int8 activations
# --------------------------------------------------------------------------------------

def _w8a8_static(algo: str, x, tensors, dt, add_quant_bias: bool) -> np.ndarray:
    dims = validate_tensors(algo, tensors)
    n, k = dims["N"], dims["K"]
    x = _check_x(x, dt, k)
    s_in = round_through(tensors["input_scale"], dt)
    if not (np.isfinite(s_in).all() and (s_in > 0).all()):
        raise ValueError(f"input_scale: {np.asarray(tensors['input_scale']).tolist()} becomes "
                         f"{s_in.tolist()} when rounded to the model dtype {dt} at load")
    recip, off = static_quant_params(tensors["input_scale"], tensors["input_offset"], dt)
    if not (np.isfinite(recip) and np.isfinite(off)):
        raise ValueError(f"input_scale/input_offset: 1/input_scale = {recip} or offset = {off} is not finite "
                         f"in the model dtype {dt}")
    deq = deq_scale_as_float32(tensors["deq_scale"], "deq_scale")
    if x.shape[0] == 0:
        return _empty(n, dt)
    xq = quantize_static(x, recip, off)
    acc = int_matmul(xq, np.asarray(tensors["weight"]), name=f"{algo} accumulator")
    if add_quant_bias:
        acc = acc + np.asarray(tensors["quant_bias"]).astype(np.int64)[None, :]
        check_int32(acc, f"{algo} accumulator + quant_bias")
    with np.errstate(over="ignore"):
        y = (acc.astype(np.float32) * deq[None, :]).astype(np.float32)
    # the codes saturate per element (npu_quantize), but a row holding NaN or +-inf gives a NaN
    # row, as the per-token algorithms do: a non-finite activation is never hidden
    y[~np.all(np.isfinite(x.astype(np.float32)), axis=1)] = np.float32(np.nan)
    return round_to_dtype(y, dt)


def w8a8_static_linear(x, tensors, *, dtype, add_quant_bias=True) -> np.ndarray:
    """W8A8 (static per-tensor int8 activations) linear, vLLM Ascend §5.2.

    Numerics (``dt`` = model dtype):
      1. ``(recip, off) = static_quant_params(input_scale, input_offset, dt)``:
         ``recip = f32(dt(1 / dt(input_scale)))``, ``off = f32(dt(input_offset))``.
      2. ``xq = sat_int8(rint(f32(f32(x) * recip) + off))`` (``quantize_static``, §2.2).
      3. ``acc = sum_k xq * weight`` exact int32; ``+ quant_bias[n]`` (int32 add,
         range-checked) when ``add_quant_bias``.
      4. ``deq = deq_scale`` as float32 (int64 words decoded as the float32 bit pattern).
      5. ``y = dt(f32(acc) * deq[n])``: one float32 multiply, then RNE to ``dt``.

    ``add_quant_bias``: vLLM Ascend adds ``quant_bias`` only on TP rank 0 of a
    RowParallel layer (so the all-reduce adds it once); pass False for the other ranks.
    There is no float ``bias`` argument: msModelSlim folds the float bias into
    ``quant_bias``; real checkpoints also write the FLOAT ``bias``, and adding it again
    would double it (vLLM Ascend ignores it too, facts §9.3).

    Not emulated: the NPU fixpipe probably consumes an int64 ``deq_scale`` with FP19
    precision (top 19 bits, facts §1.5, §9.7); we use the full float32 value, so int64 and
    float32 ``deq_scale`` give identical outputs here. Edge values: the codes follow
    ``npu_quantize`` per element (NaN -> 0, +-inf and values past the scale's range saturate
    to 127 / -128), but a row holding NaN or +-inf gives a NaN output row (our
    specification, as the per-token algorithms: a non-finite activation is never hidden).
    """
    return _w8a8_static(W8A8, x, tensors, model_dtype(dtype), add_quant_bias)


def _w8a8_dynamic(algo: str, x, tensors, dt, bias) -> np.ndarray:
    dims = validate_tensors(algo, tensors)
    n, k = dims["N"], dims["K"]
    x = _check_x(x, dt, k)
    bias32 = _bias_f32(bias, dt, n)
    s_w = _scale_in_dtype("weight_scale", tensors["weight_scale"], dt).reshape(-1)
    if x.shape[0] == 0:
        return _empty(n, dt)
    xq, s_tok = quantize_dynamic_per_token(x, 8)
    acc = int_matmul(xq, np.asarray(tensors["weight"]), name=f"{algo} accumulator")
    return _pertoken_epilogue(_acc_times_scale(acc, s_w), s_tok, bias32, dt)


def w8a8_dynamic_linear(x, tensors, *, dtype, bias=None) -> np.ndarray:
    """W8A8_DYNAMIC (per-token int8 activations) linear, vLLM Ascend §5.3.

    Numerics (``dt`` = model dtype):
      1. ``(xq, s_tok) = quantize_dynamic_per_token(x, 8)`` (``npu_dynamic_quant``, §2.1).
      2. ``acc = sum_k xq * weight``, exact int32.
      3. ``s_w = f32(dt(weight_scale))`` ``[N]`` (a ``dt`` parameter, rounded at load).
      4. ``y = dt(((f32(acc) * s_w[n]) * s_tok[m]) + f32(dt(bias[n])))``: three float32
         ops, each rounded, in this order (the pertoken ``npu_quant_matmul`` kernel, §2.3),
         then RNE to ``dt``. No bias: the add is skipped.

    Same as vLLM Ascend. A zero row of ``x`` gives exactly the bias; a row with NaN/inf
    gives a NaN row (``s_tok`` is NaN; our specification, the NPU leaves it undefined).
    """
    return _w8a8_dynamic(W8A8_DYNAMIC, x, tensors, model_dtype(dtype), bias)


def w8a8_mix_linear(x, tensors, *, dtype, bias=None, kv_consumer=False, add_quant_bias=True) -> np.ndarray:
    """W8A8_MIX ("PD-mix") linear, vLLM Ascend §5.4.

    ``kv_consumer=True`` (a decode-only instance in PD disaggregation): the static path,
    exactly :func:`w8a8_static_linear` (``quant_bias`` per ``add_quant_bias``; the float
    ``bias`` is ignored, it is folded into ``quant_bias``). Otherwise the dynamic path,
    exactly :func:`w8a8_dynamic_linear` with the checkpoint's ``weight_scale`` (rounded to
    ``dt``) and the float ``bias``. The checkpoint holds both sets of tensors; all are
    validated whichever path runs.
    """
    dt = model_dtype(dtype)
    if kv_consumer:
        return _w8a8_static(W8A8_MIX, x, tensors, dt, add_quant_bias)
    return _w8a8_dynamic(W8A8_MIX, x, tensors, dt, bias)


def w4a8_dynamic_linear(x, tensors, *, dtype, bias=None, group_size=None) -> np.ndarray:
    """W4A8_DYNAMIC linear: per-token int8 activations x int4 weights.

    Numerics (``dt`` = model dtype):
      1. Weight ``q`` ``[N, K]``: ``unpack_int8_to_int4(weight, axis=0)`` for the msModelSlim
         v1.0.0 layout ``[N/2, K]`` (byte row j = output rows 2j low nibble, 2j+1 high);
         an ``[N, K]`` weight (older exports) already holds one int4 per byte.
      2. ``(xq, s_tok) = quantize_dynamic_per_token(x, 8)``.
      3. Scales stay float32 (not rounded to ``dt``: as vLLM Ascend's MoE/A8W4 kernel path).
         Per-channel: ``S[0, n] = weight_scale[n]``, one group ``g = K``. Two-step per-group
         (``weight_scale_second`` ``[N, G]`` present):
         ``S[g, n] = f32(weight_scale[n] * weight_scale_second[n, g])``.
      4. Per group ``g``: ``acc_g = sum_{k in g} xq * q`` exact int32;
         ``t[m, n] = f32(sum_g f64(f32(acc_g)) * f64(S[g, n]))``: each product is exact in
         float64, summed in increasing g, rounded once to float32. With one group this is
         exactly the float32 product ``f32(acc) * S`` (the pertoken kernel's first op).
      5. ``y = dt((t * s_tok[m]) + f32(dt(bias[n])))``: float32 ops, then RNE to ``dt``.

    Departures from vLLM Ascend (decided by the project lead): its W4A8 *linear* path
    (facts §5.6, §9.2) runs a weight-only matmul on unquantized activations and drops the
    layer bias; we quantize activations per token, as the algorithm is defined and as the
    MoE path does (§6.3), and add the bias. Its MoE A8W4 kernel splits activations into
    int4 halves and accumulates groups in fp16 (§2.5, §9.6); we use the exact products.
    ``scale_bias`` (that kernel's split correction ``8 * sum_k w``) is validated but not
    used. Offsets (``weight_offset``, ``weight_offset_second``) must be zero.
    """
    dt = model_dtype(dtype)
    dims = validate_tensors(W4A8_DYNAMIC, tensors)
    n, k = dims["N"], dims["K"]
    x = _check_x(x, dt, k)
    bias32 = _bias_f32(bias, dt, n)
    w = np.asarray(tensors["weight"])
    if w.shape[0] == n:
        _check_values(W4A8_DYNAMIC, "weight", EXPECTED_TENSORS[W4A4_DYNAMIC]["weight"], w)
        q = w
    else:
        q = unpack_int8_to_int4(w, axis=0)
    s1 = np.asarray(tensors["weight_scale"], dtype=np.float32).reshape(n, 1)
    if "weight_scale_second" in tensors:
        g = resolve_group_size("weight_scale_second", k, dims["G2"], group_size)
        s2 = np.asarray(tensors["weight_scale_second"], dtype=np.float32)
        with np.errstate(over="ignore", under="ignore"):
            s = (s1 * s2).astype(np.float32)  # [N, G]
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise ValueError("weight_scale * weight_scale_second: a combined scale under- or overflows float32")
    else:
        if group_size not in (None, 0) and int(group_size) < k:
            raise ValueError(f"group_size: {group_size} given but there is no weight_scale_second "
                             "(per-channel checkpoint)")
        g, s = k, s1
    if x.shape[0] == 0:
        return _empty(n, dt)
    xq, s_tok = quantize_dynamic_per_token(x, 8)
    t64 = np.zeros((x.shape[0], n), dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for gi in range(s.shape[1]):
            sl = slice(gi * g, min((gi + 1) * g, k))
            acc = int_matmul(xq[:, sl], q[:, sl], name=f"W4A8_DYNAMIC accumulator (group {gi})")
            t64 = t64 + acc.astype(np.float32).astype(np.float64) * s[:, gi].astype(np.float64)[None, :]
        t = t64.astype(np.float32)
    return _pertoken_epilogue(t, s_tok, bias32, dt)


# --------------------------------------------------------------------------------------
# int4 activations
# --------------------------------------------------------------------------------------

def w4a4_dynamic_linear(x, tensors, *, dtype, bias=None) -> np.ndarray:
    """W4A4_DYNAMIC ("LAOS") linear: per-token int4 activations x int4 weights.

    Numerics (``dt`` = model dtype):
      1. ``(xq, s) = quantize_dynamic_per_token(x, 4)``: ``s = m / 7``,
         ``q = sat_int4(rint(f32(x) * f32(7 / m)))``.
      2. ``acc = sum_k xq * weight`` exact int32 (weight: int4 values in int8, [-8, 7]).
      3. ``s_w = weight_scale`` float32, not rounded (vLLM Ascend keeps it float32, §5.10).
      4. ``y = dt(((f32(acc) * s_w[n]) * s[m]) + f32(dt(bias[n])))``: float32 ops, then RNE.

    Deliberate fix: vLLM Ascend runs ``npu_quant_matmul(..., output_dtype=float16)``, then
    ``.to(dt)``, then adds the bias in ``dt`` (facts §5.10): a double rounding for bf16
    models, an fp16 overflow above 65504, and a third rounding for the bias add. We drop the
    fp16 intermediate and add the bias in float32 before one final rounding.
    """
    dt = model_dtype(dtype)
    dims = validate_tensors(W4A4_DYNAMIC, tensors)
    n, k = dims["N"], dims["K"]
    x = _check_x(x, dt, k)
    bias32 = _bias_f32(bias, dt, n)
    s_w = np.asarray(tensors["weight_scale"], dtype=np.float32).reshape(-1)
    if x.shape[0] == 0:
        return _empty(n, dt)
    xq, s_tok = quantize_dynamic_per_token(x, 4)
    acc = int_matmul(xq, np.asarray(tensors["weight"]), name="W4A4_DYNAMIC accumulator")
    return _pertoken_epilogue(_acc_times_scale(acc, s_w), s_tok, bias32, dt)


def w4a4_flatquant_linear(x, tensors, *, dtype, bias=None) -> np.ndarray:
    """W4A4_FLATQUANT_DYNAMIC linear: Kronecker transform, per-token int4, int4 weights.

    Numerics (``dt`` = model dtype):
      1. ``xt = kronecker_transform(x, left_trans, right_trans or None, dt)``: per token
         ``X' = fp16(dt(left_trans)^T @ X @ dt(right_trans))`` (X = the row viewed
         ``[L, R]``); o_proj checkpoints have no ``right_trans``: ``X' = left^T @ X`` with X
         viewed ``[L, K / L]`` (real msModelSlim output; vLLM Ascend cannot load it).
      2. ``(q, s) = quantize_kronecker_int4(xt, clip_ratio)``: ``s = f32(m * clip) / 7``,
         ``q = sat_int4(rint(f32(X') * f32(f32(7 / clip) / m)))``.
      3. ``acc = sum_k q * weight`` exact int32 (weight int4 values in int8, [-8, 7]).
      4. ``y = dt(((f32(acc) * s_w[n]) * s[m]) + f32(dt(bias[n])))``, ``s_w`` float32.

    As vLLM Ascend (facts §5.9, §7) except: the bias is added in float32 before the single
    final rounding (vLLM Ascend adds it in ``dt`` after ``npu_quant_matmul`` rounded to
    ``dt``; the same deliberate fix as :func:`w4a4_dynamic_linear`), and the o_proj form.
    """
    dt = model_dtype(dtype)
    dims = validate_tensors(W4A4_FLATQUANT_DYNAMIC, tensors)
    n, k = dims["N"], dims["K"]
    left = np.asarray(tensors["left_trans"])
    right = np.asarray(tensors["right_trans"]) if "right_trans" in tensors else None
    transform_shapes(left, right, k, name="left_trans/right_trans")
    for name, f in (("left_trans", left), ("right_trans", right)):
        if f is not None and not np.isfinite(round_through(f, dt)).all():
            raise ValueError(f"{name}: a value overflows the model dtype {dt} at load")
    x = _check_x(x, dt, k)
    bias32 = _bias_f32(bias, dt, n)
    s_w = np.asarray(tensors["weight_scale"], dtype=np.float32).reshape(-1)
    if x.shape[0] == 0:
        return _empty(n, dt)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN rows: NaN output, by design
        xt = kronecker_transform(x, left, right, dt)
    q, s_tok = quantize_kronecker_int4(xt, tensors["clip_ratio"])
    acc = int_matmul(q, np.asarray(tensors["weight"]), name="W4A4_FLATQUANT_DYNAMIC accumulator")
    return _pertoken_epilogue(_acc_times_scale(acc, s_w), s_tok, bias32, dt)


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------

def linear_forward(algo, x, tensors, *, dtype, bias=None, add_quant_bias=True, kv_consumer=False,
                   group_size=None) -> np.ndarray:
    """Run the linear forward of algorithm ID ``algo`` (the value of ``<prefix>.weight``
    in ``quant_model_description.json``).

    ``bias`` is the layer's float bias; it is ignored by W8A8 and by W8A8_MIX with
    ``kv_consumer`` (folded into ``quant_bias``, see :func:`w8a8_static_linear`).
    ``add_quant_bias`` (False on TP ranks other than 0 of a RowParallel layer) applies to
    the static paths, ``kv_consumer`` to W8A8_MIX, ``group_size`` (the description's
    top-level value, needed only for a ragged last group) to W8A16, W4A16 and W4A8_DYNAMIC.
    Raises ``ValueError`` for an unsupported ID (``FLOAT`` layers are not quantized).
    """
    check_algorithm(algo, "linear")
    if algo == W8A16:
        return w8a16_linear(x, tensors, dtype=dtype, bias=bias, group_size=group_size)
    if algo == W4A16:
        return w4a16_linear(x, tensors, dtype=dtype, bias=bias, group_size=group_size)
    if algo == W8A8:
        return w8a8_static_linear(x, tensors, dtype=dtype, add_quant_bias=add_quant_bias)
    if algo == W8A8_DYNAMIC:
        return w8a8_dynamic_linear(x, tensors, dtype=dtype, bias=bias)
    if algo == W8A8_MIX:
        return w8a8_mix_linear(x, tensors, dtype=dtype, bias=bias, kv_consumer=kv_consumer,
                               add_quant_bias=add_quant_bias)
    if algo == W4A8_DYNAMIC:
        return w4a8_dynamic_linear(x, tensors, dtype=dtype, bias=bias, group_size=group_size)
    if algo == W4A4_DYNAMIC:
        return w4a4_dynamic_linear(x, tensors, dtype=dtype, bias=bias)
    if algo == W4A4_FLATQUANT_DYNAMIC:
        return w4a4_flatquant_linear(x, tensors, dtype=dtype, bias=bias)
    raise AssertionError(f"unreachable: {algo}")  # check_algorithm lists every linear ID
