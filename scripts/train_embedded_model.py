#!/usr/bin/env python
"""Train the embedded default model: a small llama-architecture causal LM on CPython's stdlib.

    .venv/bin/python -P scripts/train_embedded_model.py [--out models/embedded-llama] [--steps N]

What it does, deterministically (fixed seed, one CPU thread, fixed step count):

1. Text: every ``.py`` file of the running interpreter's standard library
   (``sysconfig.get_paths()["stdlib"]``; ``site-packages``, test suites and IDLE tests excluded),
   sorted by relative path. A file goes to the held-out set when the first byte of the SHA-256 of
   its relative path is < 8 (about 3 %); the first held-out files in that order, up to ~20-24 KB, are
   written to ``heldout.txt``. Every other file is training text.
2. Tokenizer: byte-level BPE with ``tokenizers`` (vocab 2048, ``<|endoftext|>`` between files),
   trained in-process on the training text.
3. Model: ``LlamaForCausalLM`` with hidden 256, 4 layers, 4 heads (head_dim 64), intermediate 704,
   untied ``lm_head``. Every linear input width (256 and 704) is a multiple of 16 (W4A8 row-parallel
   ``scale_bias``) and of 4 (FlatQuant ``decompose_dim``: 256 -> (16, 16), 704 -> (22, 32)).
4. Training: AdamW (lr 3e-3, cosine decay, 50 warm-up steps), batches of 8 random windows of 128
   tokens, float32 on one thread (``torch.set_num_threads(1)``, leaving the other cores free).
5. Output (``--out``): ``config.json``, ``generation_config.json``, ``model.safetensors`` with the
   weights stored as **bfloat16** (8 MB instead of 17 MB), the tokenizer files and ``heldout.txt``.
   The held-out perplexity of the saved (bf16) weights, evaluated in float32, is printed.

The step count (default 900) was chosen to take about 8 minutes on one core of the machine it
was first run on; it is fixed (not a time budget) so that a rerun on the same stdlib reproduces
the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

SEED = 20260601
VOCAB = 2048
EOT = "<|endoftext|>"
HELDOUT_BYTES = 20_000
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for fn in filenames:
            if fn.endswith(".py"):
                rels.append(str((Path(dirpath) / fn).relative_to(root)))
    return root, sorted(rels)


def split_text(root: Path, rels: list[str]) -> tuple[list[str], str, list[str]]:
    """(training documents, held-out text, held-out file names)."""
    train, heldout, held_names = [], [], []
    size = 0
    for rel in rels:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if hashlib.sha256(rel.encode()).digest()[0] < 8:
            if size + len(text.encode()) <= HELDOUT_BYTES + 4_000:
                heldout.append(text)
                held_names.append(rel)
                size += len(text.encode())
            continue  # held-out files (used or not) are never trained on
        train.append(text)
    return train, "\n".join(heldout), held_names


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   pad_token=EOT, model_max_length=1024)


def perplexity(model, ids, seq: int = 256) -> float:
    import torch

    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq):
            chunk = ids[start:start + seq + 1]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk[:-1]])
            y = torch.tensor([chunk[1:]])
            logits = model(x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum")
            nll += float(loss)
            count += y.numel()
    return math.exp(nll / count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models" / "embedded-llama"))
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps and exit")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    root, rels = stdlib_files()
    docs, heldout, held_names = split_text(root, rels)
    print(f"[data] {root}: {len(docs)} training files ({sum(map(len, docs)) / 1e6:.1f} MB), "
          f"{len(held_names)} held-out files ({len(heldout.encode())} bytes)", flush=True)
    tokenizer = train_tokenizer(docs)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    data = torch.tensor(ids, dtype=torch.long)
    held_ids = tokenizer.backend_tokenizer.encode(heldout).ids
    print(f"[tokenizer] vocab {len(tokenizer)}; {len(ids)} training tokens "
          f"({sum(map(len, docs)) / len(ids):.2f} chars/token), {len(held_ids)} held-out tokens "
          f"[{time.time() - t0:.0f}s]", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params / 1e6:.2f} M parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        p = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    gen = torch.Generator().manual_seed(SEED)
    steps = args.time_steps or args.steps
    model.train()
    t_train = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"[train] step {step}/{steps} loss {loss.item():.3f} "
                  f"[{time.time() - t_train:.0f}s]", flush=True)
    train_s = time.time() - t_train
    if args.time_steps:
        print(f"[time] {train_s / steps:.3f} s/step")
        return 0

    model.eval()
    ppl_f32 = perplexity(model, held_ids, args.seq)
    model = model.to(torch.bfloat16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    model = model.float()
    ppl_bf16 = perplexity(model, held_ids, args.seq)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    info = {
        "seed": SEED, "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "training_tokens": len(ids), "heldout_tokens": len(held_ids), "heldout_files": held_names,
        "train_seconds": round(train_s, 1), "python": sys.version.split()[0],
        "heldout_ppl_float32_weights": round(ppl_f32, 3), "heldout_ppl_bf16_weights": round(ppl_bf16, 3),
        "parameters": n_params, "numpy": np.__version__, "torch": torch.__version__,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"[done] {out}: {size / 2**20:.2f} MiB; trained {train_s:.0f}s; held-out perplexity "
          f"{ppl_f32:.3f} (float32 weights), {ppl_bf16:.3f} (saved bf16 weights)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
