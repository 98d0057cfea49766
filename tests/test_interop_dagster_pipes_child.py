"""Interop: scripts written with the real ``dagster_pipes`` package, run as real subprocesses by pipes_core.

Every public write method of ``dagster_pipes.PipesContext`` is exercised, over every local context injector
and message reader pipes_core has, and what pipes_core hands back is compared, value for value, with what
the child reported and with what the test injected.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
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
    PipesExternalStreamEvent,
    PipesFileContextInjector,
    PipesFileMessageReader,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesRunContext,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    open_pipes_session,
)
from tests.support.helpers import PYTHON

pytestmark = pytest.mark.interop

EXTERNAL_LOGGER = "pipes_core.external"

# The two selected assets; the first one needs escaping ("/" inside a component).
KEY_ESCAPED = "a/b\\/c"
KEY_OTHER = "other"

RUN_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
PROVENANCE_OTHER = {
    "code_version": "cv0",
    "input_data_versions": {"up/stream": "dv-up", "x\\/y": "dv-x"},
    "is_user_provided": True,
}
EXTRAS: dict[str, Any] = {
    "k": "v",
    "n": 3,
    "f": 0.5,
    "flag": False,
    "none": None,
    "nested": {"list": [1, "two", None], "obj": {"deep": True}},
    "unicode": "h\u00e9llo \u2713 \U0001f680",
}

# One entry per wire metadata type (all 17), with the plain "__infer__" values covering each inferred type.
TABLE_COLUMNS = [
    {"name": "a", "type": "int"},
    {
        "name": "b",
        "type": "string",
        "description": "letters",
        "tags": {"pii": "no"},
        "constraints": {"nullable": False, "unique": True, "other": ["short"]},
    },
]
LINEAGE = {
    "deps_by_column": {
        "a": [{"asset_key": "up", "column_name": "x"}],
        "b": [{"asset_key": ["pre", "up2"], "column_name": "y"}, {"asset_key": "up", "column_name": "z"}],
    }
}
METADATA: dict[str, Any] = {
    # __infer__ (plain values)
    "infer_text": "plain text \u00e9",
    "infer_int": 42,
    "infer_float": 2.5,
    "infer_bool": True,
    "infer_none": None,
    # (dagster_pipes rejects a plain dict value: only a list can be inferred as json from the child.)
    "infer_list": [1, "two", None],
    # explicit types
    "text": {"raw_value": "hello", "type": "text"},
    "url": {"raw_value": "https://example.com/x?y=1", "type": "url"},
    "path": {"raw_value": "/tmp/some/path.csv", "type": "path"},
    "notebook": {"raw_value": "/notebooks/n.ipynb", "type": "notebook"},
    "md": {"raw_value": "# Title\n\n*bold*", "type": "md"},
    "json": {"raw_value": {"nested": {"k": [1, 2, 3]}, "u": "\u00e9\u2713"}, "type": "json"},
    "json_list": {"raw_value": [1, {"x": 2}], "type": "json"},
    "float": {"raw_value": 3.25, "type": "float"},
    "float_from_int": {"raw_value": 3, "type": "float"},
    "int": {"raw_value": -7, "type": "int"},
    "bool": {"raw_value": False, "type": "bool"},
    "dagster_run": {"raw_value": RUN_ID, "type": "dagster_run"},
    "asset": {"raw_value": "upstream/asset", "type": "asset"},
    "null": {"raw_value": None, "type": "null"},
    "timestamp": {"raw_value": 1700000000.5, "type": "timestamp"},
    "timestamp_int": {"raw_value": 1700000000, "type": "timestamp"},
    "table": {
        "raw_value": {"records": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], "schema": TABLE_COLUMNS},
        "type": "table",
    },
    "table_schema": {"raw_value": {"columns": TABLE_COLUMNS}, "type": "table_schema"},
    "table_column_lineage": {"raw_value": LINEAGE, "type": "table_column_lineage"},
}
EXPECTED_METADATA = {
    "infer_text": MetadataValue("text", "plain text \u00e9"),
    "infer_int": MetadataValue("int", 42),
    "infer_float": MetadataValue("float", 2.5),
    "infer_bool": MetadataValue("bool", True),
    "infer_none": MetadataValue("null", None),
    "infer_list": MetadataValue("json", [1, "two", None]),
    "text": MetadataValue("text", "hello"),
    "url": MetadataValue("url", "https://example.com/x?y=1"),
    "path": MetadataValue("path", "/tmp/some/path.csv"),
    "notebook": MetadataValue("notebook", "/notebooks/n.ipynb"),
    "md": MetadataValue("md", "# Title\n\n*bold*"),
    "json": MetadataValue("json", {"nested": {"k": [1, 2, 3]}, "u": "\u00e9\u2713"}),
    "json_list": MetadataValue("json", [1, {"x": 2}]),
    "float": MetadataValue("float", 3.25),
    "float_from_int": MetadataValue("float", 3.0),
    "int": MetadataValue("int", -7),
    "bool": MetadataValue("bool", False),
    "dagster_run": MetadataValue("dagster_run", RUN_ID),
    "asset": MetadataValue("asset", "upstream/asset"),
    "null": MetadataValue("null", None),
    "timestamp": MetadataValue("timestamp", 1700000000.5),
    "timestamp_int": MetadataValue("timestamp", 1700000000.0),
    "table": MetadataValue(
        "table", {"records": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], "schema": TABLE_COLUMNS}
    ),
    "table_schema": MetadataValue("table_schema", {"columns": TABLE_COLUMNS}),
    "table_column_lineage": MetadataValue("table_column_lineage", LINEAGE),
}
# The Python type each value must arrive as (== alone would accept 3 for 3.0 and 1 for True).
EXPECTED_VALUE_TYPES = {
    "infer_int": int,
    "infer_float": float,
    "infer_bool": bool,
    "float": float,
    "float_from_int": float,
    "int": int,
    "bool": bool,
    "timestamp": float,
    "timestamp_int": float,
}

CHECK_METADATA = {
    "rows_checked": 10,
    "ratio": {"raw_value": 0.75, "type": "float"},
    "note": {"raw_value": "ok", "type": "md"},
}
CUSTOM_PAYLOADS: list[Any] = [
    None,
    True,
    False,
    0,
    -15,
    2**62,
    1.5,
    "",
    "a string \u00e9 \U0001f680",
    [],
    [1, "a", None, [2.5]],
    {},
    {"nested": {"list": [1, 2], "none": None, "bool": True}, "unicode": "\u2713"},
]
LOG_LINES = [
    ("DEBUG", "debug line"),
    ("INFO", "info line rows=5"),
    ("WARNING", "warning line \u00e9"),
    ("ERROR", "error line\nwith a second line"),
    ("CRITICAL", "critical line"),
]

CHILD_SOURCE = """
import json

