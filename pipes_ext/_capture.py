"""Forward this process's stdout and stderr as ``log_external_stream`` messages (``include_stdio_in_messages``).

The capture works on file descriptors, so it also sees writes from C code and from child processes, which
inherit fds 1 and 2. The reading end lives in a small **forked reader process**, not in this process, so it
outlives it: when this process is SIGKILLed, what it had written is still copied to the real stdout/stderr
and still sent as messages. No external binary is involved (the reference runs one ``tee`` per stream).

:meth:`PipesStdioCapture.start`:

1. makes one pipe per captured fd (1 and/or 2), plus two small control pipes;
2. forks the reader (a double fork, so it is not this process's child: ``os.wait()`` in user code never sees
   it; it calls ``setsid()``, so a signal to this process's group does not cut its drain short). The reader
   keeps only the fds it needs. For each read it sends the text as messages, then copies the bytes to the
   original fd. It sends the messages itself, with one ``write`` per line, straight into the messages file
   when the channel is the file channel (O_APPEND: its lines never interleave with this process's). For any
   other channel it hands the lines to a thread of this process, which writes them to the channel;
3. ``dup2``-s each pipe's write end over fd 1 / fd 2.

The reader stops by itself at end of file on every pipe, i.e. once no process holds a write end any more:
after this process and any grandchildren that inherited fds 1/2 have exited or closed them. So after a
SIGKILL nothing written before it is lost, on the real streams, and in the messages on the file channel. On
the file channel the reader also holds a shared ``flock`` on the messages file while it may still write; the
orchestrator's file reader waits for it (a bounded time) before its final drain.

:meth:`PipesStdioCapture.close` stops the capture without losing anything:

1. It flushes ``sys.stdout``/``sys.stderr`` and ``dup2``-s the originals back, which closes this process's
   write ends of the pipes.
2. It waits up to :data:`EOF_TIMEOUT_SECONDS` for the reader to report end of file on every pipe (and every
   message sent). The wait is longer only when a grandchild still running holds a pipe.
3. Otherwise it asks the reader to send what the pipes hold at that point (up to :data:`DRAIN_MAX_BYTES`) and
   to stop sending messages; the reader then keeps copying the pipes to the original fds (no messages) until
   end of file, so a lingering grandchild keeps its output and gets no SIGPIPE.

After ``close`` returns, no capture message is sent any more, so the caller can send ``closed`` last.

Other differences from the reference: no polling delay; stderr is never copied into stdout's messages;
``close`` waits only while output can still arrive.

POSIX only. A stream whose fd was not open when Python started (``sys.__stdout__`` / ``sys.__stderr__`` is
None) or is not open now is skipped.
"""

from __future__ import annotations

import atexit
import codecs
import os
import select
import sys
import warnings

from ._errors import PipesWarning
from ._protocol import (
    METHOD_LOG_EXTERNAL_STREAM,
    PARAM_EXTRAS,
    PARAM_STREAM,
    PARAM_TEXT,
    STREAM_STDERR,
    STREAM_STDOUT,
    dumps_message,
)

# `typing` is not imported at run time: it costs start-up time and every annotation here is a string.
TYPE_CHECKING = False

if TYPE_CHECKING:
    import threading

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
# At close, how long to wait for end of file on the capture pipes once fds 1/2 are restored. EOF comes at once
# unless a grandchild still running holds a pipe; past this the pipes are drained as they are.
EOF_TIMEOUT_SECONDS = 1.0
# How long close waits for that final drain (it only takes longer if the original fd blocks writes).
DRAIN_TIMEOUT_SECONDS = 1.0
# The final drain of a pipe still held open takes at most this much, so a grandchild that keeps writing
# cannot hold close forever.
DRAIN_MAX_BYTES = 1 << 20

