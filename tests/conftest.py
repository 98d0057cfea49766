"""Shared fixtures: a clean Pipes environment for every test, and helpers to write child scripts."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def raw_cli_json_events(stdout: str) -> list[dict[str, object]]:
    """The objects ``pipes run --json`` printed, one per line."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def cli_json_events(stdout: str) -> list[dict[str, object]]:
    """The objects ``pipes run --json`` printed, without the ``time`` and ``run_id`` that each must carry."""
    events = raw_cli_json_events(stdout)
    for event in events:
        assert isinstance(event.pop("time"), str) and isinstance(event.pop("run_id"), str), event
    return events
PYTHON = sys.executable

# The conformance suite runs one harness per CPU by default; the suite's reference runs (three harnesses at once,
# most of each run spent waiting on the other side) keep the 8 they always had, or they take minutes longer.
os.environ.setdefault("PIPES_CONFORMANCE_JOBS", "8")

# Engine fixtures (session-scoped, each skipping with its reason when the engine cannot run here).
pytest_plugins = ["tests.engines_slurm", "tests.engines_docker", "tests.engines_ray", "tests.engines_prefect",
                  "tests.engines_browser"]


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
