"""The dispatcher: backend availability reasons, kernel forcing (argument and environment),
rejection reasons for every kernel that cannot run, and the prepared object's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ascend_quant.optimized import apply_linear, prepare_linear
from ascend_quant.optimized.dispatch import BACKENDS, KERNELS, available_backends, backend_status, choose_kernel
from ascend_quant.reference import weight_quant as wq


def _w8a8_dynamic(n=32, k=64):
    return wq.quantize_w8a8_dynamic(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32))


def test_every_backend_answers_with_a_reason():
    for name in BACKENDS:
        ok, why = backend_status(name)
        assert ok or (isinstance(why, str) and why), name
    assert "torch-portable" in available_backends()
    with pytest.raises(ValueError, match="unknown backend"):
        backend_status("tpu")


def test_unavailable_backend_raises_its_reason():
    for name in BACKENDS:
        ok, why = backend_status(name)
        if not ok:
            with pytest.raises(ValueError, match="not available"):
                prepare_linear("W8A8_DYNAMIC", _w8a8_dynamic(), dtype="bfloat16", backend=name)
    if not backend_status("npu")[0]:
        assert backend_status("npu")[1].startswith("torch_npu not importable") or "no NPU" in backend_status("npu")[1]
    if not backend_status("cuda")[0]:
        assert backend_status("cuda")[1] == "no CUDA device"


def test_forcing_by_argument_and_environment(monkeypatch):
    t = _w8a8_dynamic()
    p = prepare_linear("W8A8_DYNAMIC", t, dtype="bfloat16", backend="cpu", kernel="int-mm")
    assert p.kernel == "int-mm" and "onednn" in p.choice.rejected
    assert prepare_linear("W8A8_DYNAMIC", t, dtype="bfloat16", backend="cpu").kernel in ("onednn-gemv", "vllm-onednn", "onednn")
    monkeypatch.setenv("ASCEND_QUANT_KERNEL", "int-mm")
    assert prepare_linear("W8A8_DYNAMIC", t, dtype="bfloat16", backend="cpu").kernel == "int-mm"
    monkeypatch.setenv("ASCEND_QUANT_BACKEND", "torch-portable")
    monkeypatch.delenv("ASCEND_QUANT_KERNEL")
    assert prepare_linear("W8A8_DYNAMIC", t, dtype="bfloat16").backend == "torch-portable"
    with pytest.raises(ValueError, match="not a int kernel"):
        prepare_linear("W8A8_DYNAMIC", t, dtype="bfloat16", backend="cpu", kernel="dequant-f32")


def test_rejected_kernels_carry_reasons():
    c = choose_kernel("W8A8_DYNAMIC", backend="cpu", kernel="int-mm", k=64)
    assert set(c.rejected) == set(KERNELS[("cpu", "int")]) - {"int-mm"}
    c = choose_kernel("W8A8_DYNAMIC", backend="cpu", k=64)
    for name, why in c.rejected.items():
        assert why, name
    with pytest.raises(ValueError, match="vllm-int8-with-quant: it quantizes the activations itself"):
        choose_kernel("W8A8_DYNAMIC", backend="cpu", kernel="vllm-int8-with-quant", k=64)
    with pytest.raises(ValueError, match="int32 accumulator could overflow"):
        choose_kernel("W8A8_DYNAMIC", backend="cpu", kernel="onednn", k=2**17)


def test_int8pack_refuses_what_it_cannot_run():
    t = wq.quantize_w8a16(np.random.default_rng(1).standard_normal((16, 40)).astype(np.float32))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        prepare_linear("W8A16", t, dtype="bfloat16", backend="cpu", kernel="int8pack-mm")
    t = wq.quantize_w8a16(np.random.default_rng(1).standard_normal((16, 48)).astype(np.float32), symmetric=False)
    with pytest.raises(ValueError, match="symmetric weights only"):
        prepare_linear("W8A16", t, dtype="bfloat16", backend="cpu", kernel="int8pack-mm")


def test_prepared_object_contract():
    n, k = 48, 96
    t = _w8a8_dynamic(n, k)
    p = prepare_linear("W8A8_DYNAMIC", t, dtype="bfloat16", backend="cpu")
    # weights stay int8 (or prepacked int8): no float copy of the weight is held
    assert n * k <= p.resident_bytes() < 2 * n * k + 64 * n
    x = torch.randn(2, 3, k).to(torch.bfloat16)
    assert apply_linear(p, x).shape == (2, 3, n) and p(x).dtype == torch.bfloat16
    assert apply_linear(p, torch.zeros(0, k, dtype=torch.bfloat16)).shape == (0, n)
    with pytest.raises(ValueError, match="differs from the model dtype"):
        apply_linear(p, x.float())
    with pytest.raises(ValueError, match="does not match"):
        apply_linear(p, torch.zeros(1, k + 1, dtype=torch.bfloat16))
    w4 = wq.quantize_w4a16(np.random.default_rng(2).standard_normal((n, k)).astype(np.float32), group_size=32)
    p4 = prepare_linear("W4A16", w4, dtype="bfloat16", backend="cpu")
    assert p4.resident_bytes() < n * k * 2          # int8-carried int4 + scales, less than a bf16 copy


def test_bad_tensors_name_the_tensor():
    t = _w8a8_dynamic()
    t["weight_scale"] = t["weight_scale"][:, :0]
    with pytest.raises(ValueError, match="weight_scale"):
        prepare_linear("W8A8_DYNAMIC", t, dtype="bfloat16", backend="cpu")


def test_torch_and_numpy_checkpoint_tensors_agree():
    t = _w8a8_dynamic()
    tt = {k: torch.from_numpy(v) for k, v in t.items()}
    x = torch.randn(3, 64).to(torch.bfloat16)
    a = apply_linear(prepare_linear("W8A8_DYNAMIC", t, dtype="bfloat16", backend="cpu"), x)
    b = apply_linear(prepare_linear("W8A8_DYNAMIC", tt, dtype=torch.bfloat16, backend="cpu"), x)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("algo,kernel,kw", [
    ("W4A16", "int4pack-mm", {"group_size": 64}),
    ("W8A16", "int8pack-mm", {}),
    ("W8A16", "dequant-bf16", {"group_size": 64}),
])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_small_m_weight_only_kernels_run_and_meet_their_bound(algo, kernel, kw, m):
    """The forced-kernel property may draw layers a kernel refuses; these always run it."""
    from .checks import check_linear
    rng = np.random.default_rng(m)
    w = (rng.standard_normal((32, 256)) * 0.05).astype(np.float32)
    t = wq.quantize_w4a16(w, group_size=64) if algo == "W4A16" else wq.quantize_w8a16(w, group_size=kw.get("group_size", 0))
    x = (rng.standard_normal((m, 256))).astype(np.float32)
    import ml_dtypes
    xb = x.astype(ml_dtypes.bfloat16)
    p = prepare_linear(algo, t, dtype="bfloat16", backend="cpu", kernel=kernel, **kw)
    assert p.state["kernel_for_m"](m) == kernel
    check_linear("cpu", algo, t, xb, "bfloat16", rng.standard_normal(32).astype(ml_dtypes.bfloat16), kernel=kernel,
                 group_size=kw.get("group_size"))
