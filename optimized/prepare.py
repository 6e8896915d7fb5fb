"""Prepare a quantized linear once (checkpoint tensors -> kernel-ready tensors) and run it.

Counterpart of ``reference/linear.py``: same algorithm IDs, same checkpoint tensor dicts
(numpy or torch, keyed by msModelSlim suffix), same numerics. ``prepare_linear`` does all
per-weight work once: validation (``reference.linear.validate_tensors``), load-time
rounding of model-dtype scales, int64 ``deq_scale`` decoding, unpacking int4 weights into
int8, per-channel scale fusion, oneDNN prepacking. ``apply_linear`` then only quantizes
the activations (``optimized.activation_quant``), runs an exact integer GEMM
(``optimized.int_gemm``) and the float32 epilogue in the reference's op order.

Exactness: every int8/int4-activation algorithm is bit-exact with the reference (integer
stages exact; epilogue = the same float32 ops in the same order; ``f32(acc)`` from the
GEMM is the RNE conversion of the exact int32 sum). W4A4_FLATQUANT_DYNAMIC's float64
transform may differ from NumPy's summation order (bound in
``activation_quant.kronecker_transform``; bit-exact unless a float64 sum lands within
~2^-42 relative of an fp16 rounding boundary). W8A16/W4A16 are float stages, within the
bound of ``optimized.weight_only``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..reference import algorithms as A
from ..reference.flatquant import transform_shapes
from ..reference.linear import resolve_group_size, validate_tensors
from .activation_quant import (
    QRANGE,
    kronecker_transform,
    quantize_dynamic_per_token,
    quantize_kronecker_int4,
    quantize_static,
    static_quant_params,
    torch_model_dtype,
)
from .dispatch import WEIGHT_ONLY_M_RULE, Choice, backend_device, choose_kernel
from .int_gemm import INT_GEMM_KERNELS, IntGemm
from .packing import unpack_int8_to_int4, unpack_int32_offset8_to_int4
from .weight_only import WEIGHT_ONLY_KERNELS, WeightOnlyWeights
from .weight_only_overflow import redo_overflowed_rows

__all__ = ["PreparedLinear", "prepare_linear", "apply_linear"]

_F32_EXACT_INT = float(2**24)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------
# tensor conversion
# --------------------------------------------------------------------------------------

def _to_numpy(a) -> np.ndarray:
    """numpy view of a checkpoint tensor (torch tensors: bf16 becomes ml_dtypes bfloat16)."""
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(a)


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _f32(a: np.ndarray) -> torch.Tensor:
    return _to_torch(a).to(torch.float32)


def _round_through(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``f32(dt(t))``: vLLM Ascend's load-time rounding of a model-dtype parameter."""
    return t.to(torch.float32).to(dt).to(torch.float32)


def _positive_scale(name: str, raw: torch.Tensor, s: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}: scale {float(raw[i])!r} at index {i} becomes {float(s[i])!r} when rounded "
                         f"to the model dtype {dt} at load")
    return s


def _decode_deq_scale(d: np.ndarray) -> torch.Tensor:
    """int64 words holding a float32 bit pattern (sign- or zero-extended), or float32."""
    t = _to_torch(d)
    if t.dtype == torch.float32:
        return t.clone()
    low = t & 0xFFFFFFFF
    low = torch.where(low >= 2**31, low - 2**32, low)
    return low.to(torch.int32).view(torch.float32)


def _bias32(bias, dt: torch.dtype, n: int) -> torch.Tensor | None:
    """The float bias as vLLM holds it (a model-dtype parameter), as exact float32 values."""
    if bias is None:
        return None
    b = bias.detach().cpu() if isinstance(bias, torch.Tensor) else _to_torch(np.asarray(bias))
    if b.dtype not in (dt, torch.float32):
        raise ValueError(f"bias: expected dtype {dt} (model dtype) or float32, got {b.dtype}")
    if tuple(b.shape) != (n,):
        raise ValueError(f"bias: expected shape (N,) = ({n},), got {tuple(b.shape)}")
    return _round_through(b, dt)


# --------------------------------------------------------------------------------------
# the prepared object
# --------------------------------------------------------------------------------------

