"""Durable runs of the subprocess launcher (issue 22), sync and async: a real orchestrator process is SIGKILLed at
each point of a run, then a new orchestrator process with the same launch key and store finishes it.

The kill points are where the orchestrator's store is called (a store subclass in the orchestrator SIGKILLs its
own process there): before the launch is recorded (``record_handle`` entered), right after it, mid-stream (after
the second recorded message), after the job ended but before the drain (``record_ended`` returned), and during
the drain (a second orchestrator, started once the job has ended, killed at its first recorded message).

Each scenario checks: one launch per key (counted by the job itself), every message once and in order in the
final invocation, the verdict (success, a non-zero exit, a reported exception), no process of the job's group
left, no file left in the run directory, and a later run with the key returning the recorded outcome without
launching. Orchestrators run in their own session and are killed by process group at teardown, as is the job's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import PipesRunStore
from pipes_core.launch.durable import run_directory
from pipes_core.launch.supervisor import EXIT_FILE
from tests.support.helpers import PYTHON
from tests.support.helpers import REPO_ROOT as REPO

# How long a helper waits for the job or an orchestrator to end (a bound, not an assertion on speed).
WAIT_SECONDS = 120.0
MESSAGES = 6

CHILD = """
import os, sys, time
from pipes_ext import open_pipes
with open(os.environ["COUNT_FILE"], "a") as count:
    count.write("launch\\n")
mode = os.environ["MODE"]
with open_pipes() as pipes:
    for i in range(int(os.environ["MESSAGES"])):
        pipes.report_custom_message({"i": i})
        time.sleep(float(os.environ["DELAY"]))
    if mode == "raise":
        raise RuntimeError("boom")
if mode == "exit3":
    sys.exit(3)
"""

ORCHESTRATOR = """
import asyncio, json, os, signal, sys
from pipes_core import PipesAsyncSubprocessClient, PipesError, PipesRunStore, PipesSubprocessClient

key, store_path, point, flavour, child = sys.argv[1:6]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillingStore(PipesRunStore):
    def record_handle(self, launch_key, handle):
        if point == "before_record":
            die()
        record = super().record_handle(launch_key, handle)
        if point == "after_record":
            die()
        return record

    def record_messages(self, launch_key, first_position, lines, position=None):
        if point == "drain":
            die()
        record = super().record_messages(launch_key, first_position, lines, position)
        if point == "mid_stream" and first_position + len(lines) >= 3:
            die()
        return record

    def record_ended(self, launch_key, handle=None):
        record = super().record_ended(launch_key, handle)
        if point == "after_end":
            die()
        return record


seen = []
options = dict(command=[sys.executable, child], launch_key=key, store=KillingStore(store_path),
               on_event=lambda event: seen.append((type(event).__name__, event.position)))
error = None
try:
    if flavour == "async":
        invocation = asyncio.run(PipesAsyncSubprocessClient(forward_stdio=False).run(**options))
    else:
        invocation = PipesSubprocessClient(forward_stdio=False).run(**options)
except PipesError as exc:
    error = exc
    invocation = exc.invocation
