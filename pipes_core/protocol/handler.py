"""The message handler: validates each message, turns it into a typed event, keeps the results.

It never raises to the reader that feeds it: a line that is not JSON, is nested deeper than
``MAX_JSON_DEPTH``, is not a message, names an unknown method or carries bad params becomes a
:class:`PipesProtocolIssue` with its ``kind`` (recorded, logged, and passed to ``on_event``), and reading goes
on; so does any unexpected exception while handling one line (kind ``HANDLER_ERROR``). An issue keeps only an
excerpt of its line (:data:`ISSUE_EXCERPT_BYTES`) and the line's size. Unknown extra keys in params are
tolerated. Reported asset keys are checked against the run's selection when it has one: an unselected key or a
second materialization of one key is an issue, not a silent success.

Lifecycle rules (each breach is an issue; whether the message is still handled is said here and in
``PipesProtocolIssue.handled``):

- a message whose ``__dagster_pipes_version`` is not ``"0.1"`` (``null`` included) is still handled, as its
  shape was valid; the issue is reported for the first message carrying each such value;
- a second ``opened`` is not handled (the first one's extras stay);
- any message after ``closed`` (a second ``closed`` included) is not handled: it is no result, log or
  custom message; only ``log_external_stream`` text is still passed on, without an issue, as captured output
  may trail ``closed`` in other implementations;
- a ``closed`` whose exception is malformed is still handled (it counts as ``closed``) with the valid parts of
  the exception (name, message, stack, cause, context), and the malformed parts are the issue.
"""

from __future__ import annotations

import codecs
import logging
import reprlib
import shlex
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from pipes_core.protocol.results import (
    ISSUE_EXCERPT_BYTES,
    AssetCheckResult,
    MaterializeResult,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExternalStreamEvent,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesProtocolIssue,
    PipesRemoteException,
    metadata_from_wire,
)
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._errors import PipesProtocolError, PipesProtocolErrorKind
from pipes_ext._protocol import (
    CONTEXT_ASSET_KEYS,
    CONTEXT_RUN_ID,
    DEFAULT_LOG_LEVEL,
    JSON_WHITESPACE,
    LOG_LEVELS,
    MESSAGE_PARAMS_FIELD,
    METHOD_CLOSED,
    METHOD_LOG,
    METHOD_LOG_EXTERNAL_STREAM,
    METHOD_OPENED,
    METHOD_REPORT_ASSET_CHECK,
    METHOD_REPORT_ASSET_MATERIALIZATION,
    METHOD_REPORT_CUSTOM_MESSAGE,
    PARAM_ASSET_KEY,
    PARAM_CHECK_NAME,
    PARAM_DATA_VERSION,
    PARAM_EXCEPTION,
    PARAM_EXTRAS,
    PARAM_LEVEL,
    PARAM_MESSAGE,
    PARAM_METADATA,
    PARAM_PASSED,
    PARAM_PAYLOAD,
    PARAM_SEVERITY,
    PARAM_STREAM,
    PARAM_TEXT,
    PIPES_PROTOCOL_VERSION,
    PIPES_PROTOCOL_VERSION_FIELD,
    SEVERITY_ERROR,
    STREAM_STDOUT,
    load_message_line,
    normalize_log_level,
    salvage_exception,
    validate_message,
)

__all__ = [
    "PipesMessageHandler",
    "MessageObserver",
    "PipesRunLogger",
    "DEFAULT_LOGGER_NAME",
    "MAX_RETAINED_ISSUES",
    "MAX_REPORTED_VERSIONS",
    "LOG_EXTRA_RUN_ID",
    "LOG_EXTRA_COMMAND",
    "command_logger",
    "PipesHandlerSnapshot",
]


class MessageObserver(Protocol):
    """What the handler tells a run's observers (:class:`pipes_core.observe.observer.RunObserver` has these two methods;
    named here by them so that the handler, below the observers, does not import them)."""

    def message(self, method: str, params: Mapping[str, Any], size: int) -> None: ...

    def event(self, event: PipesEvent) -> None: ...

# Records of the external process's `log` messages go to this logger unless another one is given.
DEFAULT_LOGGER_NAME = "pipes_core.external"
# `extra` fields put on every record logged for a run, so that records of concurrent runs can be told apart
# (and a handler can route them): the run id, and (from the clients) the command as the user gave it.
LOG_EXTRA_RUN_ID = "pipes_run_id"
LOG_EXTRA_COMMAND = "pipes_command"


