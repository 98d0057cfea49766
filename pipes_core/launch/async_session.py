"""Asyncio twins: one event loop runs many Pipes sessions and external processes at once, with no thread per
session.

Written once and shared with the synchronous side (no copy here): the handler (validation, events, results), the
session object and its results, the session set-up and end (:class:`~pipes_core.launch.session.SessionSetup`,
``end_session``), the line splitters of the file and stdio readers, the invocation and the errors. The clients
and their lifecycle live in :mod:`pipes_core.launch.async_client` (the asyncio driver of the one lifecycle). Only the
I/O is twinned:

* waiting for a messages file to grow: its inotify descriptor registered with the loop (``add_reader``), or a
  loop timer where inotify is missing (the same backoff as the sync watcher);
* reading a child's stdout/stderr: asyncio streams;
* entering and leaving a context injector that does I/O, and stopping log readers: the loop's default
  executor, a shared and bounded pool, never a thread per session; polling a blob store: the reader's own
  bounded threads, so that a store that never answers holds none of the default executor's;
* waiting for a child, its timeout and the interrupt -> terminate -> kill escalation: a pidfd and loop timers
  (see :mod:`pipes_core.launch.async_client`). Cancelling the task that runs an async client's ``run`` is an
  interruption: the process is stopped, the channel drained, and ``CancelledError`` propagates (carrying
  ``.invocation``).

Message readers: pass the sync readers you know (:class:`PipesTempFileMessageReader`,
:class:`PipesFileMessageReader`, :class:`PipesStdioMessageReader`, the blob-store readers); the async session
runs each through its asyncio twin (:func:`as_async_reader`). A reader it has no twin for is entered and left on
the executor and reads with its own threads, as it would in a sync session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any, ClassVar, cast

from pipes_core.channels.blob import POLL_DONE, POLL_WAIT, PipesBlobStoreMessageReader
from pipes_core.channels.files import SessionPath, remove_temp_dir
from pipes_core.channels.injectors import PipesContextInjector, PipesEnvContextInjector, PipesTempFileContextInjector
from pipes_core.channels.readers import (
    IDLE_WAKE_SECONDS,
    MESSAGES_FILE_NAME,
    PipesFileMessageReader,
    PipesMessageReader,
    PipesTempFileMessageReader,
    _FileFollower,
)
from pipes_core.channels.stdio import (
    DEFAULT_MAX_LINE_BYTES,
    STDIO_DRAIN_SECONDS,
    STDIO_READ_BYTES,
    PipesOutputTarget,
    PipesStdioMessageReader,
    _StdioLineSplitter,
    as_output_writer,
)
from pipes_core.channels.watch import POLL_MAX_SECONDS, POLL_MIN_SECONDS, InotifyGroup
from pipes_core.launch.session import PipesSession, SessionSetup, as_session_error, attach_session, end_session
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_core.protocol.results import PipesEvent
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._errors import PipesError, PipesTransportError, PipesUsageError
from pipes_ext._protocol import PARAM_PATH, STREAM_STDOUT

__all__ = [
    "PipesAsyncMessageReader",
    "PipesAsyncFileMessageReader",
    "PipesAsyncTempFileMessageReader",
    "PipesAsyncStdioMessageReader",
    "PipesAsyncBlobStoreMessageReader",
    "as_async_reader",
    "open_pipes_session_async",
]


async def _finish_shielded(awaitable: asyncio.Future[Any]) -> None:
    """Wait for ``awaitable`` to finish even if we are cancelled meanwhile (a drain must complete: nothing that
    reached the channel is lost); the cancellation is raised once it has finished."""
    cancelled: asyncio.CancelledError | None = None
    while not awaitable.done():
        try:
            await asyncio.shield(awaitable)
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled


def _loop_closing() -> bool:
    """True in a ``finally`` or ``except`` that runs because the coroutine is being closed (``GeneratorExit``: its
    event loop was closed with the run pending, and the task is being collected). Nothing can be awaited then:
    each layer releases what it holds synchronously instead (the child killed, every descriptor closed)."""
    return isinstance(sys.exc_info()[1], GeneratorExit)


def _close_task(task: asyncio.Task[Any]) -> None:
    """Run what ``task`` has left in its ``finally`` blocks now, without the loop (see :func:`_loop_closing`)."""
    if not task.done():
        task.get_coro().close()


async def _in_executor(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work on the loop's default executor (shared and bounded), not on the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


# ---------------------------------------------------------------------------------------------- readers


class PipesAsyncMessageReader:
    """Base of the asyncio message readers: :meth:`aread_messages` is the twin of
    :meth:`PipesMessageReader.read_messages` (on entry: prepare the channel, start reading, yield the params; on
    exit, once the process has ended: drain to the last byte, then stop)."""

    log_readers: Sequence[Any] = ()

    def aread_messages(self, handler: PipesMessageHandler) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def no_messages_debug_text(self) -> str:
        return f"Messages were expected through {self.describe()}."

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        """As :meth:`PipesMessageReader.session_paths`: the local paths it created for a session (none)."""
        return []


# With inotify, an idle async file reader's safety-net re-read backs off from IDLE_WAKE_SECONDS to this. inotify
# sees every write made through this kernel; the re-read only covers a missed event, so an idle session can wait
# longer, and hundreds of idle sessions in one loop then cost about a hundred wake-ups a second, not a thousand.
ASYNC_IDLE_WAKE_MAX_SECONDS = 5.0


class _LoopInotify:
    """The one inotify group of an event loop, shared by its async file readers (see :class:`InotifyGroup`): its
    descriptor is registered with the loop, and an event wakes the readers of that file. Closed when its last
    watch goes; kept per loop (never shared between loops)."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInotify]] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop, group: InotifyGroup) -> None:
        self.loop = loop
        self.group = group
        self.wakers: dict[int, set[_AsyncFileWaker]] = {}
        loop.add_reader(group.fd, self._on_ready)

    @classmethod
    def watch(cls, path: str, waker: _AsyncFileWaker) -> tuple[_LoopInotify, int] | None:
        """Watch ``path`` for ``waker``; None where inotify is not available (the caller polls)."""
        loop = asyncio.get_running_loop()
        shared = cls._by_loop.get(loop)
        if shared is None:
            group = InotifyGroup()
            if not group.open():
                return None
            shared = cls._by_loop[loop] = cls(loop, group)
        wd = shared.group.add(path)
        if wd < 0:
            shared._release_if_unused()
            return None
        shared.wakers.setdefault(wd, set()).add(waker)
        return shared, wd

    def unwatch(self, wd: int, waker: _AsyncFileWaker) -> None:
        wakers = self.wakers.get(wd)
        if wakers is not None:
            wakers.discard(waker)
            if not wakers:
                del self.wakers[wd]
                self.group.remove(wd)
        self._release_if_unused()

    def _release_if_unused(self) -> None:
        if not self.wakers and self.group.fd >= 0:
            self.loop.remove_reader(self.group.fd)
            self.group.close()
            self._by_loop.pop(self.loop, None)

    def _on_ready(self) -> None:
        for wd in self.group.read_events():
            for waker in list(self.wakers.get(wd, ())):
                waker.wake()


