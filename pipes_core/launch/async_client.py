"""The asyncio driver of the one lifecycle, and the asyncio clients built on it.

:class:`PipesAsyncClient` is to the asyncio clients what :class:`~pipes_core.PipesClient` is to the sync ones: it
carries out the decisions of :class:`pipes_core.launch.lifecycle.RunCore` (no decision is written here) on the running
loop, with the options, channel defaults, launch request and verdict of the sync client it wraps
(``self.config``). A launcher is therefore twinned by construction: its sync client's ``launcher(options)`` gives
the launch function and the command; the async twin runs it.

* A launched process that the loop can watch by itself (:class:`PipesAsyncLaunchedProcess`: the local child,
  whose end is a pidfd registered with the loop) is waited for and signalled on the loop, its output read by
  asyncio streams: no thread.
* Any other launched process (a container, a Ray job, a Slurm job: SDKs that block) is launched, polled,
  signalled and closed on a bounded executor that the client owns (:data:`ASYNC_EXECUTOR_WORKERS` threads,
  shared by all its runs; never the loop's default executor); between two polls the loop waits on a timer. Its
  output sources are blocking iterables: each is read by a thread of its own and handed to the loop chunk by
  chunk, at most :data:`THREADED_SOURCE_CHUNKS` chunks in flight (memory stays bounded).

Cancelling the task that runs ``run`` is an interruption (as Ctrl-C is for the sync clients): the process is
stopped as the core says, the channel drained, and ``CancelledError`` propagates, carrying ``.invocation``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar, cast

from pipes_core.channels.injectors import PipesContextInjector
from pipes_core.channels.readers import PipesMessageReader
from pipes_core.channels.stdio import PipesByteSource
from pipes_core.channels.watch import POLL_MAX_SECONDS, POLL_MIN_SECONDS
from pipes_core.launch.async_session import (
    PipesAsyncMessageReader,
    PipesAsyncStdioMessageReader,
    _close_task,
    _finish_shielded,
    _loop_closing,
    _pump,
    _stream_reader,
    as_async_reader,
    open_pipes_session_async,
)
from pipes_core.launch.client import (
    OUTPUT_DRAIN_SECONDS,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesExitStatus,
    PipesLaunchedProcess,
    PipesLaunchRequest,
    _Run,
    _sink,
    _Tail,
    read_to_end,
)
from pipes_core.launch.lifecycle import KEYBOARD, Action, Begin, Done, Signal, Wait
from pipes_core.launch.local import _LocalProcess
from pipes_core.launch.options import RunOptions, Unpack, run_signature
from pipes_core.launch.subprocess import PipesSubprocessClient, SubprocessRunOptions
from pipes_core.observe.observer import PHASE_DRAIN, PHASE_LAUNCH, PHASE_WAIT
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._errors import PipesUsageError
from pipes_ext._protocol import STREAM_STDERR, STREAM_STDOUT

__all__ = [
    "ASYNC_EXECUTOR_WORKERS",
    "THREADED_SOURCE_CHUNKS",
    "PipesAsyncClient",
    "PipesAsyncLaunchedProcess",
    "PipesAsyncSubprocessClient",
    "same_arguments_as",
]

# The threads of an async client's executor (launching, polling, signalling and releasing its runs' processes
# through blocking SDKs: docker, ray, scontrol/scancel). Each call is short; a few threads serve many runs, and
# the count bounds what a thousand runs cost.
ASYNC_EXECUTOR_WORKERS = 8
# A blocking output source handed to the loop: at most this many chunks wait for the loop (each at most
# STDIO_READ_BYTES); the reading thread waits when the loop falls behind.
THREADED_SOURCE_CHUNKS = 4
# While polling an engine, whether the process sent ``closed`` is looked at this often between two polls (no engine
# call: a loop timer); once it has, the engine is polled at the shortest interval for CLOSED_FAST_POLL_SECONDS.
CLOSED_CHECK_SECONDS = 0.2
CLOSED_FAST_POLL_SECONDS = 10.0

_Config = TypeVar("_Config", bound=PipesClient)
_Function = TypeVar("_Function", bound=Callable[..., Any])
_AsyncSource = Any  # an object with ``async read(n) -> bytes`` (b"" at the end): asyncio.StreamReader or ours


class PipesAsyncLaunchedProcess(PipesLaunchedProcess):
    """A launched process the loop watches by itself: :meth:`await_end` waits for its end without a thread,
    :meth:`open_streams` gives its output as asyncio streams; its signals are cheap (sent on the loop)."""

    async def await_end(self, timeout: float | None) -> bool:
        """True once it has ended; False when ``timeout`` passed first."""
        raise NotImplementedError

    async def open_streams(self) -> dict[str, _AsyncSource]:
        """Its output streams by name (``stdout`` / ``stderr``), each with ``async read(n)``."""
        return {}


class _ThreadedSource:
    """A blocking byte source (a file, a log stream) read to its end by a thread of its own and handed to the loop
    chunk by chunk (at most :data:`THREADED_SOURCE_CHUNKS` waiting); ``read`` returns b"" at its end."""

    def __init__(self, source: PipesByteSource, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=THREADED_SOURCE_CHUNKS)
        self._source = source
        self._closed = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"pipes-async-output:{name}")
        self._thread.start()

    def _put(self, chunk: bytes) -> bool:
        if self._closed.is_set():
            return False
        try:
            asyncio.run_coroutine_threadsafe(self._queue.put(chunk), self._loop).result()
        except (RuntimeError, asyncio.CancelledError):  # the loop closed, or the put was given up
            return False
        return True

    def _run(self) -> None:
        try:
            read_to_end(self._source, self._put)
        finally:
            self._put(b"")

    async def read(self, size: int = -1) -> bytes:
        if self._ended:
            return b""
        chunk = await self._queue.get()
        self._ended = not chunk
        return chunk

    def close(self) -> None:
        """Stop handing chunks over (read to its end, or given up on): a reading thread waiting to hand one over
        is released, and a reader waiting on the loop gets the end."""
        self._closed.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(b"")


class PipesAsyncClient(Generic[_Config]):
    """Base of the asyncio clients: the lifecycle of the sync client ``config`` driven on the running loop (see
    the module doc). A subclass's ``run`` asks ``self.config.launcher(options)`` for the launch function and the
    command, then returns ``await self.run_launcher(launch, ...)``."""

    def __init__(self, config: _Config, message_reader: PipesMessageReader | PipesAsyncMessageReader | None = None
                 ) -> None:
        self.config = config
        self.message_reader = message_reader if message_reader is not None else config.message_reader
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._runs = 0  # runs in progress: the executor's threads go when the last one ends

    def executor(self) -> ThreadPoolExecutor:
        """The client's own bounded pool for blocking SDK calls (made on first use, released when no run is in
        progress: an idle client holds no thread)."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(ASYNC_EXECUTOR_WORKERS,
                                                    thread_name_prefix=f"pipes-{type(self).__name__}")
            return self._executor

    def close(self) -> None:
        """Release the executor's threads (a later run makes a new pool)."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    async def _blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor(), function, *args)

    def _channels(self) -> tuple[PipesContextInjector, PipesAsyncMessageReader]:
        injector, reader = self.config._channels()
        return injector, as_async_reader(self.message_reader if self.message_reader is not None else reader)

    # ------------------------------------------------------------------ the lifecycle

    @run_signature(RunOptions)
    async def run_launcher(
        self,
        launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess],
        *,
        context: PipesRunContext | None = None,
        extras: Mapping[str, Any] | None = None,
        command: str | Sequence[str] | None = None,
        **options: Unpack[RunOptions],
    ) -> PipesClientCompletedInvocation:
        """The asyncio twin of :meth:`pipes_core.PipesClient.run_launcher` (same options, errors and invocation).

        Raises:
            PipesExecutionError, PipesTimeoutError, PipesTransportError: as the sync client, with ``.invocation``.
            asyncio.CancelledError: the task was cancelled; re-raised after the process was stopped and the
                channel drained, with ``.invocation``.
        """
        config = self.config
        run = config.begin_run(options, command)
        if run.durable is None:
            injector, reader = self._channels()
        else:
            durable_injector, durable_reader = run.durable.channels()
            injector, reader = durable_injector, as_async_reader(durable_reader)
            launch = run.durable.launcher(launch)
        self._runs += 1
        try:
            return await self._run(launch, run, injector, reader, context, extras)
        finally:
            self._runs -= 1
            if not self._runs:
                self.close()
            if run.durable is not None:
                run.durable.release()

    async def _run(self, launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess], run: _Run,
                   injector: PipesContextInjector, reader: PipesAsyncMessageReader, context: PipesRunContext | None,
                   extras: Mapping[str, Any] | None) -> PipesClientCompletedInvocation:
        config = self.config
        try:
            async with config.open_session(run, injector, reader, open_pipes_session_async, context,
                                           extras) as session:
                config.observe_session(run, session, type(self).__name__)
                try:
                    await self._launch_and_wait(launch, reader, run)
                except asyncio.CancelledError as exc:
                    run.interrupt = exc  # an interruption: drain first (leaving the session), then re-raise
                except GeneratorExit as exc:  # the loop was closed with the run pending: release everything, no drain
                    if run.observer is not None:  # no verdict comes: the observers end the run here
                        run.observer.finished(None, exc)
                    raise
                except BaseException as exc:
                    run.error = exc
                run.phase(PHASE_DRAIN)  # leaving the block drains the channel
        except asyncio.CancelledError as exc:  # cancelled while the channel drained (the drain was finished)
            if run.session is None:
                raise
            run.interrupt = run.interrupt or exc
        except Exception as exc:  # the channel failed while draining (a store's SDK, the messages file)
            if run.session is None:
                raise
            run.channel_error = exc
        finally:
            if run.process is not None:
                if _loop_closing():
                    self._release_now(run)
                else:
                    await self._release(run)
        return config.conclude(run)

    @staticmethod
    def _release_now(run: _Run) -> None:
        """:meth:`_release` without the loop (it was closed with the run pending): nothing is awaited."""
        process = run.process
        assert process is not None
        for source in run.closing:
            source.close()
        try:
            process.close()
        except Exception:
            run.log.exception("[pipes] releasing %s failed", run.description)

    async def _release(self, run: _Run) -> None:
        process = run.process
        assert process is not None
        for source in run.closing:
            source.close()
        try:
            if isinstance(process, PipesAsyncLaunchedProcess):
                process.close()  # done already after the drain; harmless again
            else:
                await _finish_shielded(asyncio.ensure_future(self._blocking(process.close)))
        except asyncio.CancelledError:
            raise
        except Exception:
            run.log.exception("[pipes] releasing %s failed", run.description)

    async def launch(self, launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess],
                     request: PipesLaunchRequest) -> PipesLaunchedProcess:
        """Start the process: ``launch`` on the executor (a blocking SDK call). A subclass whose launch is cheap
        and whose process the loop can watch overrides this."""
        return cast(PipesLaunchedProcess, await self._blocking(launch, request))

    async def _launch_and_wait(self, launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess],
                               reader: PipesAsyncMessageReader, run: _Run) -> None:
        config = self.config
        options = run.options
        assert run.session is not None
        stdio = reader.stream if isinstance(reader, PipesAsyncStdioMessageReader) else None
        request = config.launch_request(run.session, stdio, options.get("stdout"), options.get("stderr"), run)
        run.phase(PHASE_LAUNCH)
        # Shielded: a launch cancelled half-way would leave a container or job that nobody stops.
        launching = asyncio.ensure_future(self.launch(launch, request))
        cancelled: asyncio.CancelledError | None = None
        try:
            await _finish_shielded(launching)
        except asyncio.CancelledError as exc:
            cancelled = exc
        process = launching.result()
        run.phase(PHASE_WAIT)
        run.process = process
        run.description = process.description
        core = config.new_core(run)
        action: Action = core.first() if cancelled is None else core.interrupted_by(KEYBOARD)
        interrupt: BaseException | None = cancelled
        failure: BaseException | None = None
        pumps: list[asyncio.Task[None]] = []
        sources: list[Any] = []
        try:
            while not isinstance(action, Done):
                try:
                    if isinstance(action, Begin):
                        on_launched = options.get("on_launched")
                        if on_launched is not None:
                            on_launched(process)
                        await self._start_output(process, reader, run, pumps, sources, stdio)
                        action = core.begun()
                    elif isinstance(action, Wait):
                        action = core.waited(await self._wait(process, action.seconds, run))
                    elif isinstance(action, Signal):
                        await self._signal(process, action.step)
                        action = core.proceed()
                    else:
                        run.log.log(action.level, "%s", action.message)
                        action = core.proceed()
                except asyncio.CancelledError as exc:
                    interrupt = interrupt or exc
                    action = core.interrupted_by(KEYBOARD)
                except GeneratorExit:  # the loop was closed with the run pending: nothing can be awaited
                    _kill_now(process)
                    raise
                except BaseException as exc:  # the run cannot go on (e.g. its output cannot be read)
                    failure = failure or exc
                    action = core.failed()
        finally:
            run.phase(PHASE_DRAIN)
            if _loop_closing():  # released without the loop: the child killed, every descriptor closed
                for task in pumps:
                    _close_task(task)
                for source in sources:
                    source.close()
                if isinstance(process, PipesAsyncLaunchedProcess):
                    process.close()
            else:
                if pumps:
                    waiting = asyncio.ensure_future(asyncio.wait(pumps, timeout=OUTPUT_DRAIN_SECONDS))
                    try:
                        await _finish_shielded(waiting)
                    finally:
                        for task in waiting.result()[1]:
                            task.cancel()
                for source in sources:  # read to their end, or given up on after the drain deadline
                    source.close()
                if isinstance(process, PipesAsyncLaunchedProcess):
                    process.close()  # its pipes' transports: read to their end, or given up on after the deadline
                if isinstance(process, PipesAsyncLaunchedProcess):
                    run.status = _final_status(process)
                else:  # the engine is asked (an SDK call): on the executor
                    run.status = await _finish_shielded_result(self._blocking(_final_status, process))
        if interrupt is not None:
            raise interrupt
        if failure is not None:
            raise failure

    async def _start_output(self, process: PipesLaunchedProcess, reader: PipesAsyncMessageReader, run: _Run,
                            pumps: list[asyncio.Task[None]], sources: list[Any], stdio: str | None) -> None:
        opener = getattr(process, "open_async_streams", None)  # a launcher that can follow its output on the loop
        if isinstance(process, PipesAsyncLaunchedProcess):
            streams = await process.open_streams()
        elif callable(opener):
            streams = opener()
            sources.extend(source for name, source in streams.items() if name != stdio)
            run.closing.extend(source for name, source in streams.items() if name == stdio)
        else:
            streams = {name: _ThreadedSource(source, f"{name} of {process.description}")
                       for name, source in ((STREAM_STDOUT, process.stdout), (STREAM_STDERR, process.stderr))
                       if source is not None}
            # the one the stdio reader reads is closed once the session has drained it (see _release)
            sources.extend(source for name, source in streams.items() if name != stdio)
            run.closing.extend(source for name, source in streams.items() if name == stdio)
        for stream in (STREAM_STDOUT, STREAM_STDERR):
            source = streams.get(stream)
            if source is None:
                if stream == stdio:
                    raise PipesUsageError(
                        f"the stdio message reader reads the process's {stream}, but {process.description} "
                        "provides no such stream")
                continue
            tail = _Tail(stream)
            run.tails.append(tail)
            reader_output = reader._sync.output if stream == stdio and isinstance(
                reader, PipesAsyncStdioMessageReader) else None
            target = run.options.get("stdout") if stream == STREAM_STDOUT else run.options.get("stderr")
            sink = _sink(tail, self.config.output_destination(stream, target, reader_output))
            if stream == stdio:
                assert isinstance(reader, PipesAsyncStdioMessageReader)
                reader.consume(source, output=sink)
            else:
                pumps.append(asyncio.get_running_loop().create_task(_pump(source, sink)))

    async def _wait(self, process: PipesLaunchedProcess, seconds: float | None, run: _Run) -> bool:
        """Until the process ends (True) or ``seconds`` pass (False): on the loop for a process it can watch,
        else polls on the executor, a loop timer between them (backing off from the process's
        ``poll_interval_seconds`` to its ``max_poll_interval_seconds``; the shortest again once ``closed`` came)."""
        if isinstance(process, PipesAsyncLaunchedProcess):
            return await process.await_end(seconds)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        shortest = process.poll_interval_seconds
        interval = shortest
        closed_at: float | None = None
        while True:
            if await _finish_shielded_result(self._blocking(process.poll)):
                return True
            now = loop.time()
            if closed_at is None and run.session is not None and run.session.closed:
                closed_at = now  # it sent closed: the end is near
            if closed_at is not None and now - closed_at < CLOSED_FAST_POLL_SECONDS:
                interval = shortest
            pause = interval
            if deadline is not None:
                left = deadline - now
                if left <= 0:
                    return False
                pause = min(pause, left)
            await self._pause(pause, run, watch_closed=closed_at is None)
            interval = min(interval * 2, max(shortest, process.max_poll_interval_seconds))

    @staticmethod
    async def _pause(seconds: float, run: _Run, *, watch_closed: bool) -> None:
        """A loop timer of ``seconds``; until ``closed`` has come, looked at every :data:`CLOSED_CHECK_SECONDS`
        (no engine call), after which the next poll comes at once."""
        if not watch_closed:
            await asyncio.sleep(seconds)
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(left, CLOSED_CHECK_SECONDS))
            if run.session is not None and run.session.closed:
                return

    async def _signal(self, process: PipesLaunchedProcess, step: str) -> None:
        if isinstance(process, PipesAsyncLaunchedProcess):
            getattr(process, step)()
        else:
            await _finish_shielded_result(self._blocking(getattr(process, step)))


def _kill_now(process: PipesLaunchedProcess) -> None:
    """Kill ``process`` without the loop (it was closed with the run pending) and, when it is a local child, reap
    it at once (SIGKILLed: a few milliseconds)."""
    try:
        process.kill()
        if isinstance(process, _AsyncLocalProcess):
            process.process.wait()
    except Exception:  # an engine that cannot be reached now: its own close() releases what it can
        pass


def _final_status(process: PipesLaunchedProcess) -> PipesExitStatus:
    """How it ended, or that it was left running."""
    return process.exit_status() if process.poll() else PipesExitStatus(None, description="was left running")


def same_arguments_as(function: Callable[..., Any]) -> Callable[[_Function], _Function]:
    """Give an async twin's ``__init__(self, *args, **kwargs)`` the signature of its sync client's (for ``help()``
    and :func:`inspect.signature`); the arguments are the sync client's, passed on as they are."""

    def decorate(init: _Function) -> _Function:
        init.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
        return init

    return decorate


