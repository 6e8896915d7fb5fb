"""``ascend-quant quantize SRC_DIR OUT_DIR --algo ID``: quantize a float HF model directory.

A thin front end to :func:`ascend_quant.checkpoint.convert.quantize_directory`: every linear layer
gets the algorithm (``--skip`` globs stay FLOAT), static activation scales (W8A8, W8A8_MIX) and the
FlatQuant transforms (W4A4_FLATQUANT_DYNAMIC) are calibrated on ``--calib-data`` or a small built-in
text, the output is written in msModelSlim's
layout and checked by the same validation as ``ascend-quant inspect``. SRC_DIR is never modified;
a non-empty OUT_DIR is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ascend_quant.reference.algorithms import LINEAR_ALGORITHMS, MOE_ALGORITHMS

    p.add_argument("src_dir", metavar="SRC_DIR", help="float Hugging Face model directory (*.safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--algo", required=True, choices=LINEAR_ALGORITHMS, metavar="ID",
                   help=f"algorithm ID for every linear layer: {', '.join(LINEAR_ALGORITHMS)}. MoE experts use it "
                        f"when it is one of {', '.join(MOE_ALGORITHMS)}, else stay FLOAT; lm_head and the MoE "
                        "router stay FLOAT")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="group size along K for W8A16, W4A8_DYNAMIC (two-step) and W4A16 "
                        "(default: W4A16 32, the others per channel)")
    p.add_argument("--calib-data", metavar="FILE", default=None,
                   help="UTF-8 text file for calibrating W8A8 / W8A8_MIX activation scales and FlatQuant transforms "
                        "(default: a small built-in text, no download)")
    p.add_argument("--calib-samples", type=int, default=8, metavar="N",
                   help="number of calibration windows (default 8)")
    p.add_argument("--calib-seq-len", type=int, default=256, metavar="T",
                   help="tokens per calibration window (default 256)")
    p.add_argument("--skip", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="keep layers whose module name matches a shell glob FLOAT "
                        "(e.g. '*.down_proj' 'model.layers.0.*'); repeatable; give SRC_DIR OUT_DIR before it")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="model dtype of the output: FLOAT tensors are stored in it and it sets the W8A8 deq_scale "
                        "storage (int64 for float16/float32, float32 for bfloat16); auto = the source's")
    p.add_argument("--flatquant-seed", type=int, default=0, metavar="S",
                   help="seed of the FlatQuant calibration (random orthogonal starts, token sampling)")
    p.add_argument("--flatquant-steps", type=int, default=None, metavar="N",
                   help="Adam steps learning each FlatQuant transform group's Kronecker factors and clip ratio "
                        "on the calibration text (default 150; 0: smoothing/rotation initialization and clip "
                        "search only)")
    p.add_argument("--flatquant-random", action="store_true",
                   help="FlatQuant: seeded random orthogonal factors and clip 1 instead of calibrated ones "
                        "(fast; for layout tests, not for accuracy)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT_DIR (our files are replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def run(args: argparse.Namespace) -> int:
    import time

    from ascend_quant.checkpoint.convert import quantize_directory
    from ascend_quant.checkpoint.errors import CheckpointError

    text = None
    if args.calib_data is not None:
        try:
            with open(args.calib_data, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: --calib-data {args.calib_data}: {e}", file=sys.stderr)
            return 2
    t0 = time.time()
    try:
        desc = quantize_directory(
            args.src_dir, args.out_dir, args.algo, group_size=args.group_size, skip=args.skip,
            calibration_text=text, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
            dtype=args.dtype, overwrite=args.overwrite, flatquant_seed=args.flatquant_seed,
            flatquant="random" if args.flatquant_random else "calibrated", flatquant_steps=args.flatquant_steps,
            progress=False if args.no_progress else None,
        )
    except CheckpointError as e:
        print(f"error: the written checkpoint failed validation: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = desc.algorithms()
    summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
    print(f"{args.out_dir}: wrote {summary} module(s) in {time.time() - t0:.1f}s; "
          f"check it with: ascend-quant inspect {args.out_dir}")
    return 0