class _AsyncFileWaker:
    """Wakes a waiting follower when its file is written (the loop's shared inotify group) or after a timeout (a
    loop timer: no task, no thread)."""

    def __init__(self, path: str, use_inotify: bool) -> None:
        self.path = path
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        self._watch = _LoopInotify.watch(path, self) if use_inotify else None
        self._poll = POLL_MIN_SECONDS
        self._idle = IDLE_WAKE_SECONDS

    @property
    def uses_inotify(self) -> bool:
        return self._watch is not None

    def data_seen(self) -> None:
        self._poll = POLL_MIN_SECONDS
        self._idle = IDLE_WAKE_SECONDS

    async def wait(self) -> None:
        """Until the file is written, :meth:`wake` is called, or the current idle interval passes."""
        if self._woken:
            self._woken = False
            return
        if self._watch is not None:
            timeout = self._idle
            self._idle = min(self._idle * 2, ASYNC_IDLE_WAKE_MAX_SECONDS)
        else:  # the polling fallback backs off while idle, as the sync watcher does
            timeout = self._poll
            self._poll = min(self._poll * 2, POLL_MAX_SECONDS)
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, self.wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._woken = False

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is None:
            self._woken = True  # the next wait() returns at once
        elif not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        if self._watch is not None:
            shared, wd = self._watch
            self._watch = None
            shared.unwatch(wd, self)


