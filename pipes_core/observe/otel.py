"""OpenTelemetry traces and metrics for every run, through the OpenTelemetry API only.

As instrumented libraries do, this uses the globally configured providers (``opentelemetry.trace.
set_tracer_provider``, ``opentelemetry.metrics.set_meter_provider``, or an auto-instrumentation that sets them from
the ``OTEL_*`` environment variables): the application configures the SDK and its exporter; nothing here needs a
call to be switched on. When ``opentelemetry-api`` is not importable nothing is imported (one look for it per
process); when it is but neither provider is configured, runs get no observer and pay nothing.

Per run (:class:`OTelRunObserver`):

* a span ``pipes.run`` (a child of the span current where ``run`` was called) with the run's attributes
  (:mod:`pipes_core.observe.observer`: launcher, command or image, run id, asset keys, partition; at the end the
  process, exit code, outcome, counts of results, protocol issues and messages), and child spans ``pipes.launch``,
  ``pipes.wait`` and ``pipes.drain``;
* span events on ``pipes.run``: ``pipes.opened``, each ``pipes.materialization`` and ``pipes.check``, each
  ``pipes.protocol_issue`` and ``pipes.closed``, always; ``pipes.log`` and ``pipes.custom_message`` for the first
  :data:`LOG_EVENTS_PER_RUN` of them, the others counted (``pipes.events_not_recorded``): the SDK keeps at most
  ``OTEL_SPAN_EVENT_COUNT_LIMIT`` events per span (default 128) and drops the oldest, so a chatty run would
  otherwise push its results out, and the per-message cost stays bounded (see benchmarks/observability.py).
  ``log_external_stream`` text is output, not an event, and is left out;
* a failed run: the span's status is ERROR with the error's first line, and the exception is recorded;
* the run span's W3C trace context goes to the external process as ``TRACEPARENT`` / ``TRACESTATE`` in its
  environment (:meth:`OTelRunObserver.child_env`; the pipes_ext side attaches it while ``open_pipes()`` is open).

Metrics (meter ``pipes_core``): :data:`METRIC_MESSAGES` (by method), :data:`METRIC_BYTES`,
:data:`METRIC_DELIVERY_LATENCY`, :data:`METRIC_ACTIVE_SESSIONS`, :data:`METRIC_RESULTS` (by kind) and
:data:`METRIC_RUNS` (by outcome), each with the launcher as ``pipes.launcher``. Message counts are added once per
run (at its end), not per message.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipes_core.observe.observer import (
    ATTR_EXIT_CODE,
    ATTR_ISSUES,
    ATTR_LAUNCHER,
    ATTR_MESSAGES,
    ATTR_OUTCOME,
    ATTR_PROCESS,
    ATTR_RESULTS,
    PHASE_DRAIN,
    RunObserver,
    cut_text,
    outcome_of,
)
from pipes_core.protocol.results import (
    AssetCheckResult,
    MaterializeResult,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesProtocolIssue,
)
from pipes_ext._trace import TRACEPARENT_ENV_VAR, TRACESTATE_ENV_VAR

if TYPE_CHECKING:
    from pipes_core.launch.invocation import PipesClientCompletedInvocation
    from pipes_core.protocol.results import PipesEvent

__all__ = ["OTelRunObserver", "otel_observer", "otel_available", "INSTRUMENTATION_NAME", "SPAN_RUN"]

# The instrumentation scope of the tracer and the meter.
INSTRUMENTATION_NAME = "pipes_core"

# Span names: the run, and one per phase (pipes.launch, pipes.wait, pipes.drain).
SPAN_RUN = "pipes.run"
SPAN_PHASE_PREFIX = "pipes."

# Span event names and their attributes.
EVENT_OPENED = "pipes.opened"
EVENT_CLOSED = "pipes.closed"
EVENT_MATERIALIZATION = "pipes.materialization"
EVENT_CHECK = "pipes.check"
EVENT_ISSUE = "pipes.protocol_issue"
EVENT_LOG = "pipes.log"
EVENT_CUSTOM = "pipes.custom_message"
EVENT_ATTR_ASSET_KEY = "pipes.asset_key"
EVENT_ATTR_DATA_VERSION = "pipes.data_version"
EVENT_ATTR_CHECK_NAME = "pipes.check_name"
EVENT_ATTR_PASSED = "pipes.passed"
EVENT_ATTR_SEVERITY = "pipes.severity"
EVENT_ATTR_KIND = "pipes.issue_kind"
EVENT_ATTR_REASON = "pipes.reason"
EVENT_ATTR_LEVEL = "pipes.level"
EVENT_ATTR_MESSAGE = "pipes.message"
EVENT_ATTR_EXCEPTION = "pipes.exception"

# Logs and custom messages recorded as span events per run (the rest are counted): with the SDK's default limit of
# 128 events per span this leaves room for the results, checks, issues, opened and closed of a run. None: all.
LOG_EVENTS_PER_RUN: int | None = 64
ATTR_NOT_RECORDED = "pipes.events_not_recorded"

# Metric names (OpenTelemetry semantic-convention style) and their attributes.
METRIC_MESSAGES = "pipes.messages"
METRIC_BYTES = "pipes.message.bytes"
METRIC_DELIVERY_LATENCY = "pipes.delivery.latency"
METRIC_ACTIVE_SESSIONS = "pipes.sessions.active"
METRIC_RESULTS = "pipes.results"
METRIC_RUNS = "pipes.runs"
METRIC_ATTR_METHOD = "pipes.method"
METRIC_ATTR_KIND = "pipes.result_kind"
RESULT_MATERIALIZATION = "materialization"
RESULT_CHECK = "check"

# The W3C trace-context carrier keys (as the propagator writes them) and the env vars they become.
_CARRIER_TO_ENV = {"traceparent": TRACEPARENT_ENV_VAR, "tracestate": TRACESTATE_ENV_VAR}

_lock = threading.Lock()
_available: bool | None = None
_instruments: _Instruments | None = None


def otel_available() -> bool:
    """Is ``opentelemetry-api`` importable? Looked for once per process (without importing it when absent)."""
    global _available
    if _available is None:
        try:
            _available = importlib.util.find_spec("opentelemetry") is not None and \
                importlib.util.find_spec("opentelemetry.trace") is not None
        except (ImportError, ValueError):
            _available = False
    return _available


def _configured() -> tuple[bool, bool]:
    """(a tracer provider is configured, a meter provider is configured): not the API's proxies or no-ops."""
    from opentelemetry import metrics, trace

    tracing = not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
    meter_provider = metrics.get_meter_provider()
    metering = not (isinstance(meter_provider, metrics.NoOpMeterProvider)
                    or type(meter_provider).__name__ == "_ProxyMeterProvider")
    return tracing, metering


