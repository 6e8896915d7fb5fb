"""Conformance suite configuration: the ``--backend`` option and an examples-drawn summary.

``--backend NAME`` (repeatable) selects backends (``npu``, ``cuda``, ``cpu``,
``torch-portable``); by default every backend is parametrized and those not available on
this machine skip with the dispatcher's reason (``optimized.dispatch.backend_status``).
Hypothesis profiles (``dev``, ``ci``, ``nightly``) come from the repository's root
``conftest.py``. At the end of a run a short table lists how many examples each
property drew (from Hypothesis's own statistics); ``--hypothesis-show-statistics``
gives the full report.
"""

from __future__ import annotations

import re

import pytest

from ascend_quant.optimized.dispatch import BACKENDS, backend_status

_STATS = pytest.StashKey[dict]()
_COUNTS = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", action="append", default=None, choices=list(BACKENDS),
                     help="conformance backend(s) to test (default: all; unavailable ones skip)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATS] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names = metafunc.config.getoption("--backend") or list(BACKENDS)
        metafunc.parametrize("backend", names, indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request) -> str:
    name = request.param
    ok, why = backend_status(name)
    if not ok:
        pytest.skip(f"backend {name}: {why}")
    return name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    stats = getattr(item, "hypothesis_statistics", None)
    if call.when == "teardown" and stats:
        runs = [tuple(map(int, m)) for m in _COUNTS.findall(stats)]
        if runs:
            store = item.config.stash.get(_STATS, None)
            if store is not None:
                store[item.nodeid] = (sum(r[0] for r in runs), sum(r[1] for r in runs), sum(r[2] for r in runs))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    store = config.stash.get(_STATS, {})
    if not store:
        return
    terminalreporter.section("conformance: Hypothesis examples per property")
    width = max(len(k) for k in store)
    for nodeid, (passing, failing, invalid) in sorted(store.items()):
        terminalreporter.write_line(f"{nodeid:<{width}}  {passing:5d} passing  {failing:3d} failing  {invalid:4d} invalid")
    terminalreporter.write_line(f"{len(store)} properties, {sum(v[0] for v in store.values())} passing examples in all")
