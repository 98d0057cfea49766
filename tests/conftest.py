"""Shared fixtures: a clean Pipes environment for every test, and helpers to write child scripts."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Engine fixtures (session-scoped, each skipping with its reason when the engine cannot run here).
pytest_plugins = ["tests.engines_slurm", "tests.engines_docker"]


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


# ------------------------------------------------------------------------------------------------ engines

# A test that needs an engine (Ray, Docker, Slurm) and cannot get it skips with a reason starting with this;
# the end of the run lists those skips in a banner (on these machines the engines must run).
ENGINE_SKIP_PREFIX = "ENGINE UNAVAILABLE"


@pytest.fixture(scope="session")
def ray_head() -> Iterator[object]:
    """One private local Ray head for the whole run (started on first use, stopped at the end)."""
    from tests.ray_head import RayUnavailable, start_head

    try:
        head = start_head()
    except RayUnavailable as exc:
        pytest.skip(f"{ENGINE_SKIP_PREFIX}: Ray: {exc}")
    try:
        yield head
    finally:
        left = head.stop()
        assert not left, f"Ray processes outlived the head's SIGTERM and were killed: {left}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = set()
    for report in skipped:
        longrepr = getattr(report, "longrepr", None)
        text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if ENGINE_SKIP_PREFIX in text:
            reasons.add(text[text.index(ENGINE_SKIP_PREFIX):].splitlines()[0])
    if reasons:
        terminalreporter.write_sep("!", "ENGINE TESTS SKIPPED", red=True, bold=True)
        for reason in sorted(reasons):
            terminalreporter.write_line(f"  {reason}", red=True, bold=True)
