"""The asyncio twins with real processes: many sessions interleaved in one loop, every message in order; the
stdio channel; cancellation before the child starts, while it runs and while the channel drains; timeouts; a
child that floods its output; and nothing left behind (tasks, threads, descriptors, processes, temp files).
Every test runs under the default loop and, where it installs, uvloop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesAsyncSubprocessClient,
    PipesAsyncTempFileMessageReader,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExecutionError,
    PipesMessageHandler,
    PipesRunContext,
    PipesStdioMessageReader,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesTimeoutError,
    open_pipes_session_async,
)
from tests.support.helpers import PYTHON

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the dev extra
    uvloop = None

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop not installed"))]


@pytest.fixture(params=LOOPS)
def run_async(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine to completion in a fresh loop of the parametrised kind."""

    def new_loop() -> asyncio.AbstractEventLoop:
        if request.param == "uvloop":
            assert uvloop is not None
            return uvloop.new_event_loop()  # type: ignore[no-any-return]
        return asyncio.new_event_loop()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        loop = new_loop()
        try:
            return loop.run_until_complete(coroutine)
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    # uvloop keeps two descriptors of its own from its first loop on: open them before a test counts.
    run(asyncio.sleep(0))
    return run


def child(tmp_path: Path, body: str, name: str = "child.py") -> list[str]:
    script = tmp_path / name
    script.write_text("import os, sys, time\nfrom pipes_ext import open_pipes\n" + body, encoding="utf-8")
    return [PYTHON, str(script)]


COUNTING = """
count = int(sys.argv[1])
with open_pipes() as pipes:
    for i in range(count):
        pipes.report_custom_message({"seq": i})
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children() -> set[int]:
    """This process's child processes (from /proc: other fixtures' servers included, so compare before/after)."""
    found: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as file:
                found.update(int(pid) for pid in file.read().split())
        except OSError:
            pass
    return found


@pytest.fixture
def no_new_children() -> Iterator[None]:
    before = children()
    yield
    assert children() <= before


@pytest.fixture
def temp_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for the sessions' temp files; asserts it is empty afterwards."""
    path = tmp_path / "sessions"
    path.mkdir()
    yield path
    assert list(path.iterdir()) == []


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def inotify_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return count


# ---------------------------------------------------------------------------------------------- many sessions


def test_many_sessions_in_one_loop_deliver_every_message_in_order(
    tmp_path: Path, temp_dir: Path, run_async: Callable[..., Any], no_new_children: None
) -> None:
    # More sessions than the default per-user limit of inotify instances (128): the loop's readers share one.
    sessions, count = 140, 100
    command = child(tmp_path, COUNTING)
    threads_before = threading.active_count()
    threads_alive_before = set(threading.enumerate())
    fds_before = fd_count()
    peak_threads = [0]
    peak_inotify = [0]

    async def one(index: int) -> list[int]:
        seen: list[int] = []

        def on_event(event: PipesEvent) -> None:
            if isinstance(event, PipesCustomMessageEvent):
                seen.append(event.payload["seq"])
            else:
                peak_inotify[0] = max(peak_inotify[0], inotify_fds())
            peak_threads[0] = max(peak_threads[0], threading.active_count())

        client = PipesAsyncSubprocessClient(
            context_injector=PipesTempFileContextInjector(dir=str(temp_dir)),
            message_reader=PipesAsyncTempFileMessageReader(dir=str(temp_dir)),
            forward_stdio=False,
        )
        invocation = await client.run(context=PipesRunContext(run_id=f"run-{index}"),
                                      command=[*command, str(count)], on_event=on_event, retain_messages=False)
        assert invocation.exit_code == 0 and invocation.session.closed
        return seen

    async def main() -> list[list[int]]:
        results = await asyncio.gather(*(one(i) for i in range(sessions)))
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return results

    for seen in run_async(main()):
        assert seen == list(range(count))
    # No thread per session: at most the loop's default executor (injector files), whatever the session count.
    assert peak_threads[0] - threads_before <= min(32, (os.cpu_count() or 1) + 4)
    # No thread left behind (compared by identity: a thread of an earlier test may end meanwhile).
    assert set(threading.enumerate()) <= threads_alive_before
    # No descriptor left behind; fewer is fine: one that an earlier test left for the GC may be closed meanwhile
    # (seen in a full run, where this file now runs after the engine tests: 40 after, 42 before).
    assert fd_count() <= fds_before
    # One inotify descriptor for the whole loop at most (none when the user's instances, shared with every other
    # process of the same user on the machine, are all taken: the readers then poll, and still lose nothing).
    assert peak_inotify[0] <= 1


