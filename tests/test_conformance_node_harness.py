"""The Node.js conformance harness (conformance/harnesses/node/harness.js, no Pipes library) run under pipes_core:
every step op over every bootstrap mode x context channel x message channel it declares, its base64(zlib(json))
codec against the bootstrap vectors, and the whole suite through ``python -m conformance run``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from conformance._vectors import VECTORS_DIR, event_json, json_equal
from pipes_core import (
    PipesEnvContextInjector,
    PipesEvent,
    PipesMessageHandler,
    PipesMessageReader,
    PipesProtocolIssue,
    PipesRunContext,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    open_pipes_session,
)
from pipes_ext._protocol import decode_param
from tests.support.helpers import REPO_ROOT as REPO

HARNESS_DIR = REPO / "conformance" / "harnesses" / "node"
HARNESS = HARNESS_DIR / "harness.js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js (`node`) is not on PATH")

CAPABILITIES = json.loads((HARNESS_DIR / "capabilities.json").read_text(encoding="utf-8"))
COMBOS = [
    (boot, ctx, msgs)
    for boot in CAPABILITIES["bootstrap"]
    for ctx in CAPABILITIES["context_channels"]
    for msgs in CAPABILITIES["message_channels"]
]
# Two combinations that between them take every value of every axis: for variants of one op.
PAIR = [("env", "env", "file"), ("cli", "file", "stdio")]


class StdoutMessageReader(PipesMessageReader):
    """Messages on the child's stdout (``{"stdio": "stdout"}``); the test feeds the captured lines to the handler."""

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        yield {"stdio": "stdout"}


@dataclass
class Run:
    events: list[dict[str, Any]]  # everything between opened and closed, in the vectors' event form
    opened: int
    closed: list[dict[str, Any]]
    issues: list[PipesProtocolIssue]
    returncode: int
    stdout: str
    stderr: str
    context_data: dict[str, Any]


def run_harness(
    steps: list[dict[str, Any]],
    combo: tuple[str, str, str],
    context: PipesRunContext | None = None,
    *,
    capture: bool = False,
) -> Run:
    bootstrap, context_channel, messages = combo
    injector = PipesEnvContextInjector() if context_channel == "env" else PipesTempFileContextInjector()
    reader: PipesMessageReader = (
        StdoutMessageReader() if messages == "stdio" else PipesTempFileMessageReader(include_stdio_in_messages=capture)
    )
    seen: list[PipesEvent] = []
    streamed: list[tuple[str, str]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    with open_pipes_session(
        context or PipesRunContext(run_id="node-run"),
        injector,
        reader,
        extras={"conformance": {"case": "node-harness-test", "steps": steps}},
        on_event=seen.append,
        external_stream_handler=lambda stream, text: streamed.append((stream, text)),
    ) as session:
        argv = [str(NODE), str(HARNESS)]
        if bootstrap == "cli":
            argv += session.get_bootstrap_argv()
        else:
            env.update(session.get_bootstrap_env_vars())
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False)
        stdout = proc.stdout
        if messages == "stdio":
            assert stdout.endswith(b"\n") or not stdout, "the last message line has no newline"
            for line in stdout.splitlines():
                session.handler.handle_line(line, "stdout")
            stdout = b""
    events = [e for e in seen if not isinstance(e, PipesProtocolIssue)]
    as_json = [event_json(e) for e in events]
    # every log_external_stream event also reached the stream handler, verbatim
    assert [(e["stream"], e["text"]) for e in as_json if e["event"] == "external_stream"] == streamed
    body = [e for e in as_json if e["event"] not in ("opened", "closed")]
    return Run(
        events=body,
        opened=sum(e["event"] == "opened" for e in as_json),
        closed=[e for e in as_json if e["event"] == "closed"],
        issues=session.protocol_issues,
        returncode=proc.returncode,
        stdout=stdout.decode("utf-8"),
        stderr=proc.stderr.decode("utf-8"),
        context_data=session.context_data,
    )


