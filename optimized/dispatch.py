"""Backend detection and kernel choice for the quantized linear.

Backends (``BACKENDS``, in default-preference order):

``npu``             torch_npu ops (``npu_dynamic_quant``, ``npu_quantize``, ``npu_quant_matmul``,
                    ``npu_weight_quant_batchmatmul``, ``npu_kronecker_quant``), as vLLM Ascend
                    calls them; selected only when ``torch_npu`` imports and an NPU is present.
``cuda``            the portable torch kernels on a CUDA device.
``cpu``             this machine's CPU kernels: oneDNN int8 GEMM (vLLM-CPU's handler when vLLM
                    is already loaded, else PyTorch's own), ``torch._weight_int4pack_mm_for_cpu``
                    / ``torch._weight_int8pack_mm`` at small M, tiled dequantization + bf16 GEMM.
``torch-portable``  pure torch ops (``torch._int_mm``, float32 GEMM) on the CPU: always
                    available, the fallback.

Kernels are listed per backend and family in priority order (vLLM's chooser pattern:
each candidate answers ``(ok, reason)``; every rejection keeps its reason).
Families: ``int`` (int8/int4 activations: exact integer GEMM, our float32 epilogue) and
``weight-only`` (W8A16, W4A16). ``auto`` for weight-only on ``cpu`` picks per call by M
(:data:`WEIGHT_ONLY_M_RULE`).

Forcing: ``prepare_linear(..., backend=, kernel=)`` or the environment variables
``ASCEND_QUANT_BACKEND`` / ``ASCEND_QUANT_KERNEL`` (arguments win). A forced kernel that
cannot run raises ``ValueError`` with its reason.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field

import torch

from .int_gemm import INT_GEMM_KERNELS

__all__ = [
    "BACKENDS", "KERNELS", "WEIGHT_ONLY_ALGOS", "WEIGHT_ONLY_M_RULE", "Choice", "available_backends",
    "backend_device", "backend_status", "choose_kernel", "default_backend", "family_of",
]

BACKENDS: tuple[str, ...] = ("npu", "cuda", "cpu", "torch-portable")
WEIGHT_ONLY_ALGOS = ("W8A16", "W4A16")

#: Kernel candidates per (backend, family), in priority order.
KERNELS: dict[tuple[str, str], tuple[str, ...]] = {
    ("npu", "int"): ("npu",),
    ("npu", "weight-only"): ("npu",),
    ("cpu", "int"): ("onednn-gemv", "vllm-onednn", "onednn", "vllm-int8-with-quant", "int-mm"),
    ("cpu", "weight-only"): ("auto", "int4pack-mm", "int8pack-mm", "colscale-bf16", "dequant-bf16",
                              "dequant-f32"),
    ("cuda", "int"): ("int-mm",),
    ("cuda", "weight-only"): ("dequant-f32",),
    ("torch-portable", "int"): ("int-mm",),
    ("torch-portable", "weight-only"): ("dequant-f32",),
}

#: ``auto`` weight-only policy on ``cpu``: (largest M, kernel) tried in order, each only if it
#: can implement the layer; the last entry catches every M. Crossovers measured on this
#: project's CPU (AVX-512 VNNI/BF16, no AMX; one thread, thread CPU time, K = N = 4096, bf16,
#: interleaved; ms per call):
#: ``_weight_int4pack_mm_for_cpu`` grows ~0.36 ms per row (0.9 at M=1, 12.8 at 32, 19.0 at 48)
#: against the tiled dequantization + bf16 GEMM (9.3 at M=8, 14.6 at 32, 17.2 at 48): crossover
#: M ~ 40. ``_weight_int8pack_mm`` (1.5 at M=1, 4.4 at 8, 6.6 at 12, 8.6 at 16) against the
#: per-channel ``colscale-bf16`` (6.8 at 8, 7.4 at 12, 8.0 at 16): crossover M ~ 12.
#: ``colscale-bf16`` (only an int8 -> bf16 conversion per weight tile, the scale applied to
#: the [M, N] output in float32) beats ``dequant-bf16`` (conversion and scale multiply per
#: weight element) while M x N is small against N x K: 6.9 vs 10.0 ms at M=16, 47 vs 50 at
#: M=256, but 194 vs 183 at M=1024. Beyond: ``dequant-bf16`` (float32 GEMM for fp16/fp32
#: models).
WEIGHT_ONLY_M_RULE: tuple[tuple[int | None, str], ...] = (
    (40, "int4pack-mm"),
    (10, "int8pack-mm"),
    (256, "colscale-bf16"),
    (None, "dequant-bf16"),
    (None, "dequant-f32"),
)


def family_of(algo: str) -> str:
    return "weight-only" if algo in WEIGHT_ONLY_ALGOS else "int"


@functools.lru_cache(maxsize=None)
def backend_status(name: str) -> tuple[bool, str | None]:
    """``(available, reason)`` for a backend name; the reason says why not."""
    if name == "torch-portable":
        return True, None
    if name == "cpu":
        if not torch.backends.mkldnn.is_available():
            return False, "PyTorch built without oneDNN (torch.backends.mkldnn.is_available() is False)"
        return True, None
    if name == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, None
    if name == "npu":
        try:
            import torch_npu  # noqa: F401
        except Exception as e:
            return False, f"torch_npu not importable ({type(e).__name__})"
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            return False, "torch_npu imports but no NPU device is present"
        return True, None
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    return [b for b in BACKENDS if backend_status(b)[0]]


def default_backend() -> str:
    env = os.environ.get("ASCEND_QUANT_BACKEND")
    if env:
        return env
    for b in ("npu", "cuda", "cpu"):
        if backend_status(b)[0]:
            return b
    return "torch-portable"


def backend_device(name: str) -> torch.device:
    return {"npu": torch.device("npu") if backend_status("npu")[0] else torch.device("cpu"),
            "cuda": torch.device("cuda"), "cpu": torch.device("cpu"),
            "torch-portable": torch.device("cpu")}[name]


@dataclass
class Choice:
    """The outcome of :func:`choose_kernel`."""

    backend: str
    kernel: str
    rejected: dict[str, str] = field(default_factory=dict)

    def explain(self) -> str:
        lines = [f"backend {self.backend}: kernel {self.kernel}"]
        lines += [f"  rejected {k}: {r}" for k, r in self.rejected.items()]
        return "\n".join(lines)


def _sgl_int8_status() -> tuple[bool, str | None]:
    """vLLM-CPU's ``int8_scaled_mm_with_quant`` (its x86 default) is never chosen."""
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    # Measured (vLLM 0.32 CPU, dynamic_scaled_int8_quant): its codes are
    # rint(clamp(f32(x) * f32(1 / f32(m / 127)), -128, 127)) -- one more rounding than the
    # reference's f32(127 / m), so ties move: x = [11.4375, -5.71875] (bf16, fp16 or fp32) gives
    # -63 where npu_dynamic_quant gives -64; NaN rows get finite codes, inf rows an inf scale,
    # subnormal maxima reach -128. Random rows differ too (12 of 64 bf16 rows of K = 4095).
    why = ("it quantizes the activations itself, not bit-identically to npu_dynamic_quant's "
           "rint(f32(x) * f32(127 / m)) (it multiplies by f32(1 / scale))")
    if not amx:
        why += "; and it needs AMX, which this CPU lacks"
    return False, why