class PipesAsyncFileMessageReader(PipesAsyncMessageReader):
    """The asyncio twin of :class:`PipesFileMessageReader` (same arguments): the same file rules and the same
    reading (one :class:`~pipes_core.channels.readers._FileFollower` pass at a time),
    waiting between passes on the loop,
    with no thread; every bad line is an issue, a final line without its newline is reported, nothing is lost."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        include_stdio_in_messages: bool = False,
        cleanup_file: bool = True,
        *,
        log_readers: Sequence[Any] | None = None,
        use_inotify: bool = True,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self._sync = PipesFileMessageReader(path, include_stdio_in_messages, cleanup_file,
                                            log_readers=log_readers, use_inotify=use_inotify,
                                            max_line_bytes=max_line_bytes)
        self.log_readers = self._sync.log_readers
        self.bytes_read = 0

    @asynccontextmanager
    async def _following(self, path: str, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        with self._sync.messages_file(path) as fd:
            follower = _FileFollower(path, handler, fd, self._sync.max_line_bytes)
            finish = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._follow(follower, finish),
                                                          name=f"pipes-async-file-reader:{path}")
            try:
                yield self._sync.messages_params(path)
            finally:
                if _loop_closing():
                    _close_task(task)  # releases the follower's descriptor and its inotify watch
                else:
                    await self._finish(task, finish, follower, path)

    async def _finish(self, task: asyncio.Task[None], finish: asyncio.Event, follower: _FileFollower,
                      path: str) -> None:
        """Leaving the session: the follower drains the file to its end, then stops."""
        finish.set()
        cancelled: asyncio.CancelledError | None = None
        try:
            await _finish_shielded(task)  # a cancelled session still drains the file
        except asyncio.CancelledError as exc:
            cancelled = exc
        self.bytes_read = follower.bytes_read
        error = task.exception()
        if cancelled is not None:
            raise cancelled
        if error is not None:
            raise PipesTransportError(f"reading the messages file {path!r} failed: {error}") from error

    async def _follow(self, follower: _FileFollower, finish: asyncio.Event) -> None:
        waker = _AsyncFileWaker(follower.path, self._sync.use_inotify)
        finish_waiter = asyncio.get_running_loop().create_task(finish.wait())
        finish_waiter.add_done_callback(lambda _task: waker.wake())
        try:
            while True:
                finishing = finish.is_set()
                got_data = follower.read_available()  # a regular file: reads never block for long
                if finishing and follower.writers_gone():
                    break
                if got_data:
                    waker.data_seen()
                await waker.wait()
            follower.end()
        finally:
            waker.close()
            follower.close()
            if not _loop_closing():
                finish_waiter.cancel()

    @asynccontextmanager
    async def aread_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        async with self._following(self._sync.path, handler) as params:
            yield params

    def describe(self) -> str:
        return self._sync.describe()

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        return self._sync.session_paths(params)


class PipesAsyncTempFileMessageReader(PipesAsyncFileMessageReader):
    """The asyncio twin of :class:`PipesTempFileMessageReader`: a fresh private temp dir per session."""

    def __init__(
        self,
        include_stdio_in_messages: bool = False,
        dir: str | None = None,
        *,
        log_readers: Sequence[Any] | None = None,
        use_inotify: bool = True,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        super().__init__("", include_stdio_in_messages, True, log_readers=log_readers, use_inotify=use_inotify,
                         max_line_bytes=max_line_bytes)
        self.dir = dir

    @asynccontextmanager
    async def aread_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        tmp = tempfile.mkdtemp(prefix="pipes-messages-", dir=self.dir)
        try:
            async with self._following(os.path.join(tmp, MESSAGES_FILE_NAME), handler) as params:
                yield params
        finally:
            remove_temp_dir(tmp, MESSAGES_FILE_NAME)

    def describe(self) -> str:
        return "the tempfile message reader"

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        return [SessionPath(os.path.dirname(params[PARAM_PATH]), tree=True)]


class PipesAsyncStdioMessageReader(PipesAsyncMessageReader):
    """The asyncio twin of :class:`PipesStdioMessageReader` (same arguments): :meth:`consume` reads an
    :class:`asyncio.StreamReader` on the loop; leaving the session waits for every consumed stream's end."""

    def __init__(
        self,
        stream: str = STREAM_STDOUT,
        *,
        output: PipesOutputTarget | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        drain_timeout_seconds: float = STDIO_DRAIN_SECONDS,
    ) -> None:
        self._sync = PipesStdioMessageReader(stream, output=output, max_line_bytes=max_line_bytes,
                                             drain_timeout_seconds=drain_timeout_seconds)
        self.stream = stream
        self._handler: PipesMessageHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.unfinished_sources = 0

    @asynccontextmanager
    async def aread_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        if self._handler is not None:
            raise PipesUsageError("this PipesAsyncStdioMessageReader is already reading for another session")
        self._handler, self._tasks, self.unfinished_sources = handler, [], 0
        try:
            yield self._sync.messages_params()
        finally:
            tasks, self._handler = self._tasks, None
            if tasks and _loop_closing():
                for task in tasks:
                    _close_task(task)
            elif tasks:
                waiting = asyncio.ensure_future(asyncio.wait(tasks, timeout=self._sync.drain_timeout_seconds))
                cancelled: asyncio.CancelledError | None = None
                try:
                    await _finish_shielded(waiting)
                except asyncio.CancelledError as exc:
                    cancelled = exc
                done, pending = waiting.result()
                for task in pending:
                    task.cancel()
                self.unfinished_sources = len(pending)
                if pending:
                    handler.logger.warning(
                        "[pipes] the %s stream did not end within %.3g s of the process's end; messages after "
                        "this point are lost", self.stream, self._sync.drain_timeout_seconds)
                errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
                if cancelled is not None:
                    raise cancelled
                if errors:
                    raise PipesTransportError(f"reading the process's {self.stream} failed: {errors[0]}") \
                        from errors[0]

    def consume(self, source: asyncio.StreamReader, *, output: Callable[[bytes], None] | None = None) -> None:
        """Read ``source`` to its end in a task of the session (messages to the handler, other lines to
        ``output``, by default the reader's)."""
        handler = self._handler
        if handler is None:
            raise PipesUsageError("consume() must be called inside aread_messages() (an open session)")
        writer = output or (as_output_writer(self._sync.output) if self._sync.output is not None else
                            as_output_writer(sys.stdout if self.stream == STREAM_STDOUT else sys.stderr))
        splitter = _StdioLineSplitter(handler, writer, self.stream, self._sync.max_line_bytes)
        self._tasks.append(asyncio.get_running_loop().create_task(_pump(source, splitter.feed, splitter.finish)))

    def describe(self) -> str:
        return self._sync.describe()

    def no_messages_debug_text(self) -> str:
        return self._sync.no_messages_debug_text()


