"""Conformance of the tiled weight-only kernels when the weight spans many tiles.

``optimized.weight_only`` dequantizes ``TILE_BYTES`` of weight rows at a time (4 MiB): the
layers drawn by ``test_linear`` (N <= 40, K <= ~300) fit one tile, so the tile loop, its
ragged last tile and the strided output columns would go untested. Here the tile size is
drawn down to a single row and every tiled kernel is forced; the output must stay within
the same bound (``checks.check_linear``: ``optimized/weight_only.py``'s derivation), and a
second call must reuse the per-thread workspace without carrying data over.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

from ascend_quant.optimized import weight_only as wo

from . import strategies as hh
from .checks import check_linear
from .test_linear import linear_case

_TILED = ("colscale-bf16", "dequant-bf16", "dequant-f32")


@contextlib.contextmanager
def _tile_bytes(nbytes: int):
    saved = wo.TILE_BYTES
    wo.TILE_BYTES = nbytes
    try:
        yield
    finally:
        wo.TILE_BYTES = saved


@pytest.mark.parametrize("kernel", _TILED)
@given(data=st.data())
def test_tiled_kernel_matches_reference_across_tiles(backend, kernel, data):
    if backend != "cpu":
        pytest.skip(f"{kernel} is a kernel of the cpu backend")
    algo = data.draw(st.sampled_from(("W8A16", "W4A16")), label="algo")
    tensors, x, dtype, bias, opts = data.draw(linear_case(algo, max_m=40), label="case")
    if kernel != "dequant-f32" and dtype != "bfloat16":   # bf16-GEMM kernels: bf16 models only
        dtype = "bfloat16"
        x = x.astype(np.float32).astype(hh.np_dtype(dtype))
        bias = None if bias is None else bias.astype(np.float32).astype(hh.np_dtype(dtype))
    # tile sizes from one row up to a few rows (ragged last tile) and, sometimes, all rows
    nbytes = data.draw(st.one_of(st.integers(1, 4096), st.just(wo.TILE_BYTES)), label="TILE_BYTES")
    with _tile_bytes(nbytes):
        for _ in range(2):  # the second call reuses the workspace the first one filled
            try:
                check_linear(backend, algo, tensors, x, dtype, bias, kernel=kernel, **opts)
            except ValueError as e:  # the kernel cannot implement this layer (colscale: per-group)
                if "can run" not in str(e):
                    raise
                return


@pytest.mark.parametrize(("n", "k", "group"), [(64, 64, 32), (128, 256, 64), (192, 128, 128)])
@pytest.mark.parametrize("m", [1, 50, 300])
def test_w4a16_keeps_only_the_packed_int4_copy(backend, n, k, group, m):
    """W4A16 layers whose N is a multiple of 64 drop their int8 codes once torch's int4pack copy
    exists (resident bytes ~0.28x of bf16); every kernel of the auto rule (int4pack-mm at small
    M, tiles unpacked from the packed copy at large M) stays within the weight-only bound, and
    the unpacked codes are the checkpoint's, bit for bit."""
    if backend != "cpu":
        pytest.skip("int4pack-mm is a kernel of the cpu backend")
    from ascend_quant.optimized import prepare_linear
    from ascend_quant.reference import weight_quant as wq
    from ascend_quant.reference.packing import unpack_int32_offset8_to_int4

    rng = np.random.default_rng(n * 1000 + k + m)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    tensors = wq.quantize_w4a16(w, group_size=group)
    x = rng.standard_normal((m, k)).astype(np.float32).astype(hh.np_dtype("bfloat16"))
    p = prepare_linear("W4A16", tensors, dtype="bfloat16", group_size=group)
    wts = p.state["weights"]
    assert wts.q is None, "the int8 copy must be dropped once the int4pack copy exists"
    codes = unpack_int32_offset8_to_int4(tensors["weight_packed"]).astype(np.int8)
    assert np.array_equal(wts.q_rows(0, n).numpy(), codes)          # integers: bit-exact
    assert p.resident_bytes() <= n * k // 2 + wts.scale.numel() * 4 + wts.int4_scale_zeros.numel() * 2 + 1024
    with _tile_bytes(64 * k * 2):      # several tiles of 64 rows each at large M
        check_linear(backend, "W4A16", tensors, x, "bfloat16", None, kernel="auto", group_size=group)


def test_workspace_made_under_inference_mode_is_not_reused_outside_it(backend):
    """vLLM calls the kernels under torch.inference_mode; a later call outside it (a test, a
    script in the same process) must not write into the inference-mode scratch buffer."""
    if backend != "cpu":
        pytest.skip("dequant-bf16 is a kernel of the cpu backend")
    import torch

    from ascend_quant.optimized import apply_linear, prepare_linear
    from ascend_quant.reference import weight_quant as wq

    rng = np.random.default_rng(7)
    tensors = wq.quantize_w8a16(rng.standard_normal((8, 32)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((3, 32)).astype(np.float32)).to(torch.bfloat16)
    p = prepare_linear("W8A16", tensors, dtype="bfloat16", kernel="dequant-bf16")
    with _tile_bytes(1 << 20):
        with torch.inference_mode():
            inside = apply_linear(p, x).clone()
        outside = apply_linear(p, x)
    assert torch.equal(inside.view(torch.int16), outside.view(torch.int16))   # same kernel, same bits
