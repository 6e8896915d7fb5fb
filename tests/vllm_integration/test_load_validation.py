"""Load-time checkpoint validation through vLLM (issue 7, parts 1 and 4's bad-checkpoint half).

``LLM(model=bad, quantization="ascend")`` must fail while vLLM builds its config, before the model
is constructed or any weight is read, with the validator's message (the one ``ascend-quant
inspect`` prints) naming the directory, the tensor or key, what was expected and what was found;
``ascend-quant serve BAD_DIR`` must exit non-zero at start-up printing it, without a traceback.
A valid checkpoint loads and generates, and no load (valid or not) writes into the directory.

A handful of representative corruptions run here (vLLM is slow to start); the many kinds the
validator knows are tested without vLLM in tests/checkpoint/test_validate.py and fuzzed in
tests/checkpoint/test_fuzz_checkpoint.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

DESC = "quant_model_description.json"
L0 = "model.layers.0"


def _tree_hash(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (names and contents)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            path = os.path.join(dirpath, fn)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _unknown_id(d, ckpt):
    desc = ckpt.load_json(d, DESC)
    desc[f"{L0}.mlp.down_proj.weight"] = "W8A8_DYNAMICX"
    ckpt.save_json(d, DESC, desc)
    return f"{L0}.mlp.down_proj.weight: unknown algorithm ID 'W8A8_DYNAMICX' (did you mean 'W8A8_DYNAMIC'?)"


def _invalid_json(d, ckpt):
    path = os.path.join(d, DESC)
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[: len(text) // 2])
    return f"{DESC}: invalid JSON (the quantization description)"


def _zero_input_scale(d, ckpt):
    name = f"{L0}.self_attn.q_proj.input_scale"
    ckpt.set_tensor(d, name, np.zeros_like(ckpt.get_tensor(d, name)))
    return f"{name}: scales must be finite and > 0, found 0.0"


def _quant_bias_size(d, ckpt):
    name = f"{L0}.self_attn.k_proj.quant_bias"
    q = ckpt.get_tensor(d, name)
    ckpt.set_tensor(d, name, q[:-1].copy())
    return f"{name}: expected shape (N,) = ({q.shape[0]},), got ({q.shape[0] - 1},)"


def _missing_shard(d, ckpt):
    shard = ckpt.shard_of(d, f"{L0}.self_attn.q_proj.weight")
    os.remove(os.path.join(d, shard))
    return f"quant_model_weights.safetensors.index.json: points at shard '{shard}', which is missing"


@pytest.fixture
def w8a8_copy(quantized_model, tmp_path):
    """A private copy of the tiny llama quantized W8A8 (static scales, quant_bias, deq_scale)."""
    src = quantized_model("llama", "W8A8")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("corrupt", [_unknown_id, _invalid_json, _zero_input_scale, _quant_bias_size],
                         ids=lambda f: f.__name__.strip("_"))
def test_llm_refuses_a_corrupt_checkpoint_with_the_validator_message(w8a8_copy, ckpt, registered, support, corrupt):
    from vllm import LLM

    from ascend_quant.checkpoint.errors import CheckpointError
    from ascend_quant.vllm_integration.config import find_checkpoint_error

    expected = corrupt(w8a8_copy, ckpt)
    before = _tree_hash(w8a8_copy)
    with pytest.raises(ValueError) as ei:
        LLM(model=w8a8_copy, **support.llm_kwargs("float32"))
    # what the user reads: vLLM's pydantic config wraps the error, its text holds ours in full
    assert f"{w8a8_copy}: {expected}" in str(ei.value), str(ei.value)
    err = find_checkpoint_error(ei.value)
    assert isinstance(err, CheckpointError) and err.where == w8a8_copy
    assert any(expected in str(p) for p in err.problems), err
    assert _tree_hash(w8a8_copy) == before


def test_valid_checkpoint_loads_generates_and_is_not_written(w8a8_copy, registered, support, models):
    before = _tree_hash(w8a8_copy)
    gens = support.run_vllm(w8a8_copy, models.PROMPTS[:1], dtype="float32", max_tokens=4)
    assert len(gens[0].token_ids) == 4
    assert _tree_hash(w8a8_copy) == before


def test_validation_mode_headers_skips_values_only(w8a8_copy, ckpt, monkeypatch):
    """``ASCEND_QUANT_VALIDATE=headers``: a zero scale passes (values unread), a wrong shape not."""
    from ascend_quant.checkpoint.errors import CheckpointError
    from ascend_quant.vllm_integration.config import VALIDATE_ENV, AscendQuantConfig

    _zero_input_scale(w8a8_copy, ckpt)
    monkeypatch.setenv(VALIDATE_ENV, "headers")
    AscendQuantConfig().maybe_update_config(w8a8_copy)
    monkeypatch.setenv(VALIDATE_ENV, "values")
    with pytest.raises(CheckpointError, match="scales must be finite and > 0"):
        AscendQuantConfig().maybe_update_config(w8a8_copy)
    expected = _quant_bias_size(w8a8_copy, ckpt)
    monkeypatch.setenv(VALIDATE_ENV, "headers")
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        AscendQuantConfig().maybe_update_config(w8a8_copy)
    monkeypatch.setenv(VALIDATE_ENV, "everything")
    with pytest.raises(ValueError, match="ASCEND_QUANT_VALIDATE='everything': expected 'values'"):
        AscendQuantConfig().maybe_update_config(w8a8_copy)


@pytest.mark.slow
def test_serve_exits_at_start_up_printing_the_problem(w8a8_copy, ckpt, plugin_entry_point, support):
    expected = _missing_shard(w8a8_copy, ckpt)
    before = _tree_hash(w8a8_copy)
    env = dict(plugin_entry_point)
    env.update(support.VLLM_TEST_ENV)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # as a real server runs
    cmd = [sys.executable, "-m", "ascend_quant.cli.main", "serve", w8a8_copy, "--host", "127.0.0.1", "--port", "1",
           "--dtype", "float32", "--max-model-len", "128", "--enforce-eager"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert f"error: {w8a8_copy}: {expected}" in proc.stderr, proc.stderr[-4000:]
    assert f"{w8a8_copy}: not a valid quantized checkpoint (1 problem(s))" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert _tree_hash(w8a8_copy) == before
