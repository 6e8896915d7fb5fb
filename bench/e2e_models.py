"""The mid-size random models of the end-to-end decode benchmark, built once and cached.

Issue 6 asks for vLLM decode throughput of "a mid-size random model (hidden 2048, 8 layers, a
dense and a MoE variant)". :data:`SPECS` holds them:

* ``dense``: Llama with TinyLlama-1.1B's layer shapes (hidden 2048, 32 query heads of 64, 4 KV
  heads, intermediate 5632), 8 layers: 352 M parameters, 705 MB in bf16;
* ``moe``: Qwen3-MoE with the same attention and 8 experts, top-2, ``moe_intermediate`` 1408
  (the expert shape of bench/test_bench_moe.py and of Qwen1.5-MoE-A2.7B), 8 layers: 629 M
  parameters, 1.26 GB in bf16;
* ``dense-small`` / ``moe-small``: hidden 256, 2 layers, to try the machinery in seconds.

Weights are N(0, 0.02^2) from a fixed seed, norms 1, stored in bfloat16 (the dtype the
benchmark runs in). The vocabulary is the 400-token byte-level BPE tokenizer that
tests/vllm_integration/tiny_models.py trains in-process (no download): the lm_head, which every
quantization recipe keeps in float, is then negligible and the decode step is the decoder
layers, which is what the quantized algorithms change.

Quantized variants are written by ``checkpoint.quantize_model.quantize_model`` (the project's
quantizer without calibration: W8A8_DYNAMIC and W4A8_DYNAMIC need none; per-channel weights,
msModelSlim's default), MoE experts with the same algorithm, router and lm_head float.

Cache: ``$AQ_E2E_CACHE`` (default ``~/.cache/ascend-quant/bench-e2e``). A float model is keyed
by its spec, a quantized one also by a hash of the quantizer's source files, so editing the
quantizer re-quantizes and nothing stale is measured. Directories are written under a
temporary name and renamed when complete: an interrupted build is never taken for a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SPECS", "ModelSpec", "cache_root", "float_model", "quantized_model"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMPLETE = "aq_bench_model.json"     # written last: the directory is complete


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of one random benchmark model (Hugging Face config fields)."""

    name: str
    arch: str                   # "llama" or "qwen3_moe"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int           # dense MLP (llama)
    experts: int = 0            # qwen3_moe
    top_k: int = 0
    moe_intermediate: int = 0
    vocab: int = 400
    seed: int = 0
    std: float = 0.02

    @property
    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:12]}"

    def layer_params(self) -> dict[str, int]:
        """Parameters per decoder layer: attention, dense MLP or experts (all of them), router."""
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2
        if self.arch == "llama":
            return {"attention": attn, "mlp": 3 * h * self.intermediate}
        return {"attention": attn, "experts": self.experts * 3 * h * self.moe_intermediate,
                "router": self.experts * h}


_ATTN = dict(hidden=2048, heads=32, kv_heads=4, head_dim=64)
SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("dense", "llama", layers=8, intermediate=5632, **_ATTN),
    ModelSpec("moe", "qwen3_moe", layers=8, intermediate=5632, experts=8, top_k=2, moe_intermediate=1408, **_ATTN),
    ModelSpec("dense-small", "llama", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512),
    ModelSpec("moe-small", "qwen3_moe", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512,
              experts=8, top_k=2, moe_intermediate=128),
)}


def cache_root() -> Path:
    env = os.environ.get("AQ_E2E_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ascend-quant" / "bench-e2e"


def _say(msg: str) -> None:
    print(f"[e2e-models] {msg}", file=sys.stderr, flush=True)


def _tiny_models():
    """tests/vllm_integration/tiny_models.py (its in-process tokenizer), loaded by path: bench/
    and tests/ are not packages."""
    path = ROOT / "tests" / "vllm_integration" / "tiny_models.py"
    spec = importlib.util.spec_from_file_location("ascend_quant_bench_tiny_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _complete(d: Path) -> bool:
    return (d / COMPLETE).is_file()


def _publish(tmp: Path, final: Path, info: dict) -> Path:
    (tmp / COMPLETE).write_text(json.dumps(info, indent=1) + "\n")
    if final.exists():            # a concurrent build finished first: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def _tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def float_model(spec: ModelSpec | str) -> Path:
    """The bf16 Hugging Face directory of ``spec`` (built on first use, ~1 min for ``moe``)."""
    spec = SPECS[spec] if isinstance(spec, str) else spec
    final = cache_root() / spec.key / "bf16"
    if _complete(final):
        return final
    import torch
    import transformers

    t0 = time.perf_counter()
    _say(f"building {spec.name} ({spec.arch}, random weights, seed {spec.seed}) in {final}")
    tmp = _tmp_dir(final)
    tok = _tiny_models().build_tokenizer(str(tmp), vocab_size=spec.vocab)
    common = dict(vocab_size=len(tok), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                  intermediate_size=spec.intermediate, max_position_embeddings=4096, tie_word_embeddings=False,
                  rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if spec.arch == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif spec.arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=spec.moe_intermediate, num_experts=spec.experts,
                                          num_experts_per_tok=spec.top_k, decoder_sparse_step=1, mlp_only_layers=[],
                                          norm_topk_prob=True, **common)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise ValueError(f"{spec.name}: unknown arch {spec.arch!r}")
    cfg.dtype = "bfloat16"                        # config.json "dtype" (transformers 5's name)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)      # built in bf16: half the memory, no copy
    try:
        model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * spec.std)
    model.save_pretrained(str(tmp))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    info = {"spec": dataclasses.asdict(spec), "params": n_params, "build_s": round(time.perf_counter() - t0, 1)}
    _say(f"{spec.name}: {n_params / 1e6:.0f} M parameters in {info['build_s']} s")
    return _publish(tmp, final, info)


def _quantizer_hash() -> str:
    """Hash of the source of the modules that decide the quantized tensors."""
    from ascend_quant.checkpoint import description, io, quantize_model
    from ascend_quant.reference import algorithms, packing, rounding, scale_encoding, weight_quant

    h = hashlib.sha256()
    for mod in (quantize_model, io, description, algorithms, packing, rounding, scale_encoding, weight_quant):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def quantized_model(spec: ModelSpec | str, algo: str) -> Path:
    """``spec`` quantized with ``algo`` in msModelSlim's layout (built on first use)."""
    from ascend_quant.checkpoint.quantize_model import QuantRecipe, quantize_model

    spec = SPECS[spec] if isinstance(spec, str) else spec
    src = float_model(spec)
    final = cache_root() / spec.key / f"{algo}-{_quantizer_hash()}"
    if _complete(final):
        return final
    t0 = time.perf_counter()
    _say(f"quantizing {spec.name} with {algo} into {final}")
    tmp = _tmp_dir(final)
    quantize_model(str(src), str(tmp), QuantRecipe(algo), overwrite=True)
    info = {"spec": dataclasses.asdict(spec), "algo": algo, "source": str(src),
            "quantize_s": round(time.perf_counter() - t0, 1)}
    _say(f"{spec.name} {algo}: quantized in {info['quantize_s']} s")
    return _publish(tmp, final, info)
