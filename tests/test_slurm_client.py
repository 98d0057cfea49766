"""PipesSlurmClient against a real one-node Slurm cluster (tests/support/engines_slurm.py): no mocks.

Each test submits at most a couple of jobs; a job here takes 0.1-3 s (Slurm's scheduler runs on a tick).
What happens for each bad input is said in the test names: an unknown partition or option, a missing sbatch, an
unreachable controller, a bad environment name, a job that never leaves the queue, a job killed or lost.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesExecutionError,
    PipesInterruptedError,
    PipesRunContext,
    PipesTimeoutError,
    PipesUsageError,
)
from pipes_core.channels.stdio import PipesStdioMessageReader
from pipes_core.launch.client import PipesLaunchedProcess
from pipes_core.slurm import (
    SLURM_ERROR_REFUSED,
    SLURM_ERROR_SBATCH_MISSING,
    SLURM_ERROR_UNREACHABLE,
    PipesSlurmClient,
    PipesSlurmError,
    PipesSlurmMessageReader,
    SlurmCommands,
    SlurmJobInfo,
)
from tests.support.engines_slurm import SlurmCluster

# Generous bound on one job's life here (queue tick + start + run): catches hangs, never a timing assertion.
JOB_BOUND_SECONDS = 120

PIPES_SCRIPT = """
import sys
from pipes_ext import PipesCliArgsParamsLoader, PipesEnvVarParamsLoader, open_pipes
cli = "--dagster-pipes-context" in sys.argv
with open_pipes(params_loader=PipesCliArgsParamsLoader() if cli else PipesEnvVarParamsLoader()) as pipes:
    print("out: hello from the job", flush=True)
    print("err: a line on stderr", file=sys.stderr, flush=True)
    pipes.log.info(f"extras {pipes.extras}")
    pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows")})
    pipes.report_custom_message({"argv": sys.argv[1:]})
"""


class Collector:
    """A thread-safe ``write(bytes)`` target that can wait for a piece of text."""

    def __init__(self) -> None:
        self.data = b""
        self._cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self._cond:
            self.data += chunk
            self._cond.notify_all()

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = JOB_BOUND_SECONDS) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: needle.encode() in self.data, timeout)


@pytest.fixture
def client_for(slurm_cluster: SlurmCluster, tmp_path: Path) -> Callable[..., PipesSlurmClient]:
    def make(**kwargs: Any) -> PipesSlurmClient:
        kwargs.setdefault("commands", SlurmCommands(slurm_conf=str(slurm_cluster.conf)))
        kwargs.setdefault("shared_dir", str(tmp_path))
        kwargs.setdefault("forward_stdio", True)
        return PipesSlurmClient(**kwargs)

    return make


def _script(tmp_path: Path, source: str, name: str = "job.py") -> str:
    path = tmp_path / name
    path.write_text(source, encoding="utf-8")
    return str(path)


def _job_state(cluster: SlurmCluster, job_id: str) -> str:
    shown = cluster.run("scontrol", "show", "job", job_id)
    return shown.stdout.split("JobState=", 1)[1].split()[0]


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pipes-"))


# ---------------------------------------------------------------------------------------------- success


def test_a_pipes_job_reports_everything_and_its_output_is_forwarded(client_for: Callable[..., PipesSlurmClient],
                                                                     tmp_path: Path) -> None:
    out, err = Collector(), Collector()
    states: list[SlurmJobInfo] = []
    jobs: list[PipesLaunchedProcess] = []
    client = client_for()
    invocation = client.run(
        context=PipesRunContext(asset_keys=["slurm/asset"]),
        command=[sys.executable, _script(tmp_path, PIPES_SCRIPT), "a b", "c,d"],
        extras={"rows": 3, "text": "commas, = and\nnewlines"},
        stdout=out, stderr=err, on_job_state=states.append, on_launched=jobs.append, timeout_seconds=JOB_BOUND_SECONDS,
    )
    assert invocation.exit_code == 0
    [materialization] = invocation.get_results()
    assert materialization.asset_key == "slurm/asset" and materialization.metadata["rows"].value == 3
    assert invocation.get_custom_messages() == [{"argv": ["a b", "c,d"]}]  # arguments survive --wrap quoting
    log = invocation.session.get_logs()[0]
    assert "commas, = and\\nnewlines" in log.message  # the context travelled intact in the job's environment
    assert "out: hello from the job" in out.text and "err: a line on stderr" in err.text
    assert "err:" not in out.text
    job_id = jobs[0].job_id  # type: ignore[attr-defined]
    assert f"Slurm job {job_id}" in invocation.description
    assert states[-1].state == "COMPLETED" and states[-1].job_id == job_id
    assert _leftovers(tmp_path) == []  # the messages file and output files under shared_dir are gone


def test_the_default_reader_polls_when_the_messages_file_is_on_a_shared_dir(
        client_for: Callable[..., PipesSlurmClient], tmp_path: Path) -> None:
    # inotify never sees a writer on another host: with a shared_dir the reader must find the data by itself.
    reader = PipesSlurmMessageReader(tmp_path)
    assert reader.use_inotify is False
    assert PipesSlurmMessageReader().use_inotify is True  # a local temp dir: inotify works (one node)
    received: list[int] = []
    source = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    for i in range(2000):
        pipes.report_custom_message(i)
"""
    invocation = client_for(message_reader=reader).run(
        command=[sys.executable, _script(tmp_path, source)], retain_messages=False, timeout_seconds=JOB_BOUND_SECONDS,
        on_event=lambda event: received.append(event.payload) if hasattr(event, "payload") else None,
    )
    assert received == list(range(2000))
    assert invocation.session.closed


