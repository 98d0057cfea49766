"""Message writers: where the external process writes its messages.

A writer turns the messages params into an open channel; a channel takes one serialised message (a JSON line
without its newline) per :meth:`PipesMessageWriterChannel.write_line` call.

Channels chosen by :class:`PipesDefaultMessageWriter`, by the first key present in the params:

* ``path``: the file is opened once in append mode and kept open; each message is one ``os.write`` of the
  whole line with its newline (looped only if the OS writes part of it, under a lock), so lines never split
  or interleave between threads, and a message has been handed to the OS when the call returns: a SIGKILL
  right after loses nothing.
* ``stdio``: ``sys.stdout`` or ``sys.stderr``, flushed after every message.
* ``buffered_stdio``: kept in memory and written at close (for log collectors that keep only the end of the output).
"""

from __future__ import annotations

import _thread  # the lock alone: `threading` costs start-up time the file channel does not need
import errno
import os
import stat
import sys

from ._errors import PipesProtocolError, PipesTransportError
from ._errors import PipesProtocolErrorKind as _Kind
from ._protocol import (
    PARAM_BUFFERED_STDIO,
    PARAM_PATH,
    PARAM_STDIO,
    STREAM_STDERR,
    STREAM_STDOUT,
    STREAMS,
)

# `typing` is not imported at run time: it costs start-up time and every annotation here is a string.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO, Any, ClassVar

__all__ = [
    "PipesMessageWriter",
    "PipesMessageWriterChannel",
    "PipesDefaultMessageWriter",
    "PipesFileMessageWriterChannel",
    "PipesStreamMessageWriterChannel",
    "PipesBufferedStreamMessageWriterChannel",
    "PipesInMemoryMessageWriter",
    "PipesInMemoryMessageWriterChannel",
    "PipesDiscardMessageWriterChannel",
]


class PipesMessageWriterChannel:
    """Base class of an open channel."""

    # True when the channel writes to this process's own stdout/stderr: stdio capture
    # (``include_stdio_in_messages``) is then not started, as it would capture the channel's own messages.
    writes_to_stdio: ClassVar[bool] = False

    def write_line(self, line: str) -> None:
        """Send one serialised message (no trailing newline)."""
        raise NotImplementedError

    def shared_append_target(self) -> tuple[int, str] | None:
        """``(fd, path)`` when another process may send messages by appending whole lines to ``fd`` (one
        ``write`` per line, ``O_APPEND``): the stdio capture's reader process then writes there itself, so its
        messages survive this process being killed. None (the default): only this process writes."""
        return None

    def close(self) -> None:
        """Flush what is buffered and release the channel. Idempotent."""

    def __enter__(self) -> PipesMessageWriterChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PipesMessageWriter:
    """Base class: ``open(params)`` returns a channel for the messages params."""

    def open(self, params: Mapping[str, Any]) -> PipesMessageWriterChannel:
        raise NotImplementedError

    def get_opened_extras(self) -> dict[str, Any]:
        """Extras sent in the ``opened`` message (empty by default)."""
        return {}


_OPEN_ERRORS = {
    errno.ELOOP: "it is a symbolic link; refusing to follow it",
    errno.ENXIO: "it is a FIFO (no reader); only a regular file is accepted",
    errno.EISDIR: "it is a directory",
}


