"""int4 packing in PyTorch: two's-complement nibbles in int32 words or int8 bytes.

Counterpart of ``reference/packing.py``; every function matches it bit-exactly. Along
the packed axis, element ``j`` of each run of 8 sits in bits ``[4j, 4j+4)`` of a
little-endian int32; in an int8 byte the even element is the low nibble. The
``offset8`` variants store ``q + 8`` (LLM-Compressor ``pack-quantized``).

Lengths along the packed axis must be multiples of 8 (int32) or 2 (int8), else
``ValueError``. Words are assembled in int64 and wrapped into int32 explicitly
(no reliance on signed-shift overflow).
"""

from __future__ import annotations

import torch

__all__ = [
    "pack_int4_to_int32",
    "unpack_int32_to_int4",
    "pack_int4_to_int8",
    "unpack_int8_to_int4",
    "pack_int4_offset8_to_int32",
    "unpack_int32_offset8_to_int4",
]

_SHIFTS8 = tuple(4 * i for i in range(8))


def _check_int4(q: torch.Tensor, name: str, lo: int = -8, hi: int = 7) -> None:
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"{name}: int4 values must be an integer tensor, got dtype {q.dtype}")
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{name}: int4 values must lie in [{lo}, {hi}], found range [{int(q.min())}, {int(q.max())}]")


def _to_last(a: torch.Tensor, axis: int, per_word: int, name: str) -> tuple[torch.Tensor, int]:
    axis = axis % a.dim()
    n = a.shape[axis]
    if n % per_word:
        raise ValueError(f"{name}: length {n} along axis {axis} is not a multiple of {per_word}; "
                         f"int4 packing needs whole words")
    moved = a.movedim(axis, -1)
    return moved.reshape(*moved.shape[:-1], n // per_word, per_word), axis


def _pack(nibbles: torch.Tensor, axis: int, per_word: int, name: str) -> torch.Tensor:
    split, axis = _to_last(nibbles.to(torch.int64) & 0xF, axis, per_word, name)
    shifts = torch.tensor(_SHIFTS8[:per_word], dtype=torch.int64)
    word = (split << shifts).sum(dim=-1)             # disjoint bit fields: sum == OR
    if per_word == 8:
        word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    else:
        word = torch.where(word >= 2**7, word - 2**8, word).to(torch.int8)
    return word.movedim(-1, axis).contiguous()


def _unpack(words: torch.Tensor, axis: int, per_word: int, signed: bool) -> torch.Tensor:
    axis = axis % words.dim()
    w = words.movedim(axis, -1).to(torch.int64) & (0xFFFFFFFF if per_word == 8 else 0xFF)
    shifts = torch.tensor(_SHIFTS8[:per_word], dtype=torch.int64)
    nib = (w.unsqueeze(-1) >> shifts) & 0xF
    if signed:
        nib = torch.where(nib >= 8, nib - 16, nib)
    out = nib.to(torch.int8).reshape(*w.shape[:-1], w.shape[-1] * per_word)
    return out.movedim(-1, axis).contiguous()


def pack_int4_to_int32(q: torch.Tensor, axis: int = -1, name: str = "weight") -> torch.Tensor:
    """Pack int4 values (integer tensor, range [-8, 7]) 8 per int32 along ``axis``.

    Matches ``reference.packing.pack_int4_to_int32`` bit-exactly.
    """
    _check_int4(q, name)
    return _pack(q, axis, 8, name)


def unpack_int32_to_int4(packed: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int4_to_int32`: int32 words -> int8 values in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"expected int32 packed words, got dtype {packed.dtype}")
    return _unpack(packed, axis, 8, signed=True)


def pack_int4_to_int8(q: torch.Tensor, axis: int = -1, name: str = "weight") -> torch.Tensor:
    """Pack int4 values 2 per int8 along ``axis`` (even element in the low nibble).

    Matches ``reference.packing.pack_int4_to_int8`` bit-exactly.
    """
    _check_int4(q, name)
    return _pack(q, axis, 2, name)


def unpack_int8_to_int4(packed: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int4_to_int8`: int8 bytes -> int8 values in [-8, 7]."""
    if packed.dtype != torch.int8:
        raise ValueError(f"expected int8 packed bytes, got dtype {packed.dtype}")
    return _unpack(packed, axis, 2, signed=True)


def pack_int4_offset8_to_int32(q: torch.Tensor, axis: int = -1, name: str = "weight_packed") -> torch.Tensor:
    """LLM-Compressor ``pack-quantized``: store ``q + 8`` (unsigned nibbles), 8 per int32."""
    _check_int4(q, name)
    return _pack(q.to(torch.int64) + 8, axis, 8, name)


def unpack_int32_offset8_to_int4(packed: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int4_offset8_to_int32`: ``((v >> 4i) & 0xF) - 8``."""
    if packed.dtype != torch.int32:
        raise ValueError(f"expected int32 packed words, got dtype {packed.dtype}")
    return (_unpack(packed, axis, 8, signed=False).to(torch.int16) - 8).to(torch.int8)
