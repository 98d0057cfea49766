"""Failure messages state each fact once, with real child processes: the remote exception's type once, its
traceback once (not again as the output tail), and a child that crashed before opening the channel said as such,
with its last stderr line, in Python and through the ``pipes`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipes_core import PipesAsyncSubprocessClient, PipesExecutionError, PipesSubprocessClient
from pipes_core.protocol.results import PipesRemoteException
from tests.conftest import REPO_ROOT
from tests.support.engines_ray import RayHead
from tests.support.helpers import PYTHON

PIPES = [sys.executable, "-m", "pipes_core"]
WriteScript = Callable[..., Path]

USAGE_ERROR_CHILD = """
    from pipes_ext import PipesUsageError, open_pipes

    def main():
        with open_pipes():
            print("rows loaded: 10", flush=True)
            raise PipesUsageError("asset key out of scope")

    if __name__ == "__main__":
        main()
"""
USAGE_ERROR_LAST_LINE = "pipes_ext._errors.PipesUsageError: asset key out of scope"

CRASH_ON_IMPORT = "import nonexistent_module_for_pipes_tests\n"
CRASH_LAST_LINE = "ModuleNotFoundError: No module named 'nonexistent_module_for_pipes_tests'"


def failure(command: list[str], **client_options: object) -> PipesExecutionError:
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient(**client_options).run(command=command)  # type: ignore[arg-type]
    return info.value


# ---------------------------------------------------------------------------------------------- reported exceptions


@pytest.mark.parametrize("forward_stdio", [False, True])
def test_a_reported_exception_is_said_once_and_its_printout_is_not_repeated(
    write_script: WriteScript, forward_stdio: bool
) -> None:
    script = write_script(USAGE_ERROR_CHILD)
    error = failure([PYTHON, str(script)], forward_stdio=forward_stdio)
    text = str(error)
    assert text.splitlines()[0] == (
        f"the external process {str(script)!r} failed with exit code 1 with {USAGE_ERROR_LAST_LINE}")
    # Said once, not "PipesUsageError: pipes_ext._errors.PipesUsageError: ..." (the other mention is the frame's
    # source line, 'raise PipesUsageError("...")').
    assert text.count("PipesUsageError:") == 1
    assert text.count(USAGE_ERROR_LAST_LINE) == 1
    assert text.count('raise PipesUsageError("asset key out of scope")') == 1  # the frame, once
    assert text.count("Traceback (most recent call last):") == 1
    assert "The external process reported:" in text
    if forward_stdio:
        assert "Last output" not in text
    else:
        # The traceback printed on stderr is left out of the tail; the rest of the output is kept, once.
        assert "Last output of the external process (without the traceback above):" in text
        assert text.count("rows loaded: 10") == 1
        assert text.count("in <module>") == 0  # the printout's extra outer frame went with it
        # Nothing is lost: the error still carries the whole output.
        assert USAGE_ERROR_LAST_LINE in error.output_tail and "in <module>" in error.output_tail
    remote = error.remote_exception
    assert remote is not None
    assert str(remote) == USAGE_ERROR_LAST_LINE
    assert remote.format().count("PipesUsageError:") == 1


def test_a_qualified_chained_exception_printed_with_crlf_is_not_repeated(write_script: WriteScript) -> None:
    (script_dir := write_script("", "setup_marker.txt").parent / "mylib").mkdir()
    (script_dir / "__init__.py").write_text("")
    (script_dir / "errors.py").write_text("class LoadError(Exception):\n    pass\n")
    script = write_script("""
        import io
        import sys
        from pipes_ext import open_pipes
        from mylib.errors import LoadError

        # What a Windows-style console writes: every line ends with \\r\\n.
        sys.stderr = io.TextIOWrapper(sys.stderr.buffer, newline="\\r\\n", line_buffering=True)

        def load():
            raise KeyError("missing column")

        def main():
            with open_pipes():
                print("before the failure", file=sys.stderr)
                try:
                    load()
                except KeyError as exc:
                    raise LoadError("cannot load rows") from exc

        main()
    """)
    error = failure([PYTHON, str(script)], forward_stdio=False)
    text = str(error)
    assert "\r\n" in error.output_tail
    assert text.splitlines()[0].endswith("failed with exit code 1 with mylib.errors.LoadError: cannot load rows")
    assert text.count("LoadError") == 2  # the summary, once; and the frame that raised it ("raise LoadError(...)")
    assert text.count("mylib.errors.LoadError: cannot load rows") == 1
    assert text.count("KeyError: 'missing column'") == 1  # the cause, in the reported traceback only
    assert text.count('raise KeyError("missing column")') == 1
    assert text.count("The above exception was the direct cause") == 1
    assert text.count("before the failure") == 1
    assert "Last output of the external process (without the traceback above):" in text


def test_a_tail_that_starts_inside_the_printed_traceback_is_dropped(write_script: WriteScript) -> None:
    # Two alternating functions, so no frame repeats and the printout is longer than the kept tail (64 KiB):
    # the tail starts in the middle of the traceback, probably in the middle of one of its lines.
    script = write_script("""
        import sys
        from pipes_ext import open_pipes

        sys.setrecursionlimit(10_000)
        PADDING = "x" * 60

        def ping(n):
            if n == 0:
                raise RuntimeError("deep failure")
            pong(n - 1)  # """ + "p" * 40 + """

        def pong(n):
            ping(n - 1)  # """ + "q" * 40 + """

        with open_pipes():
            ping(1500)
    """)
    error = failure([PYTHON, str(script)], forward_stdio=False)
    text = str(error)
    assert len(error.output_tail) >= 60 * 1024  # the kept tail was full: its start was cut
    assert text.splitlines()[0].endswith("failed with exit code 1 with RuntimeError: deep failure")
    assert text.count("RuntimeError: deep failure") == 1
    assert "Last output" not in text


def test_a_peer_whose_message_does_not_name_its_type_gets_it_once(write_script: WriteScript) -> None:
    script = write_script("""
        import os
        from pipes_ext import decode_param, open_pipes
        from pipes_ext._protocol import dumps_message
        pipes = open_pipes()
        path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
        exception = {"name": "DivideByZero", "message": "cannot divide", "stack": ["  at divide (calc.js:3)\\n"],
                     "cause": None, "context": None}
        with open(path, "a") as f:
            f.write(dumps_message("closed", {"exception": exception}) + "\\n")
        os._exit(2)
    """)
    error = failure([PYTHON, str(script)], forward_stdio=False)
    text = str(error)
    assert text.splitlines()[0].endswith("failed with exit code 2 with DivideByZero: cannot divide")
    assert text.count("DivideByZero") == 1 and text.count("cannot divide") == 1
    assert "at divide (calc.js:3)" in text
    remote = error.remote_exception
    assert remote is not None and str(remote) == "DivideByZero: cannot divide"
    assert remote.format().count("DivideByZero") == 1


def test_remote_exception_summary_names_the_type_once() -> None:
    def remote(name: str | None, message: str) -> PipesRemoteException:
        return PipesRemoteException(name=name, message=message, stack=())

    assert str(remote("ValueError", "ValueError: bad\n")) == "ValueError: bad"
    assert str(remote("PipesUsageError", "pipes_ext._errors.PipesUsageError: x\n")) == (
        "pipes_ext._errors.PipesUsageError: x")
    assert str(remote("KeyboardInterrupt", "KeyboardInterrupt\n")) == "KeyboardInterrupt"
    assert str(remote("Error", "cannot divide")) == "Error: cannot divide"
    assert str(remote("Error", "")) == "Error"
    assert str(remote(None, "something broke")) == "something broke"
    # A message that only mentions the name further on still gets it in front.
    assert str(remote("Timeout", "Error: Timeout after 3 s")) == "Timeout: Error: Timeout after 3 s"
    chained = PipesRemoteException("ValueError", "ValueError: outer\n", ("  File 'x', line 1\n",),
                                   cause=remote("Oops", "inner"))
    formatted = chained.format()
    assert formatted.count("ValueError") == 1 and formatted.count("Oops") == 1
    assert formatted.endswith("ValueError: outer\n")
    assert "ValueError" not in chained.format(last_summary=False)
    assert "Oops: inner" in chained.format(last_summary=False)


# ---------------------------------------------------------------------------------------------- crashed before opening


def test_a_crash_on_import_is_said_with_its_last_stderr_line(
    write_script: WriteScript, caplog: pytest.LogCaptureFixture
) -> None:
    script = write_script(CRASH_ON_IMPORT, "crash.py")
    caplog.set_level(logging.DEBUG)
    error = failure([PYTHON, str(script)], forward_stdio=False)
    text = str(error)
    assert text.splitlines()[0] == (
        f"the external process {str(script)!r} crashed (exit code 1) before opening the Pipes channel; "
        f"its last stderr line: {CRASH_LAST_LINE}")
    assert text.count(CRASH_LAST_LINE) == 1  # not again at the end of the tail
    assert text.count("import nonexistent_module_for_pipes_tests") == 1  # the tail, up to that line
    assert "Last output of the external process (without the line quoted above):" in text
    assert "never opened" not in text
    assert error.exit_code == 1
    assert error.invocation.last_output_line == CRASH_LAST_LINE
    assert not [r for r in caplog.records if "never opened" in r.getMessage()]


def test_a_crash_with_stderr_forwarded_to_ours_quotes_its_line_and_still_shows_it(
    write_script: WriteScript, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The default (forward_stdio, no stderr=): the child's stderr is read and passed on to ours, so the error
    says why it crashed, and the traceback still appears on our stderr as it would have."""
    script = write_script(CRASH_ON_IMPORT, "crash.py")
    caplog.set_level(logging.DEBUG)
    error = failure([PYTHON, str(script)])
    assert str(error).splitlines()[0] == (
        f"the external process {str(script)!r} crashed (exit code 1) before opening the Pipes channel; "
        f"its last stderr line: {CRASH_LAST_LINE}")
    assert error.invocation.last_output_line == CRASH_LAST_LINE
    assert not [r for r in caplog.records if "never opened" in r.getMessage()]
    err = capfd.readouterr().err
    assert err.count(CRASH_LAST_LINE) == 1 and "Traceback (most recent call last):" in err


