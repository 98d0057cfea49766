"""``python -m benchmarks.observability [--quick] [--repeat N] [--json FILE]``: what observing a run costs.

Throughput of a real run (:class:`~pipes_core.PipesSubprocessClient`, a Python child sending N small messages,
half ``log``, half custom messages, through the default temp-file channel), side by side:

1. OpenTelemetry on (ours: the SDK's ``TracerProvider`` with a ``SimpleSpanProcessor`` into an in-memory exporter,
   a ``MeterProvider`` with an in-memory reader) against off (reference: no provider configured, so the run has no
   observer); on as the library emits by default (the first ``LOG_EVENTS_PER_RUN`` logs and custom messages of a
   run as span events, the rest counted), and with a span event for every message;
2. the ``pipes run --trace`` file writer (ours: :class:`~pipes_core.TraceFileWriter`, an instant event per
   message written to a file) against off;
3. the message handler alone (``handle_lines`` on a block of the same messages, in-process), with the run's
   OpenTelemetry observer against none: the per-message cost without the process and the channel.

The global providers can be set once per process: the SDK is configured once, and "off" is the library's own
"OpenTelemetry is not importable" switch (``pipes_core.observe.otel._available``), so that the sides alternate. Not a
test: nothing asserts on time; figures on a shared machine are noisy (medians of ``--repeat`` runs).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

from ._report import benchmark_parser, print_header, print_report, repetitions, write_json

CHILD = """
import sys
from pipes_ext import open_pipes
n = int(sys.argv[1])
with open_pipes() as pipes:
    log = pipes.log
    for i in range(n // 2):
        log.info("step %d", i)
        pipes.report_custom_message({"seq": i})
"""


def _run_rate(n: int, child: str, observer_factory: Any = None) -> float:
    from pipes_core import PipesSubprocessClient

    options: dict[str, Any] = {}
    if observer_factory is not None:
        options["observer"] = observer_factory()
    started = time.perf_counter()
    invocation = PipesSubprocessClient(forward_stdio=False).run(command=[sys.executable, child, str(n)],
                                                                retain_messages=False, **options)
    elapsed = time.perf_counter() - started
    assert invocation.session.message_count == n + 2, invocation.session.message_count  # opened, closed
    return n / elapsed


def _block(n: int) -> bytes:
    lines = []
    for i in range(n // 2):
        lines.append({"__dagster_pipes_version": "0.1", "method": "log",
                      "params": {"message": f"step {i}", "level": "INFO"}})
        lines.append({"__dagster_pipes_version": "0.1", "method": "report_custom_message",
                      "params": {"payload": {"seq": i}}})
    return b"\n".join(json.dumps(line).encode() for line in lines)


def _handler_rate(block: bytes, n: int, observed: bool) -> float:
    from pipes_core import PipesMessageHandler
    from pipes_core.observe.fanout import observers_for
    from pipes_core.observe.observer import run_attributes

    handler = PipesMessageHandler({}, retain_messages=False, logger=logging.getLogger("bench-observability"))
    observer = observers_for(None) if observed else None
    if observer is not None:
        observer.started(run_attributes("bench", None, {}))
        handler.observer = observer
    started = time.perf_counter()
    handler.handle_lines(block, "bench")
    elapsed = time.perf_counter() - started
    if observer is not None:
        observer.finished(None, None)
    assert handler.message_count == n
    return n / elapsed


def _configure_sdk() -> Any:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    return exporter


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks.observability", __doc__, repeated="each run", default_repeat=5)
    args = parser.parse_args(argv)
    repeat = repetitions(args)
    n = 4_000 if args.quick else 50_000
    logging.disable(logging.CRITICAL)  # the child's log messages are events here, not output
    report = print_header(f"observability: {n:,} messages per run", quick=args.quick, repeat=repeat)
    from pipes_core import TraceFileWriter
    from pipes_core.observe.fanout import observers_for

    with tempfile.TemporaryDirectory(prefix="bench-observability-") as tmp:
        child = os.path.join(tmp, "child.py")
        with open(child, "w", encoding="utf-8") as f:
            f.write(CHILD)
        trace_path = os.path.join(tmp, "run.json")
        block = _block(n)
        assert observers_for(None) is None, "an OpenTelemetry provider is configured already: 'off' would be on"
        exporter = _configure_sdk()
        from pipes_core.observe import otel as _otel

        sampled = _otel.LOG_EVENTS_PER_RUN
        samples: dict[str, list[float]] = {name: [] for name in (
            "off", "on", "every", "trace_file", "handler_off", "handler_on", "handler_every")}
        for _ in range(repeat):  # the sides alternate, so that the machine's load weighs on each alike
            _otel._available = False  # as without opentelemetry-api: no observer
            samples["off"].append(_run_rate(n, child))
            samples["trace_file"].append(_run_rate(n, child, lambda: TraceFileWriter(trace_path)))
            samples["handler_off"].append(_handler_rate(block, n, observed=False))
            _otel._available = True
            _otel.LOG_EVENTS_PER_RUN = sampled
            samples["on"].append(_run_rate(n, child))
            samples["handler_on"].append(_handler_rate(block, n, observed=True))
            _otel.LOG_EVENTS_PER_RUN = None  # a span event for every log and custom message
            samples["every"].append(_run_rate(n, child))
            samples["handler_every"].append(_handler_rate(block, n, observed=True))
        _otel.LOG_EVENTS_PER_RUN = sampled
        runs = [span for span in exporter.get_finished_spans() if span.name == "pipes.run"]
        assert len(runs) == 4 * repeat and all(run.events for run in runs), "the runs were not traced"
    off, on, every, trace_file = samples["off"], samples["on"], samples["every"], samples["trace_file"]
    handler_off, handler_on, handler_every = samples["handler_off"], samples["handler_on"], samples["handler_every"]
    results = report["results"]
    results["otel"] = {
        "description": "a run with OpenTelemetry spans, events and metrics (ours) vs none (ref); by default the first "
                       f"{sampled} logs and custom messages of a run are span events, then 'every message'",
        "metrics": [{"name": "run throughput", "unit": "msg/s", "ours": on, "reference": off},
                    {"name": "handler alone", "unit": "msg/s", "ours": handler_on, "reference": handler_off},
                    {"name": "run, every message an event", "unit": "msg/s", "ours": every, "reference": off},
                    {"name": "handler, every message", "unit": "msg/s", "ours": handler_every,
                     "reference": handler_off}],
        "notes": ["SDK: SimpleSpanProcessor into InMemorySpanExporter, InMemoryMetricReader; a span keeps the "
                  "SDK's default 128 events (OTEL_SPAN_EVENT_COUNT_LIMIT), the SDK dropping the oldest",
                  "the run's throughput is bounded by the child's sending rate; 'handler' is the orchestrator's "
                  "per-message cost alone"],
    }
    results["trace_file"] = {
        "description": "a run writing pipes run --trace's file (ours) vs none (ref)",
        "metrics": [{"name": "run throughput", "unit": "msg/s", "ours": trace_file, "reference": off}],
    }
    for name, result in results.items():
        print_report(name, result)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
