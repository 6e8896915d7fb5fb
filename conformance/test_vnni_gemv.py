"""The AVX-512 VNNI GEMV (``optimized/vnni_gemv.cpp``) against the exact integer product.

``onednn-gemv`` serves M <= ``GEMV_MAX_M`` from oneDNN's own prepacked buffer; the forced-
kernel properties of ``test_linear`` / ``test_pathological`` run it inside whole layers. Here
the kernel is checked alone, at the edges its blocking has: N and K around the 64-wide
blocks and the 4-wide k-groups (padding), every row count 1..GEMV_MAX_M (the 4-row register
blocks and their 1-3 row tails), saturated operands (+127 / -128 everywhere: the largest
int32 partial sums), and the column-scale epilogue. Integers are compared exactly:
``f32(acc)`` and ``f32(f32(acc) * s[n])`` bit for bit (``view(int32)``), never allclose.

On a machine without AVX-512 VNNI or a compiler the kernel is unavailable: the tests then
check that the dispatcher says so, and skip the numerics with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from ascend_quant.optimized import prepare_linear
from ascend_quant.optimized import vnni_gemv as vg
from ascend_quant.optimized.activation_quant import quantize_dynamic_per_token
from ascend_quant.optimized.dispatch import choose_kernel
from ascend_quant.optimized.int_gemm import OneDnnGemvIntGemm, OneDnnIntGemm
from ascend_quant.optimized.prepare import _nan_nonfinite_rows, _static_rows

from . import strategies as hh
from .test_linear import linear_case

LIB, WHY = vg.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"VNNI GEMV unavailable here: {WHY}")

_SIZES = st.one_of(st.sampled_from([1, 3, 4, 5, 63, 64, 65, 127, 128, 129, 192]), st.integers(1, 300))


def _operand(draw, shape, name):
    kind = draw(st.sampled_from(["random", "max", "min", "mixed"]), label=f"{name} kind")
    seed = draw(st.integers(0, 2**32 - 1), label=f"{name} seed")
    rng = np.random.default_rng(seed)
    if kind == "max":
        return np.full(shape, 127, dtype=np.int8)
    if kind == "min":
        return np.full(shape, -128, dtype=np.int8)
    a = rng.integers(-128, 128, size=shape, dtype=np.int8)
    if kind == "mixed":  # saturated runs next to zeros
        a[..., ::3] = -128
        a[..., 1::3] = 0
    return a


def test_dispatcher_names_the_gemv_or_says_why_not():
    c = choose_kernel("W8A8_DYNAMIC", backend="cpu", k=4096)
    if LIB is None:
        assert "onednn-gemv" in c.rejected and "VNNI GEMV unavailable" in c.rejected["onednn-gemv"]
    else:
        assert c.kernel == "onednn-gemv"


@needs_lib
@given(n=_SIZES, k=_SIZES, m=st.integers(1, vg.GEMV_MAX_M), scaled=st.booleans(), data=st.data())
def test_gemv_is_the_exact_product(n, k, m, scaled, data):
    w = _operand(data.draw, (n, k), "w")
    x = _operand(data.draw, (m, k), "x")
    scale = None
    if scaled:
        scale = data.draw(st.sampled_from(["ones", "random", "tiny", "huge"]), label="scale")
        rng = np.random.default_rng(n * 1000 + k)
        scale = {"ones": np.ones(n), "random": rng.uniform(1e-4, 1.0, n), "tiny": np.full(n, 1e-30),
                 "huge": np.full(n, 3e34)}[scale].astype(np.float32)
    g = OneDnnGemvIntGemm(torch.from_numpy(w), None if scale is None else torch.from_numpy(scale))
    assert g.gemv_unavailable is None, g.gemv_unavailable
    acc = x.astype(np.int64) @ w.astype(np.int64).T          # exact
    want = acc.astype(np.float32)                             # f32(acc): RNE of the exact sum
    if scale is not None:
        with np.errstate(over="ignore"):                      # "huge": inf, as float32 gives
            want = want * scale                               # one float32 multiply
    got = g.scaled(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    if scale is None:
        np.testing.assert_array_equal(g.exact(torch.from_numpy(x)).numpy(), acc)


@needs_lib
def test_large_m_goes_to_onednn_and_agrees():
    rng = np.random.default_rng(7)
    w = torch.from_numpy(rng.integers(-128, 128, (70, 130), dtype=np.int8))
    g, ref = OneDnnGemvIntGemm(w), OneDnnIntGemm(w)
    for m in (vg.GEMV_MAX_M, vg.GEMV_MAX_M + 1, 3 * vg.GEMV_MAX_M):
        x = torch.from_numpy(rng.integers(-128, 128, (m, 130), dtype=np.int8))
        assert torch.equal(g.scaled(x).view(torch.int32), ref.scaled(x).view(torch.int32))


@needs_lib
def test_layout_mismatch_falls_back_to_onednn(monkeypatch):
    """If oneDNN's buffer is not the verified layout, the GEMV never reads it."""
    real = vg._blocked
    monkeypatch.setattr(vg, "_blocked", lambda w, np_, kp: real(w, np_, kp)[::-1].copy())
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.integers(-128, 128, (64, 64), dtype=np.int8))
    g = OneDnnGemvIntGemm(w)
    assert g.gemv_unavailable and "not in the expected VNNI layout" in g.gemv_unavailable
    x = torch.from_numpy(rng.integers(-128, 128, (1, 64), dtype=np.int8))
    want = (x.to(torch.int64) @ w.to(torch.int64).T).to(torch.float32)
    assert torch.equal(g.scaled(x), want)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("ASCEND_QUANT_NATIVE", "0")
    vg.library.cache_clear()
    try:
        lib, why = vg.library()
        assert lib is None and "ASCEND_QUANT_NATIVE=0" in why
        c = choose_kernel("W8A8_DYNAMIC", backend="cpu", k=64)
        assert c.kernel != "onednn-gemv" and "ASCEND_QUANT_NATIVE=0" in c.rejected["onednn-gemv"]
    finally:
        monkeypatch.delenv("ASCEND_QUANT_NATIVE")
        vg.library.cache_clear()


