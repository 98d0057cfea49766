"""The ``pipes`` command line, end to end: real `pipes run` processes around real child scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, cli_json_events, raw_cli_json_events

PIPES = [sys.executable, "-m", "pipes_core"]
EXAMPLE = str(REPO_ROOT / "examples" / "hello_pipes.py")


def run_pipes(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PIPES, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


json_events = cli_json_events
raw_json_events = raw_cli_json_events


def test_human_mode_prints_each_event_and_a_summary() -> None:
    proc = run_pipes("run", "--asset", "examples/hello", "--extras", '{"rows": 4}', "--", sys.executable, EXAMPLE)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\033[" not in out  # plain when piped
    lines = out.splitlines()
    assert lines[0] == "[pipes] opened"
    assert any("INFO" in line and "hello from the external process" in line for line in lines)
    assert any(line.startswith("[pipes] materialized examples/hello data_version=14") for line in lines)
    assert "[pipes] check examples/hello:rows_positive passed (severity ERROR)" in lines
    assert '[pipes] message {"squares": [0, 1, 4, 9]}' in lines
    assert "[pipes] closed" in lines
    assert "status    succeeded" in out
    assert "assets    examples/hello" in out
    assert "checks    1 passed, 0 failed" in out


def test_json_mode_emits_one_object_per_event_with_stable_fields() -> None:
    proc = run_pipes("run", "--json", "--asset", "examples/hello", "--extras", '{"rows": 2}', "--",
                     sys.executable, EXAMPLE)
    assert proc.returncode == 0, proc.stderr
    events = json_events(proc.stdout)
    kinds = [e["event"] for e in events]
    assert kinds == ["opened", "log", "materialization", "check", "custom_message", "closed", "summary"]
    materialization = events[2]
    assert materialization["asset_key"] == "examples/hello"
    assert materialization["data_version"] == "1"
    assert materialization["metadata"] == {
        "rows": {"type": "int", "value": 2},
        "preview": {"type": "json", "value": [{"id": 0, "square": 0}, {"id": 1, "square": 1}]},
        "source": {"type": "url", "value": "https://example.com/data"},
    }
    assert events[3] == {"event": "check", "asset_key": "examples/hello", "check_name": "rows_positive",
                         "passed": True, "severity": "ERROR", "metadata": {"rows": {"type": "int", "value": 2}}}
    assert events[4] == {"event": "custom_message", "payload": {"squares": [0, 1]}}
    summary = events[-1]
    assert summary["exit_code"] == 0 and summary["materializations"] == 1 and summary["checks_passed"] == 1
    assert summary["opened"] is True and summary["closed"] is True


def test_json_mode_keeps_child_stdout_out_of_the_event_stream(write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        from pipes_ext import open_pipes
        print("plain child output")
        with open_pipes() as pipes:
            print("more child output")
            pipes.report_custom_message(1)
        """
    )
    proc = run_pipes("run", "--json", "--", sys.executable, str(script))
    assert proc.returncode == 0, proc.stderr
    events = json_events(proc.stdout)  # every stdout line parses as JSON
    assert [e["event"] for e in events] == ["opened", "custom_message", "closed", "summary"]
    assert "plain child output" in proc.stderr and "more child output" in proc.stderr