def test_cli_bootstrap_and_a_batch_script_whose_sbatch_lines_name_the_output_file(
        client_for: Callable[..., PipesSlurmClient], tmp_path: Path) -> None:
    user_out = tmp_path / "mine-%j.log"
    script = _script(tmp_path, f"""#!/bin/sh
#SBATCH --output={user_out}
#SBATCH --job-name=pipes-script-test
echo "script args: $1"
exec {sys.executable} {_script(tmp_path, PIPES_SCRIPT, "inner.py")} "$@"
""", "batch.sh")
    out = Collector()
    jobs: list[PipesLaunchedProcess] = []
    invocation = client_for(bootstrap="cli").run(script=script, script_args=["first"], extras={"rows": 1},
                                                 context=PipesRunContext(asset_keys=["a"]),
                                                 stdout=out, on_launched=jobs.append,
                                                 timeout_seconds=JOB_BOUND_SECONDS)
    [custom] = invocation.get_custom_messages()
    assert custom["argv"][0] == "first" and "--dagster-pipes-context" in custom["argv"]
    job_id = jobs[0].job_id  # type: ignore[attr-defined]
    mine = tmp_path / f"mine-{job_id}.log"
    # The user's file is used (stdout and stderr together), forwarded once, and left in place.
    assert "script args: first" in mine.read_text() and "err: a line on stderr" in mine.read_text()
    assert "script args: first" in out.text and "err: a line on stderr" in out.text
    assert out.text.count("out: hello from the job") == 1


def test_messages_over_the_jobs_stdout_file_with_the_stdio_reader(client_for: Callable[..., PipesSlurmClient],
                                                                 tmp_path: Path) -> None:
    out = Collector()
    invocation = client_for(message_reader=PipesStdioMessageReader()).run(
        command=[sys.executable, _script(tmp_path, PIPES_SCRIPT)], extras={"rows": 2}, stdout=out,
        context=PipesRunContext(asset_keys=["a"]),
        timeout_seconds=JOB_BOUND_SECONDS,
    )
    assert invocation.get_custom_messages() == [{"argv": []}]
    assert "out: hello from the job" in out.text and "__dagster_pipes_version" not in out.text


def test_output_is_forwarded_while_the_job_runs(client_for: Callable[..., PipesSlurmClient], tmp_path: Path) -> None:
    go = tmp_path / "go"
    source = f"""
import os, sys, time
print("ready", flush=True)
deadline = time.monotonic() + {JOB_BOUND_SECONDS}
while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
    time.sleep(0.05)
print("finished", flush=True)
"""
    out = Collector()
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(client_for(strict=False).run(
        command=[sys.executable, _script(tmp_path, source)], stdout=out, timeout_seconds=JOB_BOUND_SECONDS)))
    thread.start()
    try:
        assert out.wait_for("ready"), out.text  # seen while the job still waits for us
        assert "finished" not in out.text
    finally:
        go.touch()
        thread.join(JOB_BOUND_SECONDS)
    assert "finished" in out.text and result[0].exit_code == 0


