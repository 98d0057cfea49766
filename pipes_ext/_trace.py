"""The run's trace context, as the orchestrator hands it over: W3C ``traceparent`` / ``tracestate`` in the
environment (``TRACEPARENT`` / ``TRACESTATE``, the convention for process environments), never on the wire.

Standard library only. :func:`traceparent` / :func:`tracestate` read them (also as ``PipesContext.traceparent`` /
``.tracestate``). When this process uses OpenTelemetry (it has imported ``opentelemetry``, e.g. configured its SDK,
before ``open_pipes()``) and a ``TRACEPARENT`` is set, :func:`open_pipes` attaches that context while the pipes
block is open (:func:`attach_trace_context`), so spans started inside it are children of the orchestrator's run
span. A process that has not imported OpenTelemetry imports nothing (a child's start-up stays lean).
"""

from __future__ import annotations

import os
import sys

__all__ = ["TRACEPARENT_ENV_VAR", "TRACESTATE_ENV_VAR", "traceparent", "tracestate", "attach_trace_context"]

TRACEPARENT_ENV_VAR = "TRACEPARENT"
TRACESTATE_ENV_VAR = "TRACESTATE"
# OpenTelemetry's top package: the context is attached only in a process that has imported it (configured its SDK).
_OPENTELEMETRY = "opentelemetry"
# The W3C carrier keys the propagator reads.
_CARRIER_TRACEPARENT = "traceparent"
_CARRIER_TRACESTATE = "tracestate"


def traceparent() -> str | None:
    """The run span's W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``) from ``TRACEPARENT``, or None when
    the orchestrator traced nothing."""
    return os.environ.get(TRACEPARENT_ENV_VAR) or None


def tracestate() -> str | None:
    """The run span's W3C ``tracestate`` from ``TRACESTATE``, or None."""
    return os.environ.get(TRACESTATE_ENV_VAR) or None


class _AttachedTraceContext:
    """The orchestrator's trace context, attached as OpenTelemetry's current context until :meth:`close`."""

    def __init__(self, token: object) -> None:
        self._token = token

    def close(self) -> None:
        if self._token is None:
            return
        token, self._token = self._token, None
        from opentelemetry import context

        try:
            context.detach(token)  # type: ignore[arg-type]
        except Exception:  # closed from another thread or context: the context there was never ours
            pass


def attach_trace_context() -> _AttachedTraceContext | None:
    """Attach ``TRACEPARENT`` / ``TRACESTATE`` as OpenTelemetry's current context; None (and nothing imported)
    when there is no ``TRACEPARENT`` or this process has not imported OpenTelemetry."""
    parent = traceparent()
    if parent is None or _OPENTELEMETRY not in sys.modules:
        return None  # no trace, or this process does not use OpenTelemetry (importing it would cost start-up)
    try:
        from opentelemetry import context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    carrier = {_CARRIER_TRACEPARENT: parent}
    state = tracestate()
    if state is not None:
        carrier[_CARRIER_TRACESTATE] = state
    return _AttachedTraceContext(context.attach(TraceContextTextMapPropagator().extract(carrier)))
