"""The message handler's own contract, each test written to fail under one specific change to the code (named in
its docstring): the retained-issue cap, the "after closed" warning, a failing external-stream handler, the
``opened`` extras, which remote exception wins, ``handle_message`` for custom readers. Also the transport
failures of the file channels on both sides, and closing the channel when ``open_pipes`` fails half-way."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExternalStreamEvent,
    PipesFileMessageReader,
    PipesMessageHandler,
    PipesOpenedEvent,
    PipesProtocolIssue,
    PipesRunContext,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    open_pipes_session,
)
from pipes_core.cli.main import main as cli_main
from pipes_core.protocol.handler import DEFAULT_LOGGER_NAME, MAX_RETAINED_ISSUES
from pipes_ext import (
    PipesMappingParamsLoader,
    PipesMessageWriter,
    PipesMessageWriterChannel,
    PipesTransportError,
    PipesUsageError,
    encode_param,
    open_pipes,
)
from pipes_ext._protocol import MAX_EXCEPTION_CHAIN_DEPTH, dumps_message, serialize_exception
from pipes_ext._writers import PipesFileMessageWriterChannel

OPENED = dumps_message("opened", {"extras": {}})
CLOSED = dumps_message("closed", {})


def custom(payload: Any) -> str:
    return dumps_message("report_custom_message", {"payload": payload})


def remote_error(message: str) -> dict[str, Any]:
    return {"message": message, "stack": [], "name": "ValueError", "cause": None, "context": None}


def make_handler(**kwargs: Any) -> tuple[PipesMessageHandler, list[PipesEvent]]:
    events: list[PipesEvent] = []
    return PipesMessageHandler({"asset_keys": None, "run_id": "r"}, on_event=events.append, **kwargs), events


# ------------------------------------------------------------------------------------------------ the handler


def test_retained_issues_stop_at_exactly_the_cap_and_the_rest_are_counted() -> None:
    """Fails if the cap is compared with ``<=`` (one issue too many kept) or not at all."""
    handler, events = make_handler(logger=logging.getLogger("test.handler.cap"))
    extra = 7
    for i in range(MAX_RETAINED_ISSUES + extra):
        handler.handle_line(f"not json {i}")
    assert MAX_RETAINED_ISSUES == 1000  # the documented figure
    assert len(handler.issues) == MAX_RETAINED_ISSUES
    assert handler.issue_count == MAX_RETAINED_ISSUES + extra
    assert handler.issues[-1].raw == f"not json {MAX_RETAINED_ISSUES - 1}"  # the first ones are kept
    assert len(events) == MAX_RETAINED_ISSUES + extra  # every issue still reaches on_event


def test_the_after_closed_warning_is_for_messages_after_closed_only(caplog: pytest.LogCaptureFixture) -> None:
    """Fails if the "message after closed" condition is inverted or dropped."""
    logger = logging.getLogger("test.handler.after_closed")
    handler, _ = make_handler(logger=logger)
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        handler.handle_line(OPENED)
        handler.handle_line(custom("before"))
        handler.handle_line(CLOSED)
        assert not [r for r in caplog.records if "after closed" in r.getMessage()]
        handler.handle_line(custom("late"))
    late = [r for r in caplog.records if "after closed" in r.getMessage()]
    assert len(late) == 1
    assert "report_custom_message" in late[0].getMessage()
    assert late[0].levelno >= logging.WARNING
    assert handler.custom_messages[0] == "before"


def test_an_exception_from_the_external_stream_handler_does_not_escape(caplog: pytest.LogCaptureFixture) -> None:
    """Fails if the external stream handler's exception propagates to the reader (which would stop reading)."""
    received: list[tuple[str, str]] = []

    def failing(stream: str, text: str) -> None:
        received.append((stream, text))
        raise RuntimeError("the terminal went away")

    logger = logging.getLogger("test.handler.stream")
    handler, events = make_handler(logger=logger, external_stream_handler=failing)
    with caplog.at_level(logging.ERROR, logger=logger.name):
        handler.handle_line(OPENED)
        handler.handle_line(dumps_message("log_external_stream", {"stream": "stdout", "text": "hi\n", "extras": {}}))
        handler.handle_line(custom("after"))
    assert received == [("stdout", "hi\n")]
    assert [type(e) for e in events] == [PipesOpenedEvent, PipesExternalStreamEvent, PipesCustomMessageEvent]
    assert handler.custom_messages == ["after"]
    assert any("external stream handler raised" in r.getMessage() for r in caplog.records)


