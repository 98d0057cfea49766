"""Durable runs of the Slurm launcher (issue 22), sync and async, on the private one-node cluster
(tests/support/engines_slurm.py): the kill matrix of :mod:`tests.support.durable_kills` (a real orchestrator
SIGKILLed at each point of a run, a new one finishing it), orphans swept (``pipes runs sweep --slurm``), and
runs stopped and forgotten from another process's point of view.

The orchestrators find the cluster through ``SLURM_CONF`` in their environment (the jobs inherit it), the test
process does not have it: a client made here with defaults follows a job through its handle alone. Slurm keeps an
ended job for ``MinJobAge`` (300 s here, no accounting), so ``squeue --states=all`` counts a key's launches.
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

from pipes_core import PipesRunStore, PipesUsageError
from pipes_core.launch.manage import client_for, forget_run, stop_run
from pipes_core.launch.process import LAUNCH_LABEL, OWNER_PID_LABEL, DurableLaunch, launch_name
from pipes_core.protocol.errors import PipesEngineErrorKind
from pipes_core.slurm import PipesSlurmClient, SlurmCommands, labels_from_comment
from tests.support.durable_kills import (
    CASES,
    FLAVOURS,
    WAIT_SECONDS,
    Scenario,
    kill_and_finish,
    race,
    result_of,
    scenarios,
    stop_groups,
)
from tests.support.durable_launchers import slurm_launcher, squeue
from tests.support.engines_slurm import SlurmCluster
from tests.support.helpers import PYTHON, REPO_ROOT, wait_until

# A keyless (or keyed) run of a job that runs until cancelled, in an orchestrator process of its own.
SLEEPER = """
import sys
from pipes_core.slurm import PipesSlurmClient
key = sys.argv[1] or None
PipesSlurmClient(forward_stdio=False, strict=False).run(command=["sleep", "600"], launch_key=key,
                                                        store=sys.argv[2] if key else None)
