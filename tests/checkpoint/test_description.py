"""checkpoint.description: loading/validating quant_model_description.json and per-layer lookup."""

from __future__ import annotations

import json

import pytest

from ascend_quant.checkpoint.description import (
    PACKED_MODULES_MODEL_MAPPING,
    QuantDescription,
    packed_modules_for,
)

L0 = "model.layers.0"
TOP = {"version": "1.0.0", "model_quant_type": "W8A8_DYNAMIC", "metadata": {}, "group_size": 0, "optional": {}}


def make(**entries) -> QuantDescription:
    return QuantDescription.from_dict({**TOP, **entries})


def test_top_level_and_entries_are_separated(tmp_path):
    d = {**TOP, f"{L0}.mlp.down_proj.weight": "W8A16", "kv_cache_type": "", "model.norm.weight": "FLOAT"}
    (tmp_path / "quant_model_description.json").write_text(json.dumps(d))
    desc = QuantDescription.load(tmp_path)  # a directory
    assert set(desc) == {f"{L0}.mlp.down_proj.weight", "model.norm.weight"}
    assert desc.version == "1.0.0" and desc.group_size == 0 and desc.model_quant_type == "W8A8_DYNAMIC"
    assert desc.top_level["kv_cache_type"] == ""
    assert desc.to_dict() == d
    assert QuantDescription.load(tmp_path / "quant_model_description.json").to_dict() == d  # the file itself


def test_missing_version_defaults_to_zero():
    desc = QuantDescription.from_dict({"x.weight": "FLOAT"})
    assert desc.version == "0" and desc.group_size == 0


@pytest.mark.parametrize("data,match", [
    ({**TOP, "a.weight": 8}, r"entry 'a.weight' must map a tensor name to an algorithm ID string, got int 8"),
    ({**TOP, "group_size": -1, "a.weight": "FLOAT"}, r"'group_size' must be a non-negative integer, got -1"),
    ({**TOP, "group_size": True, "a.weight": "FLOAT"}, r"'group_size' must be a non-negative integer"),
    ({**TOP, "version": 1, "a.weight": "FLOAT"}, r"'version' must be a string"),
    ({**TOP, "metadata": [], "a.weight": "FLOAT"}, r"'metadata' must be a JSON object"),
    (TOP, r"no per-tensor entries"),
    ([], r"expected a JSON object, got list"),
])
def test_invalid_descriptions_name_the_key(data, match):
    with pytest.raises(ValueError, match=match):
        QuantDescription.from_dict(data, source="desc.json")


