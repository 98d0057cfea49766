"""Events as JSON: the one place that turns a :data:`PipesEvent` into a JSON object.

Three forms, one encoder per event type:

* ``"cli"``: what ``pipes run --json`` prints (``{"event": "materialization", ...}``; metadata as
  ``{"type", "value"}``; an exception as its name, message, stack and formatted ``text``);
* ``"full"``: everything decoded (the orchestrator test vectors' form): also the asset key's components, the
  stream message's extras and the whole cause/context chain of an exception;
* ``"wire"``: the message as sent (``{"method": "report_asset_materialization", ...params}``; metadata as
  ``{"type", "raw_value"}`` with ``__infer__`` resolved), which the conformance suite compares with what a
  harness was told to send.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pipes_core.protocol.results import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExternalStreamEvent,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesProtocolIssue,
    PipesRemoteException,
    register_json_encoder,
)
from pipes_ext._protocol import (
    METADATA_RAW_VALUE,
    METADATA_TYPE,
    METHOD_CLOSED,
    METHOD_LOG,
    METHOD_LOG_EXTERNAL_STREAM,
    METHOD_OPENED,
    METHOD_REPORT_ASSET_CHECK,
    METHOD_REPORT_ASSET_MATERIALIZATION,
    METHOD_REPORT_CUSTOM_MESSAGE,
)

__all__ = [
    "EventJsonForm",
    "EVENT_NAMES",
    "PROTOCOL_ISSUE_EVENT",
    "event_to_json",
    "exception_to_json",
    "metadata_to_json",
]

EventJsonForm = Literal["cli", "full", "wire"]

# The name of a protocol issue in every form (it is not a wire message, so it has no method).
PROTOCOL_ISSUE_EVENT = "protocol_issue"
# ``"event"`` names of the cli/full forms, and the wire method of each event type.
EVENT_NAMES: dict[type, tuple[str, str]] = {
    PipesOpenedEvent: ("opened", METHOD_OPENED),
    PipesClosedEvent: ("closed", METHOD_CLOSED),
    PipesLogEvent: ("log", METHOD_LOG),
    MaterializeResult: ("materialization", METHOD_REPORT_ASSET_MATERIALIZATION),
    AssetCheckResult: ("check", METHOD_REPORT_ASSET_CHECK),
    PipesCustomMessageEvent: ("custom_message", METHOD_REPORT_CUSTOM_MESSAGE),
    PipesExternalStreamEvent: ("external_stream", METHOD_LOG_EXTERNAL_STREAM),
    PipesProtocolIssue: (PROTOCOL_ISSUE_EVENT, PROTOCOL_ISSUE_EVENT),
}


def metadata_to_json(metadata: Mapping[str, MetadataValue], *, wire: bool = False) -> dict[str, Any]:
    """``{label: {"type", "value"}}``; with ``wire``, ``{label: {"type", "raw_value"}}`` (types resolved)."""
    value_key = METADATA_RAW_VALUE if wire else "value"
    return {label: {METADATA_TYPE: value.type, value_key: value.value} for label, value in metadata.items()}


def exception_to_json(exc: PipesRemoteException | None, *, stack: bool = True, chain: bool = True,
                      text: bool = False) -> dict[str, Any] | None:
    """A remote exception as ``{"name", "message"}``, with its ``stack``, its ``cause``/``context`` chain (in
    the same shape) and its formatted ``text`` as asked."""
    if exc is None:
        return None
    out: dict[str, Any] = {"name": exc.name, "message": exc.message}
    if stack:
        out["stack"] = list(exc.stack)
    if chain:
        out["cause"] = exception_to_json(exc.cause, stack=stack)
        out["context"] = exception_to_json(exc.context, stack=stack)
    if text:
        out["text"] = exc.format()
    return out


def _opened(event: PipesOpenedEvent, form: EventJsonForm) -> dict[str, Any]:
    return {"extras": event.extras}


def _closed(event: PipesClosedEvent, form: EventJsonForm) -> dict[str, Any]:
    if form == "cli":
        return {"exception": exception_to_json(event.exception, chain=False, text=True)}
    return {"exception": exception_to_json(event.exception, stack=form == "full")}


def _log(event: PipesLogEvent, form: EventJsonForm) -> dict[str, Any]:
    return {"level": event.level, "message": event.message}


def _asset_key(event: MaterializeResult | AssetCheckResult, form: EventJsonForm) -> dict[str, Any]:
    if form == "full":
        return {"asset_key": event.asset_key, "asset_key_path": event.asset_key_path}
    return {"asset_key": event.asset_key}


def _materialization(event: MaterializeResult, form: EventJsonForm) -> dict[str, Any]:
    metadata = metadata_to_json(event.metadata, wire=form == "wire")
    if form == "full":
        return {**_asset_key(event, form), "metadata": metadata, "data_version": event.data_version}
    return {**_asset_key(event, form), "data_version": event.data_version, "metadata": metadata}


def _check(event: AssetCheckResult, form: EventJsonForm) -> dict[str, Any]:
    return {**_asset_key(event, form), "check_name": event.check_name, "passed": event.passed,
            "severity": event.severity, "metadata": metadata_to_json(event.metadata, wire=form == "wire")}


def _custom(event: PipesCustomMessageEvent, form: EventJsonForm) -> dict[str, Any]:
    return {"payload": event.payload}


def _stream(event: PipesExternalStreamEvent, form: EventJsonForm) -> dict[str, Any]:
    if form == "cli":
        return {"stream": event.stream, "text": event.text}
    return {"stream": event.stream, "text": event.text, "extras": event.extras}


def _issue(event: PipesProtocolIssue, form: EventJsonForm) -> dict[str, Any]:
    if form == "wire":
        return {"reason": str(event)}
    return {"kind": event.kind.value, "reason": event.reason, "raw": event.raw, "size": event.size,
            "handled": event.handled}


_ENCODERS: dict[type, Callable[[Any, EventJsonForm], dict[str, Any]]] = {
    PipesOpenedEvent: _opened,
    PipesClosedEvent: _closed,
    PipesLogEvent: _log,
    MaterializeResult: _materialization,
    AssetCheckResult: _check,
    PipesCustomMessageEvent: _custom,
    PipesExternalStreamEvent: _stream,
    PipesProtocolIssue: _issue,
}


def event_to_json(event: PipesEvent, form: EventJsonForm = "cli") -> dict[str, Any]:
    """The JSON object of ``event`` in ``form`` (see the module docstring). Raises TypeError for a non-event."""
    encode = _ENCODERS.get(type(event))
    if encode is None:
        raise TypeError(f"not a Pipes event: {event!r}")
    event_name, method = EVENT_NAMES[type(event)]
    head = {"method": method} if form == "wire" else {"event": event_name}
    return {**head, **encode(event, form)}


register_json_encoder(event_to_json)
