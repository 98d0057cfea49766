"""The durable-run kill matrix, shared by every launcher's test (issue 22): a real orchestrator process is SIGKILLed
at each point of a run, then a new orchestrator process with the same launch key and store finishes it.

The kill points are where the orchestrator's store is called (a store subclass in the orchestrator SIGKILLs its
own process there): before the launch is recorded (``record_handle`` entered), right after it, mid-stream (after
the second recorded message), after the job ended but before the drain (``record_ended`` returned), and during
the drain (a second orchestrator, started once the job has ended, killed at its first recorded message).

A launcher's test gives a :class:`Launcher`: which client runs the job (sync and async, as "module:Class"), with
what constructor arguments and run options (JSON: they cross into the orchestrator process), how to count the
engine's launches of a key, how to tell that nothing of the run is left on the engine, and how to clean the engine
up at teardown. The job (:data:`CHILD`) counts its own launches in a file, reports :data:`MESSAGES` custom
messages and ends as its mode says; it writes ``ended`` to its count file last, which is how a test knows the job
has ended without anybody watching. Each orchestrator prints its result: the messages, the verdict, what
``on_event`` saw, when ``on_launched`` was called (and the launcher's attribute on what it got) and the time spent
in the client's ``attach`` (read by ``benchmarks/durable.py`` too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipes_core import PipesRunStore
from pipes_core.launch.durable import run_directory
from tests.support.helpers import PYTHON
from tests.support.helpers import REPO_ROOT as REPO

# How long a helper waits for the job or an orchestrator to end (a bound, not an assertion on speed).
WAIT_SECONDS = 180.0
MESSAGES = 6
ENDED = "ended"

CHILD = """
import os, sys, time
from pipes_ext import open_pipes
count_file = os.environ["COUNT_FILE"]
with open(count_file, "a") as count:
    count.write("launch\\n")
mode = os.environ["MODE"]
try:
    with open_pipes() as pipes:
        for i in range(int(os.environ["MESSAGES"])):
            pipes.report_custom_message({"i": i})
            time.sleep(float(os.environ["DELAY"]))
        if mode == "raise":
            raise RuntimeError("boom")
finally:
    with open(count_file, "a") as count:
        count.write("ended\\n")
if mode == "exit3":
    sys.exit(3)
"""

ORCHESTRATOR = """
import asyncio, importlib, json, os, signal, sys, time
from pipes_core import PipesError, PipesRunStore

key, store_path, point, flavour, spec = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])


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


def client_class(name):
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


launched = []
attach_seconds = []


def on_launched(process):
    name = spec["launched_attribute"]
    value = getattr(process, name, None) if name else None
    launched.append({"at": time.time(), "attribute": None if value is None else str(value)})


def timing_attach(client):
    # A durable run asks the sync client (an async twin's config) to attach: the time in there is the engine's.
    durable_client = getattr(client, "config", client)
    attach = durable_client.attach

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return attach(*args, **kwargs)
        finally:
            attach_seconds.append(time.perf_counter() - started)

    durable_client.attach = timed
    return client


seen = []
options = dict(spec["options"], on_launched=on_launched,
               on_event=lambda event: seen.append((type(event).__name__, event.position)))
if key:  # an empty key: the same run without one
    options.update(launch_key=key, store=KillingStore(store_path))
error = None
try:
    if flavour == "async":
        client = timing_attach(client_class(spec["async_client"])(**spec["client_kwargs"]))
        invocation = asyncio.run(client.run(**options))
    else:
        invocation = timing_attach(client_class(spec["client"])(**spec["client_kwargs"])).run(**options)
except PipesError as exc:
    error = exc
    invocation = exc.invocation
