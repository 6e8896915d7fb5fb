"""The int64 encodings of float32 scales found in msModelSlim checkpoints.

msModelSlim's ``deqscale2int64`` (and vLLM Ascend's ``scale_from_float_to_int64``)
reinterpret the float32 bit pattern as int32 and widen it to int64 (sign
extension; scales are positive, so the high 32 bits are 0). Real msModelSlim
output writes W8A8 ``deq_scale`` this way for float32 and float16 source models
and as plain float32 for bfloat16 ones. No mantissa bits are dropped.

vLLM Ascend's W4A8 MoE ``process_scale`` uses the uint32 reading (zero
extension) instead; for positive scales the two encodings are the same number.

The NPU's fixpipe very likely consumes such a scale with FP19 precision (the top
19 bits of the float32). We do not emulate that: the decoded float32 is used as
is (decision recorded in docs/numerics.md).
"""

from __future__ import annotations

import numpy as np


def encode_float32_as_int64(scale: np.ndarray) -> np.ndarray:
    """float32 -> int64 holding the float32 bit pattern in its low 32 bits (sign-extended)."""
    s = np.ascontiguousarray(scale, dtype=np.float32)
    return s.view(np.int32).astype(np.int64)


def decode_int64_as_float32(encoded: np.ndarray, name: str = "deq_scale") -> np.ndarray:
    """Inverse of :func:`encode_float32_as_int64`; accepts sign- or zero-extended words.

    Raises ``ValueError`` naming ``name`` if a word does not fit in 32 bits, i.e. if the
    tensor is not such an encoding.
    """
    e = np.asarray(encoded)
    if e.dtype != np.int64:
        raise ValueError(f"{name}: expected int64 encoding, got dtype {e.dtype}")
    low = e & np.int64(0xFFFFFFFF)
    sign_ext = np.where(low >= 2**31, low - 2**32, low)
    ok = (e == low) | (e == sign_ext)
    if not np.all(ok):
        bad = int(np.argmin(ok.reshape(-1)))
        raise ValueError(
            f"{name}: int64 value {int(e.reshape(-1)[bad])} at flat index {bad} is not a "
            "float32 bit pattern widened to int64 (high 32 bits must be 0 or a sign extension)"
        )
    return low.astype(np.uint32).view(np.float32).reshape(e.shape)


def deq_scale_as_float32(deq_scale: np.ndarray, name: str = "deq_scale") -> np.ndarray:
    """A W8A8 ``deq_scale`` as float32, whichever of the two stored forms it has."""
    d = np.asarray(deq_scale)
    if d.dtype == np.int64:
        return decode_int64_as_float32(d, name)
    if d.dtype == np.float32:
        return d.copy()
    raise ValueError(f"{name}: expected float32 or int64, got dtype {d.dtype}")
