"""Fault injection on the file log reader (issue 20, items 1, 9 and 10): what a hostile or unusual log file does
to ``PipesFileLogReader``, each tried with a real process writing a real file.

* a FIFO as the log, 1 MiB written through it by the child: read as a stream to its end, the job finishes;
* a symbolic link swapped in for the log, pointing at a 0600 file of ours: not followed, the swap logged, the
  target's text never forwarded (also a link already there at the first open);
* truncated and written again past the position read, between two polls: everything written after the
  truncation is forwarded.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipes_core import (
    PipesFileLogReader,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
)
from pipes_core.channels.log_readers import LOG_READ_BLOCK_BYTES, LOG_REWRITE_CHECK_BYTES
from tests.support.helpers import PYTHON
from tests.test_channels_log_readers import Collector

# A reader that never polls on its own during a test: its reads are the first one at start and the final
# drain at stop, so what happens between them is exactly "between two polls".
NEVER = 3600.0


def run_child(script: Path, *args: str) -> None:
    """Run a small writer process to its end (its own session, killed by group if it outlives the wait)."""
    process = subprocess.Popen([PYTHON, str(script), *args], start_new_session=True)
    try:
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()


# ---------------------------------------------------------------------------------------------- item 1: FIFO

FIFO_CHILD = """
import sys
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.log.info("opened; writing the log")
    line = ("x" * 1023 + "\\n").encode()
    with open(sys.argv[1], "wb") as log:   # blocks until the reader has the FIFO open
        for i in range(1024):                # 1 MiB, far more than a pipe's 64 KiB buffer
            log.write(b"%07d" % i + line[7:])
    pipes.report_custom_message("done")
"""


def test_a_fifo_log_of_1_mib_is_forwarded_in_full_and_the_job_finishes(tmp_path: Path) -> None:
    fifo = tmp_path / "job.log"
    os.mkfifo(fifo)
    script = tmp_path / "child.py"
    script.write_text(FIFO_CHILD, encoding="utf-8")
    collected = Collector()
    log_reader = PipesFileLogReader(fifo, target=collected, interval=0.05)
    client = PipesSubprocessClient(context_injector=PipesTempFileContextInjector(),
                                   message_reader=PipesTempFileMessageReader(log_readers=[log_reader]),
                                   forward_stdio=False)
    # A stalled FIFO would end the run at this timeout (PipesTimeoutError) with 64 KiB forwarded: a hang guard.
    invocation = client.run(command=[PYTHON, str(script), str(fifo)], timeout_seconds=120)
    assert invocation.exit_code == 0
    assert invocation.session.closed and invocation.session.get_custom_messages() == ["done"]
    expected = "".join(f"{i:07d}" + "x" * 1016 + "\n" for i in range(1024))
    assert len(expected) == 1024 * 1024
    assert collected.text == expected  # every byte, in order
    assert log_reader.errors == 0  # no seek on the FIFO, no error at any poll


# ---------------------------------------------------------------------------------------------- item 9: symlink

SWAP_CHILD = """
import os, sys
log, secret = sys.argv[1], sys.argv[2]
with open(log, "a") as f:
    f.write("before the swap\\n")