print("RESULT " + json.dumps({
    "messages": invocation.get_custom_messages(),
    "error": None if error is None else type(error).__name__,
    "text": "" if error is None else str(error).split("\\n", 1)[0],
    "exit_code": invocation.exit_code,
    "seen": seen,
    "launched": launched[0]["at"] if launched else None,
    "launched_attribute": launched[0]["attribute"] if launched else None,
    "attach_seconds": sum(attach_seconds) if attach_seconds else None,
}), flush=True)
"""


@dataclass
class Launcher:
    """One launcher under the kill matrix (module doc).

    ``options(scenario)``: the run options (JSON) for the scenario's job (its ``child`` script, its ``job_env``:
    COUNT_FILE, MODE, MESSAGES, DELAY, PYTHONPATH); ``engine_launches(scenario)``: how many launches of the
    scenario's key the engine knows of (None: it cannot tell); ``assert_nothing_left(scenario)``: nothing of the
    run is left on the engine; ``cleanup(scenario)``: stop and remove whatever the engine still has of it;
    ``orchestrator_env``: more environment for the orchestrator processes (e.g. the engine's address, such as
    ``SLURM_CONF``, when the client finds it there), which a job launched with the orchestrator's environment
    inherits too; ``launched_attribute``: an attribute the launcher documents on what ``on_launched`` receives
    (e.g. a Slurm job's ``job_id``), which a re-attached run's ``on_launched`` gets too.
    """

    client: str
    async_client: str
    options: Callable[[Scenario], dict[str, Any]]
    client_kwargs: dict[str, Any] = field(default_factory=lambda: {"forward_stdio": False})
    engine_launches: Callable[[Scenario], int | None] = lambda scenario: None
    assert_nothing_left: Callable[[Scenario], None] = lambda scenario: None
    cleanup: Callable[[Scenario], None] = lambda scenario: None
    orchestrator_env: dict[str, str] = field(default_factory=dict)
    launched_attribute: str | None = None


class Scenario:
    """One durable run: its files, and every process group it started (stopped at teardown)."""

    def __init__(self, tmp: Path, launcher: Launcher, mode: str, delay: float) -> None:
        self.tmp = tmp
        self.launcher = launcher
        self.store_path = tmp / "state" / "runs.sqlite3"
        self.count_file = tmp / "count"
        self.child = tmp / "child.py"
        self.child.write_text(CHILD)
        self.orchestrator = tmp / "orchestrator.py"
        self.orchestrator.write_text(ORCHESTRATOR)
        self.key = f"run-{tmp.name}"
        self.job_env = {"PYTHONPATH": str(REPO), "COUNT_FILE": str(self.count_file), "MODE": mode,
                        "MESSAGES": str(MESSAGES), "DELAY": str(delay)}
        self.env = {**os.environ, **launcher.orchestrator_env, **self.job_env}
        self.groups: list[int] = []

    def spec(self) -> str:
        launcher = self.launcher
        return json.dumps({"client": launcher.client, "async_client": launcher.async_client,
                           "client_kwargs": launcher.client_kwargs, "options": launcher.options(self),
                           "launched_attribute": launcher.launched_attribute})

    def start(self, point: str, flavour: str, *, keyed: bool = True) -> subprocess.Popen[str]:
        """An orchestrator process running the scenario's job (``keyed``: with its launch key and store, else
        without), SIGKILLed at ``point``; it prints its result (:func:`result_of`)."""
        process = subprocess.Popen([PYTHON, str(self.orchestrator), self.key if keyed else "", str(self.store_path),
                                    point, flavour, self.spec()], env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.groups.append(process.pid)
        return process

    def orchestrate(self, point: str, flavour: str, *, keyed: bool = True) -> tuple[int, str, str]:
        process = self.start(point, flavour, keyed=keyed)
        try:
            out, err = process.communicate(timeout=WAIT_SECONDS)
        finally:
            self._note_job_group()
        return process.returncode, out, err

    def _note_job_group(self) -> None:
        handle = self.record_handle()
        pid = None if handle is None else handle.get("pid")
        if isinstance(pid, int) and pid not in self.groups:  # a local durable child's supervisor leads its group
            self.groups.append(pid)

    def record_handle(self) -> dict[str, Any] | None:
        if not self.store_path.exists():
            return None
        with PipesRunStore(self.store_path) as store:
            record = store.get(self.key)
        return None if record is None else record.handle

    def count_lines(self) -> list[str]:
        return self.count_file.read_text().splitlines() if self.count_file.exists() else []

    def launches(self) -> int:
        return self.count_lines().count("launch")

    def run_directory(self) -> Path:
        return run_directory(PipesRunStore(self.store_path), self.key)

    def wait_for_job_end(self) -> None:
        """Until the job has said it ended (nobody drained it), and a moment for its process to exit."""
        deadline = time.monotonic() + WAIT_SECONDS
        pause = threading.Event()
        while ENDED not in self.count_lines():
            assert time.monotonic() < deadline, f"the job never ended: no {ENDED!r} in {self.count_file}"
            pause.wait(0.05)
        pause.wait(0.5)

    def stop_all(self) -> None:
        stop_groups(self.groups)
        self.launcher.cleanup(self)


def stop_groups(groups: list[int]) -> None:
    """SIGKILL each process group (those a test started: its orchestrators', its job's), gone or not."""
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def result_of(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the orchestrator printed no result:\n{out}"
    return dict(json.loads(lines[-1][len("RESULT "):]))


def scenarios(tmp_path: Path, launcher: Launcher) -> Iterator[Callable[..., Scenario]]:
    """A fixture's body: makes scenarios, and stops everything they started at teardown."""
    made: list[Scenario] = []

    def make(mode: str = "ok", delay: float = 0.1) -> Scenario:
        scenario = Scenario(tmp_path, launcher, mode, delay)
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
# The whole matrix: every point with a job that succeeds, and the other verdicts at the points where they differ.
CASES = [(point, "ok") for point in POINTS] + [("mid_stream", "exit3"), ("mid_stream", "raise"),
                                               ("after_end", "raise")]