print("RESULT " + json.dumps({
    "messages": invocation.get_custom_messages(),
    "error": None if error is None else type(error).__name__,
    "text": "" if error is None else str(error).split("\\n", 1)[0],
    "exit_code": invocation.exit_code,
    "seen": seen,
}), flush=True)
"""


class Scenario:
    """One durable run: its files, and every process group it started (stopped at teardown)."""

    def __init__(self, tmp: Path, mode: str, delay: float) -> None:
        self.tmp = tmp
        self.store_path = tmp / "state" / "runs.sqlite3"
        self.count_file = tmp / "count"
        self.child = tmp / "child.py"
        self.child.write_text(CHILD)
        self.orchestrator = tmp / "orchestrator.py"
        self.orchestrator.write_text(ORCHESTRATOR)
        self.key = f"run-{tmp.name}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "COUNT_FILE": str(self.count_file), "MODE": mode,
                    "MESSAGES": str(MESSAGES), "DELAY": str(delay)}
        self.groups: list[int] = []

    def start(self, point: str, flavour: str) -> subprocess.Popen[str]:
        process = subprocess.Popen([PYTHON, str(self.orchestrator), self.key, str(self.store_path), point, flavour,
                                    str(self.child)], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        self.groups.append(process.pid)
        return process

    def orchestrate(self, point: str, flavour: str) -> tuple[int, str, str]:
        process = self.start(point, flavour)
        out, err = process.communicate(timeout=WAIT_SECONDS)
        self._note_job_group()
        return process.returncode, out, err

    def _note_job_group(self) -> None:
        handle = self.record_handle()
        if handle is not None and handle["pid"] not in self.groups:
            self.groups.append(int(handle["pid"]))

    def record_handle(self) -> dict[str, Any] | None:
        if not self.store_path.exists():
            return None
        with PipesRunStore(self.store_path) as store:
            record = store.get(self.key)
        return None if record is None else record.handle

    def launches(self) -> int:
        return len(self.count_file.read_text().splitlines()) if self.count_file.exists() else 0

    def run_directory(self) -> Path:
        return run_directory(PipesRunStore(self.store_path), self.key)

    def wait_for_job_end(self) -> None:
        """Until the job's supervisor has written its exit file (the job ended, nobody drained it)."""
        exit_file = self.run_directory() / EXIT_FILE
        deadline = time.monotonic() + WAIT_SECONDS
        pause = threading.Event()
        while not exit_file.exists():
            assert time.monotonic() < deadline, f"the job never ended: no {exit_file}"
            pause.wait(0.05)

    def stop_all(self) -> None:
        stop_groups(self.groups)


