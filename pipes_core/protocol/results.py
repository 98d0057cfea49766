"""Typed results and events the orchestrator derives from the messages it reads.

Asset keys are kept in the protocol's escaped string form (``"a/b\\/c"``); ``asset_key_path`` gives the
components. Every event is an immutable dataclass; :data:`PipesEvent` is their union, which is what an
``on_event`` callback receives, in arrival order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipes_ext._errors import PipesProtocolErrorKind
from pipes_ext._protocol import METADATA_TYPE_INFER, SEVERITY_ERROR, infer_metadata_type, parse_asset_key

__all__ = [
    "MetadataValue",
    "MaterializeResult",
    "AssetCheckResult",
    "PipesExecutionResult",
    "PipesRemoteException",
    "PipesOpenedEvent",
    "PipesClosedEvent",
    "PipesLogEvent",
    "PipesCustomMessageEvent",
    "PipesExternalStreamEvent",
    "PipesProtocolIssue",
    "ISSUE_EXCERPT_BYTES",
    "PipesEvent",
    "metadata_from_wire",
]

# The one JSON encoder of events (``event_to_json``, in the JSON module beside this one), which imports this module
# for the event types: it registers itself here when imported (``pipes_core`` imports it), so that this module needs
# no import of it. A list of one, so that registering replaces it.
_JSON_ENCODER: list[Callable[[Any], dict[str, Any]]] = []


def register_json_encoder(encoder: Callable[[Any], dict[str, Any]]) -> None:
    """Make ``encoder`` the function ``to_dict()`` of every event calls (the JSON module does, once)."""
    _JSON_ENCODER[:] = [encoder]


@dataclass(frozen=True)
class _JsonEvent:
    """Gives an event ``to_dict()``: its JSON object as ``pipes run --json`` prints it (one encoder,
    :func:`pipes_core.protocol.json_events.event_to_json`),
    and its ``position``: the index in the channel of the message line it
    came from (from 0, each non-blank line counted, bad ones included), stable across restarts of a durable run,
    so that an ``on_event`` consumer can drop a message it saw before; None for an event no line carried (an
    implicit materialization). Not compared, not printed."""

    position: int | None = field(default=None, compare=False, repr=False, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict of this event, as printed by ``pipes run --json`` (``{"event": ..., ...}``)."""
        return _JSON_ENCODER[0](self)


@dataclass(frozen=True)
class MetadataValue:
    """One metadata entry of a result, as the process sent it.

    Attributes:
        type: its metadata type (a ``str``: ``"text"``, ``"int"``, ``"float"``, ``"json"``, ``"url"``,
            ``"timestamp"``...), ``"__infer__"`` already resolved from the value.
        value: its raw JSON value (``str``, ``int``, ``float``, ``bool``, ``None``, ``list`` or ``dict``); a
            ``"float"`` or ``"timestamp"`` entry's value is a ``float`` (a timestamp: seconds since the epoch).
    """

    type: str
    value: Any

    @classmethod
    def from_wire(cls, entry: dict[str, Any]) -> MetadataValue:
        metadata_type = entry["type"]
        value = entry["raw_value"]
        if metadata_type == METADATA_TYPE_INFER:
            metadata_type = infer_metadata_type(value)
        elif metadata_type in ("float", "timestamp"):
            # The reference external side sends a float entry's int as is (e.g. ``{"raw_value": 3, "type":
            # "float"}``): a float entry is a float here, as a timestamp is.
            value = float(value)
        return cls(metadata_type, value)


def metadata_from_wire(metadata: dict[str, Any] | None) -> dict[str, MetadataValue]:
    return {label: MetadataValue.from_wire(entry) for label, entry in (metadata or {}).items()}


@dataclass(frozen=True)
class MaterializeResult(_JsonEvent):
    """An asset materialization, reported by the external process or implied by the run's selection.

    Attributes:
        asset_key: the asset's key, in the protocol's escaped string form (``"a/b\\/c"``; see
            ``asset_key_path`` for the components).
        metadata: the reported metadata, by label (``dict[str, MetadataValue]``); with the run's ``metadata=``
            merged in when read from an invocation.
        data_version: the data version the process reported (a ``str``), or None.
        implicit: True when the process did not report it: the asset was selected for the run and the process
            finished without reporting it (see ``implicit_materializations``); False when reported.
        position: the index in the channel of its message line (from 0; stable across the restarts of a durable
            run, so that an ``on_event`` consumer can drop repeats), or None when no line carried it.
    """

    asset_key: str
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    data_version: str | None = None
    implicit: bool = False

    @property
    def asset_key_path(self) -> list[str]:
        return parse_asset_key(self.asset_key)


