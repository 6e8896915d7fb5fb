"""FlatQuant: the Kronecker activation transform and its int4 quantization
(``npu_kronecker_quant``), the decomposition ``K = L * R``, and the offline weight
transform msModelSlim applies before int4 quantization.

Online, per token (a row of length ``K`` viewed row-major as ``X`` of shape
``[L, R]``): ``X' = left_trans^T @ X @ right_trans`` with both factors as stored in
the checkpoint (vLLM Ascend transposes ``left_trans`` once at load and the kernel
computes ``p1 @ (X @ p2)``). The factors are first rounded to the model dtype
(vLLM Ascend passes ``left_trans.to(x.dtype)``). The kernel rounds the transformed
value to **float16** before quantizing; then ``m = max|X'|``,
``scale = f32(m * clip) / 7``, ``r = f32(f32(7 / clip) / m)``,
``q = sat_int4(rint(f32(X') * r))``.

Our departures, each deliberate: the two small matrix products are evaluated in
float64 (products of float32 values are exact there) and rounded once to float16,
so a different summation order can change the result only where the exact value lies
within float64 rounding (~2^-45 relative) of an fp16 rounding boundary, and then by one fp16
ulp (the conformance suite asserts <= 1 ulp on X' and bit-exactness downstream of it). ``o_proj`` checkpoints carry
only ``left_trans`` (``[num_heads, num_heads]``): the token is viewed as
``[num_heads, head_dim]`` and no right factor is applied (real msModelSlim output;
vLLM Ascend cannot load it). Rows with NaN/inf get q = 0 and scale NaN; zero rows
get q = 0 and scale 0 (as the dynamic quantizers).
"""

from __future__ import annotations

import math

import numpy as np

from .activation_quant import row_absmax
from .rounding import INT4_MAX, INT4_MIN, quantize_rint, round_to_dtype


def decompose_dim(k: int) -> tuple[int, int]:
    """vLLM Ascend's ``get_decompose_dim``: smallest ``a >= ceil(sqrt(K))`` with ``a^2 - K = b^2``.

    Returns ``(L, R) = (a - b, a + b)``, ``L * R == K``, ``L <= R``.
    Examples: 4096 -> (64, 64), 2048 -> (32, 64), 11008 -> (86, 128).
    """
    if k <= 0:
        raise ValueError(f"cannot decompose K={k}")
    if k % 4 == 2:
        # K = a^2 - b^2 = (a-b)(a+b) has factors of equal parity: impossible for K = 2 mod 4.
        # vLLM Ascend's get_decompose_dim loops forever on such K; we refuse instead.
        raise ValueError(f"K={k} is 2 mod 4: it is not a difference of two squares, no (L, R) exists")
    a = math.isqrt(k)
    if a * a < k:
        a += 1
    while True:
        b2 = a * a - k
        b = math.isqrt(b2)
        if b * b == b2:
            return a - b, a + b
        a += 1


def transform_shapes(left_trans: np.ndarray, right_trans: np.ndarray | None, k: int, name: str = "") -> tuple[int, int]:
    """Validate the factors against ``K`` and return ``(L, R)`` of the token view."""
    where = f"{name}: " if name else ""
    lt = np.asarray(left_trans)
    if lt.ndim != 2 or lt.shape[0] != lt.shape[1]:
        raise ValueError(f"{where}left_trans must be square, got shape {lt.shape}")
    left = lt.shape[0]
    if right_trans is None:
        if k % left:
            raise ValueError(f"{where}left_trans size {left} does not divide K={k} (o_proj form, no right_trans)")
        return left, k // left
    rt = np.asarray(right_trans)
    if rt.ndim != 2 or rt.shape[0] != rt.shape[1]:
        raise ValueError(f"{where}right_trans must be square, got shape {rt.shape}")
    if left * rt.shape[0] != k:
        raise ValueError(
            f"{where}left_trans {lt.shape} x right_trans {rt.shape} gives {left * rt.shape[0]}, expected K={k}"
        )
    return left, rt.shape[0]


def kronecker_transform(x: np.ndarray, left_trans: np.ndarray, right_trans: np.ndarray | None,
                        dtype) -> np.ndarray:
    """``float16(left^T @ X @ right)`` per token, factors rounded to the model dtype first.

    ``x`` is ``[M, K]`` in the model dtype. Returns float16 ``[M, K]`` (the transformed
    token flattened row-major).
    """
    x = np.asarray(x)
    m, k = x.shape
    left, right = transform_shapes(left_trans, right_trans, k)
    lt = round_to_dtype(np.asarray(left_trans, np.float32), dtype).astype(np.float64)
    xt = x.astype(np.float64).reshape(m, left, right)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf rows stay non-finite, by design
        if right_trans is not None:
            rt = round_to_dtype(np.asarray(right_trans, np.float32), dtype).astype(np.float64)
            xt = xt @ rt
        out = np.einsum("ji,mjr->mir", lt, xt)
    return out.reshape(m, k).astype(np.float16)


def quantize_kronecker_int4(xt: np.ndarray, clip_ratio) -> tuple[np.ndarray, np.ndarray]:
    """Per-token int4 quantization of the transformed (float16) activations, with clipping.

    ``m = max|X'|``; ``scale = f32(f32(m * clip) / 7)``; ``r = f32(f32(7 / clip) / m)``;
    ``q = sat_int4(rint(f32(X') * r))`` (values above 7 when ``clip < 1`` saturate).
    Returns ``(q int8 [M, K] in [-8, 7], scale float32 [M])``.
    """
    c = np.float32(np.asarray(clip_ratio, dtype=np.float32).reshape(-1)[0])
    if not (np.isfinite(c) and 0 < c <= 1):
        raise ValueError(f"clip_ratio must lie in (0, 1], got {c}")
    xf, finite, m, usable, safe_m = row_absmax(xt)
    with np.errstate(over="ignore", invalid="ignore"):  # tiny subnormal m: r = inf, codes saturate
        r = (np.float32(np.float32(7) / c) / safe_m).astype(np.float32)
        v = (np.where(usable[..., None], xf, np.float32(0)) * r[..., None]).astype(np.float32)
    q = quantize_rint(v, INT4_MIN, INT4_MAX)
    scale = np.where(usable, ((m * c).astype(np.float32) / np.float32(7)).astype(np.float32), np.float32(0))
    scale = np.where(finite, scale, np.float32(np.nan)).astype(np.float32)
    return q, scale


def transform_weight(weight: np.ndarray, left_trans: np.ndarray, right_trans: np.ndarray | None) -> np.ndarray:
    """Offline: each output row ``w`` (viewed ``[L, R]``) becomes ``L^{-1} @ W @ R^{-T}``.

    Then ``<X', W'> = <L^T X R, L^{-1} W R^{-T}> = <X, W>``: the transformed activations
    against the transformed weights give the original product. float64 throughout.
    """
    w = np.asarray(weight, dtype=np.float64)
    n, k = w.shape
    left, right = transform_shapes(left_trans, right_trans, k)
    wl = np.linalg.inv(np.asarray(left_trans, np.float64))
    wt = w.reshape(n, left, right)
    wt = np.einsum("ij,njr->nir", wl, wt)
    if right_trans is not None:
        wr = np.linalg.inv(np.asarray(right_trans, np.float64)).T
        wt = wt @ wr
    return wt.reshape(n, k)
