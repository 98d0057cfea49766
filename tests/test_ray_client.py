"""PipesRayJobClient against a real local Ray head (tests/support/engines_ray.py): one head for the run, about ten jobs.

Every job runs this interpreter (the test venv, which has pipes_ext and dagster_pipes) on the head's node.
"""

from __future__ import annotations

import _thread
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conformance._servers import free_port
from pipes_core import (
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExecutionError,
    PipesFileMessageReader,
    PipesLogEvent,
    PipesRunContext,
    PipesTimeoutError,
    PipesUsageError,
)
from pipes_core.launch.process import launch_labels
from pipes_core.launch.run_store import PipesRunOwner
from pipes_core.ray import PipesRayJob, PipesRayJobClient, _normalise_address
from tests.support.engines_ray import RayHead

PY = sys.executable
# A generous bound that only catches hangs: a job takes 2-4 s here, much more on a loaded machine.
JOB_DEADLINE_SECONDS = 180.0


class Output:
    """Collects the forwarded job log (a ``write(bytes)`` target)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.chunks.append(data)

    @property
    def text(self) -> str:
        with self.lock:
            return b"".join(self.chunks).decode("utf-8", "replace")


def job_client(head: RayHead) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address)


def wait_terminal(client: Any, submission_id: str) -> str:
    deadline = time.monotonic() + JOB_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.1)  # another process's state, over HTTP: nothing to wait on
    raise AssertionError(f"job {submission_id} not terminal after {JOB_DEADLINE_SECONDS} s")


def custom(events: list[PipesEvent]) -> list[Any]:
    return [e.payload for e in events if isinstance(e, PipesCustomMessageEvent)]


# ------------------------------------------------------------------------------------------------ no cluster needed


def test_addresses_are_normalised_to_the_jobs_api() -> None:
    assert _normalise_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert _normalise_address(" https://ray.example:443/ ") == "https://ray.example:443"
    with pytest.raises(PipesUsageError, match="Ray Client address"):
        _normalise_address("ray://127.0.0.1:10001")
    with pytest.raises(PipesUsageError, match="empty"):
        _normalise_address("  ")


def test_bad_arguments_are_refused_before_anything_is_submitted() -> None:
    # No cluster at this address: each call must fail on its argument, before talking to one.
    client = PipesRayJobClient("http://127.0.0.1:9")
    with pytest.raises(PipesUsageError, match="command is empty"):
        client.run(command="  ")
    with pytest.raises(PipesUsageError, match="strings to strings"):
        client.run(command="true", runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(PipesUsageError, match="env_vars'\\] must be a mapping"):
        client.run(command="true", runtime_env={"env_vars": ["A=1"]})
    with pytest.raises(PipesUsageError, match="runtime_env must be a mapping"):
        client.run(command="true", runtime_env="pip")  # type: ignore[arg-type]
    with pytest.raises(PipesUsageError, match="submit_options cannot set entrypoint"):
        client.run(command="true", submit_options={"entrypoint": "x"})
    with pytest.raises(PipesUsageError, match="submission_id"):
        client.run(command="true", submission_id="")
    with pytest.raises(PipesUsageError, match="bootstrap"):
        PipesRayJobClient("http://127.0.0.1:9", bootstrap="stdin")


def test_an_unreachable_cluster_is_named_in_the_error() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PipesExecutionError, match=f"cannot reach the Ray cluster's Jobs API at {address}"):
        PipesRayJobClient(address).run(command="true")


# ------------------------------------------------------------------------------------------------ real jobs


def test_a_job_round_trip_over_its_log_stream_loses_nothing_at_the_end(
    ray_head: RayHead, write_script: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    # Threads alive before (an earlier test's idle reader threads end on their own, up to 30 s later) are not ours.
    threads_before = set(threading.enumerate())
    # The burst right before exit and the very last lines are what a log stream that ends late would lose.
    script = write_script(
        """
        import sys
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.log.info(f"rows={pipes.get_extra('rows')}")
            print("user output line")
            print('{"looks": "like json", "but": "is not a message"}')
            print("to stderr", file=sys.stderr)
            pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows")})
            for i in range(2000):
                pipes.report_custom_message({"i": i})
            pipes.report_custom_message("last")
            print("final output line", flush=True)
        """
    )
    events: list[PipesEvent] = []
    output = Output()
    launched: list[PipesRayJob] = []
    caplog.set_level(logging.INFO, logger="pipes_core")
    invocation = PipesRayJobClient(ray_head.address).run(
        context=PipesRunContext(asset_keys=["ray/asset"]), command=[PY, str(script)], extras={"rows": 7},
        on_event=events.append, stdout=output, on_launched=lambda job: launched.append(job),  # type: ignore[arg-type]
    )
    job = launched[0]
    assert job.submission_id.startswith("pipes-")
    assert job.submission_id in invocation.description and ray_head.address in invocation.description
    assert any(f"submitted the Ray job {job.submission_id}" in r.getMessage() for r in caplog.records)
    assert invocation.exit_code == 0
    assert invocation.session.closed and not invocation.session.protocol_issues
    assert custom(events) == [*({"i": i} for i in range(2000)), "last"]
    assert [e.message for e in events if isinstance(e, PipesLogEvent)] == ["rows=7"]
    [result] = invocation.get_results()
    assert result.asset_key == "ray/asset" and result.metadata["rows"].value == 7
    text = output.text
    # The job's own output and Ray's lines are forwarded, in order; no message line is.
    assert f"Running entrypoint for job {job.submission_id}" in text
    for line in ("user output line", '{"looks": "like json", "but": "is not a message"}', "to stderr",
                 "final output line"):
        assert line + "\n" in text
    assert text.index("user output line") < text.index("final output line")
    assert "__dagster_pipes_version" not in text
    # Nothing of the log stream is left behind: no thread, no event loop.
    assert not [t for t in set(threading.enumerate()) - threads_before if t.name.startswith("pipes-")]


def test_cli_bootstrap_runtime_env_entrypoint_resources_and_a_chosen_submission_id(
    ray_head: RayHead, write_script: Callable[..., Path]
) -> None:
    script = write_script(
        """
        import os, sys
        from pipes_ext import PipesCliArgsParamsLoader, open_pipes
        assert "DAGSTER_PIPES_CONTEXT" not in os.environ, "cli bootstrap: nothing in the environment"
        with open_pipes(params_loader=PipesCliArgsParamsLoader()) as pipes:
            pipes.report_custom_message({"argv": [a for a in sys.argv[1:] if a.startswith("--")],
                                         "env": os.environ.get("FROM_RUNTIME_ENV"),
                                         "client_env": os.environ.get("FROM_CLIENT")})
        """
    )
    submission_id = f"pipes-test-{os.getpid()}-{time.monotonic_ns()}"
    client = PipesRayJobClient(ray_head.address, bootstrap="cli", runtime_env={"env_vars": {"FROM_CLIENT": "c"}})
    invocation = client.run(
        command=f"{PY} {script}", submission_id=submission_id, runtime_env={"env_vars": {"FROM_RUNTIME_ENV": "r"}},
        entrypoint_num_cpus=1, job_metadata={"team": "pipes"}, stdout=Output(),
    )
    assert invocation.get_custom_messages() == [
        {"argv": ["--dagster-pipes-context", "--dagster-pipes-messages"], "env": "r", "client_env": "c"}
    ]
    info = job_client(ray_head).get_job_info(submission_id)
    # (Ray does not report entrypoint_num_cpus back; it was accepted.) The owner labels go with the user's metadata.
    assert info.metadata == {"team": "pipes", **launch_labels(PipesRunOwner.current(), None)}
    assert info.runtime_env["env_vars"] == {"FROM_CLIENT": "c", "FROM_RUNTIME_ENV": "r"}

    # The same id again: Ray refuses it, and the error says the cluster rejected the job.
    with pytest.raises(PipesExecutionError, match=f"rejected the job {submission_id}") as caught:
        client.run(command=f"{PY} {script}", submission_id=submission_id)
    assert caught.value.exit_code is None


def test_a_failed_job_raises_with_its_exit_code_its_exception_and_rays_message(
    ray_head: RayHead, write_script: Callable[..., Path]
) -> None:
    script = write_script(
        """
        import sys
        from pipes_ext import open_pipes
        try:
            with open_pipes() as pipes:  # reports the exception in "closed"
                pipes.report_custom_message("before")
                raise ValueError("bad rows")
        except ValueError:
            sys.exit(3)
        """
    )
    output = Output()
    with pytest.raises(PipesExecutionError) as caught:
        PipesRayJobClient(ray_head.address).run(command=[PY, str(script)], stdout=output)
    error = caught.value
    assert error.exit_code == 3
    text = str(error)
    assert "the Ray job pipes-" in text and "failed with exit code 3" in text
    assert "ended in Ray job state FAILED" in text and "Job entrypoint command failed with exit code 3" in text
    assert "bad rows" in text and error.remote_exception is not None
    assert error.invocation.get_custom_messages() == ["before"]


def test_a_runtime_env_the_cluster_cannot_set_up_fails_with_rays_reason(ray_head: RayHead) -> None:
    with pytest.raises(PipesExecutionError) as caught:
        PipesRayJobClient(ray_head.address).run(
            command="python -c pass", runtime_env={"conda": "pipes-no-such-conda-env"}, stdout=Output()
        )
    error = caught.value
    assert error.exit_code is None
    assert "RUNTIME_ENV_SETUP_FAILURE" in str(error) and "runtime_env setup failed" in str(error)
    assert not error.invocation.session.opened


def test_ctrl_c_stops_the_job_drains_its_log_and_reraises(ray_head: RayHead, write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        import signal, sys, time
        from pipes_ext import open_pipes
        def on_term(signum, frame):
            print("driver got SIGTERM", flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        with open_pipes() as pipes:
            pipes.report_custom_message("ready")
            time.sleep(600)
        """
    )
    events: list[PipesEvent] = []
    output = Output()
    launched: list[PipesRayJob] = []

    def on_event(event: PipesEvent) -> None:
        events.append(event)
        if isinstance(event, PipesCustomMessageEvent) and event.payload == "ready":
            _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as caught:
        PipesRayJobClient(ray_head.address).run(command=[PY, str(script)], on_event=on_event, stdout=output,
                                                on_launched=lambda job: launched.append(job))  # type: ignore[arg-type]
    assert time.monotonic() - started < JOB_DEADLINE_SECONDS
    invocation = caught.value.invocation  # type: ignore[attr-defined]
    assert invocation.get_custom_messages() == ["ready"]
    # stop_job sent SIGTERM; the job is STOPPED, and what it printed on the way out was drained.
    assert wait_terminal(job_client(ray_head), launched[0].submission_id) == "STOPPED"
    assert invocation.exit_status.killed and "stopped by this client" in invocation.exit_status.description
    assert "driver got SIGTERM" in output.text


