"""The protocol's JSON Schemas (conformance/_schema.py, ``python -m conformance schema``): valid draft 2020-12,
generated from pipes_ext._protocol's tables, met by what pipes_ext and dagster-pipes send (checked with the
``jsonschema`` package), and the suite's own small validator agrees with that package."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conformance._runner import LiteralChecker
from conformance._schema import build_schemas, message_problem, schema_text, validate
from pipes_core import PipesRunContext, PipesSubprocessClient
from pipes_ext._protocol import METHOD_SPECS, METHODS, encode_param
from tests.support.helpers import PYTHON
from tests.support.helpers import REPO_ROOT as REPO

COMMITTED = REPO / "conformance" / "schema"
SCHEMAS = build_schemas()
VALIDATOR = jsonschema.Draft202012Validator


def standard(name: str) -> jsonschema.Draft202012Validator:
    return VALIDATOR(SCHEMAS[name], format_checker=VALIDATOR.FORMAT_CHECKER)


def test_every_schema_is_valid_draft_2020_12() -> None:
    assert set(SCHEMAS) == {"context.schema.json", "message.schema.json",
                            *(f"params/{m}.schema.json" for m in METHODS)}
    for name, schema in SCHEMAS.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        VALIDATOR.check_schema(schema)
    ids = [schema["$id"] for schema in SCHEMAS.values()]
    assert len(set(ids)) == len(ids)


def test_the_committed_schemas_are_the_generated_ones() -> None:
    committed = {str(p.relative_to(COMMITTED)): p.read_text(encoding="utf-8") for p in COMMITTED.rglob("*.json")}
    assert committed == {name: schema_text(schema) for name, schema in SCHEMAS.items()}, \
        "regenerate them: python -m conformance schema --out conformance/schema"


def test_params_come_from_the_method_table() -> None:
    for method, spec in METHOD_SPECS.items():
        schema = SCHEMAS[f"params/{method}.schema.json"]
        assert list(schema["properties"]) == [param.name for param in spec.params]
        assert schema["required"] == [param.name for param in spec.params if param.required]


def test_the_schema_command_writes_the_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([PYTHON, "-m", "conformance", "schema", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(str(out / name) for name in SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert json.loads((out / name).read_text(encoding="utf-8")) == schema
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    proc = subprocess.run([PYTHON, "-m", "conformance", "schema", "--out", str(blocked)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "cannot write the schemas" in proc.stderr and "--out DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- real messages

CHILD = """
import sys
from {module} import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.debug("debug ✓")
    pipes.log.warning("warning")
    pipes.report_asset_materialization(metadata={{
        "text": "t", "int": 3, "float": 2.5, "bool": True, "none": None,
        "dict": {{"raw_value": {{"a": [1]}}, "type": "json"}},
        "url": {{"raw_value": "https://x", "type": "url"}}, "md": {{"raw_value": "# t", "type": "md"}},
        "ts": {{"raw_value": 1700000000.5, "type": "timestamp"}},
        "schema": {{"raw_value": {{"columns": [{{"name": "a", "type": "int"}}]}}, "type": "table_schema"}},
        "table": {{"raw_value": {{"records": [{{"a": 1}}], "schema": [{{"name": "a", "type": "int"}}]}},
                  "type": "table"}},
        "lineage": {{"raw_value": {{"deps_by_column": {{"a": [{{"asset_key": "up", "column_name": "x"}}]}}}},
                    "type": "table_column_lineage"}},
    }}, data_version="v1", asset_key="a")
    pipes.report_asset_check("c", True, asset_key="a", metadata={{"n": 1}})
    pipes.report_asset_check("w", False, severity="WARN", asset_key="a")
    pipes.report_custom_message({{"any": ["json", 1, None]}})
    pipes.report_custom_message(None)
    pipes.log_external_stream("stdout", "text\\n") if hasattr(pipes, "log_external_stream") else None
    try:
        raise KeyError("inner")
    except KeyError as exc:
        raise RuntimeError("outer") from exc
