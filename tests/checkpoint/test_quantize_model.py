"""checkpoint.quantize_model: a float safetensors model -> msModelSlim layout with the reference
quantizers (the quantized tensors must be exactly the reference quantizers' output)."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ascend_quant.checkpoint.io import read_quantized_model
from ascend_quant.checkpoint.quantize_model import QuantRecipe, plan_layers, quantize_model
from ascend_quant.reference import weight_quant as wq

H, I, V, HEADS = 32, 64, 48, 4
L0 = "model.layers.0"


def _float_model(path, *, moe=False, fused_experts=False, dtype="float32"):
    rng = np.random.default_rng(1)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, H), "lm_head.weight": w(V, H), "model.norm.weight": np.ones(H, np.float32),
         f"{L0}.input_layernorm.weight": np.ones(H, np.float32)}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        t[f"{L0}.self_attn.{p}.weight"] = w(H, H)
    t[f"{L0}.self_attn.q_proj.bias"] = w(H)
    if moe:
        t[f"{L0}.mlp.gate.weight"] = w(2, H)
        if fused_experts:
            t[f"{L0}.mlp.experts.gate_up_proj"] = w(2, 2 * I, H)
            t[f"{L0}.mlp.experts.down_proj"] = w(2, H, I)
        else:
            for e in range(2):
                t[f"{L0}.mlp.experts.{e}.gate_proj.weight"] = w(I, H)
                t[f"{L0}.mlp.experts.{e}.up_proj.weight"] = w(I, H)
                t[f"{L0}.mlp.experts.{e}.down_proj.weight"] = w(H, I)
    else:
        t[f"{L0}.mlp.gate_proj.weight"] = w(I, H)
        t[f"{L0}.mlp.up_proj.weight"] = w(I, H)
        t[f"{L0}.mlp.down_proj.weight"] = w(H, I)
    if dtype == "bfloat16":
        t = {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}
    path.mkdir()
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe" if moe else "llama",
                                                  "num_attention_heads": HEADS, "torch_dtype": dtype}))
    (path / "tokenizer_config.json").write_text("{}")
    return t


def test_plan_layers_kinds_and_overrides(tmp_path):
    t = _float_model(tmp_path / "m", moe=True)
    plan = plan_layers(t, QuantRecipe("W8A8_DYNAMIC", overrides=((f"{L0}.self_attn.o_proj", "FLOAT"),)))
    assert plan[f"{L0}.self_attn.q_proj"] == ("linear", "W8A8_DYNAMIC")
    assert plan[f"{L0}.self_attn.o_proj"] == ("linear", "FLOAT")
    assert plan["lm_head"] == ("lm_head", "FLOAT") and plan[f"{L0}.mlp.gate"] == ("router", "FLOAT")
    assert plan[f"{L0}.mlp.experts.1.down_proj"] == ("moe", "W8A8_DYNAMIC")
    assert "model.embed_tokens" not in plan
    plan = plan_layers(t, QuantRecipe("W8A16", quantize_router=True, quantize_lm_head=True))
    assert plan[f"{L0}.mlp.gate"][1] == "W8A16" and plan["lm_head"][1] == "W8A16"
    assert plan[f"{L0}.mlp.experts.0.gate_proj"] == ("moe", "FLOAT")  # W8A16 is not a MoE algorithm
    with pytest.raises(ValueError, match=r"experts.0.gate_proj: unsupported algorithm ID 'W4A4_DYNAMIC' for moe"):
        plan_layers(t, QuantRecipe("W8A8_DYNAMIC", moe_algorithm="W4A4_DYNAMIC"))


def test_w8a8_dynamic_tensors_are_the_reference_quantizers(tmp_path):
    t = _float_model(tmp_path / "src")
    desc = quantize_model(tmp_path / "src", tmp_path / "out", "W8A8_DYNAMIC")
    ck = read_quantized_model(tmp_path / "out")
    prefix = f"{L0}.self_attn.q_proj"
    expected = wq.quantize_w8a8_dynamic(t[f"{prefix}.weight"])
    for suffix, a in expected.items():
        got = ck.tensors[f"{prefix}.{suffix}"]
        assert got.dtype == a.dtype and np.array_equal(got, a), suffix
        assert desc[f"{prefix}.{suffix}"] == "W8A8_DYNAMIC"
    assert desc[f"{prefix}.bias"] == "FLOAT" and np.array_equal(ck.tensors[f"{prefix}.bias"], t[f"{prefix}.bias"])
    assert desc["lm_head.weight"] == "FLOAT" and desc["model.norm.weight"] == "FLOAT"
    assert desc.model_quant_type == "W8A8_DYNAMIC" and desc.group_size == 0
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


def test_w8a8_static_needs_calibration_and_uses_it(tmp_path):
    t = _float_model(tmp_path / "src")
    with pytest.raises(ValueError,
                       match=r"model.layers.0.(mlp|self_attn).\w+: W8A8 static quantization needs calibration"):
        quantize_model(tmp_path / "src", tmp_path / "o1", "W8A8")
    rng = np.random.default_rng(2)
    acts = {f"{L0}.self_attn.{p}": rng.standard_normal((5, H)).astype(np.float32)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    acts.update({f"{L0}.mlp.{p}": rng.standard_normal((5, H)).astype(np.float32) for p in ("gate_proj", "up_proj")})
    acts[f"{L0}.mlp.down_proj"] = rng.standard_normal((5, I)).astype(np.float32)
    quantize_model(tmp_path / "src", tmp_path / "o2", "W8A8", activations=acts)
    ck = read_quantized_model(tmp_path / "o2")
    prefix = f"{L0}.self_attn.q_proj"
    s, o = wq.calibrate_input_scale_offset(acts[prefix])
    expected = wq.quantize_w8a8_static(t[f"{prefix}.weight"], s, o, bias=t[f"{prefix}.bias"], deq_scale_dtype="int64")
    for suffix, a in expected.items():
        assert np.array_equal(ck.tensors[f"{prefix}.{suffix}"], a), suffix
    assert ck.tensors[f"{prefix}.deq_scale"].dtype == np.int64  # float32 source model


def test_bf16_source_stores_float32_deq_scale(tmp_path):
    _float_model(tmp_path / "src", dtype="bfloat16")
    acts = {p: np.ones((2, I if p.endswith("down_proj") else H), np.float32) for p in [
        f"{L0}.self_attn.{q}" for q in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"{L0}.mlp.{q}" for q in ("gate_proj", "up_proj", "down_proj")]}
    quantize_model(tmp_path / "src", tmp_path / "out", "W8A8_MIX", activations=acts)
    ck = read_quantized_model(tmp_path / "out")
    assert ck.tensors[f"{L0}.mlp.down_proj.deq_scale"].dtype == np.float32
    assert ck.tensors["model.norm.weight"].dtype == ml_dtypes.bfloat16  # FLOAT tensors kept as stored


def test_flatquant_o_proj_has_only_left_trans_of_heads(tmp_path):
    _float_model(tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "out", "W4A4_FLATQUANT_DYNAMIC")
    ck = read_quantized_model(tmp_path / "out")
    o = ck.module_tensors(f"{L0}.self_attn.o_proj")
    assert o["left_trans"].shape == (HEADS, HEADS) and "right_trans" not in o
    q = ck.module_tensors(f"{L0}.self_attn.q_proj")
    assert q["left_trans"].shape == (4, 4) and q["right_trans"].shape == (8, 8)  # decompose_dim(32) = (4, 8)


def test_w4a16_group_size_and_weight_packed(tmp_path):
    _float_model(tmp_path / "src")
    desc = quantize_model(tmp_path / "src", tmp_path / "out", "W4A16")
    assert desc.group_size == 32  # W4A16's default, written as the top-level group_size
    assert desc[f"{L0}.mlp.down_proj.weight_packed"] == "W4A16"
    assert desc.layer_algorithm(f"{L0}.mlp.down_proj") == "W4A16"
    desc = quantize_model(tmp_path / "src", tmp_path / "o2", QuantRecipe("W8A16", group_size=16))
    assert desc.group_size == 16
    assert read_quantized_model(tmp_path / "o2").tensors[f"{L0}.mlp.down_proj.weight_scale"].shape == (H, I // 16)


@pytest.mark.parametrize("fused", [False, True])
def test_moe_experts_per_expert_with_row_parallel_scale_bias(tmp_path, fused):
    t = _float_model(tmp_path / "src", moe=True, fused_experts=fused)
    desc = quantize_model(tmp_path / "src", tmp_path / "out", "W4A8_DYNAMIC")
    ck = read_quantized_model(tmp_path / "out")
    assert desc.expert_ids(f"{L0}.mlp.experts") == [0, 1]
    gate = ck.module_tensors(f"{L0}.mlp.experts.1.gate_proj")
    down = ck.module_tensors(f"{L0}.mlp.experts.1.down_proj")
    assert gate["weight"].shape == (I // 2, H) and gate["scale_bias"].shape == (I, 1)
    assert down["weight"].shape == (H // 2, I) and down["scale_bias"].shape == (H, 16)
    src = t[f"{L0}.mlp.experts.gate_up_proj"][1, :I] if fused else t[f"{L0}.mlp.experts.1.gate_proj.weight"]
    assert np.array_equal(gate["weight"], wq.quantize_w4a8_dynamic(src)["weight"])
    assert desc[f"{L0}.mlp.gate.weight"] == "FLOAT"


def test_flatquant_factors_shared_by_fused_shards(tmp_path):
    _float_model(tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "shared", "W4A4_FLATQUANT_DYNAMIC")
    quantize_model(tmp_path / "src", tmp_path / "apart", QuantRecipe("W4A4_FLATQUANT_DYNAMIC", flatquant_shared=False))
    for name, same in (("shared", True), ("apart", False)):
        ck = read_quantized_model(tmp_path / name)
        q, k = (ck.module_tensors(f"{L0}.self_attn.{p}") for p in ("q_proj", "k_proj"))
        assert np.array_equal(q["left_trans"], k["left_trans"]) is same
        assert np.array_equal(q["right_trans"], k["right_trans"]) is same
    ck = read_quantized_model(tmp_path / "shared")
    g, u = (ck.module_tensors(f"{L0}.mlp.{p}") for p in ("gate_proj", "up_proj"))
    assert np.array_equal(g["left_trans"], u["left_trans"])
