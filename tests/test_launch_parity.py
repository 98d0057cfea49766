"""One table of lifecycle cases, run against every client (the local subprocess, Docker, Ray, Slurm), sync and
async, on the real engines: the same verdict, error type, message shape and invocation fields for each.

The table (:data:`CASES`) x the clients (:data:`CLIENTS`) x sync/async. Each message is compared after its
subject (the process's description, which names the engine) has been cut from its headline.
"""

from __future__ import annotations

import asyncio
import signal
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesAsyncStdioMessageReader,
    PipesAsyncSubprocessClient,
    PipesExecutionError,
    PipesRunContext,
    PipesStdioMessageReader,
    PipesSubprocessClient,
    PipesTempFileMessageReader,
    PipesTimeoutError,
    PipesTransportError,
)
from pipes_core.protocol.handler import PipesMessageHandler
from tests.support.helpers import PYTHON

# The child ignores SIGINT and SIGTERM: the timeout's escalation must reach kill(). Short, to keep CI fast.
TIMEOUT_SECONDS = 4.0
GRACE_SECONDS = 1.0
# How long a job of a slow engine may take at most (a bound against a hang, never a timed assertion).
ENGINE_BOUND_SECONDS = 300.0
CRASH_LAST_LINE = "ModuleNotFoundError: No module named 'nonexistent_module_for_pipes_parity'"
CHANNEL_BROKE = "the channel broke"


@dataclass(frozen=True)
class Case:
    """A child (Python source), the run's options, and what must come of it."""

    child: str
    error: type[BaseException] | None  # None: success
    headline: str = ""  # the error's first line after the subject; "{...}" parts are matched by the checks
    ends_with: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    client_options: dict[str, Any] = field(default_factory=dict)
    exit_code: int | str | None = "any"
    opened: bool | None = None
    closed: bool | None = None
    interrupt: bool = False  # interrupt (sync: SIGINT to this thread; async: cancel the task) once "ready" came
    failing_channel: bool = False
    on_event_raises: bool = False


OPEN_AND_REPORT = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_asset_materialization(metadata={"rows": 3})
"""

CASES: dict[str, Case] = {
    "success": Case(OPEN_AND_REPORT, None, exit_code=0, opened=True, closed=True),
    "non-zero exit": Case("""
import sys
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message("before")
sys.exit(3)
""", PipesExecutionError, "failed with exit code 3", exit_code=3, opened=True, closed=True),
    "reported exception": Case("""
from pipes_ext import open_pipes
with open_pipes() as pipes:
    raise ValueError("boom")
""", PipesExecutionError, "failed with exit code 1", ends_with="with ValueError: boom", exit_code=1, opened=True,
        closed=True),
    "exited 0 without opening": Case("print('not a pipes process')\n", PipesExecutionError,
                                     "exited 0 but never opened the Pipes channel.", exit_code=0, opened=False),
    "crash before opening": Case("import nonexistent_module_for_pipes_parity\n", PipesExecutionError,
                                 "crashed (exit code 1", ends_with=CRASH_LAST_LINE, exit_code=1, opened=False),
    "timeout, SIGINT and SIGTERM ignored": Case("""
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from pipes_ext import open_pipes
with open_pipes() as pipes:
    time.sleep(600)
""", PipesTimeoutError, f"ran past its timeout of {TIMEOUT_SECONDS} s and was terminated",
        options={"timeout_seconds": TIMEOUT_SECONDS}, client_options={"termination_timeout_seconds": GRACE_SECONDS}),
    "interruption": Case("""
import time
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message("ready")
    time.sleep(600)
