"""``PipesStdioMessageReader``: messages interleaved with a process's own output on one stream of lines.

The external side's ``stdio`` channel (``{"stdio": "stdout"}``) writes each message as one JSON line on its
stdout (or stderr). Whatever carries those lines to us (a pipe, a container's log stream, a job's log stream)
also carries the process's own output. This reader cuts that stream into lines: a line whose first
non-blank byte is ``{`` and which contains ``"__dagster_pipes_version"`` is a message and goes to the
handler; every other line is the process's output and is forwarded, in order, to where the caller says
(by default this process's own stdout or stderr, matching the stream read). A message glued to the end of
output that did not finish its line (``50%{"__dagster_pipes_version": ...``) is split off: the output part is
forwarded, the rest handled as a message.

A source is either a binary file-like object (read with ``read1``/``read``: a pipe, a socket file, an HTTP
response) or an iterable of byte chunks (``docker``'s ``logs(stream=True)``, Ray's ``tail_job_logs`` turned
into bytes; ``str`` chunks are encoded as UTF-8). Chunks may cut lines anywhere. At the end of the source a
last line without a newline is still handled: a complete message is accepted, anything that fails to parse is
reported as a truncated line (the writer was probably killed mid-write), other output is forwarded as is.

Robustness, as for the file reader: a bad line becomes a protocol issue and reading goes on; a message line
longer than ``max_line_bytes`` is skipped as it streams (never buffered whole) and reported with its size; an
output line longer than that is forwarded in pieces, so output is never lost and memory stays bounded.

Use: open a session with this reader, launch the process, then hand its stream to :meth:`consume` (a
background thread) or :meth:`read_source` (in the calling thread). Leaving the session waits (up to
``drain_timeout_seconds``) for every consumed source to reach its end. :class:`pipes_core.PipesClient`
launchers do all of this for you.
"""

from __future__ import annotations

import codecs
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from pipes_core.channels.readers import PipesMessageReader
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_core.protocol.lines import (  # one home for lines, their limit and the excerpt size
    DEFAULT_MAX_LINE_BYTES,
    LineSplitter,
    check_max_line_bytes,
)
from pipes_core.protocol.results import ISSUE_EXCERPT_BYTES
from pipes_ext._errors import PipesProtocolErrorKind, PipesTransportError, PipesUsageError
from pipes_ext._protocol import (
    PARAM_STDIO,
    PIPES_PROTOCOL_VERSION_FIELD,
    STREAM_STDERR,
    STREAM_STDOUT,
    parse_message_line,
)

__all__ = [
    "PipesStdioMessageReader",
    "PipesByteSource",
    "PipesOutputTarget",
    "DEFAULT_MAX_LINE_BYTES",
    "STDIO_DRAIN_SECONDS",
    "STDIO_READ_BYTES",
    "ISSUE_EXCERPT_BYTES",
    "as_output_writer",
]

# After the process has ended, how long its output stream may take to reach its end (a background process
# it left behind may hold a pipe open; a log stream may lag).
STDIO_DRAIN_SECONDS = 5.0
# One read from a file-like source takes at most this much.
STDIO_READ_BYTES = 64 * 1024

_MARKER = f'"{PIPES_PROTOCOL_VERSION_FIELD}"'.encode()

PipesByteSource = IO[bytes] | Iterable[bytes] | Iterable[str]
"""A stream of output: a binary file-like object, or an iterable of byte (or text) chunks."""

PipesOutputTarget = Callable[[bytes], Any] | IO[Any]
"""Where non-message output goes: a callable taking raw bytes, or a text or binary file object."""


def as_output_writer(target: PipesOutputTarget) -> Callable[[bytes], None]:
    """A ``write(bytes)`` callable for ``target`` (a callable, a binary file, or a text file; text files with
    a ``buffer`` get the raw bytes, others decoded UTF-8 incrementally so a character cut between two writes
    is not mangled). Every write is flushed."""
    if not hasattr(target, "write"):
        if not callable(target):
            raise PipesUsageError(f"output must be a callable or a file object, got {type(target).__name__}")
        call = target

        def write_call(data: bytes) -> None:
            call(data)

        return write_call
    stream: IO[Any] = target  # type: ignore[assignment]
    binary = getattr(stream, "buffer", None)
    if binary is None and "b" in getattr(stream, "mode", ""):
        binary = stream
    if binary is not None:
        raw: IO[bytes] = binary

        def write_binary(data: bytes) -> None:
            stream_flush = getattr(stream, "flush", None)
            if stream is not raw and stream_flush is not None:
                stream_flush()  # text written earlier to the wrapper goes first
            raw.write(data)
            raw.flush()

        return write_binary
    decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def write_text(data: bytes) -> None:
        stream.write(decoder.decode(data))
        stream.flush()

    return write_text


