"""PipesSubprocessClient with real child processes: results, failures, lifecycle, env, termination, leaks."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesExecutionError,
    PipesRunContext,
    PipesSubprocessClient,
    PipesTimeoutError,
    PipesUsageError,
)
from tests.support.helpers import PYTHON, wait_until

WriteScript = Callable[..., Path]


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point tempfile (the default injector and reader) at a directory of our own, to look for leftovers."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    yield directory


def pipes_leftovers(directory: Path) -> list[str]:
    prefixes = ("pipes-context-", "pipes-messages-")
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(prefixes))


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def is_alive(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's zombie may wait for a PID 1 that does not reap)."""
    state = proc_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = proc_state(int(entry))
            if state is not None and state[1] == pid:
                found.add(int(entry))
    return found


def open_fds() -> dict[str, str]:
    """This process's open file descriptors and what they point to."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the directory's own fd, closed by now
            pass
    return fds



# ---------------------------------------------------------------------------------------------- success


SUCCESS_CHILD = """
import sys
from pipes_ext import open_pipes

with open_pipes() as pipes:
    assert pipes.extras == {"rows": 10}
    pipes.log.info("starting")
    pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows")}, data_version="v1",
                                       asset_key="a")
    pipes.report_asset_check("positive", passed=True, asset_key="a")
    pipes.report_custom_message({"argv": sys.argv[1:]})
"""


def test_success_with_results(write_script: WriteScript, private_tmp: Path) -> None:
    script = write_script(SUCCESS_CHILD)
    invocation = PipesSubprocessClient().run(
        context=PipesRunContext(asset_keys=["a", "b"]),
        command=[PYTHON, str(script), "x", "y"],
        extras={"rows": 10},
        metadata={"run": "r"},
    )
    assert invocation.exit_code == 0
    assert not invocation.missing_closed
    assert invocation.duration_seconds > 0
    results = invocation.get_results()
    assert results == [
        MaterializeResult("a", {"rows": MetadataValue("int", 10), "run": MetadataValue("text", "r")}, "v1"),
        AssetCheckResult("a", "positive", True, "ERROR", {"run": MetadataValue("text", "r")}),
        MaterializeResult("b", {"run": MetadataValue("text", "r")}, implicit=True),
    ]
    assert invocation.get_asset_check_results() == [results[1]]
    assert invocation.get_custom_messages() == [{"argv": ["x", "y"]}]
    assert invocation.session.get_logs()[0].message == "starting"
    with pytest.raises(PipesUsageError, match="exactly one materialization"):
        invocation.get_materialize_result()
    assert invocation.get_materialize_result(implicit_materializations=False) == results[0]
    assert pipes_leftovers(private_tmp) == []


def test_string_command_is_split_and_empty_command_rejected(write_script: WriteScript) -> None:
    script = write_script(SUCCESS_CHILD, "with space.py")
    invocation = PipesSubprocessClient().run(
        context=PipesRunContext(asset_keys=["a"]),
        command=f"{shlex.quote(PYTHON)} {shlex.quote(str(script))} q",
        extras={"rows": 10},
    )
    assert invocation.get_custom_messages() == [{"argv": ["q"]}]
    with pytest.raises(PipesUsageError, match="empty"):
        PipesSubprocessClient().run(command=[])


# ---------------------------------------------------------------------------------------------- failures


FAILING_CHILD = """
from pipes_ext import open_pipes

def inner():
    raise KeyError("missing-key")

with open_pipes() as pipes:
    pipes.report_custom_message("before the failure")
    try:
        inner()
    except KeyError as exc:
        raise ValueError("bad value 42") from exc