def test_a_timeout_stops_the_job(ray_head: RayHead) -> None:
    launched: list[PipesRayJob] = []
    with pytest.raises(PipesTimeoutError, match="ran past its timeout of 8 s") as caught:
        PipesRayJobClient(ray_head.address).run(
            command=[PY, "-c", "import time; time.sleep(600)"], timeout_seconds=8, strict=False, stdout=Output(),
            on_launched=lambda job: launched.append(job),  # type: ignore[arg-type]
        )
    assert wait_terminal(job_client(ray_head), launched[0].submission_id) == "STOPPED"
    assert caught.value.invocation.exit_status.killed


def test_a_job_stopped_from_outside_raises_as_killed(ray_head: RayHead, write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        import time
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message("ready")
            time.sleep(600)
        """
    )
    launched: list[PipesRayJob] = []
    other = job_client(ray_head)

    def on_event(event: PipesEvent) -> None:
        if isinstance(event, PipesCustomMessageEvent) and event.payload == "ready":
            other.stop_job(launched[0].submission_id)  # someone else: `ray job stop`

    with pytest.raises(PipesExecutionError, match="was stopped from outside") as caught:
        PipesRayJobClient(ray_head.address).run(command=[PY, str(script)], on_event=on_event, stdout=Output(),
                                                on_launched=lambda job: launched.append(job))  # type: ignore[arg-type]
    assert not isinstance(caught.value, PipesTimeoutError)
    assert caught.value.invocation.get_custom_messages() == ["ready"]
    assert caught.value.invocation.exit_status.killed


def test_another_message_channel_with_the_log_only_forwarded(
    ray_head: RayHead, write_script: Callable[..., Path], tmp_path: Path
) -> None:
    # The job runs on this machine, so a file is a shared channel here (a blob store would be on a cluster).
    script = write_script(
        """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            print("output through the log")
            pipes.report_custom_message({"via": "file"})
        """
    )
    output = Output()
    messages = tmp_path / "messages.jsonl"
    invocation = PipesRayJobClient(ray_head.address, message_reader=PipesFileMessageReader(str(messages))).run(
        command=[PY, str(script)], stdout=output
    )
    assert invocation.get_custom_messages() == [{"via": "file"}]
    assert "output through the log\n" in output.text


# ------------------------------------------------------------------------------------------------ command line


def test_pipes_run_ray_prints_the_events_and_exits_with_the_jobs_code(
    ray_head: RayHead, write_script: Callable[..., Path]
) -> None:
    import subprocess

    from tests.conftest import REPO_ROOT, cli_json_events

    script = write_script(
        """
        import sys
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_asset_materialization(metadata={"n": 1})
            pipes.report_custom_message({"from": "ray"})
            print("job output")
        sys.exit(4)
        """
    )
    proc = subprocess.run(
        [PY, "-m", "pipes_core", "run", "--asset", "r/a", "--json", "--ray", ray_head.address, "--", PY, str(script)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_DEADLINE_SECONDS,
    )
    assert proc.returncode == 4, proc.stderr[-2000:]
    events = cli_json_events(proc.stdout)
    kinds = [e["event"] for e in events]
    assert "materialization" in kinds and "custom_message" in kinds and kinds[-1] == "summary"
    assert events[-1]["exit_code"] == 4 and "Ray job pipes-" in events[-1]["error"]
    assert "job output" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ interop


@pytest.mark.interop
def test_a_dagster_pipes_script_runs_under_our_ray_client(ray_head: RayHead, write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        from dagster_pipes import open_dagster_pipes
        with open_dagster_pipes() as pipes:
            pipes.log.info("from dagster_pipes")
            pipes.report_asset_materialization(metadata={"rows": 3})
            pipes.report_custom_message({"ok": True})
        """
    )
    invocation = PipesRayJobClient(ray_head.address).run(
        context=PipesRunContext(asset_keys=["interop"]), command=[PY, str(script)], stdout=Output()
    )
    assert invocation.get_custom_messages() == [{"ok": True}]
    [result] = invocation.get_results()
    assert result.asset_key == "interop" and result.metadata["rows"].value == 3


def _open_sockets() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed while listing
            continue
        if target.startswith("socket:"):
            found.add(f"{fd}:{target}")
    return found


def test_the_log_stream_leaves_no_socket_open(ray_head: RayHead, write_script: Callable[..., Path]) -> None:
    """Whether the job ends by itself or is stopped (timeout), Ray's log tail, stopped early, leaves no socket
    open for a later garbage collection to warn about (seen as a ResourceWarning in an unrelated test)."""
    script = write_script(
        """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message("done")
        """
    )
    client = PipesRayJobClient(ray_head.address)
    client.run(command=[PY, str(script)])  # a first run: whatever Ray's client keeps for good is opened here
    gc.collect()
    gc.disable()  # a socket left open must still be open at the end, not closed by a collection on the way
    try:
        before = _open_sockets()
        assert client.run(command=[PY, str(script)]).get_custom_messages() == ["done"]
        with pytest.raises(PipesTimeoutError):
            client.run(command=[PY, "-c", "import time; time.sleep(600)"], timeout_seconds=3, strict=False,
                       stdout=Output())
        left = _open_sockets() - before
    finally:
        gc.enable()
    assert left == set()
