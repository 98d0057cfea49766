"""Helpers shared by the tests and the benchmarks (one home each: import them, do not copy them)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["PYTHON", "REPO_ROOT", "WAIT_POLL_SECONDS", "cli_json_events", "raw_cli_json_events", "wait_until"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

# The interpreter the tests run under: children run with it so that they see the same installed packages.
PYTHON = sys.executable

# Short enough that a wait ends soon after its condition holds, long enough not to spin a CPU the engines need.
WAIT_POLL_SECONDS = 0.005


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, *, fail: bool = True,
               what: str = "the condition") -> bool:
    """Wait until ``predicate()`` holds: True once it does. At ``timeout`` seconds, raise an AssertionError
    naming ``what`` (``fail=True``, for a condition the test requires) or return False (``fail=False``, for a
    test that reports what did not happen). For conditions another process makes true, where no event can be
    awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if fail:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            return False
        time.sleep(WAIT_POLL_SECONDS)
    return True


def raw_cli_json_events(stdout: str) -> list[dict[str, object]]:
    """The objects ``pipes run --json`` printed, one per line."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def cli_json_events(stdout: str) -> list[dict[str, object]]:
    """The objects ``pipes run --json`` printed, without the ``time`` and ``run_id`` that each must carry."""
    events = raw_cli_json_events(stdout)
    for event in events:
        assert isinstance(event.pop("time"), str) and isinstance(event.pop("run_id"), str), event
    return events