def test_opened_extras_are_kept() -> None:
    """Fails if ``opened_extras`` is not taken from the ``opened`` message (e.g. set to ``{}``)."""
    handler, events = make_handler()
    extras = {"writer": "blob", "n": [1, 2]}
    handler.handle_line(dumps_message("opened", {"extras": extras}))
    assert handler.opened_extras == extras
    assert isinstance(events[0], PipesOpenedEvent)
    assert events[0].extras == extras


def test_the_first_remote_exception_wins() -> None:
    """Fails if a later ``closed`` replaces the exception of the first."""
    handler, events = make_handler(logger=logging.getLogger("test.handler.first"))
    handler.handle_line(OPENED)
    handler.handle_line(dumps_message("closed", {"exception": remote_error("first failure")}))
    handler.handle_line(dumps_message("closed", {"exception": remote_error("second failure")}))
    assert handler.exception is not None
    assert handler.exception.message == "first failure"
    closed = [e for e in events if isinstance(e, PipesClosedEvent)]
    assert closed[0].exception is not None and closed[0].exception.message == "first failure"


def test_a_closed_without_exception_keeps_an_earlier_one() -> None:
    handler, _ = make_handler(logger=logging.getLogger("test.handler.keep"))
    handler.handle_line(dumps_message("closed", {"exception": remote_error("only failure")}))
    handler.handle_line(CLOSED)
    assert handler.exception is not None and handler.exception.message == "only failure"


def test_exception_chains_are_cut_at_32_levels() -> None:
    """Fails if MAX_EXCEPTION_CHAIN_DEPTH changes without this documented figure changing too."""
    assert MAX_EXCEPTION_CHAIN_DEPTH == 32
    exc: BaseException = ValueError("level 0")
    for level in range(1, 50):
        try:
            raise ValueError(f"level {level}") from exc
        except ValueError as new:
            exc = new
    data = serialize_exception(exc)
    levels = 1
    while data["cause"] is not None:
        data = data["cause"]
        levels += 1
    assert levels == 32
    assert data["message"] == "ValueError: level 18\n"  # 49 down to 18: the newest 32 are kept


def test_handle_message_takes_decoded_messages_from_custom_readers() -> None:
    handler, events = make_handler(logger=logging.getLogger("test.handler.decoded"))
    handler.handle_message({"__dagster_pipes_version": "0.1", "method": "opened", "params": {"extras": {}}})
    handler.handle_message({"__dagster_pipes_version": "0.1", "method": "report_custom_message",
                            "params": {"payload": {"k": 1}}}, source="my-reader")
    handler.handle_message({"method": "report_custom_message"}, source="my-reader")  # no version, no params
    handler.handle_message(["not", "a", "message"], source="my-reader")
    assert handler.custom_messages == [{"k": 1}]
    assert handler.message_count == 2
    issues = [e for e in events if isinstance(e, PipesProtocolIssue)]
    assert len(issues) == 2 and handler.issue_count == 2
    assert all(issue.source == "my-reader" for issue in issues)
    assert issues[1].raw == repr(["not", "a", "message"])  # what was received, as text
    assert [type(e) for e in events[:2]] == [PipesOpenedEvent, PipesCustomMessageEvent]


# ------------------------------------------------------------------------------------------------ transport failures


def test_orchestrator_messages_file_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    reader = PipesFileMessageReader(str(tmp_path / "no-such-dir" / "messages.ndjson"))
    with pytest.raises(PipesUsageError, match=r"messages file.*does not exist"):
        with open_pipes_session(PipesRunContext(), PipesTempFileContextInjector(), reader):
            pytest.fail("the session must not start without its messages file")


# A write the file system refuses (the file-size limit standing in for a full disk), in a child so that the
# limit binds nothing else.
CONTEXT_WRITE_FAILS = """
import resource, signal, sys
from pipes_core import (PipesFileContextInjector, PipesFileMessageReader, PipesRunContext, PipesTransportError,
                        open_pipes_session)

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
injector = PipesFileContextInjector(sys.argv[1] + "/context.json")
try:
    with open_pipes_session(PipesRunContext(), injector, PipesFileMessageReader(sys.argv[1] + "/messages"),
                            extras={"big": "x" * 10_000}):
        print("the session started")
except PipesTransportError as exc:
    print("PipesTransportError:", exc)
"""