"""


def test_non_zero_exit_carries_the_remote_exception(write_script: WriteScript) -> None:
    script = write_script(FAILING_CHILD)
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient().run(command=[PYTHON, str(script)])
    error = info.value
    assert error.exit_code == 1
    remote = error.remote_exception
    assert remote is not None
    assert remote.name == "ValueError"
    assert "bad value 42" in remote.message
    assert any("raise ValueError" in frame for frame in remote.stack)
    assert remote.cause is not None
    assert remote.cause.name == "KeyError"
    assert "missing-key" in remote.cause.message
    assert any("inner()" in frame or "in inner" in frame for frame in remote.cause.stack)
    text = str(error)
    # The type is named once, not "ValueError: ValueError: ...".
    assert text.splitlines()[0].endswith("failed with exit code 1 with ValueError: bad value 42")
    assert "ValueError" in text and "bad value 42" in text
    assert "missing-key" in text and "direct cause" in text
    # What was received before the failure is available on the error.
    assert error.invocation.get_custom_messages() == ["before the failure"]


def test_non_zero_exit_without_a_reported_exception(write_script: WriteScript) -> None:
    script = write_script("import sys\nfrom pipes_ext import open_pipes\nopen_pipes()\nsys.exit(7)\n")
    with pytest.raises(PipesExecutionError, match="failed with exit code 7") as info:
        PipesSubprocessClient().run(command=[PYTHON, str(script)])
    assert info.value.exit_code == 7
    assert info.value.remote_exception is None


def test_non_python_remote_exception_is_named(write_script: WriteScript) -> None:
    script = write_script("""
        import os
        from pipes_ext import decode_param, open_pipes
        from pipes_ext._protocol import dumps_message
        pipes = open_pipes()
        path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
        exception = {"name": "DivideByZero", "message": "cannot divide", "stack": [], "cause": None,
                     "context": None}
        with open(path, "a") as f:
            f.write(dumps_message("closed", {"exception": exception}) + "\\n")
        os._exit(2)
    """)
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient().run(command=[PYTHON, str(script)])
    first_line = str(info.value).splitlines()[0]
    assert first_line.endswith("failed with exit code 2 with DivideByZero: cannot divide")
    assert info.value.remote_exception is not None
    assert info.value.remote_exception.stack == ()


def test_exit_zero_with_a_reported_exception_is_a_failure(write_script: WriteScript) -> None:
    script = write_script("""
        from pipes_ext import open_pipes
        try:
            with open_pipes():
                raise RuntimeError("swallowed")
        except RuntimeError:
            pass
    """)
    with pytest.raises(PipesExecutionError, match="exited 0 but reported an exception") as info:
        PipesSubprocessClient().run(command=[PYTHON, str(script)])
    assert info.value.remote_exception is not None
    assert info.value.remote_exception.name == "RuntimeError"


def test_never_opened_is_an_error_unless_not_strict(write_script: WriteScript, private_tmp: Path) -> None:
    script = write_script("print('not a pipes process')\n")
    with pytest.raises(PipesExecutionError, match="never opened the Pipes channel") as info:
        PipesSubprocessClient(forward_stdio=False).run(command=[PYTHON, str(script)])
    assert info.value.exit_code == 0
    assert "strict=False" in str(info.value)
    invocation = PipesSubprocessClient(strict=False, forward_stdio=False).run(command=[PYTHON, str(script)])
    assert invocation.exit_code == 0
    assert not invocation.session.opened
    assert "not a pipes process" in invocation.output_tail
    invocation = PipesSubprocessClient(forward_stdio=False).run(command=[PYTHON, str(script)], strict=False)
    assert invocation.exit_code == 0
    assert pipes_leftovers(private_tmp) == []


def test_opened_but_not_closed(write_script: WriteScript, caplog: pytest.LogCaptureFixture) -> None:
    script = write_script("""
        import os
        from pipes_ext import open_pipes
        pipes = open_pipes()
        pipes.report_custom_message("sent")
        os._exit(0)
    """)
    with caplog.at_level(logging.WARNING):
        invocation = PipesSubprocessClient().run(command=[PYTHON, str(script)])
    assert invocation.missing_closed is True
    assert invocation.exit_code == 0
    assert invocation.get_custom_messages() == ["sent"]
    client_warnings = [r.getMessage() for r in caplog.records if r.name == "pipes_core"]
    assert len(client_warnings) == 1 and "never sent closed" in client_warnings[0]


def test_protocol_issues_fail_in_strict_mode(write_script: WriteScript) -> None:
    script = write_script("""
        import os
        from pipes_ext import decode_param, open_pipes
        path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
        with open_pipes() as pipes:
            with open(path, "a") as f:
                f.write("garbage line\\n")
            pipes.report_custom_message(1)
    """)
    with pytest.raises(PipesExecutionError, match="broke the Pipes protocol 1 time") as info:
        PipesSubprocessClient().run(command=[PYTHON, str(script)])
    assert "garbage line" in str(info.value)
    invocation = PipesSubprocessClient(strict=False).run(command=[PYTHON, str(script)])
    assert invocation.session.issue_count == 1
    assert invocation.get_custom_messages() == [1]


def test_killed_by_signal(write_script: WriteScript) -> None:
    script = write_script("""
        import os, signal
        from pipes_ext import open_pipes
        pipes = open_pipes()
        pipes.report_custom_message("last words")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    with pytest.raises(PipesExecutionError, match="killed by SIGKILL") as info:
        PipesSubprocessClient().run(command=[PYTHON, str(script)])
    assert info.value.exit_code == -signal.SIGKILL
    assert info.value.invocation.get_custom_messages() == ["last words"]
    assert info.value.invocation.missing_closed


