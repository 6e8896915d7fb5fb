"""Generate the real-msModelSlim fixtures of tests/vllm_integration/test_msmodelslim_interop.py.

Run once (minutes; not part of CI) in an environment with msModelSlim 26.1.0 on CPU:

    python -m venv /tmp/msms && /tmp/msms/bin/pip install msmodelslim==26.1.0 "transformers<5" \\
        torch==2.13.0 safetensors tokenizers
    /tmp/msms/bin/python scripts/make_msmodelslim_fixtures.py [--out tests/vllm_integration/fixtures/msmodelslim]

transformers 4.x is needed for the MoE fixture: with transformers 5 the experts of Qwen3-MoE are
fused 3-D parameters, not ``nn.Linear`` modules, so msModelSlim's linear quantization does not find
them (it then writes ``mlp.experts.gate_up_proj`` as FLOAT). The tiny models are the tests' own
(tests/vllm_integration/tiny_models.py: random weights, fixed seed, in-process tokenizer), float32
(msModelSlim's W8A8 paths fail on bf16 sources on CPU). Each fixture directory is msModelSlim's
output as written (description, shards, index, config, tokenizer, best-practice yaml).

Fixtures:
  qwen2_w8a8_dynamic  default-w8a8.yaml (iter_smooth + per-token int8)
  qwen2_w8a8          linear_quant, per-tensor asymmetric activations (W8A8 static)
  qwen2_w8a8_mix      linear_quant, activation scope pd_mix (W8A8_MIX)
  qwen2_w8a16         default-w8a16.yaml
  qwen3_moe_w4a8      qwen3-30b-w4a8-v1 adapted: attention W8A8_DYNAMIC, experts W4A8_DYNAMIC
                      (per-channel int4, packed v1.0.0 layout), router FLOAT
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LINEAR_QUANT = """apiversion: modelslim_v1
metadata:
  config_id: ascend-quant-{name}
  score: 50
  verified_model_types: [ ]
  label: {{w_bit: 8, a_bit: 8, is_sparse: False, kv_cache: False}}
spec:
  process:
    - type: "linear_quant"
      qconfig:
        act: {{scope: "{scope}", dtype: "int8", symmetric: False, method: "minmax"}}
        weight: {{scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}}
      include: [ "*" ]
  runner: "model_wise"
  save:
    - type: "ascendv1_saver"
      part_file_size: 4
"""

MOE_W4A8 = """apiversion: modelslim_v1
metadata:
  config_id: ascend-quant-qwen3-moe-w4a8
  score: 50
  verified_model_types: [ ]
  label: {w_bit: 4, a_bit: 8, is_sparse: False, kv_cache: False}
w8a8: &w8a8
  act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}
  weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "ssz"}
w4a8: &w4a8
  act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}
  weight: {scope: "per_channel", dtype: "int4", symmetric: True, method: "ssz"}
spec:
  process:
    - type: "flex_smooth_quant"
      enable_subgraph_type: ['norm-linear', 'ov']
      include: ["*"]
    - type: "group"
      configs:
        - {type: "linear_quant", qconfig: *w8a8, include: ["*self_attn*"]}
        - {type: "linear_quant", qconfig: *w4a8, include: ["*mlp.experts*"]}
  save:
    - type: "ascendv1_saver"
      part_file_size: 4
"""


def _tiny_models():
    path = ROOT / "tests" / "vllm_integration" / "tiny_models.py"
    spec = importlib.util.spec_from_file_location("tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bundled(name: str) -> str:
    import msmodelslim

    return os.path.join(os.path.dirname(msmodelslim.__file__), "lab_practice", "default", name)


def _quantize(src: Path, out: Path, config: str) -> None:
    exe = shutil.which("msmodelslim") or os.path.join(os.path.dirname(sys.executable), "msmodelslim")
    cmd = [exe, "quant", "--model_type", "default", "--model_path", str(src), "--save_path", str(out),
           "--device", "cpu", "--config_path", config, "--trust_remote_code", "False"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, stdin=subprocess.DEVNULL, check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "vllm_integration" / "fixtures" / "msmodelslim"))
    args = p.parse_args(argv)
    out = Path(args.out)
    tiny = _tiny_models()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = Path(tiny.build_tiny_model(str(tmp / "qwen2"), "qwen2"))
        moe = Path(tiny.build_tiny_model(str(tmp / "qwen3_moe"), "qwen3_moe"))
        (tmp / "static.yaml").write_text(LINEAR_QUANT.format(name="w8a8", scope="per_tensor"))
        (tmp / "pdmix.yaml").write_text(LINEAR_QUANT.format(name="w8a8-mix", scope="pd_mix"))
        (tmp / "moe.yaml").write_text(MOE_W4A8)
        jobs = {
            "qwen2_w8a8_dynamic": (dense, _bundled("default-w8a8.yaml")),
            "qwen2_w8a8": (dense, str(tmp / "static.yaml")),
            "qwen2_w8a8_mix": (dense, str(tmp / "pdmix.yaml")),
            "qwen2_w8a16": (dense, _bundled("default-w8a16.yaml")),
            "qwen3_moe_w4a8": (moe, str(tmp / "moe.yaml")),
        }
        for name, (src, config) in jobs.items():
            target = out / name
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            _quantize(src, target, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
