"""The demo's run: every algorithm ID on one float model, quantized, validated and measured through vLLM.

For the float model and then for each algorithm ID (:func:`run_comparison`):

1. **quantize** with :func:`ascend_quant.checkpoint.convert.quantize_directory`, the code path of
   ``ascend-quant quantize`` with its defaults (built-in calibration text, 8 windows of 256
   tokens; FlatQuant calibrated with its default Adam steps unless ``flatquant_steps`` says
   otherwise) into ``<out>/checkpoints/<ID>``;
2. **validate** with :func:`ascend_quant.checkpoint.validate.validate_checkpoint` (what
   ``ascend-quant inspect`` runs);
3. **measure through vLLM** (``quantization="ascend"``; the float model on vLLM's own unquantized
   path) in a child process (:mod:`.vllm_measurement`): prompt logprobs on the held-out windows
   (perplexity, :mod:`.perplexity`) and batch-1 decode speed;
4. **compare with the reference forward** on the first ``agreement_windows`` windows
   (:mod:`.reference_agreement`).

A failure in one algorithm (quantization, validation, vLLM) becomes that row's ``error`` and the
run goes on; a failure of the float model (the baseline of every ratio) ends the run.
Sizes, perplexity and speed are also given relative to the float model's of the same run; the float
model's decode speed is measured a second time at the end (decode only) and the faster of its two
measurements is the speed baseline, so that load drifting over a long run on a shared machine does
not favour the algorithms measured while it was high.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .perplexity import perplexity_from_logprobs, text_windows
from .reference_agreement import compare_logprobs, load_reference_forward, reference_logprobs
from .results_table import COLUMN_DEFINITIONS
from .vllm_measurement import DEFAULT_TIMEOUT_S, measure_with_vllm

__all__ = ["ComparisonOptions", "run_comparison", "weight_bytes"]

#: Decode prompt: this many tokens from the start of the held-out text.
DECODE_PROMPT_TOKENS = 16


@dataclass
class ComparisonOptions:
    """What :func:`run_comparison` does; the defaults are the full demo, :meth:`quick` the smoke test."""

    model_dir: str
    out_dir: str
    algorithms: Sequence[str]
    text_path: str | None = None          # default: <model_dir>/heldout.txt
    seq: int = 128                        # window length of scripts/eval_perplexity.py
    ppl_windows: int | None = None        # None: the whole held-out text
    agreement_windows: int = 4
    decode_tokens: int = 64
    decode_repeats: int = 5
    flatquant_steps: int | None = None    # None: quantize's default
    timeout_s: float = DEFAULT_TIMEOUT_S
    quick: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick_options(cls, **kw) -> ComparisonOptions:
        """Smoke-test settings: 8 perplexity windows (1,024 tokens), 2 agreement windows, 16 decode
        tokens x 2, FlatQuant without Adam steps (initialization and clip search only)."""
        base = dict(ppl_windows=8, agreement_windows=2, decode_tokens=16, decode_repeats=2, flatquant_steps=0,
                    quick=True)
        base.update(kw)
        return cls(**base)


def weight_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of the ``*.safetensors`` files directly in ``model_dir`` (what is on disk)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def _model_dtype(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    text = cfg.get("text_config") or cfg
    dt = str(text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return dt.replace("torch.", "")


def _token_ids(model_dir: str, text: str) -> list[int]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum": we cut windows ourselves
    return AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]


def _measure(name: str, model_dir: str, quantization: str | None, opts: ComparisonOptions, dtype: str,
             windows, agree, decode_prompt, say: Callable[[str], None]) -> dict:
    """vLLM measurements and reference agreement of one model directory -> the row's fields."""
    t0 = time.perf_counter()
    res = measure_with_vllm(model_dir, quantization=quantization, dtype=dtype, windows=windows,
                            decode_prompt=decode_prompt, decode_tokens=opts.decode_tokens,
                            decode_repeats=opts.decode_repeats, work_dir=Path(opts.out_dir) / "logs", name=name,
                            timeout_s=opts.timeout_s)
    t_vllm = time.perf_counter() - t0
    ppl, n = perplexity_from_logprobs(res["target_logprobs"])
    decode = res["decode"]
    say(f"vLLM: ppl {ppl:.2f} over {n} tokens, decode {decode['tokens_per_s']:.1f} tok/s ({t_vllm:.0f}s)")
    t0 = time.perf_counter()
    model = load_reference_forward(model_dir, dtype=dtype)
    rows = reference_logprobs(model, agree)
    del model
    gc.collect()
    k = len(agree)
    agreement = compare_logprobs(res["target_logprobs"][:k], res["top1"][:k], rows, agree)
    t_ref = time.perf_counter() - t0
    say(f"reference forward: top-1 agreement {100 * agreement.top1_agreement:.1f}% of {agreement.positions} "
        f"positions, max |dlogprob| {agreement.max_abs_dlogprob:.3g} ({t_ref:.0f}s)")
    return {
        "ppl": ppl, "ppl_tokens": n, "agreement": agreement.to_json(),
        "decode_tokens_per_s": decode["tokens_per_s"], "decode": decode,
        "seconds": {"vllm_child": t_vllm, **{f"vllm_{k}": v for k, v in res["seconds"].items()}, "reference": t_ref},
        "loadavg": {"start": res["loadavg_start"], "end": res["loadavg_end"]},
        "vllm_version": res["vllm_version"],
    }


