"""Packaging checks: the ascend_quant namespace layout and the CLI entry point."""

from __future__ import annotations

import subprocess
import sys


def _run(code_or_args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *code_or_args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_reference_importable_without_torch(tmp_path):
    import ascend_quant.reference  # noqa: F401

    proc = _run(
        ["-c", "import sys, ascend_quant.reference; assert 'torch' not in sys.modules"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


def test_no_bare_reference_package(tmp_path):
    proc = _run(
        [
            "-c",
            "try:\n"
            "    import reference\n"
            "except ModuleNotFoundError:\n"
            "    pass\n"
            "else:\n"
            "    raise SystemExit('bare `reference` importable from ' + repr(reference.__file__))\n",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_help_lists_walkthrough(tmp_path):
    proc = _run(["-m", "ascend_quant.cli.main", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "walkthrough" in proc.stdout