def test_a_crash_with_stderr_handed_to_a_file_is_said_without_a_line(
    write_script: WriteScript, tmp_path: Path
) -> None:
    """A real file given as stderr= is handed to the child as it is (nothing read in between): no line to quote,
    and the file has it all."""
    script = write_script(CRASH_ON_IMPORT, "crash.py")
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        with pytest.raises(PipesExecutionError) as info:
            PipesSubprocessClient().run(command=[PYTHON, str(script)], stderr=stderr)
    assert str(info.value) == (
        f"the external process {str(script)!r} crashed (exit code 1) before opening the Pipes channel")
    assert CRASH_LAST_LINE in (tmp_path / "stderr.txt").read_text()


def test_a_crash_read_through_a_stderr_callable_quotes_its_line(write_script: WriteScript) -> None:
    script = write_script(CRASH_ON_IMPORT, "crash.py")
    forwarded: list[bytes] = []
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient().run(command=[PYTHON, str(script)], stderr=forwarded.append)
    assert str(info.value).splitlines()[0].endswith(f"its last stderr line: {CRASH_LAST_LINE}")
    assert CRASH_LAST_LINE in b"".join(forwarded).decode()  # and it was forwarded all the same


def test_the_quoted_line_is_escaped_and_cut(write_script: WriteScript) -> None:
    script = write_script("""
        import sys
        sys.stderr.write("first line\\n")
        sys.stderr.write("\\x1b[31mboom\\x1b[0m \\u202e" + "y" * 1000 + "   \\n\\n  \\n")
        sys.exit(3)
    """)
    error = failure([PYTHON, str(script)], forward_stdio=False)
    headline = str(error).splitlines()[0]
    assert headline.endswith(" characters)")
    assert "its last stderr line: \\x1b[31mboom\\x1b[0m \\u202e" + "y" * 100 in headline
    assert "\x1b" not in headline and "\u202e" not in headline
    assert f"... ({len('x[31mboomx[0m x') + 1000} characters)" in headline
    assert len(headline) < 600


