"""Message readers: how the orchestrator receives what the external process writes.

A reader's :meth:`PipesMessageReader.read_messages` is a context manager: on entry it prepares the channel,
starts reading in the background and yields the messages params; on exit (the process has ended) it drains
the channel to the last byte, then stops. What a session needs lives inside that block, so one instance can
serve many sessions in turn (a reader may keep figures of the last session it read for inspection, as the blob
reader's ``last_stats``).

The file reader follows a growing file of newline-delimited JSON. It reads bytes and cuts them at newlines itself
(:class:`~pipes_core.protocol.lines.LineSplitter`), so a line still being written waits for its end; a final line with
no newline once the process has ended (the writer was killed mid-write) is reported as an issue, not parsed;
a line longer than ``max_line_bytes`` is skipped as it streams and reported with its size. Every bad line
becomes an issue on the handler; the reader never stops early.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pipes_core.channels.files import SessionPath, create_private_file, remove_temp_dir
from pipes_core.channels.log_readers import PipesLogReader
from pipes_core.channels.watch import FileWatcher
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_core.protocol.lines import DEFAULT_MAX_LINE_BYTES, LineSplitter, check_max_line_bytes
from pipes_ext._errors import PipesTransportError, PipesUsageError
from pipes_ext._protocol import PARAM_INCLUDE_STDIO_IN_MESSAGES, PARAM_PATH

__all__ = [
    "PipesMessageReader",
    "PipesFileMessageReader",
    "PipesTempFileMessageReader",
    "MESSAGES_FILE_NAME",
    "READ_BLOCK_BYTES",
    "IDLE_WAKE_SECONDS",
    "CAPTURE_WRITERS_WAIT_SECONDS",
    "DEFAULT_MAX_LINE_BYTES",
]

# The file name the reference uses inside its temp dir.
MESSAGES_FILE_NAME = "messages"
# One read() takes at most this much; large enough that 100k small messages cost few system calls.
READ_BLOCK_BYTES = 1 << 20
# After the process has ended, how long the final drain waits for the external side's stdio capture reader
# (a process of its own, see pipes_ext._capture) to finish appending what the process wrote before it died. It
# only waits while such a reader holds its lock: while a grandchild still writes to the captured stdout.
CAPTURE_WRITERS_WAIT_SECONDS = 5.0
# Even with inotify the reader looks at the file this often, as a safety net (a missed event costs at most
# this much delay); idle cost is one read() per interval.
IDLE_WAKE_SECONDS = 0.5


class PipesMessageReader:
    """Base class for message readers.

    ``log_readers``: :class:`~pipes_core.PipesLogReader` objects that the session starts when ``opened`` arrives
    and stops when it ends (see ``pipes_core.channels.log_readers``); a reader taking ``log_readers=`` stores them here.
    """

    log_readers: Sequence[PipesLogReader] = ()

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        raise NotImplementedError
        yield {}  # pragma: no cover

    def describe(self) -> str:
        """A short name for messages, e.g. ``the tempfile message reader (/tmp/...)``."""
        return type(self).__name__

    def no_messages_debug_text(self) -> str:
        """What to check when the external process never opened the channel."""
        return f"Messages were expected through {self.describe()}."

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        """The local paths this reader created for the session whose message params are ``params``, for the
        orphan guard to remove if the orchestrator dies (none by default)."""
        return []

    def close(self) -> None:
        """Release resources (none by default)."""

    def __enter__(self) -> PipesMessageReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _FileFollower:
    """Reads one messages file into a handler, one pass at a time, without waiting: between passes the sync
    reader's thread waits on a :class:`FileWatcher`, the asyncio twin's task on the loop. Owns ``fd``."""

    def __init__(self, path: str, handler: PipesMessageHandler, fd: int,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.path = path
        self.handler = handler
        self.fd = fd
        self.splitter = LineSplitter(handler, path, max_line_bytes)
        self._writers_deadline: float | None = None

    def read_available(self) -> bool:
        """Handle every complete line available now; True when any byte arrived."""
        got_data = False
        while True:
            block = os.read(self.fd, READ_BLOCK_BYTES)
            if not block:
                return got_data
            got_data = True
            self.splitter.feed(block)
            self.block_handled()

    def block_handled(self) -> None:
        """Called after each block read is handled (a durable run's follower records its messages here)."""

    @property
    def bytes_read(self) -> int:
        return self.splitter.bytes_read

    def writers_gone(self) -> bool:
        """True when no stdio-capture reader of the external side still holds its shared ``flock`` on the file
        (it may still be appending the output of a killed process), or after :data:`CAPTURE_WRITERS_WAIT_SECONDS`."""
        if self._writers_deadline is None:
            self._writers_deadline = time.monotonic() + CAPTURE_WRITERS_WAIT_SECONDS
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() < self._writers_deadline:
                return False
            self.handler.logger.warning(
                "[pipes] a stdio capture of the external process still writes to %s after %.0f s; what it "
                "writes from now on is not read", self.path, CAPTURE_WRITERS_WAIT_SECONDS)
            return True
        except OSError:  # no flock on this file system: nothing to wait for
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def end(self) -> None:
        """The final drain is over: a last line without its newline is reported, not parsed."""
        self.splitter.finish()

    def close(self) -> None:
        os.close(self.fd)


class _FileFollowThread:
    """The background thread of a file reader: follows one file into a handler until told to finish."""

    def __init__(
        self,
        path: str,
        handler: PipesMessageHandler,
        *,
        use_inotify: bool = True,
        fd: int | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        follower: Callable[[str, PipesMessageHandler, int, int], _FileFollower] = _FileFollower,
    ) -> None:
        self.path = path
        self._follower = follower  # makes the follower of the file (a durable run's records what it reads)
        self._fd = fd  # an open, readable descriptor of the file (owned by this thread), or None: open path
        self.handler = handler
        self.max_line_bytes = max_line_bytes
        self.watcher = FileWatcher(path, use_inotify=use_inotify)
        self._finish = threading.Event()
        self._drained = threading.Event()  # set once everything is handled; the thread then only cleans up
        self._thread = threading.Thread(target=self._run, name=f"pipes-file-reader:{path}", daemon=True)
        self.error: BaseException | None = None
        self.follower: _FileFollower | None = None

    @property
    def bytes_read(self) -> int:
        return 0 if self.follower is None else self.follower.bytes_read

    def start(self) -> None:
        try:
            self.watcher.start()
            self._thread.start()
        except BaseException:  # e.g. out of descriptors after the inotify one: release what was set up
            self.watcher.close()
            raise

    def finish(self) -> None:
        """Drain what is left and stop; returns when the thread has ended."""
        self._finish.set()
        self.watcher.wake()
        self._drained.wait()
        if self.error is not None:
            raise PipesTransportError(f"reading the messages file {self.path!r} failed: {self.error}") from self.error

    def _run(self) -> None:
        try:
            self._follow()
        finally:
            self._drained.set()
            self.watcher.close()

    def _follow(self) -> None:
        if self._fd is not None:
            fd = self._fd
        else:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                self.error = exc
                return
        follower = self.follower = self._follower(self.path, self.handler, fd, self.max_line_bytes)
        try:
            while True:
                finishing = self._finish.is_set()
                got_data = follower.read_available()
                if finishing and follower.writers_gone():
                    break
                if got_data:
                    self.watcher.data_seen()
                self.watcher.wait(IDLE_WAKE_SECONDS)
            follower.end()
        except BaseException as exc:  # pragma: no cover - I/O failure on a local file
            self.error = exc
        finally:
            follower.close()


class PipesFileMessageReader(PipesMessageReader):
    """Reads newline-delimited JSON messages from a file the external process appends to.

    Args:
        path: the messages file, created by the session (``O_EXCL | O_NOFOLLOW``, mode 0600): an existing path
            of any kind, a symbolic link included, or a missing directory raises :class:`PipesUsageError`
            before the process is launched, and the path is left untouched (see :mod:`pipes_core.channels.files`).
        include_stdio_in_messages: ask the external side to forward its stdout/stderr as messages.
        cleanup_file: delete the file after the session (only the file the session created: never a file
            someone put in its place).
        log_readers: log readers to run during the session (e.g. a :class:`~pipes_core.PipesFileLogReader` on
            a batch job's output file).
        use_inotify: wake on inotify events where available. inotify sees only writes made through this
            machine's kernel: for a writer on another host (a file on NFS written by a cluster node) the reader
            still sees the data through its periodic re-read, and ``use_inotify=False`` polls instead
            (1 ms after activity, backing off to 50 ms), which is also the fallback where inotify is missing.
        max_line_bytes: the longest message line parsed (default :data:`DEFAULT_MAX_LINE_BYTES`, 64 MiB); a
            longer one is skipped as it streams, without being held in memory, and reported as a
            ``LINE_TOO_LONG`` issue with its size.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        include_stdio_in_messages: bool = False,
        cleanup_file: bool = True,
        *,
        log_readers: Sequence[PipesLogReader] | None = None,
        use_inotify: bool = True,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self.path = os.fspath(path)
        if not isinstance(include_stdio_in_messages, bool):
            raise PipesUsageError(
                f"include_stdio_in_messages must be a boolean, got {type(include_stdio_in_messages).__name__}"
            )
        self.include_stdio_in_messages = include_stdio_in_messages
        self.cleanup_file = cleanup_file
        self.log_readers = tuple(log_readers or ())
        self.use_inotify = use_inotify
        self.max_line_bytes = check_max_line_bytes(max_line_bytes)

    def messages_params(self, path: str) -> dict[str, Any]:
        return {PARAM_PATH: path, PARAM_INCLUDE_STDIO_IN_MESSAGES: self.include_stdio_in_messages}

    @contextmanager
    def messages_file(self, path: str) -> Iterator[int]:
        """Create the file (see :mod:`~pipes_core.channels.files`)
        and yield a readable descriptor of it, which the caller
        then owns; at the end remove the file if ``cleanup_file`` (and only if the path still names the file
        created here). Shared by this reader's thread and its asyncio twin."""
        created = create_private_file(path, "the messages file", readable=True)
        try:
            fd = os.dup(created.fd)
        except BaseException:  # out of descriptors: the file is not left behind
            created.remove()
            raise
        created.close_fd()
        try:
            yield fd
        finally:
            if self.cleanup_file:
                created.remove()

    @contextmanager
    def _following(self, path: str, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        """Create the file, follow it while the block runs, drain it at the end."""
        with self.messages_file(path) as fd:
            try:
                thread = _FileFollowThread(path, handler, fd=fd, use_inotify=self.use_inotify,
                                          max_line_bytes=self.max_line_bytes)
                thread.start()  # from here that thread owns fd
            except BaseException:
                os.close(fd)
                raise
            try:
                yield self.messages_params(path)
            finally:
                thread.finish()

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        with self._following(self.path, handler) as params:
            yield params

    def describe(self) -> str:
        return f"the file message reader ({self.path})"

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        return [SessionPath(params[PARAM_PATH])] if self.cleanup_file else []


class PipesTempFileMessageReader(PipesFileMessageReader):
    """A file reader on a fresh private temp dir (0700; file 0600), removed after the session."""

    def __init__(
        self,
        include_stdio_in_messages: bool = False,
        dir: str | None = None,
        *,
        log_readers: Sequence[PipesLogReader] | None = None,
        use_inotify: bool = True,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        super().__init__("", include_stdio_in_messages=include_stdio_in_messages, cleanup_file=True,
                         log_readers=log_readers, use_inotify=use_inotify, max_line_bytes=max_line_bytes)
        self.dir = dir

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        tmp = tempfile.mkdtemp(prefix="pipes-messages-", dir=self.dir)
        try:
            with self._following(os.path.join(tmp, MESSAGES_FILE_NAME), handler) as params:
                yield params
        finally:
            remove_temp_dir(tmp, MESSAGES_FILE_NAME)

    def describe(self) -> str:
        return "the tempfile message reader"

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        return [SessionPath(os.path.dirname(params[PARAM_PATH]), tree=True)]
