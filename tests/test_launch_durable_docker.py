"""Durable runs of the Docker launcher (issue 22), sync and async, on the private dockerd of
``tests/support/engines_docker.py``: the kill matrix of :mod:`tests.support.durable_kills` (a real orchestrator
SIGKILLed at each point of a run, a new one finishing it), orphans swept, runs stopped and forgotten from another
process's point of view.

The orchestrators reach the daemon through ``DOCKER_HOST`` (the environment the tests set); the job runs in the
test image (its Python with ``pipes_ext``), its script and its count file bind-mounted at their own paths, the run
directory by the client itself (``mount_channel_files``). How many containers the daemon created for a key is
counted from its events (the container is removed once the run concluded)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import PipesRunStore, PipesUsageError
from pipes_core.docker import PipesDockerClient
from pipes_core.launch.durable import run_directory
from pipes_core.launch.manage import forget_run, stop_run
from pipes_core.launch.process import LAUNCH_LABEL, OWNER_PID_LABEL, DurableLaunch, launch_name
from tests.support.durable_kills import (
    CASES,
    FLAVOURS,
    MESSAGES,
    WAIT_SECONDS,
    Scenario,
    kill_and_finish,
    race,
    result_of,
    scenarios,
    stop_groups,
)
from tests.support.durable_launchers import created_count, docker_launcher, remove_labelled
from tests.support.engines_docker import TEST_IMAGE, DockerEngine
from tests.support.helpers import PYTHON, REPO_ROOT

pytestmark = pytest.mark.docker

# The job's pause between messages: long enough that a restarted orchestrator often finds the container still
# running (the matrix then re-attaches to a live container as well as to ended ones), short enough for CI.
DELAY = 0.2
# How often a test looks at the daemon or the store for what another process does.
POLL_SECONDS = 0.1


def poll_until(predicate: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    """Until ``predicate()`` holds (another process makes it true); an AssertionError naming ``what`` after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    pause = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds:.0f} s waiting for {what}"
        pause.wait(POLL_SECONDS)


@pytest.fixture
def docker_env(docker_engine: DockerEngine, monkeypatch: pytest.MonkeyPatch) -> DockerEngine:
    """The private daemon in ``DOCKER_HOST``, for this process and the orchestrators it starts."""
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    return docker_engine


@pytest.fixture
def scenario_factory(docker_env: DockerEngine, tmp_path: Path) -> Iterator[Callable[..., Scenario]]:
    yield from scenarios(tmp_path, docker_launcher(docker_env))


# ---------------------------------------------------------------------------------------------- the kill matrix


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("point", "mode"), CASES)
def test_a_killed_orchestrator_is_replaced_and_the_container_runs_once(scenario_factory: Any, point: str, mode: str,
                                                                       flavour: str) -> None:
    kill_and_finish(scenario_factory(mode, DELAY), point, mode, flavour)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_two_orchestrators_racing_on_one_key_create_one_container(scenario_factory: Any, flavour: str) -> None:
    race(scenario_factory(delay=DELAY), flavour)


class LooksNoFurther(PipesDockerClient):
    """A client that never finds the key's container before creating it: its create then collides with the
    container another orchestrator made (the daemon's 409), as when the two race past the look-up."""

    def find_launch(self, durable: DurableLaunch) -> dict[str, Any] | None:
        return None


def test_a_create_refused_for_the_keys_name_attaches_to_that_container(scenario_factory: Any,
                                                                       docker_env: DockerEngine) -> None:
    scenario = scenario_factory(delay=DELAY)
    code, out, err = scenario.orchestrate("before_record", "sync")  # created and started, its handle unrecorded
    assert code == -signal.SIGKILL, (out, err)
    scenario.launcher = docker_launcher(docker_env, f"{__name__}:LooksNoFurther")
    code, out, err = scenario.orchestrate("none", "sync")
    assert code == 0, err
    assert result_of(out)["messages"] == [{"i": i} for i in range(MESSAGES)]
    assert scenario.launches() == 1 and created_count(docker_env, scenario.key) == 1


@pytest.mark.parametrize("seen_end", [True, False], ids=["end-recorded", "end-unseen"])
def test_a_container_removed_behind_the_runs_back(scenario_factory: Any, docker_env: DockerEngine,
                                                  seen_end: bool) -> None:
    scenario = scenario_factory(delay=DELAY)
    code, out, err = scenario.orchestrate("after_end" if seen_end else "after_record", "sync")
    assert code == -signal.SIGKILL, (out, err)
    remove_labelled(docker_env, f"{LAUNCH_LABEL}={launch_name(scenario.key)}")
    code, out, err = scenario.orchestrate("none", "sync")
    result = result_of(out)
    if seen_end:  # removed after its end was recorded: that end, the messages from the run's file
        assert (result["error"], result["exit_code"]) == (None, 0), (result, err)
        assert result["messages"] == [{"i": i} for i in range(MESSAGES)]
    else:  # how it ended is unknown: said, with what to do
        assert result["error"] == "PipesExecutionError"
        assert "is gone from the Docker daemon" in result["text"] and "pipes runs forget" in result["text"]


