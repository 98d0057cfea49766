"""PipesStdioMessageReader: messages and output on one stream of lines, cut into chunks anywhere."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesCustomMessageEvent,
    PipesEvent,
    PipesMessageHandler,
    PipesProtocolIssue,
    PipesStdioMessageReader,
    PipesSubprocessClient,
    PipesTransportError,
    PipesUsageError,
)
from pipes_core.channels.stdio import as_output_writer
from tests.support.helpers import PYTHON


def message(payload: Any) -> bytes:
    return json.dumps({"__dagster_pipes_version": "0.1", "method": "report_custom_message",
                       "params": {"payload": payload}}).encode()


def read(chunks: list[bytes] | Any, *, max_line_bytes: int | None = None,
         ) -> tuple[list[tuple[str, Any]], PipesMessageHandler, PipesStdioMessageReader]:
    """Feed ``chunks`` through a reader; the interleaved record of events and output, the handler, the reader."""
    record: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def on_event(event: PipesEvent) -> None:
        with lock:
            if isinstance(event, PipesCustomMessageEvent):
                record.append(("message", event.payload))
            elif isinstance(event, PipesProtocolIssue):
                record.append(("issue", event.reason))

    def output(data: bytes) -> None:
        with lock:
            if record and record[-1][0] == "out":
                record[-1] = ("out", record[-1][1] + data)
            else:
                record.append(("out", data))

    handler = PipesMessageHandler({}, on_event=on_event)
    kwargs = {} if max_line_bytes is None else {"max_line_bytes": max_line_bytes}
    reader = PipesStdioMessageReader(**kwargs)
    with reader.read_messages(handler) as params:
        assert params == {"stdio": "stdout"}
        reader.read_source(chunks, output=output)
    return record, handler, reader


STREAM = b"".join([
    b"starting\n",
    message(1) + b"\n",
    b"plain output with \xc3\xa9 and no marker\n",
    b"\n",
    message({"nested": [1, 2]}) + b"\r\n",
    b"a log line mentioning \"__dagster_pipes_version\" is output, not a message\n",
    b"  " + message(2) + b"\n",
    b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": \n',  # bad message line
    b"last words\n",
    message(3) + b"\n",
    b"progress 50%" + message(4) + b"\n",  # output that did not end its line, then a message
])
EXPECTED = [
    ("out", b"starting\n"),
    ("message", 1),
    ("out", b"plain output with \xc3\xa9 and no marker\n\n"),
    ("message", {"nested": [1, 2]}),
    ("out", b"a log line mentioning \"__dagster_pipes_version\" is output, not a message\n"),
    ("message", 2),
    ("issue", None),
    ("out", b"last words\n"),
    ("message", 3),
    ("out", b"progress 50%"),
    ("message", 4),
]


def normalise(record: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(kind, None if kind == "issue" else value) for kind, value in record]


def chunkings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    yield "byte by byte", [data[i : i + 1] for i in range(len(data))]
    for size in (2, 3, 7, 64):
        yield f"chunks of {size}", [data[i : i + size] for i in range(0, len(data), size)]
    rng = random.Random(7)
    for attempt in range(5):
        cuts = sorted(rng.sample(range(1, len(data)), 12))
        yield f"random cuts {attempt}", [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.mark.parametrize("name,chunks", list(chunkings(STREAM)), ids=[n for n, _ in chunkings(STREAM)])
def test_any_chunking_gives_the_same_messages_and_output_in_order(name: str, chunks: list[bytes]) -> None:
    record, handler, _ = read(chunks)
    assert normalise(record) == EXPECTED
    assert handler.issue_count == 1


def test_every_split_point_mid_line() -> None:
    """Two chunks, cut at every byte of the stream: the same result each time."""
    for cut in range(1, len(STREAM)):
        record, _, _ = read([STREAM[:cut], STREAM[cut:]])
        assert normalise(record) == EXPECTED, cut


def test_text_chunks_and_file_objects_are_sources() -> None:
    text_chunks = [STREAM.decode("utf-8")[i : i + 5] for i in range(0, len(STREAM.decode("utf-8")), 5)]
    assert normalise(read(text_chunks)[0]) == EXPECTED
    assert normalise(read(io.BytesIO(STREAM))[0]) == EXPECTED  # type: ignore[arg-type]
    assert normalise(read(io.BufferedReader(io.BytesIO(STREAM)))[0]) == EXPECTED  # type: ignore[arg-type]


@pytest.mark.parametrize("last,expected", [
    (message(9), [("message", 9)]),  # a complete message without its newline is accepted
    (message(9)[:-5], [("issue", "truncated final line")]),  # cut mid-message: an issue, not parsed
    (b"no newline at the end", [("out", b"no newline at the end")]),  # output forwarded as is
    (b"   ", [("out", b"   ")]),
    (b"glued" + message(9), [("out", b"glued"), ("message", 9)]),
])
def test_a_last_line_without_newline(last: bytes, expected: list[tuple[str, Any]]) -> None:
    for chunks in ([b"first\n" + last], [b"first\n", last], [b"first\n" + last[:3], last[3:]]):
        record, _, _ = read(chunks)
        if expected == [("out", expected[0][1])]:
            assert record == [("out", b"first\n" + expected[0][1])]
            continue
        if expected[0][0] == "out":
            assert record == [("out", b"first\n" + expected[0][1]), *expected[1:]]
            continue
        assert record[0] == ("out", b"first\n")
        got = record[1:]
        if expected[0][0] == "issue":
            assert len(got) == 1 and got[0][0] == "issue" and expected[0][1] in got[0][1]
        else:
            assert got == expected


def test_an_over_long_message_line_is_skipped_and_reading_goes_on() -> None:
    big = message("x" * 5000)
    data = message(1) + b"\n" + big + b"\n" + message(2) + b"\n"
    for chunks in ([data], [data[i : i + 100] for i in range(0, len(data), 100)]):
        record, handler, _ = read(chunks, max_line_bytes=1000)
        assert [k for k, _ in record] == ["message", "issue", "message"]
        assert record[0] == ("message", 1) and record[2] == ("message", 2)
        assert f"message line of {len(big)} bytes is longer than max_line_bytes=1000" in record[1][1]
        assert len(handler.issues[0].raw) < 1100  # an excerpt, not the line


def test_an_over_long_message_cut_by_the_end_of_the_stream() -> None:
    record, _, _ = read([message(1) + b"\n", message("y" * 3000)], max_line_bytes=1000)
    assert record[0] == ("message", 1)
    assert record[1][0] == "issue" and "the stream ended inside it" in record[1][1]


def test_an_over_long_output_line_is_forwarded_whole() -> None:
    line = b"z" * 10_000 + b"\n"
    data = b"before\n" + line + message(1) + b"\n"
    for chunks in ([data], [data[i : i + 333] for i in range(0, len(data), 333)]):
        record, handler, _ = read(chunks, max_line_bytes=1000)
        assert record == [("out", b"before\n" + line), ("message", 1)]
        assert handler.issue_count == 0


def test_memory_stays_bounded_on_a_giant_line() -> None:
    """A 64 MiB message line with max_line_bytes=1 MiB is dropped as it streams: peak memory stays near the limit."""
    block = b"q" * 65536
    head = b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": "'

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(1024):  # 64 MiB
            yield block
        yield b'"}}\n' + message("after") + b"\n"

    tracemalloc.start()
    try:
        record, _, _ = read(chunks(), max_line_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [k for k, _ in record] == ["issue", "message"]
    assert record[1] == ("message", "after")
    assert peak < 8 * (1 << 20), peak


def test_a_failing_source_keeps_what_came_before_and_raises_at_the_end() -> None:
    def chunks() -> Iterator[bytes]:
        yield message(1) + b"\n" + message(2)[:60]
        raise OSError("connection reset by peer")

    events: list[PipesEvent] = []
    handler = PipesMessageHandler({}, on_event=events.append)
    reader = PipesStdioMessageReader()
    with pytest.raises(PipesTransportError, match="connection reset by peer"):
        with reader.read_messages(handler):
            reader.consume(chunks(), output=lambda data: None)
    assert [e.payload for e in events if isinstance(e, PipesCustomMessageEvent)] == [1]
    assert [type(e) for e in events][-1] is PipesProtocolIssue  # the cut line is reported, not lost silently


def test_one_session_at_a_time_and_sources_only_inside_a_session() -> None:
    reader = PipesStdioMessageReader()
    with pytest.raises(PipesUsageError, match="inside read_messages"):
        reader.consume([b"x\n"])
    with reader.read_messages(PipesMessageHandler({})):
        with pytest.raises(PipesUsageError, match="already reading"):
            with reader.read_messages(PipesMessageHandler({})):
                pass  # pragma: no cover
    # Usable again afterwards.
    assert normalise(read([STREAM])[0]) == EXPECTED


@pytest.mark.parametrize("kwargs,match", [
    ({"stream": "stdin"}, "stream must be"),
    ({"max_line_bytes": 0}, "max_line_bytes"),
    ({"max_line_bytes": 1.5}, "max_line_bytes"),
])
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(PipesUsageError, match=match):
        PipesStdioMessageReader(**kwargs)


def test_output_targets() -> None:
    got: list[bytes] = []
    as_output_writer(got.append)(b"a")
    assert got == [b"a"]
    text = io.StringIO()
    write = as_output_writer(text)
    for byte in "é€\n".encode():  # a character cut between writes is not mangled
        write(bytes([byte]))
    assert text.getvalue() == "é€\n"
    binary = io.BytesIO()
    wrapper = io.TextIOWrapper(binary, encoding="utf-8")
    as_output_writer(wrapper)(b"raw\xff")  # a text file with a buffer gets the raw bytes
    assert binary.getvalue() == b"raw\xff"
    wrapper.detach()
    with pytest.raises(PipesUsageError):
        as_output_writer(42)  # type: ignore[arg-type]


def test_the_default_output_is_our_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    handler = PipesMessageHandler({})
    reader = PipesStdioMessageReader()
    with reader.read_messages(handler):
        reader.read_source([b"to our stdout\n", message(1) + b"\n"])
    err_reader = PipesStdioMessageReader("stderr")
    assert err_reader.messages_params() == {"stdio": "stderr"}
    with err_reader.read_messages(handler):
        err_reader.read_source([b"to our stderr\n"])
    captured = capfd.readouterr()
    assert captured.out == "to our stdout\n"
    assert captured.err == "to our stderr\n"
    assert handler.message_count == 1


# ---------------------------------------------------------------------------------------------- real processes


FLOOD_CHILD = """
import sys
from pipes_ext import open_pipes

