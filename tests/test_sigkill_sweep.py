"""SIGKILL sweep (issue 9): the child reports in a loop and records what each call acknowledged; it is killed at
random moments. Nothing acknowledged may be lost: on the file channel, on the stdio channel, and with stdio
capture on (both in the messages and on the real stdout/stderr). The longer soak run is
``python -m benchmarks.sigkill``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sigkill import sweep
from pipes_core import PipesTempFileContextInjector, PipesTempFileMessageReader, open_pipes_session
from tests.conftest import REPO_ROOT

# Small enough for CI (a few seconds per mode on a quiet machine), large enough to hit every phase: before
# open_pipes() returns, mid-loop, mid-write.
CI_RUNS = 30


@pytest.mark.parametrize("mode", ["file", "stdio", "capture"])
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


KILLED_WITH_A_GRANDCHILD = """
import os, signal, subprocess
from pipes_ext import open_pipes

pipes = open_pipes()
subprocess.Popen(["sh", "-c", "sleep 1; echo late from the grandchild"])  # inherits the captured stdout
print("early", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_after_a_sigkill_the_session_waits_for_the_capture_to_finish_writing(tmp_path: Path) -> None:
    # The process is gone, but its capture reader is not: a grandchild still writes to the captured stdout.
    # The file reader's final drain waits (bounded) for the reader's lock, so the late line arrives too.
    script = tmp_path / "child.py"
    script.write_text(KILLED_WITH_A_GRANDCHILD, encoding="utf-8")
    streamed: list[str] = []
    real_stdout = tmp_path / "stdout"
    with open(real_stdout, "wb") as out:
        with open_pipes_session(None, PipesTempFileContextInjector(),
                                PipesTempFileMessageReader(include_stdio_in_messages=True),
                                external_stream_handler=lambda stream, text: streamed.append(text)) as session:
            process = subprocess.Popen([sys.executable, str(script)], stdout=out, cwd=REPO_ROOT,
                                       env={**os.environ, **session.get_bootstrap_env_vars()})
            assert process.wait(timeout=60) == -signal.SIGKILL
    assert "".join(streamed) == "early\nlate from the grandchild\n"
    assert real_stdout.read_text(encoding="utf-8") == "early\nlate from the grandchild\n"
    assert session.opened and not session.closed


SIGCHLD_IGNORED = """
import json, os, signal, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel: waitpid() finds none
from pipes_ext._capture import PipesStdioCapture
from pipes_ext._writers import PipesInMemoryMessageWriterChannel

channel = PipesInMemoryMessageWriterChannel()
with PipesStdioCapture(channel) as capture:
    assert capture.streams == ["stdout", "stderr"]
    os.write(1, b"hello\\n")
os.write(2, json.dumps([json.loads(line)["params"]["text"] for line in channel.lines]).encode())
"""


def test_capture_starts_when_the_process_ignores_sigchld(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(SIGCHLD_IGNORED, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello\n"
    assert proc.stderr == b'["hello\\n"]'