class PipesRunLogger(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic only in the stubs
    """A logger adapter adding ``extra`` fields (the run's id, its command) to every record of one run.

    It wraps a :class:`logging.Logger` or a :class:`logging.LoggerAdapter` (e.g. an orchestrator's per-task
    adapter): the wrapped adapters' own ``process`` runs first, and these fields are added to whatever ``extra``
    they produced (a stock adapter replaces ``extra``; the fields are kept all the same). Fields already on the
    call win over these.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[Any], extra: Mapping[str, Any]) -> None:
        super().__init__(logger, dict(extra))

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        msg, kwargs = self.process(msg, kwargs)
        fields = dict(kwargs["extra"])
        target: Any = self.logger
        while isinstance(target, logging.LoggerAdapter):
            msg, kwargs = target.process(msg, kwargs)  # type: ignore[assignment]  # stubs: MutableMapping
            for key, value in (kwargs.get("extra") or {}).items():
                fields.setdefault(key, value)
            target = target.logger
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **fields}
        target.log(level, msg, *args, **kwargs)


def command_logger(logger: logging.Logger | logging.LoggerAdapter[Any] | None,
                   argv: str | Sequence[str]) -> PipesRunLogger:
    """``logger`` (default ``pipes_core.external``) adding the command to every record: a list ``shlex``-joined,
    a shell string as is."""
    command = argv if isinstance(argv, str) else shlex.join(argv)
    return PipesRunLogger(logger or logging.getLogger(DEFAULT_LOGGER_NAME), {LOG_EXTRA_COMMAND: command})


class PipesHandlerSnapshot:
    """What a :class:`PipesMessageHandler` received, as plain data (no lock, no reader, no callbacks): it
    answers the same read attributes, so a :class:`~pipes_core.PipesSession` over it answers the same read
    methods. Pickling a session (or an invocation, or an error carrying one) stores this instead of the live
    handler."""

    def __init__(self, handler: Any) -> None:  # a PipesMessageHandler or a snapshot
        self.opened_count: int = handler.opened_count
        self.closed_count: int = handler.closed_count
        self.opened_extras: dict[str, Any] = dict(handler.opened_extras)
        self.exception: PipesRemoteException | None = handler.exception
        self.results: list[MaterializeResult | AssetCheckResult] = list(handler.results)
        self.custom_messages: list[Any] = list(handler.custom_messages)
        self.logs: list[PipesLogEvent] = list(handler.logs)
        self.issues: list[PipesProtocolIssue] = list(handler.issues)
        self.issue_count: int = handler.issue_count
        self.message_count: int = handler.message_count
        self.materialized_keys: frozenset[str] = (
            frozenset(handler._materialized) if isinstance(handler, PipesMessageHandler) else handler.materialized_keys)
        # Callback exceptions are live objects (tracebacks, arbitrary types): kept as text.
        self.callback_errors: list[str] = [e if isinstance(e, str) else f"{type(e).__name__}: {e}"
                                           for e in handler.callback_errors]
        self.failed_error_check_count: int = handler.failed_error_check_count
        self.logger = logging.getLogger(DEFAULT_LOGGER_NAME)
# A peer that sends only garbage must not grow memory without bound: issues past this count are logged and
# counted, not kept.
MAX_RETAINED_ISSUES = 1000
# A peer speaking another protocol version gets one issue per distinct version value, up to this many values
# (past them, each such message is an issue: a peer varying its version per line is sending garbage).
MAX_REPORTED_VERSIONS = 16

_Kind = PipesProtocolErrorKind
_SIZE_OF_RAW = -1  # report_issue's default: the size of ``raw`` itself
# What makes a message line blank (skipped, not an issue): JSON whitespace (the newline is the separator).
LINE_JSON_WHITESPACE = _LINE_JSON_WHITESPACE = JSON_WHITESPACE.replace("\n", "")
_LINE_JSON_WHITESPACE_BYTES = _LINE_JSON_WHITESPACE.encode("ascii")
_excerpt_repr = reprlib.Repr()
_excerpt_repr.maxstring = _excerpt_repr.maxother = ISSUE_EXCERPT_BYTES // 4
_excerpt_repr.maxlevel = 4


def excerpt(raw: str | bytes | bytearray | memoryview) -> tuple[str, int]:
    """``(the start of raw as text, raw's size in bytes)``: at most :data:`ISSUE_EXCERPT_BYTES` of UTF-8
    (undecodable bytes replaced, a character cut at the end dropped) and the full size, so an issue never
    holds a whole hostile line."""
    if isinstance(raw, str):
        size = len(raw) if raw.isascii() else len(raw.encode("utf-8", "surrogatepass"))
        if size <= ISSUE_EXCERPT_BYTES:
            return raw, size
        head = raw[:ISSUE_EXCERPT_BYTES].encode("utf-8", "surrogatepass")[:ISSUE_EXCERPT_BYTES]
        return head.decode("utf-8", "ignore"), size
    size = len(raw)
    head = bytes(raw[:ISSUE_EXCERPT_BYTES])
    if size <= ISSUE_EXCERPT_BYTES:
        return head.decode("utf-8", "replace"), size
    # Not final: a multi-byte character cut by the excerpt is left out, not replaced as if it were a bad byte.
    return codecs.getincrementaldecoder("utf-8")("replace").decode(head, final=False), size


def _bounded(reason: str) -> str:
    return reason if len(reason) <= ISSUE_EXCERPT_BYTES else reason[:ISSUE_EXCERPT_BYTES] + "..."


def _write_external_stream(stream: str, text: str) -> None:
    target = sys.stdout if stream == STREAM_STDOUT else sys.stderr
    target.write(text)
    target.flush()


# A method's handler: (params, message, line, source) -> its event, or None when it reported an issue instead.
_MethodHandler = Callable[[dict[str, Any], dict[str, Any], "str | bytes | None", str], "PipesEvent | None"]


class PipesMessageHandler:
    """Receives lines or decoded messages from a reader, for one session.

    Args:
        context_data: the context data sent to the external process (used to check asset keys), or the
            :class:`~pipes_core.PipesRunContext` it is built from (the reference's ``context``).
        message_reader: the reader feeding this handler (the reference's second argument); kept as
            ``message_reader``, for messages.
        on_event: called with every event in arrival order, on the reader's thread.
        retain_messages: keep results, custom messages and logs for ``get_*`` calls; with False they are only
            passed to ``on_event`` and memory stays flat however many messages arrive.
        logger: where ``log`` messages and issues are logged (default ``pipes_core.external``).
        external_stream_handler: receives ``log_external_stream`` text as ``(stream, text)``; default: the
            orchestrator's own ``sys.stdout`` / ``sys.stderr``.
        on_message: called with every valid message as it came off the wire (envelope, method, params; before it
            becomes an event, so literals the handler tolerates, such as a lower-case level name, are as sent), on
            the reader's thread; for auditing and conformance checks.
    """

    def __init__(
        self,
        context_data: Mapping[str, Any] | PipesRunContext,
        message_reader: object | None = None,
        *,
        on_event: Callable[[PipesEvent], None] | None = None,
        retain_messages: bool = True,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        external_stream_handler: Callable[[str, str], None] | None = None,
        on_message: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if isinstance(context_data, PipesRunContext):
            context_data = context_data.to_context_data()
        self.message_reader = message_reader
        self._on_message = on_message
        self._selected = (None if context_data.get(CONTEXT_ASSET_KEYS) is None
                          else set(context_data[CONTEXT_ASSET_KEYS]))
        self._on_event = on_event
        self._retain = retain_messages
        # The run's observers (pipes_core.observe.observer), set by the client once the session is open: told each valid
        # message (with its size) and each event.
        self.observer: MessageObserver | None = None
        # The position in the channel of the next message line (see PipesEvent's ``position``), and of the one
        # being handled.
        self.next_position = 0
        self._position: int | None = None
        # Every record of this run carries its run id (see LOG_EXTRA_RUN_ID).
        self.logger: logging.LoggerAdapter[Any] = PipesRunLogger(
            logger or logging.getLogger(DEFAULT_LOGGER_NAME), {LOG_EXTRA_RUN_ID: context_data.get(CONTEXT_RUN_ID)})
        self._external_stream = external_stream_handler or _write_external_stream
        self._lock = threading.Lock()
        self.opened_count = 0
        self.closed_count = 0
        self.opened_extras: dict[str, Any] = {}
        self.exception: PipesRemoteException | None = None
        self.results: list[MaterializeResult | AssetCheckResult] = []
        self.custom_messages: list[Any] = []
        self.logs: list[PipesLogEvent] = []
        self.issues: list[PipesProtocolIssue] = []
        self.issue_count = 0
        self.message_count = 0
        self.callback_errors: list[BaseException] = []
        self.failed_error_check_count = 0  # checks with passed=False and severity ERROR (counted, not kept)
        self._materialized: set[str] = set()
        self._versions_reported: set[object] = set()
        # One row per method of METHOD_SPECS: the method's handler returns its event, or None once it has
        # reported an issue instead.
        self._methods: dict[str, _MethodHandler] = {
            METHOD_REPORT_CUSTOM_MESSAGE: self._on_custom_message,
            METHOD_LOG: self._on_log,
            METHOD_REPORT_ASSET_MATERIALIZATION: self._on_materialization,
            METHOD_REPORT_ASSET_CHECK: self._on_check,
            METHOD_LOG_EXTERNAL_STREAM: self._on_external_stream,
            METHOD_OPENED: self._on_opened,
            METHOD_CLOSED: self._on_closed,
        }

    # ------------------------------------------------------------------ input

    def handle_line(self, line: str | bytes, source: str = "") -> None:
        """Parse and handle one message line. Never raises: a bad line, or any exception while handling it,
        becomes an issue with its kind."""
        self._position = self.next_position
        self.next_position += 1
        try:
            self._handle_obj(load_message_line(line), line, source)
        except PipesProtocolError as exc:
            self.report_issue(str(exc), line, source, exc.kind)
        except Exception as exc:  # one line must never stop the reader
            self._report_unexpected(exc, line, source)

    def handle_lines(self, data: bytes, source: str = "") -> None:
        """Handle a block of complete, newline-separated message lines. Lines of JSON whitespace only are
        skipped; a line made of other whitespace is an issue.

        The block is decoded once; one that is not valid UTF-8 goes line by line, so that only the bad line
        becomes an issue. Lines are cut to their limit before (by the reader's splitter, once).
        """
        handle_line = self.handle_line
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            for raw in data.split(b"\n"):
                if raw.strip(_LINE_JSON_WHITESPACE_BYTES):
                    handle_line(raw, source)
            return
        blank = _LINE_JSON_WHITESPACE
        for line in lines:
            if line.strip(blank):
                handle_line(line, source)

    def report_line_too_long(
        self, head: bytes | bytearray | memoryview, size: int, source: str, max_line_bytes: int, *, ended: bool = True
    ) -> None:
        """Report a line skipped unread because it is longer than ``max_line_bytes`` (``head``: its start)."""
        text, _ = excerpt(head)
        end = "" if ended else "; it had no newline: the stream ended inside it"
        self._record(PipesProtocolIssue(
            f"message line of {size} bytes is longer than max_line_bytes={max_line_bytes}; it was skipped "
            f"unread{end}",
            text, source, _Kind.LINE_TOO_LONG, size,
        ))

    def handle_message(self, message: Any, source: str = "") -> None:
        """Handle one already-decoded message (e.g. from a custom reader). Never raises."""
        self._position = self.next_position
        self.next_position += 1
        try:
            self._handle_obj(message, None, source)
        except PipesProtocolError as exc:
            self.report_issue(str(exc), _repr_excerpt(message), source, exc.kind, size=None)
        except Exception as exc:
            self._report_unexpected(exc, None if message is None else _repr_excerpt(message), source)

    def _handle_obj(self, obj: Any, line: str | bytes | None, source: str) -> None:
        try:
            message = validate_message(obj)
        except PipesProtocolError as exc:
            if exc.kind is not _Kind.BAD_EXCEPTION:
                raise
            # A malformed exception in closed: keep its valid parts rather than lose the remote error.
            params = obj[MESSAGE_PARAMS_FIELD]
            salvaged, problems = salvage_exception(params[PARAM_EXCEPTION])
            params[PARAM_EXCEPTION] = salvaged
            message = obj
            if not self.closed_count:
                self._issue_for(message, line, source, "closed: " + "; ".join(problems) + " (the exception's valid "
                                "parts were kept)", _Kind.BAD_EXCEPTION, handled=True)
        self._dispatch(message, line, source)

    def _report_unexpected(self, exc: Exception, line: str | bytes | None, source: str) -> None:
        reason = f"handling this line raised {type(exc).__name__}: {exc}; the line was skipped and reading went on"
        if line is None:
            self.report_issue(reason, "", source, _Kind.HANDLER_ERROR, size=None)
        else:
            self.report_issue(reason, line, source, _Kind.HANDLER_ERROR)

    def report_issue(
        self,
        reason: str,
        raw: str | bytes,
        source: str = "",
        kind: PipesProtocolErrorKind = _Kind.OTHER,
        *,
        size: int | None = _SIZE_OF_RAW,
        handled: bool = False,
    ) -> None:
        """Record a protocol issue (also used by readers, e.g. for a truncated final line).

        Only an excerpt of ``raw`` is kept (:data:`ISSUE_EXCERPT_BYTES`), with its full size unless ``size``
        says otherwise (None: what was received was not a line).
        """
        text, raw_size = excerpt(raw)
        self._record(PipesProtocolIssue(_bounded(reason), text, source, kind,
                                        raw_size if size == _SIZE_OF_RAW else size, handled))

    def _record(self, issue: PipesProtocolIssue) -> None:
        with self._lock:
            self.issue_count += 1
            if len(self.issues) < MAX_RETAINED_ISSUES:
                self.issues.append(issue)
        self.logger.error("[pipes] protocol issue: %s", issue)
        self._emit(issue)

    def snapshot(self) -> PipesHandlerSnapshot:
        """What was received so far, as detached plain data (see :class:`PipesHandlerSnapshot`)."""
        with self._lock:  # (the snapshot reads _materialized itself: this lock is not reentrant)
            return PipesHandlerSnapshot(self)

    @property
    def materialized_keys(self) -> frozenset[str]:
        """The asset keys materialized so far (counted even with ``retain_messages=False``)."""
        with self._lock:
            return frozenset(self._materialized)

    # ------------------------------------------------------------------ dispatch

    def _emit(self, event: PipesEvent) -> None:
        if event.position is None and self._position is not None:
            object.__setattr__(event, "position", self._position)  # frozen: set once, as it is made
        if self.observer is not None:
            self.observer.event(event)
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:  # a failing callback must not stop the reader or lose later messages
            self.callback_errors.append(exc)
            self.logger.exception("[pipes] on_event callback raised")

    def _issue_for(
        self,
        message: dict[str, Any],
        line: str | bytes | None,
        source: str,
        reason: str,
        kind: PipesProtocolErrorKind,
        *,
        handled: bool = False,
    ) -> None:
        if line is None:
            self.report_issue(reason, _repr_excerpt(message), source, kind, size=None, handled=handled)
        else:
            self.report_issue(reason, line, source, kind, handled=handled)

    def _dispatch(self, message: dict[str, Any], line: str | bytes | None, source: str) -> None:
        method = message["method"]
        params = message["params"]
        self.message_count += 1
        if self.observer is not None:
            self.observer.message(method, params, _line_bytes(line))
        if self._on_message is not None:
            try:
                self._on_message(message)
            except Exception as error:  # like on_event: a failing callback must not stop the reader
                self.callback_errors.append(error)
                self.logger.exception("[pipes] on_message callback raised")
        if self.closed_count:
            if method == METHOD_LOG_EXTERNAL_STREAM:
                self.logger.debug("[pipes] captured output received after closed")
            else:
                self._issue_for(message, line, source, f"{method} received after closed; not handled",
                                _Kind.AFTER_CLOSED)
                return
        version = message[PIPES_PROTOCOL_VERSION_FIELD]
        if version != PIPES_PROTOCOL_VERSION and self._report_version(version):
            self._issue_for(message, line, source, f"message carries protocol version {_repr_excerpt(version)}, "
                            f'not "{PIPES_PROTOCOL_VERSION}"; it was handled as a "{PIPES_PROTOCOL_VERSION}" '
                            "message (reported once per version value)", _Kind.BAD_VERSION, handled=True)
        event = self._methods[method](params, message, line, source)
        if event is not None:
            self._emit(event)

    # ------------------------------------------------------------------ one handler per method (see _methods)

    def _on_custom_message(self, params: dict[str, Any], message: dict[str, Any], line: str | bytes | None,
                           source: str) -> PipesEvent | None:
        payload = params[PARAM_PAYLOAD]
        if self._retain:
            self.custom_messages.append(payload)
        return PipesCustomMessageEvent(payload)

    def _on_log(self, params: dict[str, Any], message: dict[str, Any], line: str | bytes | None,
                source: str) -> PipesEvent | None:
        level = normalize_log_level(params.get(PARAM_LEVEL, DEFAULT_LOG_LEVEL)) or DEFAULT_LOG_LEVEL
        event = PipesLogEvent(level, params[PARAM_MESSAGE])
        if self._retain:
            self.logs.append(event)
        self.logger.log(LOG_LEVELS[level], params[PARAM_MESSAGE])
        return event

    def _unselected(self, key: str, what: str, message: dict[str, Any], line: str | bytes | None,
                    source: str) -> bool:
        """True (and an issue recorded) when ``key`` is outside the run's selection; ``what`` names the report."""
        if self._selected is None or key in self._selected:
            return False
        self._issue_for(message, line, source, f"{what}, which is not selected (selected: {sorted(self._selected)})",
                        _Kind.UNSELECTED_ASSET)
        return True

    def _on_materialization(self, params: dict[str, Any], message: dict[str, Any], line: str | bytes | None,
                            source: str) -> PipesEvent | None:
        key = params[PARAM_ASSET_KEY]
        if self._unselected(key, f"materialization of asset {key!r}", message, line, source):
            return None
        with self._lock:
            duplicate = key in self._materialized
            self._materialized.add(key)
        if duplicate:
            self._issue_for(message, line, source, f"asset {key!r} was materialized more than once",
                            _Kind.DUPLICATE_MATERIALIZATION)
            return None
        event = MaterializeResult(key, metadata_from_wire(params[PARAM_METADATA]), params[PARAM_DATA_VERSION])
        if self._retain:
            self.results.append(event)
        return event

    def _on_check(self, params: dict[str, Any], message: dict[str, Any], line: str | bytes | None,
                  source: str) -> PipesEvent | None:
        key = params[PARAM_ASSET_KEY]
        if self._unselected(key, f"check {params[PARAM_CHECK_NAME]!r} on asset {key!r}", message, line, source):
            return None
        event = AssetCheckResult(key, params[PARAM_CHECK_NAME], params[PARAM_PASSED], params[PARAM_SEVERITY],
                                 metadata_from_wire(params[PARAM_METADATA]))
        if not event.passed and event.severity == SEVERITY_ERROR:
            self.failed_error_check_count += 1
        if self._retain:
            self.results.append(event)
        return event

    def _on_external_stream(self, params: dict[str, Any], message: dict[str, Any], line: str | bytes | None,
                            source: str) -> PipesEvent | None:
        event = PipesExternalStreamEvent(params[PARAM_STREAM], params[PARAM_TEXT], params[PARAM_EXTRAS])
        try:
            self._external_stream(event.stream, event.text)
        except Exception:
            self.logger.exception("[pipes] external stream handler raised")
        return event

    def _on_opened(self, params: dict[str, Any], message: dict[str, Any], line: str | bytes | None,
                   source: str) -> PipesEvent | None:
        if self.opened_count:
            self._issue_for(message, line, source, "opened received a second time; not handled (the first "
                            "opened counts)", _Kind.SECOND_OPENED)
            return None
        self.opened_count += 1
        self.opened_extras = params[PARAM_EXTRAS]
        self.logger.debug("[pipes] external process opened the channel")
        return PipesOpenedEvent(params[PARAM_EXTRAS])

    def _on_closed(self, params: dict[str, Any], message: dict[str, Any], line: str | bytes | None,
                   source: str) -> PipesEvent | None:
        self.closed_count += 1
        exc = params.get(PARAM_EXCEPTION)
        remote = PipesRemoteException.from_wire(exc) if exc else None
        if remote is not None and self.exception is None:
            self.exception = remote
        return PipesClosedEvent(remote)

    def _report_version(self, version: object) -> bool:
        """Whether a message carrying ``version`` (not the protocol's) gets an issue: once per value."""
        key = version if isinstance(version, (str, int, float, bool)) or version is None else repr(version)[:64]
        if key in self._versions_reported:
            return False
        if len(self._versions_reported) < MAX_REPORTED_VERSIONS:
            self._versions_reported.add(key)
        return True


def _line_bytes(line: str | bytes | None) -> int:
    """A message line's size in bytes (0: the message was not read as a line)."""
    if line is None:
        return 0
    if isinstance(line, str) and not line.isascii():
        return len(line.encode("utf-8", "surrogatepass"))
    return len(line)


def _repr_excerpt(value: object) -> str:
    """A bounded repr of an already-decoded value, for an issue (never the repr of a whole hostile message)."""
    return _excerpt_repr.repr(value)[: ISSUE_EXCERPT_BYTES]
