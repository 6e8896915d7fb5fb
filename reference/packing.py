"""int4 packing: two's-complement nibbles in int32 words or int8 bytes.

The one nibble order every producer and consumer agrees on (msModelSlim
``_pack_int4``, vLLM Ascend ``pack_int4_to_int8``, ``npu_convert_weight_to_int4pack``,
``npu_quantize(..., quint4x2)``): along the packed axis, element ``j`` of each run
of 8 sits in bits ``[4j, 4j+4)`` of a little-endian int32; equivalently, in an
int8 byte the even element is the **low** nibble and the odd element the high
nibble, and four such bytes viewed as one int32 give the int32 layout.

LLM-Compressor ``pack-quantized`` (the W4A16 checkpoints vLLM Ascend reads) uses
the same order with **unsigned** nibbles ``stored = q + 8``.

Lengths along the packed axis must be multiples of 8 (int32) or 2 (int8); a
ragged length raises ``ValueError`` (pad explicitly if you need to).
"""

from __future__ import annotations

import numpy as np

from .rounding import INT4_MAX, INT4_MIN


def _check_int4(q: np.ndarray, name: str, lo: int = INT4_MIN, hi: int = INT4_MAX) -> None:
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"{name}: int4 values must be an integer array, got dtype {q.dtype}")
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(
            f"{name}: int4 values must lie in [{lo}, {hi}], found range [{q.min()}, {q.max()}]"
        )


def _split_axis(a: np.ndarray, axis: int, per_word: int, name: str) -> tuple[np.ndarray, int]:
    axis = axis % a.ndim
    n = a.shape[axis]
    if n % per_word:
        raise ValueError(
            f"{name}: length {n} along axis {axis} is not a multiple of {per_word}; "
            f"int4 packing needs whole words"
        )
    moved = np.moveaxis(a, axis, -1)
    return moved.reshape(moved.shape[:-1] + (n // per_word, per_word)), axis


def _pack(nibbles: np.ndarray, axis: int, per_word: int, out_dtype, name: str) -> np.ndarray:
    split, axis = _split_axis(nibbles.astype(np.uint32) & 0xF, axis, per_word, name)
    shifts = (4 * np.arange(per_word, dtype=np.uint32))
    word = np.bitwise_or.reduce(split << shifts, axis=-1)
    unsigned = np.uint32 if out_dtype == np.int32 else np.uint8
    packed = word.astype(unsigned).view(out_dtype)
    return np.moveaxis(packed, -1, axis)


def _unpack(words: np.ndarray, axis: int, per_word: int, signed: bool) -> np.ndarray:
    axis = axis % words.ndim
    unsigned = np.uint32 if words.dtype == np.int32 else np.uint8
    w = np.moveaxis(words.view(unsigned).astype(np.uint32), axis, -1)
    shifts = (4 * np.arange(per_word, dtype=np.uint32))
    nib = ((w[..., None] >> shifts) & 0xF).astype(np.int8)
    if signed:
        nib = np.where(nib >= 8, nib - 16, nib).astype(np.int8)
    out = nib.reshape(w.shape[:-1] + (w.shape[-1] * per_word,))
    return np.moveaxis(out, -1, axis)


def pack_int4_to_int32(q: np.ndarray, axis: int = -1, name: str = "weight") -> np.ndarray:
    """Pack int4 values (any integer dtype, range [-8, 7]) 8 per int32 along ``axis``."""
    _check_int4(q, name)
    return _pack(np.asarray(q), axis, 8, np.int32, name)


def unpack_int32_to_int4(packed: np.ndarray, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack_int4_to_int32`: int32 words -> int8 values in [-8, 7]."""
    packed = np.asarray(packed)
    if packed.dtype != np.int32:
        raise ValueError(f"expected int32 packed words, got dtype {packed.dtype}")
    return _unpack(packed, axis, 8, signed=True)


def pack_int4_to_int8(q: np.ndarray, axis: int = -1, name: str = "weight") -> np.ndarray:
    """Pack int4 values 2 per int8 along ``axis`` (even element in the low nibble)."""
    _check_int4(q, name)
    return _pack(np.asarray(q), axis, 2, np.int8, name)


def unpack_int8_to_int4(packed: np.ndarray, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack_int4_to_int8`: int8 bytes -> int8 values in [-8, 7]."""
    packed = np.asarray(packed)
    if packed.dtype != np.int8:
        raise ValueError(f"expected int8 packed bytes, got dtype {packed.dtype}")
    return _unpack(packed, axis, 2, signed=True)


def pack_int4_offset8_to_int32(q: np.ndarray, axis: int = -1, name: str = "weight_packed") -> np.ndarray:
    """LLM-Compressor ``pack-quantized``: store ``q + 8`` (unsigned nibbles), 8 per int32."""
    _check_int4(q, name)
    return _pack(np.asarray(q).astype(np.int16) + 8, axis, 8, np.int32, name)


def unpack_int32_offset8_to_int4(packed: np.ndarray, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack_int4_offset8_to_int32`: ``((v >> 4i) & 0xF) - 8``."""
    packed = np.asarray(packed)
    if packed.dtype != np.int32:
        raise ValueError(f"expected int32 packed words, got dtype {packed.dtype}")
    return (_unpack(packed, axis, 8, signed=False).astype(np.int16) - 8).astype(np.int8)
