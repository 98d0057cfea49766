"""Hostile input on the message channel and at the JSON boundaries (issue 9, the reader/handler half).

One test per bad input: each shows the clear issue or error (its ``kind`` and reason) AND that nothing after
it was lost (every later message, ``closed`` included, is delivered). Orchestrator side through a real file
reader in a live session, then through ``PipesSubprocessClient.run`` and ``pipes run`` with real children.
External side: ``report_*`` refuses what the orchestrator would refuse, at the call site.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEnvContextInjector,
    PipesEvent,
    PipesExecutionError,
    PipesExternalStreamEvent,
    PipesFileMessageReader,
    PipesLogEvent,
    PipesMessageHandler,
    PipesOpenedEvent,
    PipesProtocolErrorKind,
    PipesProtocolIssue,
    PipesRunContext,
    PipesSubprocessClient,
    open_pipes_session,
)
from pipes_core.protocol.results import ISSUE_EXCERPT_BYTES
from pipes_ext import (
    PipesMappingParamsLoader,
    PipesProtocolError,
    PipesUsageError,
    encode_param,
    open_pipes,
)
from pipes_ext._protocol import MAX_JSON_DEPTH, decode_param, dumps_message, parse_message_line
from tests.conftest import cli_json_events
from tests.support.helpers import PYTHON

Kind = PipesProtocolErrorKind
WriteScript = Callable[..., Path]


def _line(method: str, params: Any, version: Any = "0.1") -> bytes:
    return (json.dumps({"__dagster_pipes_version": version, "method": method, "params": params}) + "\n").encode()


OPENED = _line("opened", {"extras": {}})
BEFORE = _line("report_custom_message", {"payload": "before"})
AFTER = _line("log", {"message": "after", "level": "INFO"})
MATERIALIZED = _line("report_asset_materialization", {"asset_key": "a", "data_version": "1", "metadata": None})
CLOSED = _line("closed", {})


def _feed(
    tmp_path: Path,
    *chunks: bytes,
    max_line_bytes: int | None = None,
    retain: bool = True,
    logger: logging.Logger | None = None,
    external: list[tuple[str, str]] | None = None,
) -> tuple[Any, list[PipesEvent]]:
    """Write ``chunks`` (one write each) into the messages file of a live session; return the finished session
    and its events in arrival order."""
    events: list[PipesEvent] = []
    path = tmp_path / "messages"
    reader = (PipesFileMessageReader(path) if max_line_bytes is None
              else PipesFileMessageReader(path, max_line_bytes=max_line_bytes))
    kwargs: dict[str, Any] = {}
    if logger is not None:
        kwargs["logger"] = logger
    if external is not None:
        kwargs["external_stream_handler"] = lambda stream, text: external.append((stream, text))
    with open_pipes_session(None, PipesEnvContextInjector(), reader, on_event=events.append,
                            retain_messages=retain, **kwargs) as session:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    return session, events


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def _custom_raw(payload_json: str) -> bytes:
    return (b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": '
            + payload_json.encode() + b"}}")


def _metadata_line(metadata_type: str, raw_value_json: str) -> bytes:
    return (b'{"__dagster_pipes_version": "0.1", "method": "report_asset_materialization", "params": '
            b'{"asset_key": "a", "data_version": null, "metadata": {"m": {"raw_value": '
            + raw_value_json.encode() + b', "type": "' + metadata_type.encode() + b'"}}}}')


# (id, line without newline, kind, fragment of the reason)
HOSTILE_LINES: list[tuple[str, bytes, PipesProtocolErrorKind, str]] = [
    ("nested one level too deep", _custom_raw(_nested(MAX_JSON_DEPTH - 1)), Kind.TOO_DEEP,
     f"nested deeper than {MAX_JSON_DEPTH} levels"),
    ("nested 1,000 deep (RecursionError in json)", _custom_raw(_nested(1_000)), Kind.TOO_DEEP, "nested deeper"),
    ("nested 100,000 deep", _custom_raw(_nested(100_000)), Kind.TOO_DEEP, "nested deeper"),
    ("objects nested 5,000 deep", _custom_raw('{"a": ' * 5_000 + "1" + "}" * 5_000), Kind.TOO_DEEP, "nested deeper"),
    ("float metadata of 2**1024", _metadata_line("float", str(2**1024)), Kind.BAD_METADATA,
     "must be a number a float can hold"),
    ("timestamp metadata of -2**1100", _metadata_line("timestamp", str(-(2**1100))), Kind.BAD_METADATA,
     "must be a number a float can hold"),
    ("int of 5,000 digits", _metadata_line("int", "9" * 5_000), Kind.NOT_JSON, "not JSON"),
    ("unknown method named by 2 MB", _line("x" * 2_000_000, {}).rstrip(b"\n"), Kind.UNKNOWN_METHOD,
     "unknown message method"),
    *[
        (f"whitespace line {text!r}", text.encode("utf-8"), Kind.NOT_JSON, "whitespace that JSON does not allow")
        for text in ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u2028", "\u3000",
                     " \x0b\t\u3000 "]
    ],
    ("non-JSON whitespace around a message", b"\x0c" + AFTER.rstrip(b"\n"), Kind.NOT_JSON, "not JSON"),
]


@pytest.mark.parametrize(("line", "kind", "reason"), [c[1:] for c in HOSTILE_LINES],
                         ids=[c[0] for c in HOSTILE_LINES])
def test_hostile_line_is_an_issue_and_nothing_after_it_is_lost(
    tmp_path: Path, line: bytes, kind: PipesProtocolErrorKind, reason: str
) -> None:
    session, events = _feed(tmp_path, OPENED + BEFORE + line + b"\n" + AFTER + MATERIALIZED + CLOSED)
    assert len(events) == 6, events
    issue = events.pop(2)
    assert events[0] == PipesOpenedEvent({})
    assert events[1] == PipesCustomMessageEvent("before")
    assert events[2] == PipesLogEvent("INFO", "after")
    assert events[3].asset_key == "a"  # type: ignore[union-attr]
    assert events[4] == PipesClosedEvent(None)
    assert isinstance(issue, PipesProtocolIssue)
    assert issue.kind is kind
    assert reason in issue.reason
    assert issue.size == len(line)
    assert len(issue.raw.encode("utf-8")) <= ISSUE_EXCERPT_BYTES
    assert len(issue.reason) <= ISSUE_EXCERPT_BYTES + 3
    assert line.decode("utf-8", "replace").startswith(issue.raw)
    assert issue.truncated == (len(line) > ISSUE_EXCERPT_BYTES)
    assert not issue.handled
    assert session.protocol_issues == [issue]
    assert session.closed and session.exception is None
    assert [r.asset_key for r in session.get_results()] == ["a"]


def test_one_block_of_hostile_lines_between_every_good_line(tmp_path: Path) -> None:
    # All of them in one write: the reader sees them in one block, decoded once, and loses no good line.
    bad = [line for _, line, _, _ in HOSTILE_LINES]
    data = OPENED + b"".join(_line("report_custom_message", {"payload": i}) + b + b"\n" for i, b in enumerate(bad))
    session, _ = _feed(tmp_path, data + CLOSED)
    assert session.get_custom_messages() == list(range(len(bad)))
    assert [i.kind for i in session.protocol_issues] == [k for _, _, k, _ in HOSTILE_LINES]
    assert session.closed


def test_exception_raised_while_handling_a_line_is_an_issue(tmp_path: Path) -> None:
    # A user's logging filter that raises is not ours to fix, but it must not stop the reader: the line becomes
    # a HANDLER_ERROR issue and every later message arrives.
    class Explode(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage() == "explode":
                raise RuntimeError("the filter broke")
            return True

    logger = logging.getLogger(f"test-hostile-{id(tmp_path)}")
    logger.setLevel(logging.DEBUG)
    logger.addFilter(Explode())
    explode = _line("log", {"message": "explode", "level": "INFO"})
    session, events = _feed(tmp_path, OPENED + explode + AFTER + CLOSED, logger=logger)
    issue = events[1]
    assert isinstance(issue, PipesProtocolIssue)
    assert issue.kind is Kind.HANDLER_ERROR
    assert "RuntimeError: the filter broke" in issue.reason
    assert issue.raw == explode.decode().rstrip("\n")
    assert events[2:] == [PipesLogEvent("INFO", "after"), PipesClosedEvent(None)]
    assert session.closed


def test_handle_message_never_raises_and_bounds_its_excerpt() -> None:
    handler = PipesMessageHandler({}, logger=logging.getLogger("test-hostile-quiet"))
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    handler.handle_message({"__dagster_pipes_version": "0.1", "method": "x" * 1_000_000, "params": {}})
    handler.handle_message([deep])
    handler.handle_message({"__dagster_pipes_version": "0.1", "method": "report_custom_message",
                            "params": {"payload": "ok"}})
    assert handler.custom_messages == ["ok"]
    assert [i.kind for i in handler.issues] == [Kind.UNKNOWN_METHOD, Kind.NOT_OBJECT]
    assert all(len(i.raw) <= ISSUE_EXCERPT_BYTES and i.size is None for i in handler.issues)


# ----------------------------------------------------------------------------------------------------------
# Lifecycle leniency: issues, and whether the message is still handled
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["7.0", None, 0.1, "", ["0.1"]])
def test_other_protocol_version_is_an_issue_but_still_handled(tmp_path: Path, version: Any) -> None:
    first = _line("report_custom_message", {"payload": 1}, version=version)
    second = _line("report_custom_message", {"payload": 2}, version=version)
    session, events = _feed(tmp_path, OPENED + first + second + CLOSED)
    issue = events[1]
    assert isinstance(issue, PipesProtocolIssue)
    assert issue.kind is Kind.BAD_VERSION and issue.handled
    assert "protocol version" in issue.reason and '"0.1"' in issue.reason
    # The message carrying it is handled; the same version again is not reported twice.
    assert events[2:] == [PipesCustomMessageEvent(1), PipesCustomMessageEvent(2), PipesClosedEvent(None)]
    assert session.get_custom_messages() == [1, 2]
    assert session.issue_count == 1


def test_messages_after_closed_are_issues_and_not_results(tmp_path: Path) -> None:
    external: list[tuple[str, str]] = []
    late = [
        _line("report_asset_materialization", {"asset_key": "late", "data_version": None, "metadata": None}),
        _line("report_asset_check", {"asset_key": "late", "check_name": "c", "passed": True}),
        _line("log", {"message": "late", "level": "INFO"}),
        _line("report_custom_message", {"payload": "late"}),
        _line("opened", {"extras": {}}),
        _line("closed", {"exception": {"message": "late", "stack": [], "name": "E"}}),
    ]
    stream = _line("log_external_stream", {"stream": "stdout", "text": "trailing output\n"})
    session, events = _feed(tmp_path, OPENED + MATERIALIZED + CLOSED + b"".join(late) + stream, external=external)
    issues = [e for e in events if isinstance(e, PipesProtocolIssue)]
    assert [i.kind for i in issues] == [Kind.AFTER_CLOSED] * len(late)
    assert all("received after closed; not handled" in i.reason and not i.handled for i in issues)
    # Nothing after closed counts: one result, no log, no custom message, no exception, one closed.
    assert [r.asset_key for r in session.get_results()] == ["a"]
    assert session.get_logs() == [] and session.get_custom_messages() == []
    assert session.exception is None
    assert session.handler.closed_count == 1 and session.handler.opened_count == 1
    # Captured output may trail closed (other implementations): still passed on, not an issue.
    assert events[-1] == PipesExternalStreamEvent("stdout", "trailing output\n", {})
    assert external == [("stdout", "trailing output\n")]


def test_second_opened_is_an_issue_and_the_first_counts(tmp_path: Path) -> None:
    second = _line("opened", {"extras": {"second": True}})
    session, events = _feed(tmp_path, _line("opened", {"extras": {"first": True}}) + second + BEFORE + CLOSED)
    issue = events[1]
    assert isinstance(issue, PipesProtocolIssue) and issue.kind is Kind.SECOND_OPENED and not issue.handled
    assert events[2:] == [PipesCustomMessageEvent("before"), PipesClosedEvent(None)]
    assert session.handler.opened_extras == {"first": True}
    assert session.handler.opened_count == 1


JAVA_EXCEPTION = {
    "name": "IllegalStateException",
    "message": "java.lang.IllegalStateException: boom",
    "stack": ["at Job.run(Job.java:10)"],
    "context": [],
    "cause": {"name": "IOException", "message": "java.io.IOException: disk full", "stack": None},
}


def test_malformed_closed_is_salvaged(tmp_path: Path) -> None:
    closed = _line("closed", {"exception": JAVA_EXCEPTION})
    session, events = _feed(tmp_path, OPENED + BEFORE + closed + AFTER)
    issue = events[2]
    assert isinstance(issue, PipesProtocolIssue)
    assert issue.kind is Kind.BAD_EXCEPTION and issue.handled
    assert 'exception.cause "stack" must be a list of strings, got null' in issue.reason
    assert "exception.context must be null or an object, got a list (dropped)" in issue.reason
    assert isinstance(events[3], PipesClosedEvent)
    remote = session.exception
    assert remote is not None
    assert (remote.name, remote.message, remote.stack) == (
        "IllegalStateException", "java.lang.IllegalStateException: boom", ("at Job.run(Job.java:10)",))
    assert remote.cause is not None and remote.cause.message == "java.io.IOException: disk full"
    assert remote.cause.stack == () and remote.context is None
    assert session.closed and session.handler.closed_count == 1
    # What came after it is an after_closed issue: nothing lost silently.
    assert isinstance(events[4], PipesProtocolIssue) and events[4].kind is Kind.AFTER_CLOSED


@pytest.mark.parametrize(
    ("exception", "message", "problem"),
    [
        ("boom", "boom", "exception must be an object, got a string (kept as its message)"),
        ({"message": 5, "stack": "x", "name": 3}, "5", 'exception "message" must be a string'),
        ({"message": "m", "stack": ["a", 1, None]}, "m", '"stack" must be a list of strings (2 other items'),
        (7, None, "exception must be an object, got a number (dropped)"),
    ],
)
def test_malformed_closed_exception_keeps_what_is_valid(
    tmp_path: Path, exception: Any, message: str | None, problem: str
) -> None:
    session, _events = _feed(tmp_path, OPENED + _line("closed", {"exception": exception}))
    [issue] = session.protocol_issues
    assert issue.kind is Kind.BAD_EXCEPTION and problem in issue.reason
    assert session.closed
    if message is None:
        assert session.exception is None
    else:
        assert session.exception is not None and session.exception.message == message


@pytest.mark.parametrize("strict", [True, False])
def test_malformed_closed_keeps_the_remote_message_through_the_client(
    write_script: WriteScript, strict: bool
) -> None:
    script = write_script(f"""
        import os
        from pipes_ext import decode_param, open_pipes
        from pipes_ext._protocol import dumps_message
        pipes = open_pipes()
        pipes.report_custom_message("before")
        path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
        with open(path, "a") as f:
            f.write(dumps_message("closed", {{"exception": {JAVA_EXCEPTION!r}}}) + "\\n")
        os._exit(1)
    """)
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient(strict=strict, forward_stdio=False).run(command=[PYTHON, str(script)])
    remote = info.value.remote_exception
    assert remote is not None and remote.message == "java.lang.IllegalStateException: boom"
    assert "java.lang.IllegalStateException: boom" in str(info.value)
    assert "never sent closed" not in str(info.value)
    session = info.value.invocation.session
    assert session.closed and session.get_custom_messages() == ["before"]
    assert [i.kind for i in session.protocol_issues] == [Kind.BAD_EXCEPTION]


# ----------------------------------------------------------------------------------------------------------
# Line size: max_line_bytes, streaming skip, bounded excerpts
# ----------------------------------------------------------------------------------------------------------


def test_line_over_max_line_bytes_in_one_block_is_skipped_and_reported(tmp_path: Path) -> None:
    long_line = _custom_raw('"' + "x" * 5_000 + '"')
    session, events = _feed(tmp_path, OPENED + BEFORE + long_line + b"\n" + AFTER + CLOSED, max_line_bytes=1_000)
    issue = events[2]
    assert isinstance(issue, PipesProtocolIssue) and issue.kind is Kind.LINE_TOO_LONG
    assert issue.size == len(long_line)
    assert f"{len(long_line)} bytes is longer than max_line_bytes=1000" in issue.reason
    assert long_line.decode().startswith(issue.raw) and len(issue.raw) == ISSUE_EXCERPT_BYTES
    assert events[3:] == [PipesLogEvent("INFO", "after"), PipesClosedEvent(None)]
    assert session.get_custom_messages() == ["before"]


def test_line_at_max_line_bytes_is_read(tmp_path: Path) -> None:
    line = _custom_raw('"' + "y" * 3_000 + '"')
    session, _ = _feed(tmp_path, OPENED + line + b"\n" + CLOSED, max_line_bytes=len(line))
    assert session.get_custom_messages() == ["y" * 3_000]
    assert session.protocol_issues == []


def test_long_line_is_skipped_as_it_streams(tmp_path: Path) -> None:
    # 64 MiB arrive in 1 MiB writes with a 1 MiB limit: the reader never holds the line (tracemalloc's peak
    # stays far below its size), reports it with its size, and reads on.
    size = 64 << 20
    head = _custom_raw('"')
    piece = b"z" * (1 << 20)
    chunks = [OPENED + BEFORE + head] + [piece] * (size // len(piece)) + [b'"}}\n' + AFTER + CLOSED]
    total = len(head) + size + 3
    tracemalloc.start()
    try:
        _session, events = _feed(tmp_path, *chunks, max_line_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    issue = events[2]
    assert isinstance(issue, PipesProtocolIssue) and issue.kind is Kind.LINE_TOO_LONG
    assert issue.size == total and issue.raw.startswith('{"__dagster_pipes_version"')
    assert events[3:] == [PipesLogEvent("INFO", "after"), PipesClosedEvent(None)]
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB while skipping a {size >> 20} MiB line"


def test_long_final_line_without_newline_is_reported_with_its_size(tmp_path: Path) -> None:
    unterminated = b"w" * 3_000
    session, events = _feed(tmp_path, OPENED + BEFORE + unterminated, max_line_bytes=1_000)
    issue = events[-1]
    assert isinstance(issue, PipesProtocolIssue) and issue.kind is Kind.LINE_TOO_LONG
    assert issue.size == 3_000 and "no newline" in issue.reason
    assert session.get_custom_messages() == ["before"]


def test_long_line_under_the_limit_peaks_near_twice_its_size(tmp_path: Path) -> None:
    # A 32 MiB line whose payload is one string: its text plus the parsed payload (2x) is the floor; the reader
    # adds its read buffer and growth slack. A generous bound catches the old 4x (bytes pieces + join + decode +
    # split copies).
    size = 32 << 20
    line = _custom_raw('"' + "p" * size + '"') + b"\n"
    chunks = [OPENED] + [line[i:i + (1 << 20)] for i in range(0, len(line), 1 << 20)] + [CLOSED]
    tracemalloc.start()
    try:
        session, _ = _feed(tmp_path, *chunks, retain=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert session.protocol_issues == [] and session.closed
    assert peak < 2.75 * size, f"peak {peak / size:.2f}x the line"


def test_issues_keep_an_excerpt_not_the_line(tmp_path: Path) -> None:
    # 40 bad lines of 1 MiB with retain_messages=False (as pipes run): what stays after the run is kilobytes.
    bad = b"<" + b"n" * (1 << 20) + b">\n"
    tracemalloc.start()
    try:
        session, events = _feed(tmp_path, OPENED, *([bad] * 40), CLOSED, retain=False)
        del events
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert session.issue_count == 40
    assert all(i.size == len(bad) - 1 and len(i.raw) == ISSUE_EXCERPT_BYTES and i.truncated
               for i in session.protocol_issues)
    assert current < 4 << 20, f"{current / 2**20:.1f} MiB still held after 40 MiB of bad lines"


def test_max_line_bytes_must_be_positive(tmp_path: Path) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PipesUsageError, match="max_line_bytes must be a positive integer"):
            PipesFileMessageReader(tmp_path / "m", max_line_bytes=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Through PipesSubprocessClient.run and pipes run, with real children
# ----------------------------------------------------------------------------------------------------------

HOSTILE_CHILD = """
import os, sys
from pipes_ext import decode_param, open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message("before")
    path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    for line in [
        b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": '
        + b"[" * 5000 + b"]" * 5000 + b"}}\\n",
        b'{"__dagster_pipes_version": "0.1", "method": "report_asset_materialization", "params": '
        b'{"asset_key": "x", "data_version": null, "metadata": {"f": {"raw_value": ' + str(2**1024).encode()
        + b', "type": "float"}}}}\\n',
        b"\\x0b\\x0c\\n",
    ]:
        os.write(fd, line)
    os.close(fd)
    pipes.report_asset_materialization(asset_key="a", metadata={"rows": 3})
    pipes.report_custom_message("after")