async def _pump(source: asyncio.StreamReader, feed: Callable[[bytes], None],
                finish: Callable[[], None] | None = None) -> None:
    try:
        while True:
            chunk = await source.read(STDIO_READ_BYTES)
            if not chunk:
                return
            feed(chunk)
    finally:
        if finish is not None:
            finish()


class _ThreadedReader(PipesAsyncMessageReader):
    """Any sync reader without an asyncio twin: entered and left on the executor; it reads with its own
    threads, as in a sync session."""

    def __init__(self, reader: PipesMessageReader) -> None:
        self.reader = reader
        self.log_readers = reader.log_readers

    @asynccontextmanager
    async def aread_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        async with _entered_on_executor(self.reader.read_messages(handler)) as params:
            yield params

    def describe(self) -> str:
        return self.reader.describe()

    def no_messages_debug_text(self) -> str:
        return self.reader.no_messages_debug_text()

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        return self.reader.session_paths(params)


class PipesAsyncBlobStoreMessageReader(PipesAsyncMessageReader):
    """The asyncio twin of a blob-store reader (S3, GCS, Azure, or a subclass of
    :class:`PipesBlobStoreMessageReader`): the same polling (one pass every ``interval``, gaps, retries), each
    pass run on the reader's own bounded threads (:data:`~pipes_core.channels.blob.READER_THREADS`), so a thousand
    sessions cost no thousand threads and a store that never answers stalls no session of another reader (each
    request fails after the reader's ``request_timeout``).
    """

    def __init__(self, reader: PipesBlobStoreMessageReader) -> None:
        self.reader = reader
        self.log_readers = reader.log_readers

    @asynccontextmanager
    async def aread_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        async with _entered_on_executor(self.reader.get_params()) as params:
            follower = self.reader.follower(params, handler)
            finish = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._follow(follower, finish))
            try:
                yield dict(params)
            finally:
                if _loop_closing():
                    _close_task(task)
                else:
                    finish.set()
                    await _finish_shielded(task)
                self.reader.ended(follower)

    async def _follow(self, follower: Any, finish: asyncio.Event) -> None:
        try:
            while True:
                # On the reader's own threads, never the loop's default executor: a store that does not answer
                # holds at most READER_THREADS threads of its own reader, and no other session waits for them.
                step = await asyncio.wrap_future(self.reader.poll_threads.submit(follower.poll, finish.is_set()))
                if step == POLL_DONE:
                    return
                if step == POLL_WAIT:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(finish.wait(), self.reader.interval)
        except Exception as exc:
            follower.fail(exc)

    def describe(self) -> str:
        return self.reader.describe()

    def no_messages_debug_text(self) -> str:
        return self.reader.no_messages_debug_text()


