"""End-to-end comparison of vLLM (``quantization="ascend"``) with the independent reference forward.

:func:`run_vllm` generates greedy tokens and their logprobs with vLLM; :func:`compare_with_reference`
teacher-forces the same prompt + generated tokens through ``checkpoint.reference_model`` (HF
transformers with the NumPy reference in every quantized layer) and compares, per generated
position, vLLM's token with the reference's argmax and vLLM's logprob with the reference's.

Loaded by tests/vllm_integration/conftest.py (importlib, like tests/checkpoint_fixtures.py).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

#: What the tests set before vLLM is imported (vllm-cpu-platform-notes.md "Running offline, fast").
VLLM_TEST_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

MAX_TOKENS = 12


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str = ""


@dataclass
class Comparison:
    """Per-run result: tokens equal, worst |Δlogprob|, and where they differ."""

    algo: str
    dtype: str
    max_abs_dlogprob: float = 0.0
    positions: int = 0
    max_abs_logit: float = 0.0
    deltas: list[float] = field(default_factory=list)

    @property
    def median_abs_dlogprob(self) -> float:
        d = sorted(self.deltas)
        return d[len(d) // 2] if d else 0.0
    token_mismatches: list[tuple[int, int, int, int, float]] = field(default_factory=list)
    """(prompt index, position, vLLM token, reference argmax, reference logprob gap between them)"""

    @property
    def tokens_equal(self) -> bool:
        return not self.token_mismatches

    def near_ties_only(self, bound: float) -> bool:
        """Every token mismatch is a near-tie: the reference prefers its argmax over vLLM's token by at
        most ``2 * bound`` (two logprobs each within ``bound`` can swap order only then)."""
        return all(gap <= 2 * bound for *_, gap in self.token_mismatches)

    def summary(self) -> str:
        return (f"{self.algo} {self.dtype}: {self.positions} positions, max|dlogprob|={self.max_abs_dlogprob:.3g}, "
                f"median {self.median_abs_dlogprob:.3g}, "
                f"max|logit|={self.max_abs_logit:.3g}, token mismatches={self.token_mismatches}")


def llm_kwargs(dtype: str, **extra) -> dict:
    kw = dict(quantization="ascend", dtype=dtype, enforce_eager=True, max_model_len=128, max_num_seqs=4,
              seed=0, gpu_memory_utilization=0.5)
    kw.update(extra)
    return kw


def run_vllm(model_dir: str, prompts: list[str], *, dtype: str, max_tokens: int = MAX_TOKENS,
             **extra) -> list[Generation]:
    """Greedy generation with vLLM; one engine, released before returning."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), **llm_kwargs(dtype, **extra))
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0),
                            use_tqdm=False)
        gens = []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            logprobs = [c.logprobs[i][t].logprob for i, t in enumerate(toks)]
            gens.append(Generation(list(o.prompt_token_ids), toks, logprobs, c.text))
        return gens
    finally:
        del llm
        gc.collect()


def compare_with_reference(model_dir: str, gens: list[Generation], *, algo: str, dtype: str,
                           tp_size: int = 1) -> Comparison:
    """Teacher-force each prompt + vLLM's tokens through the reference model and compare."""
    import torch

    from ascend_quant.checkpoint.reference_model import load_reference_model

    model = load_reference_model(model_dir, dtype=dtype, tp_size=tp_size)
    result = Comparison(algo, dtype)
    for pi, g in enumerate(gens):
        ids = g.prompt_ids + g.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].to(torch.float32)
        logp = torch.log_softmax(logits, dim=-1)
        result.max_abs_logit = max(result.max_abs_logit, float(logits[len(g.prompt_ids) - 1:].abs().max()))
        for i, tok in enumerate(g.token_ids):
            row = logp[len(g.prompt_ids) - 1 + i]
            result.positions += 1
            delta = abs(float(row[tok]) - g.logprobs[i])
            result.deltas.append(delta)
            result.max_abs_dlogprob = max(result.max_abs_dlogprob, delta)
            best = int(row.argmax())
            if best != tok:
                result.token_mismatches.append((pi, i, tok, best, float(row[best] - row[tok])))
    return result


def set_test_env() -> None:
    for k, v in VLLM_TEST_ENV.items():
        os.environ.setdefault(k, v)


# ---------------------------------------------------------------------------------------
# layer level: what vLLM fed each quantized layer, and what the reference makes of it
# ---------------------------------------------------------------------------------------

