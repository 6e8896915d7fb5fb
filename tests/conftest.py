"""Fixtures shared by tests/checkpoint and tests/cli: a tiny quantized checkpoint covering every
algorithm ID, and the helpers of tests/checkpoint_fixtures.py to corrupt copies of it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "ascend_quant_test_checkpoint_fixtures", Path(__file__).with_name("checkpoint_fixtures.py"))
checkpoint_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checkpoint_fixtures)


@pytest.fixture(scope="session")
def ckpt():
    """The helper module tests/checkpoint_fixtures.py."""
    return checkpoint_fixtures


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A valid tiny checkpoint directory (read-only by convention: copy it before editing)."""
    return checkpoint_fixtures.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def broken(tiny_checkpoint, tmp_path) -> str:
    """A fresh copy of the tiny checkpoint, for one corruption."""
    return checkpoint_fixtures.copy_checkpoint(tiny_checkpoint, tmp_path / "model")