def test_a_child_killed_before_opening_says_so(write_script: WriteScript) -> None:
    script = write_script("""
        import os, signal, sys
        sys.stderr.write("about to die\\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    error = failure([PYTHON, str(script)], forward_stdio=False)
    assert str(error).splitlines()[0] == (
        f"the external process {str(script)!r} was killed by SIGKILL before opening the Pipes channel; "
        "its last stderr line: about to die")


def test_not_strict_a_failing_command_is_not_said_to_have_crashed_before_opening(write_script: WriteScript) -> None:
    script = write_script("import sys\nsys.stderr.write('disk full\\n')\nsys.exit(4)\n")
    error = failure([PYTHON, str(script)], forward_stdio=False, strict=False)
    assert str(error) == (
        f"the external process {str(script)!r} failed with exit code 4; its last stderr line: disk full")


def test_a_failure_after_opening_without_a_report_quotes_the_last_line(write_script: WriteScript) -> None:
    script = write_script("""
        import os, sys
        from pipes_ext import open_pipes
        open_pipes()
        sys.stderr.write("lost the database connection\\n")
        sys.stderr.flush()
        os._exit(5)
    """)
    error = failure([PYTHON, str(script)], forward_stdio=False)
    assert str(error) == (
        f"the external process {str(script)!r} failed with exit code 5; its last stderr line: lost the database "
        "connection")


def test_exit_zero_without_opening_keeps_the_debugging_hint(
    write_script: WriteScript, caplog: pytest.LogCaptureFixture
) -> None:
    script = write_script("print('not a pipes process')\n", "plain.py")
    caplog.set_level(logging.DEBUG)
    error = failure([PYTHON, str(script)], forward_stdio=False)
    text = str(error)
    assert text.startswith(f"the external process {str(script)!r} exited 0 but never opened the Pipes channel. "
                           "The context was injected with")
    assert "Messages were expected through" in text and "strict=False" in text
    assert not [r for r in caplog.records if "never opened" in r.getMessage()]  # said once: in the error
    invocation = PipesSubprocessClient(forward_stdio=False, strict=False).run(command=[PYTHON, str(script)])
    assert invocation.exit_code == 0
    warnings = [r.getMessage() for r in caplog.records if "never opened" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"[pipes] the external process {str(script)!r} never opened the Pipes channel. "
                                  "The context was injected with")


def test_the_async_client_says_a_crash_the_same_way(write_script: WriteScript) -> None:
    script = write_script(CRASH_ON_IMPORT, "crash.py")

    async def run() -> None:
        await PipesAsyncSubprocessClient(forward_stdio=False).run(command=[PYTHON, str(script)])

    with pytest.raises(PipesExecutionError) as info:
        asyncio.run(run())
    assert str(info.value).splitlines()[0] == (
        f"the external process {str(script)!r} crashed (exit code 1) before opening the Pipes channel; "
        f"its last stderr line: {CRASH_LAST_LINE}")


def test_a_ray_job_that_crashed_is_said_with_the_last_line_of_its_log(ray_head: RayHead,
                                                                    write_script: WriteScript) -> None:
    from pipes_core.ray import PipesRayJobClient

    script = write_script("print('starting', flush=True)\n" + CRASH_ON_IMPORT, "crash.py")
    with pytest.raises(PipesExecutionError) as info:
        PipesRayJobClient(ray_head.address).run(command=[PYTHON, str(script)], stdout=lambda data: None,
                                                timeout_seconds=300)
    text = str(info.value)
    headline = text.splitlines()[0]
    assert "crashed (exit code 1, ended in Ray job state FAILED" in headline
    assert headline.endswith(f") before opening the Pipes channel; its last log line: {CRASH_LAST_LINE}")
    assert text.count(CRASH_LAST_LINE) == 1
    assert "starting" in text  # the rest of the log is still shown
    assert info.value.invocation.last_output_line_source == "log"


# ---------------------------------------------------------------------------------------------- the command line


def run_pipes(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PIPES, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_pipes_run_says_a_crash_with_its_last_stderr_line(write_script: WriteScript) -> None:
    script = write_script(CRASH_ON_IMPORT, "crash.py")
    expected = (f"the external process {str(script)!r} crashed (exit code 1) before opening the Pipes channel; "
                f"its last stderr line: {CRASH_LAST_LINE}")
    human = run_pipes("run", "--", PYTHON, str(script))
    assert human.returncode == 1
    assert f"error     {expected}" in human.stdout.splitlines()
    assert "never opened" not in human.stdout + human.stderr
    # The child's stderr was still forwarded, whole.
    assert "Traceback (most recent call last):" in human.stderr and CRASH_LAST_LINE in human.stderr
    assert "Traceback" not in human.stdout  # ... and no traceback of ours
    as_json = run_pipes("run", "--json", "--", PYTHON, str(script))
    assert as_json.returncode == 1
    summary = json.loads(as_json.stdout.splitlines()[-1])
    assert summary["event"] == "summary" and summary["opened"] is False
    assert summary["error"] == expected
    assert "never opened" not in as_json.stdout + as_json.stderr


def test_pipes_run_escapes_the_quoted_line(write_script: WriteScript) -> None:
    script = write_script("import sys\nsys.stderr.write('\\x1b]0;owned\\x07 gone\\n')\nsys.exit(2)\n")
    human = run_pipes("run", "--", PYTHON, str(script))
    assert human.returncode == 2
    error_line = next(line for line in human.stdout.splitlines() if line.startswith("error"))
    assert error_line.endswith("its last stderr line: \\x1b]0;owned\\x07 gone")
    assert "\x1b" not in human.stdout


def test_pipes_run_keeps_the_never_opened_hint_for_exit_zero(write_script: WriteScript) -> None:
    script = write_script("print('plain')\n", "plain.py")
    human = run_pipes("run", "--", PYTHON, str(script))
    assert human.returncode == 1
    error_line = next(line for line in human.stdout.splitlines() if line.startswith("error"))
    assert "exited 0 but never opened the Pipes channel. The context was injected with" in error_line


# ---------------------------------------------------------------------------------------------- the tail, unit by unit


def _remote(message: str, stack: tuple[str, ...] = ('  File "job.py", line 3, in main\n    fail()\n',),
            **links: PipesRemoteException) -> PipesRemoteException:
    return PipesRemoteException(name=message.split(":")[0], message=message + "\n", stack=stack, **links)


def _details(remote: PipesRemoteException | None, tail: str, line: str = "") -> str:
    from pipes_core.protocol.failures import failure_details

    return failure_details(remote, tail, line, says_remote=remote is not None)


PRINTOUT = (
    "Traceback (most recent call last):\n"
    '  File "job.py", line 9, in <module>\n'
    "    main()\n"
    '  File "job.py", line 3, in main\n'
    "    fail()\n"
    "ValueError: bad\n"
)


def test_tail_context_chain_and_a_cause_without_traceback_are_removed_whole() -> None:
    inner = PipesRemoteException(name="KeyError", message="KeyError: 'k'\n", stack=())  # never raised: no frames
    remote = _remote("ValueError: bad", context=inner)
    tail = ("before\n" "KeyError: 'k'\n\nDuring handling of the above exception, another exception occurred:\n\n"
            + PRINTOUT + "after\n")
    details = _details(remote, tail)
    assert "before\nafter" in details
    assert details.count("KeyError: 'k'") == 1  # in the reported chain only
    assert "During handling" in details and details.count("During handling") == 1


def test_tail_printed_twice_is_removed_twice_and_other_lines_stay_in_order() -> None:
    details = _details(_remote("ValueError: bad"), "one\n" + PRINTOUT + "two\n" + PRINTOUT + "three\n")
    assert details.endswith("(without the traceback above):\none\ntwo\nthree")


def test_tail_cut_in_the_middle_of_a_frame_line_is_removed() -> None:
    cut = PRINTOUT[PRINTOUT.index("in <module>") + 3:]  # starts mid-line: "<module>\n    main()\n..."
    assert "Last output" not in _details(_remote("ValueError: bad"), cut)
    cut_in_code = PRINTOUT[PRINTOUT.index("ain()"):]
    assert "Last output" not in _details(_remote("ValueError: bad"), cut_in_code)


def test_tail_lines_that_only_look_like_the_message_are_kept() -> None:
    remote = _remote("ValueError: bad")
    # The message without a traceback before it (printed by the process itself) is not a printout.
    assert "report: ValueError: bad" in _details(remote, "report: ValueError: bad\n")
    # At the very start of the tail, the message alone is taken for the end of a printout cut just before it.
    assert _details(remote, "ValueError: bad\nmore\n").endswith("(without the traceback above):\nmore")
    # A message of another exception's printout is kept whole.
    other = PRINTOUT.replace("ValueError: bad", "TypeError: other")
    assert "TypeError: other" in _details(remote, other)


def test_tail_output_without_a_newline_before_the_printout_is_kept() -> None:
    details = _details(_remote("ValueError: bad"), "progress 50%" + PRINTOUT + "after\n")
    assert details.endswith("(without the traceback above):\nprogress 50%\nafter")


def test_tail_with_a_multi_line_message_is_removed() -> None:
    remote = _remote("ValueError: first\nsecond line")
    tail = PRINTOUT.replace("ValueError: bad\n", "ValueError: first\nsecond line\n")
    assert "Last output" not in _details(remote, tail)


def test_tail_of_garbage_is_shown_as_is_and_bounded() -> None:
    garbage = "\x00\x1b[2J" + "z" * 100_000 + "\n" + "\r" * 50 + "\n\n" + "Traceback (most recent call last):\n" * 3
    details = _details(_remote("ValueError: bad"), garbage)
    assert details.count("\n") < 20 and len(details) < 5_000  # the tail's last 4,000 characters, at most
    assert _details(None, "") == "" and _details(None, "\n\n  \n") == ""


def test_the_quoted_line_is_left_out_of_the_tail_only_when_it_is_the_last_line() -> None:
    assert _details(None, "a\nb\n", "b") == (
        "\n\nLast output of the external process (without the line quoted above):\na")
    assert _details(None, "a\nb\n", "a") == "\n\nLast output of the external process:\na\nb"


def test_a_hostile_tail_is_judged_quickly() -> None:
    # Every line looks like the end of a printout, or like a frame: the scan stays linear (a hang would show
    # here; the bound only catches one).
    import time

    remote = _remote("ValueError: bad\n" * 50)
    tail = ("ValueError: bad\n" * 60_000) + ("  x\n" * 30_000)
    started = time.monotonic()
    _details(remote, tail)
    _details(_remote("ValueError: bad"), "  x\nValueError: bad\n" * 30_000)
    assert time.monotonic() - started < 60