def close_quietly(source: object) -> None:
    """``source.close()`` when it has one; a failure to close what was read to its end is not worth an error."""
    close = getattr(source, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def _chunks(source: PipesByteSource) -> Iterator[bytes]:
    read = getattr(source, "read1", None) or getattr(source, "read", None)
    if read is not None:
        while True:
            block = read(STDIO_READ_BYTES)
            if not block:
                return
            yield block.encode("utf-8") if isinstance(block, str) else block
    for chunk in source:
        if chunk:
            yield chunk.encode("utf-8") if isinstance(chunk, str) else chunk


_GLUED_START = b"{" + _MARKER


def _is_message(line: bytes) -> bool:
    return _MARKER in line and line.lstrip()[:1] == b"{"


def _split_glued(line: bytes) -> tuple[bytes, bytes]:
    """``(output, message)``: a message written right after output that did not end its line
    (``progress 50%{"__dagster_pipes_version": ...}``) is split off; otherwise ``(line, b"")``."""
    at = line.find(_GLUED_START)
    if at <= 0:
        return line, b""
    return line[:at], line[at:]


class _StdioLineSplitter(LineSplitter):
    """The stdio reader's :class:`~pipes_core.protocol.lines.LineSplitter`: the same cutting into lines, limit and end
    of stream; each line is then a message (to the handler) or the process's output (to ``output``, in order,
    bytes unchanged). An over-long message line is skipped and reported; an over-long output line is passed
    through as it streams. Not thread-safe: one splitter per source."""

    def __init__(self, handler: PipesMessageHandler, output: Callable[[bytes], None] | None, source: str,
                 max_line_bytes: int) -> None:
        super().__init__(handler, source, max_line_bytes)
        self.output = output

    def _out(self, data: bytes) -> None:
        if data and self.output is not None:
            self.output(data)

    def _complete_lines(self, block: bytes) -> None:
        """Complete lines, each ending with a newline."""
        if _MARKER not in block:  # the common case for plain output: one write
            self._out(block)
            return
        output: list[bytes] = []
        start = 0
        size = len(block)
        while start < size:
            end = block.index(b"\n", start) + 1
            line = block[start:end]
            start = end
            if not _is_message(line):
                line_out, line = _split_glued(line)
                output.append(line_out)
                if not line:
                    continue
            if output:
                self._out(b"".join(output))
                output = []
            body = line.rstrip(b"\r\n")
            if len(body) > self.max_line_bytes:
                self.handler.report_line_too_long(body[:ISSUE_EXCERPT_BYTES], len(body), self.source,
                                                  self.max_line_bytes)
            else:
                self.handler.handle_line(body, self.source)
        if output:
            self._out(b"".join(output))

    def _line_ended(self, buffer: bytearray) -> None:
        buffer += b"\n"
        line = bytes(buffer)
        buffer.clear()
        self._complete_lines(line)

    def _overflow(self, pending: bytearray, data: bytes | memoryview) -> bool:
        head = bytes(pending) + bytes(data)
        if _is_message(head):
            return True
        self._out(head)
        return False

    def _pass(self, data: bytes) -> None:
        self._out(data)

    def _last_line(self, buffer: bytearray) -> None:
        """A last line without a newline: output is forwarded as is, a complete message is accepted (the stdio
        channel's writer may end without a newline), anything else that looks like a message is reported."""
        if not buffer:
            return
        rest = bytes(buffer)
        buffer.clear()
        if not _is_message(rest):
            prefix, rest = _split_glued(rest)
            self._out(prefix)
            if not rest:
                return
        body = rest.rstrip(b"\r")
        try:
            parse_message_line(body)
        except Exception:
            self.handler.report_issue(
                "truncated final line: the stream ended without a newline (was the writer killed mid-write?) and "
                "the partial line is not a valid message",
                body,
                self.source,
                PipesProtocolErrorKind.TRUNCATED,
            )
            return
        self.handler.handle_line(body, self.source)


class PipesStdioMessageReader(PipesMessageReader):
    """Reads messages from a stream of lines that also carries the process's own output (see module doc).

    Args:
        stream: which of its streams the external process writes messages to: ``"stdout"`` or ``"stderr"``.
        output: where the other lines go: a callable taking bytes, or a file object. Default: this
            process's ``sys.stdout`` (or ``sys.stderr`` for ``stream="stderr"``), looked up when reading starts.
            A client may override it per run (see :meth:`consume`).
        max_line_bytes: a message line longer than this is skipped and reported (see module doc).
        drain_timeout_seconds: when the session ends, how long to wait for each source to reach its end.

    One session at a time: using the instance in a second session while one is open raises
    :class:`PipesUsageError`.
    """

    def __init__(
        self,
        stream: str = STREAM_STDOUT,
        *,
        output: PipesOutputTarget | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        drain_timeout_seconds: float = STDIO_DRAIN_SECONDS,
    ) -> None:
        if stream not in (STREAM_STDOUT, STREAM_STDERR):
            raise PipesUsageError(f"stream must be {STREAM_STDOUT!r} or {STREAM_STDERR!r}, got {stream!r}")
        self.stream = stream
        self.output = output
        self.max_line_bytes = check_max_line_bytes(max_line_bytes)
        self.drain_timeout_seconds = drain_timeout_seconds
        self._lock = threading.Lock()
        self._handler: PipesMessageHandler | None = None
        self._threads: list[threading.Thread] = []
        self._errors: list[tuple[str, BaseException]] = []
        self.unfinished_sources = 0
        """After a session: how many consumed sources had not reached their end when it closed."""
        self.bytes_read = 0
        """After a session: bytes read from its sources."""

    def messages_params(self) -> dict[str, Any]:
        return {PARAM_STDIO: self.stream}

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        with self._lock:
            if self._handler is not None:
                raise PipesUsageError("this PipesStdioMessageReader is already reading for another session")
            self._handler = handler
            self._threads = []
            self._errors = []
            self.unfinished_sources = 0
            self.bytes_read = 0
        try:
            yield self.messages_params()
        finally:
            self._finish(handler)

    def _finish(self, handler: PipesMessageHandler) -> None:
        deadline = time.monotonic() + self.drain_timeout_seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = sum(thread.is_alive() for thread in self._threads)
        with self._lock:
            self.unfinished_sources = unfinished
            self._handler = None
            errors = list(self._errors)
        if unfinished:
            handler.logger.warning(
                "[pipes] the %s stream did not end within %.3g s of the process's end (a process left behind "
                "holding it?); messages after this point are lost", self.stream, self.drain_timeout_seconds,
            )
        if errors:
            name, error = errors[0]
            raise PipesTransportError(f"reading {name} failed: {type(error).__name__}: {error}") from error

    def _default_output(self) -> Callable[[bytes], None]:
        if self.output is not None:
            return as_output_writer(self.output)
        return as_output_writer(sys.stdout if self.stream == STREAM_STDOUT else sys.stderr)

    def read_source(self, source: PipesByteSource, *, output: Callable[[bytes], None] | None = None,
                    name: str | None = None) -> None:
        """Read ``source`` to its end in the calling thread (inside :meth:`read_messages`).

        ``output`` (a ``write(bytes)`` callable) overrides the reader's ``output`` for this source. A failure to
        read the source is raised again when the session ends, as :class:`PipesTransportError`; what was read
        before it is kept.
        """
        handler = self._handler
        if handler is None:
            raise PipesUsageError("read_source()/consume() must be called inside read_messages() (an open session)")
        label = name or f"the process's {self.stream}"
        splitter = _StdioLineSplitter(handler, output or self._default_output(), self.stream, self.max_line_bytes)
        try:
            for chunk in _chunks(source):
                splitter.feed(chunk)
        except Exception as exc:
            with self._lock:
                self._errors.append((label, exc))
        finally:
            try:
                splitter.finish()
            finally:
                with self._lock:
                    self.bytes_read += splitter.bytes_read
                close_quietly(source)

    def consume(self, source: PipesByteSource, *, output: Callable[[bytes], None] | None = None,
                name: str | None = None) -> None:
        """Start reading ``source`` on a background thread (see :meth:`read_source`); the session's end waits
        for it."""
        if self._handler is None:
            raise PipesUsageError("consume() must be called inside read_messages() (an open session)")
        thread = threading.Thread(target=self.read_source, args=(source,), kwargs={"output": output, "name": name},
                                  name=f"pipes-stdio-reader:{self.stream}", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def describe(self) -> str:
        return f"the stdio message reader (the process's {self.stream})"

    def no_messages_debug_text(self) -> str:
        return (f"Messages were expected as lines on the process's {self.stream} ({PARAM_STDIO} channel); check "
                f"that its {self.stream} reaches the orchestrator.")
