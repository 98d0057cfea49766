"""Interop: scripts written with pipes_ext, run by Dagster's own ``PipesSubprocessClient`` and
``open_pipes_session`` inside ``dagster.materialize()``.

What Dagster records (materializations with their typed metadata, data versions, asset check evaluations,
log records, the remote exception) is compared with what the child reported, value for value.

No ``from __future__ import annotations`` here: Dagster inspects the asset functions' annotations at runtime
(context type, resources).
"""

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.definitions.metadata.table import (
    TableColumn,
    TableColumnConstraints,
    TableColumnDep,
    TableColumnLineage,
    TableRecord,
    TableSchema,
)

from tests.support.helpers import PYTHON

pytestmark = [
    pytest.mark.interop,
    # Dagster 1.13's own open_pipes_session reads PipesMessageReader.expected_writer_count, which warns that
    # it is "in preview" (a PreviewWarning, not a UserWarning, so the pyproject's dagster filters miss it).
    pytest.mark.filterwarnings(
        "ignore:Function `PipesMessageReader.expected_writer_count` is currently in preview"
        ":dagster_shared.utils.warnings.PreviewWarning"
    ),
]


KEY_ESCAPED = dg.AssetKey(["a", "b/c"])  # "/" inside a component: travels as "a/b\/c"
KEY_OTHER = dg.AssetKey(["grp", "other"])
OTHER_RUN_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"