# The file readers' own reading, which the asyncio file readers twin.
_TWINNED_FILE_READING = (PipesTempFileMessageReader.read_messages, PipesFileMessageReader.read_messages)


def as_async_reader(reader: PipesMessageReader | PipesAsyncMessageReader) -> PipesAsyncMessageReader:
    """The asyncio twin of ``reader`` with the same settings (an async reader is returned as is)."""
    if isinstance(reader, PipesAsyncMessageReader):
        return reader
    make_twin = getattr(reader, "async_twin", None)  # a reader that knows its own twin (the Slurm reader)
    twin = make_twin() if callable(make_twin) else None
    if twin is not None:
        return cast(PipesAsyncMessageReader, twin)
    if isinstance(reader, PipesFileMessageReader) and type(reader).read_messages not in _TWINNED_FILE_READING:
        return _ThreadedReader(reader)  # a subclass that reads its own way keeps its reading
    if isinstance(reader, PipesTempFileMessageReader):
        return PipesAsyncTempFileMessageReader(reader.include_stdio_in_messages, reader.dir,
                                               log_readers=reader.log_readers, use_inotify=reader.use_inotify,
                                               max_line_bytes=reader.max_line_bytes)
    if isinstance(reader, PipesFileMessageReader):
        return PipesAsyncFileMessageReader(reader.path, reader.include_stdio_in_messages, reader.cleanup_file,
                                           log_readers=reader.log_readers, use_inotify=reader.use_inotify,
                                           max_line_bytes=reader.max_line_bytes)
    if isinstance(reader, PipesBlobStoreMessageReader):
        return PipesAsyncBlobStoreMessageReader(reader)
    if isinstance(reader, PipesStdioMessageReader):
        return PipesAsyncStdioMessageReader(reader.stream, output=reader.output, max_line_bytes=reader.max_line_bytes,
                                            drain_timeout_seconds=reader.drain_timeout_seconds)
    return _ThreadedReader(reader)