"""


def test_client_run_delivers_everything_after_hostile_lines(write_script: WriteScript) -> None:
    script = write_script(HOSTILE_CHILD)
    invocation = PipesSubprocessClient(strict=False, forward_stdio=False).run(
        command=[PYTHON, str(script)], context=PipesRunContext(asset_keys=["a", "x"]))
    session = invocation.session
    assert session.closed and session.exception is None
    assert session.get_custom_messages() == ["before", "after"]
    assert [i.kind for i in session.protocol_issues] == [Kind.TOO_DEEP, Kind.BAD_METADATA, Kind.NOT_JSON]
    explicit = [r.asset_key for r in invocation.get_results() if not getattr(r, "implicit", False)]
    assert explicit == ["a"]


def test_client_run_strict_raises_with_everything_received(write_script: WriteScript) -> None:
    script = write_script(HOSTILE_CHILD)
    with pytest.raises(PipesExecutionError, match="broke the Pipes protocol 3 time") as info:
        PipesSubprocessClient(forward_stdio=False).run(command=[PYTHON, str(script)])
    session = info.value.invocation.session
    assert session.closed and session.get_custom_messages() == ["before", "after"]


def test_pipes_run_summarises_after_hostile_lines(write_script: WriteScript) -> None:
    script = write_script(HOSTILE_CHILD)
    proc = subprocess.run([PYTHON, "-m", "pipes_core", "run", "--json", "--no-strict", "--asset", "a",
                           "--", PYTHON, str(script)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    records = cli_json_events(proc.stdout)
    issues = [r for r in records if r["event"] == "protocol_issue"]
    assert [i["kind"] for i in issues] == ["too_deep", "bad_metadata", "not_json"]
    assert all(i["size"] > 0 and i["handled"] is False for i in issues)
    assert [r["payload"] for r in records if r["event"] == "custom_message"] == ["before", "after"]
    assert any(r["event"] == "closed" for r in records)


def test_pipes_run_max_line_bytes(write_script: WriteScript) -> None:
    script = write_script("""
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message("x" * 5000)
            pipes.report_custom_message("short")
    """)
    proc = subprocess.run([PYTHON, "-m", "pipes_core", "run", "--json", "--no-strict", "--max-line-bytes", "2000",
                           "--", PYTHON, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = cli_json_events(proc.stdout)
    [issue] = [r for r in records if r["event"] == "protocol_issue"]
    assert issue["kind"] == "line_too_long" and issue["size"] > 5000
    assert [r["payload"] for r in records if r["event"] == "custom_message"] == ["short"]
    for bad in ("0", "-5", "many"):
        proc = subprocess.run([PYTHON, "-m", "pipes_core", "run", "--max-line-bytes", bad, "--", "true"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--max-line-bytes" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------
# The nesting limit on the external side and at the bootstrap
# ----------------------------------------------------------------------------------------------------------


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def pipes_to_file(tmp_path: Path) -> Any:
    path = tmp_path / "messages"
    loader = PipesMappingParamsLoader({
        "DAGSTER_PIPES_CONTEXT": encode_param({"data": {"run_id": "r"}}),
        "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(path)}),
    })
    with open_pipes(params_loader=loader) as pipes:
        yield pipes, path


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, 990, 995, 100_000])
def test_report_custom_message_too_deep_raises_usage_error_at_the_call(pipes_to_file: Any, depth: int) -> None:
    pipes, path = pipes_to_file
    with pytest.raises(PipesUsageError, match=f"nested too deep.*{MAX_JSON_DEPTH}.*nothing was sent"):
        pipes.report_custom_message(_deep(depth))
    pipes.report_custom_message(_deep(MAX_JSON_DEPTH - 2))  # the deepest payload that fits: sent, and read back
    pipes.report_custom_message("after")
    lines = path.read_text().splitlines()
    assert [parse_message_line(line)["params"]["payload"] for line in lines[1:]] == [_deep(MAX_JSON_DEPTH - 2),
                                                                                      "after"]


def test_report_metadata_too_deep_or_overflowing_raises_usage_error(pipes_to_file: Any) -> None:
    pipes, path = pipes_to_file
    with pytest.raises(PipesUsageError, match="nested too deep"):
        pipes.report_asset_materialization(asset_key="a", metadata={"j": {"raw_value": _deep(200), "type": "json"}})
    with pytest.raises(PipesUsageError, match="a float can hold"):
        pipes.report_asset_materialization(asset_key="a", metadata={"f": {"raw_value": 2**1024, "type": "float"}})
    pipes.report_asset_materialization(asset_key="a", metadata={"f": {"raw_value": 2**1023, "type": "float"}})
    assert len(path.read_text().splitlines()) == 2  # opened + the one valid materialization


@pytest.mark.parametrize("depth", [200, 100_000])
def test_bootstrap_value_too_deep_names_the_variable(tmp_path: Path, depth: int) -> None:
    text = json.dumps({"data": {"run_id": "r", "extras": {"x": "PLACEHOLDER"}}}).replace(
        '"PLACEHOLDER"', _nested(depth))
    value = base64.b64encode(zlib.compress(text.encode())).decode()
    with pytest.raises(PipesProtocolError) as info:
        decode_param(value)
    assert info.value.kind is Kind.TOO_DEEP
    loader = PipesMappingParamsLoader({
        "DAGSTER_PIPES_CONTEXT": value,
        "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(tmp_path / "messages")}),
    })
    with pytest.raises(PipesProtocolError) as info:
        open_pipes(params_loader=loader)
    assert info.value.kind is Kind.TOO_DEEP
    assert "DAGSTER_PIPES_CONTEXT" in str(info.value) and f"deeper than {MAX_JSON_DEPTH}" in str(info.value)
    assert not (tmp_path / "messages").exists()


@pytest.mark.parametrize("depth", [200, 100_000])
def test_context_file_too_deep_names_the_file(tmp_path: Path, depth: int) -> None:
    context = tmp_path / "context.json"
    context.write_text('{"run_id": "r", "extras": {"x": ' + _nested(depth) + "}}")
    loader = PipesMappingParamsLoader({
        "DAGSTER_PIPES_CONTEXT": encode_param({"path": str(context)}),
        "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(tmp_path / "messages")}),
    })
    with pytest.raises(PipesProtocolError) as info:
        open_pipes(params_loader=loader)
    assert info.value.kind is Kind.TOO_DEEP
    assert str(context) in str(info.value) and f"deeper than {MAX_JSON_DEPTH}" in str(info.value)


def test_orchestrator_refuses_to_encode_too_deep_extras() -> None:
    with pytest.raises(PipesUsageError, match="nested deeper than"):
        encode_param({"extras": _deep(MAX_JSON_DEPTH)})
    with pytest.raises(PipesUsageError, match="nested deeper than"):
        encode_param({"extras": _deep(50_000)})
    assert decode_param(encode_param({"extras": _deep(MAX_JSON_DEPTH - 2)}))["extras"] == _deep(MAX_JSON_DEPTH - 2)


def test_what_the_external_side_sends_the_orchestrator_reads(tmp_path: Path) -> None:
    # The limits agree: the deepest message dumps_message accepts is one parse_message_line accepts.
    deepest = dumps_message("report_custom_message", {"payload": _deep(MAX_JSON_DEPTH - 2)})
    assert parse_message_line(deepest)["params"]["payload"] == _deep(MAX_JSON_DEPTH - 2)
    with pytest.raises(PipesUsageError):
        dumps_message("report_custom_message", {"payload": _deep(MAX_JSON_DEPTH - 1)})


# ----------------------------------------------------------------------------------------------------------
# Kinds on errors
# ----------------------------------------------------------------------------------------------------------


def test_every_kind_is_a_stable_string() -> None:
    values = [kind.value for kind in Kind]
    assert len(values) == len(set(values))
    assert all(kind == kind.value and str(kind) == kind.value for kind in Kind)
    assert json.dumps({"kind": Kind.TOO_DEEP}) == '{"kind": "too_deep"}'
    assert PipesProtocolError("x").kind is Kind.OTHER


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("not base64!", Kind.NOT_BASE64),
        (base64.b64encode(b"not zlib").decode(), Kind.NOT_ZLIB),
        (base64.b64encode(zlib.compress(b"{nope")).decode(), Kind.NOT_JSON),
        (base64.b64encode(zlib.compress(b"[1]")).decode(), Kind.NOT_OBJECT),
    ],
)
def test_bootstrap_errors_carry_their_kind(value: str, kind: PipesProtocolErrorKind) -> None:
    with pytest.raises(PipesProtocolError) as info:
        decode_param(value)
    assert info.value.kind is kind


# ----------------------------------------------------------------------------------------------------------
# include_stdio_in_messages must be a boolean
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "true", 1, [], {}])
def test_include_stdio_that_is_not_a_boolean_warns_and_does_not_capture(tmp_path: Path, value: Any) -> None:
    from pipes_ext import PipesWarning

    path = tmp_path / "messages"
    loader = PipesMappingParamsLoader({
        "DAGSTER_PIPES_CONTEXT": encode_param({"data": {"run_id": "r"}}),
        "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(path), "include_stdio_in_messages": value}),
    })
    with pytest.warns(PipesWarning, match='"include_stdio_in_messages" must be a boolean') as record:
        pipes = open_pipes(params_loader=loader)
    assert "stdout/stderr are not captured" in str(record[0].message)
    with pipes:
        print("not captured")
        pipes.report_custom_message("after")
    methods = [json.loads(line)["method"] for line in path.read_text().splitlines()]
    assert methods == ["opened", "report_custom_message", "closed"]  # no log_external_stream


def test_orchestrator_reader_refuses_a_non_boolean_include_stdio(tmp_path: Path) -> None:
    with pytest.raises(PipesUsageError, match="include_stdio_in_messages must be a boolean"):
        PipesFileMessageReader(tmp_path / "m", include_stdio_in_messages="false")  # type: ignore[arg-type]


def test_session_refuses_extras_the_process_would_refuse(tmp_path: Path) -> None:
    # The context data nests one level above extras: extras may nest MAX_JSON_DEPTH - 1 levels.
    with pytest.raises(PipesUsageError, match=f"context data \\(extras included\\) is nested deeper than "
                                              f"{MAX_JSON_DEPTH}"):
        with open_pipes_session(None, PipesEnvContextInjector(), PipesFileMessageReader(tmp_path / "m"),
                                extras={"x": _deep(MAX_JSON_DEPTH - 1)}):
            pass
    assert not (tmp_path / "m").exists()  # refused before anything was created
    with open_pipes_session(None, PipesEnvContextInjector(), PipesFileMessageReader(tmp_path / "m"),
                            extras={"x": _deep(MAX_JSON_DEPTH - 3)}) as session:
        assert decode_param(session.get_bootstrap_env_vars()["DAGSTER_PIPES_CONTEXT"])["data"]["extras"] == {
            "x": _deep(MAX_JSON_DEPTH - 3)}


def test_pipes_run_refuses_extras_nested_too_deep_in_one_line() -> None:
    for extras in ('{"a": ' + _nested(MAX_JSON_DEPTH) + "}", _nested(60_000)):
        proc = subprocess.run([PYTHON, "-m", "pipes_core", "run", "--extras", extras, "--", "true"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "nested" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