def otel_observer() -> OTelRunObserver | None:
    """An observer for one run, or None when OpenTelemetry is absent or nothing is configured."""
    if not otel_available():
        return None
    tracing, metering = _configured()
    if not tracing and not metering:
        return None
    return OTelRunObserver(tracing=tracing, instruments=_get_instruments() if metering else None)


class _Instruments:
    """The meter's instruments, made once per process (the global meter provider is set once)."""

    def __init__(self) -> None:
        from opentelemetry import metrics

        meter = metrics.get_meter(INSTRUMENTATION_NAME)
        self.messages = meter.create_counter(METRIC_MESSAGES, unit="{message}",
                                             description="messages received from external processes")
        self.bytes = meter.create_counter(METRIC_BYTES, unit="By", description="bytes of message lines received")
        self.latency = meter.create_histogram(
            METRIC_DELIVERY_LATENCY, unit="s",
            description="per run: from the external process's end to the last message delivered (the drain)")
        self.active = meter.create_up_down_counter(METRIC_ACTIVE_SESSIONS, unit="{session}",
                                                   description="Pipes sessions open now")
        self.results = meter.create_counter(METRIC_RESULTS, unit="{result}",
                                            description="materializations and checks reported")
        self.runs = meter.create_counter(METRIC_RUNS, unit="{run}", description="runs finished, by outcome")


def _get_instruments() -> _Instruments:
    global _instruments
    with _lock:
        if _instruments is None:
            _instruments = _Instruments()
        return _instruments


