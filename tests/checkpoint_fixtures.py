"""Tiny quantized checkpoints written with the reference quantizers (NumPy only), and helpers to
corrupt a copy of one. Shared by tests/checkpoint and tests/cli through tests/conftest.py.

``build_tiny_checkpoint(dir)`` writes a two-layer qwen2-moe-like model (hidden 64, 4 heads,
intermediate 64, 2 experts, vocab 32) that uses every linear algorithm ID:

===========================  ======================================================
layer 0 q/k/v (+ float bias) W8A8 (one shared calibration, int64 deq_scale)
layer 0 o_proj               W4A4_FLATQUANT_DYNAMIC, o_proj form (left_trans [4, 4] only)
layer 0 gate/up              W4A8_DYNAMIC two-step per-group (group_size 32)
layer 0 down                 W8A8_MIX
layer 1 q/k/v                W4A4_FLATQUANT_DYNAMIC (shared left/right_trans (8, 8))
layer 1 o_proj               W4A16 (group 32)
layer 1 mlp.gate (router)    W8A8_DYNAMIC (msModelSlim quantizes the router too)
layer 1 experts.{0,1}.*      W4A8_DYNAMIC (per-group 32)
layer 1 shared_expert.*      W4A4_DYNAMIC
lm_head                      W8A16 per-group 32
===========================  ======================================================
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ascend_quant.checkpoint.io import WEIGHTS_INDEX_FILE, read_safetensors, write_quantized_model
from ascend_quant.reference import weight_quant as wq

H, HEADS, INTER, VOCAB, EXPERTS, GROUP = 64, 4, 64, 32, 2, 32

CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": H,
    "intermediate_size": INTER, "moe_intermediate_size": INTER, "shared_expert_intermediate_size": INTER,
    "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "num_hidden_layers": 2, "num_experts": EXPERTS,
    "num_experts_per_tok": 1, "vocab_size": VOCAB, "torch_dtype": "float32",
}


def _orth(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def tiny_checkpoint_tensors(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, str] = {}

    def w(n, k):
        return (rng.standard_normal((n, k)) * 0.05).astype(np.float32)

    def put(prefix, algo, out, bias=None):
        for suffix, t in out.items():
            tensors[f"{prefix}.{suffix}"] = t
            entries[f"{prefix}.{suffix}"] = algo
        if bias is not None:
            tensors[f"{prefix}.bias"] = bias
            entries[f"{prefix}.bias"] = "FLOAT"

    def flt(name, t):
        tensors[name] = t
        entries[name] = "FLOAT"

    import ml_dtypes

    flt("model.embed_tokens.weight", rng.standard_normal((VOCAB, H)).astype(ml_dtypes.bfloat16))
    # layer 0
    p = "model.layers.0"
    flt(f"{p}.input_layernorm.weight", np.ones(H, np.float32))
    calib = rng.standard_normal((16, H)).astype(np.float32)
    s_in, o_in = wq.calibrate_input_scale_offset(calib)
    for proj in ("q_proj", "k_proj", "v_proj"):
        b = (rng.standard_normal(H) * 0.1).astype(np.float32)
        put(f"{p}.self_attn.{proj}", "W8A8", wq.quantize_w8a8_static(w(H, H), s_in, o_in, bias=b), bias=b)
    put(f"{p}.self_attn.o_proj", "W4A4_FLATQUANT_DYNAMIC",
        wq.quantize_w4a4_flatquant(w(H, H), _orth(rng, HEADS), None, 0.9))
    flt(f"{p}.post_attention_layernorm.weight", np.ones(H, np.float32))
    for proj in ("gate_proj", "up_proj"):
        put(f"{p}.mlp.{proj}", "W4A8_DYNAMIC", wq.quantize_w4a8_dynamic(w(INTER, H), group_size=GROUP))
    s2, o2 = wq.calibrate_input_scale_offset(rng.standard_normal((16, INTER)).astype(np.float32))
    put(f"{p}.mlp.down_proj", "W8A8_MIX", wq.quantize_w8a8_mix(w(H, INTER), s2, o2))
    # layer 1
    p = "model.layers.1"
    flt(f"{p}.input_layernorm.weight", np.ones(H, np.float32))
    left, right = _orth(rng, 8), _orth(rng, 8)
    for proj in ("q_proj", "k_proj", "v_proj"):
        put(f"{p}.self_attn.{proj}", "W4A4_FLATQUANT_DYNAMIC", wq.quantize_w4a4_flatquant(w(H, H), left, right, 1.0))
    put(f"{p}.self_attn.o_proj", "W4A16", wq.quantize_w4a16(w(H, H), group_size=GROUP))
    flt(f"{p}.post_attention_layernorm.weight", np.ones(H, np.float32))
    put(f"{p}.mlp.gate", "W8A8_DYNAMIC", wq.quantize_w8a8_dynamic(w(EXPERTS, H)))
    for e in range(EXPERTS):
        for proj, (n, k) in (("gate_proj", (INTER, H)), ("up_proj", (INTER, H)), ("down_proj", (H, INTER))):
            put(f"{p}.mlp.experts.{e}.{proj}", "W4A8_DYNAMIC", wq.quantize_w4a8_dynamic(w(n, k), group_size=GROUP))
    for proj, (n, k) in (("gate_proj", (INTER, H)), ("up_proj", (INTER, H)), ("down_proj", (H, INTER))):
        put(f"{p}.mlp.shared_expert.{proj}", "W4A4_DYNAMIC", wq.quantize_w4a4_dynamic(w(n, k)))
    flt(f"{p}.mlp.shared_expert_gate.weight", w(1, H))
    flt("model.norm.weight", np.ones(H, np.float32))
    put("lm_head", "W8A16", wq.quantize_w8a16(w(VOCAB, H), group_size=GROUP))
    return tensors, entries


def build_tiny_checkpoint(out_dir, *, max_shard_bytes: int = 40_000) -> str:
    """Write the tiny checkpoint (two or more shards + index) into ``out_dir``; returns it."""
    tensors, entries = tiny_checkpoint_tensors()
    write_quantized_model(out_dir, tensors, entries, model_quant_type="W8A8_DYNAMIC", group_size=GROUP,
                          max_shard_bytes=max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(CONFIG, f, indent=2)
    return os.fspath(out_dir)


# ---------------------------------------------------------------------------------------
# corruption helpers (they edit a copy, never the fixture)
# ---------------------------------------------------------------------------------------

def copy_checkpoint(src, dst) -> str:
    shutil.copytree(src, dst)
    return os.fspath(dst)


def load_json(model_dir, fn):
    with open(os.path.join(model_dir, fn), encoding="utf-8") as f:
        return json.load(f)


def save_json(model_dir, fn, data):
    with open(os.path.join(model_dir, fn), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def shard_of(model_dir, tensor: str) -> str:
    return load_json(model_dir, WEIGHTS_INDEX_FILE)["weight_map"][tensor]


def edit_shard(model_dir, shard: str, fn) -> None:
    """Rewrite one shard: ``fn(dict of writable arrays)`` edits it in place."""
    from safetensors.numpy import save_file

    path = os.path.join(model_dir, shard)
    arrays = {k: np.array(v) for k, v in read_safetensors(path).items()}
    fn(arrays)
    os.remove(path)
    save_file(arrays, path, metadata={"format": "pt"})


def set_tensor(model_dir, name: str, value: np.ndarray | None, *, new_name: str | None = None) -> None:
    """Replace (``value``), remove (``value is None``) or rename (``new_name``) one tensor in its
    shard, keeping the index in step (the description is left alone)."""
    shard = shard_of(model_dir, name)

    def edit(arrays):
        if value is None and new_name is None:
            del arrays[name]
        elif new_name is not None:
            arrays[new_name] = arrays.pop(name)
        else:
            arrays[name] = value

    edit_shard(model_dir, shard, edit)
    index = load_json(model_dir, WEIGHTS_INDEX_FILE)
    if value is None and new_name is None:
        del index["weight_map"][name]
    elif new_name is not None:
        index["weight_map"][new_name] = index["weight_map"].pop(name)
    save_json(model_dir, WEIGHTS_INDEX_FILE, index)


def get_tensor(model_dir, name: str) -> np.ndarray:
    return np.array(read_safetensors(os.path.join(model_dir, shard_of(model_dir, name)))[name])