async def _finish_shielded_result(awaitable: Any) -> Any:
    """The result of ``awaitable``, waited for even if we are cancelled meanwhile (then the cancellation is raised
    once it has finished)."""
    future = asyncio.ensure_future(awaitable)
    await _finish_shielded(future)
    return future.result()


# ---------------------------------------------------------------------------------------------- the local child


class _AsyncLocalProcess(PipesAsyncLaunchedProcess):
    """A local child (started by :class:`PipesSubprocessClient`'s launch) watched from the loop without a thread:
    its exit is seen through a pidfd registered with the loop (Linux), else a loop timer polling it (backing off to
    :data:`POLL_MAX_SECONDS`). asyncio's own subprocess support is not used: on Python 3.11 its default child
    watcher costs a thread per child, and choosing another one is process-wide state. Signals are the sync
    process's (its whole process group when it has one)."""

    def __init__(self, local: _LocalProcess) -> None:
        self.local = local
        self.process = local.process
        self.description = local.description
        self._loop = loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self._pidfd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._poll = POLL_MIN_SECONDS
        self._transports: list[asyncio.BaseTransport] = []
        self._connected = False
        try:
            self._pidfd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):  # not Linux 5.3+: poll on a timer
            self._timer = loop.call_later(self._poll, self._check)
        else:
            loop.add_reader(self._pidfd, self._check)

    def _check(self) -> None:
        if self.process.poll() is None:
            if self._pidfd < 0:
                self._poll = min(self._poll * 2, POLL_MAX_SECONDS)
                self._timer = self._loop.call_later(self._poll, self._check)
            return
        self._release()
        if not self._ended.done():
            self._ended.set_result(None)

    def _release(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)  # does nothing once the loop is closed
            os.close(self._pidfd)
            self._pidfd = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def open_streams(self) -> dict[str, _AsyncSource]:
        connected: dict[str, _AsyncSource] = {}

        async def connect() -> None:  # every pipe gets its transport, which owns and closes it
            for stream, pipe in ((STREAM_STDOUT, self.process.stdout), (STREAM_STDERR, self.process.stderr)):
                if pipe is not None:
                    source, transport = await _stream_reader(pipe)
                    self._transports.append(transport)
                    connected[stream] = source

        # Shielded: a cancellation in the middle would leave a pipe that no transport owns (open until a garbage
        # collection closes its descriptor, by then perhaps someone else's).
        self._connected = True
        await _finish_shielded(asyncio.ensure_future(connect()))
        return connected

    async def await_end(self, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._ended), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def poll(self) -> bool:
        return self.local.poll()  # reaped: its orphan guard is told (the sync process's rule)

    def exit_status(self) -> PipesExitStatus:
        return self.local.exit_status()

    def interrupt(self) -> None:
        self.local.interrupt()

    def terminate(self) -> None:
        self.local.terminate()

    def kill(self) -> None:
        self.local.kill()

    def close(self) -> None:
        self._release()
        closing = self._loop.is_closed() or _loop_closing()  # a closed loop cannot close a transport
        for transport in self._transports:  # read to their end, or given up on after the drain deadline
            if not closing:
                transport.close()
        self._transports = []
        for pipe in (self.process.stdout, self.process.stderr):  # never connected, or their loop is gone
            if pipe is not None and not pipe.closed and (closing or not self._connected):
                pipe.close()
        self.local.close()  # its orphan guard released


