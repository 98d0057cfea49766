"""The observers of one run as one: :class:`RunObservers` (the fan-out, which keeps what one observer raises from
the others and from the run) and :func:`observers_for` (OpenTelemetry's observer and the run's ``observer=``).
Apart from the interface (:mod:`pipes_core.observe.observer`), which the observers themselves import."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipes_core.observe.observer import RunObserver, observe_logger
from pipes_core.observe.otel import otel_observer

if TYPE_CHECKING:
    from pipes_core.launch.invocation import PipesClientCompletedInvocation
    from pipes_core.protocol.results import PipesEvent

__all__ = ["RunObservers", "observers_for"]


class RunObservers(RunObserver):
    """Several observers as one; what one raises is logged (with its class) and the others go on."""

    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self.observers = tuple(observers)
        self.current_phase = ""
        self._failed: set[tuple[int, str]] = set()
        self._message_calls = tuple(observer.message for observer in self.observers)
        self._event_calls = tuple(observer.event for observer in self.observers)

    def _each(self, method: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                self._said(observer, method)

    def _said(self, observer: RunObserver, method: str) -> None:
        """Log what an observer raised, once per observer and method (not once per message)."""
        if (id(observer), method) in self._failed:
            return
        self._failed.add((id(observer), method))
        observe_logger.exception("[pipes] the run observer %s raised in %s() (said once per run); the run goes "
                                 "on: fix the observer, or pass observer=None", type(observer).__name__, method)

    def started(self, attributes: Mapping[str, Any]) -> None:
        self._each("started", attributes)

    def child_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for observer in self.observers:
            try:
                env.update(observer.child_env())
            except Exception:
                self._said(observer, "child_env")
        return env

    def phase(self, name: str) -> None:
        """As :meth:`RunObserver.phase`; entering the phase the run is in already says nothing (a driver may
        say "drain" on two paths)."""
        if name != self.current_phase:
            self.current_phase = name
            self._each("phase", name)

    # The two calls per message: bound methods taken once (no getattr, no argument packing per message).

    def message(self, method: str, params: Mapping[str, Any], size: int) -> None:
        for call in self._message_calls:
            try:
                call(method, params, size)
            except Exception:
                self._said(call.__self__, "message")  # type: ignore[attr-defined]  # a bound method

    def event(self, event: PipesEvent) -> None:
        for call in self._event_calls:
            try:
                call(event)
            except Exception:
                self._said(call.__self__, "event")  # type: ignore[attr-defined]  # a bound method

    def finished(self, invocation: PipesClientCompletedInvocation | None, error: BaseException | None) -> None:
        self._each("finished", invocation, error)


def observers_for(user: RunObserver | None) -> RunObservers | None:
    """The observers of one run: OpenTelemetry's when it is importable and a tracer or meter provider is
    configured, and the user's ``observer=``; None when there is none (the run then pays nothing)."""
    found = [observer for observer in (otel_observer(), user) if observer is not None]
    return RunObservers(found) if found else None
