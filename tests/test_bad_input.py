"""One test per kind of bad input: each checks that the error is clear (it names what was wrong and where) and
that nothing else is lost: the other messages are still delivered and the offending text is kept verbatim on
the PipesProtocolIssue.

External side: bad bootstrap values, context files and messages params raise at ``open_pipes``; a payload
that cannot be serialised raises at the call site and leaves the channel usable. Orchestrator side: every bad
line becomes an issue on the session, and reading goes on.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import random
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEnvContextInjector,
    PipesEvent,
    PipesExecutionError,
    PipesFileContextInjector,
    PipesFileMessageReader,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesProtocolIssue,
    PipesRunContext,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    open_pipes_session,
)
from pipes_ext import (
    PipesMappingParamsLoader,
    PipesProtocolError,
    PipesTransportError,
    PipesUsageError,
    decode_param,
    encode_param,
    open_pipes,
)
from pipes_ext._protocol import MAX_DECODED_PARAM_BYTES

WriteScript = Callable[..., Path]
CONTEXT = "DAGSTER_PIPES_CONTEXT"
MESSAGES = "DAGSTER_PIPES_MESSAGES"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _line(method: str, params: Any) -> bytes:
    message = {"__dagster_pipes_version": "0.1", "method": method, "params": params}
    return (json.dumps(message) + "\n").encode()


# ----------------------------------------------------------------------------------------------------------
# External side: bootstrap values
# ----------------------------------------------------------------------------------------------------------


def _open_with(tmp_path: Path, context_value: str, messages_value: str | None = None) -> None:
    """Call open_pipes with these raw bootstrap values (default messages: a file in tmp_path); must raise."""
    messages_path = tmp_path / "messages"
    mapping = {
        CONTEXT: context_value,
        MESSAGES: encode_param({"path": str(messages_path)}) if messages_value is None else messages_value,
    }
    open_pipes(params_loader=PipesMappingParamsLoader(mapping))
    raise AssertionError("open_pipes accepted a bad bootstrap value")  # pragma: no cover


BAD_BOOTSTRAP = [
    ("not base64", "%%% not base64 %%%", "not valid base64"),
    ("not zlib", _b64(b'{"path": "/tmp/x"}'), "not zlib data"),
    ("gzip instead of zlib", _b64(gzip.compress(b'{"path": "/tmp/x"}')), "not zlib data"),
    ("not JSON", _b64(zlib.compress(b"path=/tmp/x")), "not UTF-8 JSON"),
    ("JSON not an object", encode_param(["/tmp/x"]), "must be a JSON object, got a list"),
]


@pytest.mark.parametrize(("value", "step"), [c[1:] for c in BAD_BOOTSTRAP], ids=[c[0] for c in BAD_BOOTSTRAP])
def test_bad_context_bootstrap_value_names_the_key_and_the_failing_step(
    tmp_path: Path, value: str, step: str
) -> None:
    with pytest.raises(PipesProtocolError) as info:
        _open_with(tmp_path, value)
    message = str(info.value)
    assert message.startswith(f'mapping key "{CONTEXT}": bootstrap param')
    assert step in message
    assert not (tmp_path / "messages").exists()  # no channel was half-opened


@pytest.mark.parametrize(("value", "step"), [c[1:] for c in BAD_BOOTSTRAP], ids=[c[0] for c in BAD_BOOTSTRAP])
def test_bad_messages_bootstrap_value_names_the_key_and_the_failing_step(
    tmp_path: Path, value: str, step: str
) -> None:
    context_file = tmp_path / "context.json"
    context_file.write_text(json.dumps({"run_id": "r"}), encoding="utf-8")
    with pytest.raises(PipesProtocolError) as info:
        _open_with(tmp_path, encode_param({"path": str(context_file)}), value)
    assert str(info.value).startswith(f'mapping key "{MESSAGES}": bootstrap param')
    assert step in str(info.value)


def test_missing_messages_bootstrap_value_says_so(tmp_path: Path) -> None:
    loader = PipesMappingParamsLoader({CONTEXT: encode_param({"data": {"run_id": "r"}})})
    with pytest.raises(PipesProtocolError, match=f'mapping key "{MESSAGES}" is not set'):
        open_pipes(params_loader=loader)


def _zlib_bomb(size: int) -> str:
    """base64(zlib(a valid JSON object of ``size`` bytes)), built without holding ``size`` bytes in memory."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(b'{"pad": "')]
    chunk = b"0" * (1 << 20)
    for _ in range(size // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.compress(b'"}'))
    parts.append(compressor.flush())
    return _b64(b"".join(parts))


@pytest.fixture(scope="module")
def bomb_200mb() -> str:
    return _zlib_bomb(200 * 1024 * 1024)


def test_zlib_bomb_is_refused_at_the_cap_without_inflating_it(bomb_200mb: str) -> None:
    assert len(bomb_200mb) < 1024 * 1024  # a small value...
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(PipesProtocolError) as info:
            decode_param(bomb_200mb)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"decompresses to more than {MAX_DECODED_PARAM_BYTES} bytes" in str(info.value)
    # ...that would inflate to 200 MiB of valid JSON. Decoding stopped at the cap: the peak is zlib's capped
    # output plus its final copy (about twice the cap), short of even one copy of the full 200 MiB.
    assert peak < 160 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB"
    assert elapsed < 20, elapsed


def test_zlib_bomb_in_the_environment_is_refused_by_open_pipes(tmp_path: Path, bomb_200mb: str) -> None:
    expected = f'mapping key "{CONTEXT}": bootstrap param decompresses to more'
    with pytest.raises(PipesProtocolError, match=expected):
        _open_with(tmp_path, bomb_200mb)
    assert not (tmp_path / "messages").exists()


def test_small_cap_refuses_a_modest_value() -> None:
    value = encode_param({"k": "v" * 10_000})
    with pytest.raises(PipesProtocolError, match="more than 1000 bytes"):
        decode_param(value, max_bytes=1000)
    assert decode_param(value)["k"] == "v" * 10_000


# ----------------------------------------------------------------------------------------------------------
# External side: context file and messages params
# ----------------------------------------------------------------------------------------------------------


def test_missing_context_file_is_a_transport_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "context"
    with pytest.raises(PipesTransportError) as info:
        _open_with(tmp_path, encode_param({"path": str(missing)}))
    assert "cannot read the context file" in str(info.value)
    assert str(missing) in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert not (tmp_path / "messages").exists()


@pytest.mark.parametrize(
    ("content", "error", "names_path"),
    [
        ("{not json", "is not JSON", True),
        ("", "is not JSON", True),
        ('{"run_id": "r"} {"run_id": "s"}', "is not JSON", True),
        ("[1, 2]", "context data must be a JSON object, got a list", False),
        ('{"run_id": "r", "asset_keys": "a"}', '"asset_keys" must be null or a list of strings', False),
    ],
)
def test_bad_context_file_is_a_protocol_error(
    tmp_path: Path, content: str, error: str, names_path: bool
) -> None:
    context_file = tmp_path / "context"
    context_file.write_text(content, encoding="utf-8")
    with pytest.raises(PipesProtocolError) as info:
        _open_with(tmp_path, encode_param({"path": str(context_file)}))
    assert error in str(info.value)
    if names_path:
        assert str(context_file) in str(info.value)
    assert not (tmp_path / "messages").exists()


def test_context_params_without_path_or_data(tmp_path: Path) -> None:
    expected = r"neither \"path\" nor \"data\" \(got keys: \['bucket', 'key'\]\)"
    with pytest.raises(PipesProtocolError, match=expected):
        _open_with(tmp_path, encode_param({"bucket": "b", "key": "k"}))


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"bucket": "b", "key_prefix": "p"}, "name no channel this writer knows"),
        ({}, "name no channel this writer knows"),
        ({"stdio": "stdin"}, "\"stdio\" must be \"stdout\" or \"stderr\", got 'stdin'"),
        ({"buffered_stdio": 1}, '"buffered_stdio" must be "stdout" or "stderr", got 1'),
        ({"path": 5}, 'messages params "path" must be a string'),
    ],
)
def test_messages_params_with_no_usable_channel(tmp_path: Path, params: dict[str, Any], error: str) -> None:
    with pytest.raises(PipesProtocolError) as info:
        _open_with(tmp_path, encode_param({"data": {"run_id": "r"}}), encode_param(params))
    assert error in str(info.value)
    if not params or "bucket" in params:
        assert f"(got keys: {sorted(params)})" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Orchestrator side: bad lines in the messages file
