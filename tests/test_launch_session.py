"""open_pipes_session, PipesSession and PipesRunContext: context data, bootstrap params, results and events.

The external side runs in this process (``open_pipes`` with a mapping params loader built from the session's
bootstrap env vars), writing to the real messages file that the real reader follows.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import pytest

from pipes_core import (
    DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEnvContextInjector,
    PipesEvent,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesRunContext,
    PipesSession,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesUsageError,
    decode_param,
    open_pipes_session,
)
from pipes_ext import PipesCliArgsParamsLoader, PipesContext, PipesMappingParamsLoader, open_pipes
from pipes_ext._protocol import dumps_message
from tests.support.helpers import wait_until

CONTEXT_KEYS = {
    "asset_keys",
    "code_version_by_asset_key",
    "provenance_by_asset_key",
    "partition_key",
    "partition_key_range",
    "partition_time_window",
    "run_id",
    "job_name",
    "retry_number",
    "extras",
}



def external(session: PipesSession) -> PipesContext:
    """The external side of ``session``, opened in this process."""
    return open_pipes(params_loader=PipesMappingParamsLoader(session.get_bootstrap_env_vars()))


@contextmanager
def session_for(context: PipesRunContext | None = None, **kwargs: Any) -> Iterator[PipesSession]:
    with open_pipes_session(
        context, PipesTempFileContextInjector(), PipesTempFileMessageReader(), **kwargs
    ) as session:
        yield session


def append_raw(session: PipesSession, text: str) -> None:
    with open(session.message_params["path"], "a", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------- run context


def test_context_data_has_all_ten_keys_for_an_empty_context() -> None:
    data = PipesRunContext().to_context_data()
    assert set(data) == CONTEXT_KEYS
    assert data["asset_keys"] is None
    assert data["code_version_by_asset_key"] is None
    assert data["provenance_by_asset_key"] is None
    assert data["partition_key"] is None
    assert data["partition_key_range"] is None
    assert data["partition_time_window"] is None
    assert data["job_name"] is None
    assert data["retry_number"] == 0
    assert data["extras"] == {}


def test_context_data_full() -> None:
    provenance = {"code_version": "7", "input_data_versions": {"up": "v1"}, "is_user_provided": True}
    ctx = PipesRunContext(
        asset_keys=["b", ["a", "x/y"], "a", ["b"]],
        code_version_by_asset_key={"b": "2", "a/x\\/y": "1"},
        provenance_by_asset_key={"a": provenance},
        partition_key="2024-01-02",
        partition_time_window=(
            datetime(2024, 1, 2, tzinfo=timezone.utc),
            datetime(2024, 1, 3, 6, 30, tzinfo=timezone.utc),
        ),
        run_id="run-1",
        job_name="job",
        retry_number=2,
    )
    extras = {"rows": 10, "nested": {"k": [1, 2]}}
    data = ctx.to_context_data(extras)
    assert set(data) == CONTEXT_KEYS
    # Sorted, deduplicated, escaped.
    assert data["asset_keys"] == ["a", "a/x\\/y", "b"]
    assert data["code_version_by_asset_key"] == {"a": None, "a/x\\/y": "1", "b": "2"}
    assert data["provenance_by_asset_key"] == {"a": provenance, "a/x\\/y": None, "b": None}
    assert data["partition_key"] == "2024-01-02"
    # A partition key implies a one-key range.
    assert data["partition_key_range"] == {"start": "2024-01-02", "end": "2024-01-02"}
    assert data["partition_time_window"] == {
        "start": "2024-01-02T00:00:00+00:00",
        "end": "2024-01-03T06:30:00+00:00",
    }
    assert data["run_id"] == "run-1"
    assert data["job_name"] == "job"
    assert data["retry_number"] == 2
    assert data["extras"] == extras
    # The document is a copy: mutating it does not change what the next call produces.
    data["extras"]["rows"] = 0
    assert ctx.to_context_data(extras)["extras"]["rows"] == 10
    json.dumps(data)  # JSON-serialisable as is


def test_explicit_partition_range_and_string_window_are_kept() -> None:
    ctx = PipesRunContext(
        partition_key_range=("a", "c"), partition_time_window=("2024-01-01T00:00:00", "2024-02-01T00:00:00")
    )
    data = ctx.to_context_data()
    assert data["partition_key"] is None
    assert data["partition_key_range"] == {"start": "a", "end": "c"}
    assert data["partition_time_window"] == {"start": "2024-01-01T00:00:00", "end": "2024-02-01T00:00:00"}


def test_default_run_id_is_a_fresh_uuid() -> None:
    first = PipesRunContext().to_context_data()["run_id"]
    second = PipesRunContext().to_context_data()["run_id"]
    assert str(uuid.UUID(first)) == first
    assert uuid.UUID(first).version == 4
    assert first != second


def test_context_data_rejects_inconsistent_input() -> None:
    with pytest.raises(PipesUsageError, match="not selected"):
        PipesRunContext(asset_keys=["a"], code_version_by_asset_key={"b": "1"}).to_context_data()
    with pytest.raises(PipesUsageError, match="need asset_keys"):
        PipesRunContext(code_version_by_asset_key={"b": "1"}).to_context_data()
    with pytest.raises(PipesUsageError, match="single string"):
        PipesRunContext(asset_keys="abc").to_context_data()
    with pytest.raises(PipesUsageError, match="retry_number"):
        PipesRunContext(retry_number=-1).to_context_data()


def test_open_pipes_session_rejects_bad_arguments() -> None:
    with pytest.raises(PipesUsageError, match="PipesRunContext"):
        with open_pipes_session({"asset_keys": None}, PipesEnvContextInjector(),  # type: ignore[arg-type]
                                PipesTempFileMessageReader()):
            pass
    with pytest.raises(PipesUsageError, match="extras"):
        with open_pipes_session(None, PipesEnvContextInjector(), PipesTempFileMessageReader(),
                                extras=[1, 2]):  # type: ignore[arg-type]
            pass


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_params_round_trip_through_decode_param() -> None:
    ctx = PipesRunContext(asset_keys=["a"], run_id="rid")
    with session_for(ctx, extras={"x": 1}) as session:
        params = session.get_bootstrap_params()
        assert params == {
            DAGSTER_PIPES_CONTEXT_ENV_VAR: session.context_params,
            DAGSTER_PIPES_MESSAGES_ENV_VAR: session.message_params,
        }
        env = session.get_bootstrap_env_vars()
        assert set(env) == {DAGSTER_PIPES_CONTEXT_ENV_VAR, DAGSTER_PIPES_MESSAGES_ENV_VAR}
        assert decode_param(env[DAGSTER_PIPES_CONTEXT_ENV_VAR]) == session.context_params
        assert decode_param(env[DAGSTER_PIPES_MESSAGES_ENV_VAR]) == session.message_params

        cli = session.get_bootstrap_cli_arguments()
        assert list(cli) == [DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT, DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT]
        assert decode_param(cli[DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT]) == session.context_params
        assert decode_param(cli[DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT]) == session.message_params
        argv = session.get_bootstrap_argv()
        assert argv == [
            DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT, cli[DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT],
            DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT, cli[DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT],
        ]

        # The temp-file injector's context file holds exactly the context data.
        with open(session.context_params["path"], encoding="utf-8") as f:
            assert json.load(f) == session.context_data
        assert session.message_params["path"].endswith("messages")
        assert session.message_params["include_stdio_in_messages"] is False

        # The external side, bootstrapped from the CLI arguments, sees the same context.
        with open_pipes(params_loader=PipesCliArgsParamsLoader(["prog", *argv, "--other"])) as pipes:
            assert pipes.run_id == "rid"
            assert pipes.asset_key == "a"
            assert pipes.extras == {"x": 1}
    assert session.opened and session.closed


def test_env_injector_inlines_the_context() -> None:
    with open_pipes_session(
        PipesRunContext(run_id="r2"), PipesEnvContextInjector(), PipesTempFileMessageReader(),
        extras={"e": [1]},
    ) as session:
        decoded = decode_param(session.get_bootstrap_env_vars()[DAGSTER_PIPES_CONTEXT_ENV_VAR])
        assert decoded == {"data": session.context_data}
        assert decoded["data"]["extras"] == {"e": [1]}
        with external(session) as pipes:
            assert pipes.run_id == "r2"
            assert not pipes.is_asset_step


# ---------------------------------------------------------------------------------------------- results


def test_get_results_order_implicit_and_metadata_merge() -> None:
    with session_for(PipesRunContext(asset_keys=["a", "b", "c"])) as session:
        with external(session) as pipes:
            pipes.report_asset_check("not_null", passed=False, severity="WARN", asset_key="b",
                                     metadata={"owner": "ext", "n": 3})
            pipes.report_asset_materialization(metadata={"rows": 1, "owner": "ext"}, data_version="v9",
                                               asset_key="c")
            pipes.report_asset_materialization(asset_key="a")

    reported = session.get_reported_results()
    assert [type(r) for r in reported] == [AssetCheckResult, MaterializeResult, MaterializeResult]
    assert [r.asset_key for r in reported] == ["b", "c", "a"]

    results = session.get_all_results()
    assert results[:3] == reported
    assert results[3] == MaterializeResult("b", implicit=True)
    assert len(results) == 4
    assert all(not r.implicit for r in results[:3] if isinstance(r, MaterializeResult))
    assert session.get_all_results(implicit_materializations=False) == reported

    merged = session.get_all_results(metadata={"owner": "orch", "extra": 5})
    assert [r.asset_key for r in merged] == ["b", "c", "a", "b"]
    check, mat_c, mat_a, implicit_b = merged
    assert isinstance(check, AssetCheckResult)
    assert check.passed is False and check.severity == "WARN" and check.check_name == "not_null"
    assert check.metadata == {
        "owner": MetadataValue("text", "orch"),  # the orchestrator's value wins
        "n": MetadataValue("int", 3),
        "extra": MetadataValue("int", 5),
    }
    assert isinstance(mat_c, MaterializeResult)
    assert mat_c.data_version == "v9"
    assert mat_c.metadata == {
        "rows": MetadataValue("int", 1),
        "owner": MetadataValue("text", "orch"),
        "extra": MetadataValue("int", 5),
    }
    assert mat_a.metadata == {"owner": MetadataValue("text", "orch"), "extra": MetadataValue("int", 5)}
    assert isinstance(implicit_b, MaterializeResult) and implicit_b.implicit
    assert implicit_b.metadata == mat_a.metadata
    # A MetadataValue passed as is is kept as is.
    typed = session.get_all_results(metadata={"u": MetadataValue("url", "http://x")})
    assert typed[0].metadata["u"] == MetadataValue("url", "http://x")
    # Merging did not alter the reported results.
    assert session.get_reported_results() == reported
    # The stream, called once after the session, hands out the same, then nothing.
    assert session.get_results(metadata={"owner": "orch", "extra": 5}) == merged
    assert session.get_results() == []
    assert session.get_all_results() == results


def test_snapshots_while_the_session_runs_consume_nothing() -> None:
    with session_for(PipesRunContext(asset_keys=["a", "b"])) as session:
        pipes = external(session)
        pipes.report_asset_materialization(asset_key="a", metadata={"k": 1})
        wait_until(lambda: session.message_count >= 2)
        first = session.get_all_results()
        second = session.get_all_results()
        assert first == second
        # No implicit materialization while the process runs: "b" may still be reported.
        assert [(r.asset_key, r.implicit) for r in first] == [("a", False)]
        first.clear()  # the caller owns the list
        assert session.get_all_results() == second
        assert session.get_reported_results() == second
        pipes.report_asset_materialization(asset_key="b")
        pipes.close()
        wait_until(lambda: session.closed)
        third = session.get_all_results()
        assert [(r.asset_key, r.implicit) for r in third] == [("a", False), ("b", False)]
    assert session.get_all_results() == third
    assert session.get_all_results() == third


def test_custom_messages_and_logs() -> None:
    with session_for() as session:
        with external(session) as pipes:
            pipes.report_custom_message({"n": 1})
            pipes.log.info("first")
            pipes.report_custom_message([1, "two", None])
            pipes.log.warning("second %s", "arg")
            pipes.report_custom_message("three")
    assert session.get_custom_messages() == [{"n": 1}, [1, "two", None], "three"]
    assert session.get_logs() == [PipesLogEvent("INFO", "first"), PipesLogEvent("WARNING", "second arg")]
    assert session.message_count == 7  # opened, 5, closed
    assert session.get_results() == []  # no assets selected: nothing implicit


def test_on_event_receives_every_event_in_order() -> None:
    events: list[PipesEvent] = []
    with session_for(PipesRunContext(asset_keys=["a"]), on_event=events.append) as session:
        with external(session) as pipes:
            pipes.log.debug("dbg")
            pipes.report_custom_message(1)
            pipes.report_asset_materialization(metadata={"m": "x"})
            pipes.report_asset_check("c", passed=True)
            for i in range(100):
                pipes.report_custom_message(i)
    assert isinstance(events[0], PipesOpenedEvent)
    assert events[1] == PipesLogEvent("DEBUG", "dbg")
    assert events[2] == PipesCustomMessageEvent(1)
    assert events[3] == MaterializeResult("a", {"m": MetadataValue("text", "x")}, None)
    assert events[4] == AssetCheckResult("a", "c", True, "ERROR", {})
    assert events[5:105] == [PipesCustomMessageEvent(i) for i in range(100)]
    assert events[105] == PipesClosedEvent(None)
    assert len(events) == 106


def test_retain_messages_false_keeps_nothing_but_streams_everything() -> None:
    events: list[PipesEvent] = []
    ctx = PipesRunContext(asset_keys=["a"])
    with session_for(ctx, on_event=events.append, retain_messages=False) as session:
        with external(session) as pipes:
            pipes.log.info("hello")
            for i in range(50):
                pipes.report_custom_message(i)
            pipes.report_asset_materialization()
            pipes.report_asset_check("c", passed=False)
    assert session.get_custom_messages() == []
    assert session.get_logs() == []
    assert session.get_reported_results() == []
    handler = session.handler
    assert handler.results == [] and handler.custom_messages == [] and handler.logs == []
    assert [e.payload for e in events if isinstance(e, PipesCustomMessageEvent)] == list(range(50))
    assert [type(e).__name__ for e in events if not isinstance(e, PipesCustomMessageEvent)] == [
        "PipesOpenedEvent", "PipesLogEvent", "MaterializeResult", "AssetCheckResult", "PipesClosedEvent",
    ]
    # The lifecycle is still tracked.
    assert session.opened and session.closed and session.message_count == 55


def test_a_raising_on_event_callback_does_not_stop_reading(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[PipesEvent] = []

    def callback(event: PipesEvent) -> None:
        seen.append(event)
        if isinstance(event, PipesCustomMessageEvent) and event.payload % 2 == 0:
            raise RuntimeError(f"callback failed on {event.payload}")

    with caplog.at_level(logging.ERROR, logger="pipes_core.external"):
        with session_for(on_event=callback) as session:
            with external(session) as pipes:
                for i in range(20):
                    pipes.report_custom_message(i)
    assert session.get_custom_messages() == list(range(20))
    assert [e.payload for e in seen if isinstance(e, PipesCustomMessageEvent)] == list(range(20))
    assert isinstance(seen[-1], PipesClosedEvent)
    assert session.closed
    errors = [str(e) for e in session.handler.callback_errors]
    assert errors == [f"callback failed on {i}" for i in range(0, 20, 2)]
    assert sum("on_event callback raised" in r.getMessage() for r in caplog.records) == 10


# ---------------------------------------------------------------------------------------------- lifecycle


def test_lifecycle_flags_clean_run() -> None:
    with session_for() as session:
        assert not session.opened and not session.closed and session.exception is None
        assert not session.finished
        pipes = external(session)
        wait_until(lambda: session.opened)
        assert not session.closed
        pipes.close()
        wait_until(lambda: session.closed)
    assert session.finished
    assert session.opened and session.closed and session.exception is None
    assert session.protocol_issues == [] and session.issue_count == 0


def test_lifecycle_flags_with_a_reported_exception() -> None:
    with session_for() as session:
        with pytest.raises(ValueError, match="boom"):
            with external(session):
                try:
                    raise KeyError("inner")
                except KeyError as exc:
                    raise ValueError("boom") from exc
    assert session.opened and session.closed
    remote = session.exception
    assert remote is not None
    assert remote.name == "ValueError"
    assert "boom" in remote.message
    assert remote.stack and any("raise ValueError" in frame for frame in remote.stack)
    assert remote.cause is not None and remote.cause.name == "KeyError"
    assert "inner" in remote.cause.message
    text = remote.format()
    assert text.index("KeyError") < text.index("direct cause") < text.index("ValueError: boom")


def test_warning_when_never_opened(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipes_core.external"):
        with session_for() as session:
            pass
    assert not session.opened
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "never opened the Pipes channel" in message
    assert "tempfile context injector" in message and "tempfile message reader" in message


def test_warning_when_opened_but_not_closed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipes_core.external"):
        with session_for() as session:
            append_raw(session, dumps_message("opened", {"extras": {}}) + "\n")
            append_raw(session, dumps_message("report_custom_message", {"payload": 1}) + "\n")
    assert session.opened and not session.closed
    assert session.get_custom_messages() == [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "never sent closed" in warnings[0]


def test_no_warning_for_a_clean_run(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipes_core.external"):
        with session_for() as session:
            with external(session):
                pass
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_custom_logger_receives_log_messages(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_core_session.custom")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        with session_for(logger=logger) as session:
            with external(session) as pipes:
                pipes.log.error("bad thing")
    records = [r for r in caplog.records if r.name == logger.name]
    assert [(r.levelno, r.getMessage()) for r in records if "bad thing" in r.getMessage()] == [
        (logging.ERROR, "bad thing")
    ]


def test_temp_files_are_private_and_removed() -> None:
    with session_for() as session:
        context_path = session.context_params["path"]
        messages_path = session.message_params["path"]
        for path in (context_path, messages_path):
            assert os.stat(path).st_mode & 0o777 == 0o600
            assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
        assert os.path.basename(os.path.dirname(context_path)).startswith("pipes-context-")
        assert os.path.basename(os.path.dirname(messages_path)).startswith("pipes-messages-")
    for path in (context_path, messages_path):
        assert not os.path.exists(path)
        assert not os.path.exists(os.path.dirname(path))
