"""Forward this process's stdout and stderr as ``log_external_stream`` messages (``include_stdio_in_messages``).

The capture works on file descriptors, so it also sees writes from C code and from child processes, which
inherit fds 1 and 2. For each of fd 1 and fd 2 it:

* keeps a duplicate of the original fd;
* ``dup2``-s the write end of a new pipe over it;
* starts a daemon thread that reads the pipe and copies every byte to the original fd, so output still
  reaches its old destination. It also sends the text through the messages channel: one message per read
  (split at :data:`MAX_MESSAGE_CHARS`), decoded with an incremental UTF-8 decoder so a character split
  across reads stays whole.

:meth:`PipesStdioCapture.close` stops the capture without losing anything:

1. It flushes ``sys.stdout``/``sys.stderr`` and ``dup2``-s the originals back. This closes the pipes' write
   ends held by fds 1 and 2.
2. It waits up to :data:`EOF_TIMEOUT_SECONDS` for each pipe's end of file. The wait is longer only when a
   grandchild still running holds the pipe.
3. It takes what is in such a pipe at that point, up to :data:`DRAIN_MAX_BYTES`.
4. It stops sending.

After ``close`` returns, no capture message is sent any more, so the caller can send ``closed`` last.

A pipe that has not reached EOF keeps being copied to the original fd (with no messages) by its daemon
thread for as long as this process runs. A lingering grandchild therefore keeps its output and gets no
SIGPIPE.

Differences from the reference (one ``tee`` subprocess per stream, polled every second, 2 s at close):

* there is no external binary;
* there is no polling delay;
* stderr is never copied into stdout's messages;
* ``close`` waits only while output can still arrive.

POSIX only. A stream whose fd was not open when Python started (``sys.__stdout__`` / ``sys.__stderr__`` is
None) or is not open now is skipped.
"""

from __future__ import annotations

import atexit
import codecs
import os
import select
import sys
import threading
import time
import warnings
from collections.abc import Callable

from ._errors import PipesWarning
from ._protocol import METHOD_LOG_EXTERNAL_STREAM, STREAM_STDERR, STREAM_STDOUT, dumps_message
from ._writers import PipesMessageWriterChannel

__all__ = [
    "PipesStdioCapture",
    "READ_BYTES",
    "MAX_MESSAGE_CHARS",
    "EOF_TIMEOUT_SECONDS",
    "DRAIN_TIMEOUT_SECONDS",
    "DRAIN_MAX_BYTES",
]

# One read() of a capture pipe takes at most this much (a Linux pipe holds 64 KiB by default).
READ_BYTES = 64 * 1024
# One log_external_stream message carries at most this many characters of text; a longer read is split.
MAX_MESSAGE_CHARS = 64 * 1024
# At close, how long to wait for end of file on a capture pipe once fds 1/2 are restored. EOF comes at once
# unless a grandchild still running holds the pipe; past this the pipe is drained as it is.
EOF_TIMEOUT_SECONDS = 1.0
# How long close waits for that final drain (it only takes longer if the original fd blocks writes).
DRAIN_TIMEOUT_SECONDS = 1.0
# The final drain of a pipe still held open takes at most this much, so a grandchild that keeps writing
# cannot hold close forever.
DRAIN_MAX_BYTES = 1 << 20

_STREAM_FDS = ((STREAM_STDOUT, 1), (STREAM_STDERR, 2))


def _is_capturable(stream: str, fd: int) -> bool:
    """fd 1/2 is this process's stdout/stderr: Python found it open at start-up, and it still is.

    When Python started without it (``sys.__stdout__`` is None) the fd number may since have been reused by
    an ordinary file, e.g. the messages file itself, which must not be replaced by a pipe.
    """
    original = sys.__stdout__ if stream == STREAM_STDOUT else sys.__stderr__
    if original is None:
        return False
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _flush_python_streams() -> None:
    """Flush Python's buffered stdout/stderr (both the current objects and the originals) to their fds."""
    seen: list[object] = []
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is None or any(stream is other for other in seen):
            continue
        seen.append(stream)
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can reach the fd from it
            pass


def _split(text: str, limit: int) -> list[str]:
    return [text[start : start + limit] for start in range(0, len(text), limit)]