# ----------------------------------------------------------------------------------------------------------

OPENED = _line("opened", {"extras": {}})
BEFORE = _line("report_custom_message", {"payload": "before"})
AFTER = _line("log", {"message": "after", "level": "INFO"})
CLOSED = _line("closed", {})


def _feed(tmp_path: Path, data: bytes) -> tuple[Any, list[PipesEvent]]:
    """Write ``data`` into the messages file of a live session; return the finished session and its events."""
    events: list[PipesEvent] = []
    path = tmp_path / "messages"
    with open_pipes_session(None, PipesEnvContextInjector(), PipesFileMessageReader(path),
                            on_event=events.append) as session:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return session, events


def _msg(obj: dict[str, Any]) -> bytes:
    return json.dumps({"__dagster_pipes_version": "0.1", **obj}).encode()


CHECK = {"asset_key": "a", "check_name": "c", "passed": True, "severity": "ERROR", "metadata": None}
BAD_INT = {"rows": {"raw_value": "3", "type": "int"}}

BAD_LINES: list[tuple[str, bytes, str]] = [
    ("non-JSON", b"Traceback (most recent call last): oops", "message line is not JSON"),
    ("invalid UTF-8", b'{"__dagster_pipes_version": "0.1", "method": "log", \xff\xfe}', "line is not JSON"),
    ("JSON list", b'[{"method": "log"}]', "message must be a JSON object, got a list"),
    ("JSON number", b"123", "message must be a JSON object, got a number"),
    ("JSON string", b'"closed"', "message must be a JSON object, got a string"),
    ("JSON null", b"null", "message must be a JSON object, got null"),
    ("missing version field", b'{"method": "closed", "params": {}}', 'no "__dagster_pipes_version" field'),
    ("missing method", _msg({"params": {}}), '"method" must be a string'),
    ("method not a string", _msg({"method": ["log"], "params": {}}), '"method" must be a string'),
    ("unknown method", _msg({"method": "report_asset_observation", "params": {}}),
     "unknown message method 'report_asset_observation'"),
    ("params not an object", _msg({"method": "log", "params": ["m"]}),
     'log: "params" must be an object or null'),
    ("log without message", _msg({"method": "log", "params": {"level": "INFO"}}),
     'log: missing param "message"'),
    ("log message not a string", _msg({"method": "log", "params": {"message": {"m": 1}}}),
     'log: param "message" must be a string, got an object'),
    ("unknown log level", _msg({"method": "log", "params": {"message": "m", "level": "Level 25"}}),
     "log: unknown level 'Level 25'"),
    ("materialization without asset_key", _msg({"method": "report_asset_materialization", "params": {}}),
     'report_asset_materialization: missing param "asset_key"'),
    ("materialization with bad metadata",
     _msg({"method": "report_asset_materialization",
           "params": {"asset_key": "a", "data_version": None, "metadata": BAD_INT}}),
     'report_asset_materialization: metadata entry "rows": int metadata must be an integer, got a string'),
    ("check passed not a bool", _msg({"method": "report_asset_check", "params": {**CHECK, "passed": "yes"}}),
     'report_asset_check: param "passed" must be a boolean, got a string'),
    ("check missing passed",
     _msg({"method": "report_asset_check", "params": {k: v for k, v in CHECK.items() if k != "passed"}}),
     'report_asset_check: missing param "passed"'),
    ("check unknown severity",
     _msg({"method": "report_asset_check", "params": {**CHECK, "severity": "CRITICAL"}}),
     "report_asset_check: unknown severity 'CRITICAL'"),
    ("custom message without payload", _msg({"method": "report_custom_message", "params": {"data": 1}}),
     'report_custom_message: missing param "payload"'),
    ("external stream to stdin",
     _msg({"method": "log_external_stream", "params": {"stream": "stdin", "text": "t"}}),
     'log_external_stream: param "stream" must be "stdout" or "stderr"'),
]
# A closed with a malformed exception is no longer dropped as a bad line: it is salvaged (counted, its valid
# parts kept) with a bad_exception issue; see
# tests/test_protocol_handler_hostile_lines.py::test_malformed_closed_is_salvaged.