""", KeyboardInterrupt, opened=True, interrupt=True, client_options={"termination_timeout_seconds": GRACE_SECONDS}),
    "a channel that fails": Case(
        OPEN_AND_REPORT, PipesTransportError,
        f"the message channel failed (OSError: {CHANNEL_BROKE}); {{subject}} exited with code 0",
        exit_code=0, opened=True, failing_channel=True),
    "on_event raising": Case(OPEN_AND_REPORT, PipesExecutionError,
                             "the on_event callback raised 1 time(s) during the run of {subject}; first: "
                             "RuntimeError: from on_event (pass raise_on_event_error=False to only log it)",
                             exit_code=0, opened=True, closed=True, on_event_raises=True),
    "fail_on_check_error": Case("""
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_asset_check("positive", passed=False, severity="ERROR")
""", PipesExecutionError, "reported 1 failed check(s) of severity ERROR (fail_on_check_error)",
        options={"fail_on_check_error": True}, exit_code=0, opened=True, closed=True),
}


# ---------------------------------------------------------------------------------------------- the clients


def _failing(reader_class: type[Any]) -> type[Any]:
    """A subclass of a sync reader whose channel fails once the process has ended."""

    class Failing(reader_class):  # type: ignore[misc, valid-type]
        @contextmanager
        def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
            with super().read_messages(handler) as params:
                yield params
            raise OSError(CHANNEL_BROKE)

    return Failing


class FailingAsyncStdio(PipesAsyncStdioMessageReader):
    @asynccontextmanager
    async def aread_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        async with super().aread_messages(handler) as params:
            yield params
        raise OSError(CHANNEL_BROKE)


@dataclass
class Engine:
    """How to make each client of one engine and how to run a Python source on it."""

    name: str
    make: Callable[[bool, dict[str, Any]], Any]  # (async, client options) -> client
    command: Callable[[str], dict[str, Any]]  # source -> the run's own options
    failing_reader: Callable[[bool], Any]  # async -> a reader whose channel fails


@pytest.fixture
def write_child(tmp_path: Path) -> Callable[[str], str]:
    def write(source: str) -> str:
        path = tmp_path / f"child_{abs(hash(source))}.py"
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return str(path)

    return write


def _engine(name: str, request: pytest.FixtureRequest, write_child: Callable[[str], str], tmp_path: Path) -> Engine:
    if name == "subprocess":
        return Engine(name, lambda is_async, kw: (PipesAsyncSubprocessClient if is_async else PipesSubprocessClient)(
            forward_stdio=False, **kw), lambda source: {"command": [PYTHON, write_child(source)]},
            lambda is_async: _failing(PipesTempFileMessageReader)())
    if name == "docker":
        from pipes_core.docker import PipesAsyncDockerClient, PipesDockerClient

        engine = request.getfixturevalue("docker_engine")
        return Engine(name, lambda is_async, kw: (PipesAsyncDockerClient if is_async else PipesDockerClient)(
            client=engine.client, forward_stdio=False, **kw),
            lambda source: {"image": engine.images.test, "command": ["python3", "-c", textwrap.dedent(source)],
                            "network": "none"},
            lambda is_async: FailingAsyncStdio() if is_async else _failing(PipesStdioMessageReader)())
    if name == "ray":
        from pipes_core.ray import RAY_LOG_DRAIN_SECONDS, PipesAsyncRayJobClient, PipesRayJobClient

        head = request.getfixturevalue("ray_head")
        return Engine(name, lambda is_async, kw: (PipesAsyncRayJobClient if is_async else PipesRayJobClient)(
            head.address, forward_stdio=False, **kw), lambda source: {"command": [PYTHON, write_child(source)]},
            lambda is_async: FailingAsyncStdio(drain_timeout_seconds=RAY_LOG_DRAIN_SECONDS) if is_async
            else _failing(PipesStdioMessageReader)(drain_timeout_seconds=RAY_LOG_DRAIN_SECONDS))
    from pipes_core.slurm import PipesAsyncSlurmClient, PipesSlurmClient, PipesSlurmMessageReader, SlurmCommands

    cluster = request.getfixturevalue("slurm_cluster")
    return Engine(name, lambda is_async, kw: (PipesAsyncSlurmClient if is_async else PipesSlurmClient)(
        commands=SlurmCommands(slurm_conf=str(cluster.conf)), shared_dir=str(tmp_path), forward_stdio=False, **kw),
        lambda source: {"command": [PYTHON, write_child(source)]},
        lambda is_async: _failing(PipesSlurmMessageReader)(str(tmp_path)))


CLIENTS = ["subprocess", "docker", "ray", "slurm"]


def _run(engine: Engine, case: Case, is_async: bool) -> tuple[BaseException | None, Any]:
    """Run ``case`` on ``engine``; (the error raised or None, the invocation)."""
    client_options = dict(case.client_options)
    if case.failing_channel:
        client_options["message_reader"] = engine.failing_reader(is_async)
    client = engine.make(is_async, client_options)
    options: dict[str, Any] = {**engine.command(case.child), **case.options,
                               "context": PipesRunContext(asset_keys=["a"])}
    if case.on_event_raises:
        raised: list[bool] = []

        def on_event(event: Any) -> None:
            if not raised:  # once: how many events an engine's run makes is not the point
                raised.append(True)
                raise RuntimeError("from on_event")

        options["on_event"] = on_event
    if not is_async:
        if case.interrupt:
            main = threading.main_thread().ident
            assert main is not None and threading.current_thread() is threading.main_thread()

            def on_message(message: dict[str, Any]) -> None:
                if message.get("method") == "report_custom_message":
                    signal.pthread_kill(main, signal.SIGINT)  # what Ctrl-C does

            options["on_message"] = on_message
        try:
            return None, client.run(**options)
        except BaseException as exc:  # KeyboardInterrupt included: the case's verdict
            return exc, getattr(exc, "invocation", None)

    async def main() -> Any:
        task = asyncio.ensure_future(client.run(**options))
        if case.interrupt:
            loop = asyncio.get_running_loop()

            def on_message(message: dict[str, Any]) -> None:
                if message.get("method") == "report_custom_message":
                    loop.call_soon_threadsafe(task.cancel)

            options["on_message"] = on_message
            task.cancel()  # the first task never started: made again with on_message
            task = asyncio.ensure_future(client.run(**options))
        return await asyncio.wait_for(task, ENGINE_BOUND_SECONDS)

    try:
        return None, asyncio.run(main())
    except BaseException as exc:  # CancelledError included: the case's verdict
        return exc, getattr(exc, "invocation", None)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("name", list(CASES))
def test_every_client_gives_the_same_verdict(name: str, client: str, mode: str, request: pytest.FixtureRequest,
                                            write_child: Callable[[str], str], tmp_path: Path) -> None:
    case = CASES[name]
    engine = _engine(client, request, write_child, tmp_path)
    error, invocation = _run(engine, case, mode == "async")
    expected = case.error
    if expected is KeyboardInterrupt and mode == "async":
        expected = asyncio.CancelledError  # cancelling the task is the async interruption
    if expected is None:
        assert error is None, f"{type(error).__name__}: {error}"
    else:
        assert type(error) is expected, f"{type(error).__name__}: {error}"
    assert invocation is not None  # every verdict carries what arrived
    subject = invocation.description
    assert subject  # "the external process ...", "the container ...", "the Ray job ...", "the Slurm job ..."
    if case.headline:
        headline = str(error).splitlines()[0]
        wanted = case.headline.replace("{subject}", subject)
        assert headline.startswith(wanted if "{subject}" in case.headline else f"{subject} {wanted}"), headline
        if case.ends_with:
            assert headline.endswith(case.ends_with), headline
    if case.exit_code != "any":
        assert invocation.exit_code == case.exit_code
    if case.opened is not None:
        assert invocation.session.opened is case.opened
    if case.closed is not None:
        assert invocation.session.closed is case.closed
    if case.on_event_raises:
        assert isinstance(error.__cause__, RuntimeError)
    if name == "success":
        assert [r.metadata["rows"].value for r in invocation.get_results()] == [3]
