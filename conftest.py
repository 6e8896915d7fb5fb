"""Repo-wide pytest configuration: Hypothesis profiles and the opt-in bench/ suite.

Hypothesis profiles (deadline=None in all of them):
  dev      max_examples=20                      (default on a workstation)
  ci       derandomize, max_examples=200        (default when $CI is set)
  nightly  max_examples=5000
Choose one with ``--hypothesis-profile NAME`` (Hypothesis's own pytest option,
wins) or ``ASCEND_QUANT_HYPOTHESIS_PROFILE=NAME``.

Benchmarks under bench/ are collected only with ``pytest bench/ --run-bench``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent
BENCH_DIR = ROOT / "bench"

# Explicit parent: otherwise a profile inherits whatever profile is active when it
# is registered (Hypothesis auto-loads its own "ci" profile when $CI is set).
_BASE = settings.get_profile("default")
settings.register_profile("dev", parent=_BASE, max_examples=20, deadline=None)
settings.register_profile(
    "ci",
    parent=_BASE,
    derandomize=True,
    max_examples=200,
    deadline=None,
    print_blob=True,
    database=None,
)
settings.register_profile("nightly", parent=_BASE, max_examples=5000, deadline=None)


def _default_profile() -> str:
    explicit = os.environ.get("ASCEND_QUANT_HYPOTHESIS_PROFILE")
    if explicit:
        return explicit
    return "ci" if os.environ.get("CI") else "dev"


# Loaded at import time; Hypothesis's pytest plugin loads --hypothesis-profile
# later (in pytest_configure), so the command-line option takes precedence.
settings.load_profile(_default_profile())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-bench",
        action="store_true",
        default=False,
        help="collect and run the performance benchmarks under bench/",
    )


def _in_bench(path: Path) -> bool:
    try:
        Path(path).resolve().relative_to(BENCH_DIR)
    except ValueError:
        return False
    return True


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if not config.getoption("--run-bench") and _in_bench(collection_path):
        config.stash[_BENCH_IGNORED] = True
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _in_bench(item.path):
            item.add_marker(pytest.mark.bench)


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {settings.get_current_profile_name()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if config.stash.get(_BENCH_IGNORED, False):
        terminalreporter.write_line("bench/ was not collected: pass --run-bench to run the benchmarks")


_BENCH_IGNORED = pytest.StashKey[bool]()
