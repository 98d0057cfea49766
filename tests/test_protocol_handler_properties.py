"""Property tests of the message handler and the line splitter (hypothesis).

Random and mutated lines are interleaved with valid messages; whatever the hostile lines are, and however the
byte stream is cut into blocks, the handler never raises, every valid message is delivered once and in order,
``closed`` comes last, and every hostile line is accounted for (an event or an issue, never a silent loss of a
valid line). The valid messages carry a token the hostile ones cannot produce, so a mutant that happens to be
a valid message is allowed as an extra event without hiding a lost valid one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipes_core import (
    MaterializeResult,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesLogEvent,
    PipesMessageHandler,
    PipesProtocolIssue,
)
from pipes_core.protocol.lines import LineSplitter

TOKEN = "valid-\u2713"  # the hostile lines never contain it (see hostile_line)
TOKEN_ON_THE_WIRE = json.dumps(TOKEN)[1:-1].encode()  # as json.dumps writes it in a line
QUIET = logging.getLogger("test-handler-properties")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False
SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _line(method: str, params: Any, version: str = "0.1") -> bytes:
    return json.dumps({"__dagster_pipes_version": version, "method": method, "params": params}).encode()


@st.composite
def valid_message(draw: st.DrawFn, index: int) -> tuple[bytes, Any]:
    """One valid message and what its event must be (compared by a key)."""
    kind = draw(st.sampled_from(["custom", "log", "materialization"]))
    if kind == "custom":
        payload = {"token": TOKEN, "seq": index, "value": draw(json_values)}
        return _line("report_custom_message", {"payload": payload}), ("custom", index)
    if kind == "log":
        return _line("log", {"message": f"{TOKEN} {index}", "level": "INFO"}), ("log", index)
    key = f"{TOKEN}/{index}"
    return (_line("report_asset_materialization", {"asset_key": key, "data_version": None, "metadata": None}),
            ("materialization", index))


MUTANT_BASES = [
    _line("report_custom_message", {"payload": {"mutant": [1, 2, {"a": "b"}]}}),
    _line("log", {"message": "mutant", "level": "WARNING"}),
    _line("report_asset_materialization", {"asset_key": "mutant/a", "data_version": "1",
                                           "metadata": {"m": {"raw_value": 1.5, "type": "float"}}}),
    _line("report_asset_check", {"asset_key": "mutant/b", "check_name": "c", "passed": True}),
    _line("log_external_stream", {"stream": "stdout", "text": "mutant"}),
]


@st.composite
def mutant(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(MUTANT_BASES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "insert", "flip", "truncate", "deepen", "huge", "version"]))
        at = draw(st.integers(0, len(base)))
        if op == "delete":
            del base[at:at + draw(st.integers(1, 10))]
        elif op == "insert":
            base[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "flip" and base:
            base[min(at, len(base) - 1)] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del base[at:]
        elif op == "deepen":
            depth = draw(st.integers(100, 3_000))
            base[at:at] = b"[" * depth + b"]" * depth
        elif op == "huge":
            base[at:at] = str(draw(st.integers(2**1000, 2**1100))).encode()
        else:
            base = bytearray(base.replace(b'"0.1"', b'"' + draw(st.sampled_from([b"7.0", b"", b"0.2"])) + b'"'))
    return bytes(base)


hostile_line = (
    st.binary(max_size=64)
    | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.sampled_from(["\x0b", "\x0c", "\x1c\x1d", "\x85", "\xa0", "\u2028", "\u3000", "   ", "\r"]).map(str.encode)
    | mutant()
).map(lambda b: b.replace(b"\n", b" ").replace(TOKEN.encode(), b"x").replace(TOKEN_ON_THE_WIRE, b"x"))


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], list[Any]]:
    """Lines (no newlines) and the expected keys of the valid ones, in order; opened first, closed last."""
    lines: list[bytes] = [_line("opened", {"extras": {}})]
    expected: list[Any] = []
    for index in range(draw(st.integers(0, 12))):
        for bad in draw(st.lists(hostile_line, max_size=3)):
            lines.append(bad)
        line, key = draw(valid_message(index))
        lines.append(line)
        expected.append(key)
    lines += draw(st.lists(hostile_line, max_size=3))
    lines.append(_line("closed", {}))
    return lines, expected


def _key(event: PipesEvent) -> Any:
    if isinstance(event, PipesCustomMessageEvent) and isinstance(event.payload, dict) \
            and event.payload.get("token") == TOKEN:
        return ("custom", event.payload["seq"])
    if isinstance(event, PipesLogEvent) and event.message.startswith(TOKEN):
        return ("log", int(event.message.split()[-1]))
    if isinstance(event, MaterializeResult) and event.asset_key.startswith(TOKEN):
        return ("materialization", int(event.asset_key.rsplit("/", 1)[1]))
    return None


def _check(events: list[PipesEvent], handler: PipesMessageHandler, expected: list[Any], lines: list[bytes]) -> None:
    delivered = [key for key in map(_key, events) if key is not None]
    assert delivered == expected
    closed = [i for i, e in enumerate(events) if isinstance(e, PipesClosedEvent)]
    assert closed, "closed was lost"
    # Nothing after the (first) closed but issues and captured output.
    assert all(isinstance(e, PipesProtocolIssue) or _key(e) is None for e in events[closed[0] + 1:])
    assert handler.closed_count == 1
    non_blank = sum(1 for line in lines if line.strip(b" \t\r"))
    assert len(events) >= non_blank  # every non-blank line gave at least one event or issue


def _handler(events: list[PipesEvent]) -> PipesMessageHandler:
    return PipesMessageHandler({"asset_keys": None}, on_event=events.append, retain_messages=False, logger=QUIET,
                               external_stream_handler=lambda stream, text: None)


@SETTINGS
@given(streams())
def test_handle_line_delivers_every_valid_message_in_order(stream: tuple[list[bytes], list[Any]]) -> None:
    lines, expected = stream
    events: list[PipesEvent] = []
    handler = _handler(events)
    for line in lines:
        if line.strip(b" \t\r"):
            handler.handle_line(line, "prop")
    _check(events, handler, expected, lines)


@SETTINGS
@given(streams(), st.data())
def test_line_splitter_delivers_every_valid_message_however_the_stream_is_cut(
    stream: tuple[list[bytes], list[Any]], data: st.DataObject
) -> None:
    lines, expected = stream
    events: list[PipesEvent] = []
    handler = _handler(events)
    longest_valid = max(len(line) for line in lines if TOKEN_ON_THE_WIRE in line or line in (lines[0], lines[-1]))
    # A limit at or above the longest valid line (hostile lines may be longer and get skipped).
    limit = data.draw(st.integers(longest_valid, longest_valid + 4_000), label="max_line_bytes")
    splitter = LineSplitter(handler, "prop", limit)
    raw = b"\n".join(lines) + b"\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts"))
    start = 0
    for cut in [*cuts, len(raw)]:
        if cut > start:
            splitter.feed(raw[start:cut])
            start = cut
    splitter.finish()
    _check(events, handler, expected, lines)
    assert splitter.pending_bytes == 0


@SETTINGS
@given(streams())
def test_handle_lines_on_one_block_delivers_every_valid_message(stream: tuple[list[bytes], list[Any]]) -> None:
    lines, expected = stream
    events: list[PipesEvent] = []
    handler = _handler(events)
    handler.handle_lines(b"\n".join(lines), "prop")
    _check(events, handler, expected, lines)