def _int_kernel_ok(name: str, backend: str, k: int, forced: bool = False) -> tuple[bool, str | None]:
    if name == "npu":
        return backend_status("npu")
    if name == "vllm-int8-with-quant":
        return _sgl_int8_status()
    if name == "vllm-onednn" and not forced and "vllm._custom_ops" not in sys.modules:
        # same oneDNN matmul as ``onednn`` (~15% faster at M = 1 here: no activation shift);
        # preferred inside a vLLM process, never worth importing vLLM (seconds) for
        return False, "vLLM is not loaded in this process (force kernel='vllm-onednn' to import it)"
    cls = INT_GEMM_KERNELS[name]
    ok, why = cls.is_supported(backend_device(backend))
    if not ok:
        return ok, why
    from .int_gemm import MAX_EXACT_K
    if k > MAX_EXACT_K:
        return False, f"K={k} > {MAX_EXACT_K}: the int32 accumulator could overflow"
    return True, None


def choose_kernel(algo: str, *, backend: str | None = None, kernel: str | None = None, k: int,
                  can_weight_only=None) -> Choice:
    """Pick the first kernel of ``backend`` (default: :func:`default_backend`) that can run.

    ``kernel`` (or ``$ASCEND_QUANT_KERNEL``) forces one; ``can_weight_only(name) -> (ok, reason)``
    answers for weight-only kernels (it needs the prepared weights). Raises ``ValueError``
    with every rejection reason when nothing can run.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    ok, why = backend_status(backend)
    if not ok:
        raise ValueError(f"backend {backend!r} is not available: {why}")
    fam = family_of(algo)
    candidates = KERNELS[(backend, fam)]
    forced = kernel or os.environ.get("ASCEND_QUANT_KERNEL") or None
    if forced is not None and forced not in candidates:
        raise ValueError(f"kernel {forced!r} is not a {fam} kernel of backend {backend!r}; "
                         f"candidates: {', '.join(candidates)}")
    rejected: dict[str, str] = {}
    for name in candidates:
        if forced is not None and name != forced:
            rejected[name] = f"not the forced kernel ({forced})"
            continue
        if fam == "int":
            ok, why = _int_kernel_ok(name, backend, k, forced=forced is not None)
        elif name == "npu":
            ok, why = backend_status("npu")
        elif name == "auto":
            ok, why = True, None
        else:
            ok, why = can_weight_only(name)
        if ok:
            return Choice(backend, name, rejected)
        rejected[name] = why or "cannot run"
    raise ValueError(f"no {fam} kernel of backend {backend!r} can run {algo}:\n"
                     + "\n".join(f"  {k_}: {r}" for k_, r in rejected.items()))