@pytest.mark.parametrize(
    "command", [["/nonexistent/definitely-not-here"], [os.devnull], ["no-such-command-pipes-test", "arg"]]
)
def test_a_command_that_cannot_start(command: list[str], private_tmp: Path) -> None:
    with pytest.raises(PipesExecutionError, match="cannot start the external process") as info:
        PipesSubprocessClient().run(command=command)
    assert command[0] in str(info.value)
    assert info.value.exit_code is None
    assert pipes_leftovers(private_tmp) == []


def test_a_missing_cwd_cannot_start(private_tmp: Path, tmp_path: Path) -> None:
    with pytest.raises(PipesExecutionError, match="cannot start"):
        PipesSubprocessClient(cwd=str(tmp_path / "missing")).run(command=[PYTHON, "-c", "pass"])
    assert pipes_leftovers(private_tmp) == []


# ---------------------------------------------------------------------------------------------- env and cwd


ENV_CHILD = """
import os
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.report_custom_message({
        "env": {k: os.environ.get(k) for k in ("PT_A", "PT_B", "PT_C", "PT_D")},
        "cwd": os.getcwd(),
    })
"""


def test_env_precedence(write_script: WriteScript, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PT_A", "os")
    monkeypatch.setenv("PT_B", "os")
    monkeypatch.setenv("PT_C", "os")
    # Bogus bootstrap values at every level below the session's own: the child only works if those win.
    monkeypatch.setenv("DAGSTER_PIPES_CONTEXT", "bogus-os")
    client = PipesSubprocessClient(
        env={"PT_B": "client", "PT_C": "client", "DAGSTER_PIPES_MESSAGES": "bogus-client"}
    )
    script = write_script(ENV_CHILD)
    invocation = client.run(
        command=[PYTHON, str(script)],
        env={"PT_C": "run", "PT_D": "run", "DAGSTER_PIPES_CONTEXT": "bogus-run"},
    )
    (message,) = invocation.get_custom_messages()
    assert message["env"] == {"PT_A": "os", "PT_B": "client", "PT_C": "run", "PT_D": "run"}
    # The client's env is not changed by a run.
    assert client.env == {"PT_B": "client", "PT_C": "client", "DAGSTER_PIPES_MESSAGES": "bogus-client"}


def test_cwd(write_script: WriteScript, tmp_path: Path) -> None:
    client_dir = tmp_path / "client-dir"
    run_dir = tmp_path / "run-dir"
    client_dir.mkdir()
    run_dir.mkdir()
    script = write_script(ENV_CHILD)
    client = PipesSubprocessClient(cwd=str(client_dir))
    (message,) = client.run(command=[PYTHON, str(script)]).get_custom_messages()
    assert os.path.samefile(message["cwd"], client_dir)
    (message,) = client.run(command=[PYTHON, str(script)], cwd=str(run_dir)).get_custom_messages()
    assert os.path.samefile(message["cwd"], run_dir)
    (message,) = PipesSubprocessClient().run(command=[PYTHON, str(script)]).get_custom_messages()
    assert os.path.samefile(message["cwd"], os.getcwd())


# ---------------------------------------------------------------------------------------------- timeout


# A timeout long enough for a child to start Python, open the channel and install its signal handlers.
CHILD_READY_SECONDS = 5.0


def test_timeout_terminates_politely(write_script: WriteScript) -> None:
    script = write_script("""
        import signal, time
        from pipes_ext import open_pipes
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with open_pipes() as pipes:
            pipes.report_custom_message("started")
            time.sleep(30)
    """)
    started = time.monotonic()
    # The timeout leaves the child time to start and install its handler however loaded the machine (a signal
    # that arrives before would test the interpreter's start-up, not the escalation).
    with pytest.raises(PipesTimeoutError, match=r"ran past its timeout of 5\.0 s") as info:
        PipesSubprocessClient(termination_timeout_seconds=5).run(command=[PYTHON, str(script)],
                                                                 timeout_seconds=CHILD_READY_SECONDS)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, PipesExecutionError)
    # SIGINT reached the child: it reported KeyboardInterrupt on its way out.
    assert info.value.remote_exception is not None
    assert info.value.remote_exception.name == "KeyboardInterrupt"
    assert info.value.invocation.get_custom_messages() == ["started"]
    assert elapsed < 20 + CHILD_READY_SECONDS


