"""Exact int8 GEMV for small M on AVX-512 VNNI, reading oneDNN's own prepacked weight.

At decode (M = 1 .. a few rows) an int8 linear is a stream of the weight through the cores;
the oneDNN matmul pays a per-call cost that the stream does not (measured here, K = N = 4096,
one thread, cold cache: ~1.0 ms per call where 16 MiB at the ~30 GB/s this machine reads is
~0.55 ms; this GEMV: 0.62 ms). ``vnni_gemv.cpp`` is a plain VNNI loop over the weight: ``vpdpbusd`` on
``u = q + 128`` bytes, the exact sum ``sum(u w) - 128 colsum(w)`` in int32, then ``f32(acc)``
(RNE) times the optional column scale -- the same values as :class:`~.int_gemm.IntGemm`'s
``scaled`` contract, bit for bit.

The same library holds the exact activation quantizers (per token, per tensor) and the
float32 epilogues, so the whole small-M linear is one native call and larger M is native
quantizer -> oneDNN -> native epilogue (:meth:`~.int_gemm.OneDnnGemvIntGemm.pertoken`,
:meth:`~.int_gemm.OneDnnGemvIntGemm.static`); rows they do not handle (zero, NaN/inf, ...)
return ``None`` to the caller's torch path.

No second copy of the weight: the kernel reads the buffer ``torch.ops.onednn.qlinear_prepack``
made (``torch.ops.mkldnn.data_ptr``), whose layout on AVX-512 VNNI is

    byte ((b * Kp/4 + g) * 64 + j) * 4 + i  =  w[64 b + j, 4 g + i]

(``Np`` = N rounded up to 64, ``Kp`` = K rounded up to 64, zeros where padded; measured on
this project's CPU). That layout is oneDNN's choice, not a promise: :func:`verified_view`
packs the checkpoint weight the same way with NumPy and compares every byte of the data
region before the kernel may read it. Any difference (another ISA, another oneDNN) and the
GEMV is simply not used; the oneDNN matmul does every M.

The shared library is compiled once with ``g++`` (``$CXX``) into
``$ASCEND_QUANT_KERNEL_CACHE`` (default ``~/.cache/ascend-quant/kernels``), named by a hash
of the source, flags and compiler version, and loaded with ``ctypes``; a failed build or a
CPU without AVX-512 VNNI leaves :func:`library` with a reason and every caller on oneDNN.
``ASCEND_QUANT_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["GEMV_MAX_M", "MAX_GEMV_KP", "library", "verified_view", "colsum128", "gemv", "pertoken_gemv", "quant_pertoken_u8", "rowscale_bias",
           "quant_static_u8", "static_epilogue"]

#: Largest M the GEMV serves; larger M goes to the oneDNN matmul. Measured (one thread,
#: K = N = 4096, bf16 model, cold cache, ms per call, GEMV vs oneDNN): the fused per-token
#: path 1.05 vs 1.44 at M = 8, 1.72 vs 1.91 at 16, 2.99 vs 3.20 at 32; static W8A8 (GEMV
#: only, quantizer in torch) 2.03 vs 2.10 at 16, even at 24.
GEMV_MAX_M = int(os.environ.get("ASCEND_QUANT_GEMV_MAX_M", "16"))
#: ``sum(u w)`` with u <= 255, |w| <= 128 stays in int32 for Kp <= 65536.
MAX_GEMV_KP = 65536

_SOURCE = Path(__file__).with_name("vnni_gemv.cpp")
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw",
          "-mavx512vnni", "-mavx512vl", "-mf16c", "-ffp-contract=off", "-fno-math-errno"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    env = os.environ.get("ASCEND_QUANT_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ascend-quant" / "kernels"


def _build(cxx: str) -> Path:
    src = _SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    tag = hashlib.sha256(src + " ".join(_FLAGS).encode() + version.encode()).hexdigest()[:16]
    out = _cache_dir() / f"libaq_vnni_gemv-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # compile to a private name, then rename: concurrent processes (vLLM workers) never see a
    # half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({r.returncode}): {r.stderr.strip()[-400:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=None)
def library() -> tuple[ctypes.CDLL | None, str | None]:
    """``(lib, None)`` when the GEMV can run here, else ``(None, reason)``."""
    if os.environ.get("ASCEND_QUANT_NATIVE", "1") == "0":
        return None, "disabled by ASCEND_QUANT_NATIVE=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"x86-64 only (machine is {platform.machine()})"
    missing = [f for f in _CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return None, f"CPU lacks {', '.join(missing)}"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx!r} not on PATH) to build optimized/vnni_gemv.cpp"
    try:
        path = _build(cxx)
        lib = ctypes.CDLL(str(path))
    except Exception as e:  # compiler error, unwritable cache, dlopen failure
        return None, f"building/loading vnni_gemv.cpp failed: {type(e).__name__}: {str(e)[:300]}"
    fn = lib.aq_vnni_gemv
    i64, p = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [p, i64, i64, p, i64, i64, i64, p, p, p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.aq_quant_static_u8
    fn.argtypes = [p, ctypes.c_int, i64, i64, ctypes.c_float, ctypes.c_float, p, p, ctypes.c_int]
    fn.restype = None

    fn = lib.aq_pertoken_gemv
    fn.argtypes = [p, ctypes.c_int, i64, i64, ctypes.c_float, p, i64, i64, i64, p, p, p, p, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.aq_quant_pertoken_u8
    fn.argtypes = [p, ctypes.c_int, i64, i64, ctypes.c_float, p, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.aq_epilogue
    fn.argtypes = [p, p, p, p, p, ctypes.c_int, p, ctypes.c_int, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib, None


def _blocked(weight_nk: np.ndarray, np_: int, kp: int) -> np.ndarray:
    """The weight in the blocked layout of the module docstring, as a flat int8 array."""
    n, k = weight_nk.shape
    w = np.zeros((np_, kp), dtype=np.int8)
    w[:n, :k] = weight_nk
    return np.ascontiguousarray(w.reshape(np_ // 64, 64, kp // 4, 4).transpose(0, 2, 1, 3)).reshape(-1)


def verified_view(packed: torch.Tensor, weight_nk: torch.Tensor) -> tuple[tuple[int, int, int] | None, str | None]:
    """``((data_ptr, Kp, Np), None)`` if ``packed`` (a ``qlinear_prepack`` result) holds
    ``weight_nk`` in the blocked layout, byte for byte; else ``(None, reason)``."""
    n, k = weight_nk.shape
    np_, kp = -(-n // 64) * 64, -(-k // 64) * 64
    if kp > MAX_GEMV_KP:
        return None, f"K = {k}: the GEMV's int32 sums are exact only up to Kp = {MAX_GEMV_KP}"
    try:
        nbytes = int(torch.ops.mkldnn._nbytes(packed))
        ptr = int(torch.ops.mkldnn.data_ptr(packed))
    except Exception as e:
        return None, f"oneDNN's packed weight is not addressable here ({type(e).__name__})"
    if nbytes < np_ * kp:
        return None, f"oneDNN packed {nbytes} bytes for a {n}x{k} weight: not the VNNI layout"
    have = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int8)), shape=(np_ * kp,))
    if not np.array_equal(have, _blocked(weight_nk.cpu().numpy(), np_, kp)):
        return None, "oneDNN's packed weight is not in the expected VNNI layout (another ISA or oneDNN)"
    return (ptr, kp, np_), None


def colsum128(colsum: torch.Tensor, np_: int) -> torch.Tensor:
    """``128 * colsum[n]`` as int32 ``[Np]`` (zero for padded columns), from the int64 column
    sums ``sum_k w[n, k]`` the kernel already holds (``IntGemm._colsum``)."""
    out = torch.zeros(np_, dtype=torch.int32)
    out[: colsum.shape[0]] = (colsum * 128).to(torch.int32)
    return out


def gemv(lib: ctypes.CDLL, xq: torch.Tensor, view: tuple[int, int, int], n: int, colsum: torch.Tensor,
         col_scale: torch.Tensor | None) -> torch.Tensor:
    """``f32(q @ w.T) * col_scale`` (float32 ``[M, N]``); ``xq`` contiguous ``[M, K]``: the int8
    codes ``q``, or (uint8) ``u = q + 128`` as :func:`quant_static_u8` writes them."""
    ptr, kp, np_ = view
    m, k = xq.shape
    out = torch.empty((m, n), dtype=torch.float32)
    rc = lib.aq_vnni_gemv(xq.data_ptr(), m, k, ptr, kp, np_, n, colsum.data_ptr(),
                          None if col_scale is None else col_scale.data_ptr(), out.data_ptr(),
                          torch.get_num_threads(), int(xq.dtype == torch.uint8))
    if rc != 0:
        raise MemoryError(f"vnni_gemv: cannot allocate {m * kp} bytes of activation scratch")
    return out


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def pertoken_gemv(lib: ctypes.CDLL, x: torch.Tensor, qmax: int, view: tuple[int, int, int], n: int,
                  colsum: torch.Tensor, col_scale: torch.Tensor | None,
                  bias32: torch.Tensor | None) -> torch.Tensor | None:
    """The whole per-token linear up to the output rounding, in one call:
    ``f32(f32(f32(acc) * col_scale[n]) * s_tok[m]) + bias32[n]`` (float32 ``[M, N]``), with
    ``q, s_tok`` exactly :func:`~.activation_quant.quantize_dynamic_per_token`'s.

    ``None`` when a row is zero, non-finite or so small that ``qmax / m`` overflows: the
    caller's general path handles those (nothing here is partial)."""
    ptr, kp, np_ = view
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty((m, n), dtype=torch.float32)
    s_tok = torch.empty(m, dtype=torch.float32)
    rc = lib.aq_pertoken_gemv(x.data_ptr(), _DTYPE_CODE[x.dtype], m, k, float(qmax), ptr, kp, np_, n,
                              colsum.data_ptr(), None if col_scale is None else col_scale.data_ptr(),
                              None if bias32 is None else bias32.data_ptr(), out.data_ptr(),
                              s_tok.data_ptr(), torch.get_num_threads())
    if rc == 1:
        return None
    if rc != 0:
        raise MemoryError(f"vnni_gemv: cannot allocate {m * kp} bytes of activation scratch")
    return out


