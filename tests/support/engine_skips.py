"""Why an engine's tests were skipped in this test run, said in capitals at the end of pytest's summary.

Each engine plugin (``tests/support/engines_*.py``) keeps one :class:`EngineSkips` and calls :meth:`EngineSkips.report`
from its ``pytest_terminal_summary``: on these machines every engine must run, so a skip must not pass unseen.
"""

from __future__ import annotations

from typing import NoReturn

import pytest


class EngineSkips:
    """The reasons one engine's tests were skipped (each said once)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reasons: list[str] = []

    def skip(self, reason: str) -> NoReturn:
        """Skip the current test for ``reason``, and remember it for the summary."""
        self.reasons.append(reason)
        pytest.skip(reason)

    def skip_if_known(self) -> None:
        """Skip at once when the engine already failed to start in this run (it is not tried again)."""
        if self.reasons:
            pytest.skip(self.reasons[0])

    def report(self, terminalreporter: pytest.TerminalReporter) -> None:
        for reason in dict.fromkeys(self.reasons):
            terminalreporter.write_sep("!", f"{self.name.upper()} TESTS SKIPPED", red=True, bold=True)
            terminalreporter.write_line(reason, red=True, bold=True)
