"""Shared fixtures: a clean Pipes environment for every test, and helpers to write child scripts."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.engines_docker import ENGINE_UNAVAILABLE, docker_engine  # noqa: F401  (a session fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Engine fixtures (session-scoped, each skipping with its reason when the engine cannot run here).
pytest_plugins = ["tests.engines_slurm"]


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly when engine tests (Docker, ...) were skipped because the engine could not run here."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if ENGINE_UNAVAILABLE in reason:
            reason = reason[reason.index(ENGINE_UNAVAILABLE):]
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.write_sep("!", "ENGINE TESTS SKIPPED: they did not run on this machine", red=True, bold=True)
        for reason, count in sorted(reasons.items()):
            terminalreporter.write_line(f"{count} test(s): {reason}", red=True, bold=True)
