"""``include_stdio_in_messages``: the external side forwards its fd 1 / fd 2 output as ``log_external_stream``.

Every test runs a real external process. The process is launched either by :class:`PipesSubprocessClient`
or by our own ``Popen`` inside ``open_pipes_session``, which lets a test read the process's real stdout and
stderr separately. Each test checks two things:

* what arrived as messages (through ``on_event``, in order, and ``external_stream_handler``);
* what still reached the original stdout/stderr.

Children run without ``PYTHONUNBUFFERED``, so ``sys.stdout`` is block-buffered as in production and the
flush at close is exercised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipes_core import (
    PipesClosedEvent,
    PipesEvent,
    PipesExternalStreamEvent,
    PipesOpenedEvent,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    open_pipes_session,
)
from pipes_ext._capture import EOF_TIMEOUT_SECONDS, MAX_MESSAGE_CHARS
from tests.support.helpers import PYTHON

Script = Callable[..., Path]

# Imported by every child: waits until this process's own messages file holds a stream message whose text
# contains ``needle``, i.e. the capture thread has read (and sent) everything written before it.
WAIT_FOR_MESSAGE = '''
import json, os, time
from pipes_ext import decode_param

def wait_for_message(needle, timeout=10.0):
    path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8") as f:
            for line in f:
                msg = json.loads(line)
                if msg["method"] == "log_external_stream" and needle in msg["params"]["text"]:
                    return
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {needle!r} to be sent")
'''


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    return env


@dataclass
class Run:
    events: list[PipesEvent] = field(default_factory=list)
    handled: list[tuple[str, str]] = field(default_factory=list)  # external_stream_handler calls
    real_stdout: str = ""
    real_stderr: str = ""
    returncode: int | None = None

    def stream_events(self, stream: str) -> list[PipesExternalStreamEvent]:
        return [e for e in self.events if isinstance(e, PipesExternalStreamEvent) and e.stream == stream]

    def text(self, stream: str) -> str:
        return "".join(e.text for e in self.stream_events(stream))

    def assert_opened_first_closed_last(self) -> None:
        assert isinstance(self.events[0], PipesOpenedEvent), self.events[:3]
        assert isinstance(self.events[-1], PipesClosedEvent), self.events[-3:]
        assert self.events[-1].exception is None
        assert sum(isinstance(e, PipesClosedEvent) for e in self.events) == 1


def run_captured(
    argv: list[str], *, include_stdio: bool = True, timeout: float = 60, read_delay: float = 0.0
) -> Run:
    """Run ``argv`` in a session with stdio capture. The real stdout/stderr are read separately, starting
    after ``read_delay`` seconds (so a process writing more than a pipe holds finds its real stdout full)."""
    run = Run()
    with open_pipes_session(
        None,
        PipesTempFileContextInjector(),
        PipesTempFileMessageReader(include_stdio_in_messages=include_stdio),
        on_event=run.events.append,
        external_stream_handler=lambda stream, text: run.handled.append((stream, text)),
    ) as session:
        process = subprocess.Popen(
            argv,
            env={**child_env(), **session.get_bootstrap_env_vars()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            time.sleep(read_delay)
            out, err = process.communicate(timeout=timeout)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # no grandchild outlives the test
            except ProcessLookupError:
                pass
            process.wait()
    run.real_stdout = out.decode("utf-8", "replace")
    run.real_stderr = err.decode("utf-8", "replace")
    run.returncode = process.returncode
    return run


@pytest.fixture
def script(write_script: Callable[[str, str], Path]) -> Script:
    def write(body: str, name: str = "child.py") -> Path:
        return write_script(WAIT_FOR_MESSAGE + textwrap.dedent(body), name)

    return write


def test_print_os_write_and_grandchild_output_go_to_their_own_streams(script: Script) -> None:
    path = script(
        '''
        import os, subprocess, sys
        from pipes_ext import open_pipes

        with open_pipes():
            print("out-print", flush=True)
            os.write(1, b"out-fd\\n")
            print("err-print", file=sys.stderr, flush=True)
            os.write(2, b"err-fd\\n")
            subprocess.run(["sh", "-c", "echo from-grandchild; echo err-grandchild >&2"], check=True)
        '''
    )
    run = run_captured([PYTHON, str(path)])
    assert run.returncode == 0, run.real_stderr
    expected_out = "out-print\nout-fd\nfrom-grandchild\n"
    expected_err = "err-print\nerr-fd\nerr-grandchild\n"
    # Exact equality: nothing missing, nothing duplicated, and no stderr text in stdout (or the reverse).
    assert run.text("stdout") == expected_out
    assert run.text("stderr") == expected_err
    # The output still reached the process's real stdout and stderr.
    assert run.real_stdout == expected_out
    assert run.real_stderr == expected_err
    # The handler got the same text, per stream.
    assert "".join(t for s, t in run.handled if s == "stdout") == expected_out
    assert "".join(t for s, t in run.handled if s == "stderr") == expected_err
    assert all(e.extras == {} for e in run.stream_events("stdout") + run.stream_events("stderr"))
    run.assert_opened_first_closed_last()


def test_subprocess_client_captures_and_keeps_original_output(script: Script) -> None:
    path = script(
        '''
        import os, subprocess, sys
        from pipes_ext import open_pipes

        with open_pipes():
            print("client-out")
            print("client-err", file=sys.stderr)
            subprocess.run(["sh", "-c", "echo from-grandchild; echo err-grandchild >&2"], check=True)
        '''
    )
    events: list[PipesEvent] = []
    client = PipesSubprocessClient(
        message_reader=PipesTempFileMessageReader(include_stdio_in_messages=True),
        forward_stdio=False,
        env={"PYTHONUNBUFFERED": ""},
    )
    invocation = client.run(command=[PYTHON, str(path)], on_event=events.append)
    stdout = "".join(e.text for e in events if isinstance(e, PipesExternalStreamEvent) and e.stream == "stdout")
    stderr = "".join(e.text for e in events if isinstance(e, PipesExternalStreamEvent) and e.stream == "stderr")
    assert "client-out\n" in stdout and "from-grandchild\n" in stdout
    assert "client-err\n" in stderr and "err-grandchild\n" in stderr
    assert "err" not in stdout
    assert "out" not in stderr
    # The original output still reached the real stdout/stderr pipes (read by the client).
    for marker in ("client-out", "from-grandchild", "client-err", "err-grandchild"):
        assert marker in invocation.output_tail
    assert isinstance(events[0], PipesOpenedEvent)
    assert isinstance(events[-1], PipesClosedEvent)


def test_without_the_flag_nothing_is_captured(script: Script) -> None:
    path = script(
        '''
        import os
        from pipes_ext import open_pipes

        with open_pipes():
            print("plain")
            os.write(2, b"plain-err\\n")
        '''
    )
    run = run_captured([PYTHON, str(path)], include_stdio=False)
    assert run.returncode == 0, run.real_stderr
    assert run.stream_events("stdout") == [] and run.stream_events("stderr") == []
    assert run.real_stdout == "plain\n" and run.real_stderr == "plain-err\n"


def test_large_output_is_complete_in_order_and_batched(script: Script) -> None:
    path = script(
        '''
        import os, sys
        from pipes_ext import open_pipes

        with open_pipes():
            for i in range(100_000):          # 1.5 MB through the buffered sys.stdout
                sys.stdout.write(f"line {i:09d}\\n")
            sys.stdout.flush()
            os.write(1, b"x" * 400_000 + b"\\n")   # 0.4 MB in one write
            for i in range(100_000):          # and 1.5 MB more (the last 8 KiB flushed at close)
                sys.stdout.write(f"more {i:09d}\\n")
        '''
    )
    started = time.monotonic()
    run = run_captured([PYTHON, str(path)])
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.real_stderr[-2000:]
    expected = (
        "".join(f"line {i:09d}\n" for i in range(100_000))
        + "x" * 400_000
        + "\n"
        + "".join(f"more {i:09d}\n" for i in range(100_000))
    )
    assert len(expected) > 3_000_000
    text = run.text("stdout")
    assert len(text) == len(expected)
    assert text == expected
    assert run.real_stdout == expected
    assert run.text("stderr") == ""
    events = run.stream_events("stdout")
    assert max(len(e.text) for e in events) <= MAX_MESSAGE_CHARS
    assert len(events) <= len(expected) // 1024  # batched per read, not per line or byte
    run.assert_opened_first_closed_last()
    assert elapsed < EOF_TIMEOUT_SECONDS + 20  # no waiting for a timeout when EOF comes at once


def test_output_written_just_before_close_arrives_before_closed(script: Script) -> None:
    path = script(
        '''
        import os, subprocess, sys
        from pipes_ext import open_pipes

        with open_pipes():
            print("first line")
            subprocess.run(["sh", "-c", "printf grandchild-last"], check=True)
            sys.stdout.write("buffered, no newline")   # still in sys.stdout's buffer at close
            sys.stderr.write("err, no newline")        # line-buffered stderr: also still buffered
            os.write(2, b"fd ")
        '''
    )
    run = run_captured([PYTHON, str(path)])
    assert run.returncode == 0, run.real_stderr
    # Python's buffers were flushed into the capture at close, after what went straight to the fds.
    assert run.text("stdout") == "grandchild-lastfirst line\nbuffered, no newline"
    assert run.text("stderr") == "fd err, no newline"
    assert run.real_stdout == run.text("stdout")
    assert run.real_stderr == run.text("stderr")
    run.assert_opened_first_closed_last()
    assert isinstance(run.events[-2], PipesExternalStreamEvent)


def test_multibyte_characters_split_across_reads_stay_whole(script: Script) -> None:
    path = script(
        '''
        import os
        from pipes_ext import open_pipes

        emoji = "\\U0001F600".encode("utf-8")    # 4 bytes
        euro = "\\u20ac".encode("utf-8")         # 3 bytes
        with open_pipes():
            os.write(1, b"A" + emoji[:2])
            wait_for_message("A")                # that read ended inside the emoji
            os.write(1, emoji[2:] + b"B" + euro[:1])
            wait_for_message("B")
            os.write(1, euro[1:] + b"C")
            os.write(2, b"caf\\xc3")
            wait_for_message("caf")
            os.write(2, b"\\xa9\\n")
        '''
    )
    run = run_captured([PYTHON, str(path)])
    assert run.returncode == 0, run.real_stderr
    # One message per read: the bytes of a split character are held back, never replaced.
    assert [e.text for e in run.stream_events("stdout")] == ["A", "\U0001f600B", "\u20acC"]
    assert [e.text for e in run.stream_events("stderr")] == ["caf", "\u00e9\n"]
    assert run.real_stdout == "A\U0001f600B\u20acC"
    assert run.real_stderr == "caf\u00e9\n"
    run.assert_opened_first_closed_last()


def test_truncated_multibyte_character_at_close_is_flushed_as_replacement(script: Script) -> None:
    path = script(
        '''
        import os
        from pipes_ext import open_pipes

        with open_pipes():
            os.write(1, b"end" + "\\u20ac".encode("utf-8")[:2])
        '''
    )
    run = run_captured([PYTHON, str(path)])
    assert run.returncode == 0, run.real_stderr
    assert run.text("stdout") == "end\ufffd"
    run.assert_opened_first_closed_last()


def test_a_grandchild_holding_the_pipe_delays_close_only_by_the_timeout(script: Script) -> None:
    path = script(
        '''
        import os, subprocess, sys, tempfile, threading, time
        from pipes_ext import open_pipes

        # The grandchild prints "late" only once this process has returned from close() and says so through
        # a fifo: close() cannot have waited for it, however slow the machine.
        go = os.path.join(tempfile.mkdtemp(), "go")
        os.mkfifo(go)
        pipes = open_pipes()
        late = subprocess.Popen(["sh", "-c", f"echo early; read x < {go}; echo late"])
        wait_for_message("early")
        print("before close")
        started = time.monotonic()
        pipes.close()
        print(f"close took {time.monotonic() - started:.3f}", file=sys.stderr)
        with open(go, "w") as fifo:
            fifo.write("go\\n")
        print(f"grandchild exit {late.wait()}", file=sys.stderr)
        # the capture threads copy "late" to the real stdout and end at the pipe's end of file
        for thread in threading.enumerate():
            if thread.name.startswith("pipes-stdio-capture"):
                thread.join(30)
        '''
    )
    run = run_captured([PYTHON, str(path)])
    assert run.returncode == 0, run.real_stderr
    assert run.text("stdout") == "early\nbefore close\n"
    run.assert_opened_first_closed_last()
    took = float(run.real_stderr.split("close took ")[1].split()[0])
    assert EOF_TIMEOUT_SECONDS - 0.05 <= took < EOF_TIMEOUT_SECONDS + 20  # waited for EOF, then gave up
    # After close the grandchild's output is still copied to the real stdout, not sent, and the grandchild
    # was not killed by SIGPIPE.
    assert run.real_stdout == "early\nbefore close\nlate\n"
    assert "grandchild exit 0" in run.real_stderr
    assert "late" not in run.text("stdout") + run.text("stderr")


def test_an_exception_is_reported_in_closed_after_the_captured_output(script: Script) -> None:
    path = script(
        '''
        from pipes_ext import open_pipes

        with open_pipes():
            print("about to fail")
            raise ValueError("boom")
        '''
    )
    run = run_captured([PYTHON, str(path)])
    assert run.returncode == 1
    assert run.text("stdout") == "about to fail\n"
    last = run.events[-1]
    assert isinstance(last, PipesClosedEvent) and last.exception is not None
    assert last.exception.name == "ValueError"
    # The traceback printed at exit goes to the restored stderr, after closed: not captured, still visible.
    assert "ValueError: boom" in run.real_stderr
    assert "ValueError" not in run.text("stderr")


def test_a_closed_stdout_fd_is_skipped_and_stderr_still_captured(script: Script) -> None:
    path = script(
        '''
        import os, sys
        from pipes_ext import open_pipes

        assert sys.stdout is None               # so the messages file gets fd 1: it must not be captured
        with open_pipes():
            print("to stderr", file=sys.stderr)
            os.write(2, b"fd 2\\n")
            wait_for_message("fd 2")            # the message went through the channel while capturing
        '''
    )
    run = run_captured(["sh", "-c", f'exec "{PYTHON}" "{path}" >&-'])
    assert run.returncode == 0, run.real_stderr
    assert run.stream_events("stdout") == []
    assert run.text("stderr") == "to stderr\nfd 2\n"
    assert run.real_stderr == "to stderr\nfd 2\n"
    run.assert_opened_first_closed_last()


def test_a_stdio_channel_does_not_capture_its_own_messages(write_script: Callable[[str, str], Path]) -> None:
    path = write_script(
        '''
        import os, warnings
        from pipes_ext import PipesMappingParamsLoader, PipesWarning, encode_param, open_pipes

        warnings.simplefilter("always")
        params = {
            "DAGSTER_PIPES_CONTEXT": encode_param({"data": {"run_id": "r"}}),
            "DAGSTER_PIPES_MESSAGES": encode_param({"stdio": "stdout", "include_stdio_in_messages": True}),
        }
        with warnings.catch_warnings(record=True) as caught:
            pipes = open_pipes(params_loader=PipesMappingParamsLoader(params))
        with pipes:
            os.write(1, b"plain output\\n")
        for w in caught:
            os.write(2, f"{w.category.__name__}: {w.message}\\n".encode())
        ''',
        "child.py",
    )
    result = subprocess.run([PYTHON, str(path)], capture_output=True, text=True, timeout=60, env=child_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [json.loads(line)["method"] for line in lines if line.startswith("{")] == ["opened", "closed"]
    assert "plain output" in lines
    assert "log_external_stream" not in result.stdout
    assert "PipesWarning" in result.stderr and "include_stdio_in_messages" in result.stderr


def test_one_read_longer_than_the_limit_is_split(write_script: Callable[[str, str], Path]) -> None:
    path = write_script(
        '''
        import json, os
        from pipes_ext._writers import PipesInMemoryMessageWriterChannel
        from pipes_ext._capture import PipesStdioCapture

        channel = PipesInMemoryMessageWriterChannel()
        with PipesStdioCapture(channel, max_message_chars=100) as capture:
            assert capture.streams == ["stdout", "stderr"], capture.streams
            os.write(1, "".join(chr(ord("a") + i % 26) for i in range(1000)).encode())  # one atomic write
        os.write(2, json.dumps([json.loads(line) for line in channel.lines]).encode())
        ''',
        "child.py",
    )
    result = subprocess.run([PYTHON, str(path)], capture_output=True, text=True, timeout=60, env=child_env())
    assert result.returncode == 0, result.stderr
    messages = json.loads(result.stderr)
    expected = "".join(chr(ord("a") + i % 26) for i in range(1000))
    assert [m["method"] for m in messages] == ["log_external_stream"] * 10
    assert [len(m["params"]["text"]) for m in messages] == [100] * 10
    assert "".join(m["params"]["text"] for m in messages) == expected
    assert result.stdout == expected


def test_a_process_that_never_closes_still_gets_its_output_out_at_exit(script: Script) -> None:
    path = script(
        '''
        import sys
        from pipes_ext import open_pipes

        pipes = open_pipes()
        print("still buffered at exit")          # flushed by the capture's atexit hook, into the capture
        sys.stdout.write("no newline either")
        '''
    )
    run = run_captured([PYTHON, str(path)])
    assert run.returncode == 0, run.real_stderr
    assert run.text("stdout") == "still buffered at exit\nno newline either"
    assert run.real_stdout == "still buffered at exit\nno newline either"
    assert isinstance(run.events[0], PipesOpenedEvent)
    assert not any(isinstance(e, PipesClosedEvent) for e in run.events)  # it never closed


def test_a_forked_child_exits_without_touching_the_parents_capture(script: Script) -> None:
    path = script(
        '''
        import os, sys, time
        from pipes_ext import open_pipes

        pipes = open_pipes()                      # no with: the forked child must not send closed
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:                              # a normal interpreter exit: atexit hooks run
            print("from the forked child")
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        print(f"forked child took {time.monotonic() - started:.3f} status {status}", flush=True)
        print("parent after fork")
        pipes.close()
        '''
    )
    run = run_captured([PYTHON, str(path)])
    assert run.returncode == 0, run.real_stderr
    text = run.text("stdout")
    assert text.startswith("from the forked child\nforked child took ")
    assert text.endswith("status 0\nparent after fork\n")
    assert run.real_stdout == text
    took = float(text.split("forked child took ")[1].split()[0])
    assert took < EOF_TIMEOUT_SECONDS  # it did not wait for pumps that only exist in the parent
    run.assert_opened_first_closed_last()


def test_a_non_blocking_original_stdout_still_gets_everything(script: Script) -> None:
    path = script(
        '''
        import os
        from pipes_ext import open_pipes

        os.set_blocking(1, False)                 # e.g. a parent that shares the file description did this
        with open_pipes():
            for i in range(20):
                os.write(1, (str(i % 10) * 49_999 + "\\n").encode())   # 1 MB: far more than the pipe holds
        '''
    )
    run = run_captured([PYTHON, str(path)], read_delay=1.0)
    assert run.returncode == 0, run.real_stderr
    expected = "".join(str(i % 10) * 49_999 + "\n" for i in range(20))
    assert run.text("stdout") == expected
    assert run.real_stdout == expected
    run.assert_opened_first_closed_last()
