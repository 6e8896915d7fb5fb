"""``ascend-quant serve`` (vllm_integration/serve.py): the OpenAI-compatible server answers one
completion on 127.0.0.1 for a quantized model, and the greedy text equals offline vLLM's. The server
is a child process of this test, stopped by its PID (SIGTERM, then SIGKILL of its own process group
if it does not exit)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict, timeout: float = 120.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group created for this child (start_new_session)
            proc.wait(timeout=30)


def test_serve_answers_one_completion(quantized_model, plugin_entry_point, support, models, registered, tmp_path):
    model_dir = quantized_model("llama", "W8A8_DYNAMIC")
    port = _free_port()
    env = dict(plugin_entry_point)
    env.update(support.VLLM_TEST_ENV)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine as vLLM normally does
    log = open(tmp_path / "serve.log", "w")
    cmd = [sys.executable, "-m", "ascend_quant.vllm_integration.serve", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
           "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n" + (tmp_path / "serve.log").read_text()[-4000:])
            try:
                models_list = _get(f"{base}/v1/models")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("server did not come up:\n" + (tmp_path / "serve.log").read_text()[-4000:])
                time.sleep(1.0)
        assert [m["id"] for m in models_list["data"]] == ["tiny"]
        prompt = models.PROMPTS[0]
        reply = _post(f"{base}/v1/completions",
                      {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0.0})
        text = reply["choices"][0]["text"]
        assert reply["usage"]["completion_tokens"] == 8
    finally:
        _stop(proc)
        log.close()
    assert proc.returncode is not None

    # the same greedy completion offline (in this process)
    gens = support.run_vllm(model_dir, [prompt], dtype="float32", max_tokens=8)
    assert text == gens[0].text