def run_comparison(opts: ComparisonOptions, say: Callable[[str], None] = print) -> dict:
    """Run the comparison (module docstring) and return the ``results.json`` document."""
    from ascend_quant.checkpoint.convert import quantize_directory
    from ascend_quant.checkpoint.validate import validate_checkpoint

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    model_dir = os.fspath(opts.model_dir)
    text_path = opts.text_path or os.path.join(model_dir, "heldout.txt")
    if not os.path.isfile(text_path):
        raise FileNotFoundError(f"{text_path}: held-out text not found (give one with --text FILE)")
    text = Path(text_path).read_text(encoding="utf-8")
    dtype = _model_dtype(model_dir)
    ids = _token_ids(model_dir, text)
    windows = text_windows(ids, opts.seq, opts.ppl_windows)
    if not windows:
        raise ValueError(f"{text_path}: too short for one window of {opts.seq} tokens")
    agree = windows[: max(1, opts.agreement_windows)]
    decode_prompt = ids[:DECODE_PROMPT_TOKENS]
    total = 1 + len(opts.algorithms)
    say(f"[demo] {model_dir} ({dtype}): held-out {sum(len(w) - 1 for w in windows)} predicted tokens in "
        f"{len(windows)} window(s) of {opts.seq}; agreement on {len(agree)} window(s); decode {opts.decode_tokens} "
        f"tokens, best of {opts.decode_repeats}; {total} models through vLLM")
    logs = Path(opts.out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def progress(i: int, name: str) -> Callable[[str], None]:
        return lambda msg: say(f"[demo {i}/{total}] {name}: {msg}")

    float_bytes = weight_bytes(model_dir)
    float_row = {"algorithm": "float", "kind": "float", "model_dir": model_dir, "weight_bytes": float_bytes,
                 "size_ratio": 1.0}
    float_row.update(_measure("float", model_dir, None, opts, dtype, windows, agree, decode_prompt,
                              progress(1, f"float ({dtype})")))
    float_row["ppl_ratio"] = 1.0
    rows = [float_row]

    for i, algo in enumerate(opts.algorithms, start=2):
        say_i = progress(i, algo)
        row: dict = {"algorithm": algo, "kind": "quantized", "model_dir": str(Path(opts.out_dir) / "checkpoints" / algo)}
        try:
            t0 = time.perf_counter()
            log_path = logs / f"{algo}.quantize.log"
            with open(log_path, "w", encoding="utf-8") as qlog:
                quantize_directory(model_dir, row["model_dir"], algo, overwrite=True, progress=False,
                                   flatquant_steps=opts.flatquant_steps,
                                   log=lambda m: (qlog.write(m + "\n"), qlog.flush()))
            t_q = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = validate_checkpoint(row["model_dir"], raise_errors=True)
            t_v = time.perf_counter() - t0
            row["weight_bytes"] = weight_bytes(row["model_dir"])
            row["size_ratio"] = row["weight_bytes"] / float_bytes
            row["tensor_bytes"] = report.total_bytes
            row["tensor_bytes_bf16"] = report.total_bf16_bytes
            say_i(f"quantized ({t_q:.1f}s), valid ({t_v:.1f}s), {row['weight_bytes'] / 2**20:.2f} MiB "
                  f"= {row['size_ratio']:.3f} x float")
            row.update(_measure(algo, row["model_dir"], "ascend", opts, dtype, windows, agree, decode_prompt, say_i))
            row["seconds"].update(quantize=t_q, validate=t_v)
            row["ppl_ratio"] = row["ppl"] / float_row["ppl"]
        except Exception as e:  # one algorithm's failure is its row's error; the run goes on
            row["error"] = f"{type(e).__name__}: {e}"
            (logs / f"{algo}.error.log").write_text(traceback.format_exc(), encoding="utf-8")
            say_i(f"FAILED: {row['error'].splitlines()[0]} (details: {logs / (algo + '.error.log')})")
        rows.append(row)

    # The float model's decode speed once more, at the end: on a shared machine the load drifts over the
    # run, and the faster of the two float measurements is the baseline of every speed ratio (the same
    # least-disturbed-estimate rule as the best-of-repeats inside one measurement).
    def say_f(msg: str) -> None:
        say(f"[demo] float, decode speed again: {msg}")

    try:
        again = measure_with_vllm(model_dir, quantization=None, dtype=dtype, windows=[], decode_prompt=decode_prompt,
                                  decode_tokens=opts.decode_tokens, decode_repeats=opts.decode_repeats,
                                  work_dir=logs, name="float-decode-again", timeout_s=opts.timeout_s)
        float_row["decode_again"] = again["decode"]
        float_row["decode_tokens_per_s_runs"] = [float_row["decode_tokens_per_s"], again["decode"]["tokens_per_s"]]
        float_row["decode_tokens_per_s"] = max(float_row["decode_tokens_per_s_runs"])
        say_f(f"decode {again['decode']['tokens_per_s']:.1f} tok/s (start of the run: "
              f"{float_row['decode_tokens_per_s_runs'][0]:.1f}); baseline {float_row['decode_tokens_per_s']:.1f}")
    except RuntimeError as e:  # keep the first measurement as the baseline
        say_f(f"FAILED, keeping the first float measurement: {str(e).splitlines()[0]}")
    for row in rows:
        if not row.get("error"):
            row["speed_ratio"] = row["decode_tokens_per_s"] / float_row["decode_tokens_per_s"]

    recorded = None  # the float32 reference perplexity the model's training script recorded, same windows
    info = Path(model_dir) / "training_info.json"
    if opts.text_path is None and opts.ppl_windows is None and opts.seq == 128 and info.is_file():
        recorded = json.loads(info.read_text(encoding="utf-8")).get("heldout_ppl_float32_weights")
    return {
        "model": model_dir, "dtype": dtype, "heldout_text": text_path, "recorded_float32_ppl": recorded,
        "settings": {k: v for k, v in asdict(opts).items() if k not in ("extra",)},
        "heldout": {"tokens": len(ids), "windows": len(windows), "predicted_tokens": sum(len(w) - 1 for w in windows),
                    "agreement_windows": len(agree), "decode_prompt_tokens": len(decode_prompt)},
        "definitions": COLUMN_DEFINITIONS,
        "rows": rows,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "wall_seconds": time.perf_counter() - t_start,
        **opts.extra,
    }