def test_the_async_session_is_the_sync_session_api(tmp_path: Path, run_async: Callable[..., Any]) -> None:
    command = child(tmp_path, """
with open_pipes() as pipes:
    pipes.report_asset_materialization(metadata={"rows": 3}, asset_key="a")
    pipes.log.warning("careful")
""")

    async def main() -> Any:
        async with open_pipes_session_async(PipesRunContext(asset_keys=["a", "b"]), PipesTempFileContextInjector(),
                                            PipesTempFileMessageReader(), extras={"k": 1}) as session:
            process = await asyncio.create_subprocess_exec(*command, env={**os.environ,
                                                                          **session.get_bootstrap_env_vars()})
            streamed = []
            while process.returncode is None:
                streamed += session.get_results()
                try:
                    await asyncio.wait_for(process.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
        streamed += session.get_results()
        return session, streamed

    session, streamed = run_async(main())
    assert session.opened and session.closed and session.finished
    assert [(r.asset_key, type(r).__name__) for r in streamed] == [("a", "MaterializeResult"),
                                                                    ("b", "MaterializeResult")]
    assert streamed[0].metadata["rows"].value == 3
    assert [log.message for log in session.get_logs()] == ["careful"]
    assert session.context_data["extras"] == {"k": 1}


# ---------------------------------------------------------------------------------------------- stdio channel


def test_stdio_channel_separates_messages_from_output(tmp_path: Path, run_async: Callable[..., Any]) -> None:
    command = child(tmp_path, """
with open_pipes() as pipes:
    for i in range(100):
        print(f"line {i}", flush=True)
        pipes.report_custom_message(i)
""")
    output: list[bytes] = []

    async def main() -> Any:
        client = PipesAsyncSubprocessClient(message_reader=PipesStdioMessageReader(output=output.append))
        return await client.run(command=command)

    invocation = run_async(main())
    assert invocation.get_custom_messages() == list(range(100))
    assert b"".join(output).decode().splitlines() == [f"line {i}" for i in range(100)]


# ---------------------------------------------------------------------------------------------- cancellation


SLEEPER = """
with open_pipes() as pipes:
    pipes.report_custom_message("started")
    sys.stdout.write(str(os.getpid()) + "\\n"); sys.stdout.flush()
    time.sleep(60)
"""


def test_cancelling_while_the_child_runs_stops_its_group_and_drains(
    tmp_path: Path, temp_dir: Path, run_async: Callable[..., Any], no_new_children: None
) -> None:
    command = child(tmp_path, SLEEPER)
    pids: list[int] = []

    async def main() -> BaseException:
        started, got_pid = asyncio.Event(), asyncio.Event()

        def on_event(event: PipesEvent) -> None:
            if isinstance(event, PipesCustomMessageEvent):
                started.set()

        def on_stdout(data: bytes) -> None:  # the child's pid, printed right after its message
            pids.append(int(data))
            got_pid.set()

        client = PipesAsyncSubprocessClient(message_reader=PipesAsyncTempFileMessageReader(dir=str(temp_dir)),
                                            termination_timeout_seconds=5,
                                            forward_stdio=True)
        task = asyncio.ensure_future(client.run(command=command, on_event=on_event, stdout=on_stdout))
        await asyncio.wait_for(asyncio.gather(started.wait(), got_pid.wait()), 30)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError as exc:
            return exc
        raise AssertionError("the run was not cancelled")

    cancelled = run_async(main())
    invocation = cancelled.invocation  # type: ignore[attr-defined]
    assert invocation.get_custom_messages() == ["started"]
    assert invocation.exit_code == -signal.SIGINT  # interrupted: the first escalation step was enough
    assert invocation.session.finished
    assert pids and not _alive(pids[0])


def test_cancelling_before_the_child_starts_leaves_nothing(
    temp_dir: Path, run_async: Callable[..., Any], no_new_children: None
) -> None:
    async def main() -> None:
        client = PipesAsyncSubprocessClient(message_reader=PipesAsyncTempFileMessageReader(dir=str(temp_dir)))
        task = asyncio.ensure_future(client.run(command=[PYTHON, "-c", "import time; time.sleep(60)"]))
        await asyncio.sleep(0)  # the task starts and suspends in the session set-up
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_async(main())


def test_cancelling_while_the_channel_drains_still_delivers_everything(
    tmp_path: Path, run_async: Callable[..., Any]
) -> None:
    command = child(tmp_path, COUNTING)

    class SignallingReader(PipesAsyncTempFileMessageReader):
        """Tells the test when the session starts draining (the child has ended)."""

        def __init__(self, draining: asyncio.Event) -> None:
            super().__init__()
            self.draining = draining

        @asynccontextmanager
        async def aread_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
            async with super().aread_messages(handler) as params:
                yield params
                self.draining.set()
                await asyncio.sleep(0)  # the cancellation lands here, inside the drain

    async def main() -> BaseException:
        draining = asyncio.Event()
        client = PipesAsyncSubprocessClient(message_reader=SignallingReader(draining), forward_stdio=False)
        task = asyncio.ensure_future(client.run(command=[*command, "20000"]))
        await draining.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError as exc:
            return exc
        raise AssertionError("the run was not cancelled")

    cancelled = run_async(main())
    invocation = cancelled.invocation  # type: ignore[attr-defined]
    assert invocation.get_custom_messages() == [{"seq": i} for i in range(20000)]
    assert invocation.session.closed and invocation.exit_code == 0


# ---------------------------------------------------------------------------------------------- timeouts, floods


def test_timeout_escalates_and_raises_with_what_arrived(tmp_path: Path, run_async: Callable[..., Any]) -> None:
    command = child(tmp_path, """
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)  # deaf to the first step: terminate() must follow
with open_pipes() as pipes:
    pipes.report_custom_message("before")
    time.sleep(60)
""")

    async def main() -> PipesTimeoutError:
        client = PipesAsyncSubprocessClient(termination_timeout_seconds=0.5, forward_stdio=False)
        with pytest.raises(PipesTimeoutError) as raised:
            await client.run(command=command, timeout_seconds=2)
        return raised.value

    error = run_async(main())
    assert error.invocation.get_custom_messages() == ["before"]
    assert error.exit_code == -signal.SIGTERM
    assert "ran past its timeout of 2 s" in str(error)


def test_a_flooding_child_neither_deadlocks_nor_grows_memory(tmp_path: Path, run_async: Callable[..., Any]) -> None:
    command = child(tmp_path, """
block = ("x" * 1023 + "\\n") * 1024
with open_pipes() as pipes:
    for _ in range(32):
        sys.stdout.write(block)
        sys.stderr.write(block)
    pipes.report_custom_message("done")
sys.exit(3)
""")

    async def main() -> PipesExecutionError:
        client = PipesAsyncSubprocessClient(forward_stdio=False)
        with pytest.raises(PipesExecutionError) as raised:
            await client.run(command=command, timeout_seconds=120)
        return raised.value

    error = run_async(main())
    assert error.invocation.get_custom_messages() == ["done"]
    assert "failed with exit code 3" in str(error)
    assert len(error.invocation.output_tail) <= 2 * 64 * 1024  # 64 MiB were written; a bounded tail was kept


def test_a_child_that_cannot_start_raises_with_the_cause(temp_dir: Path, run_async: Callable[..., Any]) -> None:
    async def main() -> None:
        client = PipesAsyncSubprocessClient(message_reader=PipesAsyncTempFileMessageReader(dir=str(temp_dir)))
        with pytest.raises(PipesExecutionError, match="cannot start the external process '/nonexistent/x'"):
            await client.run(command=["/nonexistent/x"])

    run_async(main())


def test_running_inside_an_application_loop_alongside_other_tasks(
    tmp_path: Path, run_async: Callable[..., Any]
) -> None:
    command = child(tmp_path, COUNTING)

    async def main() -> tuple[int, int]:
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat() -> None:  # the application's own work keeps running while sessions wait
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.ensure_future(heartbeat())
        client = PipesAsyncSubprocessClient(forward_stdio=False)
        invocations = await asyncio.gather(*(client.run(command=[*command, "50"]) for _ in range(5)))
        stop.set()
        await beat
        return ticks, sum(len(i.get_custom_messages()) for i in invocations)

    ticks, messages = run_async(main())
    assert messages == 250 and ticks > 0


# ---------------------------------------------------------------------------------------------- blob stores


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from tests.support import servers

    server = servers.start_moto()
    try:
        yield server.url
    finally:
        server.stop()


def test_blob_store_sessions_poll_from_the_readers_bounded_threads(
    tmp_path: Path, moto_url: str, run_async: Callable[..., Any]
) -> None:
    import boto3

    from pipes_core.channels.blob import READER_THREADS
    from pipes_core.s3 import PipesS3ContextInjector, PipesS3MessageReader

    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    client = boto3.client("s3", endpoint_url=moto_url, **keys)
    client.create_bucket(Bucket="async-bucket")
    command = child(tmp_path, """
import boto3
from pipes_ext.s3 import PipesS3ContextLoader, PipesS3MessageWriter
s3 = boto3.client("s3")
loader, writer = PipesS3ContextLoader(s3), PipesS3MessageWriter(s3, interval=0.05)
with open_pipes(context_loader=loader, message_writer=writer) as pipes:
    for i in range(int(sys.argv[1])):
        pipes.report_custom_message({"seq": i})
""")
    env = {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    threads_before = threading.active_count()
    peak = [0]
    # More sessions than the threads allowed below, so that a thread per session would fail the test.
    sessions = 20

    async def main() -> list[Any]:
        def on_event(event: PipesEvent) -> None:
            peak[0] = max(peak[0], threading.active_count())

        client_ = PipesAsyncSubprocessClient(
            env=env,
            context_injector=PipesS3ContextInjector("async-bucket", client),
            message_reader=PipesS3MessageReader("async-bucket", client, interval=0.05),
            forward_stdio=False,
        )
        return await asyncio.gather(*(client_.run(command=[*command, "300"], on_event=on_event)
                                      for _ in range(sessions)))

    try:
        invocations = run_async(main())
    finally:
        client.close()
    for invocation in invocations:
        assert invocation.get_custom_messages() == [{"seq": i} for i in range(300)]
    # The sessions polled the store from the reader's own bounded threads (READER_THREADS for the polls, as many
    # for the requests) and entered the injector on the loop's default executor: no thread per session.
    assert peak[0] - threads_before <= min(32, (os.cpu_count() or 1) + 4) + 2 * READER_THREADS < sessions


def test_one_blob_reader_serves_concurrent_sync_sessions_too(tmp_path: Path, moto_url: str) -> None:
    """The reader keeps each open session's store apart (a client running several processes at once)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from pipes_core import PipesSubprocessClient
    from pipes_core.s3 import PipesS3MessageReader

    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    client = boto3.client("s3", endpoint_url=moto_url, **keys)
    client.create_bucket(Bucket="sync-shared")
    command = child(tmp_path, """
import boto3
from pipes_ext.s3 import PipesS3MessageWriter
with open_pipes(message_writer=PipesS3MessageWriter(boto3.client("s3"), interval=0.05)) as pipes:
    time.sleep(0.5)  # the sessions overlap
    pipes.report_custom_message(sys.argv[1])
""")
    env = {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    shared = PipesSubprocessClient(env=env, message_reader=PipesS3MessageReader("sync-shared", client, interval=0.05),
                                   forward_stdio=False)
    try:
        with ThreadPoolExecutor(4) as pool:
            invocations = list(pool.map(lambda i: shared.run(command=[*command, f"run {i}"]), range(4)))
    finally:
        client.close()
    assert [i.get_custom_messages() for i in invocations] == [[f"run {i}"] for i in range(4)]