@needs_lib
@given(n=_SIZES, k=_SIZES, m=st.one_of(st.integers(1, vg.GEMV_MAX_M), st.integers(vg.GEMV_MAX_M + 1, vg.GEMV_MAX_M + 24)),
       bits=st.sampled_from([8, 4]),
       dtype=st.sampled_from(["bfloat16", "float16", "float32"]), data=st.data())
def test_fused_pertoken_linear_matches_the_unfused_path(n, k, m, bits, dtype, data):
    """quantize + GEMV + ``* s_tok + bias`` in one native call (M <= GEMV_MAX_M), or native
    quantizer + oneDNN + native epilogue (larger M), equals the torch path (the quantizer
    itself is conformance-tested against the reference): bit for bit in float32, ``None``
    exactly when a row needs the general path (zero, non-finite, tiny maximum)."""
    x = data.draw(hh.activations(m, k, dtype, qmax=7 if bits == 4 else 127, allow_nonfinite=True), label="x")
    xt = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype))
    w = _operand(data.draw, (n, k), "w")
    if bits == 4:
        w = np.clip(w, -8, 7).astype(np.int8)
    rng = np.random.default_rng(n + 7 * k)
    scale = torch.from_numpy(rng.uniform(1e-3, 1.0, n).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if data.draw(st.booleans(), label="bias") else None
    g = OneDnnGemvIntGemm(torch.from_numpy(w), scale)
    got = g.pertoken(xt, 7 if bits == 4 else 127, bias)
    xq, s_tok = quantize_dynamic_per_token(xt, bits)
    general = not bool((torch.isfinite(s_tok) & (s_tok > 0)).all()) or not bool(
        torch.isfinite((7.0 if bits == 4 else 127.0) / xt.float().abs().amax(dim=1)).all())
    if general:
        assert got is None
        return
    assert got is not None
    want = (xq.to(torch.int64) @ torch.from_numpy(w).to(torch.int64).T).to(torch.float32) * scale
    want = want * s_tok.unsqueeze(1)
    if bias is not None:
        want = want + bias
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # rounded to the model dtype by the native epilogue where it does (larger M): torch's
    # .to(dtype) values; NaN positions equal (a NaN sends the rounding back to torch)
    got_dt = g.pertoken(xt, 7 if bits == 4 else 127, bias, out_dtype=xt.dtype).to(xt.dtype)
    want_dt = want.to(xt.dtype)
    assert torch.equal(torch.isnan(got_dt), torch.isnan(want_dt))
    ok = ~torch.isnan(want_dt)
    assert torch.equal(got_dt[ok], want_dt[ok])


@needs_lib
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_rounding_is_torchs_on_ties_and_overflow(dtype):
    """The native epilogue's float32 -> bf16/fp16 rounding on the values random draws rarely
    reach: exact ties (even and odd last kept bit, both signs), just above/below a tie, the
    largest finite values (rounding up to inf), infinities, subnormals, zeros; multiplied by
    s_tok = 1 and 2^-3 (exact), with and without a bias of zeros."""
    kept = 16 if dtype == torch.bfloat16 else 13            # float32 bits dropped
    rng = np.random.default_rng(5)
    base = rng.integers(0x00800000, 0x7F000000, 512, dtype=np.int64) & ~((1 << kept) - 1)
    half = 1 << (kept - 1)
    bits = np.concatenate([base + half, base + half - 1, base + half + 1, base + (1 << kept) + half,
                           [0x7F7FFFFF, 0x7F7F8000, 0x477FF000, 0x477FEFFF, 0x7F800000, 0x00000001, 0x00400000, 0]])
    bits = np.concatenate([bits, bits | 0x80000000]).astype(np.uint32)
    t = torch.from_numpy(bits.view(np.float32).copy()).reshape(16, 257)      # 257: a ragged last vector
    for s in (1.0, 0.125):
        s_tok = torch.full((t.shape[0],), s)
        for bias in (None, torch.zeros(257)):
            got = vg.rowscale_bias(LIB, t.clone(), s_tok, bias, dtype)
            want = t * s_tok.unsqueeze(1)
            want = (want if bias is None else want + bias).to(dtype)    # -0 + 0 = +0
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (dtype, s, bias is None)


@needs_lib
@pytest.mark.parametrize("algo", ["W8A8", "W8A8_MIX"])
@given(data=st.data())
def test_native_static_path_equals_the_torch_path(algo, data):
    """W8A8 (and W8A8_MIX as a kv consumer) natively -- ``npu_quantize`` codes, GEMV or
    oneDNN, ``dt(f32(f32(acc + qb) * deq))``, NaN rows for non-finite inputs -- gives the
    bytes of the torch path (quantize_static + IntGemm.scaled + the float32 epilogue), which
    test_linear checks against the reference. Layers from test_linear's strategy (static
    scales that saturate, quant_bias on and off, int64 and float32 deq_scale), batches with
    pathological rows, M on both sides of GEMV_MAX_M."""
    tensors, x, dtype, bias, opts = data.draw(linear_case(algo, max_m=3 * vg.GEMV_MAX_M), label="case")
    if algo == "W8A8_MIX":
        opts["kv_consumer"] = True
    p = prepare_linear(algo, tensors, dtype=dtype, bias=bias, backend="cpu", kernel="onednn-gemv", **opts)
    xt = torch.from_numpy(x.astype(np.float32)).to(p.dtype)
    if xt.shape[0] == 0:
        return
    # every layer this strategy draws qualifies (quant_bias within int32 - 2^24: exporter limits)
    assert p.state["native_static"], "the native static path was not prepared"
    native = p(xt)
    torch_path = _nan_nonfinite_rows(xt, _static_rows(p, xt))
    assert torch.equal(torch.isnan(native), torch.isnan(torch_path))
    ok = ~torch.isnan(torch_path)
    assert torch.equal(native[ok].view(torch.int16 if p.dtype != torch.float32 else torch.int32),
                       torch_path[ok].view(torch.int16 if p.dtype != torch.float32 else torch.int32))


@pytest.mark.skipif(LIB is None, reason=f"VNNI GEMV unavailable here: {WHY}")
def test_library_builds_from_source_into_an_empty_cache(tmp_path, monkeypatch):
    """A fresh machine compiles vnni_gemv.cpp (the shared cache may already hold it here)."""
    monkeypatch.setenv("ASCEND_QUANT_KERNEL_CACHE", str(tmp_path))
    vg.library.cache_clear()
    try:
        lib, why = vg.library()
        assert lib is not None, why
        built = list(tmp_path.glob("libaq_vnni_gemv-*.so"))
        assert len(built) == 1 and list(tmp_path.glob("*")) == built    # no temporary left behind
        w = torch.from_numpy(np.random.default_rng(1).integers(-128, 128, (64, 64), dtype=np.int8))
        g = OneDnnGemvIntGemm(w)
        x = torch.from_numpy(np.random.default_rng(2).integers(-128, 128, (2, 64), dtype=np.int8))
        assert torch.equal(g.scaled(x), (x.to(torch.int64) @ w.to(torch.int64).T).to(torch.float32))
    finally:
        monkeypatch.delenv("ASCEND_QUANT_KERNEL_CACHE")
        vg.library.cache_clear()
