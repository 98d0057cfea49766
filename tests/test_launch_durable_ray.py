"""Durable runs of the Ray jobs launcher (issue 22), sync and async, on the private head of
tests/support/engines_ray.py: the kill matrix of :mod:`tests.support.durable_kills` (a real orchestrator SIGKILLed at
each point of a run, a new one finishing it), the race, orphans, and ``pipes runs stop|forget`` from a default
client.

The job runs on this host (the head is local): it writes the run directory's messages file and its COUNT_FILE
directly. What the engine knows of a key's launches is counted from Ray itself: each submission starts one job
supervisor actor named after the submission id, which the state API lists even once it is dead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import PipesRunStore
from pipes_core.launch.manage import client_for, forget_run, stop_run
from pipes_core.launch.process import LAUNCH_LABEL, OWNER_HOST_LABEL, OWNER_PID_LABEL, launch_name
from pipes_core.protocol.errors import PipesUsageError
from pipes_core.ray import PipesRayJobClient
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
from tests.support.durable_launchers import (
    RAY_TERMINAL,
    job_client,
    job_status,
    ray_launcher,
    stop_and_delete,
    supervisors,
)
from tests.support.engines_ray import RayHead
from tests.support.helpers import PYTHON, REPO_ROOT, wait_until


@pytest.fixture
def scenario_factory(ray_head: RayHead, tmp_path: Path) -> Iterator[Callable[..., Scenario]]:
    yield from scenarios(tmp_path, ray_launcher(ray_head))


# ------------------------------------------------------------------------------------------------ the kill matrix


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("point", "mode"), CASES)
def test_a_killed_orchestrator_is_replaced_and_the_ray_job_finishes_once(scenario_factory: Any, point: str,
                                                                         mode: str, flavour: str) -> None:
    kill_and_finish(scenario_factory(mode), point, mode, flavour)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_two_orchestrators_racing_on_one_key_submit_one_ray_job(scenario_factory: Any, flavour: str) -> None:
    race(scenario_factory(), flavour)


def test_a_submission_refused_as_a_duplicate_is_attached_to_the_job_that_has_the_name(
    ray_head: RayHead, scenario_factory: Any
) -> None:
    # Another orchestrator submits under the key's name between our find_launch and our submit: Ray refuses ours
    # ("already exists"), and the run attaches to that job instead of failing or making a second one.
    class Racing(PipesRayJobClient):
        def launcher(self, options: Any, *, where: str) -> Any:
            launch, command, common = super().launcher(options, where=where)

            def launch_twice(request: Any) -> Any:
                launch(request).close()  # the other orchestrator's submission
                return launch(request)

            return launch_twice, command, common

    scenario = scenario_factory()
    store = PipesRunStore(scenario.store_path)
    invocation = Racing(ray_head.address, forward_stdio=False).run(
        **scenario.launcher.options(scenario), launch_key=scenario.key, store=store)
    assert invocation.get_custom_messages() == [{"i": i} for i in range(MESSAGES)]
    assert scenario.launches() == 1
    assert scenario.launcher.engine_launches(scenario) == 1
    metadata = job_client(ray_head).get_job_info(launch_name(scenario.key)).metadata
    assert metadata[LAUNCH_LABEL] == launch_name(scenario.key) and metadata[OWNER_PID_LABEL] == str(os.getpid())


def test_a_job_gone_from_the_cluster_ends_the_run_with_the_recorded_outcome_else_as_unknown(
    ray_head: RayHead, tmp_path: Path
) -> None:
    client = job_client(ray_head)
    name = launch_name(f"gone-{tmp_path.name}")
    client.submit_job(entrypoint="true", submission_id=name)
    wait_until(lambda: job_status(client, name) in RAY_TERMINAL, timeout=WAIT_SECONDS, what="the job to end")
    client.delete_job(name)
    handle = {"address": ray_head.address, "submission_id": name, "description": f"the Ray job {name}"}
    unknown = PipesRayJobClient().attach(handle)  # a default client: the handle's address
    assert unknown.poll() and unknown.exit_status().killed
    assert "is gone from the Ray cluster" in unknown.exit_status().description
    recorded = {"exit_code": 3, "killed": False, "description": "", "kind": None}
    assert PipesRayJobClient().attach({**handle, "exit": recorded}).exit_status().exit_code == 3


def test_a_submission_id_with_a_launch_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PipesUsageError, match="submission_id cannot be given with launch_key"):
        PipesRayJobClient("http://127.0.0.1:9").run(command="true", submission_id="mine", launch_key="k",
                                                    store=str(tmp_path / "runs.sqlite3"))


# ------------------------------------------------------------------------------------------------ orphans

ORCHESTRATOR = """
import sys
from pipes_core.ray import PipesRayJobClient
address, script, store = sys.argv[1], sys.argv[2], sys.argv[3]
durable = {"launch_key": "orphans-durable", "store": store} if store else {}
PipesRayJobClient(address, forward_stdio=False).run(command=[sys.executable, script], strict=False, **durable)
"""


def test_sweep_orphans_stops_the_keyless_job_of_a_dead_orchestrator_only(ray_head: RayHead, tmp_path: Path) -> None:
    client = job_client(ray_head)
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(600)\n")
    orchestrator = tmp_path / "orchestrator.py"
    orchestrator.write_text(ORCHESTRATOR)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    store = str(tmp_path / "state" / "runs.sqlite3")
    started = {name: subprocess.Popen([PYTHON, str(orchestrator), ray_head.address, str(script), durable_store],
                                      env=env, start_new_session=True, stdout=subprocess.DEVNULL)
               for name, durable_store in (("dead", ""), ("alive", ""), ("durable", store))}
    jobs: dict[str, str] = {}
    try:
        def running() -> bool:
            for job in client.list_jobs():
                for name, process in started.items():
                    if (job.metadata or {}).get(OWNER_PID_LABEL) == str(process.pid) and job.status == "RUNNING":
                        jobs[name] = job.submission_id
            return len(jobs) == len(started)

        wait_until(running, timeout=WAIT_SECONDS, what="the three orchestrators' jobs to run")
        for name in ("dead", "durable"):
            os.killpg(started[name].pid, signal.SIGKILL)
            started[name].wait()
        assert jobs["durable"] == launch_name("orphans-durable")
        said = PipesRayJobClient(ray_head.address).sweep_orphans()
        assert said == [f"stopped the Ray job {jobs['dead']} at {ray_head.address} launched by process "
                        f"{started['dead'].pid} on host {socket.gethostname()}, which is gone"]
        wait_until(lambda: job_status(client, jobs["dead"]) == "STOPPED", timeout=WAIT_SECONDS,
                   what="the orphaned job to stop")
        info = client.get_job_info(jobs["alive"])
        assert (info.status, info.metadata[OWNER_HOST_LABEL]) == ("RUNNING", socket.gethostname())
        assert job_status(client, jobs["durable"]) == "RUNNING"  # left for its key's next run to re-attach
        assert PipesRayJobClient(ray_head.address).sweep_orphans() == []  # nothing more to stop
    finally:
        stop_groups([process.pid for process in started.values()])
        for process in started.values():
            process.wait()
        for submission_id in jobs.values():
            stop_and_delete(client, submission_id)


# ------------------------------------------------------------------------------------------------ pipes runs


def test_stop_and_forget_from_a_default_client_then_the_key_launches_again(
    ray_head: RayHead, scenario_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the address can only come from the handle
        monkeypatch.delenv(name, raising=False)
    client = job_client(ray_head)
    scenario = scenario_factory(delay=5.0)  # still running when it is stopped
    code, out, err = scenario.orchestrate("after_record", "sync")
    assert code == -signal.SIGKILL, (out, err)
    name = launch_name(scenario.key)
    handle = scenario.record_handle()
    assert handle is not None and handle["address"] == ray_head.address and handle["submission_id"] == name
    wait_until(lambda: scenario.launches() == 1, timeout=WAIT_SECONDS, what="the job to start")
    default = client_for("PipesRayJobClient")
    assert isinstance(default, PipesRayJobClient) and default.address is None
    with PipesRunStore(scenario.store_path) as store:
        with pytest.raises(PipesUsageError, match="still running: stop it first"):
            forget_run(store, scenario.key)
        assert stop_run(store, scenario.key) is True
        assert job_status(client, name) == "STOPPED"
        assert stop_run(store, scenario.key) is False
        forget_run(store, scenario.key)
        assert store.get(scenario.key) is None
    # The stopped job keeps the key's name on the cluster: the next run with the key deletes it (it belongs to
    # the forgotten run, not to this claim) and launches anew.
    scenario.job_env["DELAY"] = "0.05"
    code, out, err = scenario.orchestrate("none", "sync")
    assert code == 0, err
    result = result_of(out)
    assert (result["error"], result["messages"]) == (None, [{"i": i} for i in range(MESSAGES)]), (result, err)
    assert scenario.launches() == 2
    assert supervisors(ray_head, name).count("DEAD") == 2
    assert job_status(client, name) == "SUCCEEDED"  # (deleted at teardown: the head is shared by the session)