# ---------------------------------------------------------------------------------------------- failures


def test_a_failing_job_raises_with_its_exit_code_and_remote_exception(
        client_for: Callable[..., PipesSlurmClient], tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    source = """
import sys
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message("before")
    try:
        raise ValueError("bad rows")
    except ValueError:
        print("about to fail", file=sys.stderr, flush=True)
        raise
"""
    jobs: list[PipesLaunchedProcess] = []
    with pytest.raises(PipesExecutionError) as caught:
        client_for(forward_stdio=False).run(command=[sys.executable, _script(tmp_path, source)],
                                            on_launched=jobs.append, timeout_seconds=JOB_BOUND_SECONDS)
    error = caught.value
    job_id = jobs[0].job_id  # type: ignore[attr-defined]
    assert error.exit_code == 1
    assert f"Slurm job {job_id}" in str(error) and "job state FAILED" in str(error) and "bad rows" in str(error)
    assert error.remote_exception is not None and error.remote_exception.name == "ValueError"
    assert "about to fail" in error.output_tail  # the stderr file, read although not forwarded
    assert error.invocation.get_custom_messages() == ["before"]
    assert _job_state(slurm_cluster, job_id) == "FAILED"


def test_a_plain_exit_code_of_a_non_pipes_command(client_for: Callable[..., PipesSlurmClient]) -> None:
    with pytest.raises(PipesExecutionError) as caught:
        client_for(strict=False).run(command="sh -c 'exit 4'", timeout_seconds=JOB_BOUND_SECONDS)
    assert caught.value.exit_code == 4 and "failed with exit code 4" in str(caught.value)


def test_a_job_stuck_pending_is_visible_and_the_timeout_covers_it(
        client_for: Callable[..., PipesSlurmClient], tmp_path: Path, slurm_cluster: SlurmCluster,
        caplog: pytest.LogCaptureFixture) -> None:
    states: list[SlurmJobInfo] = []
    jobs: list[PipesLaunchedProcess] = []
    client = client_for(pending_warning_seconds=0.5, termination_timeout_seconds=300)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="pipes_core"), pytest.raises(PipesTimeoutError) as caught:
        client.run(command=["true"], sbatch_args=["--begin=now+3600"], timeout_seconds=2, on_job_state=states.append,
                   on_launched=jobs.append)
    # A pending job is cancelled outright: no graceful-interrupt wait of termination_timeout_seconds (300 s).
    assert time.monotonic() - started < 150
    job_id = jobs[0].job_id  # type: ignore[attr-defined]
    assert states[0].state == "PENDING" and states[0].reason == "BeginTime"
    assert any("PENDING for" in r.getMessage() and "BeginTime" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert "ran past its timeout of 2 s" in str(caught.value)
    assert _job_state(slurm_cluster, job_id) == "CANCELLED"
    assert _leftovers(tmp_path) == []


def test_ctrl_c_interrupts_a_running_job_gracefully_first(client_for: Callable[..., PipesSlurmClient],
                                                         tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    # scancel --full --signal=INT reaches the command itself (the wrapper exec's it): it sees KeyboardInterrupt,
    # and pipes_ext reports that in `closed` before the job ends. Ctrl-C is a real SIGINT to this process, sent
    # once the job has said it runs (the run is then inside its wait).
    source = """
import time
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message("running")
    time.sleep(600)
"""
    jobs: list[PipesLaunchedProcess] = []

    def on_event(event: object) -> None:
        if getattr(event, "payload", None) == "running":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as caught:
        client_for().run(command=[sys.executable, _script(tmp_path, source)], on_event=on_event,
                         on_launched=jobs.append, timeout_seconds=JOB_BOUND_SECONDS)
    invocation = caught.value.invocation  # type: ignore[attr-defined]
    assert invocation.session.closed
    assert invocation.session.exception is not None and invocation.session.exception.name == "KeyboardInterrupt"
    assert invocation.exit_status.killed or invocation.exit_code != 0
    assert _job_state(slurm_cluster, jobs[0].job_id) == "FAILED"  # type: ignore[attr-defined]


def test_sigterm_cancels_a_job_that_ignores_the_interrupt(client_for: Callable[..., PipesSlurmClient],
                                                          tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    source = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ignoring SIGINT", flush=True)
time.sleep(600)
"""
    jobs: list[PipesLaunchedProcess] = []
    sent = threading.Event()

    def out(chunk: bytes) -> None:
        if b"ignoring SIGINT" in chunk and not sent.is_set():
            sent.set()
            os.kill(os.getpid(), signal.SIGTERM)  # the orchestrator is told to stop

    with pytest.raises(PipesInterruptedError) as caught:
        client_for(strict=False, termination_timeout_seconds=1).run(
            command=[sys.executable, _script(tmp_path, source)], on_launched=jobs.append, stdout=out,
            timeout_seconds=JOB_BOUND_SECONDS)
    assert "was terminated" in str(caught.value) and "CANCELLED" in caught.value.output_tail
    assert _job_state(slurm_cluster, jobs[0].job_id) == "CANCELLED"  # type: ignore[attr-defined]


def test_a_lost_node_is_reported_as_node_fail(client_for: Callable[..., PipesSlurmClient], tmp_path: Path,
                                             slurm_cluster: SlurmCluster) -> None:
    source = """
import time
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message("running")
    time.sleep(600)
"""

    def on_event(event: object) -> None:
        if getattr(event, "payload", None) == "running":
            down = slurm_cluster.run("scontrol", "update", f"nodename={slurm_cluster.node}", "state=down",
                                     "reason=pipes-test")
            assert down.returncode == 0, down.stderr

    try:
        with pytest.raises(PipesExecutionError) as caught:
            client_for().run(command=[sys.executable, _script(tmp_path, source)], on_event=on_event,
                             timeout_seconds=JOB_BOUND_SECONDS)
    finally:
        _restore_node(slurm_cluster)
    assert "lost its node" in str(caught.value) and "NODE_FAIL" in str(caught.value)
    assert caught.value.invocation.get_custom_messages() == ["running"]


def _restore_node(cluster: SlurmCluster) -> None:
    if cluster.node_state() != "idle":
        cluster.run("scontrol", "update", f"nodename={cluster.node}", "state=resume")
    cluster.wait_node_idle()


# ---------------------------------------------------------------------------------------------- bad input


def test_an_unknown_partition_is_refused_with_slurms_words(client_for: Callable[..., PipesSlurmClient],
                                                           tmp_path: Path) -> None:
    with pytest.raises(PipesSlurmError) as caught:
        client_for().run(command=["true"], sbatch_args=["--partition=no-such-partition"])
    assert caught.value.kind == SLURM_ERROR_REFUSED
    assert "Slurm refused to submit" in str(caught.value) and "invalid partition" in str(caught.value).lower()
    assert caught.value.invocation is not None and not caught.value.invocation.session.opened
    assert _leftovers(tmp_path) == []


def test_an_unknown_sbatch_option_is_refused(client_for: Callable[..., PipesSlurmClient], tmp_path: Path) -> None:
    with pytest.raises(PipesSlurmError) as caught:
        client_for().run(command=["true"], sbatch_args=["--no-such-option"])
    assert caught.value.kind == SLURM_ERROR_REFUSED and "no-such-option" in str(caught.value)
    assert _leftovers(tmp_path) == []


def test_a_missing_sbatch_is_a_clear_error(client_for: Callable[..., PipesSlurmClient], tmp_path: Path) -> None:
    client = client_for(commands=SlurmCommands(sbatch=str(tmp_path / "no-sbatch-here")))
    with pytest.raises(PipesSlurmError) as caught:
        client.run(command=["true"])
    assert caught.value.kind == SLURM_ERROR_SBATCH_MISSING and "no-sbatch-here" in str(caught.value)
    assert _leftovers(tmp_path) == []


def test_an_unreachable_controller_is_a_clear_error(client_for: Callable[..., PipesSlurmClient], tmp_path: Path,
                                                    slurm_cluster: SlurmCluster) -> None:
    # The same cluster's configuration with the controller on a port nobody listens on (sbatch retries ~10 s).
    from conformance._servers import free_port

    conf = tmp_path / "unreachable.conf"
    lines = [f"SlurmctldPort={free_port()}" if line.startswith("SlurmctldPort=") else line
             for line in slurm_cluster.conf.read_text().splitlines()]
    conf.write_text("\n".join([*lines, "MessageTimeout=2"]) + "\n")  # sbatch gives up after ~1 s, not ~10 s
    with pytest.raises(PipesSlurmError) as caught:
        client_for(commands=SlurmCommands(slurm_conf=str(conf))).run(command=["true"])
    assert caught.value.kind == SLURM_ERROR_UNREACHABLE
    assert "not reachable" in str(caught.value) and str(conf) in str(caught.value)


def test_bad_arguments_are_refused_before_anything_is_submitted(client_for: Callable[..., PipesSlurmClient],
                                                                 tmp_path: Path) -> None:
    client = client_for()
    with pytest.raises(PipesUsageError, match="exactly one of command and script"):
        client.run()
    with pytest.raises(PipesUsageError, match="exactly one of command and script"):
        client.run(command=["true"], script=str(tmp_path))
    with pytest.raises(PipesUsageError, match="is not a file"):
        client.run(script=str(tmp_path / "missing.sh"))
    with pytest.raises(PipesUsageError, match="command is empty"):
        client.run(command=[])
    with pytest.raises(PipesUsageError, match="cannot be exported"):
        client.run(command=["true"], env={"BAD,NAME": "x"})
    with pytest.raises(PipesUsageError, match="not one string"):
        client.run(command=["true"], sbatch_args="--partition=debug")
    with pytest.raises(PipesUsageError, match="not a directory"):
        client_for(shared_dir=str(tmp_path / "nowhere")).run(command=["true"])
    with pytest.raises(PipesUsageError, match="poll_interval_seconds"):
        client_for(poll_interval_seconds=0)
    assert _leftovers(tmp_path) == []


def test_env_values_with_commas_and_newlines_reach_the_job_and_a_users_export_list_is_kept(
        client_for: Callable[..., PipesSlurmClient], tmp_path: Path) -> None:
    source = """
import os
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message({k: os.environ.get(k) for k in ("TRICKY", "FROM_CLIENT", "HOME_MARKER")})
"""
    os.environ["HOME_MARKER"] = "in the submitting environment"
    try:
        invocation = client_for(env={"FROM_CLIENT": "a=b,c=d"}).run(
            command=[sys.executable, _script(tmp_path, source)], env={"TRICKY": "x,y\nz=1"},
            sbatch_args=["--export=NONE,PATH"], timeout_seconds=JOB_BOUND_SECONDS)
    finally:
        del os.environ["HOME_MARKER"]
    # --export=NONE,PATH is the user's choice: our names are appended, other variables stay behind.
    assert invocation.get_custom_messages() == [{"TRICKY": "x,y\nz=1", "FROM_CLIENT": "a=b,c=d", "HOME_MARKER": None}]



@pytest.mark.interop
def test_a_dagster_pipes_script_runs_under_the_slurm_client(client_for: Callable[..., PipesSlurmClient],
                                                             tmp_path: Path) -> None:
    # The reference's external side, unchanged, in a batch job: bootstrap env vars, messages file on shared_dir.
    source = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("from dagster_pipes")
    pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows")})
    pipes.report_custom_message({"ok": True})
"""
    invocation = client_for().run(context=PipesRunContext(asset_keys=["ref/asset"]), extras={"rows": 7},
                                  command=[sys.executable, _script(tmp_path, source)],
                                  timeout_seconds=JOB_BOUND_SECONDS)
    [materialization] = invocation.get_results()
    assert materialization.asset_key == "ref/asset" and materialization.metadata["rows"].value == 7
    assert invocation.get_custom_messages() == [{"ok": True}]
    assert [log.message for log in invocation.session.get_logs()] == ["from dagster_pipes"]
    assert invocation.session.closed and not invocation.session.protocol_issues
