"""checkpoint.validate: a valid tiny checkpoint passes; each corruption is rejected with a message
naming the file/tensor/key at fault, what was expected and what was found."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from ascend_quant.checkpoint.errors import CheckpointError
from ascend_quant.checkpoint.io import WEIGHTS_INDEX_FILE, write_quantized_model
from ascend_quant.checkpoint.validate import check_tensors, validate_checkpoint
from ascend_quant.reference import LINEAR_ALGORITHMS
from ascend_quant.reference import weight_quant as wq

DESC = "quant_model_description.json"
L0 = "model.layers.0"
L1 = "model.layers.1"


def _hashes(d):
    return {fn: hashlib.sha256(open(os.path.join(d, fn), "rb").read()).hexdigest() for fn in sorted(os.listdir(d))}


def _messages(model_dir) -> list[str]:
    report = validate_checkpoint(model_dir)
    assert not report.ok, "the corruption was not detected"
    return [str(e) for e in report.errors]


def _one_matching(messages, *fragments) -> str:
    hits = [m for m in messages if all(f in m for f in fragments)]
    assert hits, f"no message contains {fragments}; got:\n" + "\n".join(messages)
    return hits[0]


# ---------------------------------------------------------------------------------------
# valid checkpoints
# ---------------------------------------------------------------------------------------

def test_tiny_checkpoint_is_valid_and_reports_every_algorithm(tiny_checkpoint):
    before = _hashes(tiny_checkpoint)
    report = validate_checkpoint(tiny_checkpoint, raise_errors=True)
    assert report.ok and report.errors == []
    assert _hashes(tiny_checkpoint) == before  # validation never writes
    algos = report.by_algorithm()
    assert set(algos) == {"FLOAT", *LINEAR_ALGORITHMS}
    m = report.modules[f"{L0}.self_attn.q_proj"]
    # int8 [64, 64] + quant_bias int32 [64] + deq_scale int64 [64] + input_scale/offset f32 [1]
    # + float32 bias [64]; bf16 baseline: weight 64*64*2 + bias 64*2
    assert (m.algorithm, m.n, m.k) == ("W8A8", 64, 64)
    assert m.bytes == 64 * 64 + 64 * 4 + 64 * 8 + 4 + 4 + 64 * 4
    assert m.bf16_bytes == 64 * 64 * 2 + 64 * 2
    assert report.modules[f"{L1}.mlp.experts.1.down_proj"].expert_of == f"{L1}.mlp.experts"
    w4a16 = report.modules[f"{L1}.self_attn.o_proj"]
    assert (w4a16.n, w4a16.k) == (64, 64)
    assert report.total_bytes < report.total_bf16_bytes


def test_header_only_mode_skips_values_but_not_shapes(broken, ckpt):
    name = f"{L0}.mlp.down_proj.weight_scale"
    ckpt.set_tensor(broken, name, np.full((64, 1), np.nan, np.float32))
    assert validate_checkpoint(broken, check_values=False).ok
    assert not validate_checkpoint(broken).ok
    ckpt.set_tensor(broken, name, np.ones((64, 2), np.float32))
    msg = _one_matching(_messages(broken), name, "expected shape")
    assert "(64, 2)" in msg


def test_check_tensors_on_a_dict(ckpt):
    tensors, entries = ckpt.tiny_checkpoint_tensors()
    desc = {"version": "1.0.0", "group_size": 32, **entries}
    assert check_tensors(desc, tensors, where="mem", config=ckpt.CONFIG).ok
    tensors[f"{L1}.mlp.gate.weight_scale"] = np.zeros((2, 1), np.float32)
    with pytest.raises(CheckpointError) as ei:
        check_tensors(desc, tensors, where="mem", config=ckpt.CONFIG)
    assert str(ei.value).startswith(f"mem: {L1}.mlp.gate.weight_scale: scales must be finite and > 0, found 0.0")


def _real_layouts(tmp_path, case):
    """Tiny checkpoints in the layouts of real msModelSlim 26.1 output (msmodelslim-real-output.md)."""
    rng = np.random.default_rng(3)
    w = lambda n, k: (rng.standard_normal((n, k)) * 0.05).astype(np.float32)  # noqa: E731
    tensors, entries, group = {}, {}, 0

    def put(prefix, algo, out, bias=None):
        for s, t in out.items():
            tensors[f"{prefix}.{s}"], entries[f"{prefix}.{s}"] = t, algo
        if bias is not None:
            tensors[f"{prefix}.bias"], entries[f"{prefix}.bias"] = bias, "FLOAT"

    a = "model.layers.0.self_attn"
    m = "model.layers.0.mlp"
    if case == "w8a8_int64_deq_float_offset_with_bias":
        s, o = wq.calibrate_input_scale_offset(rng.standard_normal((8, 64)).astype(np.float32))
        for p in ("q_proj", "k_proj", "v_proj"):
            b = rng.standard_normal(64).astype(np.float32)
            put(f"{a}.{p}", "W8A8", wq.quantize_w8a8_static(w(64, 64), s, o, bias=b), bias=b)
        assert tensors[f"{a}.q_proj.deq_scale"].dtype == np.int64
        assert tensors[f"{a}.q_proj.input_offset"].dtype == np.float32
    elif case == "w4a8_per_channel_packed_scale_bias":
        for p in ("gate_proj", "up_proj"):
            put(f"{m}.{p}", "W4A8_DYNAMIC", wq.quantize_w4a8_dynamic(w(128, 64)))
        put(f"{m}.down_proj", "W4A8_DYNAMIC", wq.quantize_w4a8_dynamic(w(64, 128), row_parallel=True))
        assert tensors[f"{m}.gate_proj.weight"].shape == (64, 64)
        assert tensors[f"{m}.down_proj.scale_bias"].shape == (64, 16)
    elif case == "flatquant_o_proj_left_only":
        put(f"{a}.o_proj", "W4A4_FLATQUANT_DYNAMIC",
            wq.quantize_w4a4_flatquant(w(64, 64), np.eye(4, dtype=np.float32), None, 1.0))
    elif case == "w8a16_per_group":
        group = 32
        put(f"{m}.down_proj", "W8A16", wq.quantize_w8a16(w(64, 128), symmetric=False, group_size=32))
    elif case == "moe_router_quantized":
        put(f"{m}.gate", "W8A8_DYNAMIC", wq.quantize_w8a8_dynamic(w(4, 64)))
        for e in range(4):
            put(f"{m}.experts.{e}.gate_proj", "W8A8_DYNAMIC", wq.quantize_w8a8_dynamic(w(32, 64)))
    d = tmp_path / case
    write_quantized_model(d, tensors, entries, model_quant_type="W8A8_DYNAMIC", group_size=group)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "torch_dtype": "float32"}))
    return d


@pytest.mark.parametrize("case", ["w8a8_int64_deq_float_offset_with_bias", "w4a8_per_channel_packed_scale_bias",
                                  "flatquant_o_proj_left_only", "w8a16_per_group", "moe_router_quantized"])
def test_real_msmodelslim_layouts_are_accepted(tmp_path, case):
    report = validate_checkpoint(_real_layouts(tmp_path, case))
    assert report.errors == []


# ---------------------------------------------------------------------------------------
# corruptions: each is rejected with a message naming what is at fault
# ---------------------------------------------------------------------------------------

def test_missing_description(broken):
    os.remove(os.path.join(broken, DESC))
    _one_matching(_messages(broken), broken, f"{DESC}: missing")


def test_invalid_json_names_the_file(broken):
    with open(os.path.join(broken, DESC), "w") as f:
        f.write('{"version": "1.0.0", ')
    _one_matching(_messages(broken), f"{broken}: {DESC}: invalid JSON (the quantization description)", "line 1")


def test_invalid_index_json_names_the_file(broken):
    with open(os.path.join(broken, WEIGHTS_INDEX_FILE), "w") as f:
        f.write("{not json")
    _one_matching(_messages(broken), f"{WEIGHTS_INDEX_FILE}: invalid JSON")


def test_unknown_algorithm_id_lists_supported(broken, ckpt):
    desc = ckpt.load_json(broken, DESC)
    desc[f"{L0}.mlp.down_proj.weight"] = "W8A8_MIXX"
    ckpt.save_json(broken, DESC, desc)
    msg = _one_matching(_messages(broken), f"{L0}.mlp.down_proj.weight: unknown algorithm ID 'W8A8_MIXX'")
    assert "did you mean 'W8A8_MIX'" in msg and "supported: FLOAT, W4A16, W8A16, W8A8" in msg


def test_known_but_unimplemented_algorithm_id(broken, ckpt):
    desc = ckpt.load_json(broken, DESC)
    desc[f"{L0}.mlp.down_proj.weight"] = "W8A8_MXFP8"
    ckpt.save_json(broken, DESC, desc)
    _one_matching(_messages(broken), f"{L0}.mlp.down_proj.weight", "'W8A8_MXFP8'", "not implemented")


def test_missing_tensor(broken, ckpt):
    ckpt.set_tensor(broken, f"{L1}.mlp.gate.weight_scale", None)
    msgs = _messages(broken)
    _one_matching(msgs, f"{L1}.mlp.gate.weight_scale: listed in {DESC} as 'W8A8_DYNAMIC' but no shard holds")


def test_missing_tensor_and_entry(broken, ckpt):
    ckpt.set_tensor(broken, f"{L1}.mlp.gate.weight_scale", None)
    desc = ckpt.load_json(broken, DESC)
    del desc[f"{L1}.mlp.gate.weight_scale"]
    ckpt.save_json(broken, DESC, desc)
    _one_matching(_messages(broken), f"{L1}.mlp.gate.weight_scale: missing: W8A8_DYNAMIC needs float32, shape (N, 1)")


def test_misnamed_tensor(broken, ckpt):
    old, new = f"{L0}.mlp.down_proj.deq_scale", f"{L0}.mlp.down_proj.deq_scales"
    ckpt.set_tensor(broken, old, None, new_name=new)
    desc = ckpt.load_json(broken, DESC)
    desc[new] = desc.pop(old)
    ckpt.save_json(broken, DESC, desc)
    msgs = _messages(broken)
    _one_matching(msgs, f"{new}: not a tensor of W8A8_MIX (misnamed 'deq_scale'?)")
    _one_matching(msgs, f"{old}: missing: W8A8_MIX needs int64 or float32, shape (N,)")


def test_extra_tensor_in_shards_not_in_description(broken, ckpt):
    name = f"{L0}.self_attn.q_proj.smooth_scale"
    shard = ckpt.shard_of(broken, f"{L0}.self_attn.q_proj.weight")
    ckpt.edit_shard(broken, shard, lambda a: a.__setitem__(name, np.ones(64, np.float32)))
    index = ckpt.load_json(broken, WEIGHTS_INDEX_FILE)
    index["weight_map"][name] = shard
    ckpt.save_json(broken, WEIGHTS_INDEX_FILE, index)
    msgs = _messages(broken)
    _one_matching(msgs, f"{name}: tensor in the shards has no entry in {DESC}")


def test_extra_tensor_of_a_quantized_module(broken, ckpt):
    name = f"{L0}.self_attn.q_proj.weight_scale_second"
    shard = ckpt.shard_of(broken, f"{L0}.self_attn.q_proj.weight")
    ckpt.edit_shard(broken, shard, lambda a: a.__setitem__(name, np.ones((64, 2), np.float32)))
    index = ckpt.load_json(broken, WEIGHTS_INDEX_FILE)
    index["weight_map"][name] = shard
    ckpt.save_json(broken, WEIGHTS_INDEX_FILE, index)
    desc = ckpt.load_json(broken, DESC)
    desc[name] = "W8A8"
    ckpt.save_json(broken, DESC, desc)
    _one_matching(_messages(broken), f"{name}: not a tensor of W8A8", "modules hold weight, input_scale")


def test_description_entry_without_tensor(broken, ckpt):
    desc = ckpt.load_json(broken, DESC)
    desc["model.layers.2.self_attn.q_proj.weight"] = "W8A8_DYNAMIC"
    ckpt.save_json(broken, DESC, desc)
    _one_matching(_messages(broken), "model.layers.2.self_attn.q_proj.weight: listed in", "no shard holds this tensor")


def test_wrong_dtype(broken, ckpt):
    name = f"{L1}.mlp.gate.weight_scale"
    ckpt.set_tensor(broken, name, ckpt.get_tensor(broken, name).astype(np.float16))
    _one_matching(_messages(broken), f"{name}: expected dtype float32, got float16")


def test_wrong_shape(broken, ckpt):
    name = f"{L0}.mlp.down_proj.quant_bias"
    ckpt.set_tensor(broken, name, ckpt.get_tensor(broken, name)[:-1].copy())
    _one_matching(_messages(broken), f"{name}: expected shape (N,) = (64,), got (63,)")


def test_deq_scale_size_inconsistent(broken, ckpt):
    name = f"{L0}.self_attn.k_proj.deq_scale"
    ckpt.set_tensor(broken, name, np.concatenate([ckpt.get_tensor(broken, name)] * 2))
    _one_matching(_messages(broken), f"{name}: expected shape (N,) = (64,), got (128,)")


def test_fused_shards_with_different_algorithms(broken, ckpt):
    desc = ckpt.load_json(broken, DESC)
    for key in list(desc):
        if key.startswith(f"{L1}.mlp.experts.1.up_proj."):
            desc[key] = "W8A8_MIX"
    ckpt.save_json(broken, DESC, desc)
    msg = _one_matching(_messages(broken), f"{L1}.mlp.experts: fused shards must share one algorithm ID")
    assert f"W8A8_MIX: {L1}.mlp.experts.1.up_proj" in msg and "W4A8_DYNAMIC:" in msg


def test_qkv_shards_with_different_algorithms(broken, ckpt):
    desc = ckpt.load_json(broken, DESC)
    desc[f"{L0}.self_attn.v_proj.weight"] = "W8A8_MIX"
    ckpt.save_json(broken, DESC, desc)
    msgs = _messages(broken)
    _one_matching(msgs, f"{L0}.self_attn.qkv_proj: fused shards must share one algorithm ID",
                  f"W8A8: {L0}.self_attn.q_proj, {L0}.self_attn.k_proj; W8A8_MIX: {L0}.self_attn.v_proj")
    _one_matching(msgs, f"{L0}.self_attn.v_proj.weight_scale: missing: W8A8_MIX needs")


def test_fused_shards_with_different_static_input_scale(broken, ckpt):
    name = f"{L0}.self_attn.k_proj.input_scale"
    ckpt.set_tensor(broken, name, ckpt.get_tensor(broken, name) * np.float32(2))
    _one_matching(_messages(broken), f"{name}: differs from {L0}.self_attn.q_proj.input_scale",
                  "fused model.layers.0.self_attn.qkv_proj share one input_scale")


def test_fused_flatquant_shards_with_different_transforms(broken, ckpt):
    name = f"{L1}.self_attn.v_proj.right_trans"
    ckpt.set_tensor(broken, name, np.eye(8, dtype=np.float32))
    _one_matching(_messages(broken), f"{name}: differs from {L1}.self_attn.q_proj.right_trans")


def test_group_size_not_dividing_k(broken, ckpt):
    desc = ckpt.load_json(broken, DESC)
    desc["group_size"] = 48
    ckpt.save_json(broken, DESC, desc)
    msgs = _messages(broken)
    _one_matching(msgs, f"{L0}.mlp.gate_proj.weight_scale_second: two-step per-group W4A8 needs the description's "
                        "group_size to divide K = 64, found group_size 48")


def test_group_size_zero_with_per_group_scales(broken, ckpt):
    desc = ckpt.load_json(broken, DESC)
    desc["group_size"] = 0
    ckpt.save_json(broken, DESC, desc)
    _one_matching(_messages(broken), "lm_head.weight_scale: 2 groups along K = 64 but the description's group_size is 0")


def test_flatquant_factor_not_square(broken, ckpt):
    name = f"{L0}.self_attn.o_proj.left_trans"
    ckpt.set_tensor(broken, name, np.ones((4, 8), np.float32))
    _one_matching(_messages(broken), f"{name}: expected shape (L, L)", "got (4, 8)")


def test_flatquant_factor_product_not_k(broken, ckpt):
    for proj in ("q_proj", "k_proj", "v_proj"):
        ckpt.set_tensor(broken, f"{L1}.self_attn.{proj}.right_trans", np.eye(4, dtype=np.float32))
    _one_matching(_messages(broken), f"{L1}.self_attn.q_proj.right_trans",
                  "left_trans (8, 8) x right_trans (4, 4) gives 32, expected K=64")


def test_flatquant_o_proj_left_not_dividing_k(broken, ckpt):
    name = f"{L0}.self_attn.o_proj.left_trans"
    ckpt.set_tensor(broken, name, np.eye(5, dtype=np.float32))
    _one_matching(_messages(broken), f"{name}: left_trans size 5 does not divide K=64")


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0])
def test_bad_scale_values(broken, ckpt, bad):
    name = f"{L1}.mlp.shared_expert.up_proj.weight_scale"
    s = ckpt.get_tensor(broken, name)
    s[3, 0] = bad
    ckpt.set_tensor(broken, name, s)
    _one_matching(_messages(broken), f"{name}: scales must be finite and > 0, found {float(bad)!r} at index (3, 0)")


def test_bad_int64_deq_scale(broken, ckpt):
    name = f"{L0}.self_attn.q_proj.deq_scale"
    d = ckpt.get_tensor(broken, name)
    d[5] = np.array([-1.0], np.float32).view(np.int32).astype(np.int64)[0]
    ckpt.set_tensor(broken, name, d)
    _one_matching(_messages(broken), f"{name}: scales must be finite and > 0, found -1.0 at index (5,)")


def test_int4_out_of_range_in_unpacked_storage(broken, ckpt):
    name = f"{L1}.mlp.shared_expert.down_proj.weight"
    q = ckpt.get_tensor(broken, name)
    q[0, 0] = 9
    ckpt.set_tensor(broken, name, q)
    _one_matching(_messages(broken), f"{name}: W4A4_DYNAMIC weights are int4 values in [-8, 7]", "found range [", ", 9]")


def test_non_integral_input_offset(broken, ckpt):
    name = f"{L0}.mlp.down_proj.input_offset"
    ckpt.set_tensor(broken, name, np.array([0.5], np.float32))
    _one_matching(_messages(broken), f"{name}: expected an integer in [-128, 127] (int8 zero point), found [0.5]")


def test_float_module_stored_as_int8(broken, ckpt):
    name = "model.layers.1.mlp.shared_expert_gate.weight"
    ckpt.set_tensor(broken, name, np.zeros((1, 64), np.int8))
    _one_matching(_messages(broken), f"{name}: described FLOAT but stored as int8")


def test_bias_with_wrong_shape(broken, ckpt):
    name = f"{L0}.self_attn.q_proj.bias"
    ckpt.set_tensor(broken, name, np.zeros(32, np.float32))
    _one_matching(_messages(broken), f"{name}: expected shape (N,) = (64,), found (32,)")


def test_index_points_at_missing_shard(broken, ckpt):
    index = ckpt.load_json(broken, WEIGHTS_INDEX_FILE)
    index["weight_map"]["lm_head.weight"] = "quant_model_weights-00009-of-00009.safetensors"
    ckpt.save_json(broken, WEIGHTS_INDEX_FILE, index)
    msgs = _messages(broken)
    _one_matching(msgs, f"{WEIGHTS_INDEX_FILE}: points at shard 'quant_model_weights-00009-of-00009.safetensors', "
                        "which is missing from the directory (1 tensor(s), e.g. 'lm_head.weight')")
    _one_matching(msgs, "lm_head.weight: stored in shard", "maps it to 'quant_model_weights-00009-of-00009")


def test_shard_file_deleted(broken, ckpt):
    shard = ckpt.shard_of(broken, "lm_head.weight")
    os.remove(os.path.join(broken, shard))
    msgs = _messages(broken)
    # reported once, for the shard: its tensors are not reported again one by one
    assert msgs == [f"{broken}: {WEIGHTS_INDEX_FILE}: points at shard '{shard}', which is missing from the "
                    f"directory (18 tensor(s), e.g. 'lm_head.weight')"]


def test_truncated_shard(broken, ckpt):
    shard = ckpt.shard_of(broken, "lm_head.weight")
    path = os.path.join(broken, shard)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 100])
    msgs = _messages(broken)
    assert len(msgs) == 1, msgs
    covered = len(data) - 8 - int.from_bytes(data[:8], "little")
    _one_matching(msgs, f"{shard}: unreadable safetensors file: the tensors cover {covered} data bytes but the file "
                        f"holds {covered - 100} after the header (truncated or trailing bytes)")


def test_quantized_embedding_is_rejected(tmp_path):
    t = wq.quantize_w8a8_dynamic(np.ones((8, 16), np.float32))
    tensors = {f"model.embed_tokens.{k}": v for k, v in t.items()}
    write_quantized_model(tmp_path / "m", tensors, dict.fromkeys(tensors, "W8A8_DYNAMIC"),
                          model_quant_type="W8A8_DYNAMIC")
    _one_matching(_messages(tmp_path / "m"), "model.embed_tokens.weight: embedding described 'W8A8_DYNAMIC'")


def test_w8a8_static_expert_rejected(broken, ckpt):
    # every expert tensor relabelled W8A8: the tensors no longer match, and W8A8 has no MoE method
    desc = ckpt.load_json(broken, DESC)
    for key in list(desc):
        if ".experts." in key:
            desc[key] = "W8A8"
    ckpt.save_json(broken, DESC, desc)
    msgs = _messages(broken)
    _one_matching(msgs, f"{L1}.mlp.experts.0.gate_proj.weight: MoE expert projection described 'W8A8', "
                        "which has no MoE implementation; MoE experts support: W4A16, W8A8_DYNAMIC")
    assert len(msgs) == 6, msgs  # one per expert projection, no cascade of table errors


def test_raise_errors_combines_every_problem(broken, ckpt):
    ckpt.set_tensor(broken, f"{L1}.mlp.gate.weight_scale", np.zeros((2, 1), np.float32))
    ckpt.set_tensor(broken, f"{L0}.mlp.down_proj.input_offset", np.array([0.5], np.float32))
    with pytest.raises(CheckpointError) as ei:
        validate_checkpoint(broken, raise_errors=True)
    assert isinstance(ei.value, ValueError)
    assert str(ei.value).startswith(f"{broken}: 2 problems:")
    assert len(ei.value.problems) == 2
    assert {p.key for p in ei.value.problems} == {f"{L1}.mlp.gate.weight_scale", f"{L0}.mlp.down_proj.input_offset"}


def test_validation_of_a_corrupt_checkpoint_writes_nothing(broken, ckpt):
    ckpt.set_tensor(broken, f"{L1}.mlp.gate.weight_scale", np.zeros((2, 1), np.float32))
    before = _hashes(broken)
    assert not validate_checkpoint(broken).ok
    assert _hashes(broken) == before


# ---------------------------------------------------------------------------------------
# what breaks only at run time unless checked at load: model dtype, accumulator range, MoE rules
# (found by tests/checkpoint/test_fuzz_checkpoint.py or required by issue 7)
# ---------------------------------------------------------------------------------------

def test_group_size_not_dividing_k_is_an_error(broken, ckpt):
    # 33 gives ceil(64/33) = 2 groups, the scales' count: a ragged reading would load silently
    desc = ckpt.load_json(broken, DESC)
    desc["group_size"] = 33
    ckpt.save_json(broken, DESC, desc)
    _one_matching(_messages(broken), "lm_head.weight_scale: group_size 33 does not divide K = 64: expected a divisor")


def test_static_input_scale_whose_reciprocal_overflows(broken, ckpt):
    for proj in ("q_proj", "k_proj", "v_proj"):
        ckpt.set_tensor(broken, f"{L0}.self_attn.{proj}.input_scale", np.array([1e-39], np.float32))
    _one_matching(_messages(broken), f"{L0}.self_attn.q_proj.input_scale: expected 1/input_scale finite in the model "
                                     "dtype float32", "whose reciprocal is inf")


def test_w4a8_two_step_scale_overflowing_float32(broken, ckpt):
    name = f"{L0}.mlp.gate_proj.weight_scale"
    s = ckpt.get_tensor(broken, name)
    s[0, 0] = 1e38
    ckpt.set_tensor(broken, name, s)
    _one_matching(_messages(broken), f"{L0}.mlp.gate_proj.weight_scale_second: expected weight_scale * "
                                     "weight_scale_second finite and > 0 in float32", "found inf at index (0, 0)")


def test_moe_w4a8_per_group_scale_beyond_float16(broken, ckpt):
    # fine for the linear path (float32), not for the MoE path, which rounds s1*s2 to fp16
    name = f"{L1}.mlp.experts.0.gate_proj.weight_scale"
    s = ckpt.get_tensor(broken, name)
    s[0, 0] = 1e6
    ckpt.set_tensor(broken, name, s)
    _one_matching(_messages(broken), f"{name} * weight_scale_second: scales must be finite and > 0 after rounding "
                                     "to float16 (process_scale), found inf at index (0, 0)")


@pytest.mark.parametrize("name,value,fragment", [
    ("lm_head.weight_scale", 1e-9, "which becomes 0.0"),                       # W8A16 scale held in fp16
    (f"{L0}.self_attn.q_proj.bias", 1e38, "found a value that overflows it"),  # float bias held in fp16
])
def test_values_that_break_in_a_float16_model(broken, ckpt, name, value, fragment):
    cfg = ckpt.load_json(broken, "config.json")
    assert validate_checkpoint(broken).ok
    ckpt.save_json(broken, "config.json", {**cfg, "torch_dtype": "float16"})
    a = ckpt.get_tensor(broken, name)
    a.reshape(-1)[0] = value
    ckpt.set_tensor(broken, name, a)
    _one_matching(_messages(broken), f"{name}: expected values finite", "in the model dtype float16", fragment)
    ckpt.save_json(broken, "config.json", cfg)  # the same value is fine in a float32 model
    assert validate_checkpoint(broken).ok


def test_quant_bias_that_can_overflow_the_int32_accumulator(broken, ckpt):
    name = f"{L0}.mlp.down_proj.quant_bias"
    q = ckpt.get_tensor(broken, name)
    q[0] = 2**31 - 128 * 128 * 64  # the cheap bound holds exactly: accepted
    ckpt.set_tensor(broken, name, q)
    assert validate_checkpoint(broken).ok
    q[0] = 2**31 - 10
    ckpt.set_tensor(broken, name, q)
    _one_matching(_messages(broken), f"{name}: expected values that keep the int32 accumulator in range",
                  "found quant_bias[0] = 2147483638")


def test_whole_expert_projection_missing(broken, ckpt):
    prefix = f"{L1}.mlp.experts.1.down_proj"
    desc = ckpt.load_json(broken, DESC)
    for key in [k for k in desc if k.startswith(prefix + ".")]:
        del desc[key]
        ckpt.set_tensor(broken, key, None)
    ckpt.save_json(broken, DESC, desc)
    assert _messages(broken) == [f"{broken}: {prefix}: missing: the other experts of {L1}.mlp.experts have a "
                                 "down_proj projection (1 projection(s) missing, experts numbered 0..1)"]


@pytest.mark.parametrize("fn", [DESC, WEIGHTS_INDEX_FILE, "config.json"])
def test_json_null_files(broken, fn):
    with open(os.path.join(broken, fn), "w") as f:
        f.write("null")
    found = "no weight_map" if fn == WEIGHTS_INDEX_FILE else "NoneType"
    _one_matching(_messages(broken), f"{broken}: {fn}: expected", found)


def test_config_values_of_the_wrong_type(broken, ckpt):
    cfg = ckpt.load_json(broken, "config.json")
    ckpt.save_json(broken, "config.json", {**cfg, "model_type": [1, 2], "torch_dtype": 16})
    msgs = _messages(broken)
    _one_matching(msgs, "config.json: 'model_type' must be a string, found [1, 2]")
    _one_matching(msgs, "config.json: 'torch_dtype' must be a string, found 16")
