"""``open_pipes_session``: inject the context, read messages, and collect what the external process reported.

The session is independent of how the external process is launched: it yields the bootstrap params (as env
vars, CLI arguments or raw dicts) for whatever launches it, and when the ``with`` block ends (the process has
finished) it drains the channel before returning, so every message that reached the channel is handled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, cast

from pipes_core.channels.injectors import PipesContextInjector
from pipes_core.channels.log_readers import PipesLogReaderGroup
from pipes_core.channels.readers import PipesMessageReader
from pipes_core.protocol.errors import PipesError, PipesUsageError, descriptor_error
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_core.protocol.results import (
    MaterializeResult,
    MetadataValue,
    PipesEvent,
    PipesExecutionResult,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesProtocolIssue,
    PipesRemoteException,
)
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._protocol import (
    CONTEXT_ASSET_KEYS,
    DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    MAX_DECODED_PARAM_BYTES,
    METADATA_RAW_VALUE,
    METADATA_TYPE,
    METADATA_TYPE_INFER,
    check_json_depth,
    encode_param,
)
from pipes_ext._types import PipesContextData, PipesExtras, PipesParams

__all__ = ["PipesSession", "open_pipes_session"]


def _as_metadata_value(value: Any) -> MetadataValue:
    if isinstance(value, MetadataValue):
        return value
    return MetadataValue.from_wire({METADATA_TYPE: METADATA_TYPE_INFER, METADATA_RAW_VALUE: value})


def _metadata_values(metadata: Mapping[str, Any] | None) -> dict[str, MetadataValue]:
    """The caller's ``metadata=`` as metadata values; checked before anything is handed out."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(label, str) for label in metadata):
        raise PipesUsageError(f"metadata must be a mapping of str labels to values, got {metadata!r:.200}")
    return {label: _as_metadata_value(value) for label, value in metadata.items()}


