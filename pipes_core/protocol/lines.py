"""Cutting a byte stream into lines, with a bound on a line's size: the one splitter of every line reader.

:class:`LineSplitter` is fed blocks of bytes as a reader gets them (a file it follows, a pipe, a log stream) and
hands complete lines on. Blocks of many short lines go on whole (for messages: one decode per block, the fast
path). A line that spans blocks is gathered in one growing buffer, decoded once and the buffer dropped before
the line is parsed, so a long line under the limit costs about its size in bytes plus its text while it is
decoded, then its text plus what it parses into. A line that grows past ``max_line_bytes`` is skipped as it
streams: its bytes are dropped as they arrive (only its first :data:`ISSUE_EXCERPT_BYTES` are kept for the
issue), it is reported with its size once its newline comes (``LINE_TOO_LONG``), and the next line is read as
usual. The file reader uses it as it is (every line is a message); the stdio reader
(:mod:`pipes_core.channels.stdio`) subclasses it to tell messages from the process's output, which it forwards, an
over-long output line included, as it streams.
"""

from __future__ import annotations

from typing import Protocol

from pipes_core.protocol.results import ISSUE_EXCERPT_BYTES
from pipes_ext._errors import PipesProtocolErrorKind, PipesUsageError

__all__ = ["LineSplitter", "LineSink", "DEFAULT_MAX_LINE_BYTES"]


class LineSink(Protocol):
    """What a :class:`LineSplitter` hands its lines to: :class:`pipes_core.protocol.handler.PipesMessageHandler` (named
    by its methods here so that the splitter, below the handler, does not import it)."""

    def handle_line(self, line: str | bytes, source: str = "") -> None: ...

    def handle_lines(self, data: bytes, source: str = "") -> None: ...

    def report_line_too_long(
        self, head: bytes | bytearray | memoryview, size: int, source: str, max_line_bytes: int, *, ended: bool = True
    ) -> None: ...

    def report_issue(
        self, reason: str, raw: str | bytes, source: str = ..., kind: PipesProtocolErrorKind = ..., *,
        size: int | None = ..., handled: bool = ...,
    ) -> None: ...

# The default bound on one message line. 64 MiB is the cap on a decoded bootstrap value too: far more than any
# message a control channel should carry (large data belongs in storage, referenced from a message), and small
# enough that a line under it costs a bounded ~2x its size while it is handled. Readers take ``max_line_bytes``
# to change it (``pipes run --max-line-bytes``).
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024

_BLANK = b" \t\r"  # JSON whitespace (a line of other whitespace is not blank: the handler reports it)


def _is_blank(line: bytearray) -> bool:
    """Whether ``line`` is JSON whitespace only, without copying it (``strip`` would copy a long line)."""
    return not line or (line[0] in _BLANK and line[-1] in _BLANK and not line.strip(_BLANK))


