"""Cutting a byte stream into message lines, with a bound on a line's size.

:class:`LineSplitter` is fed blocks of bytes as a reader gets them (a file it follows, a pipe) and hands complete
lines to a :class:`~pipes_core.PipesMessageHandler`. Blocks of many short lines go to the handler whole (one
decode per block: the fast path). A line that spans blocks is gathered in one growing buffer, decoded once and
the buffer dropped before the line is parsed, so a long line under the limit costs about its size in bytes plus
its text while it is decoded, then its text plus what it parses into. A line that grows past ``max_line_bytes``
is skipped as it streams: its bytes are dropped as they arrive (only its first :data:`ISSUE_EXCERPT_BYTES`
are kept for the issue), it is reported with its size once its newline comes (``LINE_TOO_LONG``), and the next
line is read as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._results import ISSUE_EXCERPT_BYTES

if TYPE_CHECKING:
    from ._handler import PipesMessageHandler

__all__ = ["LineSplitter", "DEFAULT_MAX_LINE_BYTES"]

# The default bound on one message line. 64 MiB is the cap on a decoded bootstrap value too: far more than any
# message a control channel should carry (large data belongs in storage, referenced from a message), and small
# enough that a line under it costs a bounded ~2x its size while it is handled. Readers take ``max_line_bytes``
# to change it (``pipes run --max-line-bytes``).
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024

_BLANK = b" \t\r"  # JSON whitespace (a line of other whitespace is not blank: the handler reports it)


def _is_blank(line: bytearray) -> bool:
    """Whether ``line`` is JSON whitespace only, without copying it (``strip`` would copy a long line)."""
    return not line or (line[0] in _BLANK and line[-1] in _BLANK and not line.strip(_BLANK))


class LineSplitter:
    """Cuts a stream of bytes into lines for ``handler``; see the module docstring.

    Args:
        handler: receives the lines (``handle_lines``/``handle_line``) and the issues.
        source: where the bytes come from, for issues (a path, ``"stdout"``).
        max_line_bytes: the longest line parsed, newline excluded; longer ones are skipped and reported.
    """

    def __init__(self, handler: PipesMessageHandler, source: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
        self.handler = handler
        self.source = source
        self.max_line_bytes = max_line_bytes
        self._pending = bytearray()  # the start of a line that has not ended yet
        self._skipping = False  # the current line is over the limit: its bytes are counted, not kept
        self._skipped = 0
        self._skipped_head = b""
        self.lines_skipped = 0

    def feed(self, block: bytes) -> None:
        """Take the next bytes of the stream; every line they complete is handled before this returns."""
        cut = block.rfind(b"\n")
        if cut < 0:
            self._extend(block)
            return
        start = 0
        if self._pending or self._skipping:  # the first newline ends the line begun in an earlier block
            first = block.find(b"\n")
            self._extend(memoryview(block)[:first])
            self._end_line()
            start = first + 1
        if start < cut:
            self.handler.handle_lines(block[start:cut], self.source, self.max_line_bytes)
        if cut + 1 < len(block):
            self._extend(memoryview(block)[cut + 1 :])

    def finish(self) -> None:
        """The stream has ended: a last line without its newline is reported, not parsed (its writer may have
        been killed mid-write, and nothing says it is complete)."""
        if self._skipping:
            self.handler.report_line_too_long(self._skipped_head, self._skipped, self.source, self.max_line_bytes,
                                              ended=False)
            self._reset_skip()
        elif not _is_blank(self._pending):
            from pipes_ext._errors import PipesProtocolErrorKind

            self.handler.report_issue(
                "truncated final line: the messages ended without a newline (was the writer killed mid-write?); "
                "the partial line was not parsed",
                bytes(self._pending[:ISSUE_EXCERPT_BYTES]),
                self.source,
                PipesProtocolErrorKind.TRUNCATED,
                size=len(self._pending),
            )
        self._pending = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished line held in memory (never more than ``max_line_bytes``)."""
        return len(self._pending)

    def _extend(self, data: bytes | memoryview) -> None:
        if self._skipping:
            self._skipped += len(data)
            return
        if len(self._pending) + len(data) <= self.max_line_bytes:
            self._pending += data
            return
        # Past the limit: keep the start for the issue, drop the rest now and every later byte of this line.
        head = (bytes(self._pending) + bytes(data[:ISSUE_EXCERPT_BYTES]))[:ISSUE_EXCERPT_BYTES]
        self._skipping = True
        self._skipped = len(self._pending) + len(data)
        self._skipped_head = head
        self._pending = bytearray()

    def _end_line(self) -> None:
        if self._skipping:
            self.handler.report_line_too_long(self._skipped_head, self._skipped, self.source, self.max_line_bytes)
            self._reset_skip()
            return
        buffer = self._pending
        self._pending = bytearray()
        if _is_blank(buffer):
            return
        try:
            text: str | bytes = buffer.decode("utf-8")
        except UnicodeDecodeError:
            text = bytes(buffer)
        del buffer  # the bytes go before the text is parsed: a long line costs its text, not text + bytes
        self.handler.handle_line(text, self.source)

    def _reset_skip(self) -> None:
        self.lines_skipped += 1
        self._skipping = False
        self._skipped = 0
        self._skipped_head = b""