def assert_clean(run: Run, *, returncode: int = 0, closed: bool = True) -> None:
    """opened first, closed last (or not at all), no protocol issue, the expected exit code."""
    assert run.issues == [], [str(i) for i in run.issues]
    assert run.returncode == returncode, run.stderr
    assert run.opened == 1
    if closed:
        assert run.closed == [{"event": "closed", "exception": None}], run.stderr
    else:
        assert run.closed == []


def assert_events(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert json_equal(got, want), f"\n got: {got}\nwant: {want}"


def materialization(key: str, path: list[str], metadata: dict[str, Any] | None = None,
                    data_version: str | None = None) -> dict[str, Any]:
    return {"event": "materialization", "asset_key": key, "asset_key_path": path, "metadata": metadata or {},
            "data_version": data_version}


def check(key: str, path: list[str], name: str, passed: bool, severity: str,
          metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"event": "check", "asset_key": key, "asset_key_path": path, "check_name": name, "passed": passed,
            "severity": severity, "metadata": metadata or {}}


SELECTED = PipesRunContext(asset_keys=[["a", "b/c"], "x"], run_id="node-run")
SINGLE = PipesRunContext(asset_keys=["only"], run_id="node-run")
METADATA = {
    "rows": {"raw_value": 10, "type": "__infer__"},
    "ratio": {"raw_value": 3, "type": "float"},
    "label": {"raw_value": "héllo ✓", "type": "text"},
    "table": {"raw_value": {"records": [{"id": 1}], "schema": [{"name": "id", "type": "int"}]}, "type": "table"},
}
RESOLVED = {
    "rows": {"type": "int", "value": 10},
    "ratio": {"type": "float", "value": 3.0},
    "label": {"type": "text", "value": "héllo ✓"},
    "table": {"type": "table", "value": {"records": [{"id": 1}], "schema": [{"name": "id", "type": "int"}]}},
}
PAYLOADS: list[Any] = [None, True, 0, -15, 1.5, "", "quote\" back\\slash\nnew line \u2028 \u0000 😀", [], {},
                       {"nested": {"list": [1, None, [2.5]]}}]

# (name, steps, context, expected body) for ops whose run ends with a plain closed and exit code 0.
OP_CASES: list[tuple[str, list[dict[str, Any]], PipesRunContext | None, list[dict[str, Any]]]] = [
    ("no_steps", [], None, []),
    ("log", [{"op": "log", "level": level, "message": f"{level} message ✓"}
             for level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")],
     None, [{"event": "log", "level": level, "message": f"{level} message ✓"}
            for level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")]),
    ("materialize", [{"op": "materialize", "asset_key": "a/b\\/c", "metadata": METADATA, "data_version": "v1"},
                     {"op": "materialize", "asset_key": "x", "metadata": None, "data_version": None}],
     SELECTED, [materialization("a/b\\/c", ["a", "b/c"], RESOLVED, "v1"), materialization("x", ["x"])]),
    ("materialize_default_key", [{"op": "materialize", "asset_key": None, "metadata": {}, "data_version": "7"}],
     SINGLE, [materialization("only", ["only"], None, "7")]),
    ("check", [{"op": "check", "asset_key": "x", "check_name": "fresh", "passed": False, "severity": "WARN",
                "metadata": {"age": {"raw_value": 30, "type": "int"}}},
               {"op": "check", "asset_key": "a/b\\/c", "check_name": "ok", "passed": True, "severity": "ERROR",
                "metadata": None}],
     SELECTED, [check("x", ["x"], "fresh", False, "WARN", {"age": {"type": "int", "value": 30}}),
                check("a/b\\/c", ["a", "b/c"], "ok", True, "ERROR")]),
    ("check_default_key", [{"op": "check", "asset_key": None, "check_name": "c", "passed": True, "severity": "ERROR",
                            "metadata": None}], SINGLE, [check("only", ["only"], "c", True, "ERROR")]),
    ("custom", [{"op": "custom", "payload": p} for p in PAYLOADS], None,
     [{"event": "custom_message", "payload": p} for p in PAYLOADS]),
    ("custom_many", [{"op": "custom_many", "count": 2000}], None,
     [{"event": "custom_message", "payload": {"seq": i}} for i in range(2000)]),
    ("custom_big", [{"op": "custom_big", "size": 1 << 20, "char": "é"}], None,
     [{"event": "custom_message", "payload": {"size": 1 << 20, "data": "é" * (1 << 20)}}]),
    ("stream", [{"op": "stream", "stream": "stdout", "text": "to stdout ✓\n"},
                {"op": "stream", "stream": "stderr", "text": "to stderr, no newline"}], None,
     [{"event": "external_stream", "stream": "stdout", "text": "to stdout ✓\n", "extras": {}},
      {"event": "external_stream", "stream": "stderr", "text": "to stderr, no newline", "extras": {}}]),
]


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
@pytest.mark.parametrize(("name", "steps", "context", "body"), OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op(name: str, steps: list[dict[str, Any]], context: PipesRunContext | None, body: list[dict[str, Any]],
            combo: tuple[str, str, str]) -> None:
    run = run_harness(steps, combo, context)
    assert_clean(run)
    assert_events(run.events, body)


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_echo_context_returns_the_context_data_sent(combo: tuple[str, str, str]) -> None:
    context = PipesRunContext(
        asset_keys=[["a", "b/c"], ["back\\slash"], ["données", "键/值"]],
        code_version_by_asset_key={"a/b\\/c": "cv1"},
        provenance_by_asset_key={"back\\\\slash": {"code_version": "cv0", "input_data_versions": {"u/p": "d1"},
                                                   "is_user_provided": False}},
        partition_key="2024-01-05",
        partition_time_window=("2024-01-05T00:00:00+00:00", "2024-01-06T00:00:00+00:00"),
        run_id="node-echo",
        job_name="jöb",
        retry_number=2,
    )
    run = run_harness([{"op": "echo_context"}], combo, context)
    assert_clean(run)
    assert len(run.context_data) == 10
    assert run.context_data["extras"]["conformance"]["steps"] == [{"op": "echo_context"}]
    assert_events(run.events, [{"event": "custom_message", "payload": {"context": run.context_data}}])


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_exit_sends_closed_then_exits_with_the_code(combo: tuple[str, str, str]) -> None:
    run = run_harness([{"op": "custom", "payload": "before"}, {"op": "exit", "code": 3},
                       {"op": "custom", "payload": "never"}], combo)
    assert_clean(run, returncode=3)
    assert_events(run.events, [{"event": "custom_message", "payload": "before"}])


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_crash_exits_17_without_closed_and_keeps_what_was_sent(combo: tuple[str, str, str]) -> None:
    run = run_harness([{"op": "custom_many", "count": 500}, {"op": "log", "level": "WARNING", "message": "bye"},
                       {"op": "crash"}, {"op": "custom", "payload": "never"}], combo)
    assert_clean(run, returncode=17, closed=False)
    assert_events(run.events, [{"event": "custom_message", "payload": {"seq": i}} for i in range(500)]
                  + [{"event": "log", "level": "WARNING", "message": "bye"}])


def _exception(message: str) -> dict[str, Any]:
    return {"name": "Error", "message": f"Error: {message}\n", "cause": None, "context": None}


def _without_stacks(exc: dict[str, Any] | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    assert exc["stack"] and all(isinstance(f, str) and f.startswith("    at ") for f in exc["stack"]), exc["stack"]
    return {"name": exc["name"], "message": exc["message"], "cause": _without_stacks(exc["cause"]),
            "context": _without_stacks(exc["context"])}


@pytest.mark.parametrize("combo", PAIR, ids=["-".join(c) for c in PAIR])
@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ({"op": "raise", "message": "boom ✓", "cause": None}, _exception("boom ✓")),
        ({"op": "raise", "message": "outer", "cause": "root cause"},
         {**_exception("outer"), "cause": _exception("root cause")}),
        ({"op": "raise", "message": "while handling", "cause": None, "context": "first"},
         {**_exception("while handling"), "context": _exception("first")}),
        ({"op": "no_such_op"}, _exception('unknown step op "no_such_op"')),
        ({"op": "materialize", "asset_key": "not/selected", "metadata": None, "data_version": None},
         _exception("asset key not/selected is not selected")),
    ],
    ids=["raise", "raise_cause", "raise_context", "unknown_op", "unselected_key"],
)
def test_errors_are_reported_in_closed(step: dict[str, Any], expected: dict[str, Any],
                                       combo: tuple[str, str, str]) -> None:
    run = run_harness([{"op": "custom", "payload": "before"}, step, {"op": "custom", "payload": "never"}], combo,
                      SELECTED)
    assert run.issues == []
    assert run.returncode == 1
    assert run.opened == 1
    assert len(run.closed) == 1
    exc = run.closed[0]["exception"]
    assert exc is not None and any("harness.js" in frame for frame in exc["stack"])
    assert _without_stacks(exc) == expected
    assert_events(run.events, [{"event": "custom_message", "payload": "before"}])


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[2] == "file"], ids=lambda c: "-".join(c))
def test_materializing_twice_is_refused_by_the_harness(combo: tuple[str, str, str]) -> None:
    step = {"op": "materialize", "asset_key": "x", "metadata": None, "data_version": None}
    run = run_harness([step, step], combo, SELECTED)
    assert run.returncode == 1 and run.issues == []
    assert run.closed[0]["exception"]["message"] == "Error: asset x is already materialized\n"
    assert_events(run.events, [materialization("x", ["x"])])


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_print_writes_to_the_process_streams(combo: tuple[str, str, str]) -> None:
    # With the stdio message channel the harness's stdout carries messages, so text goes to stderr only there.
    streams = ["stderr"] if combo[2] == "stdio" else ["stdout", "stderr"]
    run = run_harness([{"op": "print", "stream": s, "text": f"printed on {s} ✓\n"} for s in streams], combo)
    assert_clean(run)
    assert run.events == []
    for s in streams:
        assert f"printed on {s} ✓\n" in (run.stdout if s == "stdout" else run.stderr)


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[2] == "file"], ids=lambda c: "-".join(c))
def test_stdio_capture_sends_printed_text_as_external_stream(combo: tuple[str, str, str]) -> None:
    steps = [{"op": "print", "stream": "stdout", "text": "out ✓\n"},
             {"op": "print", "stream": "stderr", "text": "err\n"},
             {"op": "log", "level": "INFO", "message": "after"}]
    run = run_harness(steps, combo, capture=True)
    assert_clean(run)
    assert_events(run.events, [
        {"event": "external_stream", "stream": "stdout", "text": "out ✓\n", "extras": {}},
        {"event": "external_stream", "stream": "stderr", "text": "err\n", "extras": {}},
        {"event": "log", "level": "INFO", "message": "after"},
    ])
    assert run.stdout == "out ✓\n"  # still written to the process's own stream too
    assert "err\n" in run.stderr