os.unlink(log)
os.symlink(secret, log)   # the log path now points at a file the job must not read through us
"""


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("TOP SECRET of the orchestrator's user\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def test_a_symlink_swapped_in_for_the_log_is_not_followed_and_is_reported(
    tmp_path: Path, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "job.out"
    log.write_text("first line\n", encoding="utf-8")
    script = tmp_path / "swap.py"
    script.write_text(SWAP_CHILD, encoding="utf-8")
    collected = Collector()
    reader = PipesFileLogReader(log, target=collected, interval=NEVER)
    reader.start({})
    try:
        collected.wait_for("first line\n")  # the first read, before the swap
        run_child(script, str(log), str(secret))
        assert log.is_symlink()
    finally:
        reader.stop()  # the final read: the old file to its end, then the path, now a link
    assert collected.text == "first line\nbefore the swap\n"  # the old file read to its end, nothing of the target
    assert "TOP SECRET" not in collected.text
    assert reader.symlinks_refused == 1 and reader.errors == 0
    [warning] = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert str(log) in warning and str(secret) in warning and "os.path.realpath" in warning


def test_a_symlink_already_at_the_path_is_not_followed(tmp_path: Path, secret: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "job.out"
    log.symlink_to(secret)
    collected = Collector()
    reader = PipesFileLogReader(log, target=collected, interval=NEVER)
    reader.start({})
    reader.stop()
    assert collected.text == ""
    assert reader.symlinks_refused == 1 and reader.errors == 0
    assert any("is now a symbolic link" in r.getMessage() for r in caplog.records)


def test_a_refused_link_is_reported_once_and_a_real_file_replacing_it_is_read(tmp_path: Path, secret: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Polls go on over the link without a report each; a real file at the path is then followed."""
    log = tmp_path / "job.out"
    log.symlink_to(secret)
    reader = PipesFileLogReader(log, target=Collector())
    for _ in range(3):
        assert reader.read_chunk({}) is None
    assert reader.symlinks_refused == 1
    assert sum("symbolic link" in r.getMessage() for r in caplog.records) == 1
    log.unlink()
    log.write_text("a real log again\n", encoding="utf-8")
    assert reader.read_chunk({}) == b"a real log again\n"
    reader.release()


# ---------------------------------------------------------------------------------------------- item 10: rewrite

REWRITE_CHILD = """
import sys
log, size = sys.argv[1], int(sys.argv[2])
with open(log, "r+b") as f:
    f.truncate(0)
with open(log, "ab") as f:       # a writer that reopened after the truncation, as copytruncate's writers do
    f.write(b"".join(b"new %05d " % i + b"n" * 53 + b"\\n" for i in range(size // 64)))
"""


@pytest.mark.parametrize(("old_size", "new_size"),
                         [(128, 256), (64 * 200, 64 * 400), (LOG_READ_BLOCK_BYTES * 2, 64 * 2100)])
def test_truncate_and_regrow_between_two_polls_forwards_everything_written_after(
    tmp_path: Path, old_size: int, new_size: int
) -> None:
    """The file is truncated and written again past the position the reader reached, with no poll in between
    (the reader polls only at start and at stop): the new text is forwarded whole, from its first byte."""
    log = tmp_path / "job.out"
    old = "".join(f"old {i:05d} " + "o" * 53 + "\n" for i in range(old_size // 64))
    log.write_text(old, encoding="utf-8")
    script = tmp_path / "rewrite.py"
    script.write_text(REWRITE_CHILD, encoding="utf-8")
    collected = Collector()
    reader = PipesFileLogReader(log, target=collected, interval=NEVER)
    reader.start({})
    try:
        collected.wait_for(old[-64:])  # the first read took the whole old file (in blocks, with no wait)
        assert reader.is_running()
        run_child(script, str(log), str(new_size))
        assert log.stat().st_size == new_size > old_size  # regrew past the position read
    finally:
        reader.stop()  # the next (final) read
    new = "".join(f"new {i:05d} " + "n" * 53 + "\n" for i in range(new_size // 64))
    assert collected.text == old + new
    assert reader.rotations == 1


def test_plain_growth_is_not_mistaken_for_a_rewrite(tmp_path: Path) -> None:
    """The check that catches a rewrite costs nothing to a log that only grows: appends between polls are
    forwarded once, with no restart."""
    log = tmp_path / "job.out"
    log.write_bytes(b"a" * (LOG_REWRITE_CHECK_BYTES + 10))
    collected = Collector()
    reader = PipesFileLogReader(log, target=collected, interval=NEVER)
    reader.start({})
    try:
        collected.wait_for("a" * (LOG_REWRITE_CHECK_BYTES + 10))
        with open(log, "ab") as f:
            f.write(b"b" * 100)
    finally:
        reader.stop()
    assert collected.text == "a" * (LOG_REWRITE_CHECK_BYTES + 10) + "b" * 100
    assert reader.rotations == 0