from dagster_pipes import DagsterPipesError, open_dagster_pipes

METADATA = json.loads({metadata!r})
CHECK_METADATA = json.loads({check_metadata!r})
PAYLOADS = json.loads({payloads!r})


def capture(fn):
    try:
        fn()
    except DagsterPipesError as exc:
        return type(exc).__name__
    return "no error"


with open_dagster_pipes() as context:
    context.log.debug("debug line")
    context.log.info("info line rows=%d", 5)
    context.log.warning("warning line \\u00e9")
    context.log.error("error line\\nwith a second line")
    context.log.critical("critical line")

    readback = {{
        "is_asset_step": context.is_asset_step,
        "asset_keys": list(context.asset_keys),
        "asset_key_error": capture(lambda: context.asset_key),
        "code_version_by_asset_key": dict(context.code_version_by_asset_key),
        "provenance_by_asset_key": dict(context.provenance_by_asset_key),
        "is_partition_step": context.is_partition_step,
        "partition_key": context.partition_key,
        "partition_key_range": context.partition_key_range,
        "partition_time_window": context.partition_time_window,
        "run_id": context.run_id,
        "job_name": context.job_name,
        "retry_number": context.retry_number,
        "extras": dict(context.extras),
        "extra_k": context.get_extra("k"),
        "missing_extra_error": capture(lambda: context.get_extra("missing")),
    }}

    context.report_asset_materialization(metadata=METADATA, data_version="dv-1", asset_key={key_escaped!r})
    context.report_asset_materialization(asset_key={key_other!r})
    context.report_asset_check("check_pass", passed=True, asset_key={key_escaped!r}, metadata=CHECK_METADATA)
    context.report_asset_check("check_warn", passed=False, severity="WARN", asset_key={key_other!r})
    context.report_asset_check(
        "check_error", passed=False, severity="ERROR", asset_key={key_other!r}, metadata={{"why": "bad"}}
    )
    for payload in PAYLOADS:
        context.report_custom_message(payload)
    context.log_external_stream("stdout", "external stdout text\\n", extras={{"origin": "child"}})
    context.log_external_stream("stderr", "external stderr text\\n")
    context.report_custom_message({{"readback": readback}})