FLAVOURS = ["sync", "async"]


def kill_and_finish(scenario: Scenario, point: str, mode: str, flavour: str) -> dict[str, Any]:
    """The kill matrix's one case: kill at ``point``, finish with a new orchestrator, check everything (module
    doc); returns the final result."""
    first_point = "mid_stream" if point == "during_drain" else point
    code, out, err = scenario.orchestrate(first_point, flavour)
    assert code == -signal.SIGKILL, f"the first orchestrator was not killed at {first_point}: {code}\n{out}\n{err}"
    if point == "during_drain":  # the job ends unwatched; the next orchestrator is killed while draining it
        scenario.wait_for_job_end()
        code, out, err = scenario.orchestrate("drain", flavour)
        assert code == -signal.SIGKILL, f"the draining orchestrator was not killed: {code}\n{out}\n{err}"
    code, out, err = scenario.orchestrate("none", flavour)
    assert code == 0, err
    result = result_of(out)
    assert result["launched"] is not None, "on_launched was not called for the run found again"
    attribute = scenario.launcher.launched_attribute
    assert attribute is None or result["launched_attribute"] is not None, \
        f"what on_launched got for the run found again has no {attribute!r}"
    error, text, exit_code = EXPECTED[mode]
    assert scenario.launches() == 1, scenario.count_lines()
    engine = scenario.launcher.engine_launches(scenario)
    assert engine in (None, 1), f"the engine knows of {engine} launches of the key"
    assert result["messages"] == [{"i": i} for i in range(MESSAGES)], (result, err)
    assert result["error"] == error, (result, err)
    assert text in result["text"]
    assert result["exit_code"] == exit_code
    # on_event of the last orchestrator saw only what had not been recorded before, each at its stable position
    # in the channel: the custom message i is line i + 1 (after opened), whichever orchestrator read it.
    custom = [position for name, position in result["seen"] if name == "PipesCustomMessageEvent"]
    assert custom == list(range(MESSAGES + 1 - len(custom), MESSAGES + 1))
    assert scenario.record_handle() is not None
    scenario.launcher.assert_nothing_left(scenario)  # no orphan on the engine
    assert not scenario.run_directory().exists()  # no file left behind
    # Once concluded, the key returns the recorded outcome without launching.
    code, out, err = scenario.orchestrate("none", flavour)
    again = result_of(out)
    assert scenario.launches() == 1
    assert (again["messages"], again["error"], again["exit_code"]) == (result["messages"], error, exit_code)
    return result


def race(scenario: Scenario, flavour: str) -> None:
    """Two orchestrators racing on one key launch once, and both return every message."""
    racing = [scenario.start("none", flavour) for _ in range(2)]
    outputs = [process.communicate(timeout=WAIT_SECONDS) for process in racing]
    assert [process.returncode for process in racing] == [0, 0], outputs
    assert scenario.launches() == 1
    engine = scenario.launcher.engine_launches(scenario)
    assert engine in (None, 1), f"the engine knows of {engine} launches of the key"
    for out, _ in outputs:
        assert result_of(out)["messages"] == [{"i": i} for i in range(MESSAGES)]


__all__ = ["Launcher", "Scenario", "CASES", "POINTS", "FLAVOURS", "EXPECTED", "MESSAGES", "WAIT_SECONDS",
           "kill_and_finish", "race", "result_of", "scenarios", "stop_groups"]