@dataclass(frozen=True)
class AssetCheckResult(_JsonEvent):
    """The result of an asset check, as the external process reported it.

    Attributes:
        asset_key: the checked asset's key, in the protocol's escaped string form (``"a/b\\/c"``).
        check_name: the check's name (a ``str``).
        passed: whether the check passed (a ``bool``).
        severity: how much a failure matters: ``"ERROR"`` (the default) or ``"WARN"``; a failed ``ERROR`` check
            fails the run with ``fail_on_check_error``.
        metadata: the reported metadata, by label (``dict[str, MetadataValue]``).
        position: the index in the channel of its message line (from 0; stable across the restarts of a durable
            run, so that an ``on_event`` consumer can drop repeats), or None when no line carried it.
    """

    asset_key: str
    check_name: str
    passed: bool
    severity: str = SEVERITY_ERROR
    metadata: dict[str, MetadataValue] = field(default_factory=dict)

    @property
    def asset_key_path(self) -> list[str]:
        return parse_asset_key(self.asset_key)


PipesExecutionResult = MaterializeResult | AssetCheckResult


@dataclass(frozen=True)
class PipesRemoteException:
    """An exception reported by the external process in its ``closed`` message.

    ``str()`` is its summary, its type said once: a Python peer's ``message`` already starts with the type,
    qualified or not (``"ValueError: bad"``, ``"pipes_ext._errors.PipesUsageError: bad"``); the ``name`` of a
    peer whose message does not is put in front (``"DivideByZero: cannot divide"``).

    Attributes:
        name: the exception's type name as the process gave it (``"ValueError"``), or None.
        message: its message as the process formatted it (a Python peer: ``"ValueError: bad\\n"``).
        stack: the traceback's frames, outermost first, each a formatted ``str`` (as
            :func:`traceback.format_tb` gives them); empty when the process sent none.
        cause: the exception it was raised from (``raise ... from``), or None.
        context: the exception being handled when it was raised (when there is no ``cause``), or None.
    """

    name: str | None
    message: str
    stack: tuple[str, ...]
    cause: PipesRemoteException | None = None
    context: PipesRemoteException | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> PipesRemoteException:
        return cls(
            name=data.get("name"),
            message=data["message"],
            stack=tuple(data["stack"]),
            cause=cls.from_wire(data["cause"]) if data.get("cause") else None,
            context=cls.from_wire(data["context"]) if data.get("context") else None,
        )

    def format(self, *, last_summary: bool = True) -> str:
        """A traceback-like text of the whole chain, oldest exception first, as Python prints it; each
        exception's type said once (see the class doc). ``last_summary=False`` leaves out the summary of this
        (the last) exception, for a text whose headline already states it."""
        parts: list[str] = []
        if self.cause is not None:
            parts += [self.cause.format(), "\nThe above exception was the direct cause of the following exception:\n\n"]
        elif self.context is not None:
            parts += [
                self.context.format(),
                "\nDuring handling of the above exception, another exception occurred:\n\n",
            ]
        if self.stack:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(self.stack)
        if last_summary:
            summary = self._summary(strip=False)
            parts.append(summary if summary.endswith("\n") else summary + "\n")
        return "".join(parts)

    def _summary(self, *, strip: bool) -> str:
        message = self.message.strip() if strip else self.message
        if not self.name or _names_type(message, self.name):
            return message
        return f"{self.name}: {message.lstrip()}" if message.strip() else self.name

    def __str__(self) -> str:
        return self._summary(strip=True)


def _names_type(message: str, name: str) -> bool:
    """Does ``message`` start with the type ``name``, qualified or not, as Python's
    :func:`traceback.format_exception_only` writes it (``"ValueError: x"``, ``"pkg.mod.Error: x"``, ``"Error"``)?"""
    first = message.lstrip().split("\n", 1)[0]
    head = first.split(":", 1)[0].strip() if ":" in first else first.strip()
    return head == name or head.endswith("." + name)


@dataclass(frozen=True)
class PipesOpenedEvent(_JsonEvent):
    """The external process opened the Pipes channel (its ``opened`` message): it is running and Pipes-aware.

    Attributes:
        extras: what the process sent with ``opened`` (a JSON object as a ``dict``; empty from most peers). Not
            the run's ``extras=``, which went the other way, in the context.
        position: the index in the channel of its message line (from 0; stable across the restarts of a durable
            run, so that an ``on_event`` consumer can drop repeats), or None when no line carried it.
    """

    extras: dict[str, Any]


