"""AscendQuantConfig, the algorithm map and register(), without building an engine.

Layers for ``get_quant_method`` are created with ``object.__new__`` (no TP group needed): the
dispatch only looks at the layer's class and prefix.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ascend_quant.reference.algorithms import LINEAR_ALGORITHMS, MOE_ALGORITHMS
from ascend_quant.vllm_integration import registry


def desc(**entries) -> dict:
    return {"version": "1.0.0", "model_quant_type": "W8A8_DYNAMIC", "metadata": {}, "group_size": 0,
            "optional": {}, **entries}


L0 = "model.layers.0"


def dense_desc(q="W8A8_DYNAMIC", k="W8A8_DYNAMIC", v="W8A8_DYNAMIC") -> dict:
    d = {}
    for proj, algo in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", "FLOAT")):
        d[f"{L0}.self_attn.{proj}.weight"] = algo
        if algo != "FLOAT":
            d[f"{L0}.self_attn.{proj}.weight_scale"] = algo
    d["lm_head.weight"] = "FLOAT"
    d["model.embed_tokens.weight"] = "FLOAT"
    return desc(**d)


def make_config(d: dict, model_type: str = "llama"):
    from ascend_quant.vllm_integration.config import AscendQuantConfig

    cfg = AscendQuantConfig.from_config(d)
    cfg.model_type = model_type
    return cfg


def bare(cls):
    return object.__new__(cls)


def test_register_is_idempotent_and_registers_ascend():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from ascend_quant.vllm_integration import register
    from ascend_quant.vllm_integration.config import AscendQuantConfig

    register()
    register()
    assert QUANTIZATION_METHODS.count("ascend") == 1
    assert get_quantization_config("ascend") is AscendQuantConfig


def test_algorithm_map_covers_every_id():
    import ascend_quant.vllm_integration.config  # noqa: F401  (imports the method modules)

    m = registry.registered_methods()
    assert {a for a, t in m if t == "linear"} == set(LINEAR_ALGORITHMS)
    assert {a for a, t in m if t == "moe"} == set(MOE_ALGORITHMS)
    assert len({cls for cls in m.values()}) == len(m)  # one class per (ID, layer type)


def test_algorithm_map_refuses_duplicates_and_lists_supported_ids():
    import ascend_quant.vllm_integration.config  # noqa: F401

    with pytest.raises(ValueError, match="already registered for algorithm 'W8A8_DYNAMIC'"):
        registry.register_method("W8A8_DYNAMIC", "linear")(type("Dup", (), {}))
    with pytest.raises(ValueError, match=r"'W8A8S' is not supported for linear layers; supported: .*W4A16.*W8A8_MIX"):
        registry.get_method_class("W8A8S", "linear")
    with pytest.raises(ValueError,
                       match="W4A4_DYNAMIC' is not supported for moe layers; supported: W4A16, W4A8_DYNAMIC"):
        registry.get_method_class("W4A4_DYNAMIC", "moe")
    with pytest.raises(ValueError, match="unknown layer type 'attention'"):
        registry.register_method("W8A8", "attention")


def test_config_basics():
    from ascend_quant.vllm_integration.config import AscendQuantConfig

    cfg = make_config(dense_desc())
    assert cfg.get_name() == "ascend"
    # no file for vLLM to parse itself: maybe_update_config reads and validates the directory
    assert AscendQuantConfig.get_config_filenames() == []
    assert torch.float32 in cfg.get_supported_act_dtypes() and torch.bfloat16 in cfg.get_supported_act_dtypes()
    assert AscendQuantConfig.get_min_capability() == 0


@pytest.mark.parametrize("hf_quant_cfg,expected", [
    ({"quant_method": "ascend"}, "ascend"),
    ({"quant_method": "gptq", "bits": 4}, None),
    ({"bits": 8}, None),  # vLLM Ascend would claim this one on an NPU; we never claim foreign configs
    ({"quant_method": "compressed-tensors"}, None),
])
def test_override_claims_only_our_marker(hf_quant_cfg, expected):
    from ascend_quant.vllm_integration.config import AscendQuantConfig

    assert AscendQuantConfig.override_quantization_method(hf_quant_cfg, None) == expected


def test_marker_config_reads_the_description_from_the_model_dir(tmp_path):
    from ascend_quant.checkpoint.io import write_quantized_model
    from ascend_quant.reference import weight_quant as wq
    from ascend_quant.vllm_integration.config import AscendQuantConfig

    cfg = AscendQuantConfig.from_config({"quant_method": "ascend"})
    with pytest.raises(ValueError, match="no quant_model_description.json loaded"):
        cfg.description
    w = (np.random.default_rng(0).standard_normal((8, 16)) * 0.05).astype(np.float32)
    tensors = {f"{L0}.self_attn.q_proj.{k}": v for k, v in wq.quantize_w8a8_dynamic(w).items()}
    write_quantized_model(tmp_path, tensors, dict.fromkeys(tensors, "W8A8_DYNAMIC"), model_quant_type="W8A8_DYNAMIC")
    cfg.maybe_update_config(str(tmp_path))
    assert cfg.description.layer_algorithm(f"{L0}.self_attn.q_proj") == "W8A8_DYNAMIC"
    assert cfg.description.source == str(tmp_path / "quant_model_description.json")


def test_model_dir_without_description_file_fails_clearly(tmp_path):
    from ascend_quant.checkpoint.errors import CheckpointError
    from ascend_quant.vllm_integration.config import AscendQuantConfig

    for cfg in (AscendQuantConfig.from_config({"quant_method": "ascend"}), AscendQuantConfig()):
        with pytest.raises(CheckpointError, match=f"{tmp_path}: quant_model_description.json: missing"):
            cfg.maybe_update_config(str(tmp_path))


def test_kv_cache_quantization_is_refused(tmp_path):
    (tmp_path / "quant_model_description.json").write_text(json.dumps({**dense_desc(), "kv_cache_type": "C8"}))
    from ascend_quant.vllm_integration.config import AscendQuantConfig

    cfg = AscendQuantConfig.from_config(json.loads((tmp_path / "quant_model_description.json").read_text()))
    with pytest.raises(NotImplementedError, match="kv_cache_type='C8'"):
        cfg.maybe_update_config(str(tmp_path))


def test_get_quant_method_fused_qkv_and_float_layers():
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear, UnquantizedLinearMethod

    from ascend_quant.vllm_integration.linear_method import AscendW8A8DynamicLinearMethod

    cfg = make_config(dense_desc())
    m = cfg.get_quant_method(bare(QKVParallelLinear), f"{L0}.self_attn.qkv_proj")
    assert type(m) is AscendW8A8DynamicLinearMethod
    assert m.shard_prefixes == [f"{L0}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert isinstance(cfg.get_quant_method(bare(RowParallelLinear), f"{L0}.self_attn.o_proj"),
                      UnquantizedLinearMethod)


def test_get_quant_method_names_disagreeing_shards():
    from vllm.model_executor.layers.linear import QKVParallelLinear

    cfg = make_config(dense_desc(k="W8A16"))
    with pytest.raises(ValueError,
                       match=r"q_proj.weight=W8A8_DYNAMIC, .*k_proj.weight=W8A16, .*v_proj.weight=W8A8_DYNAMIC"):
        cfg.get_quant_method(bare(QKVParallelLinear), f"{L0}.self_attn.qkv_proj")


def test_get_quant_method_missing_entry_and_unknown_id():
    from vllm.model_executor.layers.linear import RowParallelLinear

    cfg = make_config(dense_desc())
    with pytest.raises(ValueError, match="no 'model.layers.0.mlp.down_proj.weight' entry"):
        cfg.get_quant_method(bare(RowParallelLinear), f"{L0}.mlp.down_proj")
    cfg = make_config({**dense_desc(), f"{L0}.mlp.down_proj.weight": "W8A8SC"})
    with pytest.raises(ValueError, match="'W8A8SC' is not supported for linear layers; supported:"):
        cfg.get_quant_method(bare(RowParallelLinear), f"{L0}.mlp.down_proj")


def test_get_quant_method_moe_lm_head_and_embedding():
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    from ascend_quant.vllm_integration.linear_method import AscendEmbeddingMethod, AscendW8A16LinearMethod
    from ascend_quant.vllm_integration.moe_method import AscendW4A8DynamicFusedMoEMethod

    experts = {f"{L0}.mlp.experts.{e}.{p}.weight": "W4A8_DYNAMIC" for e in range(2)
               for p in ("gate_proj", "up_proj", "down_proj")}
    d = {**dense_desc(), **experts, "lm_head.weight": "W8A16"}
    cfg = make_config(d, "qwen3_moe")
    layer = bare(RoutedExperts)
    layer.moe_config = None
    assert type(cfg.get_quant_method(layer, f"{L0}.mlp.experts")) is AscendW4A8DynamicFusedMoEMethod
    lm = cfg.get_quant_method(bare(ParallelLMHead), "lm_head")
    assert isinstance(lm, AscendEmbeddingMethod) and type(lm.linear_method) is AscendW8A16LinearMethod
    assert isinstance(cfg.get_quant_method(bare(VocabParallelEmbedding), "model.embed_tokens"),
                      UnquantizedEmbeddingMethod)
    bad = make_config({**d, "model.embed_tokens.weight": "W8A16"}, "qwen3_moe")
    with pytest.raises(ValueError, match="quantized embedding lookups are not supported"):
        bad.get_quant_method(bare(VocabParallelEmbedding), "model.embed_tokens")
    # one expert on another algorithm: named
    mixed = make_config({**d, f"{L0}.mlp.experts.1.up_proj.weight": "W8A8_DYNAMIC"}, "qwen3_moe")
    with pytest.raises(ValueError, match=r"experts.1.up_proj.weight=W8A8_DYNAMIC"):
        mixed.get_quant_method(layer, f"{L0}.mlp.experts")


def test_apply_vllm_mapper_renames_description_keys():
    from vllm.model_executor.models.utils import WeightsMapper

    cfg = make_config(dense_desc())
    cfg.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."}))
    assert cfg.description.layer_algorithm(f"language_model.{L0}.self_attn.q_proj") == "W8A8_DYNAMIC"


def test_serve_argv_adds_quantization_for_msmodelslim_dirs(tmp_path):
    from ascend_quant.vllm_integration.serve import vllm_serve_argv

    assert vllm_serve_argv(str(tmp_path), ["--port", "8000"]) == ["vllm", "serve", str(tmp_path), "--port", "8000"]
    (tmp_path / "quant_model_description.json").write_text("{}")
    assert vllm_serve_argv(str(tmp_path), []) == ["vllm", "serve", str(tmp_path), "--quantization", "ascend"]
    assert vllm_serve_argv(str(tmp_path), ["--quantization=fp8"])[-1] == "--quantization=fp8"