def test_the_combinations_are_those_the_capabilities_declare() -> None:
    assert len(COMBOS) == 8 and set(PAIR) <= set(COMBOS)
    for axis in range(3):
        assert {c[axis] for c in PAIR} == {c[axis] for c in COMBOS}
    assert set(CAPABILITIES["features"]) == {"external_stream", "stdio_capture", "error_reporting", "error_context"}


def test_the_harness_refuses_to_run_outside_a_pipes_session() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    proc = subprocess.run([str(NODE), str(HARNESS)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode != 0
    assert "not launched by a Pipes orchestrator" in proc.stderr


def test_the_harness_has_no_dependency_beyond_the_node_standard_library() -> None:
    source = HARNESS.read_text(encoding="utf-8")
    assert sorted(set(re.findall(r"require\('([^']+)'\)", source))) == ["fs", "zlib"]
    assert "import " not in source
    assert len(source.splitlines()) <= 150


# ----------------------------------------------------------------------------------------------------------
# The harness's base64(zlib(json)) codec against the bootstrap vectors
# ----------------------------------------------------------------------------------------------------------

NODE_VECTOR_CHECK = r"""
const assert = require('assert');
const zlib = require('zlib');
const { decodeParam } = require(process.argv[1]);
const doc = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
const out = { decoded: [], valid: [], rejected: [], encoded: {} };
for (const v of doc.encode) {
  assert.deepStrictEqual(decodeParam(v.encoded), v.value, v.name);
  assert.strictEqual(JSON.stringify(JSON.parse(v.json)), JSON.stringify(v.value), v.name);
  out.decoded.push(v.name);
  out.encoded[v.name] = zlib.deflateSync(Buffer.from(v.json, 'utf8')).toString('base64');
}
for (const v of doc.decode_valid) {
  assert.deepStrictEqual(decodeParam(v.input), v.value, v.name);
  out.valid.push(v.name);
}
for (const v of doc.decode_invalid) {
  let accepted = false;
  try { decodeParam(v.input); accepted = true; } catch (err) { out.rejected.push(v.name); }
  assert.ok(!accepted, `${v.name} was accepted`);
}
process.stdout.write(JSON.stringify(out));
"""


def test_harness_codec_meets_every_bootstrap_vector() -> None:
    vectors = json.loads((VECTORS_DIR / "bootstrap.json").read_text(encoding="utf-8"))
    proc = subprocess.run([str(NODE), "-e", NODE_VECTOR_CHECK, str(HARNESS), str(VECTORS_DIR / "bootstrap.json")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["decoded"] == [v["name"] for v in vectors["encode"]]
    assert out["valid"] == [v["name"] for v in vectors["decode_valid"]]
    assert out["rejected"] == [v["name"] for v in vectors["decode_invalid"]]
    # The vectors' JSON text deflated by Node's zlib (a Chromium build): the orchestrator's decoder reads every one;
    # the bytes are the reference's for short params and may differ for longer ones (README of the vectors).
    for v in vectors["encode"]:
        assert decode_param(out["encoded"][v["name"]]) == v["value"]
    same = {v["name"] for v in vectors["encode"] if out["encoded"][v["name"]] == v["encoded"]}
    assert {"reference_example", "empty_object", "stdio_messages_params"} <= same


# ----------------------------------------------------------------------------------------------------------
# The whole suite
# ----------------------------------------------------------------------------------------------------------


def _suite(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conformance", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "conformance" / "__main__.py").exists(), reason="the suite runner is not there yet")
def test_the_conformance_suite_passes_with_the_node_harness() -> None:
    capabilities = "conformance/harnesses/node/capabilities.json"
    report = _suite("run", "--json", "--capabilities", capabilities, "--", str(NODE),
                    "conformance/harnesses/node/harness.js")
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    parsed = json.loads(report.stdout)
    assert parsed["summary"]["failed"] == 0 and parsed["summary"]["passed"] > 0, parsed["summary"]
    results: list[Mapping[str, Any]] = parsed["results"]
    assert [r for r in results if r["status"] not in ("pass", "skip")] == []
    # Skipped only for what the harness does not declare (blob stores), or a combination the case excludes.
    assert [r for r in results if r["status"] == "skip" and "not declared" not in r["reason"]
            and "stdio capture needs" not in r["reason"]] == []
    listed = json.loads(_suite("list", "--json").stdout)
    assert {r["case"] for r in results if r["status"] == "pass"} == {c["name"] for c in listed}
    passed = {(r["bootstrap"], r["context"], r["messages"]) for r in results if r["status"] == "pass"}
    assert {b for b, _, _ in passed} == {"env", "cli"}
    assert {c for _, c, _ in passed} == {"env", "file"}
    assert {m for _, _, m in passed} == {"file", "stdio"}