def test_timeout_escalates_to_sigkill(write_script: WriteScript) -> None:
    script = write_script("""
        import signal, time
        from pipes_ext import open_pipes
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open_pipes() as pipes:
            pipes.report_custom_message("stubborn")
            time.sleep(60)
    """)
    started = time.monotonic()
    with pytest.raises(PipesTimeoutError) as info:
        PipesSubprocessClient(termination_timeout_seconds=0.5).run(command=[PYTHON, str(script)],
                                                                   timeout_seconds=CHILD_READY_SECONDS)
    elapsed = time.monotonic() - started
    assert info.value.exit_code == -signal.SIGKILL
    assert info.value.invocation.get_custom_messages() == ["stubborn"]
    print(f"\n[timeout] {CHILD_READY_SECONDS} s timeout + SIGINT + SIGTERM (0.5 s each) + SIGKILL: {elapsed:.2f} s")
    assert elapsed < 20 + CHILD_READY_SECONDS


# ---------------------------------------------------------------------------------------------- output


CHATTY_CHILD = """
import sys
from pipes_ext import open_pipes

chunk = "z" * 65535 + "\\n"
with open_pipes() as pipes:
    for i in range(80):  # 80 x 64 KiB = 5 MiB per stream, interleaved
        sys.stdout.write(chunk)
        sys.stderr.write(chunk)
    sys.stdout.write("END-OUT\\n")
    sys.stderr.write("END-ERR: " + sys.argv[1] + "\\n")
    sys.stdout.flush()
    sys.stderr.flush()
    pipes.report_custom_message("done")
    if sys.argv[1] == "fail":
        raise SystemExit(3)
"""


def test_forward_stdio_false_reads_a_chatty_child(write_script: WriteScript) -> None:
    script = write_script(CHATTY_CHILD)
    client = PipesSubprocessClient(forward_stdio=False, termination_timeout_seconds=1)
    invocation = client.run(command=[PYTHON, str(script), "ok"], timeout_seconds=60)
    assert invocation.exit_code == 0
    assert invocation.get_custom_messages() == ["done"]
    assert "END-OUT" in invocation.output_tail
    assert "END-ERR: ok" in invocation.output_tail
    # Only a bounded tail is kept, not 10 MiB.
    assert len(invocation.output_tail) <= 2 * 64 * 1024 + 2


