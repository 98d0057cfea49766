"""Debian's headless Chromium for the documentation site's browser test (tests/test_docs_site.py), driven over
the Chrome DevTools protocol (no WebDriver). ``.ci/test`` installs the package ``chromium``; without it the test
skips, and pytest's summary says so in capitals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.engine_skips import EngineSkips

# The flags that work on these machines (a closed network: no background connections, no QUIC), as root.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A bound that only catches a hang of the browser's own HTTP endpoint.
ANSWER_SECONDS = 60.0

SKIPS = EngineSkips("Browser")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium with a fresh profile, stopped by its process group afterwards; yields the DevTools
    websocket URL of its blank page."""
    binary = shutil.which("chromium")
    if binary is None:
        SKIPS.skip("Debian's chromium is not installed (.ci/test installs it: apt-get install chromium)")
    process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                                "--remote-debugging-port=0", "about:blank"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stderr is not None
    drain: threading.Thread | None = None
    try:
        for line in process.stderr:  # Chromium says where it listens before anything can be asked of it
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                break
        else:
            raise AssertionError(f"chromium exited {process.wait()} without listening")
        drain = threading.Thread(target=process.stderr.read, daemon=True)  # keep its stderr drained
        drain.start()
        with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/json/list", timeout=ANSWER_SECONDS) as answer:
            targets = json.load(answer)
        yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the browser and every process it started
        process.wait()
        if drain is not None:
            drain.join()
        process.stderr.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly when the browser test could not run."""
    SKIPS.report(terminalreporter)