def quant_pertoken_u8(lib: ctypes.CDLL, x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q + 128 as uint8 [M, K], s_tok [M])`` with ``q, s_tok`` exactly
    :func:`~.activation_quant.quantize_dynamic_per_token`'s; ``None`` if a row needs its
    general path (zero, non-finite, tiny maximum). One pass over ``x``, rows over threads."""
    x = x.contiguous()
    m, k = x.shape
    u = torch.empty((m, k), dtype=torch.uint8)
    s_tok = torch.empty(m, dtype=torch.float32)
    rc = lib.aq_quant_pertoken_u8(x.data_ptr(), _DTYPE_CODE[x.dtype], m, k, float(qmax), u.data_ptr(),
                                  s_tok.data_ptr(), torch.get_num_threads())
    if rc == 1:
        return None
    if rc != 0:
        raise MemoryError(f"vnni_gemv: cannot allocate {4 * k} bytes of row scratch")
    return u, s_tok


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def rowscale_bias(lib: ctypes.CDLL, t: torch.Tensor, s_tok: torch.Tensor, bias32: torch.Tensor | None,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The per-token epilogue's two float32 operations ``f32(t * s_tok[m]) + bias32[n]`` in
    one pass (``t`` float32 ``[M, N]`` contiguous): in place for a float32 ``out_dtype``, else
    written rounded to bfloat16 / float16 (``.to(out_dtype)``'s values; a NaN anywhere sends
    the call through torch, whose NaN encodings the native rounding does not imitate)."""
    m, n = t.shape
    out = t if out_dtype == torch.float32 else torch.empty((m, n), dtype=out_dtype)
    flags = lib.aq_epilogue(t.data_ptr(), None, None, s_tok.data_ptr(), _ptr(bias32), 0, out.data_ptr(),
                            _DTYPE_CODE[out_dtype], m, n, torch.get_num_threads())
    if flags and out is not t:
        t = t.mul(s_tok.unsqueeze(1))
        return (t if bias32 is None else t.add_(bias32)).to(out_dtype)
    return out