def stop_groups(groups: list[int]) -> None:
    """SIGKILL each process group (those a test started: its orchestrators', its job's), gone or not."""
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def live_members(group: int) -> list[int]:
    """The processes of a process group that still run (zombies, ended but not reaped yet, do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[2]) == group and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def _result(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the orchestrator printed no result:\n{out}"
    return dict(json.loads(lines[-1][len("RESULT "):]))


@pytest.fixture
def scenario_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Scenario] = []

    def make(mode: str = "ok", delay: float = 0.1) -> Scenario:
        scenario = Scenario(tmp_path, mode, delay)
        made.append(scenario)
        return scenario

    yield make
    for scenario in made:
        scenario.stop_all()


EXPECTED = {  # mode -> (error class, text in the error's first line, exit code)
    "ok": (None, "", 0),
    "exit3": ("PipesExecutionError", "exit code 3", 3),
    "raise": ("PipesExecutionError", "RuntimeError: boom", 1),
}

POINTS = ["before_record", "after_record", "mid_stream", "after_end", "during_drain"]
CASES = [(point, "ok") for point in POINTS] + [("mid_stream", "exit3"), ("mid_stream", "raise"),
                                               ("after_end", "raise")]


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize(("point", "mode"), CASES)
def test_a_killed_orchestrator_is_replaced_and_the_run_finishes_once(scenario_factory: Any, point: str, mode: str,
                                                                     flavour: str) -> None:
    scenario: Scenario = scenario_factory(mode)
    first_point = "mid_stream" if point == "during_drain" else point
    code, out, err = scenario.orchestrate(first_point, flavour)
    assert code == -signal.SIGKILL, f"the first orchestrator was not killed at {first_point}: {code}\n{out}\n{err}"
    if point == "during_drain":  # the job ends unwatched; the next orchestrator is killed while draining it
        scenario.wait_for_job_end()
        code, out, err = scenario.orchestrate("drain", flavour)
        assert code == -signal.SIGKILL, f"the draining orchestrator was not killed: {code}\n{out}\n{err}"
    code, out, err = scenario.orchestrate("none", flavour)
    assert code == 0, err
    result = _result(out)
    error, text, exit_code = EXPECTED[mode]
    assert scenario.launches() == 1
    assert result["messages"] == [{"i": i} for i in range(MESSAGES)]
    assert result["error"] == error
    assert text in result["text"]
    assert result["exit_code"] == exit_code
    # on_event of the last orchestrator saw only what had not been recorded before, each at its stable position
    # in the channel: the custom message i is line i + 1 (after opened), whichever orchestrator read it.
    custom = [position for name, position in result["seen"] if name == "PipesCustomMessageEvent"]
    assert custom == list(range(MESSAGES + 1 - len(custom), MESSAGES + 1))
    handle = scenario.record_handle()
    assert handle is not None
    assert live_members(int(handle["pid"])) == []  # no orphan: the job's whole group has ended
    assert not scenario.run_directory().exists()  # no file left behind
    # Once concluded, the key returns the recorded outcome without launching.
    code, out, err = scenario.orchestrate("none", flavour)
    again = _result(out)
    assert scenario.launches() == 1
    assert (again["messages"], again["error"], again["exit_code"]) == (result["messages"], error, exit_code)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_two_orchestrators_racing_on_one_key_launch_once(scenario_factory: Any, flavour: str) -> None:
    scenario: Scenario = scenario_factory()
    racing = [scenario.start("none", flavour) for _ in range(2)]
    outputs = [process.communicate(timeout=WAIT_SECONDS) for process in racing]
    assert [process.returncode for process in racing] == [0, 0], outputs
    assert scenario.launches() == 1
    for out, _ in outputs:
        assert _result(out)["messages"] == [{"i": i} for i in range(MESSAGES)]


def test_a_launch_key_on_a_launcher_without_attach_is_a_clear_error(tmp_path: Path) -> None:
    from pipes_core import PipesClient, PipesUsageError

    class NoAttach(PipesClient):
        def run(self, **options: Any) -> Any:
            return self.run_launcher(lambda request: None, **options)  # type: ignore[arg-type,return-value]

    with pytest.raises(PipesUsageError, match="launch_key= is not supported by it"):
        NoAttach().run(launch_key="k", store=str(tmp_path / "runs.sqlite3"))
    with pytest.raises(PipesUsageError, match="launch_key must be a non-empty string"):
        from pipes_core import PipesSubprocessClient

        PipesSubprocessClient().run(command=["true"], launch_key="", store=str(tmp_path / "runs.sqlite3"))


def test_each_event_carries_its_line_position_in_the_channel(tmp_path: Path) -> None:
    from pipes_core import PipesRunContext, PipesSubprocessClient

    child = tmp_path / "child.py"
    child.write_text("from pipes_ext import open_pipes\nwith open_pipes() as pipes:\n"
                     "    pipes.report_custom_message(1)\n    pipes.report_asset_materialization()\n")
    seen: list[tuple[str, int | None]] = []
    invocation = PipesSubprocessClient().run(command=[PYTHON, str(child)], context=PipesRunContext(asset_keys=["a"]),
                                             on_event=lambda event: seen.append((type(event).__name__,
                                                                                 event.position)))
    assert seen == [("PipesOpenedEvent", 0), ("PipesCustomMessageEvent", 1), ("MaterializeResult", 2),
                    ("PipesClosedEvent", 3)]
    assert [result.position for result in invocation.get_results()] == [2]


def test_a_durable_command_that_cannot_start_fails_with_the_reason_and_is_concluded(tmp_path: Path) -> None:
    from pipes_core import PipesExecutionError, PipesSubprocessClient

    store = tmp_path / "runs.sqlite3"
    with pytest.raises(PipesExecutionError) as error:
        PipesSubprocessClient(forward_stdio=False).run(command=[str(tmp_path / "missing")], launch_key="k",
                                                       store=str(store))
    assert error.value.exit_code == 127 and "cannot start" in str(error.value)
    with PipesRunStore(store) as opened:
        record = opened.get("k")
    assert record is not None and record.state == "concluded" and record.outcome is not None
    assert record.outcome["exit_code"] == 127 and record.outcome["error"] == "PipesExecutionError"
    assert not run_directory(PipesRunStore(store), "k").exists()