n = int(sys.argv[1])
with open_pipes() as pipes:
    for i in range(n):
        sys.stdout.write("output line %d %s\\n" % (i, "." * 200))
        if i % 3 == 0:
            sys.stdout.flush()
            pipes.report_custom_message(i)
        if i % 1000 == 0:
            sys.stderr.write("err %d\\n" % i)
    sys.stdout.write("no newline at the end")  # the closed message is glued to it
"""


def test_a_real_process_flooding_stdout_and_messages(write_script: Callable[..., Path]) -> None:
    """~40 MB of output with 66,667 messages on one pipe: everything arrives, in order, without deadlock."""
    script = write_script(FLOOD_CHILD)
    n = 200_000
    out = bytearray()
    payloads: list[Any] = []

    def on_event(event: PipesEvent) -> None:
        if isinstance(event, PipesCustomMessageEvent):
            payloads.append(event.payload)

    err_path = script.parent / "err.txt"
    with open(err_path, "wb") as err:
        invocation = PipesSubprocessClient(message_reader=PipesStdioMessageReader()).run(
            command=[PYTHON, str(script), str(n)], on_event=on_event, retain_messages=False,
            stdout=out.extend, stderr=err, timeout_seconds=600,
        )
    assert invocation.exit_code == 0 and invocation.session.closed
    assert payloads == list(range(0, n, 3))
    lines = bytes(out).split(b"\n")
    assert lines[-1] == b"no newline at the end"
    assert [int(line.split()[2]) for line in lines[:-1]] == list(range(n))
    assert err_path.read_text().splitlines() == [f"err {i}" for i in range(0, n, 1000)]


def test_reading_a_pipe_directly(write_script: Callable[..., Path]) -> None:
    """The reader without a client: a pipe handed to consume()."""
    script = write_script("""
        import os, sys
        for i in range(3):
            print("line", i)
            print('{"__dagster_pipes_version": "0.1", "method": "report_custom_message", '
                  '"params": {"payload": %d}}' % i)
    """)
    record: list[tuple[str, Any]] = []
    handler = PipesMessageHandler({}, on_event=lambda e: record.append(("message", getattr(e, "payload", None))))
    reader = PipesStdioMessageReader(output=lambda data: record.append(("out", data)))
    with reader.read_messages(handler):
        process = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, env={**os.environ})
        assert process.stdout is not None
        reader.consume(process.stdout)
        process.wait()
    assert reader.unfinished_sources == 0
    assert [r for r in record if r[0] == "message"] == [("message", i) for i in range(3)]
    assert b"".join(v for k, v in record if k == "out") == b"line 0\nline 1\nline 2\n"


def test_the_stdio_and_file_readers_report_an_over_long_line_alike(tmp_path: Path) -> None:
    """One splitter cuts both streams: an over-long message line gets the same issue, ended or cut by the end."""
    from pipes_core import PipesFileMessageReader, PipesTempFileContextInjector, open_pipes_session

    big = message("w" * 3000)
    for ending in (b"\n", b""):  # with its newline, then cut by the end of the stream
        stdio_record, _, _ = read([message(1) + b"\n" + big[:1500], big[1500:] + ending], max_line_bytes=1000)
        path = tmp_path / f"messages-{len(ending)}"
        with open_pipes_session(None, PipesTempFileContextInjector(dir=str(tmp_path)),
                                PipesFileMessageReader(str(path), max_line_bytes=1000)) as session:
            with open(path, "ab") as f:
                f.write(message(1) + b"\n" + big + ending)
        reasons = [issue.reason for issue in session.protocol_issues]
        assert [k for k, _ in stdio_record] == ["message", "issue"]
        assert reasons == [stdio_record[1][1]]
        assert f"message line of {len(big)} bytes is longer than max_line_bytes=1000" in reasons[0]
