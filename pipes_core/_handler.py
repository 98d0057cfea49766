"""The message handler: validates each message, turns it into a typed event, keeps the results.

It never raises to the reader that feeds it: a line that is not JSON, not a message, names an unknown method
or carries bad params becomes a :class:`PipesProtocolIssue` (recorded, logged, and passed to ``on_event``),
and reading goes on. Unknown extra keys in params are tolerated. Reported asset keys are checked against the
run's selection when it has one: an unselected key or a second materialization of one key is an issue, not a
silent success.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipes_ext._errors import PipesProtocolError
from pipes_ext._protocol import (
    LOG_LEVELS,
    METHOD_CLOSED,
    METHOD_LOG,
    METHOD_LOG_EXTERNAL_STREAM,
    METHOD_OPENED,
    METHOD_REPORT_ASSET_CHECK,
    METHOD_REPORT_ASSET_MATERIALIZATION,
    METHOD_REPORT_CUSTOM_MESSAGE,
    STREAM_STDOUT,
    normalize_log_level,
    parse_message_line,
    validate_message,
)

from ._results import (
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
from ._run_context import PipesRunContext

if TYPE_CHECKING:
    from ._readers import PipesMessageReader

__all__ = ["PipesMessageHandler", "DEFAULT_LOGGER_NAME", "MAX_RETAINED_ISSUES"]

# Records of the external process's `log` messages go to this logger unless another one is given.
DEFAULT_LOGGER_NAME = "pipes_core.external"
# A peer that sends only garbage must not grow memory without bound: issues past this count are logged and
# counted, not kept.
MAX_RETAINED_ISSUES = 1000


def _raw_text(line: str | bytes) -> str:
    """What was read, as text for an issue (undecodable bytes replaced, never dropped)."""
    return line.decode("utf-8", "replace") if isinstance(line, bytes) else line


def _write_external_stream(stream: str, text: str) -> None:
    target = sys.stdout if stream == STREAM_STDOUT else sys.stderr
    target.write(text)
    target.flush()


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
        message_reader: PipesMessageReader | None = None,
        *,
        on_event: Callable[[PipesEvent], None] | None = None,
        retain_messages: bool = True,
        logger: logging.Logger | None = None,
        external_stream_handler: Callable[[str, str], None] | None = None,
        on_message: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if isinstance(context_data, PipesRunContext):
            context_data = context_data.to_context_data()
        self.message_reader = message_reader
        self._on_message = on_message
        self._selected = None if context_data.get("asset_keys") is None else set(context_data["asset_keys"])
        self._on_event = on_event
        self._retain = retain_messages
        self.logger = logger or logging.getLogger(DEFAULT_LOGGER_NAME)
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
        self._materialized: set[str] = set()

    # ------------------------------------------------------------------ input

    def handle_line(self, line: str | bytes, source: str = "") -> None:
        """Parse and handle one message line; a bad line becomes an issue."""
        try:
            message = parse_message_line(line)
        except PipesProtocolError as exc:
            self.report_issue(str(exc), _raw_text(line), source)
            return
        self._dispatch(message, line, source)

    def handle_lines(self, data: bytes, source: str = "") -> None:
        """Handle a block of complete, newline-separated message lines (blank lines are skipped).

        The block is decoded once; one that is not valid UTF-8 goes line by line, so that only the bad line
        becomes an issue.
        """
        lines: list[str] | list[bytes]
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            lines = data.split(b"\n")
        handle_line = self.handle_line
        for line in lines:
            if line.strip():
                handle_line(line, source)

    def handle_message(self, message: Any, source: str = "") -> None:
        """Handle one already-decoded message (e.g. from a custom reader)."""
        try:
            validated = validate_message(message)
        except PipesProtocolError as exc:
            self.report_issue(str(exc), repr(message), source)
            return
        self._dispatch(validated, None, source)

    def report_issue(self, reason: str, raw: str, source: str = "") -> None:
        """Record a protocol issue (also used by readers, e.g. for a truncated final line)."""
        issue = PipesProtocolIssue(reason, raw, source)
        with self._lock:
            self.issue_count += 1
            if len(self.issues) < MAX_RETAINED_ISSUES:
                self.issues.append(issue)
        self.logger.error("[pipes] protocol issue: %s", issue)
        self._emit(issue)

    @property
    def materialized_keys(self) -> frozenset[str]:
        """The asset keys materialized so far (counted even with ``retain_messages=False``)."""
        with self._lock:
            return frozenset(self._materialized)

    # ------------------------------------------------------------------ dispatch

    def _emit(self, event: PipesEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:  # a failing callback must not stop the reader or lose later messages
            self.callback_errors.append(exc)
            self.logger.exception("[pipes] on_event callback raised")

    def _issue_for(self, message: dict[str, Any], line: str | bytes | None, source: str, reason: str) -> None:
        self.report_issue(reason, repr(message) if line is None else _raw_text(line), source)

    def _dispatch(self, message: dict[str, Any], line: str | bytes | None, source: str) -> None:
        method = message["method"]
        params = message["params"]
        self.message_count += 1
        if self._on_message is not None:
            try:
                self._on_message(message)
            except Exception as error:  # like on_event: a failing callback must not stop the reader
                self.callback_errors.append(error)
                self.logger.exception("[pipes] on_message callback raised")
        if self.closed_count and method != METHOD_CLOSED:
            self.logger.warning("[pipes] message received after closed: %s", method)
        event: PipesEvent
        if method == METHOD_REPORT_CUSTOM_MESSAGE:
            if self._retain:
                self.custom_messages.append(params["payload"])
            event = PipesCustomMessageEvent(params["payload"])
        elif method == METHOD_LOG:
            level = normalize_log_level(params.get("level", "INFO")) or "INFO"
            event = PipesLogEvent(level, params["message"])
            if self._retain:
                self.logs.append(event)
            self.logger.log(LOG_LEVELS[level], params["message"])
        elif method == METHOD_REPORT_ASSET_MATERIALIZATION:
            key = params["asset_key"]
            if self._selected is not None and key not in self._selected:
                self._issue_for(message, line, source, f"materialization of asset {key!r}, which is not selected "
                                f"(selected: {sorted(self._selected)})")
                return
            with self._lock:
                duplicate = key in self._materialized
                self._materialized.add(key)
            if duplicate:
                self._issue_for(message, line, source, f"asset {key!r} was materialized more than once")
                return
            event = MaterializeResult(key, metadata_from_wire(params["metadata"]), params["data_version"])
            if self._retain:
                self.results.append(event)
        elif method == METHOD_REPORT_ASSET_CHECK:
            key = params["asset_key"]
            if self._selected is not None and key not in self._selected:
                self._issue_for(message, line, source, f"check {params['check_name']!r} on asset {key!r}, which "
                                f"is not selected (selected: {sorted(self._selected)})")
                return
            event = AssetCheckResult(
                key, params["check_name"], params["passed"], params["severity"], metadata_from_wire(params["metadata"])
            )
            if self._retain:
                self.results.append(event)
        elif method == METHOD_LOG_EXTERNAL_STREAM:
            event = PipesExternalStreamEvent(params["stream"], params["text"], params["extras"])
            try:
                self._external_stream(event.stream, event.text)
            except Exception:
                self.logger.exception("[pipes] external stream handler raised")
        elif method == METHOD_OPENED:
            self.opened_count += 1
            self.opened_extras = params["extras"]
            if self.opened_count == 1:
                self.logger.debug("[pipes] external process opened the channel")
            event = PipesOpenedEvent(params["extras"])
        else:  # closed
            self.closed_count += 1
            exc = params.get("exception")
            remote = PipesRemoteException.from_wire(exc) if exc else None
            if remote is not None and self.exception is None:
                self.exception = remote
            event = PipesClosedEvent(remote)
        self._emit(event)
