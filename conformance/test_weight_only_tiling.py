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
