"""checkpoint.io: writing msModelSlim-layout directories and reading them back read-only."""

from __future__ import annotations

import hashlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

from ascend_quant.checkpoint.errors import CheckpointError
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
    with pytest.raises(CheckpointError,
                       match=r"description entr\(y/ies\) without a tensor \(e.g. \['extra.weight'\]\)"):
        read_quantized_model(tmp_path)
    assert read_quantized_model(tmp_path, check_entries=False).description["extra.weight"] == "FLOAT"
    os.remove(tmp_path / "quant_model_weights-00001-of-00001.safetensors")
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_INDEX_FILE}: shard\\(s\\) listed but missing"):
        read_quantized_model(tmp_path)


def test_malformed_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="shorter than 8 bytes"):
        read_safetensors(p)
    p.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file size"):
        read_safetensors(p)
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError,
                       match=r"x.safetensors: a: data_offsets \[0, 8\] do not match shape \[4\] of F32"):
        read_safetensors(p)


_A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_B = {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}


@pytest.mark.parametrize("header,data,fragment", [
    ({"a": _A, "b": _B}, 12, None),                                      # valid
    ({"b": _B, "a": _A}, 12, None),                                      # valid: header order is free
    ({"a": _A, "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]}}, 8, None),  # empty tensor
    ({"a": _A}, 12, "cover 8 data bytes but the file holds 12"),         # trailing bytes
    ({"a": _A, "b": {**_B, "data_offsets": [12, 16]}}, 16, "b: data_offsets start at 12, expected 8"),  # gap
    ({"a": _A, "b": {**_B, "data_offsets": [4, 8]}}, 8, "b: data_offsets start at 4, expected 8: the tensor overlaps"),
    ({"a": {**_A, "shape": [-2]}}, 8, "a: shape must be a list of non-negative integers"),
    ({"a": {**_A, "shape": [True, 2]}}, 8, "a: shape must be a list of non-negative integers"),
    ({"a": {**_A, "shape": [2**40, 2**40]}}, 8, "a: data_offsets [0, 8] do not match shape"),
    ({"a": {**_A, "dtype": "F33"}}, 8, "a: unsupported dtype 'F33'"),
    ({"a": {**_A, "data_offsets": [0, 8, 9]}}, 8, "a: data_offsets must be [begin, end]"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, "a: header entry lacks data_offsets"),
    ({"a": [1, 2]}, 8, "a: header entry must be an object"),
    ({"__metadata__": {"format": 1}, "a": _A}, 8, "__metadata__: expected an object of strings"),
    ([1], 8, "expected a JSON object, found list"),
])
def test_reader_follows_the_safetensors_rules(tmp_path, header, data, fragment):
    """The header rules of the safetensors library (which vLLM loads shards with): a file this
    reader accepts, safetensors accepts with the same values, and a file it rejects is rejected
    with a CheckpointError naming the file (and the tensor at fault)."""
    from safetensors import SafetensorError, safe_open

    p = tmp_path / "x.safetensors"
    raw = json.dumps(header).encode()
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(range(data)))
    if fragment is None:
        ours = read_safetensors(p)
        with safe_open(p, "np") as f:
            assert sorted(f.keys()) == sorted(ours)
            for k in ours:
                assert f.get_tensor(k).tobytes() == ours[k].tobytes() and f.get_tensor(k).shape == ours[k].shape
        assert all(not a.flags.writeable for a in ours.values())
        return
    with pytest.raises(CheckpointError) as ei:
        read_safetensors(p)
    assert str(ei.value).startswith(f"{p}: ") and fragment in str(ei.value)
    with pytest.raises(SafetensorError):
        with safe_open(p, "np") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_one_file_descriptor_per_shard_not_per_tensor(tmp_path):
    """Python's mmap keeps a file descriptor per map: mapping each tensor separately ran out of
    descriptors (EMFILE) on checkpoints with more tensors than ``ulimit -n``."""
    import resource

    t = {f"t{i}": np.full(2, i, np.float32) for i in range(300)}
    write_quantized_model(tmp_path, t, dict.fromkeys(t, "FLOAT"), model_quant_type="FLOAT")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds_before = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (fds_before + 64, hard))
    try:
        ck = read_quantized_model(tmp_path)
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [float(ck.tensors[f"t{i}"][1]) for i in range(300)] == list(range(300))