def test_invalid_json_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no quant_model_description.json"):
        QuantDescription.load(tmp_path)
    (tmp_path / "quant_model_description.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"quant_model_description.json: invalid JSON"):
        QuantDescription.load(tmp_path)


def test_layer_algorithm_plain_and_fused():
    desc = make(**{f"{L0}.self_attn.{p}.weight": "W8A8" for p in ("q_proj", "k_proj", "v_proj")},
                **{f"{L0}.mlp.down_proj.weight": "FLOAT"})
    packed = packed_modules_for("llama")
    assert desc.layer_algorithm(f"{L0}.self_attn.qkv_proj", packed) == "W8A8"
    assert desc.layer_algorithm(f"{L0}.mlp.down_proj", packed) == "FLOAT"
    assert desc.is_float(f"{L0}.mlp.down_proj")
    assert desc.layer_algorithm(f"{L0}.mlp.gate_up_proj", packed) is None  # not described at all
    assert desc.shard_prefixes(f"{L0}.mlp.gate_up_proj", packed) == [f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj"]
    assert desc.shard_prefixes(f"{L0}.mlp.down_proj", packed) is None


def test_fused_shards_must_agree_and_be_complete():
    packed = packed_modules_for("qwen2")
    desc = make(**{f"{L0}.mlp.gate_proj.weight": "W8A8_DYNAMIC", f"{L0}.mlp.up_proj.weight": "FLOAT"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_up_proj.*gate_proj.weight=W8A8_DYNAMIC, "
                                         r"model.layers.0.mlp.up_proj.weight=FLOAT"):
        desc.layer_algorithm(f"{L0}.mlp.gate_up_proj", packed)
    desc = make(**{f"{L0}.mlp.gate_proj.weight": "W8A8_DYNAMIC"})
    with pytest.raises(ValueError, match=r"up_proj.weight=<missing>"):
        desc.layer_algorithm(f"{L0}.mlp.gate_up_proj", packed)


def test_experts_are_all_checked_and_the_odd_one_named():
    packed = packed_modules_for("qwen3_moe")
    entries = {f"{L0}.mlp.experts.{e}.{p}.weight": "W4A8_DYNAMIC" for e in range(6)
               for p in ("gate_proj", "up_proj", "down_proj")}
    desc = make(**entries)
    assert desc.expert_ids(f"{L0}.mlp.experts") == list(range(6))
    assert desc.layer_algorithm(f"{L0}.mlp.experts", packed) == "W4A8_DYNAMIC"
    # vLLM Ascend looks at expert 0 only; expert 5 differing must be caught and named
    desc = make(**{**entries, f"{L0}.mlp.experts.5.down_proj.weight": "W8A8_DYNAMIC"})
    with pytest.raises(ValueError, match=r"\(17 shards\) W4A8_DYNAMIC, .*experts.5.down_proj.weight=W8A8_DYNAMIC"):
        desc.layer_algorithm(f"{L0}.mlp.experts", packed)


def test_only_the_last_component_is_replaced():
    # vLLM Ascend's str.replace would also rewrite the earlier "qkv_proj" component
    desc = make(**{f"qkv_proj.{p}.weight": "W8A16" for p in ("q_proj", "k_proj", "v_proj")})
    assert desc.shard_prefixes("qkv_proj.qkv_proj", {"qkv_proj": ("q_proj", "k_proj", "v_proj")}) == [
        "qkv_proj.q_proj", "qkv_proj.k_proj", "qkv_proj.v_proj"]


def test_weight_packed_alias_and_module_tensors():
    desc = make(**{"m.weight_packed": "W4A16", "m.weight_scale": "W4A16", "m.weight_shape": "W4A16"})
    assert desc.layer_algorithm("m") == "W4A16"
    assert "m.weight" in desc and "m.weight" not in set(desc)
    assert desc.module_tensors("m") == {"weight_packed": "W4A16", "weight_scale": "W4A16", "weight_shape": "W4A16"}


def test_renamed():
    desc = make(**{"model.a.weight": "W8A16", "model.b.weight": "FLOAT"})
    r = desc.renamed(lambda k: None if k.startswith("model.b") else "language_model." + k)
    assert set(r) == {"language_model.model.a.weight"} and r.version == "1.0.0"


# facts doc §3.6 (vLLM Ascend v0.23 modelslim_config.py) plus the families the issue asks for
SECTION_3_6 = {
    "qwen3_moe": {"qkv_proj", "gate_up_proj", "experts"},
    "qwen3_5": {"qkv_proj", "gate_up_proj", "in_proj_qkvz", "in_proj_ba"},
    "qwen3_5_moe": {"qkv_proj", "gate_up_proj", "in_proj_qkvz", "in_proj_ba", "experts"},
    **{t: {"gate_up_proj", "experts", "fused_qkv_a_proj"} for t in (
        "deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa", "pangu_ultra_moe",
        "pangu_ultra_moe_mtp", "glm4_moe_lite", "longcat_flash")},
    "deepseek_v4": {"gate_up_proj", "experts"},
    "deepseek_mtp": {"gate_up_proj", "experts"},
    "qwen3_next": {"qkv_proj", "gate_up_proj", "in_proj", "experts"},
    "qwen2_5_vl": {"qkv_proj", "gate_up_proj"},
    **{t: {"qkv_proj", "gate_up_proj", "experts"} for t in (
        "qwen3_vl_moe", "glm4_moe", "glm4v_moe", "glm4v_moe_text", "step3p5", "step3p5_mtp")},
    "minimax_m2": {"qkv_proj", "experts"},
    "qwen3_omni_moe": {"qkv_proj", "attn_qkv_proj", "gate_up_proj", "experts"},
    "qwen2_5_omni": {"qkv_proj", "attn_qkv_proj", "qkv", "gate_up_proj"},
    "bailing_hybrid": {"gate_up_proj", "experts", "fused_qkv_a_proj", "o_proj"},
    "llama": {"qkv_proj", "gate_up_proj"},
    "qwen2": {"qkv_proj", "gate_up_proj"},
    "qwen3": {"qkv_proj", "gate_up_proj"},
}


@pytest.mark.parametrize("model_type", sorted(SECTION_3_6))
def test_packed_modules_model_mapping_covers_section_3_6(model_type):
    assert set(PACKED_MODULES_MODEL_MAPPING[model_type]) == SECTION_3_6[model_type]


def test_packed_modules_specific_shards():
    m = PACKED_MODULES_MODEL_MAPPING
    assert m["minimax_m2"]["experts"] == ("experts.0.w1", "experts.0.w2", "experts.0.w3")
    assert m["bailing_hybrid"]["o_proj"] == ("dense",)
    assert m["qwen3_next"]["in_proj"] == ("in_proj_qkvz", "in_proj_ba")
    assert m["deepseek_v3"]["fused_qkv_a_proj"] == ("q_a_proj", "kv_a_proj_with_mqa")
    # the model's own mapping is kept where the table has nothing
    assert packed_modules_for("unknown", {"wqkv": ["wq", "wk", "wv"]}) == {"wqkv": ("wq", "wk", "wv")}


def test_fused_float_experts_of_transformers_5():
    # msModelSlim on transformers 5 copies unquantized fused experts without ".weight"
    desc = make(**{f"{L0}.mlp.experts.gate_up_proj": "FLOAT", f"{L0}.mlp.experts.down_proj": "FLOAT"})
    assert desc.layer_algorithm(f"{L0}.mlp.experts", packed_modules_for("qwen3_moe")) == "FLOAT"
    desc = make(**{f"{L0}.mlp.experts.gate_up_proj": "FLOAT", f"{L0}.mlp.experts.down_proj": "W8A16"})
    with pytest.raises(ValueError, match=r"experts.gate_up_proj=FLOAT, .*experts.down_proj=W8A16"):
        desc.layer_algorithm(f"{L0}.mlp.experts", packed_modules_for("qwen3_moe"))
