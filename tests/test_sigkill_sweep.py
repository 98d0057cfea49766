"""SIGKILL sweep (issue 9): the child reports in a loop and records what each call acknowledged; it is killed at
random moments. Nothing acknowledged may be lost: on the file channel, and with stdio capture on (both in the
messages and on the real stdout/stderr). The longer soak run is ``python -m benchmarks.sigkill``."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sigkill import sweep
from tests.conftest import REPO_ROOT

# Small enough for CI (a few seconds per mode on a quiet machine), large enough to hit every phase: before
# open_pipes() returns, mid-loop, mid-write.
CI_RUNS = 30


@pytest.mark.parametrize("mode", ["file", "capture"])
def test_sigkill_at_random_moments_loses_nothing_acknowledged(mode: str) -> None:
    result = sweep(mode, CI_RUNS, seed=9)
    assert result["runs"] == CI_RUNS
    assert result["acknowledged"] > 0  # the kills did land mid-loop
    assert result["lost"] == 0, result
    assert result["lost_real"] == 0, result


KILLED_WITH_ANOTHER_CHANNEL = """
import os, signal
from pipes_ext._capture import PipesStdioCapture
from pipes_ext._writers import PipesInMemoryMessageWriterChannel

capture = PipesStdioCapture(PipesInMemoryMessageWriterChannel()).start()
assert capture.streams == ["stdout", "stderr"]
try:
    os.waitpid(-1, os.WNOHANG)
    raise SystemExit("the capture reader must not be a child of this process")
except ChildProcessError:
    pass
for i in range(4000):
    os.write(1, b"%06d" % i + b"x" * 43 + b"\\n")   # 200 KB: more than a pipe holds
os.write(2, b"last words\\n")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_loses_no_real_output_whatever_the_channel(tmp_path: Path) -> None:
    # With a channel the reader process cannot write to itself (here in memory), messages die with the
    # process, but everything written before the kill still reaches the real stdout/stderr.
    script = tmp_path / "child.py"
    script.write_text(KILLED_WITH_ANOTHER_CHANNEL, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == b"".join(b"%06d" % i + b"x" * 43 + b"\n" for i in range(4000))
    assert proc.stderr == b"last words\n"