def _with_metadata(results: list[PipesExecutionResult], extra: dict[str, MetadataValue]) -> list[PipesExecutionResult]:
    """``results`` with ``extra`` merged into each (its keys win over reported ones)."""
    if not extra:
        return results
    return [replace(result, metadata={**result.metadata, **extra}) for result in results]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class PipesSession:
    """One exchange with one external process. Built by :func:`open_pipes_session`.

    The documented fields: ``context_data`` (what was sent to the process), ``message_handler``,
    ``context_injector_params`` / ``message_reader_params`` (what the injector and the reader yielded: where
    the process finds its context and writes its messages), ``context`` (the :class:`PipesRunContext`) and
    ``created_at`` (when the session started, timezone-aware UTC: a cutoff for reading logs). Also:
    ``context_injector``, ``message_reader``, ``finished`` (the session block has ended), and the short names
    ``handler``, ``context_params`` and ``message_params`` for the same objects.

    Results: :meth:`get_results` hands out each result once (a stream, see there); :meth:`get_all_results` and
    :meth:`get_reported_results` are snapshots that consume nothing.
    """

    def __init__(
        self,
        context_data: PipesContextData,
        message_handler: PipesMessageHandler,
        context_injector_params: PipesParams,
        message_reader_params: PipesParams,
        context: PipesRunContext | None = None,
        created_at: datetime | None = None,
        *,
        context_injector: PipesContextInjector | None = None,
        message_reader: PipesMessageReader | None = None,
    ) -> None:
        self.context_data = context_data
        self.message_handler = message_handler
        self.context_injector_params: dict[str, Any] = dict(context_injector_params)
        self.message_reader_params: dict[str, Any] = dict(message_reader_params)
        self.context = context
        self.created_at = created_at if created_at is not None else _now()
        # Not among the documented constructor's fields; a session built by hand gets the bases (which describe
        # themselves by class name in messages).
        self.context_injector = context_injector if context_injector is not None else PipesContextInjector()
        self.message_reader = message_reader if message_reader is not None else PipesMessageReader()
        self.finished = False
        self._results_lock = threading.Lock()
        self._handed_out = 0  # how many of handler.results get_results() has returned
        self._implicit_done = False
        self._implicit_keys: set[str] = set()

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        """A pickled session is a detached snapshot: the handler's plain data (see
        :class:`PipesHandlerSnapshot`), not the live handler, injector, reader, or lock. It answers the same
        read methods (results, custom messages, logs, issues, opened/closed, exception)."""
        state = dict(self.__dict__)
        handler = state["message_handler"]
        state["message_handler"] = handler.snapshot() if isinstance(handler, PipesMessageHandler) else handler
        state["context_injector"] = PipesContextInjector()
        state["message_reader"] = PipesMessageReader()
        del state["_results_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._results_lock = threading.Lock()

    # Short names, kept for existing callers (one object each: these are the documented fields).
    @property
    def handler(self) -> PipesMessageHandler:
        return self.message_handler

    @property
    def context_params(self) -> dict[str, Any]:
        return self.context_injector_params

    @property
    def message_params(self) -> dict[str, Any]:
        return self.message_reader_params

    # ------------------------------------------------------------------ bootstrap

    def get_bootstrap_params(self) -> dict[str, dict[str, Any]]:
        """The raw (unencoded) params, keyed by env-var name."""
        return {
            DAGSTER_PIPES_CONTEXT_ENV_VAR: self.context_injector_params,
            DAGSTER_PIPES_MESSAGES_ENV_VAR: self.message_reader_params,
        }

    def get_bootstrap_env_vars(self) -> dict[str, str]:
        """``DAGSTER_PIPES_CONTEXT`` / ``DAGSTER_PIPES_MESSAGES`` with base64(zlib(json)) values."""
        return {
            DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_param(self.context_injector_params),
            DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_param(self.message_reader_params),
        }

    def get_bootstrap_cli_arguments(self) -> dict[str, str]:
        """``{"--dagster-pipes-context": value, "--dagster-pipes-messages": value}`` (as the reference)."""
        return {
            DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT: encode_param(self.context_injector_params),
            DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT: encode_param(self.message_reader_params),
        }

    def get_bootstrap_argv(self) -> list[str]:
        """The CLI arguments as a flat argv list, ready to append to a command."""
        return [token for pair in self.get_bootstrap_cli_arguments().items() for token in pair]

    # ------------------------------------------------------------------ lifecycle

    @property
    def opened(self) -> bool:
        """The external process sent ``opened``."""
        return self.message_handler.opened_count > 0

    @property
    def closed(self) -> bool:
        """The external process sent ``closed``."""
        return self.message_handler.closed_count > 0

    @property
    def exception(self) -> PipesRemoteException | None:
        """The exception the external process reported in ``closed``, if any."""
        return self.message_handler.exception

    @property
    def protocol_issues(self) -> list[PipesProtocolIssue]:
        """What broke the protocol (first :data:`MAX_RETAINED_ISSUES` kept; see ``issue_count``)."""
        return list(self.message_handler.issues)

    @property
    def issue_count(self) -> int:
        return self.message_handler.issue_count

    @property
    def message_count(self) -> int:
        """Valid messages handled so far."""
        return self.message_handler.message_count

    @property
    def process_finished(self) -> bool:
        """No more results will come: the external process sent ``closed``, or the session block has ended."""
        return self.finished or self.closed

    # ------------------------------------------------------------------ results

    def get_reported_results(self) -> list[PipesExecutionResult]:
        """Snapshot: the materializations and checks the external process reported so far, in arrival order
        (no implicit ones). Consumes nothing."""
        return list(self.message_handler.results)

    def _implicit_materializations(self, reported: frozenset[str]) -> list[PipesExecutionResult]:
        selected = self.context_data.get(CONTEXT_ASSET_KEYS) or []
        return [MaterializeResult(key, implicit=True) for key in selected if key not in reported]

    def get_all_results(
        self, *, implicit_materializations: bool = True, metadata: Mapping[str, Any] | None = None
    ) -> list[PipesExecutionResult]:
        """Snapshot: every result received so far, then (with ``implicit_materializations``, once the process
        has finished) a bare materialization for each selected asset it never reported; ``metadata`` merged
        into each. Consumes nothing: use it for a complete, repeatable answer (the client's invocation does)."""
        extra = _metadata_values(metadata)
        finished = self.process_finished  # read before the results: all that came before `closed` is in them
        results = self.get_reported_results()
        if implicit_materializations and finished:
            results += self._implicit_materializations(self.message_handler.materialized_keys)
        return _with_metadata(results, extra)

    def get_results(
        self, *, implicit_materializations: bool = True, metadata: Mapping[str, Any] | None = None
    ) -> list[PipesExecutionResult]:
        """Stream: the results that arrived since the previous call, each handed out once.

        Call it while the process runs (``yield from session.get_results()``) and once more after the session
        block; every reported materialization and check comes out exactly once, in arrival order. With
        ``implicit_materializations``, a bare materialization for each selected asset the process never
        reported is added once, and only once the process has finished (``closed`` arrived, or the session
        block ended), so an asset reported late is never materialized twice. ``metadata`` is merged into the
        results of this call (its keys win over reported ones). Safe to call from several threads.
        """
        extra = _metadata_values(metadata)
        finished = self.process_finished
        with self._results_lock:
            results = self.message_handler.results
            end = len(results)
            fresh: list[PipesExecutionResult] = [
                r for r in results[self._handed_out : end]
                # A materialization after `closed` (a protocol issue) of an asset already handed out as implicit
                # is not handed out again; get_reported_results() still has it.
                if not (isinstance(r, MaterializeResult) and r.asset_key in self._implicit_keys)
            ]
            self._handed_out = end
            if implicit_materializations and finished and not self._implicit_done:
                self._implicit_done = True
                implicit = self._implicit_materializations(self.message_handler.materialized_keys)
                self._implicit_keys.update(r.asset_key for r in implicit)
                fresh += implicit
        return _with_metadata(fresh, extra)

    def get_custom_messages(self) -> list[Any]:
        """Payloads of ``report_custom_message``, in arrival order."""
        return list(self.message_handler.custom_messages)

    def get_logs(self) -> list[PipesLogEvent]:
        """``log`` messages, in arrival order."""
        return list(self.message_handler.logs)


@contextmanager
def open_pipes_session(
    context: PipesRunContext | None,
    context_injector: PipesContextInjector,
    message_reader: PipesMessageReader,
    extras: PipesExtras | None = None,
    *,
    on_event: Callable[[PipesEvent], None] | None = None,
    retain_messages: bool = True,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    external_stream_handler: Callable[[str, str], None] | None = None,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    warn_unclosed: bool = True,
    warn_unopened: bool = True,
) -> Iterator[PipesSession]:
    """Open a Pipes session for one external process.

    Args:
        context: what is being run; None for a step with no assets and a new run id.
        context_injector: how the context reaches the process.
        message_reader: how messages come back.
        extras: any JSON object, available to the process as ``extras``.
        on_event: called with each event as it arrives (on the reader's thread); see :data:`PipesEvent`.
        retain_messages: keep results and messages for ``get_*``; False streams them through ``on_event`` only,
            so memory stays flat over millions of messages.
        logger: where the process's ``log`` messages and protocol issues go (default ``pipes_core.external``).
        external_stream_handler: receives ``log_external_stream`` text as ``(stream, text)``; default: this
            process's stdout/stderr.
        on_message: called with each valid message as sent, before it becomes an event (see
            :class:`PipesMessageHandler`).
        warn_unclosed: log a warning when the process opened the channel but never sent ``closed``; a client
            that reports it itself (:class:`PipesClient`, as ``missing_closed``) passes False, so that it is
            said once per run.
        warn_unopened: log a warning when the process never opened the channel; a client that judges it itself
            (from how the process ended: it crashed, or it exited 0 without opening) passes False.

    The message reader's ``log_readers`` are started when ``opened`` arrives and stopped (after a last read)
    when the session ends; if ``opened`` never came they run once at the end.

    Yields:
        The :class:`PipesSession`; launch the process with its bootstrap env vars or CLI arguments inside the
        block. On exit the channel is drained, then the context is cleaned up. A process that never opened
        the channel, or opened but never closed it, is logged as a warning here; clients decide whether it is
        an error.

    Raises:
        PipesError: when the session fails once it has started (e.g. the channel cannot be read to its end),
            the error carries the session as ``.session``: what was received so far is not lost with it.
    """
    setup = SessionSetup(context, message_reader, extras, on_event=on_event, retain_messages=retain_messages,
                         logger=logger, external_stream_handler=external_stream_handler, on_message=on_message)
    launched = False
    session: PipesSession | None = None
    try:
        with context_injector.inject_context(setup.context_data) as context_params:
            with message_reader.read_messages(setup.handler) as message_params:
                session = setup.session(context_injector, message_reader, context_params, message_params)
                launched = True
                yield session
    except PipesError as exc:
        attach_session(exc, session)
        raise
    except OSError as exc:
        error = as_session_error(exc, session)
        if error is None:
            raise
        raise error from exc
    finally:
        # After the channel is drained: the process has ended, so its logs are complete.
        setup.log_readers.stop(run_unstarted=launched)
    assert session is not None  # the block ran, else the error was raised above
    end_session(session, warn_unclosed, warn_unopened)


class SessionSetup:
    """What opening a session does before any I/O, shared by :func:`open_pipes_session` and its asyncio twin:
    check the arguments, build the context data, the handler, and the log readers started by ``opened``."""

    def __init__(
        self,
        context: PipesRunContext | None,
        message_reader: Any,
        extras: PipesExtras | None,
        *,
        on_event: Callable[[PipesEvent], None] | None,
        retain_messages: bool,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None,
        external_stream_handler: Callable[[str, str], None] | None,
        on_message: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        if context is None:
            context = PipesRunContext()
        if not isinstance(context, PipesRunContext):
            raise PipesUsageError(f"context must be a PipesRunContext, got {type(context).__name__}")
        if extras is not None and not isinstance(extras, Mapping):
            raise PipesUsageError("extras must be a mapping (a JSON object)")
        self.context = context
        self.context_data = context.to_context_data(extras)
        # The process would refuse a context nested too deep or over its size limit: say so before launching it.
        check_json_depth(self.context_data, "the context data (extras included)", max_bytes=MAX_DECODED_PARAM_BYTES)
        self.created_at = _now()
        self.log_readers = log_readers = PipesLogReaderGroup(getattr(message_reader, "log_readers", ()))
        # What `opened` sets off: the log readers start, and the context injector discards its local copy of the
        # context (the process has read it; see PipesContextInjector.discard_context).
        self._on_opened: list[Callable[[], None]] = [log_readers.start] if log_readers.log_readers else []
        user_on_event = on_event
        on_opened = self._on_opened

        def on_event_with_opened_hooks(event: PipesEvent) -> None:
            if isinstance(event, PipesOpenedEvent):
                for hook in on_opened:
                    hook()
            if user_on_event is not None:
                user_on_event(event)

        on_event = on_event_with_opened_hooks
        self.handler = PipesMessageHandler(
            self.context_data,
            message_reader,
            on_event=on_event,
            retain_messages=retain_messages,
            logger=logger,
            external_stream_handler=external_stream_handler,
            on_message=on_message,
        )

    def session(self, context_injector: PipesContextInjector, message_reader: Any, context_params: PipesParams,
                message_params: PipesParams) -> PipesSession:
        """The session, once the injector and the reader have given their params."""
        self.log_readers.params = dict(message_params)
        self._on_opened.append(lambda: context_injector.discard_context(context_params))
        return PipesSession(
            cast(PipesContextData, self.context_data), self.handler, context_params, message_params, self.context,
            self.created_at, context_injector=context_injector, message_reader=message_reader,
        )


def as_session_error(exc: OSError, session: PipesSession | None) -> PipesError | None:
    """For an :class:`OSError` that escaped a channel's set-up or end because descriptors ran out: a
    :class:`PipesResourceError` saying what to do (carrying the session, when there is one); None for any other."""
    error = descriptor_error(exc, "open the Pipes session's channels")
    if error is not None:
        attach_session(error, session)
    return error


def attach_session(error: BaseException, session: PipesSession | None) -> None:
    """A session that fails once started hands what was received to its error, as ``.session``."""
    if session is not None and getattr(error, "session", None) is None:
        error.session = session  # type: ignore[attr-defined]  # what was received is not lost with the error


def end_session(session: PipesSession, warn_unclosed: bool = True, warn_unopened: bool = True) -> None:
    """After the channel was drained: mark the session finished and warn about a process that (with
    ``warn_unopened``) never opened the channel or (with ``warn_unclosed``) never closed it."""
    handler = session.message_handler
    session.finished = True
    if not session.opened:
        if warn_unopened:
            handler.logger.warning("[pipes] the external process never opened the Pipes channel. %s",
                                   never_opened_hint(session))
    elif not session.closed and warn_unclosed:
        handler.logger.warning(
            "[pipes] the external process opened the channel but never sent closed; buffered messages may be "
            "missing."
        )


def never_opened_hint(session: PipesSession) -> str:
    """What to check when a process exited without opening the channel: how the context was injected and where
    messages were expected."""
    return (f"{session.context_injector.no_messages_debug_text()} "
            f"{session.message_reader.no_messages_debug_text()}")
