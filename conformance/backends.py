"""Run the optimized operations of one backend on NumPy inputs, returning NumPy outputs.

``cpu``, ``torch-portable`` and ``cuda`` run the torch functions of ``ascend_quant.optimized``
on their device; ``npu`` runs the torch_npu ops vLLM Ascend uses (unpacking packed int4
outputs so they compare with the reference's int8-carried values).
"""

from __future__ import annotations

import numpy as np
import torch

from ascend_quant.optimized import activation_quant as oa
from ascend_quant.optimized import packing as op
from ascend_quant.optimized.dispatch import backend_device

from .assertions import to_numpy

__all__ = ["to_torch", "quantize_dynamic", "quantize_static", "static_params", "kronecker_transform",
           "quantize_kronecker", "pack", "unpack"]


def to_torch(a: np.ndarray, backend: str) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.name == "bfloat16" else torch.from_numpy(a)
    return t.to(backend_device(backend))


def _npu():
    import torch_npu

    return torch_npu


def quantize_dynamic(backend: str, x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    xt = to_torch(x, backend)
    if backend == "npu":
        if bits == 8:
            q, s = _npu().npu_dynamic_quant(xt)
        else:
            packed, s = _npu().npu_dynamic_quant(xt, dst_type=torch.quint4x2)
            q = op.unpack_int32_to_int4(packed.cpu(), axis=-1)
        return to_numpy(q), to_numpy(s)
    q, s = oa.quantize_dynamic_per_token(xt, bits)
    return to_numpy(q), to_numpy(s)


def static_params(backend: str, input_scale: np.ndarray, input_offset: np.ndarray, dtype: str):
    recip, off = oa.static_quant_params(torch.from_numpy(input_scale), torch.from_numpy(input_offset), dtype)
    return np.float32(recip.item()), np.float32(off.item())


def quantize_static(backend: str, x: np.ndarray, recip: np.float32, offset: np.float32) -> np.ndarray:
    xt = to_torch(x, backend)
    if backend == "npu":
        dt = xt.dtype
        s = torch.tensor([float(recip)], dtype=dt, device=xt.device)
        o = torch.tensor([float(offset)], dtype=dt, device=xt.device)
        return to_numpy(_npu().npu_quantize(xt, s, o, torch.qint8, -1, False))
    return to_numpy(oa.quantize_static(xt, recip, offset))


def kronecker_transform(backend: str, x: np.ndarray, left_dt: np.ndarray, right_dt: np.ndarray | None) -> np.ndarray:
    """Factors already rounded to the model dtype (float32 arrays)."""
    lt = to_torch(left_dt, backend)
    rt = None if right_dt is None else to_torch(right_dt, backend)
    return to_numpy(oa.kronecker_transform(to_torch(x, backend), lt, rt))


def quantize_kronecker(backend: str, xt: np.ndarray, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, s = oa.quantize_kronecker_int4(to_torch(xt, backend), torch.from_numpy(clip))
    return to_numpy(q), to_numpy(s)


_PACK = {
    "int32": (op.pack_int4_to_int32, op.unpack_int32_to_int4),
    "int8": (op.pack_int4_to_int8, op.unpack_int8_to_int4),
    "offset8": (op.pack_int4_offset8_to_int32, op.unpack_int32_offset8_to_int4),
}


def pack(backend: str, kind: str, q: np.ndarray, axis: int) -> np.ndarray:
    return to_numpy(_PACK[kind][0](to_torch(q, backend), axis=axis))


def unpack(backend: str, kind: str, words: np.ndarray, axis: int) -> np.ndarray:
    return to_numpy(_PACK[kind][1](to_torch(words, backend), axis=axis))
