"""How a failed run is put into words: each fact once, and nothing from the process that could drive a terminal.

:meth:`pipes_core.PipesClient.check` builds a headline (how the process ended, and why: the exception it reported,
else its last stderr line) and adds :func:`failure_details`: the reported traceback without the line the headline
already gave, then the output tail without the interpreter's printout of that same traceback and without the
quoted line. Everything quoted from the process goes through :func:`escape_controls`, which ``pipes run`` uses
too.
"""

from __future__ import annotations

import re

from pipes_core.protocol.results import PipesRemoteException

__all__ = ["ERROR_TAIL_CHARS", "ERROR_LINE_CHARS", "escape_controls", "excerpt_line", "last_line", "failure_details",
           "shows_traceback"]

# How much of the output tail an error message quotes.
ERROR_TAIL_CHARS = 4000
# How much of one line from the process (its last stderr line) an error message quotes: a headline stays one
# readable line in a terminal summary.
ERROR_LINE_CHARS = 300


# Characters that could drive a terminal or forge a line when text from the process is quoted in a message: C0
# and C1 controls (tab excepted), DEL, Unicode line/paragraph separators and bidirectional overrides; and lone
# surrogates (JSON's "\ud800" decodes to one), which no encoding can write: a print of one would fail.
_UNSAFE_CHARACTERS = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character escaped (``\\x1b``, ``\\u202e``); newlines too unless
    ``keep_newlines``. The one escaping of text from the process in messages and in ``pipes run`` output."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE_CHARACTERS.sub(escape, text)