def test_a_name_with_a_launch_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PipesUsageError, match="named by its key"):
        PipesDockerClient().run(image=TEST_IMAGE, name="mine", launch_key="k", store=str(tmp_path / "runs.sqlite3"))


# ---------------------------------------------------------------------------------------------- orphans, management

ORCHESTRATOR = """
import json, sys
from pipes_core.docker import PipesDockerClient
options = json.loads(sys.argv[1])
PipesDockerClient(forward_stdio=False, keep_container=options.pop("keep", False)).run(**options)
"""

# A job that runs until it is stopped.
SLEEPER = ["python3", "-c", "import time\nfrom pipes_ext import open_pipes\nwith open_pipes():\n    time.sleep(600)"]


class Orchestrators:
    """Orchestrator processes (each in its own session) running one container each; all stopped at teardown, with
    their containers."""

    def __init__(self, engine: DockerEngine, tmp: Path) -> None:
        self.engine = engine
        self.script = tmp / "orchestrator.py"
        self.script.write_text(ORCHESTRATOR)
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, **options: Any) -> subprocess.Popen[bytes]:
        options = {"image": TEST_IMAGE, "command": SLEEPER, "network": "none", **options}
        process = subprocess.Popen([PYTHON, str(self.script), json.dumps(options)],
                                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        poll_until(lambda: self.container(process, running=True) is not None,
                   f"the container of orchestrator {process.pid}")
        return process

    def container(self, process: subprocess.Popen[bytes], *, running: bool = False) -> Any:
        found = self.engine.client.containers.list(all=not running,
                                                   filters={"label": f"{OWNER_PID_LABEL}={process.pid}"})
        return found[0] if found else None

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        stop_groups([process.pid])
        process.wait(WAIT_SECONDS)

    def stop_all(self) -> None:
        stop_groups([process.pid for process in self.processes])
        for process in self.processes:
            process.wait(WAIT_SECONDS)
            remove_labelled(self.engine, f"{OWNER_PID_LABEL}={process.pid}")


@pytest.fixture
def orchestrators(docker_env: DockerEngine, tmp_path: Path) -> Iterator[Orchestrators]:
    made = Orchestrators(docker_env, tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


def test_sweep_stops_what_a_dead_orchestrator_left_running_and_nothing_else(orchestrators: Orchestrators,
                                                                            tmp_path: Path) -> None:
    dead = orchestrators.start()
    kept = orchestrators.start(keep=True)
    alive = orchestrators.start()
    durable = orchestrators.start(launch_key="durable", store=str(tmp_path / "runs.sqlite3"))
    for process in (dead, kept, durable):
        orchestrators.kill(process)
    said = PipesDockerClient().sweep_orphans()  # a fresh client: the daemon from the environment
    assert len(said) == 2, said
    line = {text.split(" launched by ")[1]: text for text in said}
    host = socket.gethostname()
    assert line[f"process {dead.pid} on host {host}, which is gone"].startswith("stopped and removed the container")
    assert line[f"process {kept.pid} on host {host}, which is gone"].startswith("stopped and kept the container")
    assert orchestrators.container(dead) is None
    assert orchestrators.container(kept).status == "exited"  # stopped, kept as asked
    assert orchestrators.container(alive, running=True) is not None  # its orchestrator lives
    assert orchestrators.container(durable, running=True) is not None  # the key's next run re-attaches to it
    assert PipesDockerClient().sweep_orphans() == []


def test_a_run_is_stopped_and_forgotten_from_another_process(orchestrators: Orchestrators, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store_path = tmp_path / "runs.sqlite3"
    orchestrator = orchestrators.start(launch_key="k", store=str(store_path))

    def recorded() -> bool:
        with PipesRunStore(store_path) as store:
            record = store.get("k")
        return record is not None and record.handle is not None

    poll_until(recorded, "the run's handle in the store")
    orchestrators.kill(orchestrator)
    # The run directory (its messages file) is bind-mounted writable at its own path; the container is the key's.
    container = orchestrators.container(orchestrator)
    with PipesRunStore(store_path) as store:
        directory = str(run_directory(store, "k"))
    assert {(mount["Source"], mount["Destination"], mount["RW"]) for mount in container.attrs["Mounts"]} == {
        (directory, directory, True)}
    assert container.name == launch_name("k") and container.labels[LAUNCH_LABEL] == launch_name("k")
    # Only the run's handle names the daemon now (client_for makes a default client, from the environment).
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with PipesRunStore(store_path) as store:
        with pytest.raises(PipesUsageError, match="still running: stop it first"):
            forget_run(store, "k")
        started = time.monotonic()
        assert stop_run(store, "k") is True
        assert time.monotonic() - started < 5  # SIGTERM ended it: no SIGKILL after the grace
        assert orchestrators.container(orchestrator).status == "exited"
        assert stop_run(store, "k") is False  # nothing runs: how it ended is recorded, the container removed
        record = store.get("k")
        assert record is not None and record.state == "ended" and record.handle is not None
        assert record.handle["exit"]["exit_code"] == 128 + signal.SIGTERM
        assert orchestrators.container(orchestrator) is None
        forget_run(store, "k")
        assert store.get("k") is None