def test_failing_child_exit_code_and_remote_exception(write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        import sys
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.log.warning("about to fail")
            try:
                raise KeyError("inner")
            except KeyError as exc:
                raise ValueError("outer boom") from exc
        """
    )
    proc = run_pipes("run", "--json", "--", sys.executable, str(script))
    assert proc.returncode == 1
    events = json_events(proc.stdout)
    closed = next(e for e in events if e["event"] == "closed")
    exception = closed["exception"]
    assert isinstance(exception, dict)
    assert exception["name"] == "ValueError"
    assert "outer boom" in exception["message"]
    assert "KeyError: 'inner'" in exception["text"]
    assert "direct cause" in exception["text"]
    summary = events[-1]
    assert summary["exit_code"] == 1
    assert "ValueError" in str(summary["error"])

    human = run_pipes("run", "--", sys.executable, str(script))
    assert human.returncode == 1
    assert "closed with exception" in human.stdout and "outer boom" in human.stdout
    assert "failed (exit 1)" in human.stdout


def test_child_exit_code_is_passed_through(write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        import sys
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message("bye")
        sys.exit(7)
        """
    )
    proc = run_pipes("run", "--json", "--", sys.executable, str(script))
    assert proc.returncode == 7
    assert json_events(proc.stdout)[-1]["exit_code"] == 7


def test_never_opened_fails_unless_no_strict() -> None:
    strict = run_pipes("run", "--", sys.executable, "-c", "pass")
    assert strict.returncode == 1
    assert "never opened the Pipes channel" in strict.stdout
    relaxed = run_pipes("run", "--no-strict", "--", sys.executable, "-c", "pass")
    assert relaxed.returncode == 0, relaxed.stdout


def test_failed_error_check_only_fails_with_flag(write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_asset_check("non_empty", passed=False, severity="ERROR")
            pipes.report_asset_check("fresh", passed=False, severity="WARN")
        """
    )
    plain = run_pipes("run", "--json", "--asset", "t", "--", sys.executable, str(script))
    assert plain.returncode == 0
    summary = json_events(plain.stdout)[-1]
    assert summary["checks_failed"] == 2 and summary["failed_error_checks"] == 1
    flagged = run_pipes("run", "--json", "--fail-on-check-error", "--asset", "t", "--", sys.executable, str(script))
    assert flagged.returncode == 1
    assert "severity ERROR failed" in str(json_events(flagged.stdout)[-1]["error"])


def test_context_options_reach_the_child(write_script: Callable[..., Path], tmp_path: Path) -> None:
    script = write_script(
        """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message({"assets": pipes.asset_keys, "partition": pipes.partition_key,
                                         "extras": pipes.extras, "run_id": pipes.run_id})
        """
    )
    extras_file = tmp_path / "extras.json"
    extras_file.write_text('{"nested": {"k": [1, "ü"]}}', encoding="utf-8")
    for injector in ("env", "tempfile"):
        proc = run_pipes("run", "--json", "--asset", "b", "--asset", "a/x\\/y", "--partition", "2024-01-05",
                         "--extras-file", str(extras_file), "--run-id", "r-1", "--context-injector", injector,
                         "--", sys.executable, str(script))
        assert proc.returncode == 0, proc.stderr
        payload = next(e for e in json_events(proc.stdout) if e["event"] == "custom_message")["payload"]
        assert payload == {"assets": ["a/x\\/y", "b"], "partition": "2024-01-05",
                           "extras": {"nested": {"k": [1, "ü"]}}, "run_id": "r-1"}
    ctx_path, msg_path = tmp_path / "ctx.json", tmp_path / "msgs.ndjson"
    proc = run_pipes("run", "--json", "--asset", "c", "--partition", "p", "--context-injector", "file",
                     "--context-path", str(ctx_path), "--message-reader", "file", "--messages-path", str(msg_path),
                     "--", sys.executable, str(script))
    assert proc.returncode == 0, proc.stderr
    assert not ctx_path.exists() and not msg_path.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run"], "no command given"),
        (["run", "--"], "no command given"),
        (["run", "--extras", "{not json", "--", "true"], "--extras is not valid JSON"),
        (["run", "--extras", "[1, 2]", "--", "true"], "must be a JSON object"),
        (["run", "--asset", "a//b", "--", "true"], "invalid asset key"),
        (["run", "--asset", "a/", "--", "true"], "invalid asset key"),
        (["run", "--context-injector", "file", "--", "true"], "needs --context-path"),
        (["run", "--timeout", "0", "--", "true"], "--timeout must be positive"),
        (["frobnicate"], "invalid choice"),
        ([], "usage: pipes run"),
    ],
)
def test_bad_invocations_give_one_line_and_exit_2(args: list[str], expected: str) -> None:
    proc = run_pipes(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pipes: error:") and expected in lines[0]
    assert proc.stdout == ""


def test_command_not_found_exits_127() -> None:
    proc = run_pipes("run", "--", "/nonexistent/command-xyz")
    assert proc.returncode == 127
    assert "cannot start the external process" in proc.stdout


def test_timeout_terminates_the_child(write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        import time
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message("started")
            time.sleep(60)
        """
    )
    started = time.monotonic()
    proc = run_pipes("run", "--json", "--timeout", "1", "--", sys.executable, str(script))
    assert proc.returncode == 124
    assert time.monotonic() - started < 30
    events = json_events(proc.stdout)
    assert {"event": "custom_message", "payload": "started"} in events
    assert "timeout" in str(events[-1]["error"])


