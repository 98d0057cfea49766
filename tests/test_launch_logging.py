"""Per-run ``logger=`` and ``external_stream_handler=`` on every launcher's ``run``, against the real engines
(a private dockerd, a local Ray head, a one-node Slurm cluster; see tests/support/engines_*.py): the external process's
log record reaches the given logger (a ``LoggerAdapter`` here, whose own ``extra`` is kept) with
``pipes_run_id`` and ``pipes_command``, its ``log_external_stream`` text reaches the given handler, nothing goes
to the process-wide ``pipes_core.external`` logger; ``fail_on_check_error`` is passed through as well."""

from __future__ import annotations

import logging
import shlex
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import PipesClient, PipesExecutionError, PipesRunContext
from tests.support.engines_docker import DockerEngine
from tests.support.engines_ray import RayHead
from tests.support.engines_slurm import SlurmCluster

# A generous bound that only catches hangs (a job takes seconds here, more on a loaded machine).
RUN_BOUND_SECONDS = 300

CHILD = """
import sys
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.log.info("hello from " + sys.argv[1])
    pipes.log_external_stream("stdout", "captured line\\n")
    pipes.report_asset_check("rows_positive", passed=False, asset_key="launched")
"""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.records.append(record)


class _Routed:
    """A per-task logger as an orchestrator gives one (an adapter with its own ``extra``), what reached it, what
    reached the process-wide default logger, and what reached the stream handler."""

    def __init__(self, name: str) -> None:
        self.base = logging.getLogger(f"launcher-logging-{name}-{id(self)}")
        self.base.setLevel(logging.DEBUG)
        self.base.propagate = False
        self.collected = _Collect()
        self.base.addHandler(self.collected)
        self.task_run = f"task-{name}"
        self.adapter = logging.LoggerAdapter(self.base, {"task_run": self.task_run})
        self.default = _Collect()
        self.streams: list[tuple[str, str]] = []
        self._guard = threading.Lock()

    def stream(self, stream: str, text: str) -> None:
        with self._guard:
            self.streams.append((stream, text))

    def check(self, name: str, run_id: str, command: str) -> None:
        hello = [r for r in self.collected.records if r.getMessage() == f"hello from {name}"]
        assert len(hello) == 1, [r.getMessage() for r in self.collected.records]
        record = hello[0]
        assert record.levelno == logging.INFO
        assert record.pipes_run_id == run_id  # type: ignore[attr-defined]
        assert record.pipes_command == command  # type: ignore[attr-defined]
        assert record.task_run == self.task_run  # type: ignore[attr-defined]  # the adapter's own extra, kept
        assert self.streams == [("stdout", "captured line\n")]
        assert [r.getMessage() for r in self.default.records] == []  # nothing went to pipes_core.external


@pytest.fixture
def routed(request: pytest.FixtureRequest) -> Iterator[_Routed]:
    routed = _Routed(request.node.name)
    default = logging.getLogger("pipes_core.external")
    default.addHandler(routed.default)
    try:
        yield routed
    finally:
        default.removeHandler(routed.default)


def run_routed(client: PipesClient, routed: _Routed, run_id: str, **options: Any) -> None:
    """Run with the routed logger and stream handler; the failed ERROR check fails the run
    (``fail_on_check_error`` passed through), after the logs and the stream line arrived."""
    with pytest.raises(PipesExecutionError, match=r"1 failed check\(s\) of severity ERROR") as info:
        client.run(context=PipesRunContext(asset_keys=["launched"], run_id=run_id), logger=routed.adapter,
                   external_stream_handler=routed.stream, fail_on_check_error=True,
                   timeout_seconds=RUN_BOUND_SECONDS, **options)
    assert info.value.invocation.session.opened and info.value.invocation.session.closed


@pytest.mark.docker
def test_docker_run_routes_logs_and_streams_per_run(docker_engine: DockerEngine, routed: _Routed) -> None:
    from pipes_core.docker import PipesDockerClient

    argv = ["python3", "-c", textwrap.dedent(CHILD), "docker"]
    run_routed(PipesDockerClient(client=docker_engine.client), routed, "run-docker",
               image=docker_engine.images.test, command=argv, network="none")
    routed.check("docker", "run-docker", shlex.join(argv))


def test_ray_run_routes_logs_and_streams_per_run(ray_head: RayHead, routed: _Routed,
                                                 write_script: Callable[..., Path]) -> None:
    from pipes_core.ray import PipesRayJobClient

    argv = [sys.executable, str(write_script(CHILD)), "ray"]
    run_routed(PipesRayJobClient(ray_head.address), routed, "run-ray", command=argv, stdout=lambda data: None)
    routed.check("ray", "run-ray", shlex.join(argv))


def test_slurm_run_routes_logs_and_streams_per_run(slurm_cluster: SlurmCluster, routed: _Routed,
                                                   tmp_path: Path, write_script: Callable[..., Path]) -> None:
    from pipes_core.slurm import PipesSlurmClient, SlurmCommands

    client = PipesSlurmClient(commands=SlurmCommands(slurm_conf=str(slurm_cluster.conf)), shared_dir=str(tmp_path))
    argv = [sys.executable, str(write_script(CHILD)), "slurm"]
    run_routed(client, routed, "run-slurm", command=argv)
    routed.check("slurm", "run-slurm", shlex.join(argv))


def test_every_clients_run_takes_the_per_run_options() -> None:
    """A new launcher that forgets to forward one of them fails here (no engine needed)."""
    import inspect

    from pipes_core import PipesAsyncSubprocessClient, PipesSubprocessClient
    from pipes_core.docker import PipesDockerClient
    from pipes_core.ray import PipesRayJobClient
    from pipes_core.slurm import PipesSlurmClient

    shared = {"logger", "external_stream_handler", "fail_on_check_error", "raise_on_event_error", "on_message",
              "on_event", "retain_messages", "metadata", "timeout_seconds", "strict", "context", "extras"}
    for client in (PipesSubprocessClient, PipesAsyncSubprocessClient, PipesDockerClient, PipesRayJobClient,
                   PipesSlurmClient):
        parameters = set(inspect.signature(client.run).parameters)
        assert shared <= parameters, f"{client.__name__}.run lacks {sorted(shared - parameters)}"
    assert shared <= set(inspect.signature(PipesClient.run_launcher).parameters)


def test_the_async_client_passes_on_message(write_script: Callable[..., Path]) -> None:
    import asyncio

    from pipes_core import PipesAsyncSubprocessClient

    script = write_script("from pipes_ext import open_pipes\nwith open_pipes() as p:\n    p.report_custom_message(1)\n")
    seen: list[dict[str, Any]] = []
    asyncio.run(PipesAsyncSubprocessClient().run(command=[sys.executable, str(script)], on_message=seen.append))
    assert [message["method"] for message in seen] == ["opened", "report_custom_message", "closed"]