@dataclass
class PreparedLinear:
    """A quantized linear layer prepared for one backend/kernel. Call it (or
    :func:`apply_linear`) with ``x`` ``[..., K]`` in the model dtype."""

    algo: str
    dtype: torch.dtype
    n: int
    k: int
    choice: Choice
    options: dict
    state: dict = field(repr=False)
    forward: Callable = field(repr=False)

    @property
    def backend(self) -> str:
        return self.choice.backend

    @property
    def kernel(self) -> str:
        return self.choice.kernel

    def resident_bytes(self) -> int:
        """Bytes held for the forward: weights (int8 / prepacked), scales, bias, transforms."""
        total = 0
        for v in self.state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, (IntGemm, WeightOnlyWeights)):
                total += v.resident_bytes()
            elif isinstance(v, (list, tuple)):
                total += sum(g.resident_bytes() for g in v if isinstance(g, IntGemm))
                total += sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))
        return total

    def explain(self) -> str:
        return f"{self.algo} [{self.n}x{self.k}] {self.dtype}: " + self.choice.explain()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self, x)


def apply_linear(prepared: PreparedLinear, x: torch.Tensor) -> torch.Tensor:
    """Run the forward: ``x`` ``[..., K]`` (model dtype) -> ``y`` ``[..., N]`` (model dtype)."""
    p = prepared
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch tensor, got {type(x).__name__}")
    if x.dtype != p.dtype:
        raise ValueError(f"x: dtype {x.dtype} differs from the model dtype {p.dtype}")
    if x.dim() < 1 or x.shape[-1] != p.k:
        raise ValueError(f"x: width {tuple(x.shape)[-1:]} does not match the weight's input features K = {p.k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if x2.shape[0] == 0:
        y = torch.zeros((0, p.n), dtype=p.dtype, device=x.device)
    else:
        y = p.forward(p, x2)
    return y.reshape(*lead, p.n)


# --------------------------------------------------------------------------------------
# epilogues (float32, the reference's op order)
# --------------------------------------------------------------------------------------

def _pertoken_epilogue(t: torch.Tensor, s_tok: torch.Tensor, bias32: torch.Tensor | None,
                       dt: torch.dtype) -> torch.Tensor:
    """``dt((t * s_tok[m]) + f32(bias[n]))`` (``reference.linear._pertoken_epilogue``)."""
    t.mul_(s_tok.unsqueeze(1))
    if bias32 is not None:
        t.add_(bias32)
    return t.to(dt)


def _fwd_pertoken(p: PreparedLinear, x: torch.Tensor) -> torch.Tensor:
    st = p.state
    fused = getattr(st["gemm"], "pertoken", None)
    if fused is not None:   # onednn-gemv at small M: one native call, same values
        t = fused(x, QRANGE[st["bits"]][1], st.get("bias32"), out_dtype=p.dtype)
        if t is not None:
            return t.to(p.dtype)     # no-op where the native epilogue already rounded
    xq, s_tok = quantize_dynamic_per_token(x, st["bits"])
    return _pertoken_epilogue(st["gemm"].scaled(xq), s_tok, st.get("bias32"), p.dtype)


def _fwd_flatquant(p: PreparedLinear, x: torch.Tensor) -> torch.Tensor:
    st = p.state
    xt = kronecker_transform(x, st["left_trans"], st.get("right_trans"))
    q, s_tok = quantize_kronecker_int4(xt, st["clip_ratio"])
    return _pertoken_epilogue(st["gemm"].scaled(q), s_tok, st.get("bias32"), p.dtype)


def _fwd_w4a8_grouped(p: PreparedLinear, x: torch.Tensor) -> torch.Tensor:
    st = p.state
    xq, s_tok = quantize_dynamic_per_token(x, 8)
    g, k = st["group"], p.k
    t64 = torch.zeros((x.shape[0], p.n), dtype=torch.float64, device=x.device)
    for gi, gemm in enumerate(st["gemms"]):
        acc = gemm.scaled(xq[:, gi * g:min((gi + 1) * g, k)])      # f32(acc_g), exact RNE
        # f64 product of two float32 values is exact; summed in increasing g, as the reference
        t64.add_(acc.to(torch.float64).mul_(st["scale64"][gi]))
    return _pertoken_epilogue(t64.to(torch.float32), s_tok, st.get("bias32"), p.dtype)


def _nan_nonfinite_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Static quantization saturates per element; a row of ``x`` holding NaN or +-inf still
    gives a NaN row of ``y`` (``reference.linear.w8a8_static_linear``). One pass over ``x``."""
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        y[~finite] = float("nan")
    return y


def _fwd_static(p: PreparedLinear, x: torch.Tensor) -> torch.Tensor:
    st = p.state
    if st.get("native_static"):   # onednn-gemv: quantizer, GEMM and epilogue natively, same values
        r = st["gemm"].static(x, st["recip_value"], st["offset_value"], st.get("quant_bias_f32"),
                              st["deq_scale"], p.dtype)
        if r is not None:
            y, nonfinite = r
            if bool(nonfinite.any()):
                y[nonfinite] = float("nan")
            return y
    return _nan_nonfinite_rows(x, _static_rows(p, x))


def _static_rows(p: PreparedLinear, x: torch.Tensor) -> torch.Tensor:
    st = p.state
    gemm: IntGemm = st["gemm"]
    xq = quantize_static(x, st["recip"], st["offset"])
    acc = gemm.scaled(xq)                                           # f32(acc)
    qb = st.get("quant_bias")
    amax = float(acc.abs().amax())
    fast = amax < _F32_EXACT_INT and (qb is None or (st["qb_f32_exact"] and amax + st["qb_absmax"] <= _INT32_MAX))
    if fast:
        # acc is exact in float32; float32 acc + qb is the RNE of the exact integer sum,
        # i.e. f32(acc + qb) as the reference converts it
        if qb is not None:
            acc.add_(st["quant_bias_f32"])
        return acc.mul_(st["deq_scale"]).to(p.dtype)
    exact = gemm.exact(xq)
    if qb is not None:
        exact += qb.to(torch.int64)
    lo, hi = int(exact.min()), int(exact.max())
    if lo < -(2**31) or hi > _INT32_MAX:
        raise OverflowError(f"{p.algo} accumulator + quant_bias: value range [{lo}, {hi}] exceeds the int32 accumulator")
    return exact.to(torch.float32).mul_(st["deq_scale"]).to(p.dtype)


def _fwd_weight_only(p: PreparedLinear, x: torch.Tensor) -> torch.Tensor:
    st = p.state
    name = st["kernel_for_m"](x.shape[0])
    run = WEIGHT_ONLY_KERNELS[name][0]
    return redo_overflowed_rows(st["weights"], x, run(st["weights"], x, st.get("bias32"), p.dtype),
                                st.get("bias32"))


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------

def _int_gemm(choice: Choice, weight: torch.Tensor, col_scale: torch.Tensor | None, device) -> IntGemm:
    cls = INT_GEMM_KERNELS[choice.kernel]
    return cls(weight.to(device), None if col_scale is None else col_scale.to(device))


def prepare_linear(algo: str, tensors: Mapping, *, dtype, bias=None, backend: str | None = None,
                   kernel: str | None = None, group_size: int | None = None, add_quant_bias: bool = True,
                   kv_consumer: bool = False) -> PreparedLinear:
    """Prepare layer ``tensors`` (checkpoint dict, numpy or torch) of algorithm ``algo`` once.

    ``dtype``: the model dtype (name, torch or NumPy dtype). ``bias``: the float bias (ignored
    by W8A8 and by W8A8_MIX with ``kv_consumer``: folded into ``quant_bias``). ``backend`` /
    ``kernel``: force a choice (see ``optimized.dispatch``). ``group_size``, ``add_quant_bias``,
    ``kv_consumer``: as ``reference.linear.linear_forward``. Raises ``ValueError`` naming the
    tensor at fault, or listing why no kernel can run.
    """
    A.check_algorithm(algo, "linear")
    dt = torch_model_dtype(dtype)
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors: expected a dict of checkpoint tensors, got {type(tensors).__name__}")
    npt = {key: _to_numpy(v) for key, v in tensors.items()}
    dims = validate_tensors(algo, npt)
    n = dims["N"]
    k = dims["K"] if "K" in dims else 8 * dims["P"]
    if algo == A.W4A16 and "weight_shape" in npt:
        ws = np.asarray(npt["weight_shape"]).astype(np.int64).tolist()
        if ws[0] != n or not (0 < ws[1] <= k and -(-ws[1] // 8) == dims["P"]):
            raise ValueError(f"weight_shape: {ws} does not describe weight_packed of shape {(n, dims['P'])} "
                             f"(expected [N, K] with N = {n} and ceil(K/8) = {dims['P']})")
        k = ws[1]
    options = {"group_size": group_size, "add_quant_bias": add_quant_bias, "kv_consumer": kv_consumer}

    if algo in (A.W8A16, A.W4A16):
        return _prepare_weight_only(algo, npt, dims, n, k, dt, bias, backend, kernel, group_size, options)

    if backend is not None and backend == "npu" or (backend is None and _default_is_npu()):
        from .npu import prepare_npu
        return prepare_npu(algo, npt, dims, n, k, dt, bias, options)

    choice = choose_kernel(algo, backend=backend, kernel=kernel, k=k)
    device = backend_device(choice.backend)
    state: dict = {}
    static = algo == A.W8A8 or (algo == A.W8A8_MIX and kv_consumer)

    if static:
        s_raw = _f32(npt["input_scale"]).reshape(-1)
        _positive_scale("input_scale", s_raw, _round_through(s_raw, dt), dt)
        recip, off = static_quant_params(s_raw, _f32(npt["input_offset"]), dt)
        if not (bool(torch.isfinite(recip)) and bool(torch.isfinite(off))):
            raise ValueError(f"input_scale/input_offset: 1/input_scale = {float(recip)} or offset = {float(off)} "
                             f"is not finite in the model dtype {dt}")
        state.update(recip=recip, offset=off, deq_scale=_decode_deq_scale(npt["deq_scale"]).to(device))
        if add_quant_bias:
            qb = _to_torch(npt["quant_bias"]).to(torch.int32)
            qb_f32 = qb.to(torch.float32)
            state.update(quant_bias=qb.to(device), quant_bias_f32=qb_f32.to(device),
                         qb_f32_exact=bool(torch.equal(qb_f32.to(torch.int64), qb.to(torch.int64))),
                         qb_absmax=float(qb.to(torch.int64).abs().max()) if qb.numel() else 0.0)
        state["gemm"] = _int_gemm(choice, _to_torch(npt["weight"]), None, device)
        deq = state["deq_scale"]
        # the native path needs: the kernel, a float32 [N] deq_scale, and a quant_bias whose
        # float32 sum with any |acc| < 2^24 is the exact integer sum rounded once
        state["native_static"] = (hasattr(state["gemm"], "static") and deq.dtype == torch.float32
                                  and deq.shape == (n,) and deq.is_contiguous()
                                  and (not add_quant_bias or (state["quant_bias_f32"].shape == (n,)
                                                              and state["qb_f32_exact"]
                                                              and state["qb_absmax"] <= _INT32_MAX - _F32_EXACT_INT)))
        state.update(recip_value=float(recip), offset_value=float(off))
        forward = _fwd_static
    elif algo in (A.W8A8_DYNAMIC, A.W8A8_MIX, A.W4A4_DYNAMIC):
        raw = _f32(npt["weight_scale"]).reshape(-1)
        # W8A8 dynamic/mix declare weight_scale in the model dtype (rounded at load);
        # W4A4 keeps it float32 (facts §5.10)
        s_w = raw if algo == A.W4A4_DYNAMIC else _positive_scale("weight_scale", raw, _round_through(raw, dt), dt)
        state.update(bits=4 if algo == A.W4A4_DYNAMIC else 8, bias32=_bias32(bias, dt, n))
        state["gemm"] = _int_gemm(choice, _to_torch(npt["weight"]), s_w, device)
        forward = _fwd_pertoken
    elif algo == A.W4A4_FLATQUANT_DYNAMIC:
        left = npt["left_trans"]
        right = npt.get("right_trans")
        transform_shapes(left, right, k, name="left_trans/right_trans")
        lt = _round_through(_f32(left), dt)
        rt = None if right is None else _round_through(_f32(right), dt)
        for name, f in (("left_trans", lt), ("right_trans", rt)):
            if f is not None and not bool(torch.isfinite(f).all()):
                raise ValueError(f"{name}: a value overflows the model dtype {dt} at load")
        state.update(left_trans=lt.to(torch.float64).to(device), clip_ratio=_f32(npt["clip_ratio"]).reshape(-1)[:1],
                     bias32=_bias32(bias, dt, n))
        if rt is not None:
            state["right_trans"] = rt.to(torch.float64).to(device)
        state["gemm"] = _int_gemm(choice, _to_torch(npt["weight"]), _f32(npt["weight_scale"]).reshape(-1), device)
        forward = _fwd_flatquant
    elif algo == A.W4A8_DYNAMIC:
        w = _to_torch(npt["weight"])
        q = w if w.shape[0] == n else unpack_int8_to_int4(w, axis=0)
        if w.shape[0] == n and (int(q.min()) < -8 or int(q.max()) > 7):
            raise ValueError(f"weight: W4A8_DYNAMIC weights are int4 values in [-8, 7] (one per int8), "
                             f"found range [{int(q.min())}, {int(q.max())}]")
        s1 = _f32(npt["weight_scale"]).reshape(n, 1)
        state["bias32"] = _bias32(bias, dt, n)
        if "weight_scale_second" in npt:
            g = resolve_group_size("weight_scale_second", k, dims["G2"], group_size)
            s = s1 * _f32(npt["weight_scale_second"])               # f32 [N, G], one rounding
            if not bool((torch.isfinite(s) & (s > 0)).all()):
                raise ValueError("weight_scale * weight_scale_second: a combined scale under- or overflows float32")
            groups = s.shape[1]
            state.update(group=g, scale64=[s[:, gi].to(torch.float64).to(device) for gi in range(groups)])
            state["gemms"] = [_int_gemm(choice, q[:, gi * g:min((gi + 1) * g, k)].contiguous(), None, device)
                              for gi in range(groups)]
            forward = _fwd_w4a8_grouped
        else:
            if group_size not in (None, 0) and int(group_size) < k:
                raise ValueError(f"group_size: {group_size} given but there is no weight_scale_second "
                                 "(per-channel checkpoint)")
            state.update(bits=8, gemm=_int_gemm(choice, q.contiguous(), s1.reshape(-1), device))
            forward = _fwd_pertoken
    else:  # pragma: no cover - check_algorithm covers every ID
        raise AssertionError(algo)
    if state.get("bias32") is not None:
        state["bias32"] = state["bias32"].to(device)
    return PreparedLinear(algo, dt, n, k, choice, options, state, forward)


def _default_is_npu() -> bool:
    from .dispatch import default_backend
    return default_backend() == "npu"


def _prepare_weight_only(algo, npt, dims, n, k, dt, bias, backend, kernel, group_size, options) -> PreparedLinear:
    if algo == A.W8A16:
        q = _to_torch(npt["weight"])
        g = resolve_group_size("weight_scale", k, dims["G"], group_size)
        raw = _f32(npt["weight_scale"])
        s = _positive_scale("weight_scale", raw, _round_through(raw, dt), dt)
        o = _round_through(_f32(npt["weight_offset"]), dt)
        if not bool(torch.isfinite(o).all()):
            raise ValueError(f"weight_offset: an offset overflows the model dtype {dt} at load")
        offset = None if not bool((o != 0).any()) else o
    else:
        q = unpack_int32_offset8_to_int4(_to_torch(npt["weight_packed"]), axis=1)[:, :k].contiguous()
        g = resolve_group_size("weight_scale", k, dims["G"], group_size)
        raw = _f32(npt["weight_scale"])
        s = _positive_scale("weight_scale", raw, _round_through(raw, dt), dt)
        offset = None
    wts = WeightOnlyWeights(q=q, scale=s.contiguous(), offset=offset, group=g)

    if backend == "npu" or (backend is None and _default_is_npu()):
        from .npu import prepare_npu
        return prepare_npu(algo, npt, dims, n, k, dt, bias, options)

    def can(name: str):
        return WEIGHT_ONLY_KERNELS[name][1](algo, wts, dt, torch.device("cpu"))

    choice = choose_kernel(algo, backend=backend, kernel=kernel, k=k, can_weight_only=can)
    device = backend_device(choice.backend)
    if choice.kernel in ("auto", "int4pack-mm") and can("int4pack-mm")[0]:
        wts.add_int4pack(dt)
    if device.type != "cpu":
        wts = WeightOnlyWeights(q=wts.q_rows(0, wts.shape[0]).to(device), scale=wts.scale.to(device),
                                offset=None if wts.offset is None else wts.offset.to(device), group=g)
    if choice.kernel == "auto":
        rule = [(m_max, name) for m_max, name in WEIGHT_ONLY_M_RULE if can(name)[0]]
        if not rule:
            raise ValueError(f"{algo}: no weight-only kernel in the auto rule can run")

        def kernel_for_m(m: int, rule=tuple(rule)) -> str:
            for m_max, name in rule:
                if m_max is None or m <= m_max:
                    return name
            return rule[-1][1]
        choice.rejected.update({name: f"auto rule: not applicable ({can(name)[1]})"
                                for _, name in WEIGHT_ONLY_M_RULE if not can(name)[0]})
    else:
        def kernel_for_m(m: int, name=choice.kernel) -> str:
            return name
    bias32 = _bias32(bias, dt, n)
    state = {"weights": wts, "kernel_for_m": kernel_for_m,
             "bias32": None if bias32 is None else bias32.to(device)}
    return PreparedLinear(algo, dt, n, k, choice, options, state, _fwd_weight_only)
