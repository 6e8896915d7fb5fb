"""Weight-only linear kernels (W8A16, W4A16) in PyTorch, and the bound they meet.

Counterpart of ``reference.linear.w8a16_linear`` / ``w4a16_linear``. The reference
evaluates ``y = dt(sum_k x[m,k] * w[n,k] + bias[n])`` in float64 with the exact
dequantized weight ``w = (q - o) * s`` (``s``, ``o`` rounded to the model dtype ``dt`` at
load) and rounds once. No fast kernel sums in that order, so these kernels are compared
within a derived bound, not bit-exactly. The weights stay int8 in memory (W4A16: int4
values carried in int8) and are dequantized per call.

Kernels:

``dequant-f32``  ``w32 = (f32(q) - o) * s`` (per group), ``y = dt(f32(x) @ w32^T + b)``
                 with a float32 GEMM. For bf16/fp16 models ``w32`` is exact (``q - o``
                 has <= 9 significant bits, ``s`` <= 11, the product <= 20 < 24); for
                 float32 models each weight is rounded once (relative 2^-24).
``dequant-bf16`` (bf16 models) ``w16 = bf16(w32)``, ``v = bf16(x @ w16^T)`` with
                 oneDNN's bf16 GEMM (float32 accumulation, one rounding), then
                 ``y = bf16(f32(v) + b)``: each weight rounded (relative 2^-8: bf16 keeps 8
                 significant bits), two roundings to bf16. The AVX512-BF16 dot product
                 (``vdpbf16ps``) treats subnormal inputs as zero and flushes subnormal
                 results (found by the conformance suite): the bound adds
                 ``sum_{k: x subnormal} |x||w| + (K + 1) 2^-126``.
``colscale-bf16`` (bf16 models; per-channel scales, no offset) ``w16 = bf16(q)`` (exact:
                 |q| <= 128), ``v = bf16(x @ w16^T)``, ``y = bf16(f32(f32(v) * s[n]) + b)``:
                 the scale moves from the K x N weight to the M x N output. The rounding of
                 ``v`` is relative 2^-8 of ``|v| <= sum_k |x q|``, i.e. at most 2^-8 S once
                 multiplied by ``s``: the bound of ``dequant-bf16`` (``rel_w = 2^-8``, two
                 roundings, flushed subnormals) holds as it is.
``int4pack-mm``  ``torch._weight_int4pack_mm_for_cpu`` (W4A16; groups of 32/64/128/256
                 dividing K, N % 16 == 0): torch's packed int4 copy made at prepare, float32
                 accumulation, ``v = dt(...)`` then ``y = dt(f32(v) + b)``: two roundings.
``int8pack-mm``  ``torch._weight_int8pack_mm`` (W8A16, per-channel, all offsets zero):
                 ``v = dt(f32(sum_k x q) * s[n])`` (float32 accumulation), then
                 ``y = dt(f32(v) + b)``: two roundings to ``dt``.

Tiling (the three dequantizing kernels): the weight is dequantized ``TILE_BYTES`` of rows
at a time into a per-thread workspace that is reused across calls and layers, and each
tile's GEMM writes its own output columns. A whole-weight dequantization per call
allocated a fresh 32-64 MiB tensor every time (an mmap and a page fault per 4 KiB on every
call: ~20 ms of the 60 ms of a 4096 x 4096 bf16 layer at M = 256, one thread, measured),
and wrote it to DRAM and read it back; a tile stays in the cache between its
dequantization and its GEMM. Tiling changes nothing but the order in which the GEMM sums
(free in the bound: any order).

Bound (elementwise, used by the conformance suite). With ``S[m,n] = sum_k |x[m,k]| |w[n,k]|
+ |b[n]|`` (exact weights), ``u = 2^-24``:

    |y - y_ref| <= delta + c * ulp_dt(2 S + delta),
    delta = (rel_w + (K + 3) * u * 1.01) * S + (2 K + 4) * 2^-150  [+ the flush term of ``dequant-bf16``]

``(K + 3) u`` covers the float32 accumulation (``gamma_K = K u / (1 - K u)``, any summation
order, FMA or not), the scale multiply / bias add in float32 and the reference's own
float64 summation error (``(K+1) 2^-53``); ``(2K + 4) 2^-150`` is the absolute error of
float32 operations whose results are subnormal (half the smallest spacing each, found by
the conformance suite on float32 models with subnormal activations); ``rel_w`` is the per-weight rounding (0, or
2^-24 for float32 models in ``dequant-f32``, 2^-8 for ``dequant-bf16`` and ``colscale-bf16``); ``c`` counts the
roundings to ``dt`` on our side (1 for ``dequant-f32``, 2 otherwise: an intermediate rounding
happens before the bias, at the magnitude of the partial sum, itself <= S). ``ulp_dt(v)``
is the spacing of ``dt`` at magnitude ``v`` (subnormal spacing below the normal range).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

__all__ = ["TILE_BYTES", "WeightOnlyWeights", "WEIGHT_ONLY_KERNELS", "weight_only_bound_params", "dequantize_f32"]

#: Bytes of one dequantized weight tile (whole rows of the [N, K] weight). 4 MiB measured
#: best of 0.5-4 MiB at M = 16 and 256 on this project's CPU (1 MiB L2 per core, 32 MiB L3):
#: smaller tiles pay more per-op overhead and narrower GEMMs than they gain in cache.
TILE_BYTES = 4 * 2**20


@dataclass
class WeightOnlyWeights:
    """Kernel-ready weight-only tensors: int8 codes and per-group float32 scale/offset,
    plus (W4A16, when ``int4pack-mm`` may run) torch's packed int4 copy and its scales.

    W4A16 keeps one copy of its codes: once torch's packed int4 copy exists (N a multiple of
    64), ``q`` is dropped and :meth:`q_rows` unpacks row tiles from it (nibble layout probed
    and verified at packing time), so the layer stays at ~0.26x of its bf16 bytes instead of
    carrying an int8 copy (0.5x) beside the packed one."""

    q: torch.Tensor | None           # int8 [N, K] (int4 values for W4A16); None once packed only
    scale: torch.Tensor              # float32 [N, G], already rounded to the model dtype
    offset: torch.Tensor | None      # float32 [N, G] (dt-rounded) or None when all zero
    group: int                       # group size along K (K for per-channel)
    int4pack: torch.Tensor | None = None       # _convert_weight_to_int4pack_for_cpu(q + 8)
    int4_scale_zeros: torch.Tensor | None = None  # [G, N, 2] (scale, 0) in the model dtype
    _as_dtype: dict = field(default_factory=dict, repr=False)   # derived copies, made on first use
    shape: tuple[int, int] = field(init=False)                 # (N, K)

    def __post_init__(self):
        self.shape = (int(self.q.shape[0]), int(self.q.shape[1]))

    def q_rows(self, n0: int, n1: int) -> torch.Tensor:
        """int8 codes of rows ``n0:n1`` (a view of ``q``, or unpacked from the int4 copy)."""
        if self.q is not None:
            return self.q[n0:n1]
        return _unpack_int4pack_rows(self.int4pack, n0, n1, self.shape[1])

    def scale_as(self, dt: torch.dtype) -> torch.Tensor:
        """``scale`` in ``dt`` (exact: the scales are already rounded to the model dtype)."""
        key = ("scale", dt)
        if key not in self._as_dtype:
            self._as_dtype[key] = self.scale.to(dt)
        return self._as_dtype[key]

    def q_abs_rowsum_max(self) -> int:
        """``max_n sum_k |q[n, k]|`` (the largest unscaled row sum; computed once)."""
        if "q_abs_rowsum_max" not in self._as_dtype:
            q = self.q_rows(0, self.shape[0]).to(torch.int32)
            self._as_dtype["q_abs_rowsum_max"] = int(q.abs().sum(dim=1).max()) if q.numel() else 0
        return self._as_dtype["q_abs_rowsum_max"]

    def offset_as(self, dt: torch.dtype) -> torch.Tensor | None:
        if self.offset is None:
            return None
        key = ("offset", dt)
        if key not in self._as_dtype:
            self._as_dtype[key] = self.offset.to(dt)
        return self._as_dtype[key]

    def resident_bytes(self) -> int:
        b = (0 if self.q is None else self.q.numel() * self.q.element_size()) + self.scale.numel() * 4
        for t in (self.offset, self.int4pack, self.int4_scale_zeros):
            b += 0 if t is None else t.numel() * t.element_size()
        return b

    def add_int4pack(self, dt: torch.dtype) -> None:
        """Pack for ``torch._weight_int4pack_mm_for_cpu``: unsigned nibbles ``q + 8`` and
        ``(scale, zero = 0)`` per group, so its dequantization ``(u - 8) * scale + zero`` is
        ``q * scale``."""
        self.int4pack = torch._convert_weight_to_int4pack_for_cpu((self.q.to(torch.int32) + 8).contiguous(), 1)
        s = self.scale.t().to(dt)
        self.int4_scale_zeros = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()
        n, k = self.shape
        if n % _INT4PACK_BLOCK_N == 0 and torch.equal(_unpack_int4pack_rows(self.int4pack, 0, n, k), self.q):
            self.q = None   # the packed copy is the only copy (layout checked just now, bit for bit)


#: torch 2.13's ``_convert_weight_to_int4pack_for_cpu`` (probed): for N a multiple of 64 the
#: bytes form ``[N / 64, K, 32]``; byte ``j`` of block ``b`` at column ``k`` holds row
#: ``64 b + j`` in its low nibble and row ``64 b + 32 + j`` in its high nibble, as ``q + 8``.
#: ``add_int4pack`` verifies this on every layer before dropping the int8 copy.
_INT4PACK_BLOCK_N = 64


def _int4pack_rows_into(tile: torch.Tensor, packed: torch.Tensor, n0: int, n1: int) -> None:
    """``tile[:] = q[n0:n1]`` in ``tile``'s dtype, straight from the int4pack copy (one
    transposing copy per nibble half, then ``- 8``: exact in int8, bf16 and float32; straight
    into a float tile it is ~2.5x faster than unpacking to int8 and converting)."""
    b = _INT4PACK_BLOCK_N
    k = tile.shape[1]
    if n0 % b or n1 % b:
        raise ValueError(f"int4pack rows {n0}:{n1} are not whole blocks of {b}")
    blocks = packed.reshape(-1, k, b // 2)[n0 // b: n1 // b].transpose(1, 2).contiguous()  # [nb, 32, K]
    t3 = tile.view(-1, b, k)
    t3[:, : b // 2].copy_(blocks & 15)
    t3[:, b // 2:].copy_(blocks >> 4)
    tile.sub_(8)


def _unpack_int4pack_rows(packed: torch.Tensor, n0: int, n1: int, k: int) -> torch.Tensor:
    """int8 codes ``[n1 - n0, K]`` of rows ``n0:n1`` (multiples of 64) of an int4pack copy."""
    rows = torch.empty((n1 - n0, k), dtype=torch.int8, device=packed.device)
    _int4pack_rows_into(rows, packed, n0, n1)
    return rows


def _per_group(w: torch.Tensor, a: torch.Tensor, g: int, op) -> torch.Tensor:
    """Apply ``op(w_cols, a_col)`` in place per group of ``g`` columns; ragged tail handled."""
    n, k = w.shape
    full = (k // g) * g
    if full:
        op(w[:, :full].view(n, k // g, g), a[:, : k // g].unsqueeze(-1))
    if full < k:
        op(w[:, full:], a[:, -1:])
    return w


def dequantize_f32(wts: WeightOnlyWeights) -> torch.Tensor:
    """``(f32(q) - o) * s`` per group as a new float32 ``[N, K]`` tensor (the whole weight)."""
    w = wts.q_rows(0, wts.shape[0]).to(torch.float32)
    if wts.offset is not None:
        _per_group(w, wts.offset, wts.group, lambda a, b: a.sub_(b))
    return _per_group(w, wts.scale, wts.group, lambda a, b: a.mul_(b))


class _Workspace(threading.local):
    """One flat scratch tensor per thread, dtype and device, grown on demand and reused by
    every call of every layer (a model's layers run one after another on a thread). A buffer
    made under ``torch.inference_mode`` (vLLM runs there) is an inference tensor, which may not
    be written outside that mode: buffers are kept per mode."""

    def __init__(self):
        self.buffers: dict[tuple[torch.dtype, torch.device, bool], torch.Tensor] = {}

    def get(self, numel: int, dt: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dt, device, torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dt, device=device)
            self.buffers[key] = buf
        return buf[:numel]


_WORKSPACE = _Workspace()


def _tiled_gemm(wts: WeightOnlyWeights, x: torch.Tensor, dt_w: torch.dtype, fill) -> torch.Tensor:
    """``x @ W^T`` in ``dt_w`` with ``W`` made ``TILE_BYTES`` of rows at a time:
    ``fill(tile, n0, n1)`` writes rows ``n0:n1`` of ``W`` into ``tile`` ``[n1 - n0, K]``, and
    that tile's GEMM writes output columns ``n0:n1``."""
    n, k = wts.shape
    rows = max(1, min(n, TILE_BYTES // max(1, k * dt_w.itemsize)))
    if wts.q is None:   # tiles unpacked from the int4pack copy: whole blocks of rows
        rows = max(_INT4PACK_BLOCK_N, rows // _INT4PACK_BLOCK_N * _INT4PACK_BLOCK_N)
    buf = _WORKSPACE.get(rows * k, dt_w, x.device)
    y = torch.empty((x.shape[0], n), dtype=dt_w, device=x.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        tile = buf[: (n1 - n0) * k].view(n1 - n0, k)
        fill(tile, n0, n1)
        torch.mm(x, tile.t(), out=y if n1 - n0 == n else y[:, n0:n1])
    return y


def _dequant_fill(wts: WeightOnlyWeights, dt_w: torch.dtype):
    """``tile = dt_w((q - o) * s)`` per group, each op in ``dt_w`` (exact up to the multiply,
    which rounds the exact product once: ``q - o`` is an integer of <= 9 bits, ``s`` has
    <= 11 significant bits)."""
    scale, offset = wts.scale_as(dt_w), wts.offset_as(dt_w)

    def fill(tile: torch.Tensor, n0: int, n1: int) -> None:
        if wts.q is None:
            _int4pack_rows_into(tile, wts.int4pack, n0, n1)
        else:
            tile.copy_(wts.q_rows(n0, n1))
        if offset is not None:
            _per_group(tile, offset[n0:n1], wts.group, lambda a, b: a.sub_(b))
        _per_group(tile, scale[n0:n1], wts.group, lambda a, b: a.mul_(b))
    return fill


def _dequant_f32(wts: WeightOnlyWeights, x: torch.Tensor, bias32: torch.Tensor | None, dt) -> torch.Tensor:
    y = _tiled_gemm(wts, x.to(torch.float32), torch.float32, _dequant_fill(wts, torch.float32))
    if bias32 is not None:
        y.add_(bias32)
    return y.to(dt)


def dequantize_bf16(wts: WeightOnlyWeights) -> torch.Tensor:
    """``bf16((q - o) * s)`` computed in bf16 directly: ``q - o`` (|.| <= 255) is exact in
    bf16 and the bf16 multiply rounds the exact float32 product once, so this equals
    ``bf16(dequantize_f32(wts))`` for bf16-rounded scales (the whole weight; the kernel
    itself dequantizes tile by tile with the same ops)."""
    w = torch.empty(wts.shape, dtype=torch.bfloat16)
    _dequant_fill(wts, torch.bfloat16)(w, 0, w.shape[0])
    return w


def _dequant_bf16(wts: WeightOnlyWeights, x: torch.Tensor, bias32: torch.Tensor | None, dt) -> torch.Tensor:
    v = _tiled_gemm(wts, x, torch.bfloat16, _dequant_fill(wts, torch.bfloat16))
    if bias32 is None:
        return v
    return (v.to(torch.float32) + bias32).to(dt)


#: ``colscale-bf16`` sums ``x * q`` before scaling, up to 127x the magnitude of ``x * w``:
#: while ``max_k |x[m, k]| * max_n sum_k |q[n, k]|`` stays under this, no partial sum of row
#: ``m`` can overflow (float32/bf16 overflow at 2^128); finite rows above it are recomputed
#: with ``dequant-bf16`` (per row, so that no row's result depends on the others in the batch).
_COLSCALE_LIMIT = 2.0**127


def _colscale_bf16(wts: WeightOnlyWeights, x: torch.Tensor, bias32: torch.Tensor | None, dt) -> torch.Tensor:
    def fill(tile: torch.Tensor, n0: int, n1: int) -> None:
        tile.copy_(wts.q_rows(n0, n1))               # int8 -> bf16, exact

    v = _tiled_gemm(wts, x, torch.bfloat16, fill).to(torch.float32)
    v.mul_(wts.scale.reshape(1, -1))                 # f32(f32(v) * s[n])
    if bias32 is not None:
        v.add_(bias32)
    y = v.to(dt)
    amax = x.abs().amax(dim=1).to(torch.float32)     # (aminmax is ~10x slower here)
    risky = torch.isfinite(amax) & (amax * float(wts.q_abs_rowsum_max()) >= _COLSCALE_LIMIT)
    if bool(risky.any()):
        y[risky] = _dequant_bf16(wts, x[risky], bias32, dt)
    return y


def _int4pack_mm(wts: WeightOnlyWeights, x: torch.Tensor, bias32: torch.Tensor | None, dt) -> torch.Tensor:
    v = torch._weight_int4pack_mm_for_cpu(x.contiguous(), wts.int4pack, wts.group, wts.int4_scale_zeros)
    if bias32 is None:
        return v
    return (v.to(torch.float32) + bias32).to(dt)


def _int8pack_mm(wts: WeightOnlyWeights, x: torch.Tensor, bias32: torch.Tensor | None, dt) -> torch.Tensor:
    x = x.contiguous()
    if x.data_ptr() % 64:
        # torch 2.13's CPU kernel uses aligned 32-byte loads for bf16 activations: a base
        # pointer off a 32-byte boundary segfaults (probed); fresh torch memory is 64-aligned
        x = x.clone()
    v = torch._weight_int8pack_mm(x, wts.q, wts.scale.reshape(-1).to(dt))
    if bias32 is None:
        return v
    return (v.to(torch.float32) + bias32).to(dt)


def _can_dequant_bf16(algo: str, wts: WeightOnlyWeights, dt, device) -> tuple[bool, str | None]:
    if dt != torch.bfloat16:
        return False, f"bf16 GEMM path is for bfloat16 models only (model dtype is {dt})"
    return True, None


def _can_colscale_bf16(algo: str, wts: WeightOnlyWeights, dt, device) -> tuple[bool, str | None]:
    if dt != torch.bfloat16:
        return False, f"bf16 GEMM path is for bfloat16 models only (model dtype is {dt})"
    if wts is None:
        return False, "needs the layer's prepared weights to decide (per-channel, symmetric)"
    if wts.group != wts.shape[1]:
        return False, f"per-channel scales only; this layer has group size {wts.group}"
    if wts.offset is not None:
        return False, "symmetric weights only (weight_offset is not all zero)"
    if bool((wts.scale > 1).any()):
        # the flushed-subnormal term of the bound is in units of x*w; here the GEMM flushes
        # in units of x*q, scaled by s afterwards: s <= 1 keeps it inside (|w| <= 127 s)
        return False, "weight scales above 1 (|w| > 127): the subnormal-flush bound assumes s <= 1"
    return True, None


def _can_int8pack(algo: str, wts: WeightOnlyWeights, dt, device) -> tuple[bool, str | None]:
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False, "torch._weight_int8pack_mm missing from this PyTorch build"
    if algo != "W8A16":
        return False, f"int8 weights only (W8A16); {algo} has int4 weights"
    if wts is None:
        return False, "needs the layer's prepared weights to decide (per-channel, symmetric, K % 16)"
    if wts.group != wts.shape[1]:
        return False, f"per-channel scales only; this layer has group size {wts.group}"
    if wts.offset is not None:
        return False, "symmetric weights only (weight_offset is not all zero)"
    if wts.shape[1] % 16:
        # torch 2.13 CPU: bf16 rows must start on 32-byte boundaries (aligned loads): with
        # K % 16 != 0 the second row does not, and it segfaults or returns NaN (probed; fp16
        # and fp32 looked fine); refused for every dtype as a precaution
        return False, f"K={wts.shape[1]} is not a multiple of 16 (torch._weight_int8pack_mm crashes there)"
    if device.type not in ("cpu", "cuda"):
        return False, f"not available on {device.type}"
    return True, None


def _can_int4pack(algo: str, wts: WeightOnlyWeights, dt, device) -> tuple[bool, str | None]:
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return False, "torch._weight_int4pack_mm_for_cpu missing from this PyTorch build"
    if algo != "W4A16":
        return False, f"int4 weights only (W4A16); {algo} has int8 weights"
    if device.type != "cpu":
        return False, f"CPU kernel (device is {device.type})"
    if wts is None:
        return False, "needs the layer's prepared weights (torch's packed int4 copy is made by prepare_linear)"
    n, k = wts.shape
    if wts.group not in (32, 64, 128, 256) or k % wts.group:
        return False, f"group size must be 32, 64, 128 or 256 and divide K (group {wts.group}, K={k})"
    if n % 16:
        return False, f"N={n} is not a multiple of 16 (_convert_weight_to_int4pack_for_cpu)"
    return True, None


def _always(algo, wts, dt, device):
    return True, None


#: name -> (run(wts, x, bias32, dt), can_implement(algo, wts, dt, device))
WEIGHT_ONLY_KERNELS = {
    "int4pack-mm": (_int4pack_mm, _can_int4pack),
    "int8pack-mm": (_int8pack_mm, _can_int8pack),
    "colscale-bf16": (_colscale_bf16, _can_colscale_bf16),
    "dequant-bf16": (_dequant_bf16, _can_dequant_bf16),
    "dequant-f32": (_dequant_f32, _always),
}


def weight_only_bound_params(kernel: str, dt: torch.dtype) -> tuple[float, int, bool]:
    """``(rel_w, c, flushes_subnormals)`` of the module docstring's bound for ``kernel``."""
    if kernel == "dequant-f32":
        return (2.0**-24 if dt == torch.float32 else 0.0), 1, False
    if kernel in ("dequant-bf16", "colscale-bf16"):
        # bf16 keeps 8 significant bits: unit roundoff 2^-8 (weights for dequant-bf16, the
        # GEMM output v for colscale-bf16, see the module docstring)
        return 2.0**-8, 2, True
    if kernel == "int8pack-mm":
        return 0.0, 2, False
    if kernel == "int4pack-mm":
        # its in-kernel dequantization (u - 8) * s + 0 is exact for model-dtype scales; 2^-24
        # per weight and the subnormal-flush term are kept as a margin (kernel not documented)
        return 2.0**-24, 2, True
    if kernel == "npu":
        # npu_weight_quant_batchmatmul: in-kernel precision undocumented (facts §2.4); assume
        # weights dequantized to the activation dtype (<= 2^-8 relative for bf16), two
        # roundings, and possibly flushed subnormals
        return 2.0**-8, 2, True
    raise ValueError(f"unknown weight-only kernel {kernel!r}")