"""


def child_source() -> str:
    return CHILD_SOURCE.format(
        metadata=json.dumps(METADATA),
        check_metadata=json.dumps(CHECK_METADATA),
        payloads=json.dumps(CUSTOM_PAYLOADS),
        key_escaped=KEY_ESCAPED,
        key_other=KEY_OTHER,
    )


def run_context() -> PipesRunContext:
    return PipesRunContext(
        asset_keys=[["a", "b/c"], KEY_OTHER],
        code_version_by_asset_key={KEY_ESCAPED: "cv-1"},
        provenance_by_asset_key={KEY_OTHER: PROVENANCE_OTHER},
        partition_key="2024-01-05",
        partition_time_window=("2024-01-05T00:00:00+00:00", "2024-01-06T00:00:00+00:00"),
        run_id=RUN_ID,
        job_name="interop_job",
        retry_number=2,
    )


EXPECTED_READBACK = {
    "is_asset_step": True,
    "asset_keys": [KEY_ESCAPED, KEY_OTHER],
    "asset_key_error": "DagsterPipesError",
    "code_version_by_asset_key": {KEY_ESCAPED: "cv-1", KEY_OTHER: None},
    "provenance_by_asset_key": {KEY_ESCAPED: None, KEY_OTHER: PROVENANCE_OTHER},
    "is_partition_step": True,
    "partition_key": "2024-01-05",
    "partition_key_range": {"start": "2024-01-05", "end": "2024-01-05"},
    "partition_time_window": {"start": "2024-01-05T00:00:00+00:00", "end": "2024-01-06T00:00:00+00:00"},
    "run_id": RUN_ID,
    "job_name": "interop_job",
    "retry_number": 2,
    "extras": EXTRAS,
    "extra_k": "v",
    "missing_extra_error": "DagsterPipesError",
}


def make_injector(kind: str, tmp_path: Path) -> Any:
    if kind == "env":
        return PipesEnvContextInjector()
    if kind == "file":
        return PipesFileContextInjector(tmp_path / "context.json")
    return PipesTempFileContextInjector()


def make_reader(kind: str, tmp_path: Path) -> Any:
    if kind == "file":
        return PipesFileMessageReader(tmp_path / "messages.jsonl")
    return PipesTempFileMessageReader()


@pytest.mark.parametrize("reader_kind", ["file", "tempfile"])
@pytest.mark.parametrize("injector_kind", ["env", "file", "tempfile"])
def test_dagster_pipes_child_every_method(
    injector_kind: str,
    reader_kind: str,
    tmp_path: Path,
    write_script: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = write_script(child_source())
    events: list[PipesEvent] = []
    caplog.set_level(logging.DEBUG, logger=EXTERNAL_LOGGER)
    client = PipesSubprocessClient(
        context_injector=make_injector(injector_kind, tmp_path),
        message_reader=make_reader(reader_kind, tmp_path),
    )

    invocation = client.run(
        context=run_context(), command=[PYTHON, str(script)], extras=EXTRAS, on_event=events.append
    )
    session = invocation.session

    # The run itself: clean exit, no protocol issue, opened first and closed last without an exception.
    assert invocation.exit_code == 0
    assert session.protocol_issues == []
    assert session.issue_count == 0
    assert session.exception is None
    assert isinstance(events[0], PipesOpenedEvent)
    assert events[0].extras == {}
    assert events[-1] == PipesClosedEvent(None)
    assert sum(isinstance(e, (PipesOpenedEvent, PipesClosedEvent)) for e in events) == 2

    # The channels really were the ones asked for, and were cleaned up afterwards.
    if injector_kind == "env":
        assert set(session.context_params) == {"data"}
    else:
        assert set(session.context_params) == {"path"}
        assert not os.path.exists(session.context_params["path"])
        if injector_kind == "file":
            assert session.context_params["path"] == str(tmp_path / "context.json")
    assert session.message_params["include_stdio_in_messages"] is False
    assert not os.path.exists(session.message_params["path"])
    if reader_kind == "file":
        assert session.message_params["path"] == str(tmp_path / "messages.jsonl")

    # Results: exactly what was reported, in order; no implicit materialization (both assets were reported).
    results = invocation.get_results()
    assert results == [
        MaterializeResult(KEY_ESCAPED, EXPECTED_METADATA, "dv-1"),
        MaterializeResult(KEY_OTHER, {}, None),
        AssetCheckResult(
            KEY_ESCAPED,
            "check_pass",
            True,
            "ERROR",
            {
                "rows_checked": MetadataValue("int", 10),
                "ratio": MetadataValue("float", 0.75),
                "note": MetadataValue("md", "ok"),
            },
        ),
        AssetCheckResult(KEY_OTHER, "check_warn", False, "WARN", {}),
        AssetCheckResult(KEY_OTHER, "check_error", False, "ERROR", {"why": MetadataValue("text", "bad")}),
    ]
    materialization = results[0]
    assert isinstance(materialization, MaterializeResult)
    assert materialization.asset_key_path == ["a", "b/c"]
    assert not materialization.implicit
    assert list(materialization.metadata) == list(METADATA)
    for label, value_type in EXPECTED_VALUE_TYPES.items():
        assert type(materialization.metadata[label].value) is value_type, label
    assert invocation.get_asset_check_results() == results[2:]

    # Custom messages: every payload, in order, then the readback.
    custom = invocation.get_custom_messages()
    assert custom[:-1] == CUSTOM_PAYLOADS
    assert [type(p) for p in custom[:-1]] == [type(p) for p in CUSTOM_PAYLOADS]
    assert [e.payload for e in events if isinstance(e, PipesCustomMessageEvent)] == custom
    readback = custom[-1]["readback"]
    assert readback == EXPECTED_READBACK
    # What the child read back is what we injected.
    injected = session.context_data
    assert len(injected) == 10 and set(injected) <= set(readback)  # all ten context-data keys were read back
    for key in injected:
        assert readback[key] == injected[key], key

    # Logs: every level, with its text, in order, both in the session and on the external logger.
    assert session.get_logs() == [PipesLogEvent(level, text) for level, text in LOG_LINES]
    assert [e for e in events if isinstance(e, PipesLogEvent)] == session.get_logs()
    records = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == EXTERNAL_LOGGER and not r.getMessage().startswith("[pipes]")
    ]
    assert records == LOG_LINES

    # log_external_stream: to this process's stdout / stderr, and as events with their extras.
    streams = [e for e in events if isinstance(e, PipesExternalStreamEvent)]
    assert streams == [
        PipesExternalStreamEvent("stdout", "external stdout text\n", {"origin": "child"}),
        PipesExternalStreamEvent("stderr", "external stderr text\n", {}),
    ]
    captured = capsys.readouterr()
    assert "external stdout text\n" in captured.out
    assert "external stderr text\n" in captured.err
    assert "external stdout text" not in captured.err


EXCEPTION_CHILD = """
from dagster_pipes import open_dagster_pipes