_STREAM_FDS = ((STREAM_STDOUT, 1), (STREAM_STDERR, 2))
# Control bytes: this process -> reader ("stop sending"), reader -> this process ("no more messages").
_STOP = b"S"
_DONE = b"D"


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


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``, waiting for room when ``fd`` is non-blocking (a shared file description)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            writable = select.poll()
            writable.register(fd, select.POLLOUT)
            writable.poll()


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class _Reader:
    """The forked reader process's loop (see the module docstring). Runs only in the reader; never returns
    normally: :func:`os._exit` ends it, so nothing of the parent (atexit hooks, buffers) runs twice."""

    def __init__(
        self,
        streams: list[tuple[str, int, int]],  # (stream, pipe read end, original fd to copy to)
        out_fd: int,  # where message lines go: the messages file itself, or the pipe to the parent's thread
        ctl_fd: int,
        status_fd: int,
        lock_fd: int,
        max_chars: int,
    ) -> None:
        self.streams = {read_fd: (stream, echo_fd) for stream, read_fd, echo_fd in streams}
        self.decoders = {read_fd: codecs.getincrementaldecoder("utf-8")("replace") for read_fd in self.streams}
        self.echoing = {read_fd: True for read_fd in self.streams}
        self.out_fd = out_fd
        self.ctl_fd = ctl_fd
        self.status_fd = status_fd
        self.lock_fd = lock_fd
        self.max_chars = max_chars
        self.sending = True

    def run(self) -> None:
        poller = select.poll()  # not select.select: our fds may be numbered past FD_SETSIZE
        for read_fd in self.streams:
            poller.register(read_fd, select.POLLIN)
        poller.register(self.ctl_fd, select.POLLIN)
        open_fds = set(self.streams)
        while open_fds:
            for fd, _ in poller.poll():
                if fd == self.ctl_fd:
                    request = os.read(fd, 64)
                    if _STOP in request:
                        self._drain_and_stop_sending(open_fds, poller)
                    if not request or _STOP in request:  # the parent is gone, or asked: no more control
                        poller.unregister(fd)
                    continue
                if fd not in open_fds:
                    continue
                data = os.read(fd, READ_BYTES)
                if data:
                    self._forward(fd, data)
                else:
                    self._eof(fd, poller, open_fds)
        self._stop_sending()

    def _forward(self, read_fd: int, data: bytes) -> None:
        if self.sending:
            text = self.decoders[read_fd].decode(data)
            if text:
                self._send(self.streams[read_fd][0], text)
        self._echo(read_fd, data)

    def _eof(self, read_fd: int, poller: select.poll, open_fds: set[int]) -> None:
        poller.unregister(read_fd)
        open_fds.discard(read_fd)
        if self.sending:
            text = self.decoders[read_fd].decode(b"", final=True)  # a cut-off multibyte char becomes U+FFFD
            if text:
                self._send(self.streams[read_fd][0], text)
        os.close(read_fd)
        os.close(self.streams[read_fd][1])  # the original stream sees its end once the reader is done with it

    def _drain_and_stop_sending(self, open_fds: set[int], poller: select.poll) -> None:
        """Send what the pipes hold now (at most DRAIN_MAX_BYTES), then stop sending."""
        drained = 0
        for read_fd in sorted(open_fds):
            os.set_blocking(read_fd, False)
            try:
                while drained < DRAIN_MAX_BYTES:
                    try:
                        data = os.read(read_fd, READ_BYTES)
                    except BlockingIOError:
                        break
                    if not data:
                        self._eof(read_fd, poller, open_fds)
                        break
                    drained += len(data)
                    self._forward(read_fd, data)
            finally:
                if read_fd in open_fds:
                    os.set_blocking(read_fd, True)
        for read_fd in open_fds:
            text = self.decoders[read_fd].decode(b"", final=True)
            if text and self.sending:
                self._send(self.streams[read_fd][0], text)
        self._stop_sending()

    def _send(self, stream: str, text: str) -> None:
        try:
            for start in range(0, len(text), self.max_chars):
                params = {PARAM_STREAM: stream, PARAM_TEXT: text[start : start + self.max_chars], PARAM_EXTRAS: {}}
                _write_all(self.out_fd, (dumps_message(METHOD_LOG_EXTERNAL_STREAM, params) + "\n").encode())
        except OSError:  # the channel is gone (e.g. the parent's forwarding thread): keep copying output
            self._stop_sending()

    def _stop_sending(self) -> None:
        """No message after this; release the messages file (and its lock), then tell the parent."""
        if not self.sending:
            return
        self.sending = False
        for fd in (self.out_fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)
        try:
            os.write(self.status_fd, _DONE)
        except OSError:  # the parent is gone: nobody to tell
            pass

    def _echo(self, read_fd: int, data: bytes) -> None:
        if not self.echoing[read_fd]:
            return
        try:
            _write_all(self.streams[read_fd][1], data)
        except OSError:  # the original destination is gone (e.g. EPIPE): keep capturing regardless
            self.echoing[read_fd] = False