def test_a_failing_chatty_child_reports_its_output_tail(write_script: WriteScript) -> None:
    script = write_script(CHATTY_CHILD)
    client = PipesSubprocessClient(forward_stdio=False, termination_timeout_seconds=1)
    with pytest.raises(PipesExecutionError, match="failed with exit code 3") as info:
        client.run(command=[PYTHON, str(script), "fail"], timeout_seconds=60)
    text = str(info.value)
    assert "Last output of the external process" in text
    assert "END-ERR: fail" in text
    assert "END-ERR: fail" in info.value.output_tail
    assert len(text) < 10_000


# ---------------------------------------------------------------------------------------------- interruption


INTERRUPT_CHILD = """
import json, os, signal, subprocess, sys, time
from pipes_ext import open_pipes

workdir, mode = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGINT, signal.default_int_handler)

GRANDCHILD = (
    "import signal, sys, time\\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "open(sys.argv[1], 'w').close()\\n"
    "time.sleep(120)\\n"
)

def record(line):
    with open(os.path.join(workdir, "signals"), "a") as f:
        f.write(line + "\\n")

with open_pipes() as pipes:
    grand_ready = os.path.join(workdir, "grandchild-ready")
    grandchild = subprocess.Popen([sys.executable, "-c", GRANDCHILD, grand_ready], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(grand_ready):
        time.sleep(0.005)
    for i in range(100):
        pipes.report_custom_message({"before": i})
    if mode == "ignore":
        def on_int(signum, frame):
            received = time.monotonic()
            for i in range(500):  # written at the last moment: the orchestrator must still drain them
                pipes.report_custom_message({"after": i})
            record("SIGINT %f" % received)
        def on_term(signum, frame):
            record("SIGTERM %f" % time.monotonic())
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGTERM, on_term)
    with open(os.path.join(workdir, "ready.tmp"), "w") as f:
        json.dump({"child": os.getpid(), "grandchild": grandchild.pid}, f)
    os.replace(os.path.join(workdir, "ready.tmp"), os.path.join(workdir, "ready"))
    while True:
        time.sleep(0.05)
"""

ORCHESTRATOR = """
import json, os, signal, sys
from pipes_core import PipesCustomMessageEvent, PipesInterruptedError, PipesSubprocessClient

signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
workdir, child, mode = sys.argv[1], sys.argv[2], sys.argv[3]
payloads = []

def on_event(event):
    if isinstance(event, PipesCustomMessageEvent):
        payloads.append(event.payload)

def report(**fields):
    fields["payloads"] = payloads
    fields["sigterm_handler_restored"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with open(os.path.join(workdir, "orchestrator.json"), "w") as f:
        json.dump(fields, f)

try:
    PipesSubprocessClient(termination_timeout_seconds=1).run(
        command=[sys.executable, child, workdir, mode], on_event=on_event
    )
except KeyboardInterrupt:
    report(outcome="KeyboardInterrupt")
    raise
except PipesInterruptedError as exc:
    remote = exc.remote_exception
    report(outcome="PipesInterruptedError", exit_code=exc.exit_code, message=str(exc),
           remote=None if remote is None else remote.name)
    sys.exit(3)
report(outcome="returned")
"""


