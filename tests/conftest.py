"""Shared fixtures: a clean Pipes environment for every test, and helpers to write child scripts."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Shared helpers live in tests.support.helpers; these names stay importable from here for older imports.
from tests.support.helpers import PYTHON, REPO_ROOT, cli_json_events, raw_cli_json_events

__all__ = ["PYTHON", "REPO_ROOT", "cli_json_events", "raw_cli_json_events"]

# The conformance suite runs one harness per CPU by default; the suite's reference runs (three harnesses at once,
# most of each run spent waiting on the other side) keep the 8 they always had, or they take minutes longer.
os.environ.setdefault("PIPES_CONFORMANCE_JOBS", "8")

# Engine fixtures (session-scoped, each skipping with its reason when the engine cannot run here).
pytest_plugins = [
    "tests.support.blob_servers",
    "tests.support.engines_slurm",
    "tests.support.engines_docker",
    "tests.support.engines_ray",
    "tests.support.engines_prefect",
    "tests.support.engines_browser",
]


@pytest.fixture(autouse=True)
def clean_pipes_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No DAGSTER_PIPES_* variable leaks from the test runner into a test or its children."""
    for name in list(os.environ):
        if name.startswith("DAGSTER_PIPES_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a dedented Python script into the test's temp dir and return its path."""

    def write(source: str, name: str = "child.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return path

    return write