"""


def messages_from(module: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Run a child written with ``module`` (pipes_ext or dagster_pipes) bootstrapped by hand; its raw lines."""
    script = tmp_path / f"{module}_child.py"
    script.write_text(CHILD.format(module=module), encoding="utf-8")
    messages = tmp_path / f"{module}.jsonl"
    context = {"data": {"asset_keys": ["a"], "code_version_by_asset_key": None, "provenance_by_asset_key": None,
                        "partition_key": None, "partition_key_range": None, "partition_time_window": None,
                        "run_id": "r", "job_name": None, "retry_number": 0, "extras": {}}}
    env = {**os.environ, "DAGSTER_PIPES_CONTEXT": encode_param(context),
           "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(messages)})}
    proc = subprocess.run([PYTHON, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr  # the child raises at the end, on purpose
    return [json.loads(line) for line in messages.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("module", ["pipes_ext", "dagster_pipes"])
def test_real_messages_meet_the_schemas(module: str, tmp_path: Path) -> None:
    messages = messages_from(module, tmp_path)
    methods = [m["method"] for m in messages]
    assert methods[0] == "opened" and methods[-1] == "closed"
    assert {"log", "report_asset_materialization", "report_asset_check", "report_custom_message"} <= set(methods)
    assert messages[-1]["params"]["exception"]["cause"] is not None
    envelope = standard("message.schema.json")
    for message in messages:
        envelope.validate(message)
        standard(f"params/{message['method']}.schema.json").validate(message["params"])
        assert message_problem(message) is None


def test_the_context_document_meets_its_schema() -> None:
    invocation = PipesSubprocessClient().run(
        command=[PYTHON, "-c", "from pipes_ext import open_pipes\nwith open_pipes(): pass"],
        context=PipesRunContext(asset_keys=[["a", "b/c"], ["d"]], partition_key="2024-01-01",
                                partition_time_window=("2024-01-01T00:00:00", "2024-01-02T00:00:00"),
                                code_version_by_asset_key={"d": "v1"}, run_id="r1", job_name="j", retry_number=2),
        extras={"k": [1, {"x": None}]})
    document = json.loads(json.dumps(invocation.session.context_data))
    standard("context.schema.json").validate(document)
    assert validate(document, SCHEMAS["context.schema.json"]) is None
    missing_run_id = {k: v for k, v in document.items() if k != "run_id"}
    assert validate(missing_run_id, SCHEMAS["context.schema.json"]) == "(the document): missing 'run_id'"
    assert not standard("context.schema.json").is_valid(missing_run_id)


# ---------------------------------------------------------------------------------------------- both validators agree

V = {"__dagster_pipes_version": "0.1"}
GOOD = [
    {**V, "method": "opened", "params": {"extras": {}}},
    {**V, "method": "opened", "params": None},
    {**V, "method": "closed", "params": {}},
    {**V, "method": "closed", "params": {"exception": None}},
    {**V, "method": "closed", "params": {"exception": {"message": "m", "stack": [], "name": None,
                                                        "cause": {"message": "c", "stack": ["f\n"]}}}},
    {**V, "method": "log", "params": {"message": "m", "level": "CRITICAL"}},
    {**V, "method": "log", "params": {"message": "m"}},
    {**V, "method": "report_asset_materialization", "params": {"asset_key": "a/b\\/c", "data_version": None,
                                                               "metadata": None}},
    {**V, "method": "report_asset_check", "params": {"asset_key": "a", "check_name": "c", "passed": False,
                                                     "severity": "WARN", "metadata": {}}},
    {**V, "method": "report_custom_message", "params": {"payload": None}},
    {**V, "method": "log_external_stream", "params": {"stream": "stderr", "text": "", "extras": None}},
    {**V, "method": "report_custom_message", "params": {"payload": 1}, "unknown_top_level": True},
]
BAD = [
    ({"method": "opened", "params": {}}, "missing '__dagster_pipes_version'"),
    ({"__dagster_pipes_version": "0.2", "method": "opened", "params": {}}, "__dagster_pipes_version: expected"),
    ({**V, "method": "hello", "params": {}}, "method: \"hello\" is not one of"),
    ({**V, "method": "log", "params": {"level": "INFO"}}, "params: missing 'message'"),
    ({**V, "method": "log", "params": {"message": "m", "level": "warn"}}, "params.level: \"warn\" is not one of"),
    ({**V, "method": "log", "params": None}, "params: expected object, got null"),
    ({**V, "method": "report_asset_check", "params": {"asset_key": "a", "check_name": "c", "passed": "yes"}},
     "params.passed: expected boolean, got string"),
    ({**V, "method": "report_asset_check", "params": {"asset_key": "a", "check_name": "c", "passed": True,
                                                      "severity": "INFO"}}, "params.severity"),
    ({**V, "method": "report_asset_materialization",
      "params": {"asset_key": "a", "metadata": {"n": {"raw_value": "3", "type": "int"}}}},
     "params.metadata.n.raw_value: expected integer, got string"),
    ({**V, "method": "report_asset_materialization",
      "params": {"asset_key": "a", "metadata": {"n": {"raw_value": 3, "type": "integer"}}}},
     "params.metadata.n.type"),
    ({**V, "method": "report_asset_materialization", "params": {"asset_key": "a", "metadata": {"n": 3}}},
     "params.metadata.n: expected object"),
    ({**V, "method": "closed", "params": {"exception": {"message": "m", "stack": "not a list"}}},
     "params.exception"),
    ({**V, "method": "log_external_stream", "params": {"stream": "stdin", "text": "t"}}, "params.stream"),
    ({**V, "method": "report_custom_message", "params": {}}, "params: missing 'payload'"),
]


@pytest.mark.parametrize("message", GOOD, ids=range(len(GOOD)))
def test_valid_messages_pass_both_validators(message: dict[str, Any]) -> None:
    standard("message.schema.json").validate(message)
    assert message_problem(message) is None


@pytest.mark.parametrize(("message", "reason"), BAD, ids=range(len(BAD)))
def test_invalid_messages_fail_both_validators(message: dict[str, Any], reason: str) -> None:
    assert not standard("message.schema.json").is_valid(message)
    problem = message_problem(message)
    assert problem is not None and reason in problem, problem


def test_the_suite_reports_a_message_that_breaks_the_schema() -> None:
    checker = LiteralChecker()
    checker({**V, "method": "opened", "params": {"extras": {}}})
    bad = {**V, "method": "report_asset_check", "params": {"asset_key": "a", "check_name": "c", "passed": True,
                                                           "severity": "INFO", "metadata": None}}
    checker(bad)
    checker(bad)
    assert checker.count == 0 and checker.schema_count == 2
    assert checker.schema_first is not None
    assert checker.schema_first.startswith("message 1 (report_asset_check) breaks message.schema.json: "
                                           "params.severity: \"INFO\" is not one of")