def test_orchestrator_cannot_write_the_context_file(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CONTEXT_WRITE_FAILS, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PipesTransportError: cannot write the context file"), result.stdout
    assert "File too large" in result.stdout
    assert not (tmp_path / "context.json").exists()  # what was created is removed


def test_external_side_cannot_open_the_messages_file(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "messages.ndjson"
    loader = PipesMappingParamsLoader({
        "DAGSTER_PIPES_CONTEXT": encode_param({"data": {"run_id": "r"}}),
        "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(path)}),
    })
    with pytest.raises(PipesTransportError, match="messages file"):
        open_pipes(params_loader=loader)


def test_external_side_write_failure_is_a_transport_error() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: a write fails with EPIPE
    channel = PipesFileMessageWriterChannel(write_end, "<pipe>")
    try:
        with pytest.raises(PipesTransportError, match="cannot write"):
            channel.write_line(custom("lost"))
    finally:
        channel.close()
    with pytest.raises(PipesTransportError, match="closed"):
        channel.write_line(custom("after close"))


class _RecordingChannel(PipesMessageWriterChannel):
    """A channel whose first write fails (so ``opened`` cannot be sent); it records being closed."""

    def __init__(self) -> None:
        self.closed = 0

    def write_line(self, line: str) -> None:
        raise PipesTransportError("the channel broke")

    def close(self) -> None:
        self.closed += 1


class _RecordingWriter(PipesMessageWriter):
    def __init__(self) -> None:
        self.channel = _RecordingChannel()

    def open(self, params: Mapping[str, Any]) -> PipesMessageWriterChannel:
        return self.channel


def test_the_channel_is_closed_when_sending_opened_fails() -> None:
    writer = _RecordingWriter()
    loader = PipesMappingParamsLoader({
        "DAGSTER_PIPES_CONTEXT": encode_param({"data": {"run_id": "r"}}),
        "DAGSTER_PIPES_MESSAGES": encode_param({}),
    })
    with pytest.raises(PipesTransportError, match="the channel broke"):
        open_pipes(params_loader=loader, message_writer=writer)
    assert writer.channel.closed == 1


# ------------------------------------------------------------------------------------------------ said once


UNCLOSED_CHILD = """
import os
from pipes_ext import open_pipes
pipes = open_pipes()
pipes.report_custom_message("sent")
os._exit(0)
"""


def test_a_client_run_warns_once_about_a_missing_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = tmp_path / "child.py"
    script.write_text(UNCLOSED_CHILD, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        invocation = PipesSubprocessClient().run(command=[sys.executable, str(script)])
    assert invocation.missing_closed
    said = [r for r in caplog.records if "never sent closed" in r.getMessage()]
    assert len(said) == 1, [(r.name, r.getMessage()) for r in said]


def test_the_command_line_adds_its_null_handler_once(tmp_path: Path) -> None:
    external = logging.getLogger(DEFAULT_LOGGER_NAME)
    before, propagate = list(external.handlers), external.propagate
    try:
        for _ in range(3):
            out = io.StringIO()
            assert cli_main(["run", "--json", "--no-strict", "--", sys.executable, "-c", "pass"], out) == 0
        added = [h for h in external.handlers if h not in before]
        assert len([h for h in external.handlers if isinstance(h, logging.NullHandler)]) == 1, added
    finally:
        external.handlers[:] = before
        external.propagate = propagate


def test_the_method_tables_name_the_same_methods() -> None:
    """A method is known in three tables (validation, dispatch, JSON encoding): they must agree."""
    from pipes_core.protocol.json_events import EVENT_NAMES
    from pipes_ext._protocol import METHOD_SPECS, METHODS

    handler, _ = make_handler()
    assert list(METHOD_SPECS) == [m for m in METHOD_SPECS if m in METHODS] and set(METHOD_SPECS) == set(METHODS)
    assert set(handler._methods) == set(METHODS)
    assert {method for _, method in EVENT_NAMES.values()} - {"protocol_issue"} == set(METHODS)