"""


@pytest.fixture
def scenario_factory(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[Callable[..., Scenario]]:
    assert "SLURM_CONF" not in os.environ  # the orchestrators' environment has it, this process's does not
    yield from scenarios(tmp_path, slurm_launcher(slurm_cluster))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("point", "mode"), CASES)
def test_a_killed_orchestrator_is_replaced_and_the_job_finishes_once(scenario_factory: Any, point: str, mode: str,
                                                                     flavour: str) -> None:
    kill_and_finish(scenario_factory(mode), point, mode, flavour)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_two_orchestrators_racing_on_one_key_submit_once(scenario_factory: Any, flavour: str) -> None:
    race(scenario_factory(), flavour)


# ---------------------------------------------------------------------------------------------- managing runs


def _job_state(cluster: SlurmCluster, job_id: str) -> str:
    (line,) = squeue(cluster, f"--jobs={job_id}", "--states=all", "--format=%T")
    return line.strip()


def test_a_run_is_stopped_and_forgotten_by_a_default_client_and_its_key_then_launches_anew(
        scenario_factory: Any, slurm_cluster: SlurmCluster) -> None:
    scenario = scenario_factory(delay=600)  # the job runs until stopped
    first = scenario.start("none", "sync")
    wait_until(lambda: scenario.launches() == 1 and scenario.record_handle() is not None, WAIT_SECONDS,
               what="the job running and its handle in the store")
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=WAIT_SECONDS)
    handle = scenario.record_handle()
    assert handle is not None
    job_id = handle["job_id"]
    assert handle["commands"]["slurm_conf"] == str(slurm_cluster.conf)  # from the orchestrator's environment
    assert Path(handle["stdout"]).parent == scenario.run_directory()
    labels = labels_from_comment(slurm_cluster.run("squeue", "--noheader", f"--jobs={job_id}",
                                                   "--format=%k").stdout.strip())
    assert labels[LAUNCH_LABEL] == launch_name(scenario.key) and labels[OWNER_PID_LABEL] == str(first.pid)
    store = PipesRunStore(scenario.store_path)
    process = client_for("PipesSlurmClient").attach(handle)  # what `pipes runs` does, here without SLURM_CONF
    assert not process.poll()
    with pytest.raises(PipesUsageError, match="still running: stop it first"):
        forget_run(store, scenario.key)
    assert stop_run(store, scenario.key)
    assert _job_state(slurm_cluster, job_id) == "CANCELLED"
    assert not stop_run(store, scenario.key)  # not running any more
    forget_run(store, scenario.key)
    assert store.get(scenario.key) is None and not scenario.run_directory().exists()
    # The key's old job is still known to Slurm by its name, but it left nothing in the (new) run directory: a new
    # run with the key launches a new job instead of re-attaching to the forgotten one.
    scenario.job_env["DELAY"] = scenario.env["DELAY"] = "0.05"
    code, out, err = scenario.orchestrate("none", "sync")
    assert code == 0, err
    assert result_of(out)["error"] is None, (out, err)
    assert scenario.launches() == 2
    assert scenario.launcher.engine_launches(scenario) == 2


def test_a_job_that_slurm_no_longer_knows_ended_and_how_is_lost(slurm_cluster: SlurmCluster) -> None:
    handle = {"job_id": "999999", "name": "pipes-0", "stdout": None, "stderr": None,
              "commands": {"slurm_conf": str(slurm_cluster.conf)}, "description": "the Slurm job 999999"}
    process = PipesSlurmClient(commands=SlurmCommands(sacct=None)).attach(handle)
    assert process.poll()
    status = process.exit_status()
    assert status.killed and status.exit_code is None and status.kind == PipesEngineErrorKind.QUERY_FAILED
    assert "MinJobAge" in status.description and "accounting" in status.description
    assert process.handle() == handle
    process.close()
    seen = PipesSlurmClient().attach(dict(handle, exit={"exit_code": 3}))  # an end a run saw: Slurm is not asked
    assert seen.poll() and seen.exit_status().exit_code == 3 and not seen.exit_status().killed


def test_find_launch_takes_a_pending_or_running_job_of_the_name_or_one_that_left_its_files(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    durable = DurableLaunch("find me", tmp_path / "run", -1)
    durable.directory.mkdir()
    client = PipesSlurmClient(commands=SlurmCommands(slurm_conf=str(slurm_cluster.conf)))
    assert client.find_launch(durable) is None
    # Submitted by an orchestrator killed before it wrote anything: found by its name while it is pending or running
    submitted = slurm_cluster.run("sbatch", "--parsable", f"--job-name={durable.name}", "--output=/dev/null",
                                  "--wrap", "sleep 600")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        handle = client.find_launch(durable)
        assert handle is not None and handle["job_id"] == job_id and handle["name"] == durable.name
        assert not client_for("PipesSlurmClient").attach(handle).poll()
    finally:
        slurm_cluster.run("scancel", job_id)
    wait_until(lambda: squeue(slurm_cluster, f"--jobs={job_id}") == [], WAIT_SECONDS, what="the job's end")
    assert client.find_launch(durable) is None  # ended, and nothing of it in the run directory: another run's
    (durable.directory / f"slurm-{job_id}.out").touch()
    handle = client.find_launch(durable)
    assert handle is not None and handle["job_id"] == job_id


# ---------------------------------------------------------------------------------------------- orphans


def test_sweep_orphans_cancels_the_job_of_a_gone_keyless_orchestrator_only(slurm_cluster: SlurmCluster,
                                                                             tmp_path: Path) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    env = {**os.environ, **slurm_cluster.env, "PYTHONPATH": str(REPO_ROOT)}
    store = tmp_path / "state" / "runs.sqlite3"
    orchestrators: dict[str, subprocess.Popen[bytes]] = {}
    jobs: dict[str, str] = {}

    def job_of(pid: int) -> str | None:
        for line in squeue(slurm_cluster, "--format=%i\t%k"):
            job_id, _, comment = line.partition("\t")
            if labels_from_comment(comment).get(OWNER_PID_LABEL) == str(pid):
                return job_id.strip()
        return None

    try:
        for what, key in (("orphan", ""), ("live", ""), ("durable", "sleeper")):
            orchestrators[what] = subprocess.Popen([PYTHON, str(script), key, str(store)], env=env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                   start_new_session=True)
            pid = orchestrators[what].pid
            wait_until(lambda pid=pid: job_of(pid) is not None, WAIT_SECONDS, what=f"the {what} orchestrator's job")
            jobs[what] = str(job_of(pid))
        for what in ("orphan", "durable"):
            os.killpg(orchestrators[what].pid, signal.SIGKILL)
            orchestrators[what].wait(WAIT_SECONDS)
        swept = subprocess.run([PYTHON, "-m", "pipes_core", "runs", "sweep", "--slurm", "--slurm-conf",
                                str(slurm_cluster.conf), "--state-dir", str(tmp_path / "elsewhere")],
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                               timeout=WAIT_SECONDS)
        assert swept.returncode == 0, swept.stderr
        said = swept.stdout.splitlines()
        pid = orchestrators["orphan"].pid
        assert len(said) == 2 and said[1] == "swept 1 leftover", said
        assert said[0].startswith(f"stopped the Slurm job {jobs['orphan']} "), said
        assert said[0].endswith(f"launched by process {pid} on host {socket.gethostname()}, which is gone"), said
        wait_until(lambda: _job_state(slurm_cluster, jobs["orphan"]) == "CANCELLED", WAIT_SECONDS,
                   what="the orphan's job cancelled")
        assert {_job_state(slurm_cluster, jobs[what]) for what in ("live", "durable")} <= {"RUNNING", "PENDING"}
    finally:
        stop_groups([process.pid for process in orchestrators.values()])
        for process in orchestrators.values():
            process.wait(WAIT_SECONDS)
        for job_id in jobs.values():
            slurm_cluster.run("scancel", job_id)