EXTRAS: dict[str, Any] = {
    "k": "v",
    "n": 3,
    "nested": {"list": [1, "two", None], "obj": {"deep": True}},
    "unicode": "h\u00e9llo \u2713 \U0001f680",
}

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
# All 17 wire metadata types; the plain values are sent as "__infer__".
METADATA: dict[str, Any] = {
    "infer_text": "plain text \u00e9",
    "infer_int": 42,
    "infer_float": 2.5,
    "infer_bool": True,
    "infer_none": None,
    "infer_dict": {"a": 1, "b": [1, 2]},
    "infer_list": [1, "two", None],
    "text": {"raw_value": "hello", "type": "text"},
    "url": {"raw_value": "https://example.com/x?y=1", "type": "url"},
    "path": {"raw_value": "/tmp/some/path.csv", "type": "path"},
    "notebook": {"raw_value": "/notebooks/n.ipynb", "type": "notebook"},
    "md": {"raw_value": "# Title\n\n*bold*", "type": "md"},
    "json": {"raw_value": {"nested": {"k": [1, 2, 3]}, "u": "\u00e9\u2713"}, "type": "json"},
    "json_list": {"raw_value": [1, {"x": 2}], "type": "json"},
    "float": {"raw_value": 3.25, "type": "float"},
    # Dagster's orchestrator rejects an int for "float"/"timestamp"; pipes_ext widens it before sending.
    "float_from_int": {"raw_value": 3, "type": "float"},
    "int": {"raw_value": -7, "type": "int"},
    "bool": {"raw_value": False, "type": "bool"},
    "dagster_run": {"raw_value": OTHER_RUN_ID, "type": "dagster_run"},
    "asset": {"raw_value": "upstream/asset", "type": "asset"},
    "null": {"raw_value": None, "type": "null"},
    "timestamp": {"raw_value": 1700000000.5, "type": "timestamp"},
    "timestamp_int": {"raw_value": 1700000000, "type": "timestamp"},
    "table": {
        "raw_value": {"records": [{"a": 1, "b": "x"}, {"a": 2, "b": None}], "schema": TABLE_COLUMNS},
        "type": "table",
    },
    "table_schema": {"raw_value": {"columns": TABLE_COLUMNS}, "type": "table_schema"},
    "table_column_lineage": {"raw_value": LINEAGE, "type": "table_column_lineage"},
}
EXPECTED_SCHEMA = TableSchema(
    columns=[
        TableColumn(name="a", type="int"),
        TableColumn(
            name="b",
            type="string",
            description="letters",
            tags={"pii": "no"},
            constraints=TableColumnConstraints(nullable=False, unique=True, other=["short"]),
        ),
    ]
)
EXPECTED_METADATA: dict[str, dg.MetadataValue] = {
    "infer_text": dg.MetadataValue.text("plain text \u00e9"),
    "infer_int": dg.MetadataValue.int(42),
    "infer_float": dg.MetadataValue.float(2.5),
    "infer_bool": dg.MetadataValue.bool(True),
    "infer_none": dg.MetadataValue.null(),
    "infer_dict": dg.MetadataValue.json({"a": 1, "b": [1, 2]}),
    "infer_list": dg.MetadataValue.json([1, "two", None]),
    "text": dg.MetadataValue.text("hello"),
    "url": dg.MetadataValue.url("https://example.com/x?y=1"),
    "path": dg.MetadataValue.path("/tmp/some/path.csv"),
    "notebook": dg.MetadataValue.notebook("/notebooks/n.ipynb"),
    "md": dg.MetadataValue.md("# Title\n\n*bold*"),
    "json": dg.MetadataValue.json({"nested": {"k": [1, 2, 3]}, "u": "\u00e9\u2713"}),
    "json_list": dg.MetadataValue.json([1, {"x": 2}]),
    "float": dg.MetadataValue.float(3.25),
    "float_from_int": dg.MetadataValue.float(3.0),
    "int": dg.MetadataValue.int(-7),
    "bool": dg.MetadataValue.bool(False),
    "dagster_run": dg.MetadataValue.dagster_run(OTHER_RUN_ID),
    "asset": dg.MetadataValue.asset(dg.AssetKey(["upstream", "asset"])),
    "null": dg.MetadataValue.null(),
    "timestamp": dg.MetadataValue.timestamp(1700000000.5),
    "timestamp_int": dg.MetadataValue.timestamp(1700000000.0),
    "table": dg.MetadataValue.table(
        records=[TableRecord({"a": 1, "b": "x"}), TableRecord({"a": 2, "b": None})], schema=EXPECTED_SCHEMA
    ),
    "table_schema": dg.MetadataValue.table_schema(EXPECTED_SCHEMA),
    "table_column_lineage": dg.MetadataValue.column_lineage(
        TableColumnLineage(
            deps_by_column={
                "a": [TableColumnDep(asset_key=dg.AssetKey(["up"]), column_name="x")],
                "b": [
                    TableColumnDep(asset_key=dg.AssetKey(["pre", "up2"]), column_name="y"),
                    TableColumnDep(asset_key=dg.AssetKey(["up"]), column_name="z"),
                ],
            }
        )
    ),
}
CUSTOM_PAYLOADS: list[Any] = [
    None,
    True,
    0,
    -15,
    2**62,
    1.5,
    "a string \u00e9 \U0001f680",
    [],
    [1, "a", None, [2.5]],
    {},
    {"nested": {"list": [1, 2], "none": None, "bool": True}},
]
LOG_LINES = [
    (10, "debug line"),
    (20, "info line rows=5"),
    (30, "warning line \u00e9"),
    (40, "error line\nwith a second line"),
    (50, "critical line"),
]

