"""Each launcher as the durable-run kill matrix (:mod:`tests.support.durable_kills`) runs it: which client, with what
constructor arguments and run options, and how its engine is looked at and cleaned up. One definition, shared by
the durable tests (``tests/test_launch_durable*.py``) and ``benchmarks/durable.py``.

* :data:`SUBPROCESS`: a local child (no engine);
* :func:`docker_launcher`: a container of the test image on a private dockerd (tests/support/engines_docker.py); the
  job's script and count file bind-mounted at their own paths, the run directory by the client itself
  (``mount_channel_files``); the orchestrators reach the daemon through ``DOCKER_HOST``;
* :func:`ray_launcher`: a job on a private local head (tests/support/engines_ray.py), running on this host;
* :func:`slurm_launcher`: a job on the private one-node cluster (tests/support/engines_slurm.py); the orchestrators
  find it through ``SLURM_CONF`` in their environment (the jobs inherit it).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipes_core.launch.process import LAUNCH_LABEL, launch_name
from tests.support.durable_kills import WAIT_SECONDS, Launcher, Scenario
from tests.support.engines_docker import IMAGE_CODE_DIR, TEST_IMAGE, DockerEngine
from tests.support.engines_ray import RayHead
from tests.support.engines_slurm import SlurmCluster
from tests.support.helpers import PYTHON, wait_until

# ---------------------------------------------------------------------------------------------- subprocess


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


def _no_process_left(scenario: Scenario) -> None:
    handle = scenario.record_handle()
    assert handle is not None
    assert live_members(int(handle["pid"])) == []  # no orphan: the job's whole group has ended


SUBPROCESS = Launcher(client="pipes_core:PipesSubprocessClient", async_client="pipes_core:PipesAsyncSubprocessClient",
                      options=lambda scenario: {"command": [PYTHON, str(scenario.child)]},
                      assert_nothing_left=_no_process_left, launched_attribute="pid")

# ---------------------------------------------------------------------------------------------- Docker


def containers_labelled(engine: DockerEngine, label: str) -> list[Any]:
    return list(engine.client.containers.list(all=True, filters={"label": label}))


def created_count(engine: DockerEngine, launch_key: str) -> int:
    """How many containers the daemon created for the key (its events: the container itself is gone)."""
    events = engine.client.events(since=0, until=f"{time.time():.3f}", decode=True,
                                  filters={"type": "container", "event": "create",
                                           "label": f"{LAUNCH_LABEL}={launch_name(launch_key)}"})
    try:
        return sum(1 for _ in events)
    finally:
        events.close()


def remove_labelled(engine: DockerEngine, label: str) -> None:
    for container in containers_labelled(engine, label):
        try:
            container.remove(force=True)
        except Exception:  # gone meanwhile
            pass


def docker_launcher(engine: DockerEngine, client: str = "pipes_core.docker:PipesDockerClient") -> Launcher:
    def options(scenario: Scenario) -> dict[str, Any]:
        # A bind-mounted file must exist, or Docker makes a directory in its place.
        scenario.count_file.touch()
        return {"image": TEST_IMAGE, "command": ["python3", str(scenario.child)], "network": "none",
                "env": {**scenario.job_env, "PYTHONPATH": IMAGE_CODE_DIR},
                "volumes": {str(scenario.child): {"bind": str(scenario.child), "mode": "ro"},
                            str(scenario.count_file): {"bind": str(scenario.count_file), "mode": "rw"}}}

    def label(scenario: Scenario) -> str:
        return f"{LAUNCH_LABEL}={launch_name(scenario.key)}"

    def nothing_left(scenario: Scenario) -> None:
        assert containers_labelled(engine, label(scenario)) == []

    return Launcher(client=client, async_client="pipes_core.docker:PipesAsyncDockerClient", options=options,
                    engine_launches=lambda scenario: created_count(engine, scenario.key),
                    assert_nothing_left=nothing_left,
                    cleanup=lambda scenario: remove_labelled(engine, label(scenario)),
                    orchestrator_env={"DOCKER_HOST": engine.host}, launched_attribute="name")


# ---------------------------------------------------------------------------------------------- Ray

RAY_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The name Ray gives the (detached) supervisor actor of the job with a submission id: one per submission.
SUPERVISOR_ACTOR = "_ray_internal_job_actor_{}"


def job_client(head: RayHead) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address)


def job_status(client: Any, submission_id: str) -> str | None:
    """The job's status, None when the cluster has no job of that id."""
    try:
        return str(client.get_job_status(submission_id).value)
    except RuntimeError as exc:
        if "does not exist" in str(exc):
            return None
        raise