def inner():
    raise KeyError("inner")


with open_dagster_pipes() as context:
    context.report_custom_message("before the error")
    try:
        inner()
    except KeyError as exc:
        {raise_statement}
"""


@pytest.mark.parametrize("chained_by", ["cause", "context"])
def test_dagster_pipes_child_exception(chained_by: str, write_script: Callable[..., Path]) -> None:
    raise_statement = 'raise ValueError("outer boom")'
    if chained_by == "cause":
        raise_statement += " from exc"
    script = write_script(EXCEPTION_CHILD.format(raise_statement=raise_statement))

    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient().run(
            context=PipesRunContext(asset_keys=["asset"]), command=[PYTHON, str(script)]
        )

    error = info.value
    assert error.exit_code == 1
    assert "outer boom" in str(error)
    remote = error.remote_exception
    assert remote is not None
    assert remote.name == "ValueError"
    assert remote.message == "ValueError: outer boom\n"
    assert str(remote) == "ValueError: outer boom"
    assert any(str(script) in frame and 'raise ValueError("outer boom")' in frame for frame in remote.stack)
    chained = remote.cause if chained_by == "cause" else remote.context
    other = remote.context if chained_by == "cause" else remote.cause
    assert other is None
    assert chained is not None
    assert chained.name == "KeyError"
    assert chained.message == "KeyError: 'inner'\n"
    assert any("in inner" in frame and 'raise KeyError("inner")' in frame for frame in chained.stack)
    assert chained.cause is None and chained.context is None
    # The traceback-like rendering links the chain the way Python does.
    link = "direct cause" if chained_by == "cause" else "During handling of the above exception"
    formatted = remote.format()
    assert link in formatted
    assert formatted.index("KeyError: 'inner'") < formatted.index("ValueError: outer boom")
    # What was reported before the error is still there.
    assert error.invocation is not None
    assert error.invocation.get_custom_messages() == ["before the error"]
    assert error.invocation.session.protocol_issues == []


CLI_CHILD = """
import sys