CHILD_SOURCE = """
import json

from pipes_ext import PipesUsageError, open_pipes

METADATA = json.loads({metadata!r})
PAYLOADS = json.loads({payloads!r})


def capture(fn):
    try:
        fn()
    except PipesUsageError as exc:
        return type(exc).__name__
    return "no error"


with open_pipes() as pipes:
    pipes.log.debug("debug line")
    pipes.log.info("info line rows=%d", 5)
    pipes.log.warning("warning line \\u00e9")
    pipes.log.error("error line\\nwith a second line")
    pipes.log.critical("critical line")
    readback = {{
        "is_asset_step": pipes.is_asset_step,
        "asset_keys": pipes.asset_keys,
        "asset_key_error": capture(lambda: pipes.asset_key),
        "code_version_by_asset_key": pipes.code_version_by_asset_key,
        "provenance_by_asset_key": pipes.provenance_by_asset_key,
        "is_partition_step": pipes.is_partition_step,
        "partition_key": pipes.partition_key,
        "partition_key_range": pipes.partition_key_range,
        "partition_time_window": pipes.partition_time_window,
        "run_id": pipes.run_id,
        "job_name": pipes.job_name,
        "retry_number": pipes.retry_number,
        "extras": pipes.extras,
        "extra_k": pipes.get_extra("k"),
    }}
    pipes.report_asset_materialization(metadata=METADATA, data_version="dv-1", asset_key={key_escaped!r})
    pipes.report_asset_materialization(asset_key={key_other!r}, data_version="dv-2")
    pipes.report_asset_check(
        "check_pass", passed=True, asset_key={key_other!r},
        metadata={{"rows_checked": 10, "ratio": {{"raw_value": 0.75, "type": "float"}}}},
    )
    pipes.report_asset_check("check_warn", passed=False, severity="WARN", asset_key={key_other!r})
    pipes.report_asset_check(
        "check_error", passed=False, severity="ERROR", asset_key={key_other!r}, metadata={{"why": "bad"}}
    )
    for payload in PAYLOADS:
        pipes.report_custom_message(payload)
    pipes.log_external_stream("stdout", "external stdout text\\n", extras={{"origin": "child"}})
    pipes.log_external_stream("stderr", "external stderr text\\n")
    pipes.report_custom_message({{"readback": readback}})
"""


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """An ephemeral instance, disposed of at the end (its temp storage dir is removed, not left to the GC)."""
    with dg.DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


def user_logs(instance: dg.DagsterInstance, run_id: str) -> list[tuple[int, str]]:
    """The run's log records that are not Dagster events and not Dagster's own "[pipes]" lines."""
    return [
        (entry.level, entry.user_message)
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is None and not entry.user_message.startswith("[pipes]")
    ]


def engine_events(instance: dg.DagsterInstance, run_id: str) -> list[Any]:
    return [
        entry
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is not None and entry.dagster_event.event_type_value == "ENGINE_EVENT"
    ]