def supervisors(head: RayHead, submission_id: str) -> list[str]:
    """The states of every supervisor actor the head ever started for ``submission_id`` (dead ones included)."""
    url = f"{head.address}/api/v0/actors?limit=10000&detail=false"
    with urllib.request.urlopen(url, timeout=30) as response:
        actors = json.loads(response.read())["data"]["result"]["result"]
    return [str(actor["state"]) for actor in actors if actor.get("name") == SUPERVISOR_ACTOR.format(submission_id)]


def job_processes(marker: str) -> list[int]:
    """The processes of this host whose command line mentions ``marker`` (a test's own script path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and stat[stat.rfind(b")") + 2:].split()[0] != b"Z":
            found.append(int(entry.name))
    return found


def stop_and_delete(client: Any, submission_id: str) -> None:
    """Teardown: stop the job if it runs, wait for its end, delete it (the head is shared by the session)."""
    if job_status(client, submission_id) is None:
        return
    try:
        client.stop_job(submission_id)
    except RuntimeError:
        pass  # ended meanwhile
    wait_until(lambda: job_status(client, submission_id) in (*RAY_TERMINAL, None), timeout=WAIT_SECONDS,
               what=f"the Ray job {submission_id} to end")
    try:
        client.delete_job(submission_id)
    except RuntimeError:
        pass  # deleted meanwhile


def ray_launcher(head: RayHead) -> Launcher:
    client = job_client(head)

    def engine_launches(scenario: Scenario) -> int:
        name = launch_name(scenario.key)
        labelled_otherwise = [job for job in client.list_jobs()
                              if (job.metadata or {}).get(LAUNCH_LABEL) == name and job.submission_id != name]
        return len(supervisors(head, name)) + len(labelled_otherwise)

    def assert_nothing_left(scenario: Scenario) -> None:
        name = launch_name(scenario.key)
        assert job_status(client, name) in RAY_TERMINAL
        assert "ALIVE" not in supervisors(head, name)
        assert job_processes(str(scenario.child)) == []

    return Launcher(client="pipes_core.ray:PipesRayJobClient", async_client="pipes_core.ray:PipesAsyncRayJobClient",
                    options=lambda scenario: {"command": [PYTHON, str(scenario.child)],
                                              "runtime_env": {"env_vars": scenario.job_env}},
                    client_kwargs={"address": head.address, "forward_stdio": False},
                    engine_launches=engine_launches, assert_nothing_left=assert_nothing_left,
                    cleanup=lambda scenario: stop_and_delete(client, launch_name(scenario.key)),
                    launched_attribute="submission_id")


# ---------------------------------------------------------------------------------------------- Slurm

# An attached job has no session to say that `closed` came, so its orchestrator notices the end at its next state
# query: at most this long after it (the client's default is 2 s).
SLURM_POLL_SECONDS = 0.5


def squeue(cluster: SlurmCluster, *args: str) -> list[str]:
    listed = cluster.run("squeue", "--noheader", *args)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.splitlines()


def slurm_launcher(cluster: SlurmCluster) -> Launcher:
    def named(scenario: Scenario, *states: str) -> list[str]:
        return squeue(cluster, f"--name={launch_name(scenario.key)}", *states, "--format=%i")

    def nothing_left(scenario: Scenario) -> None:
        assert named(scenario) == []  # no job of the key pending or running

    def cleanup(scenario: Scenario) -> None:
        cluster.run("scancel", f"--name={launch_name(scenario.key)}")

    return Launcher(client="pipes_core.slurm:PipesSlurmClient", async_client="pipes_core.slurm:PipesAsyncSlurmClient",
                    client_kwargs={"forward_stdio": False, "poll_interval_seconds": SLURM_POLL_SECONDS},
                    options=lambda scenario: {"command": [PYTHON, str(scenario.child)]},
                    engine_launches=lambda scenario: len(named(scenario, "--states=all")),
                    assert_nothing_left=nothing_left, cleanup=cleanup, orchestrator_env=cluster.env,
                    launched_attribute="job_id")


__all__ = ["SUBPROCESS", "docker_launcher", "ray_launcher", "slurm_launcher", "live_members", "containers_labelled",
           "created_count", "remove_labelled", "RAY_TERMINAL", "SUPERVISOR_ACTOR", "job_client", "job_status",
           "supervisors", "job_processes", "stop_and_delete", "SLURM_POLL_SECONDS", "squeue"]
