"""One model through vLLM, in a child process: prompt logprobs on held-out windows and decode speed.

:func:`measure_with_vllm` (the parent side) writes a JSON spec, starts
``python -P -m ascend_quant.evaluation.vllm_measurement SPEC RESULT`` and reads the JSON result;
:func:`main` (the child side) builds one ``vllm.LLM`` (``quantization="ascend"`` for a quantized
directory, vLLM's own unquantized path for the float model) and measures:

* **prompt logprobs**: every window is sent as a prompt of token ids with
  ``SamplingParams(prompt_logprobs=1, max_tokens=1)``; vLLM returns, at every position after the
  first, the logprob of the true next token (``target_logprobs``) and its own most likely token
  (``top1``, the rank-1 entry). Perplexity follows from the first (:mod:`.perplexity`), agreement
  with the reference forward from both (:mod:`.reference_agreement`).
* **decode speed** at batch 1 (with no windows, only this): the same prompt is generated greedily with ``ignore_eos`` for
  ``1`` and for ``1 + n`` tokens, each ``repeats`` times after one warm-up run; decode tokens/s is
  ``n / (min t(1+n) − min t(1))``, so prefill and per-request overhead cancel, and the minimum
  over repeats is the estimate least disturbed by other processes on a shared machine (noise only
  ever adds time).

Why a child process per engine: vLLM's CPU engine started many times in one process keeps memory
and threads alive (OpenMP pools bound to cores, the KV cache) and can hang on teardown; a child
per model gives each engine a clean process, a hard time limit (:data:`DEFAULT_TIMEOUT_S`), its own
log file, and makes a crash of one algorithm an error row instead of the end of the run. The cost
is vLLM's import (~5-20 s) per model. The engine runs in the child's own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~2 s to start instead of 11-18 s), which is why the
``"ascend"`` quantization is registered here directly instead of through the plugin entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["DEFAULT_TIMEOUT_S", "MeasurementError", "VLLM_ENV", "main", "measure_with_vllm"]

#: Set in the child before vLLM is imported (vllm-cpu-platform-notes.md, "Running offline, fast"):
#: a 1 GiB KV cache instead of ~16 GiB, the engine in-process, nothing fetched from a hub.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: Wall-clock limit of one child (import, engine start, logprobs, decode).
DEFAULT_TIMEOUT_S = 900


class MeasurementError(RuntimeError):
    """A vLLM child failed or timed out; the message names the model and ends with its log's tail."""


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def measure_with_vllm(model_dir: str | os.PathLike, *, quantization: str | None, dtype: str,
                      windows: Sequence[Sequence[int]], decode_prompt: Sequence[int], decode_tokens: int,
                      decode_repeats: int, work_dir: str | os.PathLike, name: str,
                      max_model_len: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Run one vLLM engine on ``model_dir`` in a child process and return its measurements (see
    the module docstring); the child's output goes to ``work_dir/<name>.vllm.log``.

    Raises :class:`MeasurementError` when the child exits non-zero, times out or writes no result.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (work / f"{name}.spec.json", work / f"{name}.result.json",
                                        work / f"{name}.vllm.log")
    longest = max([len(w) for w in windows] + [len(decode_prompt) + decode_tokens + 1])
    spec = {
        "model_dir": os.fspath(model_dir), "quantization": quantization, "dtype": dtype,
        "windows": [list(map(int, w)) for w in windows], "decode_prompt": list(map(int, decode_prompt)),
        "decode_tokens": int(decode_tokens), "decode_repeats": int(decode_repeats),
        "max_model_len": int(max_model_len or max(256, longest)),
    }
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    for k, v in VLLM_ENV.items():
        env.setdefault(k, v)
    cmd = [sys.executable, "-P", "-m", "ascend_quant.evaluation.vllm_measurement", str(spec_path), str(result_path)]
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"{model_dir}: vLLM run did not finish in {timeout_s:.0f}s "
                                   f"(log {log_path}):\n{_log_tail(log_path)}") from None
    if proc.returncode != 0 or not result_path.is_file():
        raise MeasurementError(f"{model_dir}: vLLM run exited with status {proc.returncode} "
                               f"(log {log_path}):\n{_log_tail(log_path)}")
    return json.loads(result_path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------
# the child
# ---------------------------------------------------------------------------------------

def _prompt_logprobs(llm, windows: Sequence[Sequence[int]]) -> tuple[list[list[float]], list[list[int]]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": list(w)} for w in windows], params, use_tqdm=False)
    targets, top1 = [], []
    for w, out in zip(windows, outs):
        rows = out.prompt_logprobs
        if rows is None or len(rows) != len(w):
            raise RuntimeError(f"vLLM returned {None if rows is None else len(rows)} prompt logprob rows "
                               f"for a window of {len(w)} tokens")
        t_row, a_row = [], []
        for i in range(1, len(w)):
            entries = rows[i]
            t_row.append(float(entries[w[i]].logprob))
            best = [tok for tok, lp in entries.items() if lp.rank == 1]
            a_row.append(int(best[0]) if best else int(w[i]))
        targets.append(t_row)
        top1.append(a_row)
    return targets, top1


def _decode_speed(llm, prompt: Sequence[int], tokens: int, repeats: int) -> dict:
    from vllm import SamplingParams

    cpu: dict[int, list[float]] = {1: [], tokens + 1: []}

    def timed(n: int) -> tuple[float, list[int]]:
        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
        t0, c0 = time.perf_counter(), time.process_time()
        out = llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        cpu[n].append(time.process_time() - c0)
        got = list(out[0].outputs[0].token_ids)
        if len(got) != n:
            raise RuntimeError(f"decode: asked for {n} tokens with ignore_eos, got {len(got)}")
        return dt, got

    timed(1)
    _, generated = timed(tokens + 1)  # warm-up, and the greedy continuation shown in results.json
    for v in cpu.values():
        v.clear()
    first, full = [], []
    for _ in range(max(1, repeats)):
        full.append(timed(tokens + 1)[0])
        first.append(timed(1)[0])
    decode_s = min(full) - min(first)
    if decode_s <= 0:
        raise RuntimeError(f"decode: {tokens + 1} tokens took no longer than 1 ({min(full):.4f}s vs {min(first):.4f}s)")
    # process CPU seconds of the same calls (every thread of this process: the engine runs in it), for
    # reading the wall-clock numbers on a loaded machine; not used for tokens_per_s
    return {"tokens": tokens, "repeats": len(full), "seconds_first_token": first, "seconds_all_tokens": full,
            "cpu_seconds_first_token": cpu[1], "cpu_seconds_all_tokens": cpu[tokens + 1],
            "tokens_per_s": tokens / decode_s, "generated_ids": generated}


def run_child(spec: Mapping) -> dict:
    """The measurements of one engine (the child's work; vLLM imported here)."""
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    from vllm import LLM

    from ascend_quant.vllm_integration import register

    register()
    t_import = time.perf_counter() - t0
    kw = dict(dtype=spec["dtype"], enforce_eager=True, max_model_len=spec["max_model_len"], max_num_seqs=16,
              seed=0, gpu_memory_utilization=0.5)
    if spec["quantization"]:
        kw["quantization"] = spec["quantization"]
    t1 = time.perf_counter()
    llm = LLM(model=spec["model_dir"], **kw)
    t_engine = time.perf_counter() - t1
    t1 = time.perf_counter()
    targets, top1 = _prompt_logprobs(llm, spec["windows"]) if spec["windows"] else ([], [])
    t_logprobs = time.perf_counter() - t1
    t1 = time.perf_counter()
    decode = _decode_speed(llm, spec["decode_prompt"], spec["decode_tokens"], spec["decode_repeats"])
    t_decode = time.perf_counter() - t1
    import vllm

    return {
        "target_logprobs": targets, "top1": top1, "decode": decode,
        "seconds": {"import": t_import, "engine": t_engine, "prompt_logprobs": t_logprobs, "decode": t_decode},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "vllm_version": getattr(vllm, "__version__", "unknown"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -P -m ascend_quant.evaluation.vllm_measurement SPEC.json RESULT.json", file=sys.stderr)
        return 2
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run_child(spec)
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