@dataclass(frozen=True)
class PipesClosedEvent(_JsonEvent):
    """The external process closed the Pipes channel (its ``closed`` message); nothing more will be handled.

    Attributes:
        exception: the exception it reported leaving the Pipes block (a :class:`PipesRemoteException`, with its
            chain), or None when it closed normally.
        position: the index in the channel of its message line (from 0; stable across the restarts of a durable
            run, so that an ``on_event`` consumer can drop repeats), or None when no line carried it.
    """

    exception: PipesRemoteException | None


@dataclass(frozen=True)
class PipesLogEvent(_JsonEvent):
    """A ``log`` message of the external process (also logged to the run's logger at that level).

    Attributes:
        level: its level name as sent (a ``str``): ``"DEBUG"``, ``"INFO"``, ``"WARNING"`` (or ``"WARN"``),
            ``"ERROR"``, ``"CRITICAL"`` (or ``"FATAL"``).
        message: its text (a ``str``, possibly of several lines).
        position: the index in the channel of its message line (from 0; stable across the restarts of a durable
            run, so that an ``on_event`` consumer can drop repeats), or None when no line carried it.
    """

    level: str
    message: str


@dataclass(frozen=True)
class PipesCustomMessageEvent(_JsonEvent):
    """A custom message of the external process (``report_custom_message``).

    Attributes:
        payload: what it sent, any JSON value (``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` or
            ``None``), as decoded.
        position: the index in the channel of its message line (from 0; stable across the restarts of a durable
            run, so that an ``on_event`` consumer can drop repeats), or None when no line carried it.
    """

    payload: Any


@dataclass(frozen=True)
class PipesExternalStreamEvent(_JsonEvent):
    """Output the external process captured and sent as a message (``log_external_stream``, e.g. its own
    stdout/stderr with ``include_stdio_in_messages``); also passed to the ``external_stream_handler``.

    Attributes:
        stream: which stream it came from, as the process named it (``"stdout"``, ``"stderr"``).
        text: the captured text (a ``str``; a chunk, not necessarily whole lines).
        extras: what the process sent with it (a JSON object as a ``dict``; often empty).
        position: the index in the channel of its message line (from 0; stable across the restarts of a durable
            run, so that an ``on_event`` consumer can drop repeats), or None when no line carried it.
    """

    stream: str
    text: str
    extras: dict[str, Any]


# An issue keeps at most this much of what was read (and its reason at most this many characters): enough to
# recognise the line, while 200 bad lines of 5 MB cost kilobytes, not a gigabyte, whether messages are retained
# or not.
ISSUE_EXCERPT_BYTES = 1024


@dataclass(frozen=True)
class PipesProtocolIssue(_JsonEvent):
    """Something read from the channel that broke the protocol.

    Attributes:
        reason: what was wrong, for people (its wording may change; classify by ``kind``).
        raw: the start of what was read (at most :data:`ISSUE_EXCERPT_BYTES` of UTF-8, undecodable bytes
            replaced); the whole of it when ``size`` says it was that short.
        source: where it was read (a file path, a blob URL, ``"stdout"``), when the reader says.
        kind: what was wrong, machine-readable (a :class:`PipesProtocolErrorKind`).
        size: how many bytes were read for it (the whole line, not the excerpt); None when what was received
            was an already-decoded message rather than a line.
        handled: True when the message was still handled (its event follows the issue), e.g. a message that
            carries another protocol version, or a ``closed`` whose exception was repaired.
        position: the index in the channel of its message line (from 0; stable across the restarts of a durable
            run, so that an ``on_event`` consumer can drop repeats), or None when no line carried it.
    """

    reason: str
    raw: str
    source: str = ""
    kind: PipesProtocolErrorKind = PipesProtocolErrorKind.OTHER
    size: int | None = None
    handled: bool = False

    @property
    def truncated(self) -> bool:
        """True when ``raw`` is only the start of what was read."""
        return self.size is not None and self.size > len(self.raw.encode("utf-8", "surrogatepass"))

    def __str__(self) -> str:
        shown = self.raw if len(self.raw) <= 200 else self.raw[:200]
        if self.size is not None and (len(shown) < len(self.raw) or self.truncated):
            more = f"... ({self.size} bytes)"
        elif len(shown) < len(self.raw):
            more = f"... ({len(self.raw)} characters)"
        else:
            more = ""
        where = f" ({self.source})" if self.source else ""
        return f"{self.reason}{where}: {shown!r}{more}"


PipesEvent = (
    PipesOpenedEvent
    | PipesClosedEvent
    | PipesLogEvent
    | MaterializeResult
    | AssetCheckResult
    | PipesCustomMessageEvent
    | PipesExternalStreamEvent
    | PipesProtocolIssue
)