class PipesAsyncSubprocessClient(PipesAsyncClient[PipesSubprocessClient]):
    """The asyncio twin of :class:`PipesSubprocessClient`: same arguments, same options of :meth:`run`, same
    errors and :class:`PipesClientCompletedInvocation`; ``await client.run(...)``.

    The options, the channel defaults (temp files), the launch (env, ``inherit_env``, ``cwd``, ``stdin``, the
    bootstrap) and the verdict are those of an internal :class:`PipesSubprocessClient` (``self.config``): one set
    of rules for both. The child is watched from the loop, with no thread.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        context_injector: PipesContextInjector | None = None,
        message_reader: PipesMessageReader | PipesAsyncMessageReader | None = None,
        forward_termination: bool = True,
        forward_stdio: bool = True,
        termination_timeout_seconds: float = 20,
        *,
        strict: bool = True,
        bootstrap: str = "env",
        inherit_env: bool = True,
    ) -> None:
        sync_reader = message_reader if isinstance(message_reader, PipesMessageReader) else None
        super().__init__(PipesSubprocessClient(env, cwd, context_injector, sync_reader, forward_termination,
                                               forward_stdio, termination_timeout_seconds, strict=strict,
                                               bootstrap=bootstrap, inherit_env=inherit_env), message_reader)

    @run_signature(SubprocessRunOptions, required=("command",))
    async def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
                  **options: Unpack[SubprocessRunOptions]) -> PipesClientCompletedInvocation:
        """Run ``command`` in a Pipes session on the running loop; see :meth:`PipesSubprocessClient.run`.

        Raises:
            PipesExecutionError, PipesTimeoutError, PipesTransportError: as the sync client, with ``.invocation``.
            asyncio.CancelledError: the task was cancelled; re-raised after the child's group was stopped and the
                channel drained, with ``.invocation``.
        """
        launch, command, common = self.config.launcher(options, where="PipesAsyncSubprocessClient.run")
        return await self.run_launcher(launch, context=context, extras=extras, command=command, **common)

    async def launch(self, launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess],
                     request: PipesLaunchRequest) -> PipesLaunchedProcess:
        # fork + exec take a few milliseconds: not worth a thread
        process = launch(request)
        return _AsyncLocalProcess(process) if isinstance(process, _LocalProcess) else process  # durable: polled