def _close_all_but(keep: set[int]) -> None:
    """Close every fd of this (reader) process except ``keep``."""
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = []
        low = 0
        for fd in sorted(keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 65536)
    for fd in open_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the fd listdir itself used
                pass


def _fork_reader(reader: _Reader, keep: set[int]) -> None:
    """Start ``reader`` in a detached process.

    The intermediate child calls ``setsid()``, forks the reader and exits at once; it is reaped here, so once
    this returns the reader is not a child of this process (``os.wait()`` in user code never sees it).

    Raises:
        OSError: a fork failed.
    """
    with warnings.catch_warnings():  # Python 3.12+ warns about fork() with threads: the reader uses none
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # intermediate child
        code = 1
        try:
            os.setsid()
            if os.fork() == 0:
                _close_all_but(keep)
                reader.run()
            code = 0
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # SIGCHLD ignored in this process: the child was reaped by the kernel
        status = 0
    if status != 0:
        raise OSError(f"stdio capture: the reader process could not be started (wait status {status})")


class _Forwarder:
    """For channels the reader cannot write to itself: a thread of this process that takes the reader's
    message lines from a pipe and writes them to the channel."""

    def __init__(self, read_fd: int, channel: PipesMessageWriterChannel) -> None:
        import threading  # only for these channels: the file channel needs no thread

        self._read_fd = read_fd
        self._channel = channel
        self._lock = threading.Lock()
        self._sending = True
        self.error: BaseException | None = None
        self._thread: threading.Thread = threading.Thread(target=self._run, name="pipes-stdio-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        try:
            while data := os.read(self._read_fd, READ_BYTES):
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    self._write(line.decode("utf-8"))
        except BaseException as exc:  # pragma: no cover - a read failure on our own pipe
            self.error = exc
        finally:
            os.close(self._read_fd)

    def _write(self, line: str) -> None:
        with self._lock:
            if not self._sending:
                return
            try:
                self._channel.write_line(line)
            except Exception as exc:  # the channel is broken: drop messages, keep the reader unblocked
                self.error = exc
                self._sending = False

    def finish(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for every line the reader sent, then send nothing more."""
        self._thread.join(timeout)
        with self._lock:
            self._sending = False


class PipesStdioCapture:
    """Forwards fd 1 and fd 2 as ``log_external_stream`` messages on ``channel``; see the module docstring.

    Use ``start()`` and ``close()``, or ``with PipesStdioCapture(channel):``. ``close`` is idempotent. It is
    also registered with :mod:`atexit` while the capture runs, so a process that never closes its context
    still gets its fds back, and its last output still reaches the real stdout/stderr.

    Args:
        channel: where the messages go (any thread may write to it; channels are thread-safe). A channel with
            :meth:`~pipes_ext._writers.PipesMessageWriterChannel.shared_append_target` (the file channel) is
            written by the reader process directly, which is what makes messages survive a SIGKILL.
        max_message_chars: the longest text one message carries.
        eof_timeout_seconds: how long ``close`` waits for end of file on the pipes.
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
        self._restore: list[tuple[int, int]] = []  # (fd, duplicate of its original, to restore it)
        self._streams: list[str] = []
        self._ctl_fd = -1
        self._status_fd = -1
        self._forwarder: _Forwarder | None = None
        self._started = False
        self._closed = False
        self._pid = os.getpid()

    @property
    def streams(self) -> list[str]:
        """The streams being captured (empty before start, on an unsupported platform, or without fds)."""
        return list(self._streams)

    def start(self) -> PipesStdioCapture:
        """Start capturing fd 1 and fd 2 (those that are open). A second call does nothing.

        Raises:
            OSError: when a pipe, fd or the reader process cannot be created; what was set up is undone first.
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
        _flush_python_streams()  # output buffered before the capture goes where it was going
        opened: list[int] = []  # fds of this process to close once the reader has its copies

        def pipe() -> tuple[int, int]:
            read_fd, write_fd = os.pipe()  # both non-inheritable: children get only fds 1/2
            opened.extend((read_fd, write_fd))
            return read_fd, write_fd

        try:
            pipes = [(stream, fd, *pipe()) for stream, fd in targets]
            ctl_r, self._ctl_fd = pipe()
            self._status_fd, status_w = pipe()
            opened.remove(self._ctl_fd)
            opened.remove(self._status_fd)
            lock_fd = -1
            target = self._channel.shared_append_target()
            if target is not None:
                out_fd, path = target
                lock_fd = _lock_for_reader(path)
                if lock_fd >= 0:
                    opened.append(lock_fd)
                forward_r = -1
            else:
                forward_r, out_fd = pipe()
                opened.remove(forward_r)
            reader = _Reader(
                [(stream, read_fd, fd) for stream, fd, read_fd, _ in pipes],
                out_fd, ctl_r, status_w, lock_fd, self._max_message_chars,
            )
            keep = {read_fd for _, _, read_fd, _ in pipes} | {fd for _, fd in targets}
            keep |= {out_fd, ctl_r, status_w} | ({lock_fd} if lock_fd >= 0 else set())
            _fork_reader(reader, keep)
            if forward_r >= 0:
                self._forwarder = _Forwarder(forward_r, self._channel)
            for stream, fd, _, write_fd in pipes:
                restore_fd = os.dup(fd)
                try:
                    os.dup2(write_fd, fd)  # inheritable, as fds 1/2 must be
                except BaseException:
                    os.close(restore_fd)
                    raise
                self._restore.append((fd, restore_fd))
                self._streams.append(stream)
        except BaseException:
            for fd in opened:
                os.close(fd)
            opened.clear()
            self._closed_started_capture()
            raise
        finally:
            for fd in opened:  # the reader holds its own copies now
                os.close(fd)
        atexit.register(self.close)
        return self

    def _closed_started_capture(self) -> None:
        """Undo a partial start: restore the fds and let the reader (if any) see end of file."""
        self._closed = True
        for fd, restore_fd in self._restore:
            os.dup2(restore_fd, fd)
            os.close(restore_fd)
        self._restore = []
        for fd in (self._ctl_fd, self._status_fd):
            if fd >= 0:
                os.close(fd)
        self._ctl_fd = self._status_fd = -1

    def close(self) -> None:
        """Restore fds 1/2, wait for the pipes to drain, and stop sending; see the module docstring."""
        if not self._started or self._closed:
            return
        if os.getpid() != self._pid:
            # A forked child (e.g. at its atexit): its fds 1/2 still feed the parent's pipes, which the
            # parent's reader reads; this copy of the capture is not this process's to close.
            return
        self._closed = True
        atexit.unregister(self.close)
        _flush_python_streams()
        try:
            for fd, restore_fd in self._restore:
                try:
                    os.dup2(restore_fd, fd)  # closes the pipe's write end held by fd
                finally:
                    os.close(restore_fd)
        finally:
            self._restore = []
            self._wait_for_reader()
        if self._forwarder is not None and self._forwarder.error is not None:
            warnings.warn(f"stdio capture stopped sending messages: {self._forwarder.error!r}",
                          PipesWarning, stacklevel=2)

    def _wait_for_reader(self) -> None:
        if self._status_fd < 0:
            return
        try:
            if not _wait_readable(self._status_fd, self._eof_timeout):
                try:
                    os.write(self._ctl_fd, _STOP)
                except OSError:  # the reader is gone
                    pass
                _wait_readable(self._status_fd, DRAIN_TIMEOUT_SECONDS)
            if self._forwarder is not None:
                self._forwarder.finish(DRAIN_TIMEOUT_SECONDS)
        finally:  # even when interrupted: nothing may be sent after close
            if self._forwarder is not None:
                self._forwarder.finish(0)
            for fd in (self._ctl_fd, self._status_fd):
                os.close(fd)
            self._ctl_fd = self._status_fd = -1

    def __enter__(self) -> PipesStdioCapture:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _lock_for_reader(path: str) -> int:
    """A new descriptor of the messages file holding a shared ``flock``, for the reader process: the
    orchestrator's file reader waits until no such lock is held before its final drain. -1 if unavailable."""
    try:
        import fcntl

        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (ImportError, OSError):
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return -1
    return fd
