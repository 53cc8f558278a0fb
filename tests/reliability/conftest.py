"""Fixtures of the reliability tests: each rule of the bad-data policy is checked through the real CLI."""

from __future__ import annotations

import pytest
from cli_helpers import one_line_error, run_cli

__all__ = ["one_line_error", "run_cli"]


@pytest.fixture
def cli():
    return run_cli