def test_ctrl_c_terminates_child_and_reports(write_script: Callable[..., Path], tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    script = write_script(
        f"""
        import os, time
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message("working")
            open({str(marker)!r}, "w").write(str(os.getpid()))
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([*PIPES, "run", "--json", "--", sys.executable, str(script)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "child never started"
        time.sleep(0.02)
    child_pid = int(marker.read_text())
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    events = json_events(stdout)
    assert {"event": "custom_message", "payload": "working"} in events  # drained before exiting
    closed = [e for e in events if e["event"] == "closed"]
    assert closed and closed[0]["exception"] is not None  # the child reported its KeyboardInterrupt
    assert closed[0]["exception"]["name"] == "KeyboardInterrupt"  # type: ignore[index]
    assert events[-1]["error"] == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)


def test_json_events_carry_time_run_id_and_the_injected_context() -> None:
    """Every object says when it was handled and of which run; ``opened`` shows the context given (the issue:
    ``"extras": {}`` was printed although ``--extras`` was given), apart from what the process sent."""
    before = datetime.now(timezone.utc)
    proc = run_pipes("run", "--json", "--run-id", "run-42", "--job-name", "nightly", "--asset", "examples/hello",
                     "--partition", "2026-11-29", "--extras", '{"rows": 2, "tag": "x"}', "--",
                     sys.executable, EXAMPLE)
    after = datetime.now(timezone.utc)
    assert proc.returncode == 0, proc.stderr
    events = raw_json_events(proc.stdout)
    assert all(list(e)[:3] == ["event", "time", "run_id"] for e in events)
    assert {e["run_id"] for e in events} == {"run-42"}
    times = [datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00")) for e in events]
    assert all(before - timedelta(seconds=1) <= t <= after + timedelta(seconds=1) for t in times)
    assert times == sorted(times)
    assert all(str(e["time"]).endswith("Z") and len(str(e["time"])) == len("2026-11-29T09:44:28.485Z")
               for e in events)
    opened = events[0]
    assert opened["event"] == "opened"
    assert opened["extras"] == {}  # what the process itself sent in `opened`
    context = opened["context"]
    assert isinstance(context, dict)
    assert context["extras"] == {"rows": 2, "tag": "x"}
    assert context["asset_keys"] == ["examples/hello"]
    assert context["partition_key"] == "2026-11-29"
    assert context["run_id"] == "run-42" and context["job_name"] == "nightly"
    assert all("context" not in e for e in events[1:])


def test_concurrent_runs_json_lines_can_be_told_apart() -> None:
    """Two runs writing to one stream: each line names its run (a new UUID per run when --run-id is absent)."""
    procs = [subprocess.Popen([*PIPES, "run", "--json", "--asset", "examples/hello", "--", sys.executable, EXAMPLE],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    run_ids = [{e["run_id"] for e in raw_json_events(out)} for out in outputs]
    assert all(len(ids) == 1 for ids in run_ids)
    assert run_ids[0] != run_ids[1]
    assert all(len(str(next(iter(ids)))) == 36 for ids in run_ids)  # a UUID


def test_version_prints_package_protocol_and_python() -> None:
    proc = run_pipes("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    from importlib.metadata import version
    expected = (f"pipes {version('pipes-sdk')} (Pipes protocol 0.1, "
                f"Python {'.'.join(map(str, sys.version_info[:3]))})")
    assert proc.stdout.strip() == expected


def test_no_subcommand_is_a_usage_error_that_mentions_version() -> None:
    proc = run_pipes()
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "pipes run [OPTIONS] -- COMMAND" in proc.stderr and "pipes --version" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- registries


def test_every_event_type_has_its_printed_line() -> None:
    # the human output looks each event's line up by its type: every type of PipesEvent has one
    from typing import get_args

    from pipes_core import PipesEvent
    from pipes_core.cli.main import EVENT_LINES

    assert set(get_args(PipesEvent)) == set(EVENT_LINES)


def test_an_event_type_without_a_line_prints_as_itself_not_as_a_protocol_issue() -> None:
    # a new event type that was not given its line yet: printed with its class name, never as a protocol issue
    import io
    from dataclasses import dataclass

    from pipes_core import PipesProtocolErrorKind, PipesProtocolIssue
    from pipes_core.cli.main import _Printer

    @dataclass(frozen=True)
    class PipesHeartbeatEvent:
        beat: int

    out = io.StringIO()
    printer = _Printer(out, as_json=False, colour=False)
    printer(PipesHeartbeatEvent(beat=3))  # type: ignore[arg-type]  # not (yet) a PipesEvent
    printer(PipesProtocolIssue(reason="bad line", raw="x", kind=PipesProtocolErrorKind.OTHER))
    first, second = out.getvalue().splitlines()
    assert first == "[pipes] PipesHeartbeatEvent: " + str(PipesHeartbeatEvent(beat=3))
    assert second.startswith("[pipes] protocol issue: ")
    assert printer.counts["protocol_issues"] == 1


LAUNCHER_FLAGS = {"docker": ["--docker", "img"], "ray": ["--ray", "127.0.0.1:1"], "slurm": ["--slurm"]}


def test_the_launchers_are_a_registry_of_the_command_line() -> None:
    from pipes_core.cli.main import LAUNCHERS

    assert set(LAUNCHERS) == set(LAUNCHER_FLAGS)  # a new launcher joins the tests below through this table
    assert all(launcher.flag == LAUNCHER_FLAGS[name][0] for name, launcher in LAUNCHERS.items())


@pytest.mark.parametrize(("first", "second"), [("docker", "ray"), ("docker", "slurm"), ("ray", "slurm")])
def test_two_launchers_are_a_usage_error_naming_both(first: str, second: str) -> None:
    proc = run_pipes("run", *LAUNCHER_FLAGS[second], *LAUNCHER_FLAGS[first], "--", "true")
    assert proc.returncode == 2 and proc.stdout == ""
    flags = f"{LAUNCHER_FLAGS[first][0]} and {LAUNCHER_FLAGS[second][0]} cannot be combined"
    assert proc.stderr.count("\n") == 1 and flags in proc.stderr, proc.stderr


@pytest.mark.parametrize(("flag", "needs"), [
    (["--docker-arg=--network=none"], "--docker-arg needs --docker IMAGE"),
    (["--slurm-conf", "/etc/slurm.conf"], "--slurm-conf needs --slurm"),
    (["--ray", "127.0.0.1:1", "--sbatch-arg=-p=x"], "--sbatch-arg needs --slurm"),
])
def test_a_launcher_flag_without_its_launcher_is_a_usage_error(flag: list[str], needs: str) -> None:
    proc = run_pipes("run", *flag, "--", "true")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needs in proc.stderr, proc.stderr