def test_dagster_multi_asset_runs_pipes_ext_child(
    instance: dg.DagsterInstance, write_script: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    script = write_script(
        CHILD_SOURCE.format(
            metadata=json.dumps(METADATA),
            payloads=json.dumps(CUSTOM_PAYLOADS),
            key_escaped=KEY_ESCAPED.to_escaped_user_string(),
            key_other=KEY_OTHER.to_escaped_user_string(),
        )
    )
    stash: dict[str, Any] = {}

    @dg.multi_asset(
        name="pipes_ext_assets",
        outs={
            "escaped": dg.AssetOut(key=KEY_ESCAPED, code_version="cv-escaped"),
            "other": dg.AssetOut(key=KEY_OTHER),
        },
        check_specs=[
            dg.AssetCheckSpec("check_pass", asset=KEY_OTHER),
            dg.AssetCheckSpec("check_warn", asset=KEY_OTHER),
            dg.AssetCheckSpec("check_error", asset=KEY_OTHER),
        ],
        partitions_def=dg.StaticPartitionsDefinition(["p1", "p2"]),
    )
    def pipes_ext_assets(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient):
        invocation = pipes.run(context=context, command=[PYTHON, str(script)], extras=EXTRAS)
        stash["custom"] = invocation.get_custom_messages()
        stash["run_id"] = context.run.run_id
        stash["job_name"] = context.run.job_name
        yield from invocation.get_results()

    result = dg.materialize(
        [pipes_ext_assets],
        partition_key="p2",
        resources={"pipes": dg.PipesSubprocessClient()},
        instance=instance,
    )
    assert result.success

    # Materializations: both assets, exactly the reported metadata (every type), data versions, partition.
    materializations = {m.asset_key: m for m in result.asset_materializations_for_node("pipes_ext_assets")}
    assert set(materializations) == {KEY_ESCAPED, KEY_OTHER}
    escaped = materializations[KEY_ESCAPED]
    assert escaped.metadata == EXPECTED_METADATA
    assert list(escaped.metadata) == list(METADATA)
    assert escaped.tags is not None
    assert escaped.tags["dagster/data_version"] == "dv-1"
    assert escaped.tags["dagster/code_version"] == "cv-escaped"
    assert escaped.partition == "p2"
    other = materializations[KEY_OTHER]
    assert other.metadata == {}
    assert other.tags is not None
    assert other.tags["dagster/data_version"] == "dv-2"
    assert other.partition == "p2"

    # Asset checks: name, asset, outcome, severity and metadata as reported.
    evaluations = sorted(result.get_asset_check_evaluations(), key=lambda e: e.check_name)
    assert [(e.asset_key, e.check_name, e.passed, e.severity, dict(e.metadata)) for e in evaluations] == [
        (KEY_OTHER, "check_error", False, dg.AssetCheckSeverity.ERROR, {"why": dg.MetadataValue.text("bad")}),
        (
            KEY_OTHER,
            "check_pass",
            True,
            dg.AssetCheckSeverity.ERROR,
            {"rows_checked": dg.MetadataValue.int(10), "ratio": dg.MetadataValue.float(0.75)},
        ),
        (KEY_OTHER, "check_warn", False, dg.AssetCheckSeverity.WARN, {}),
    ]

    # Custom messages, as Dagster's completed invocation returns them.
    custom = list(stash["custom"])
    assert custom[:-1] == CUSTOM_PAYLOADS
    readback = custom[-1]["readback"]
    assert readback == {
        "is_asset_step": True,
        "asset_keys": ["a/b\\/c", "grp/other"],
        "asset_key_error": "PipesUsageError",
        "code_version_by_asset_key": {"a/b\\/c": "cv-escaped", "grp/other": None},
        "provenance_by_asset_key": {"a/b\\/c": None, "grp/other": None},
        "is_partition_step": True,
        "partition_key": "p2",
        "partition_key_range": {"start": "p2", "end": "p2"},
        "partition_time_window": None,
        "run_id": result.run_id,
        "job_name": "__ephemeral_asset_job__",
        "retry_number": 0,
        "extras": EXTRAS,
        "extra_k": "v",
    }
    assert readback["run_id"] == stash["run_id"]
    assert readback["job_name"] == stash["job_name"]

    # Logs: every level and text, in order, in Dagster's event log.
    assert user_logs(instance, result.run_id) == LOG_LINES
    # log_external_stream went to Dagster's stdout / stderr.
    captured = capsys.readouterr()
    assert "external stdout text\n" in captured.out
    assert "external stderr text\n" in captured.err
    # Dagster's reader never choked on a message (it reports that as an engine event and stops reading).
    messages = [e.user_message for e in engine_events(instance, result.run_id)]
    assert not [m for m in messages if "framework exception" in m], messages
    assert not [m for m in messages if "closed with exception" in m], messages


FAILING_CHILD = """
from pipes_ext import open_pipes


def inner():
    raise KeyError("inner")


with open_pipes() as pipes:
    pipes.log.info("about to fail")
    try:
        inner()
    except KeyError as exc:
        raise ValueError("outer boom") from exc
"""


def test_dagster_records_pipes_ext_exception(
    instance: dg.DagsterInstance, write_script: Callable[..., Path]
) -> None:
    script = write_script(FAILING_CHILD)

    @dg.asset(name="failing_asset")
    def failing_asset(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient):
        return pipes.run(context=context, command=[PYTHON, str(script)]).get_results()

    result = dg.materialize(
        [failing_asset],
        resources={"pipes": dg.PipesSubprocessClient()},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    assert result.asset_materializations_for_node("failing_asset") == []

    # The closed message's exception: an engine event carrying the structured error, cause chain included.
    closed = [e for e in engine_events(instance, result.run_id) if "closed with exception" in e.user_message]
    assert len(closed) == 1
    error = closed[0].dagster_event.event_specific_data.error
    assert error.cls_name == "ValueError"
    assert error.message == "ValueError: outer boom\n"
    assert any(str(script) in frame and 'raise ValueError("outer boom")' in frame for frame in error.stack)
    assert error.cause is not None
    assert error.cause.cls_name == "KeyError"
    assert error.cause.message == "KeyError: 'inner'\n"
    assert any('raise KeyError("inner")' in frame for frame in error.cause.stack)
    assert error.context is None
    # The step fails on the exit code.
    failures = result.get_step_failure_events()
    assert len(failures) == 1
    step_error = failures[0].step_failure_data.error
    assert step_error.cause is not None
    assert step_error.cause.cls_name == "DagsterPipesExecutionError"
    assert "External execution process failed with code 1" in step_error.cause.message
    # What was sent before the error arrived too.
    assert user_logs(instance, result.run_id) == [(20, "about to fail")]


CLI_CHILD = """
import sys

from pipes_ext import PipesCliArgsParamsLoader, open_pipes

with open_pipes(params_loader=PipesCliArgsParamsLoader()) as pipes:
    pipes.log.warning("via cli")
    pipes.report_asset_materialization(metadata={"argv_end": sys.argv[-2:]}, data_version="dv-cli")
    pipes.report_asset_check("cli_check", passed=False, severity="WARN", metadata={"n": 1})
    pipes.report_custom_message({"extras": pipes.extras, "asset_key": pipes.asset_key})
"""


def test_dagster_open_pipes_session_with_cli_args(
    instance: dg.DagsterInstance, tmp_path: Path, write_script: Callable[..., Path]
) -> None:
    """Bootstrap through argv (Dagster's get_bootstrap_cli_arguments) with the env context injector and a file
    message reader; the child finds its params with PipesCliArgsParamsLoader."""
    script = write_script(CLI_CHILD)
    stash: dict[str, Any] = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}

    @dg.asset(name="cli_asset", check_specs=[dg.AssetCheckSpec("cli_check", asset="cli_asset")])
    def cli_asset(context: dg.AssetExecutionContext):
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesEnvContextInjector(),
            message_reader=dg.PipesFileMessageReader(str(tmp_path / "messages")),
            extras={"via": "argv"},
        ) as session:
            args = [token for pair in session.get_bootstrap_cli_arguments().items() for token in pair]
            stash["args"] = args
            command = [PYTHON, str(script), *args, "--user-flag", "kept"]
            completed = subprocess.run(command, env=env, check=False)
            stash["returncode"] = completed.returncode
        stash["custom"] = session.get_custom_messages()
        yield from session.get_results()

    result = dg.materialize([cli_asset], instance=instance)
    assert result.success
    assert stash["returncode"] == 0
    assert stash["args"][0::2] == ["--dagster-pipes-context", "--dagster-pipes-messages"]

    [materialization] = result.asset_materializations_for_node("cli_asset")
    assert materialization.asset_key == dg.AssetKey(["cli_asset"])
    assert materialization.metadata == {"argv_end": dg.MetadataValue.json(["--user-flag", "kept"])}
    assert materialization.tags is not None
    assert materialization.tags["dagster/data_version"] == "dv-cli"
    [evaluation] = result.get_asset_check_evaluations()
    assert (evaluation.asset_key, evaluation.check_name, evaluation.passed, evaluation.severity) == (
        dg.AssetKey(["cli_asset"]),
        "cli_check",
        False,
        dg.AssetCheckSeverity.WARN,
    )
    assert dict(evaluation.metadata) == {"n": dg.MetadataValue.int(1)}
    assert list(stash["custom"]) == [{"extras": {"via": "argv"}, "asset_key": "cli_asset"}]
    assert user_logs(instance, result.run_id) == [(30, "via cli")]