@dataclass
class LayerRecord:
    kind: str            # "linear" or "moe"
    prefix: str
    algo: str
    inputs: tuple        # linear: (x, bias); moe: (x, topk_weights, topk_ids)
    output: object       # torch tensor
    add_quant_bias: bool = True


class capture_quantized_io:
    """Context manager recording the first ``per_layer`` calls of every ascend linear / MoE method
    (in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, TP 1). Patches our own classes only."""

    def __init__(self, per_layer: int = 2):
        self.per_layer = per_layer
        self.records: list[LayerRecord] = []
        self._count: dict[str, int] = {}

    def _keep(self, prefix: str) -> bool:
        n = self._count.get(prefix, 0)
        self._count[prefix] = n + 1
        return n < self.per_layer

    def __enter__(self):
        from vllm.model_executor.layers.linear import RowParallelLinear

        from ascend_quant.vllm_integration.linear_method import AscendLinearMethod
        from ascend_quant.vllm_integration.moe_method import AscendFusedMoEMethod

        self._orig = (AscendLinearMethod.apply, AscendFusedMoEMethod.apply)
        orig_linear, orig_moe = self._orig
        rec = self

        def linear_apply(method, layer, x, bias=None):
            y = orig_linear(method, layer, x, bias)
            if rec._keep(method.prefix):
                row_rank = isinstance(layer, RowParallelLinear) and getattr(layer, "tp_rank", 0) > 0
                rec.records.append(LayerRecord("linear", method.prefix, method.algo,
                                               (x.detach().clone(), None if bias is None else bias.detach().clone()),
                                               y.detach().clone(), add_quant_bias=not row_rank))
            return y

        def moe_apply(method, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            y = orig_moe(method, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
            if rec._keep(method.prefix):
                rec.records.append(LayerRecord("moe", method.prefix, method.algo,
                                               (x.detach().clone(), topk_weights.detach().clone(),
                                                topk_ids.detach().clone()), y.detach().clone()))
            return y

        AscendLinearMethod.apply = linear_apply
        AscendFusedMoEMethod.apply = moe_apply
        return self

    def __exit__(self, *exc):
        from ascend_quant.vllm_integration.linear_method import AscendLinearMethod
        from ascend_quant.vllm_integration.moe_method import AscendFusedMoEMethod

        AscendLinearMethod.apply, AscendFusedMoEMethod.apply = self._orig
        return False


def _np(t):
    import ml_dtypes
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@dataclass
class LayerCheck:
    prefix: str
    algo: str
    elements: int
    mismatches: int       # elements not bit-identical
    max_abs: float
    max_ratio: float      # max |dy| / bound (weight-only), 0 for exact algorithms
    ref_max: float = 0.0  # max |y_ref|


def check_layers(model_dir: str, records: list[LayerRecord], *, dtype: str, model_type: str) -> list[LayerCheck]:
    """Recompute every recorded layer call with the NumPy reference from the checkpoint on disk (read
    independently of vLLM: shards split by the description, not by vLLM's loaders)."""
    import numpy as np

    from ascend_quant.checkpoint.description import packed_modules_for
    from ascend_quant.checkpoint.io import read_quantized_model
    from ascend_quant.reference.linear import linear_forward
    from ascend_quant.reference.moe import moe_forward
    from ascend_quant.reference.rounding import model_dtype
    import torch

    ckpt = read_quantized_model(model_dir)
    desc = ckpt.description
    packed = packed_modules_for(model_type)
    dt = model_dtype(dtype)
    g = desc.group_size or None
    out: list[LayerCheck] = []
    for r in records:
        y = _np(r.output).astype(np.float64)
        if r.kind == "linear":
            x, bias = r.inputs
            shards = desc.shard_prefixes(r.prefix, packed) or [r.prefix]
            parts = []
            for s in shards:
                t = {k: v for k, v in ckpt.module_tensors(s).items() if k != "bias"}
                b = None
                if bias is not None and f"{s}.bias" in ckpt.tensors:
                    b = np.asarray(ckpt.tensors[f"{s}.bias"]).astype(np.float32)
                parts.append(linear_forward(r.algo, _np(x), t, dtype=dt, bias=b, group_size=g,
                                            add_quant_bias=r.add_quant_bias))
            ref = np.concatenate(parts, axis=-1).astype(np.float64)
            y = y[..., : ref.shape[-1]]  # lm_head: vLLM pads the vocabulary
            bound_ratio = 0.0
            if r.algo in ("W8A16", "W4A16"):
                from ascend_quant.reference.weight_quant import dequantize

                w = np.concatenate([dequantize(r.algo, {k: v for k, v in ckpt.module_tensors(s).items()
                                                        if k != "bias"}, group_size=g or 0) for s in shards])
                bound = weight_only_bound(_np(x).astype(np.float64), w, dtype)
                bound_ratio = float((np.abs(y - ref) / bound).max()) if y.size else 0.0
            mism = int((y != ref).sum())
            out.append(LayerCheck(r.prefix, r.algo, int(y.size), mism, float(np.abs(y - ref).max()), bound_ratio,
                                  float(np.abs(ref).max())))
        else:
            x, w, ids = r.inputs
            ids_np = ids.cpu().numpy()
            experts = []
            for e in desc.expert_ids(r.prefix):
                experts.append({p: {k: v for k, v in ckpt.module_tensors(f"{r.prefix}.{e}.{p}").items() if k != "bias"}
                                for p in ("gate_proj", "up_proj", "down_proj")})
            ref = moe_forward(r.algo, _np(x), experts, _np(w.float()), ids_np, dtype=dt, group_size=g)
            ref = ref.astype(np.float64)
            out.append(LayerCheck(r.prefix, r.algo, int(y.size), int((y != ref).sum()),
                                  float(np.abs(y - ref).max()), 0.0, float(np.abs(ref).max())))
    return out


def _ulp(v, dtype: str):
    """Spacing of ``dtype`` (float32 or bfloat16) at magnitude ``v`` (normal range, subnormal floor)."""
    import numpy as np

    mant = 7 if dtype == "bfloat16" else 23
    e = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-126)))
    return 2.0 ** (e - mant)