from dagster_pipes import PipesCliArgsParamsLoader, open_dagster_pipes

with open_dagster_pipes(params_loader=PipesCliArgsParamsLoader()) as context:
    context.log.info("via cli")
    context.report_asset_materialization(metadata={"argv_end": sys.argv[-2:]}, data_version="dv-cli")
    context.report_asset_check("cli_check", passed=True, severity="WARN")
    context.report_custom_message({"extras": dict(context.extras), "run_id": context.run_id})
"""


def test_dagster_pipes_child_cli_args_under_open_pipes_session(
    tmp_path: Path, write_script: Callable[..., Path]
) -> None:
    script = write_script(CLI_CHILD)
    context = PipesRunContext(asset_keys=[["grp", "asset"]], run_id="cli-run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    reader = PipesFileMessageReader(tmp_path / "messages")
    with open_pipes_session(context, PipesEnvContextInjector(), reader, extras={"via": "argv"}) as session:
        argv = session.get_bootstrap_argv()
        assert argv[0::2] == ["--dagster-pipes-context", "--dagster-pipes-messages"]
        completed = subprocess.run([PYTHON, str(script), *argv, "--user-flag", "kept"], env=env, check=False)

    assert completed.returncode == 0
    assert session.protocol_issues == []
    assert session.opened and session.closed
    assert session.get_results() == [
        MaterializeResult(
            "grp/asset", {"argv_end": MetadataValue("json", ["--user-flag", "kept"])}, "dv-cli"
        ),
        AssetCheckResult("grp/asset", "cli_check", True, "WARN", {}),
    ]
    assert session.get_custom_messages() == [{"extras": {"via": "argv"}, "run_id": "cli-run"}]
    assert session.get_logs() == [PipesLogEvent("INFO", "via cli")]


STDIO_CHILD = """
import sys

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as context:
    print("captured stdout line", flush=True)
    context.report_custom_message("done")
"""


@pytest.mark.slow  # dagster_pipes' tee capture alone takes ~6 s to shut down
def test_dagster_pipes_child_include_stdio_in_messages(
    write_script: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """dagster_pipes' tee-based stdio capture arrives as log_external_stream messages."""
    script = write_script(STDIO_CHILD)
    events: list[PipesEvent] = []
    client = PipesSubprocessClient(
        message_reader=PipesTempFileMessageReader(include_stdio_in_messages=True), forward_stdio=False
    )
    invocation = client.run(context=PipesRunContext(), command=[PYTHON, str(script)], on_event=events.append)

    assert invocation.session.message_params["include_stdio_in_messages"] is True
    assert invocation.session.protocol_issues == []
    assert invocation.get_custom_messages() == ["done"]
    stdout_text = "".join(
        e.text for e in events if isinstance(e, PipesExternalStreamEvent) and e.stream == "stdout"
    )
    assert "captured stdout line\n" in stdout_text
    assert "captured stdout line\n" in capsys.readouterr().out
