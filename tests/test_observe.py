"""Observability: OpenTelemetry spans and metrics of a run, sent by the standard OTLP/HTTP exporter to a collector
this test serves on 127.0.0.1 and decoded with ``opentelemetry-proto``; the trace context reaching the external
process (its own spans join the run's trace); and the Chrome trace-event file of ``pipes run --trace``.

The global OpenTelemetry providers can be set once per process, and a configured provider would trace every later
run of this test process: so each traced run happens in a child process (the "orchestrator" script below) that
configures the SDK, runs the client and shuts the SDK down (flushing); the external process configures its own SDK
from the same ``OTEL_*`` environment variables.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from pipes_core import PipesRunContext, PipesStdioMessageReader, PipesSubprocessClient, TraceFileWriter
from pipes_core.observe.fanout import observers_for
from tests.support.helpers import PYTHON, REPO_ROOT

# How long a child run may take before the test gives up on it (a safety net, not a timed assertion).
RUN_LIMIT_SECONDS = 120
STATUS_CODE_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR

# The external process: its SDK from the OTEL_* env vars (the exporter's endpoint), one span of its own inside the
# pipes block; "fail" raises in the block.
CHILD = """
import sys
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

provider = TracerProvider(resource=Resource.create({"service.name": "child"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
from pipes_ext import open_pipes

with open_pipes() as pipes:
    if "chatty" in sys.argv:  # more logs than become span events, and a message of no known method (an issue)
        for i in range(100):
            pipes.log.info(f"chat {i}")
        pipes._send("no_such_method", {})
    with trace.get_tracer("child").start_as_current_span("child-work"):
        pipes.log.info("working")
        pipes.report_asset_materialization(metadata={"rows": 3}, data_version="v1")
        pipes.report_asset_check("positive", passed=True)
        pipes.report_custom_message({"traceparent": pipes.traceparent})
        if "fail" in sys.argv:
            raise ValueError("boom")
provider.shutdown()
"""

# The container's process (no network: it reports the TRACEPARENT it saw rather than exporting spans).
DOCKER_CHILD = """
import os
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_asset_materialization()
    pipes.report_custom_message({"traceparent": os.environ.get("TRACEPARENT")})
"""

# The orchestrator: the SDK configured once, a parent span of its own, one run, then the SDK shut down (flushed).
ORCHESTRATOR = """
import asyncio, json, sys
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

resource = Resource.create({"service.name": "orchestrator"})
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(tracer_provider)
# exported once, at shutdown
meter_provider = MeterProvider(resource=resource, metric_readers=[
    PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=3_600_000)])
metrics.set_meter_provider(meter_provider)

from pipes_core import PipesAsyncSubprocessClient, PipesRunContext, PipesSubprocessClient

mode, child = sys.argv[1], sys.argv[2]
context = PipesRunContext(asset_keys=["orders"], partition_key="2026-12-07")
out = {"run_id": context.run_id, "error": None, "messages": []}
with trace.get_tracer("test").start_as_current_span("job"):
    try:
        if mode == "sync":
            invocation = PipesSubprocessClient().run(command=[sys.executable, child], context=context)
        elif mode in ("fail", "chatty"):
            invocation = PipesSubprocessClient(strict=False).run(command=[sys.executable, child, mode],
                                                                 context=context)
        elif mode == "async":
            invocation = asyncio.run(PipesAsyncSubprocessClient().run(command=[sys.executable, child],
                                                                      context=context))
        else:
            from pipes_core.docker import PipesDockerClient
            invocation = PipesDockerClient().run(image=mode, command=["python3", "-c", child], context=context,
                                                 network="none")
        out["messages"] = invocation.get_custom_messages()
    except Exception as exc:
        out["error"] = type(exc).__name__
        out["messages"] = exc.invocation.get_custom_messages()
tracer_provider.shutdown()
meter_provider.shutdown()
print(json.dumps(out))
"""


# ---------------------------------------------------------------------------------------------- the collector


def _value(any_value: Any) -> Any:
    """An OTLP AnyValue as Python."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


class Collector:
    """An OTLP/HTTP endpoint (``/v1/traces``, ``/v1/metrics``) on a free port of 127.0.0.1 that keeps what it
    receives, decoded."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.metrics: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    collector.add_spans(ExportTraceServiceRequest.FromString(body))
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    collector.add_metrics(ExportMetricsServiceRequest.FromString(body))
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_spans(self, request: Any) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes).get("service.name")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append({
                            "service": service, "name": span.name, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                            "attributes": _attributes(span.attributes), "status": span.status.code,
                            "events": [(e.name, _attributes(e.attributes)) for e in span.events],
                        })

    def add_metrics(self, request: Any) -> None:
        with self.lock:
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        kind = metric.WhichOneof("data")
                        for point in getattr(metric, kind).data_points:
                            value = (point.count if kind == "histogram"
                                     else point.as_int if point.HasField("as_int") else point.as_double)
                            self.metrics.setdefault(metric.name, []).append(
                                {"kind": kind, "value": value, "attributes": _attributes(point.attributes)})

    def span(self, name: str) -> dict[str, Any]:
        (span,) = [s for s in self.spans if s["name"] == name]
        return span

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector()
    try:
        yield collector
    finally:
        collector.stop()


def _orchestrate(collector: Collector, mode: str, child: str, tmp_path: Path, **env: str) -> dict[str, Any]:
    """Run the orchestrator script for ``mode`` in a child process (its own session: stopped with its group if
    anything fails); its JSON answer."""
    script = tmp_path / "orchestrator.py"
    script.write_text(ORCHESTRATOR, encoding="utf-8")
    child_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                 "OTEL_METRIC_EXPORT_INTERVAL": "3600000", **env}
    child_env.pop("OTEL_SERVICE_NAME", None)
    with subprocess.Popen([PYTHON, str(script), mode, child], env=child_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=RUN_LIMIT_SECONDS)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
    assert process.returncode == 0, stderr
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def _child_script(tmp_path: Path) -> str:
    path = tmp_path / "child.py"
    path.write_text(CHILD, encoding="utf-8")
    return str(path)


def _assert_traceparent_of(messages: list[Any], run: dict[str, Any]) -> None:
    """The one custom message carries the W3C traceparent of ``run``: version 00, its trace and span ids, and the
    sampled flag (bit 0; the SDK may set the random-trace-id bit too)."""
    ((traceparent,),) = [list(message.values()) for message in messages]
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, trace_id, span_id) == ("00", run["trace_id"], run["span_id"])
    assert int(flags, 16) & 1


def _assert_run_tree(collector: Collector, launcher: str) -> dict[str, Any]:
    """The run span under the test's own ``job`` span, with launch / wait / drain under it, in that order."""
    job = collector.span("job")
    run = collector.span("pipes.run")
    assert run["parent"] == job["span_id"] and run["trace_id"] == job["trace_id"]
    phases = [collector.span(name) for name in ("pipes.launch", "pipes.wait", "pipes.drain")]
    for phase in phases:
        assert phase["parent"] == run["span_id"] and phase["trace_id"] == run["trace_id"], phase["name"]
        assert run["start"] <= phase["start"] <= phase["end"] <= run["end"], phase["name"]
    assert phases[0]["end"] <= phases[1]["start"] and phases[1]["end"] <= phases[2]["start"]
    attributes = run["attributes"]
    assert attributes["pipes.launcher"] == launcher
    assert attributes["pipes.asset_keys"] == ["orders"]
    assert attributes["pipes.partition_key"] == "2026-12-07"
    return run


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_run_is_a_span_tree_with_events_metrics_and_the_childs_spans_in_its_trace(
        collector: Collector, tmp_path: Path, mode: str) -> None:
    out = _orchestrate(collector, mode, _child_script(tmp_path), tmp_path)
    assert out["error"] is None
    run = _assert_run_tree(collector, "PipesSubprocessClient" if mode == "sync" else "PipesAsyncSubprocessClient")
    attributes = run["attributes"]
    assert attributes["pipes.run_id"] == out["run_id"]
    assert attributes["pipes.exit_code"] == 0 and attributes["pipes.outcome"] == "succeeded"
    assert attributes["pipes.results"] == 2 and attributes["pipes.protocol_issues"] == 0
    assert attributes["pipes.messages"] == 6  # opened, log, materialization, check, custom, closed
    assert attributes["pipes.command"][-1].endswith("child.py")
    assert run["status"] != STATUS_CODE_ERROR
    names = [name for name, _ in run["events"]]
    assert names == ["pipes.opened", "pipes.log", "pipes.materialization", "pipes.check", "pipes.custom_message",
                     "pipes.closed"]
    events = dict(run["events"])
    assert events["pipes.materialization"] == {"pipes.asset_key": "orders", "pipes.data_version": "v1"}
    assert events["pipes.check"] == {"pipes.asset_key": "orders", "pipes.check_name": "positive",
                                     "pipes.passed": True, "pipes.severity": "ERROR"}
    assert events["pipes.log"] == {"pipes.level": "INFO", "pipes.message": "working"}
    # the external process saw the run span's context and its own span joined the trace, under the run span
    _assert_traceparent_of(out["messages"], run)
    child = collector.span("child-work")
    assert child["service"] == "child"
    assert child["trace_id"] == run["trace_id"] and child["parent"] == run["span_id"]
    # metrics, exported at the orchestrator's shutdown
    labels = {"pipes.launcher": attributes["pipes.launcher"]}
    by_method = {point["attributes"]["pipes.method"]: point["value"] for point in collector.metrics["pipes.messages"]}
    assert by_method == {"opened": 1, "log": 1, "report_asset_materialization": 1, "report_asset_check": 1,
                         "report_custom_message": 1, "closed": 1}
    by_kind = {point["attributes"]["pipes.result_kind"]: point["value"] for point in collector.metrics["pipes.results"]}
    assert by_kind == {"materialization": 1, "check": 1}
    (message_bytes,) = collector.metrics["pipes.message.bytes"]
    assert message_bytes["value"] > 6 * len('{"__dagster_pipes_version": "0.1"}')
    (active,) = collector.metrics["pipes.sessions.active"]
    assert active["value"] == 0 and active["attributes"] == labels  # one opened, one ended
    (latency,) = collector.metrics["pipes.delivery.latency"]
    assert latency["kind"] == "histogram" and latency["value"] == 1
    (runs,) = collector.metrics["pipes.runs"]
    assert runs["attributes"] == {**labels, "pipes.outcome": "succeeded"} and runs["value"] == 1


def test_a_failed_run_has_error_status_and_the_exception_recorded(collector: Collector, tmp_path: Path) -> None:
    out = _orchestrate(collector, "fail", _child_script(tmp_path), tmp_path)
    assert out["error"] == "PipesExecutionError"
    run = _assert_run_tree(collector, "PipesSubprocessClient")
    assert run["status"] == STATUS_CODE_ERROR
    assert run["attributes"]["pipes.outcome"] == "PipesExecutionError"
    assert run["attributes"]["pipes.exit_code"] == 1
    events = dict(run["events"])
    assert events["exception"]["exception.type"].endswith("PipesExecutionError")
    assert "ValueError: boom" in events["exception"]["exception.message"]
    assert "boom" in events["pipes.closed"]["pipes.exception"]
    child = collector.span("child-work")  # the child's span ended with the error, in the run's trace
    assert child["trace_id"] == run["trace_id"] and child["status"] == STATUS_CODE_ERROR


def test_logs_past_the_budget_are_counted_and_results_and_issues_are_always_events(
        collector: Collector, tmp_path: Path) -> None:
    out = _orchestrate(collector, "chatty", _child_script(tmp_path), tmp_path)
    assert out["error"] is None  # strict=False: the issue does not fail the run
    run = _assert_run_tree(collector, "PipesSubprocessClient")
    names = [name for name, _ in run["events"]]
    # 64 of the 102 logs and custom messages (LOG_EVENTS_PER_RUN), every result, the issue, opened and closed
    assert names.count("pipes.log") == 64 and "pipes.custom_message" not in names
    assert run["attributes"]["pipes.events_not_recorded"] == 102 - 64
    assert names[0] == "pipes.opened" and names[-1] == "pipes.closed"
    assert {"pipes.materialization", "pipes.check", "pipes.protocol_issue"} <= set(names)
    issue = dict(run["events"])["pipes.protocol_issue"]
    assert issue["pipes.issue_kind"] and "no_such_method" in issue["pipes.reason"]
    assert run["attributes"]["pipes.protocol_issues"] == 1


@pytest.mark.docker
def test_a_docker_run_hands_the_trace_context_to_the_container(collector: Collector, tmp_path: Path,
                                                                docker_engine: Any) -> None:
    out = _orchestrate(collector, docker_engine.images.test, textwrap.dedent(DOCKER_CHILD), tmp_path,
                       DOCKER_HOST=docker_engine.host)
    assert out["error"] is None
    run = _assert_run_tree(collector, "PipesDockerClient")
    assert run["attributes"]["pipes.command"] == ["python3", "-c", textwrap.dedent(DOCKER_CHILD)]
    assert run["attributes"]["pipes.process"].startswith("the container ")
    assert [name for name, _ in run["events"]] == ["pipes.opened", "pipes.materialization", "pipes.custom_message",
                                                   "pipes.closed"]
    _assert_traceparent_of(out["messages"], run)


def test_without_a_configured_provider_a_run_has_no_observer_and_no_traceparent(tmp_path: Path) -> None:
    # this test process configures no OpenTelemetry provider: nothing observes, nothing reaches the child
    assert observers_for(None) is None
    code = "import os\nfrom pipes_ext import open_pipes\nwith open_pipes() as p:\n" \
           "    p.report_custom_message([p.traceparent, os.environ.get('TRACEPARENT')])\n"
    invocation = PipesSubprocessClient().run(command=[PYTHON, "-c", code], env={"TRACEPARENT": ""})
    assert invocation.get_custom_messages() == [[None, ""]]


def test_a_child_that_does_not_use_opentelemetry_reads_the_traceparent_and_imports_nothing() -> None:
    traceparent = f"00-{'1' * 32}-{'2' * 16}-01"
    code = "import sys\nfrom pipes_ext import open_pipes\nwith open_pipes() as p:\n" \
           "    p.report_custom_message([p.traceparent, p.tracestate, 'opentelemetry' in sys.modules])\n"
    invocation = PipesSubprocessClient().run(command=[PYTHON, "-c", code],
                                             env={"TRACEPARENT": traceparent, "TRACESTATE": "k=v"})
    assert invocation.get_custom_messages() == [[traceparent, "k=v", False]]


def test_without_opentelemetry_nothing_is_imported(tmp_path: Path) -> None:
    # opentelemetry made unimportable: a run works, and neither side imports it
    code = textwrap.dedent("""
        import sys
        sys.modules["opentelemetry"] = None  # import opentelemetry now raises ImportError
        from pipes_core import PipesSubprocessClient
        child = ("import sys; sys.modules['opentelemetry'] = None\\n"
                 "from pipes_ext import open_pipes\\n"
                 "with open_pipes() as p: p.report_custom_message(p.traceparent)")
        invocation = PipesSubprocessClient().run(command=[sys.executable, "-c", child],
                                                 env={"TRACEPARENT": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
        print(invocation.get_custom_messages(), [m for m in sys.modules if m.startswith("opentelemetry.")])
    """)
    result = subprocess.run([PYTHON, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            capture_output=True, text=True, timeout=RUN_LIMIT_SECONDS, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"['00-{'1' * 32}-{'2' * 16}-01'] []"


# ---------------------------------------------------------------------------------------------- the trace file

TRACE_CHILD = """
import sys
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.log.warning("careful")
    pipes.report_asset_materialization(asset_key="orders")
    pipes.report_asset_check("positive", passed=False, asset_key="orders")
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""
REQUIRED_KEYS = {"name", "ph", "ts", "pid", "tid"}
KNOWN_PHASES = {"X", "B", "E", "i", "I", "M"}


def validate_trace_events(text: str) -> list[dict[str, Any]]:
    """Check ``text`` against the trace-event format (the JSON array form, or an object with ``traceEvents``):
    every event has the required keys and a known phase; complete events a non-negative ``dur``; begin / end events
    matched per track; instant events in time order. Returns the events."""
    document = json.loads(text)
    events = document["traceEvents"] if isinstance(document, dict) else document
    assert isinstance(events, list) and events
    open_by_track: dict[tuple[Any, Any], list[str]] = {}
    last_instant = float("-inf")
    for event in events:
        assert REQUIRED_KEYS <= set(event), event
        assert event["ph"] in KNOWN_PHASES, event
        assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0, event
        track = (event["pid"], event["tid"])
        if event["ph"] == "X":
            assert isinstance(event["dur"], (int, float)) and event["dur"] >= 0, event
        elif event["ph"] == "B":
            open_by_track.setdefault(track, []).append(event["name"])
        elif event["ph"] == "E":
            assert open_by_track.get(track), f"E without B: {event}"
            open_by_track[track].pop()
        elif event["ph"] in ("i", "I"):
            assert event.get("s", "t") in ("g", "p", "t"), event
            assert event["ts"] >= last_instant, "instant events out of time order"
            last_instant = event["ts"]
    assert not any(open_by_track.values()), f"B without E: {open_by_track}"
    return list(events)


def _pipes_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    child = tmp_path / "child.py"
    child.write_text(TRACE_CHILD, encoding="utf-8")
    return subprocess.run([PYTHON, "-m", "pipes_core", "run", *args[:-1], "--asset", "orders", "--",
                           PYTHON, str(child), args[-1]],
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                          timeout=RUN_LIMIT_SECONDS, check=False)


@pytest.mark.parametrize("exit_code", [0, 3])
def test_pipes_run_trace_writes_a_valid_trace_event_file(tmp_path: Path, exit_code: int) -> None:
    trace = tmp_path / "run.json"
    result = _pipes_run(tmp_path, "--trace", str(trace), str(exit_code))
    assert result.returncode == exit_code, result.stderr
    events = validate_trace_events(trace.read_text(encoding="utf-8"))
    complete = {e["name"]: e for e in events if e["ph"] == "X"}
    assert set(complete) == {"run", "launch", "wait", "drain"}
    run = complete["run"]
    for name in ("launch", "wait", "drain"):  # inside the run, one after the other
        phase = complete[name]
        assert run["ts"] <= phase["ts"] and phase["ts"] + phase["dur"] <= run["ts"] + run["dur"], name
    assert complete["launch"]["ts"] + complete["launch"]["dur"] <= complete["wait"]["ts"]
    assert complete["wait"]["ts"] + complete["wait"]["dur"] <= complete["drain"]["ts"]
    assert run["args"]["pipes.asset_keys"] == ["orders"] and run["args"]["pipes.exit_code"] == exit_code
    assert run["args"]["pipes.outcome"] == ("succeeded" if exit_code == 0 else "PipesExecutionError")
    instants = [(e["name"], e["args"]) for e in events if e["ph"] == "i"]
    assert instants == [
        ("opened", {}),
        ("log", {"level": "WARNING", "message": "careful"}),
        ("report_asset_materialization", {"asset_key": "orders"}),
        ("report_asset_check", {"asset_key": "orders", "check_name": "positive"}),
        ("closed", {}),
    ]
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {f"pipes run {run['args']['pipes.run_id']}", "lifecycle", "messages"}


def test_pipes_run_trace_to_an_unwritable_path_is_a_usage_error(tmp_path: Path) -> None:
    result = _pipes_run(tmp_path, "--trace", str(tmp_path / "missing" / "run.json"), "0")
    assert result.returncode == 2
    assert "pipes: error: cannot write the trace file" in result.stderr and "--trace" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_protocol_issue_is_an_instant_event_and_a_bad_observer_changes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(TraceFileWriter):
        def message(self, method: str, params: Any, size: int) -> None:
            raise RuntimeError("observer bug")

    trace = tmp_path / "run.json"
    unknown = '{"__dagster_pipes_version": "0.1", "method": "no_such_method", "params": {}}'
    code = f"from pipes_ext import open_pipes\nwith open_pipes() as p:\n    print({unknown!r}, flush=True)\n"
    invocation = PipesSubprocessClient(message_reader=PipesStdioMessageReader(), strict=False).run(
        command=[PYTHON, "-c", code], observer=Broken(trace), context=PipesRunContext(asset_keys=["a"]))
    assert invocation.session.closed and invocation.session.issue_count == 1
    events = validate_trace_events(trace.read_text(encoding="utf-8"))
    issues = [e for e in events if e["name"] == "protocol_issue"]
    assert len(issues) == 1 and issues[0]["args"]["kind"]
    assert not [e for e in events if e["name"] in ("opened", "closed")]  # message() raised each time
    said = [r for r in caplog.records if "the run observer Broken raised in message()" in r.getMessage()]
    assert len(said) == 1  # logged once, not once per message


# ---------------------------------------------------------------------------------------------- every launcher

TRACEPARENT = f"00-{'a' * 32}-{'b' * 16}-01"
REPORT_TRACE_ENV = """
import os
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message([pipes.traceparent, pipes.tracestate])
"""


class ContextObserver(TraceFileWriter):
    """A trace file writer that also hands the process a trace context (as the OpenTelemetry observer does)."""

    def child_env(self) -> dict[str, str]:
        return {"TRACEPARENT": TRACEPARENT, "TRACESTATE": "k=v"}


def test_an_observers_env_reaches_the_process_with_the_cli_bootstrap_too(tmp_path: Path) -> None:
    code = REPORT_TRACE_ENV.replace("open_pipes()", "open_pipes(params_loader=PipesCliArgsParamsLoader())").replace(
        "from pipes_ext import open_pipes", "from pipes_ext import PipesCliArgsParamsLoader, open_pipes")
    invocation = PipesSubprocessClient(bootstrap="cli").run(command=[PYTHON, "-c", code],
                                                             observer=ContextObserver(tmp_path / "run.json"))
    assert invocation.get_custom_messages() == [[TRACEPARENT, "k=v"]]


def test_a_slurm_job_gets_the_trace_context_in_its_environment(slurm_cluster: Any, tmp_path: Path) -> None:
    from pipes_core.slurm import PipesSlurmClient, SlurmCommands

    script = tmp_path / "job.py"
    script.write_text(REPORT_TRACE_ENV, encoding="utf-8")
    trace = tmp_path / "run.json"
    client = PipesSlurmClient(commands=SlurmCommands(slurm_conf=str(slurm_cluster.conf)), shared_dir=str(tmp_path))
    invocation = client.run(command=[PYTHON, str(script)], observer=ContextObserver(trace),
                            timeout_seconds=RUN_LIMIT_SECONDS)
    assert invocation.get_custom_messages() == [[TRACEPARENT, "k=v"]]
    events = validate_trace_events(trace.read_text(encoding="utf-8"))
    run = next(e for e in events if e["name"] == "run")
    assert run["args"]["pipes.launcher"] == "PipesSlurmClient" and "Slurm job" in run["args"]["pipes.process"]
    assert [e["name"] for e in events if e["ph"] == "X"] == ["launch", "wait", "drain", "run"]


def test_a_ray_job_gets_the_trace_context_in_its_runtime_env(ray_head: Any, tmp_path: Path) -> None:
    from pipes_core.ray import PipesRayJobClient

    script = tmp_path / "job.py"
    script.write_text(REPORT_TRACE_ENV, encoding="utf-8")
    trace = tmp_path / "run.json"
    invocation = PipesRayJobClient(ray_head.address).run(command=[PYTHON, str(script)],
                                                         observer=ContextObserver(trace),
                                                         timeout_seconds=RUN_LIMIT_SECONDS)
    assert invocation.get_custom_messages() == [[TRACEPARENT, "k=v"]]
    events = validate_trace_events(trace.read_text(encoding="utf-8"))
    assert [e["name"] for e in events if e["ph"] == "X"] == ["launch", "wait", "drain", "run"]