class PipesFileMessageWriterChannel(PipesMessageWriterChannel):
    """Appends one line per message to a file kept open; see the module docstring for the guarantees."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path
        self._lock = _thread.allocate_lock()

    @classmethod
    def open_path(cls, path: str) -> PipesFileMessageWriterChannel:
        """Open ``path`` for appending (created 0600 if missing). Only a regular file is accepted: the open is
        non-blocking (a FIFO without a reader does not hang it) and does not follow a symbolic link, and a FIFO,
        device or directory is refused with :class:`PipesTransportError`."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            reason = _OPEN_ERRORS.get(exc.errno or 0) or exc.strerror or str(exc)
            raise PipesTransportError(f"cannot open the messages file {path!r}: {reason}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PipesTransportError(f"the messages file {path!r} is not a regular file; refusing to write to it")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def shared_append_target(self) -> tuple[int, str] | None:
        return None if self._fd < 0 else (self._fd, self.path)

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode()
        with self._lock:
            if self._fd < 0:
                raise PipesTransportError(f"messages file {self.path!r} is closed")
            try:
                written = os.write(self._fd, data)
                if written < len(data):  # rare on a regular file: finish the line before anyone else writes
                    view = memoryview(data)
                    while written < len(data):
                        written += os.write(self._fd, view[written:])
            except OSError as exc:
                raise PipesTransportError(f"cannot write to the messages file {self.path!r}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)


def _stream(name: str) -> IO[str]:
    return sys.stdout if name == STREAM_STDOUT else sys.stderr


class PipesStreamMessageWriterChannel(PipesMessageWriterChannel):
    """Writes each message as a line to a text stream and flushes it."""

    writes_to_stdio = True

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = _thread.allocate_lock()

    def write_line(self, line: str) -> None:
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class PipesBufferedStreamMessageWriterChannel(PipesMessageWriterChannel):
    """Keeps every message in memory and writes them all, one per line, at close."""

    writes_to_stdio = True

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._closed = False

    def write_line(self, line: str) -> None:
        self._lines.append(line)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._lines:
            self._stream.write("".join(line + "\n" for line in self._lines))
            self._stream.flush()
        self._lines = []


class PipesDefaultMessageWriter(PipesMessageWriter):
    """Chooses the channel from the params: ``path``, then ``stdio``, then ``buffered_stdio``."""

    def open(self, params: Mapping[str, Any]) -> PipesMessageWriterChannel:
        if PARAM_PATH in params:
            path = params[PARAM_PATH]
            if not isinstance(path, str):
                raise PipesProtocolError(f'messages params "{PARAM_PATH}" must be a string', _Kind.BAD_MESSAGES_PARAMS)
            return PipesFileMessageWriterChannel.open_path(path)
        for key, channel in ((PARAM_STDIO, PipesStreamMessageWriterChannel),
                             (PARAM_BUFFERED_STDIO, PipesBufferedStreamMessageWriterChannel)):
            if key in params:
                if params[key] not in STREAMS:
                    raise PipesProtocolError(
                        f'messages params "{key}" must be "{STREAM_STDOUT}" or "{STREAM_STDERR}", '
                        f"got {params[key]!r}", _Kind.BAD_MESSAGES_PARAMS
                    )
                return channel(_stream(params[key]))
        raise PipesProtocolError(
            f'messages params name no channel this writer knows: expected one of "{PARAM_PATH}", '
            f'"{PARAM_STDIO}", "{PARAM_BUFFERED_STDIO}" (got keys: {sorted(params)}); a blob-store channel '
            "needs its own writer, e.g. pipes_ext.s3.PipesS3MessageWriter",
            _Kind.BAD_MESSAGES_PARAMS,
        )


class PipesInMemoryMessageWriterChannel(PipesMessageWriterChannel):
    """Keeps the lines it is given; see :class:`PipesInMemoryMessageWriter`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_line(self, line: str) -> None:
        self.lines.append(line)


class PipesInMemoryMessageWriter(PipesMessageWriter):
    """A test double: every message is kept in memory, decoded, in :attr:`messages`."""

    def __init__(self) -> None:
        self.channel = PipesInMemoryMessageWriterChannel()

    def open(self, params: Mapping[str, Any]) -> PipesMessageWriterChannel:
        return self.channel

    @property
    def messages(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(line) for line in self.channel.lines]


class PipesDiscardMessageWriterChannel(PipesMessageWriterChannel):
    """Drops every message: the channel of the local context outside an orchestrated run."""

    def write_line(self, line: str) -> None:
        return None
