"""``ascend-quant quantize``: every algorithm ID on tiny random llama / qwen2 / qwen3-moe models
(transformers, random weights, save_pretrained(safe_serialization=True)) produces a checkpoint that
``ascend-quant inspect`` accepts, without touching the source directory."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ascend_quant.checkpoint.convert import BUILTIN_CALIBRATION_TEXT  # noqa: E402
from ascend_quant.checkpoint.io import read_quantized_model  # noqa: E402
from ascend_quant.checkpoint.validate import validate_checkpoint  # noqa: E402
from ascend_quant.cli.main import main  # noqa: E402
from ascend_quant.reference import LINEAR_ALGORITHMS, MOE_ALGORITHMS  # noqa: E402

CALIB = ["--calib-samples", "2", "--calib-seq-len", "16", "--no-progress"]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([BUILTIN_CALIBRATION_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _make(kind: str, path) -> str:
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, **SMALL))
    elif kind == "qwen2":  # q/k/v biases, and a tokenizer
        tok = _tokenizer(300)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), **SMALL))
        tok.save_pretrained(path)
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=32, head_dim=16, **SMALL))
    model.save_pretrained(path, safe_serialization=True)
    return os.fspath(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    return {k: _make(k, root / k) for k in ("llama", "qwen2", "qwen3_moe")}


def _hashes(d):
    out = {}
    for dirpath, _, files in os.walk(d):
        for fn in files:
            p = os.path.join(dirpath, fn)
            out[os.path.relpath(p, d)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def _quantize(src, out, *args) -> int:
    before = _hashes(src)
    rc = main(["quantize", src, os.fspath(out), *args])
    assert _hashes(src) == before, "quantize modified SRC_DIR"
    return rc


@pytest.mark.parametrize("algo", LINEAR_ALGORITHMS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_algorithm_is_accepted_by_inspect(models, tmp_path, capsys, kind, algo):
    out = tmp_path / "q"
    assert _quantize(models[kind], out, "--algo", algo, *CALIB) == 0
    assert main(["inspect", os.fspath(out)]) == 0
    printed = capsys.readouterr().out
    assert "valid quantized checkpoint" in printed
    ck = read_quantized_model(out)
    # 2 layers x (q, k, v, o, gate, up, down); lm_head stays FLOAT
    assert validate_checkpoint(out).by_algorithm()[algo]["modules"] == 14
    assert ck.description["lm_head.weight"] == "FLOAT"
    if kind == "qwen2":
        assert ck.description["model.layers.0.self_attn.q_proj.bias"] == "FLOAT"


@pytest.mark.parametrize("algo", MOE_ALGORITHMS)
def test_moe_model_every_moe_algorithm(models, tmp_path, capsys, algo):
    out = tmp_path / "q"
    assert _quantize(models["qwen3_moe"], out, "--algo", algo, *CALIB) == 0
    assert main(["inspect", os.fspath(out)]) == 0
    desc = read_quantized_model(out).description
    assert desc["model.layers.1.mlp.experts.3.down_proj.weight"] == algo
    assert desc["model.layers.0.mlp.gate.weight"] == "FLOAT"  # the router stays float


def test_flatquant_shards_of_fused_layers_share_factors(models, tmp_path):
    out = tmp_path / "q"
    assert _quantize(models["llama"], out, "--algo", "W4A4_FLATQUANT_DYNAMIC", *CALIB) == 0
    t = read_quantized_model(out).tensors
    a = "model.layers.1.self_attn"
    m = "model.layers.1.mlp"
    for s in ("left_trans", "right_trans", "clip_ratio"):
        assert np.array_equal(t[f"{a}.q_proj.{s}"], t[f"{a}.v_proj.{s}"])
        assert np.array_equal(t[f"{a}.k_proj.{s}"], t[f"{a}.v_proj.{s}"])
        assert np.array_equal(t[f"{m}.gate_proj.{s}"], t[f"{m}.up_proj.{s}"])
    assert not np.array_equal(t[f"{a}.q_proj.left_trans"], t["model.layers.0.self_attn.q_proj.left_trans"])
    assert t[f"{a}.o_proj.left_trans"].shape == (4, 4) and f"{a}.o_proj.right_trans" not in t


def test_flatquant_random_factors_option(models, tmp_path):
    out = tmp_path / "q"
    assert _quantize(models["llama"], out, "--algo", "W4A4_FLATQUANT_DYNAMIC", "--flatquant-random", *CALIB) == 0
    t = read_quantized_model(out).tensors
    left = t["model.layers.0.self_attn.q_proj.left_trans"].astype(np.float64)
    np.testing.assert_allclose(left @ left.T, np.eye(left.shape[0]), atol=1e-6)  # orthogonal (float32 storage)
    assert t["model.layers.0.mlp.down_proj.clip_ratio"].tolist() == [1.0]


def test_refuses_non_empty_out_dir_unless_overwrite(models, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _quantize(models["llama"], out, "--algo", "W8A8_DYNAMIC", "--no-progress") == 2
    assert f"error: {out}: directory is not empty (pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert _quantize(models["llama"], out, "--algo", "W8A8_DYNAMIC", "--no-progress", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["inspect", os.fspath(out)]) == 0


def test_out_dir_inside_src_dir_is_refused(models, capsys):
    src = models["llama"]
    assert _quantize(src, os.path.join(src, "q"), "--algo", "W8A16", "--no-progress") == 2
    assert "must not be, contain or lie inside the source directory" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(src, "q"))


def test_skip_globs_keep_layers_float(models, tmp_path, capsys):
    out = tmp_path / "q"
    assert _quantize(models["llama"], out, "--algo", "W8A8_DYNAMIC", "--skip", "*.down_proj", "model.layers.0.*",
                     "--skip", "*.nothing_here", "--no-progress") == 0
    assert "warning: --skip '*.nothing_here' matched no layer" in capsys.readouterr().err
    desc = read_quantized_model(out).description
    assert desc["model.layers.1.mlp.down_proj.weight"] == "FLOAT"
    assert desc["model.layers.0.self_attn.q_proj.weight"] == "FLOAT"
    assert desc["model.layers.1.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    assert desc.algorithms()["W8A8_DYNAMIC"] == 6


def test_group_size_option(models, tmp_path):
    out = tmp_path / "q"
    assert _quantize(models["llama"], out, "--algo", "W8A16", "--group-size", "32", "--no-progress") == 0
    ck = read_quantized_model(out)
    assert ck.description.group_size == 32
    assert ck.tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 128 // 32)


def test_calibration_text_sets_static_scales(models, tmp_path):
    src = models["qwen2"]
    a, b = tmp_path / "a", tmp_path / "b"
    calib = tmp_path / "calib.txt"
    calib.write_text("zzzz 0000 ]]]] " * 40, encoding="utf-8")
    assert _quantize(src, a, "--algo", "W8A8", "--no-progress") == 0
    assert _quantize(src, b, "--algo", "W8A8", "--calib-data", os.fspath(calib), "--no-progress") == 0
    ta, tb = read_quantized_model(a).tensors, read_quantized_model(b).tensors
    p = "model.layers.0.self_attn"
    # q/k/v see the same input, so the per-tensor min/max statistic gives them identical parameters
    for s in ("input_scale", "input_offset"):
        assert ta[f"{p}.q_proj.{s}"].tobytes() == ta[f"{p}.k_proj.{s}"].tobytes() == ta[f"{p}.v_proj.{s}"].tobytes()
    assert ta[f"{p}.q_proj.input_scale"].tobytes() != tb[f"{p}.q_proj.input_scale"].tobytes()


def test_calibration_matches_an_independent_min_max(models, tmp_path):
    """input_scale/offset of the first q_proj against min/max of its input computed here: the
    embeddings of the calibration tokens through the first RMSNorm (run by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ascend_quant.reference.weight_quant import calibrate_input_scale_offset

    src = models["qwen2"]
    out = tmp_path / "q"
    assert _quantize(src, out, "--algo", "W8A8", "--calib-samples", "1", "--calib-seq-len", "64",
                     "--no-progress") == 0
    ids = AutoTokenizer.from_pretrained(src)(BUILTIN_CALIBRATION_TEXT, add_special_tokens=False)["input_ids"][:64]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([ids])))
    s, o = calibrate_input_scale_offset(h.numpy())
    t = read_quantized_model(out).tensors
    assert t["model.layers.0.self_attn.q_proj.input_scale"].tobytes() == s.tobytes()
    assert t["model.layers.0.self_attn.q_proj.input_offset"].tobytes() == o.tobytes()


def test_dtype_bfloat16_output(models, tmp_path):
    out = tmp_path / "q"
    assert _quantize(models["llama"], out, "--algo", "W8A8", "--dtype", "bfloat16", *CALIB) == 0
    ck = read_quantized_model(out)
    assert ck.tensors["model.embed_tokens.weight"].dtype.name == "bfloat16"
    assert ck.tensors["model.layers.0.self_attn.q_proj.deq_scale"].dtype == np.float32
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    assert main(["inspect", os.fspath(out)]) == 0


def test_unsupported_algorithm_is_an_argparse_error(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["quantize", models["llama"], os.fspath(tmp_path / "q"), "--algo", "W8A8_MXFP8"])
    assert ei.value.code == 2
    assert "invalid choice: 'W8A8_MXFP8'" in capsys.readouterr().err


def test_group_size_that_does_not_divide_k_is_refused_before_writing(models, tmp_path, capsys):
    out = tmp_path / "q"
    assert _quantize(models["llama"], out, "--algo", "W4A16", "--group-size", "48", "--no-progress") != 0
    err = capsys.readouterr().err
    assert "group size 48 does not divide K = " in err and ".weight" in err, err
    assert not out.exists() or not any(out.iterdir()), "nothing may be written for a refused group size"