@pytest.mark.parametrize(("line", "reason"), [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_line_becomes_an_issue_and_reading_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, line: bytes, reason: str
) -> None:
    caplog.set_level(logging.ERROR, logger="pipes_core.external")
    session, events = _feed(tmp_path, OPENED + BEFORE + line + b"\n" + AFTER + CLOSED)
    assert len(events) == 5, events
    issue = events.pop(2)
    assert events == [
        PipesOpenedEvent({}),
        PipesCustomMessageEvent("before"),
        PipesLogEvent("INFO", "after"),
        PipesClosedEvent(None),
    ]
    assert isinstance(issue, PipesProtocolIssue)
    assert reason in issue.reason
    assert issue.raw == line.decode("utf-8", "replace")  # kept verbatim
    assert issue.source == str(tmp_path / "messages")
    assert session.protocol_issues == [issue]
    assert session.issue_count == 1
    assert session.message_count == 4
    assert session.get_custom_messages() == ["before"]
    assert session.closed
    assert session.exception is None
    # The issue is logged with its reason, where it came from and the offending text.
    logged = [r.getMessage() for r in caplog.records if r.name == "pipes_core.external"]
    source = str(tmp_path / "messages")
    assert any("protocol issue" in m and reason in m and source in m for m in logged), logged


def test_many_bad_lines_in_a_row_lose_no_good_line(tmp_path: Path) -> None:
    bad_lines = [bad for _, bad, _ in BAD_LINES]
    pairs = [_line("report_custom_message", {"payload": i}) + bad + b"\n" for i, bad in enumerate(bad_lines)]
    data = OPENED + b"".join(pairs) + CLOSED
    session, _ = _feed(tmp_path, data)
    assert session.get_custom_messages() == list(range(len(BAD_LINES)))
    expected_raw = [bad.decode("utf-8", "replace") for bad in bad_lines]
    assert [issue.raw for issue in session.protocol_issues] == expected_raw
    assert session.closed


def test_extra_unknown_keys_are_tolerated_not_issues(tmp_path: Path) -> None:
    line = _msg({"method": "log", "params": {"message": "m", "level": "INFO", "new_field": 1}, "envelope": 2})
    session, events = _feed(tmp_path, OPENED + line + b"\n" + CLOSED)
    assert session.protocol_issues == []
    assert events[1] == PipesLogEvent("INFO", "m")


@pytest.mark.parametrize(
    "partial",
    [
        # cut in the middle of the text, as a writer killed mid-write leaves it
        b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payl',
        # cut in the middle of a multi-byte character
        b'{"__dagster_pipes_version": "0.1", "method": "log", "params": {"message": "\xe6\x97',
        # happens to be complete JSON, but with no newline nothing says it is complete: not parsed either
        b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": 1}}',
    ],
    ids=["cut", "cut-utf8", "json-without-newline"],
)
def test_truncated_last_line_is_an_issue_and_not_parsed(tmp_path: Path, partial: bytes) -> None:
    session, events = _feed(tmp_path, OPENED + BEFORE + AFTER + partial)
    assert len(events) == 4, events
    assert events[:3] == [
        PipesOpenedEvent({}), PipesCustomMessageEvent("before"), PipesLogEvent("INFO", "after")
    ]
    issue = events[3]
    assert isinstance(issue, PipesProtocolIssue)
    assert "truncated final line" in issue.reason
    assert issue.raw == partial.decode("utf-8", "replace")
    assert session.protocol_issues == [issue]
    assert session.get_custom_messages() == ["before"]
    assert session.message_count == 3
    assert not session.closed


def test_child_killed_mid_write_keeps_earlier_messages(write_script: WriteScript) -> None:
    script = write_script(
        """
        import os, signal
        from pipes_ext import decode_param, open_pipes

        pipes = open_pipes()
        pipes.report_custom_message("before")
        pipes.log.info("still here")
        path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b'{"__dagster_pipes_version": "0.1", "method": "log", "params": {"mess')
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    with pytest.raises(PipesExecutionError, match="killed by SIGKILL") as info:
        PipesSubprocessClient(forward_stdio=False).run(command=[sys.executable, str(script)])
    session = info.value.invocation.session
    assert session.opened and not session.closed
    assert session.get_custom_messages() == ["before"]
    assert [log.message for log in session.get_logs()] == ["still here"]
    [issue] = session.protocol_issues
    assert "truncated final line" in issue.reason
    assert issue.raw == '{"__dagster_pipes_version": "0.1", "method": "log", "params": {"mess'


# ----------------------------------------------------------------------------------------------------------
# Large and non-ASCII payloads, through real processes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_50mb_custom_payload_is_delivered_intact(write_script: WriteScript) -> None:
    script = write_script(
        """
        import random
        from pipes_ext import open_pipes

        blob = random.Random(20240105).randbytes(25_000_000).hex()  # 50 MB of text, not one repeated byte
        with open_pipes() as pipes:
            pipes.report_custom_message("before")
            pipes.report_custom_message({"blob": blob, "end": "end 😀"})
            pipes.report_custom_message("after")
        """
    )
    invocation = PipesSubprocessClient(forward_stdio=False).run(command=[sys.executable, str(script)])
    expected_blob = random.Random(20240105).randbytes(25_000_000).hex()
    before, big, after = invocation.get_custom_messages()
    assert (before, after) == ("before", "after")
    assert len(big["blob"]) == 50_000_000
    assert big == {"blob": expected_blob, "end": "end 😀"}
    assert invocation.session.protocol_issues == []
    assert invocation.exit_code == 0


TEXTS = {
    "cjk": "漢字かなカナ한국어",
    "emoji": "😀👩‍👩‍👧‍👦🏳️‍🌈",
    "rtl": "مرحبا שלום",
    "combining": "e\u0301 n\u0303",
    "astral": "\U0001d54f\U00010348",
    "controls": "tab\tnewline\nnul\x00 line-sep\u2028",
}


def test_non_ascii_text_round_trips_through_a_real_process(tmp_path: Path, write_script: WriteScript) -> None:
    script = write_script(
        """
        from pipes_ext import open_pipes

        with open_pipes() as pipes:
            texts = pipes.get_extra("texts")
            key = pipes.asset_key
            for name, text in texts.items():
                pipes.log.warning(text)
            pipes.report_asset_materialization(
                metadata={name: {"raw_value": text, "type": "text"} for name, text in texts.items()},
                data_version=texts["cjk"],
            )
            pipes.report_asset_check("检查 ✓", passed=True, metadata={"note": texts["emoji"]})
            pipes.report_custom_message({"echo": texts, "key": key, "keys": {t: t for t in texts.values()}})
            pipes.log_external_stream("stderr", texts["emoji"] + texts["cjk"])
        """
    )
    key = ["資料", "😀/x"]  # escaped: 資料/😀\/x
    escaped = "資料/😀\\/x"
    streams: list[tuple[str, str]] = []
    messages_path = tmp_path / "messages"
    context_path = tmp_path / "context"
    with open_pipes_session(
        PipesRunContext(asset_keys=[key]),
        PipesFileContextInjector(context_path),
        PipesFileMessageReader(messages_path, cleanup_file=False),
        extras={"texts": TEXTS},
        external_stream_handler=lambda stream, text: streams.append((stream, text)),
    ) as session:
        completed = subprocess.run(
            [sys.executable, str(script)], env={**os.environ, **session.get_bootstrap_env_vars()},
            capture_output=True, timeout=60,
        )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    assert session.protocol_issues == []
    assert [log.message for log in session.get_logs()] == list(TEXTS.values())
    [materialization, check] = session.get_reported_results()
    assert materialization == MaterializeResult(
        escaped, {name: MetadataValue("text", text) for name, text in TEXTS.items()}, TEXTS["cjk"]
    )
    assert materialization.asset_key_path == key
    note = {"note": MetadataValue("text", TEXTS["emoji"])}
    assert check == AssetCheckResult(escaped, "检查 ✓", True, "ERROR", note)
    assert session.get_custom_messages() == [
        {"echo": TEXTS, "key": escaped, "keys": {t: t for t in TEXTS.values()}}
    ]
    assert streams == [("stderr", TEXTS["emoji"] + TEXTS["cjk"])]
    # On the wire it is ASCII JSON, as the reference writes it.
    raw = messages_path.read_bytes()
    assert raw.isascii()
    assert "\\ud83d\\ude00" in raw.decode()


# ----------------------------------------------------------------------------------------------------------
# Asset keys the external side would refuse, sent raw
# ----------------------------------------------------------------------------------------------------------

RAW_WRITER = """
import json, os
from pipes_ext import decode_param

def line(method, params):
    return json.dumps({"__dagster_pipes_version": "0.1", "method": method, "params": params}) + "\\n"

path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
lines = [
    line("opened", {"extras": {}}),
    line("report_asset_materialization", {"asset_key": "a", "data_version": "1", "metadata": None}),
    line("report_asset_materialization", {"asset_key": "a", "data_version": "2", "metadata": None}),
    line("report_asset_materialization", {"asset_key": "not/selected", "data_version": None,
                                          "metadata": None}),
    line("report_asset_check", {"asset_key": "elsewhere", "check_name": "c", "passed": True,
                                "severity": "ERROR", "metadata": None}),
    line("report_asset_check", {"asset_key": "b", "check_name": "c", "passed": False,
                                "severity": "WARN", "metadata": None}),
    line("report_custom_message", {"payload": "after"}),
    line("closed", {}),
]
with open(path, "a", encoding="utf-8") as f:
    for text in lines:
        f.write(text)
        f.flush()
"""


def _check_raw_asset_session(session: Any) -> None:
    issues = session.protocol_issues
    assert [i.reason for i in issues] == [
        "asset 'a' was materialized more than once",
        "materialization of asset 'not/selected', which is not selected (selected: ['a', 'b'])",
        "check 'c' on asset 'elsewhere', which is not selected (selected: ['a', 'b'])",
    ]
    assert '"data_version": "2"' in issues[0].raw
    assert '"asset_key": "not/selected"' in issues[1].raw
    assert '"asset_key": "elsewhere"' in issues[2].raw
    # Everything else was delivered: the first materialization, the valid check, the later message, closed.
    assert session.get_reported_results() == [
        MaterializeResult("a", {}, "1"),
        AssetCheckResult("b", "c", False, "WARN", {}),
    ]
    assert session.get_custom_messages() == ["after"]
    assert session.closed


def test_unknown_and_duplicate_assets_fail_a_strict_run(write_script: WriteScript) -> None:
    script = write_script(RAW_WRITER)
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient(forward_stdio=False).run(
            context=PipesRunContext(asset_keys=["a", "b"]), command=[sys.executable, str(script)]
        )
    message = str(info.value)
    assert "broke the Pipes protocol 3 time(s)" in message
    for fragment in ("materialized more than once", "'not/selected'", "'elsewhere'"):
        assert fragment in message
    assert info.value.exit_code == 0
    _check_raw_asset_session(info.value.invocation.session)


def test_unknown_and_duplicate_assets_are_listed_by_a_lenient_run(write_script: WriteScript) -> None:
    script = write_script(RAW_WRITER)
    invocation = PipesSubprocessClient(forward_stdio=False, strict=False).run(
        context=PipesRunContext(asset_keys=["a", "b"]), command=[sys.executable, str(script)]
    )
    assert invocation.exit_code == 0
    _check_raw_asset_session(invocation.session)
    # The unreported selected asset still gets its implicit materialization; the refused ones do not appear.
    assert [(r.asset_key, getattr(r, "implicit", None)) for r in invocation.get_results()] == [
        ("a", False), ("b", None), ("b", True)
    ]


# ----------------------------------------------------------------------------------------------------------
# Non-serialisable payloads at the call site
# ----------------------------------------------------------------------------------------------------------


class _NotJson:
    def __repr__(self) -> str:
        return "<NotJson>"


def test_unserialisable_payload_raises_at_the_call_site_and_writes_nothing(tmp_path: Path) -> None:
    messages_path = tmp_path / "messages"
    events: list[PipesEvent] = []
    circular: list[Any] = []
    circular.append(circular)
    with open_pipes_session(
        PipesRunContext(asset_keys=["a"]),
        PipesTempFileContextInjector(),
        PipesFileMessageReader(messages_path),
        on_event=events.append,
    ) as session:
        pipes = open_pipes(params_loader=PipesMappingParamsLoader(session.get_bootstrap_env_vars()))
        opened_only = messages_path.read_bytes()
        assert opened_only.count(b"\n") == 1 and b'"opened"' in opened_only

        for payload in (_NotJson(), {"nested": {1, 2}}, b"bytes", circular):
            with pytest.raises(PipesUsageError, match="report_custom_message: params are not JSON-serial"):
                pipes.report_custom_message(payload)
        with pytest.raises(PipesUsageError, match='metadata entry "bad"'):
            pipes.report_asset_materialization(metadata={"bad": _NotJson()})
        with pytest.raises(PipesUsageError, match="not JSON-serialisable"):
            pipes.report_asset_materialization(metadata={"nested": {"deep": _NotJson()}})
        with pytest.raises(PipesUsageError, match="not JSON-serialisable"):
            pipes.log_external_stream("stdout", "text", extras={"x": _NotJson()})
        assert messages_path.read_bytes() == opened_only  # nothing was written, not even a partial line

        # The context is still usable, and the refused materialization did not use up the asset's one report.
        pipes.report_custom_message({"ok": True})
        pipes.report_asset_materialization(metadata={"rows": 3})
        pipes.close()
    assert session.protocol_issues == []
    assert events == [
        PipesOpenedEvent({}),
        PipesCustomMessageEvent({"ok": True}),
        MaterializeResult("a", {"rows": MetadataValue("int", 3)}),
        PipesClosedEvent(None),
    ]


def test_unserialisable_payload_in_a_real_process(write_script: WriteScript) -> None:
    script = write_script(
        """
        from pipes_ext import PipesUsageError, open_pipes

        with open_pipes() as pipes:
            pipes.report_custom_message(1)
            try:
                pipes.report_custom_message({"when": object()})
            except PipesUsageError as exc:
                pipes.report_custom_message({"refused": str(exc)})
            pipes.report_custom_message(3)
        """
    )
    invocation = PipesSubprocessClient(forward_stdio=False).run(command=[sys.executable, str(script)])
    first, refused, last = invocation.get_custom_messages()
    assert (first, last) == (1, 3)
    assert "not JSON-serialisable" in refused["refused"]
    assert invocation.session.protocol_issues == []
    assert invocation.session.message_count == 5  # opened, three custom messages, closed