def check_max_line_bytes(value: object) -> int:
    """``value`` as a line limit: the one check of ``max_line_bytes``, made where a reader takes it (every reader's
    splitter then trusts it)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PipesUsageError(f"max_line_bytes must be a positive integer, got {value!r}")
    return value


class LineSplitter:
    """Cuts a stream of bytes into lines for ``handler``; see the module docstring. Not thread-safe: one splitter
    per stream.

    This class is the one place where a stream is cut into lines: where a line begun in one block ends in a
    later one, where a line passes ``max_line_bytes`` and is skipped (or passed through) as it streams, what is
    left at the end. What a line *is* is decided by the hooks, which the file reader uses as they are (every
    line is a message) and the stdio reader overrides (a line is a message or the process's output):

    * :meth:`_complete_lines`: a block of complete lines, each ending with its newline;
    * :meth:`_line_ended`: one line gathered across blocks (at most ``max_line_bytes``, newline excluded);
    * :meth:`_overflow`: a line grew past the limit: skip it (reported when it ends) or pass it through
      (:meth:`_pass` then gets its bytes as they arrive, its newline included);
    * :meth:`_last_line`: the stream ended inside a line, within the limit.

    Args:
        handler: receives the lines (``handle_lines``/``handle_line``) and the issues.
        source: where the bytes come from, for issues (a path, ``"stdout"``).
        max_line_bytes: the longest line parsed, newline excluded; longer ones are skipped and reported.
    """

    def __init__(self, handler: LineSink, source: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.handler = handler
        self.source = source
        self.max_line_bytes = max_line_bytes
        self._pending = bytearray()  # the start of a line that has not ended yet
        self._skipping = False  # the current line is over the limit: its bytes are counted, not kept
        self._passing = False  # the current line is over the limit and passed through as it streams
        self._skipped = 0
        self._skipped_head = b""
        self.lines_skipped = 0
        self.bytes_read = 0

    def feed(self, block: bytes) -> None:
        """Take the next bytes of the stream; every line they complete is handled before this returns."""
        self.bytes_read += len(block)
        cut = block.rfind(b"\n")
        if cut < 0:
            self._extend(block)
            return
        start = 0
        if self._pending or self._skipping or self._passing:  # the first newline ends a line begun earlier
            first = block.find(b"\n")
            if self._passing:
                self._passing = False
                self._pass(block[: first + 1])
            else:
                self._extend(memoryview(block)[:first])
                self._end_line()
            start = first + 1
        if start <= cut:
            self._complete_lines(block[start : cut + 1])
        if cut + 1 < len(block):
            self._extend(memoryview(block)[cut + 1 :])

    def finish(self) -> None:
        """The stream has ended: a last line without its newline goes to :meth:`_last_line` (or is reported as
        too long, with ``ended=False``)."""
        if self._skipping:
            self._report_skipped(ended=False)
        elif self._passing:
            self._passing = False
        else:
            buffer = self._pending
            self._pending = bytearray()
            self._last_line(buffer)

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished line held in memory (never more than ``max_line_bytes``)."""
        return len(self._pending)

    def _extend(self, data: bytes | memoryview) -> None:
        if self._skipping:
            self._skipped += len(data)
            return
        if self._passing:
            self._pass(bytes(data))
            return
        if len(self._pending) + len(data) <= self.max_line_bytes:
            self._pending += data
            return
        # Past the limit: the line is skipped (its start kept for the issue) or passed through; either way the
        # bytes held so far are dropped now, and so is every later byte of this line.
        pending = self._pending
        self._pending = bytearray()
        if not self._overflow(pending, data):
            self._passing = True
            return
        self._skipping = True
        self._skipped = len(pending) + len(data)
        self._skipped_head = (bytes(pending[:ISSUE_EXCERPT_BYTES]) + bytes(data[:ISSUE_EXCERPT_BYTES]))[
            :ISSUE_EXCERPT_BYTES
        ]

    def _end_line(self) -> None:
        if self._skipping:
            self._report_skipped(ended=True)
            return
        if self._passing:
            self._passing = False
            self._pass(b"\n")
            return
        buffer = self._pending
        self._pending = bytearray()
        self._line_ended(buffer)

    def _report_skipped(self, *, ended: bool) -> None:
        self.handler.report_line_too_long(self._skipped_head, self._skipped, self.source, self.max_line_bytes,
                                          ended=ended)
        self.lines_skipped += 1
        self._skipping = False
        self._skipped = 0
        self._skipped_head = b""

    # ------------------------------------------------------------------ hooks: what a line is (messages here)

    def _complete_lines(self, block: bytes) -> None:
        """A block of complete lines, each ending with a newline (the fast path: one decode per block). Lines are
        cut here, once: a line over ``max_line_bytes`` is reported (``LINE_TOO_LONG``) and not parsed; the lines
        around it go to the handler in blocks."""
        limit = self.max_line_bytes
        if len(block) <= limit:  # no line in it can be too long
            self.handler.handle_lines(block, self.source)
            return
        start = run = 0
        end = len(block)
        while start < end:
            cut = block.find(b"\n", start)  # every line of the block ends with its newline
            if cut - start > limit:
                if run < start:
                    self.handler.handle_lines(block[run:start], self.source)
                self.handler.report_line_too_long(memoryview(block)[start:cut], cut - start, self.source, limit)
                run = cut + 1
            start = cut + 1
        if run < end:
            self.handler.handle_lines(block[run:end], self.source)

    def _line_ended(self, buffer: bytearray) -> None:
        """One line gathered across blocks, newline excluded; the splitter keeps no reference to ``buffer``."""
        if _is_blank(buffer):
            return
        try:
            text: str | bytes = buffer.decode("utf-8")
        except UnicodeDecodeError:
            text = bytes(buffer)
        buffer.clear()  # the bytes go before the text is parsed: a long line costs its text, not text + bytes
        self.handler.handle_line(text, self.source)

    def _overflow(self, pending: bytearray, data: bytes | memoryview) -> bool:
        """The line that began with ``pending`` grew past ``max_line_bytes`` with ``data``: True to skip it (it is
        reported with its size when it ends), False to pass it through (forward ``pending + data`` here; the
        rest of the line then goes to :meth:`_pass`)."""
        return True

    def _pass(self, data: bytes) -> None:
        """Bytes of a line passed through (see :meth:`_overflow`); the last call gets its newline."""

    def _last_line(self, buffer: bytearray) -> None:
        """The stream ended inside a line (``buffer``, possibly empty). A message line without its newline is
        reported, not parsed: its writer may have been killed mid-write, and nothing says it is complete."""
        if _is_blank(buffer):
            return
        self.handler.report_issue(
            "truncated final line: the messages ended without a newline (was the writer killed mid-write?); "
            "the partial line was not parsed",
            bytes(buffer[:ISSUE_EXCERPT_BYTES]),
            self.source,
            PipesProtocolErrorKind.TRUNCATED,
            size=len(buffer),
        )
