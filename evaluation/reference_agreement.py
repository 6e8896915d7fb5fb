"""Agreement of vLLM with the independent reference forward, teacher-forced on held-out windows.

The reference forward is :func:`ascend_quant.checkpoint.reference_model.load_reference_model`:
Hugging Face transformers with the NumPy reference (the specification) in every quantized layer,
reading the checkpoint from disk independently of vLLM's loaders, and with vLLM-CPU's rounding
points for the unquantized ops of bf16/fp16 models. For the float model the same loader runs on
an all-FLOAT description of its tensors (no quantized layer), so the float row measures the floor:
how far vLLM and transformers differ on the unquantized ops alone.

Both sides see the same token windows (teacher forcing: the input at every position is the true
text, never a generated token, so one early difference does not derail the rest). Per predicted
position (every token of a window after the first):

* **top-1 agreement**: the fraction of positions where vLLM's most likely next token equals the
  reference's (``argmax`` of its logits);
* **max |Δlogprob|** and **mean |Δlogprob|**: over the same positions, of
  ``|log p_vLLM(true next token) − log p_ref(true next token)|`` (natural log);
* the perplexity of each side on these windows (:func:`.perplexity.perplexity_from_logprobs`).

For an integer algorithm the quantized layers are bit-exact given the same inputs (docs/numerics.md
§1); what remains are the float ops both sides compute in a different order, amplified where an
activation code flips, so a top-1 mismatch is expected only at near-ties.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .perplexity import perplexity_from_logprobs

__all__ = ["Agreement", "compare_logprobs", "load_reference_forward", "reference_logprobs"]


@dataclass(frozen=True)
class Agreement:
    """vLLM against the reference forward on the same windows (see the module docstring)."""

    positions: int
    top1_matches: int
    max_abs_dlogprob: float
    mean_abs_dlogprob: float
    ppl_vllm: float
    ppl_reference: float

    @property
    def top1_agreement(self) -> float:
        return self.top1_matches / self.positions

    def to_json(self) -> dict:
        return {**asdict(self), "top1_agreement": self.top1_agreement}


def compare_logprobs(vllm_targets: Sequence[Sequence[float]], vllm_top1: Sequence[Sequence[int]],
                     reference_rows: Sequence[np.ndarray], windows: Sequence[Sequence[int]]) -> Agreement:
    """Compare per window ``w`` and position ``i`` (predicting token ``windows[w][i+1]``): vLLM's
    logprob of that token ``vllm_targets[w][i]`` and its argmax ``vllm_top1[w][i]`` with the
    reference's log-probability row ``reference_rows[w][i]`` (``[vocab]``, natural log).

    The vocabulary of the reference rows is the model's; a vLLM argmax outside it (vLLM pads some
    vocabularies) counts as a mismatch. Lengths that disagree are an error naming the window."""
    if not (len(vllm_targets) == len(vllm_top1) == len(reference_rows) == len(windows)):
        raise ValueError(f"compare_logprobs: {len(vllm_targets)} vLLM target rows, {len(vllm_top1)} top-1 rows, "
                         f"{len(reference_rows)} reference rows for {len(windows)} windows")
    matches, positions, max_d, sum_d = 0, 0, 0.0, 0.0
    ref_targets = []
    for w, (targets, top1, rows, window) in enumerate(zip(vllm_targets, vllm_top1, reference_rows, windows)):
        rows = np.asarray(rows)
        n = len(window) - 1
        if len(targets) != n or len(top1) != n or rows.shape[0] != n:
            raise ValueError(f"window {w}: {len(window)} tokens predict {n}, got {len(targets)} vLLM logprobs, "
                             f"{len(top1)} vLLM top-1 tokens and {rows.shape[0]} reference rows")
        ref_best = np.argmax(rows, axis=-1)
        ref_t = []
        for i in range(n):
            ref_lp = float(rows[i, window[i + 1]])
            d = abs(float(targets[i]) - ref_lp)
            if not math.isfinite(d):
                raise ValueError(f"window {w}, position {i}: non-finite logprob (vLLM {targets[i]!r}, "
                                 f"reference {ref_lp!r})")
            max_d = max(max_d, d)
            sum_d += d
            matches += int(int(top1[i]) == int(ref_best[i]))
            positions += 1
            ref_t.append(ref_lp)
        ref_targets.append(ref_t)
    if positions == 0:
        raise ValueError("compare_logprobs: no predicted positions")
    return Agreement(positions, matches, max_d, sum_d / positions,
                     perplexity_from_logprobs(vllm_targets)[0], perplexity_from_logprobs(ref_targets)[0])


def load_reference_forward(model_dir: str | os.PathLike, *, dtype: str):
    """The reference forward of ``model_dir``: :func:`load_reference_model` for a quantized
    directory (one holding ``quant_model_description.json``), the same loader on an all-FLOAT
    description of the float model's own tensors otherwise."""
    from ascend_quant.checkpoint.description import DESCRIPTION_FILE, QuantDescription
    from ascend_quant.checkpoint.io import QuantizedCheckpoint, float_entries, read_safetensors
    from ascend_quant.checkpoint.reference_model import load_reference_model

    model_dir = os.fspath(model_dir)
    if os.path.isfile(os.path.join(model_dir, DESCRIPTION_FILE)):
        return load_reference_model(model_dir, dtype=dtype)
    import json

    tensors: dict[str, np.ndarray] = {}
    files = sorted(fn for fn in os.listdir(model_dir) if fn.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    for fn in files:
        tensors.update(read_safetensors(os.path.join(model_dir, fn)))
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    desc = QuantDescription.from_dict({"model_quant_type": "FLOAT", **float_entries(tensors)},
                                      source=f"{model_dir} (all-FLOAT description)")
    return load_reference_model(QuantizedCheckpoint(model_dir, desc, tensors, config), dtype=dtype)


def reference_logprobs(model, windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per window, the reference's natural-log probabilities ``[len(window) − 1, vocab]``
    (float32 log-softmax of float32 logits) of every position that predicts a token."""
    import torch

    rows = []
    with torch.no_grad():
        for window in windows:
            logits = model(torch.tensor([list(window)], dtype=torch.long)).logits[0, :-1].to(torch.float32)
            rows.append(torch.log_softmax(logits, dim=-1).numpy())
    return rows
