"""checkpoint.io: writing msModelSlim-layout directories and reading them back read-only."""

from __future__ import annotations

import hashlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

from ascend_quant.checkpoint.io import (
    WEIGHTS_INDEX_FILE,
    read_quantized_model,
    read_safetensors,
    write_quantized_model,
)

TOP_ORDER = ["version", "model_quant_type", "metadata", "group_size", "optional"]


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.down_proj.weight": rng.integers(-128, 128, (8, 32), dtype=np.int8),
        "model.layers.0.mlp.down_proj.weight_scale": rng.random((8, 1), dtype=np.float32),
        "model.layers.0.mlp.down_proj.deq_scale": np.arange(8, dtype=np.int64),
        "model.norm.weight": np.ones(8, np.float32),
    }


def _entries(tensors):
    return {k: ("W8A8_DYNAMIC" if "down_proj" in k else "FLOAT") for k in tensors}


def _hashes(d):
    return {fn: hashlib.sha256(open(os.path.join(d, fn), "rb").read()).hexdigest() for fn in sorted(os.listdir(d))}


def test_round_trip_is_byte_exact_and_reading_never_writes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"not copied")
    t = _tensors()
    out = tmp_path / "out"
    desc = write_quantized_model(out, t, _entries(t), model_quant_type="W8A8_DYNAMIC", source_dir=src)
    files = sorted(os.listdir(out))
    assert files == ["config.json", "quant_model_description.json", "quant_model_weights-00001-of-00001.safetensors",
                     WEIGHTS_INDEX_FILE, "tokenizer.json"]
    raw = json.loads((out / "quant_model_description.json").read_text())
    assert list(raw)[:5] == TOP_ORDER and raw["version"] == "1.0.0" and raw["metadata"] == {} and raw["optional"] == {}
    assert desc.to_dict() == raw
    before = _hashes(out)
    ck = read_quantized_model(out)
    for k, a in t.items():
        b = ck.tensors[k]
        assert b.dtype == a.dtype and b.shape == a.shape and b.tobytes() == a.tobytes(), k
    assert ck.config == {"model_type": "llama"}
    assert set(ck.module_tensors("model.layers.0.mlp.down_proj")) == {"weight", "weight_scale", "deq_scale"}
    assert not ck.tensors["model.norm.weight"].flags.writeable
    assert _hashes(out) == before


def test_sharding_and_index(tmp_path):
    t = _tensors()
    write_quantized_model(tmp_path, t, _entries(t), model_quant_type="W8A8_DYNAMIC", max_shard_bytes=300)
    index = json.loads((tmp_path / WEIGHTS_INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in t.values())
    for name, shard in index["weight_map"].items():
        assert name in read_safetensors(tmp_path / shard)


def test_entries_must_match_tensors(tmp_path):
    t = _tensors()
    e = _entries(t)
    e.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"1 tensor\(s\) without a description entry \(e.g. \['model.norm.weight'\]\)"):
        write_quantized_model(tmp_path / "a", t, e, model_quant_type="X")
    e = {**_entries(t), "ghost.weight": "FLOAT"}
    with pytest.raises(ValueError, match=r"without a tensor \(e.g. \['ghost.weight'\]\)"):
        write_quantized_model(tmp_path / "b", t, e, model_quant_type="X")


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    t = _tensors()
    with pytest.raises(FileExistsError, match="not empty"):
        write_quantized_model(tmp_path, t, _entries(t), model_quant_type="X")
    write_quantized_model(tmp_path, t, _entries(t), model_quant_type="X", overwrite=True)
    assert (tmp_path / "keep.txt").exists()


def test_reader_checks_entries_and_shards(tmp_path):
    t = _tensors()
    write_quantized_model(tmp_path, t, _entries(t), model_quant_type="X")
    d = json.loads((tmp_path / "quant_model_description.json").read_text())
    d["extra.weight"] = "FLOAT"
    (tmp_path / "quant_model_description.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"description entr\(y/ies\) without a tensor \(e.g. \['extra.weight'\]\)"):
        read_quantized_model(tmp_path)
    assert read_quantized_model(tmp_path, check_entries=False).description["extra.weight"] == "FLOAT"
    os.remove(tmp_path / "quant_model_weights-00001-of-00001.safetensors")
    with pytest.raises(FileNotFoundError, match="listed but missing"):
        read_quantized_model(tmp_path)


def test_malformed_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        read_safetensors(p)
    p.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="exceeds the file size"):
        read_safetensors(p)
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ValueError, match=r"tensor 'a': data_offsets \[0, 8\] do not match shape \[4\] of F32"):
        read_safetensors(p)