class _StreamPump:
    """Reads one capture pipe on a daemon thread: echoes to the original fd and sends the text.

    Owns ``read_fd`` and ``echo_fd`` and closes them when the pipe reaches EOF.
    """

    def __init__(
        self,
        stream: str,
        read_fd: int,
        echo_fd: int,
        wake_fd: int,
        send: Callable[[str, str], None],
        max_message_chars: int,
    ) -> None:
        self.stream = stream
        self._read_fd = read_fd
        self._echo_fd = echo_fd
        self._wake_fd = wake_fd
        self._send = send
        self._max_chars = max_message_chars
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._lock = threading.Lock()
        self._sending = True
        self._echoing = True
        self._stop_requested = False
        # Set once this pump will send no more messages (EOF reached, or stopped and drained).
        self.messages_done = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"pipes-stdio-capture-{stream}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread (woken through the wake fd) to drain what the pipe holds now and stop sending."""
        self._stop_requested = True

    def stop_sending(self) -> None:
        """No message is sent after this returns (waits for a send in progress)."""
        with self._lock:
            self._sending = False

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        try:
            if not self._pump_until_stopped():
                return
            # Stopped before EOF (a grandchild holds the pipe): keep copying to the original fd, no messages.
            while data := os.read(self._read_fd, READ_BYTES):
                self._echo(data)
        except BaseException as exc:  # pragma: no cover - a read failure on our own pipe
            self.error = exc
        finally:
            self._finish_messages()
            os.close(self._read_fd)
            os.close(self._echo_fd)

    def _pump_until_stopped(self) -> bool:
        """Forward until EOF (returns False) or until a stop request, after a final drain (returns True)."""
        poller = select.poll()  # not select.select: our fds may be numbered past FD_SETSIZE
        poller.register(self._read_fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        while not self._stop_requested:
            ready = {fd for fd, _ in poller.poll()}
            if self._read_fd in ready:  # POLLIN, or POLLHUP at EOF
                data = os.read(self._read_fd, READ_BYTES)
                if not data:
                    return False
                self._forward(data)
        if self._drain_available():
            return False
        self._finish_messages()
        return True

    def _drain_available(self) -> bool:
        """Forward what the pipe holds now (at most DRAIN_MAX_BYTES) without blocking; True at EOF."""
        os.set_blocking(self._read_fd, False)
        try:
            drained = 0
            while drained < DRAIN_MAX_BYTES:
                try:
                    data = os.read(self._read_fd, READ_BYTES)
                except BlockingIOError:
                    return False
                if not data:
                    return True
                drained += len(data)
                self._forward(data)
            return False
        finally:
            os.set_blocking(self._read_fd, True)

    def _forward(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._send_text(text)
        self._echo(data)

    def _send_text(self, text: str) -> None:
        with self._lock:
            if not self._sending:
                return
            try:
                for part in _split(text, self._max_chars):
                    self._send(self.stream, part)
            except Exception as exc:  # the channel is broken: keep echoing (never block the writers)
                self.error = exc
                self._sending = False

    def _echo(self, data: bytes) -> None:
        if not self._echoing:
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[os.write(self._echo_fd, view) :]
                except BlockingIOError:  # someone made the shared file description non-blocking
                    writable = select.poll()
                    writable.register(self._echo_fd, select.POLLOUT)
                    writable.poll()
        except OSError:  # the original destination is gone (e.g. EPIPE): keep capturing regardless
            self._echoing = False

    def _finish_messages(self) -> None:
        if self.messages_done.is_set():
            return
        text = self._decoder.decode(b"", final=True)  # a multibyte char cut off at the end becomes U+FFFD
        if text:
            self._send_text(text)
        self.stop_sending()
        self.messages_done.set()


class PipesStdioCapture:
    """Forwards fd 1 and fd 2 as ``log_external_stream`` messages on ``channel``; see the module docstring.

    Use ``start()`` and ``close()``, or ``with PipesStdioCapture(channel):``. ``close`` is idempotent. It is
    also registered with :mod:`atexit` while the capture runs, so a process that never closes its context
    still gets its fds back, and its last output still reaches the real stdout/stderr.

    Args:
        channel: where the messages go (any thread may write to it; channels are thread-safe).
        max_message_chars: the longest text one message carries.
        eof_timeout_seconds: how long ``close`` waits for end of file on each pipe.
    """

    def __init__(
        self,
        channel: PipesMessageWriterChannel,
        *,
        max_message_chars: int = MAX_MESSAGE_CHARS,
        eof_timeout_seconds: float = EOF_TIMEOUT_SECONDS,
    ) -> None:
        if max_message_chars < 1:
            raise ValueError("max_message_chars must be at least 1")
        self._channel = channel
        self._max_message_chars = max_message_chars
        self._eof_timeout = eof_timeout_seconds
        # (fd, duplicate of the original kept to restore it, pump) per captured stream
        self._active: list[tuple[int, int, _StreamPump]] = []
        self._wake_fds: tuple[int, int] | None = None
        self._started = False
        self._closed = False
        self._pid = os.getpid()

    @property
    def streams(self) -> list[str]:
        """The streams being captured (empty before start, on an unsupported platform, or without fds)."""
        return [pump.stream for _, _, pump in self._active]

    def _send(self, stream: str, text: str) -> None:
        params = {"stream": stream, "text": text, "extras": {}}
        self._channel.write_line(dumps_message(METHOD_LOG_EXTERNAL_STREAM, params))

    def start(self) -> PipesStdioCapture:
        """Start capturing fd 1 and fd 2 (those that are open). A second call does nothing.

        Raises:
            OSError: when a pipe or fd cannot be created; what was set up is undone first.
        """
        if self._started:
            return self
        self._started = True
        self._pid = os.getpid()
        if os.name != "posix":
            warnings.warn("include_stdio_in_messages: stdio capture needs POSIX; not capturing",
                          PipesWarning, stacklevel=2)
            return self
        targets = [(stream, fd) for stream, fd in _STREAM_FDS if _is_capturable(stream, fd)]
        if not targets:
            return self
        self._wake_fds = os.pipe()
        try:
            for stream, fd in targets:
                self._capture(stream, fd)
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        return self

    def _capture(self, stream: str, fd: int) -> None:
        assert self._wake_fds is not None
        _flush_python_streams()  # output buffered before the capture goes where it was going
        read_fd, write_fd = os.pipe()  # both non-inheritable: children get only fds 1/2
        opened = [read_fd, write_fd]
        try:
            echo_fd = os.dup(fd)
            opened.append(echo_fd)
            restore_fd = os.dup(fd)
            opened.append(restore_fd)
            pump = _StreamPump(stream, read_fd, echo_fd, self._wake_fds[0], self._send, self._max_message_chars)
            pump.start()  # from here the pump owns read_fd and echo_fd
        except BaseException:
            for opened_fd in opened:
                os.close(opened_fd)
            raise
        try:
            os.dup2(write_fd, fd)  # inheritable, as fds 1/2 must be
        except BaseException:
            os.close(restore_fd)
            raise
        finally:
            os.close(write_fd)  # only fd 1/2 hold the write end now (or nothing: the pump sees EOF)
        self._active.append((fd, restore_fd, pump))

    def close(self) -> None:
        """Restore fds 1/2, wait for the pipes to drain, and stop sending; see the module docstring."""
        if not self._started or self._closed:
            return
        if os.getpid() != self._pid:
            # A forked child (e.g. at its atexit): its fds 1/2 still feed the parent's pipes, which the
            # parent's threads read; the pumps (and their locks) were not forked here, so touch nothing.
            return
        self._closed = True
        atexit.unregister(self.close)
        _flush_python_streams()
        pumps = [pump for _, _, pump in self._active]
        try:
            for fd, restore_fd, _ in self._active:
                try:
                    os.dup2(restore_fd, fd)  # closes the pipe's write end held by fd
                finally:
                    os.close(restore_fd)
        finally:
            self._wait_for_pumps(pumps)
        errors = [pump for pump in pumps if pump.error is not None]
        for pump in errors:
            warnings.warn(f"stdio capture of {pump.stream} stopped sending messages: {pump.error!r}",
                          PipesWarning, stacklevel=2)

    def _wait_for_pumps(self, pumps: list[_StreamPump]) -> None:
        try:
            deadline = time.monotonic() + self._eof_timeout
            lingering = [p for p in pumps if not p.messages_done.wait(max(0.0, deadline - time.monotonic()))]
            if lingering and self._wake_fds is not None:
                for pump in lingering:
                    pump.request_stop()
                os.write(self._wake_fds[1], b"\0")  # never read: it keeps the wake fd readable for every pump
                deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
                for pump in lingering:
                    pump.messages_done.wait(max(0.0, deadline - time.monotonic()))
        finally:  # even when interrupted: nothing may be sent after close
            for pump in pumps:
                pump.stop_sending()
        # A pump with messages_done set never touches the wake pipe again; otherwise leave it open (leak two
        # fds) rather than let a stuck pump select on a closed, possibly reused, fd number.
        if self._wake_fds is not None and all(pump.messages_done.is_set() for pump in pumps):
            for wake_fd in self._wake_fds:
                os.close(wake_fd)
            self._wake_fds = None

    def __enter__(self) -> PipesStdioCapture:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