def run_interrupted_orchestrator(
    write_script: WriteScript, tmp_path: Path, mode: str, sig: int, *, twice: bool = False
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], dict[str, int], float, Path]:
    """Run ORCHESTRATOR, send it ``sig`` once the child is ready (``twice``: again once the child has handled
    the first SIGINT), and return its outcome, its report, the child and grandchild still running 5 s after
    it exited (then killed), the time it took to exit after the (first) signal, and its temp dir."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    orch_tmp = tmp_path / "orch-tmp"
    orch_tmp.mkdir()
    child = write_script(INTERRUPT_CHILD, "interrupt_child.py")
    orchestrator = write_script(ORCHESTRATOR, "orchestrator.py")
    env = {**os.environ, "TMPDIR": str(orch_tmp)}
    # Output goes to files, not pipes: a surviving child would hold a pipe open and hang the test.
    out_path, err_path = tmp_path / "orchestrator.out", tmp_path / "orchestrator.err"
    pids: dict[str, int] = {}
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [PYTHON, str(orchestrator), str(workdir), str(child), mode],
            env=env, stdout=out, stderr=err, start_new_session=True,
        )
    ready_path = workdir / "ready"
    try:
        assert wait_until(ready_path.exists, timeout=30), "the child never got ready"
        pids = json.loads(ready_path.read_text())
        assert is_alive(pids["child"]) and is_alive(pids["grandchild"])
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        if twice:
            signals = workdir / "signals"
            assert wait_until(lambda: signals.exists() and "SIGINT" in signals.read_text(), timeout=10)
            os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - sent
        survivors = {
            name: pid for name, pid in pids.items()
            if not wait_until(lambda p=pid: not is_alive(p), timeout=30, fail=False)
        }
    finally:
        for pid in (proc.pid, *pids.values()):  # only processes this test started
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    completed = subprocess.CompletedProcess(
        proc.args, proc.returncode, out_path.read_text(), err_path.read_text()
    )
    report = json.loads((workdir / "orchestrator.json").read_text())
    return completed, report, survivors, elapsed, orch_tmp


def test_sigint_to_the_orchestrator_escalates_and_drains(write_script: WriteScript, tmp_path: Path) -> None:
    completed, report, survivors, elapsed, orch_tmp = run_interrupted_orchestrator(
        write_script, tmp_path, "ignore", signal.SIGINT
    )
    # The orchestrator ended with KeyboardInterrupt, after terminating the child.
    assert report["outcome"] == "KeyboardInterrupt"
    assert "KeyboardInterrupt" in completed.stderr
    assert completed.returncode in (-signal.SIGINT, 1, 130)
    assert "terminating the external process" in completed.stderr
    # The child ignored SIGINT and SIGTERM (it recorded both), so only SIGKILL can have ended it.
    signals = (tmp_path / "work" / "signals").read_text().split("\n")
    names = [line.split()[0] for line in signals if line]
    assert names[:2] == ["SIGINT", "SIGTERM"], names
    got = {line.split()[0]: float(line.split()[1]) for line in signals if line}
    assert 0.5 < got["SIGTERM"] - got["SIGINT"] < 10  # it waited termination_timeout_seconds=1 first
    assert survivors == {}
    # Messages written before and during the interruption were all delivered (the channel was drained).
    payloads = report["payloads"]
    assert payloads == [{"before": i} for i in range(100)] + [{"after": i} for i in range(500)]
    assert pipes_leftovers(orch_tmp) == []
    print(f"\n[interrupt] SIGINT -> SIGTERM -> SIGKILL escalation: orchestrator exited {elapsed:.2f} s "
          f"after SIGINT (termination_timeout_seconds=1)")
    assert elapsed < 30


def test_a_second_sigint_kills_at_once(write_script: WriteScript, tmp_path: Path) -> None:
    """Ctrl-C twice: the second one skips the grace period, and the child is not left running."""
    completed, report, survivors, elapsed, orch_tmp = run_interrupted_orchestrator(
        write_script, tmp_path, "ignore", signal.SIGINT, twice=True
    )
    assert report["outcome"] == "KeyboardInterrupt"
    assert "KeyboardInterrupt" in completed.stderr
    assert survivors == {}, "left running"
    # Killed before the SIGTERM step was reached.
    assert "SIGTERM" not in (tmp_path / "work" / "signals").read_text()
    assert report["payloads"] == [{"before": i} for i in range(100)] + [{"after": i} for i in range(500)]
    assert pipes_leftovers(orch_tmp) == []
    print(f"\n[interrupt] double SIGINT: orchestrator exited {elapsed:.2f} s after the first SIGINT")
    assert elapsed < 30


def test_sigterm_to_the_orchestrator_raises_interrupted(write_script: WriteScript, tmp_path: Path) -> None:
    completed, report, survivors, elapsed, orch_tmp = run_interrupted_orchestrator(
        write_script, tmp_path, "default", signal.SIGTERM
    )
    assert report["outcome"] == "PipesInterruptedError", completed.stderr
    assert completed.returncode == 3
    assert "received SIGTERM" in report["message"]
    # The child got SIGINT first and reported the KeyboardInterrupt on its way out.
    assert report["remote"] == "KeyboardInterrupt"
    assert report["exit_code"] is not None and report["exit_code"] != 0
    assert report["sigterm_handler_restored"] is True
    assert survivors == {}
    assert report["payloads"] == [{"before": i} for i in range(100)]
    assert pipes_leftovers(orch_tmp) == []
    assert elapsed < 30


def test_the_sigterm_handler_is_restored_after_a_run(write_script: WriteScript) -> None:
    def marker(signum: int, frame: object) -> None:  # pragma: no cover - never called
        pass

    previous = signal.signal(signal.SIGTERM, marker)
    try:
        PipesSubprocessClient(strict=False).run(command=[PYTHON, "-c", "pass"])
        assert signal.getsignal(signal.SIGTERM) is marker
        with pytest.raises(PipesExecutionError):
            PipesSubprocessClient(strict=False).run(command=[PYTHON, "-c", "raise SystemExit(2)"])
        assert signal.getsignal(signal.SIGTERM) is marker
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- leaks


def test_many_runs_leave_no_processes_threads_fds_or_files(
    write_script: WriteScript, private_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = write_script("""
        import sys
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message(int(sys.argv[1]))
    """)
    me = os.getpid()
    children_before = children_of(me)
    fds_before = open_fds()

    def ours(fds: dict[str, str]) -> int:
        return sum(t == "anon_inode:inotify" or t.startswith(str(private_tmp)) for t in fds.values())

    threads_before = threading.active_count()
    outcomes: dict[str, int] = {}
    caplog.set_level(logging.ERROR)  # 100 "never opened" warnings are expected here
    quiet = PipesSubprocessClient(strict=False, forward_stdio=False, termination_timeout_seconds=0.5)
    for i in range(200):
        kind = i % 10
        try:
            if kind == 0:
                invocation = PipesSubprocessClient(forward_stdio=False).run(
                    command=[PYTHON, str(script), str(i)]
                )
                assert invocation.get_custom_messages() == [i]
            elif kind in (1, 2, 3, 4):
                quiet.run(command=["true"])
            elif kind == 5:
                quiet.run(command=["false"])
            elif kind == 6:
                quiet.run(command=["sh", "-c", "kill -9 $$"])
            elif kind == 7:
                quiet.run(command=["sleep", "5"], timeout_seconds=0.02)
            elif kind == 8:
                quiet.run(command=["/nonexistent/pipes-test-binary"])
            else:
                quiet.run(command=["sh", "-c", "echo out; echo err >&2; exit 0"])
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except PipesExecutionError as exc:
            name = type(exc).__name__
            outcomes[name] = outcomes.get(name, 0) + 1
    assert outcomes == {"ok": 120, "PipesExecutionError": 60, "PipesTimeoutError": 20}
    assert children_of(me) - children_before == set()
    assert pipes_leftovers(private_tmp) == []
    # Every run opened an inotify fd, a self-pipe and the messages file: none may remain. Other tests'
    # background threads may open a few fds meanwhile, hence the slack on the total.
    fds_after = open_fds()
    assert len(fds_after) <= len(fds_before) + 20, fds_after
    assert ours(fds_after) <= ours(fds_before), fds_after
    assert wait_until(lambda: threading.active_count() <= threads_before, timeout=30), [
        t.name for t in threading.enumerate()
    ]