def weight_only_bound(x, w, dtype: str):
    """Elementwise bound of ``optimized/weight_only.py`` (its module docstring), taken for the
    loosest kernel the CPU auto rule may pick for this dtype (W8A16/W4A16 are float stages):
    ``delta + 2 ulp_dt(2 S + delta)``, ``delta = (rel_w + (K + 3) 2^-24 1.01) S + (2K+4) 2^-150
    + (K+1) 2^-126`` with ``S = |x| @ |w|^T`` (the bias is added exactly on both sides' last
    float32 op and is below the ulp term here), ``rel_w = 2^-9`` for bfloat16 (weights rounded to
    bf16 by the bf16 GEMM kernel), ``2^-24`` for float32."""
    import numpy as np

    k = x.shape[1]
    s_abs = np.abs(x) @ np.abs(w).T
    rel_w = 2.0**-9 if dtype == "bfloat16" else 2.0**-24
    delta = (rel_w + (k + 3) * 2.0**-24 * 1.01) * s_abs + (2 * k + 4) * 2.0**-150 + (k + 1) * 2.0**-126
    return delta + 2 * _ulp(2 * s_abs + delta, dtype)


def generations_to_json(gens: list[Generation]) -> list[dict]:
    return [g.__dict__ for g in gens]


def generations_from_json(data: list[dict]) -> list[Generation]:
    return [Generation(**d) for d in data]


#: float32 model-level bounds (see test_e2e_dense.py's module docstring for the derivation).
FP32_MEDIAN_BOUND = 1e-4
FP32_FLIP_BOUND = {8: 0.1, 4: 1.0, 0: 5e-3}
ACTIVATION_BITS = {"W8A8": 8, "W8A8_DYNAMIC": 8, "W8A8_MIX": 8, "W4A8_DYNAMIC": 8, "W4A4_DYNAMIC": 4,
                   "W4A4_FLATQUANT_DYNAMIC": 4, "W8A16": 0, "W4A16": 0}


def fp32_bound(algos) -> float:
    """The float32 max-|dlogprob| bound of a model whose quantized layers use ``algos``."""
    return max(FP32_FLIP_BOUND[ACTIVATION_BITS[a]] for a in algos)


def assert_fp32(result: Comparison, algos) -> None:
    bound = fp32_bound(algos)
    assert result.tokens_equal, result.summary()
    assert result.median_abs_dlogprob <= FP32_MEDIAN_BOUND, result.summary()
    assert result.max_abs_dlogprob <= bound, f"bound {bound}: " + result.summary()
