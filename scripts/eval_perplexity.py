"""Perplexity of float and quantized model directories on a text, through the reference forward.

    python -P scripts/eval_perplexity.py MODEL_DIR [MODEL_DIR ...] [--text FILE] [--seq 128]
                                          [--max-tokens N] [--dtype float32|bfloat16] [--json OUT]

A directory with ``quant_model_description.json`` is run by
:func:`ascend_quant.checkpoint.reference_model.load_reference_model` (Hugging Face transformers
with the NumPy reference swapped in for every quantized layer: the checkpoint's exact integer
numerics); any other directory is a float Hugging Face model (``AutoModelForCausalLM``).

The text (default: the embedded model's ``heldout.txt``) is tokenized with the first directory's
tokenizer, without special tokens, and cut into consecutive non-overlapping windows of ``--seq``
tokens, each window predicting its own next tokens (the first token of a window has no context
from the previous one): the procedure of ``scripts/train_embedded_model.py`` (windows of 128), so
the float embedded model gives its recorded 47.74 on the whole held-out text.
``--max-tokens`` evaluates only a fixed prefix of the token ids. torch runs with ``--threads``
threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT / "models" / "embedded-llama" / "heldout.txt"


def token_ids(model_dir: str, text: str) -> list[int]:
    """The text's token ids with ``model_dir``'s tokenizer (no special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(text, add_special_tokens=False)["input_ids"]


def load_model(model_dir: str, dtype: str):
    """A float HF model, or the reference model of a quantized directory; eval mode."""
    import torch

    if os.path.exists(os.path.join(model_dir, "quant_model_description.json")):
        from ascend_quant.checkpoint.reference_model import load_reference_model

        return load_reference_model(model_dir, dtype=dtype)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    return model


def perplexity(model, ids: list[int], seq: int = 128) -> tuple[float, int]:
    """``exp(mean NLL)`` over consecutive windows of ``seq`` inputs (+1 target); returns
    ``(perplexity, number of predicted tokens)``. Logits are taken in float32."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq):
            chunk = ids[start:start + seq + 1]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk[:-1]])
            y = torch.tensor([chunk[1:]])
            logits = model(x).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum"))
            count += y.numel()
    return math.exp(nll / count), count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file (default: embedded heldout.txt)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per window (default 128, as training)")
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N token ids")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="compute dtype of the forward (default float32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = token_ids(args.model_dirs[0], text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    results = []
    for d in args.model_dirs:
        t0 = time.time()
        model = load_model(d, args.dtype)
        ppl, n = perplexity(model, ids, args.seq)
        results.append({"model": d, "perplexity": ppl, "tokens": n, "seq": args.seq, "dtype": args.dtype,
                        "seconds": round(time.time() - t0, 1)})
        print(f"{d}: perplexity {ppl:.3f} over {n} tokens ({args.dtype}, windows of {args.seq}, "
              f"{time.time() - t0:.0f}s)", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