class OTelRunObserver(RunObserver):
    """Spans and metrics of one run (module doc)."""

    def __init__(self, *, tracing: bool, instruments: _Instruments | None) -> None:
        self._tracing = tracing
        self._instruments = instruments
        self._span: Any = None
        self._phase: Any = None
        self._phase_name = ""
        self._drain_started: float | None = None
        self._labels: dict[str, str] = {}
        self._methods: dict[str, int] = {}
        self._bytes = 0
        self._materializations = 0
        self._checks = 0
        self._issues = 0
        self._active = False  # counted among the active sessions
        self._chatter = 0  # logs and custom messages recorded as span events
        self._not_recorded = 0  # ... and those past LOG_EVENTS_PER_RUN

    def started(self, attributes: Mapping[str, Any]) -> None:
        self._labels = {ATTR_LAUNCHER: str(attributes.get(ATTR_LAUNCHER, ""))}
        if self._tracing:
            from opentelemetry import trace

            tracer = trace.get_tracer(INSTRUMENTATION_NAME)
            self._span = tracer.start_span(SPAN_RUN, attributes=dict(attributes))
        if self._instruments is not None:
            self._instruments.active.add(1, self._labels)
            self._active = True

    def child_env(self) -> dict[str, str]:
        if self._span is None or not self._span.get_span_context().is_valid:
            return {}
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(self._span))
        return {_CARRIER_TO_ENV[key]: value for key, value in carrier.items() if key in _CARRIER_TO_ENV}

    def phase(self, name: str) -> None:
        if name == PHASE_DRAIN:
            self._drain_started = time.monotonic()
        if self._span is None:
            return
        from opentelemetry import trace

        if self._phase is not None:
            self._phase.end()
        tracer = trace.get_tracer(INSTRUMENTATION_NAME)
        self._phase = tracer.start_span(SPAN_PHASE_PREFIX + name, context=trace.set_span_in_context(self._span))
        self._phase_name = name

    def message(self, method: str, params: Mapping[str, Any], size: int) -> None:
        methods = self._methods
        methods[method] = methods.get(method, 0) + 1
        self._bytes += size

    def event(self, event: PipesEvent) -> None:
        if isinstance(event, MaterializeResult):
            self._materializations += 1
            if self._span is not None:
                attributes: dict[str, Any] = {EVENT_ATTR_ASSET_KEY: event.asset_key}
                if event.data_version is not None:
                    attributes[EVENT_ATTR_DATA_VERSION] = event.data_version
                self._span.add_event(EVENT_MATERIALIZATION, attributes)
        elif isinstance(event, AssetCheckResult):
            self._checks += 1
            if self._span is not None:
                self._span.add_event(EVENT_CHECK, {EVENT_ATTR_ASSET_KEY: event.asset_key,
                                                   EVENT_ATTR_CHECK_NAME: event.check_name,
                                                   EVENT_ATTR_PASSED: event.passed,
                                                   EVENT_ATTR_SEVERITY: event.severity})
        elif isinstance(event, PipesProtocolIssue):
            self._issues += 1
            if self._span is not None:
                self._span.add_event(EVENT_ISSUE, {EVENT_ATTR_KIND: str(event.kind.value),
                                                   EVENT_ATTR_REASON: cut_text(event.reason)})
        elif self._span is None:
            return
        elif isinstance(event, (PipesLogEvent, PipesCustomMessageEvent)) and LOG_EVENTS_PER_RUN is not None \
                and self._chatter >= LOG_EVENTS_PER_RUN:
            self._not_recorded += 1
        elif isinstance(event, PipesLogEvent):
            self._chatter += 1
            self._span.add_event(EVENT_LOG, {EVENT_ATTR_LEVEL: event.level,
                                             EVENT_ATTR_MESSAGE: cut_text(event.message)})
        elif isinstance(event, PipesCustomMessageEvent):
            self._chatter += 1
            self._span.add_event(EVENT_CUSTOM)
        elif isinstance(event, PipesOpenedEvent):
            self._span.add_event(EVENT_OPENED)
        elif isinstance(event, PipesClosedEvent):
            self._span.add_event(EVENT_CLOSED, {} if event.exception is None
                                 else {EVENT_ATTR_EXCEPTION: cut_text(event.exception)})

    def finished(self, invocation: PipesClientCompletedInvocation | None, error: BaseException | None) -> None:
        outcome = outcome_of(error)
        if self._instruments is not None:
            self._record_metrics(outcome)
        span = self._span
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if self._phase is not None:
            self._phase.end()
            self._phase = None
        attributes: dict[str, Any] = {ATTR_OUTCOME: outcome, ATTR_RESULTS: self._materializations + self._checks,
                                      ATTR_ISSUES: self._issues, ATTR_MESSAGES: sum(self._methods.values()),
                                      ATTR_NOT_RECORDED: self._not_recorded}
        if invocation is not None:
            attributes[ATTR_PROCESS] = invocation.description
            if invocation.exit_code is not None:
                attributes[ATTR_EXIT_CODE] = invocation.exit_code
        span.set_attributes(attributes)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, cut_text(str(error).split("\n", 1)[0] or type(error).__name__)))
        span.end()

    def _record_metrics(self, outcome: str) -> None:
        instruments = self._instruments
        assert instruments is not None
        labels = self._labels
        for method, count in self._methods.items():
            instruments.messages.add(count, {**labels, METRIC_ATTR_METHOD: method})
        instruments.bytes.add(self._bytes, labels)
        if self._materializations:
            instruments.results.add(self._materializations, {**labels, METRIC_ATTR_KIND: RESULT_MATERIALIZATION})
        if self._checks:
            instruments.results.add(self._checks, {**labels, METRIC_ATTR_KIND: RESULT_CHECK})
        if self._drain_started is not None:
            instruments.latency.record(time.monotonic() - self._drain_started, labels)
        if self._active:
            instruments.active.add(-1, labels)
            self._active = False
        instruments.runs.add(1, {**labels, ATTR_OUTCOME: outcome})