def excerpt_line(line: str, limit: int = ERROR_LINE_CHARS) -> str:
    """A line from the process as a message quotes it: control characters escaped, at most ``limit``
    characters of it (its start, which names what went wrong), saying how long it was when cut."""
    if len(line) > limit:
        return f"{escape_controls(line[:limit])}... ({len(line)} characters)"
    return escape_controls(line)


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (a progress bar's ``\\r`` ends a line too), trailing whitespace
    removed; "" when there is none."""
    for line in reversed(re.split(r"\r\n|\r|\n", text)):
        if line.strip():
            return line.rstrip()
    return ""


def failure_details(remote: PipesRemoteException | None, tail: str, stated_line: str, *,
                     says_remote: bool) -> str:
    """What a failure message adds under its headline, each fact once: the reported traceback (without its
    last line when the headline ``says_remote``), then the output tail without what was already said: a
    printout of that same traceback, and the ``stated_line`` the headline quoted."""
    details = ""
    if remote is not None:
        reported = remote.format(last_summary=not says_remote)
        if reported.strip():
            details = "\n\nThe external process reported:\n" + reported.rstrip("\n")
    if not tail:
        return details
    lines = tail.replace("\r\n", "\n").split("\n")
    left_out = []
    if remote is not None:
        kept = _without_printed_traceback(lines, remote)
        if len(kept) < len(lines):
            left_out.append("the traceback above")
            lines = kept
    if stated_line:
        for index in range(len(lines) - 1, -1, -1):
            if lines[index].strip():
                if lines[index].rstrip() == stated_line:
                    del lines[index]
                    left_out.append("the line quoted above")
                break
    shown = "\n".join(lines)
    if not shown.strip():
        return details
    title = "Last output of the external process"
    if left_out:
        title += f" (without {' and '.join(left_out)})"
    return details + f"\n\n{title}:\n" + shown.strip("\n")[-ERROR_TAIL_CHARS:]


def shows_traceback(tail: str, remote: PipesRemoteException) -> bool:
    """Does the output ``tail`` hold the interpreter's printout of ``remote`` (so a reader has seen it)?"""
    lines = tail.replace("\r\n", "\n").split("\n")
    return len(_without_printed_traceback(lines, remote)) < len(lines)


_TRACEBACK_HEADER = "Traceback (most recent call last):"
_CHAIN_SEPARATORS = frozenset({
    "The above exception was the direct cause of the following exception:",
    "During handling of the above exception, another exception occurred:",
})


def _without_printed_traceback(lines: list[str], remote: PipesRemoteException) -> list[str]:
    """``lines`` of output without the interpreter's printout of ``remote`` (a Python process prints the
    traceback it reported when the exception leaves it).

    A printout ends with ``remote``'s message lines and runs back over frame lines (indented), its
    ``Traceback (most recent call last):`` header, and the chain before it (separators, the chained exceptions'
    messages and frames). It may have more frames than were reported (the exception went on up the stack after
    it was reported), and may start before the tail does (its first line cut). A line that is none of these
    ends it: the process's other output is kept.
    """
    end_block = [line.rstrip() for line in remote.message.rstrip("\n").split("\n")]
    if not end_block or not end_block[-1]:
        return lines
    known = {line.rstrip() for line in remote.format().split("\n") if line.strip()}
    known.update(line.rstrip() for line in _chain_messages(remote) for line in line.split("\n"))
    # Output the process left without a newline runs into the header: "50%Traceback (most recent call last):".
    lines = [part for line in lines for part in _split_header(line)]
    stripped = [line.rstrip() for line in lines]
    kept = list(lines)
    size = len(end_block)
    index = len(stripped) - size
    while index >= 0:
        if stripped[index] != end_block[0] or stripped[index:index + size] != end_block:
            index -= 1
            continue
        start = _printout_start(stripped, index, known)
        if start is None:
            index -= 1
            continue
        del kept[start:index + size]
        del stripped[start:index + size]
        index = start - size
    return kept


def _split_header(line: str) -> list[str]:
    head = line.rstrip()
    if head.endswith(_TRACEBACK_HEADER) and head != _TRACEBACK_HEADER:
        return [head[: -len(_TRACEBACK_HEADER)], _TRACEBACK_HEADER]
    return [line]


def _chain_messages(remote: PipesRemoteException) -> list[str]:
    messages = [remote.message]
    for link in (remote.cause, remote.context):
        if link is not None:
            messages += _chain_messages(link)
    return messages


def _printout_start(lines: list[str], end: int, known: set[str]) -> int | None:
    """Where the traceback printout whose last exception's message starts at ``lines[end]`` starts, or None
    when the lines before it are not a traceback printout."""
    j = end - 1
    header: int | None = None  # the earliest "Traceback (most recent call last):" of the printout so far
    while True:
        frames_end = j
        while j >= 0 and lines[j].startswith("  "):  # frames: "  File ...", "    code", "    ^^^^"
            j -= 1
        if j < 0:
            return 0  # the printout starts before the tail does
        if j == 0 and lines[0] != _TRACEBACK_HEADER and (j < frames_end or _is_cut_traceback_line(lines[0], known)):
            # The tail's first line, cut: frames follow it with no header (a printout always has one), or it is
            # the end of a line of the reported traceback.
            return 0
        if lines[j] != _TRACEBACK_HEADER:
            # Not a printout; or, inside one, a chained exception that has no traceback of its own.
            return None if header is None else j + 1
        header = j
        # The chain before it: "", a separator, "", then the previous exception's message lines and frames.
        if j >= 4 and lines[j - 1] == "" and lines[j - 2] in _CHAIN_SEPARATORS and lines[j - 3] == "":
            k = j - 4
            while k >= 0 and lines[k] in known and not lines[k].startswith("  ") and lines[k] != _TRACEBACK_HEADER:
                k -= 1
            if k < j - 4:
                j = k
                continue
        return header


def _is_cut_traceback_line(line: str, known: set[str]) -> bool:
    """Could ``line``, the first of a tail that may start in the middle of a line, be the end of a line of a
    traceback printout?"""
    text = line.strip()
    if not text:
        return False
    return ('", line ' in line or set(text) <= set("^~") or any(item.endswith(line) for item in known))