@asynccontextmanager
async def _entered_on_executor(manager: AbstractContextManager[Any]) -> AsyncIterator[Any]:
    """A sync context manager that may block (network, files), entered and left on the executor."""
    value = await _in_executor(manager.__enter__)
    try:
        yield value
    except BaseException:
        if _loop_closing():
            manager.__exit__(*sys.exc_info())  # on this thread: nothing can be awaited any more
            raise
        if not await _in_executor(manager.__exit__, *sys.exc_info()):
            raise
    else:
        await _in_executor(manager.__exit__, None, None, None)


# Injectors whose enter and exit cost at most a small local file write: run on the loop itself.
_LOCAL_INJECTORS = (PipesEnvContextInjector, PipesTempFileContextInjector)


@asynccontextmanager
async def _injected(injector: PipesContextInjector, context_data: Any) -> AsyncIterator[Any]:
    manager = injector.inject_context(context_data)
    if type(injector) in _LOCAL_INJECTORS:  # no I/O, or one small local file: no hop to the executor
        with manager as params:
            yield params
        return
    async with _entered_on_executor(manager) as params:
        yield params


# ---------------------------------------------------------------------------------------------- the session


@asynccontextmanager
async def open_pipes_session_async(
    context: PipesRunContext | None,
    context_injector: PipesContextInjector,
    message_reader: PipesMessageReader | PipesAsyncMessageReader,
    extras: Mapping[str, Any] | None = None,
    *,
    on_event: Callable[[PipesEvent], None] | None = None,
    retain_messages: bool = True,
    logger: Any = None,
    external_stream_handler: Callable[[str, str], None] | None = None,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    warn_unclosed: bool = True,
    warn_unopened: bool = True,
) -> AsyncIterator[PipesSession]:
    """The asyncio twin of :func:`open_pipes_session` (same arguments, same :class:`PipesSession`): ``async with``
    it, launch the process inside the block; leaving the block drains the channel without blocking the loop.
    ``on_event`` is called on the loop for the asyncio readers (on a reader thread for a reader without a twin).
    """
    reader = as_async_reader(message_reader)
    setup = SessionSetup(context, reader, extras, on_event=on_event, retain_messages=retain_messages, logger=logger,
                         external_stream_handler=external_stream_handler, on_message=on_message)
    launched = False
    session: PipesSession | None = None
    try:
        async with _injected(context_injector, setup.context_data) as context_params:
            async with reader.aread_messages(setup.handler) as message_params:
                session = setup.session(context_injector, cast(PipesMessageReader, reader), context_params,
                                        message_params)
                launched = True
                yield session
    except PipesError as exc:
        attach_session(exc, session)
        raise
    except OSError as exc:
        error = as_session_error(exc, session)
        if error is None:
            raise
        raise error from exc
    finally:
        if setup.log_readers.log_readers:
            if _loop_closing():
                setup.log_readers.stop(run_unstarted=launched)
            else:
                await asyncio.shield(_in_executor(lambda: setup.log_readers.stop(run_unstarted=launched)))
    assert session is not None  # the block ran, else the error was raised above
    end_session(session, warn_unclosed, warn_unopened)


# ---------------------------------------------------------------------------------------------- the client


async def _stream_reader(pipe: Any) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """An :class:`asyncio.StreamReader` over a pipe of a child, and its transport (close it once read)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STDIO_READ_BYTES, loop=loop)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader, transport