def quant_static_u8(lib: ctypes.CDLL, x: torch.Tensor, recip: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``npu_quantize`` with a per-tensor scale, exactly
    :func:`~.activation_quant.quantize_static`'s codes, as ``u = q + 128`` (uint8 ``[M, K]``),
    and a bool ``[M]``: rows holding NaN or an infinity (their linear output is a NaN row)."""
    x = x.contiguous()
    m, k = x.shape
    u = torch.empty((m, k), dtype=torch.uint8)
    bad = torch.empty(m, dtype=torch.uint8)
    lib.aq_quant_static_u8(x.data_ptr(), _DTYPE_CODE[x.dtype], m, k, recip, offset, u.data_ptr(), bad.data_ptr(),
                           torch.get_num_threads())
    return u, bad.bool()


def static_epilogue(lib: ctypes.CDLL, acc: torch.Tensor, qb32: torch.Tensor | None, deq: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor | None:
    """``dt(f32(f32(acc + qb[n]) * deq[n]))`` from ``acc = f32(accumulator)`` float32 ``[M, N]``;
    ``None`` when some ``|acc| >= 2^24`` (acc may not be the exact sum) or a NaN arose: the
    caller's exact path decides those."""
    m, n = acc.shape
    out = torch.empty((m, n), dtype=out_dtype)
    flags = lib.aq_epilogue(acc.data_ptr(), _ptr(qb32), deq.data_ptr(), None, None, 1, out.data_ptr(),
                            _DTYPE_CODE[out_dtype], m, n, torch.get_num_threads())
    return None if flags else out
