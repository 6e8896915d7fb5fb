"""Tiny random models with an in-process tokenizer, for offline vLLM tests (no downloads).

``build_tiny_model(out_dir, arch)`` writes a float32 Hugging Face model directory (config.json,
model.safetensors, tokenizer files): a byte-level BPE tokenizer trained on a few sentences
(vocab ~400) and random weights from a fixed seed. ``arch``: "llama", "qwen2" (q/k/v biases)
or "qwen3_moe" (4 experts, top-2). Hidden size 128, 2 layers, 4 heads of 32 (2 KV heads; vLLM's
CPU attention needs head_dim >= 32).
"""

from __future__ import annotations

import os

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "vLLM Ascend quantizes weights and activations to int8 and int4.",
    "msModelSlim writes a quant model description next to the safetensors shards.",
    "A tiny model with random weights still produces deterministic greedy tokens.",
    "Per-token dynamic quantization scales each row by its maximum absolute value.",
    "Static quantization uses a calibrated input scale and an integer offset.",
    "Mixture of experts layers route every token to the top two experts.",
    "Hello world! 0123456789 + - * / = ( ) [ ] { } < > , . ; : ? ' \"",
]

PROMPTS = [
    "The quick brown fox",
    "Mixture of experts layers",
    "Static quantization uses",
]


def build_tokenizer(out_dir: str, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: str, arch: str = "llama", *, seed: int = 0, hidden: int = 128, layers: int = 2,
                     lm_head_scale: float = 6.0) -> str:
    """Write a float32 tiny model to ``out_dir``; returns ``out_dir``.

    ``lm_head_scale`` multiplies the random lm_head so greedy choices have clear margins (the
    tests compare greedy tokens; near-ties would make them depend on float rounding).
    """
    import torch
    import transformers

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                  initializer_range=0.08, tie_word_embeddings=False, rms_norm_eps=1e-6,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = transformers.LlamaConfig(intermediate_size=2 * hidden, **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(intermediate_size=2 * hidden, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                                          num_experts=4,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                          norm_topk_prob=True, **common)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:  # biases
                p.normal_(0.0, 0.05)
        model.lm_head.weight.mul_(lm_head_scale)
    model.save_pretrained(out_dir)
    return out_dir
