"""The external process's view of a Pipes session: :func:`open_pipes` and :class:`PipesContext`.

``open_pipes()`` does all the I/O (load params, load the context, open the channel, send ``opened``);
:class:`PipesContext` itself does none in its constructor. Every ``report_*`` call validates its arguments
first and raises :class:`PipesUsageError` at the call site, so nothing invalid reaches the wire and the
context stays usable after a rejected call.

There is no singleton to trap a warm process: each ``open_pipes()`` builds a new context, and
:meth:`PipesContext.get` returns the most recent one that is still open (cleared on close). Outside an
orchestrated run ``open_pipes()`` returns a *local* context: empty context data, messages discarded, one
:class:`PipesWarning`. It is a real :class:`PipesContext` and validates like one.
"""

from __future__ import annotations

import os
import warnings

from ._context_loaders import PipesContextLoader, PipesDefaultContextLoader
from ._errors import PipesUsageError, PipesWarning
from ._params import PipesEnvVarParamsLoader, PipesParamsLoader
from ._protocol import (
    CONTEXT_ASSET_KEYS,
    CONTEXT_CODE_VERSION_BY_ASSET_KEY,
    CONTEXT_EXTRAS,
    CONTEXT_JOB_NAME,
    CONTEXT_PARTITION_KEY,
    CONTEXT_PARTITION_KEY_RANGE,
    CONTEXT_PARTITION_TIME_WINDOW,
    CONTEXT_PROVENANCE_BY_ASSET_KEY,
    CONTEXT_RETRY_NUMBER,
    CONTEXT_RUN_ID,
    LOG_LEVELS,
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
    PARAM_INCLUDE_STDIO_IN_MESSAGES,
    PARAM_LEVEL,
    PARAM_MESSAGE,
    PARAM_METADATA,
    PARAM_PASSED,
    PARAM_SEVERITY,
    PARAM_STREAM,
    PARAM_TEXT,
    SEVERITIES,
    SEVERITY_ERROR,
    STREAMS,
    dumps_custom_message,
    dumps_message,
    empty_context_data,
    escape_asset_key,
    include_stdio_param,
    normalize_metadata,
    serialize_exception,
)
from ._trace import attach_trace_context, traceparent, tracestate
from ._writers import (
    PipesDefaultMessageWriter,
    PipesDiscardMessageWriterChannel,
    PipesMessageWriter,
    PipesMessageWriterChannel,
)

# `typing` is not imported at run time: it costs start-up time and every annotation here is a string.
TYPE_CHECKING = False

if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping, Sequence
    from types import TracebackType
    from typing import Any, ClassVar

    from ._capture import PipesStdioCapture

__all__ = ["PipesContext", "open_pipes", "open_dagster_pipes", "LOCAL_RUN_ID"]

# run_id of the local context used outside an orchestrated run.
LOCAL_RUN_ID = "local"


class PipesContext:
    """What the external process knows of its run, and how it reports back.

    Build one with :func:`open_pipes`. Use it as a context manager: leaving the ``with`` block sends
    ``closed`` (carrying the exception, with its cause and context chain, if one is leaving the block) and the
    exception is re-raised.
    """

    _current: ClassVar[list[PipesContext]] = []

    def __init__(
        self,
        context_data: Mapping[str, Any],
        channel: PipesMessageWriterChannel,
        *,
        opened_extras: Mapping[str, Any] | None = None,
        is_local: bool = False,
        before_close: Sequence[Any] = (),
    ) -> None:
        self._data = dict(context_data)
        self._channel = channel
        self._opened_extras = dict(opened_extras or {})
        self._is_local = is_local
        self._before_close = list(before_close)
        self._materialized: set[str] = set()
        self._opened = False
        self._closed = False
        self._logger: logging.Logger | None = None
        self._pid = 0  # the process that sent opened: only it sends closed

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def get(cls) -> PipesContext:
        """The most recently opened context that is still open.

        Raises:
            PipesUsageError: when no context is open.
        """
        if not cls._current:
            raise PipesUsageError("no Pipes context is open; call open_pipes() first")
        return cls._current[-1]

    @classmethod
    def is_initialized(cls) -> bool:
        """True when a context is open (see :meth:`get`)."""
        return bool(cls._current)

    @classmethod
    def set(cls, context: PipesContext) -> None:
        """Make ``context`` the one :meth:`get` returns (dagster-pipes' name for it).

        There is no singleton to overwrite here: :meth:`get` returns the most recently opened context that is still
        open, so ``set`` opens ``context`` if needed and moves it to the top. Closing it takes it out again, so a
        closed context is never returned.

        Raises:
            PipesUsageError: when ``context`` is already closed.
        """
        if context.is_closed:
            raise PipesUsageError("PipesContext.set(): the context is closed")
        if not context._opened:
            context.open()
        if cls._current[-1] is not context:
            cls._current.remove(context)
            cls._current.append(context)

    def open(self) -> PipesContext:
        """Send ``opened``. Called by :func:`open_pipes`; a second call does nothing."""
        if not self._opened:
            self._send(METHOD_OPENED, {PARAM_EXTRAS: self._opened_extras})
            self._opened = True
            self._pid = os.getpid()
            PipesContext._current.append(self)
        return self

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def is_local(self) -> bool:
        """True for the local context returned outside an orchestrated run (messages go nowhere)."""
        return self._is_local

    def close(self, exc: BaseException | None = None) -> None:
        """Send ``closed`` (with ``exc`` if given) and close the channel. Idempotent.

        Only the process that opened the context closes the session: in a forked child (``os.fork``,
        ``multiprocessing`` with fork) ``close`` just marks this copy closed and sends nothing, so the parent's
        session is not closed on its behalf. The child's other messages do reach the channel.

        Order: ``close()`` each ``before_close`` object (they may still write to the channel, e.g. the stdio
        capture draining), send ``closed``, then close the channel.
        """
        if self._closed:
            return
        self._closed = True
        if self in PipesContext._current:
            PipesContext._current.remove(self)
        if self._opened and os.getpid() != self._pid:
            # A forked child leaving the block (or exiting): the session is its parent's, so it sends no
            # ``closed`` and leaves the channel and resources (copies of the parent's) as they are.
            return
        try:
            for resource in self._before_close:
                resource.close()
        finally:
            try:
                params: dict[str, Any] = {}
                if exc is not None:
                    params[PARAM_EXCEPTION] = serialize_exception(exc)
                self._channel.write_line(dumps_message(METHOD_CLOSED, params))
            finally:
                self._channel.close()

    def __enter__(self) -> PipesContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            exc = None
        self.close(exc)

    # ---------------------------------------------------------------- context data

    @property
    def context_data(self) -> dict[str, Any]:
        """The whole context-data document (a copy)."""
        return dict(self._data)

    @property
    def is_asset_step(self) -> bool:
        return self._data[CONTEXT_ASSET_KEYS] is not None

    @property
    def asset_keys(self) -> list[str]:
        keys = self._data[CONTEXT_ASSET_KEYS]
        if keys is None:
            raise PipesUsageError("asset_keys: this step has no assets in scope (it is not an asset step)")
        return list(keys)

    @property
    def asset_key(self) -> str:
        keys = self.asset_keys
        if len(keys) != 1:
            raise PipesUsageError(f"asset_key: {len(keys)} assets are in scope ({keys}); use asset_keys")
        return keys[0]

    @property
    def provenance_by_asset_key(self) -> dict[str, Any]:
        by_key = self._data[CONTEXT_PROVENANCE_BY_ASSET_KEY]
        if by_key is None:
            raise PipesUsageError("provenance_by_asset_key: this step has no assets in scope")
        return dict(by_key)

    @property
    def provenance(self) -> Any:
        return self.provenance_by_asset_key.get(self.asset_key)

    @property
    def code_version_by_asset_key(self) -> dict[str, str | None]:
        by_key = self._data[CONTEXT_CODE_VERSION_BY_ASSET_KEY]
        if by_key is None:
            raise PipesUsageError("code_version_by_asset_key: this step has no assets in scope")
        return dict(by_key)

    @property
    def code_version(self) -> str | None:
        return self.code_version_by_asset_key.get(self.asset_key)

    @property
    def is_partition_step(self) -> bool:
        return self._data[CONTEXT_PARTITION_KEY_RANGE] is not None or self._data[CONTEXT_PARTITION_KEY] is not None

    @property
    def partition_key(self) -> str:
        key = self._data[CONTEXT_PARTITION_KEY]
        if key is None:
            raise PipesUsageError("partition_key: this step does not target a single partition")
        return str(key)

    @property
    def partition_key_range(self) -> dict[str, str]:
        key_range = self._data[CONTEXT_PARTITION_KEY_RANGE]
        if key_range is None:
            raise PipesUsageError("partition_key_range: this step is not partitioned")
        return dict(key_range)

    @property
    def partition_time_window(self) -> dict[str, str] | None:
        if not self.is_partition_step:
            raise PipesUsageError("partition_time_window: this step is not partitioned")
        window = self._data[CONTEXT_PARTITION_TIME_WINDOW]
        return None if window is None else dict(window)

    @property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` of the orchestrator's run span (from ``TRACEPARENT`` in this process's
        environment), or None when the orchestrator traced nothing; see :mod:`pipes_ext._trace`."""
        return traceparent()

    @property
    def tracestate(self) -> str | None:
        """The W3C ``tracestate`` that goes with :attr:`traceparent` (``TRACESTATE``), or None."""
        return tracestate()

    @property
    def run_id(self) -> str:
        return str(self._data[CONTEXT_RUN_ID])

    @property
    def job_name(self) -> str | None:
        name = self._data[CONTEXT_JOB_NAME]
        return None if name is None else str(name)

    @property
    def retry_number(self) -> int:
        return int(self._data[CONTEXT_RETRY_NUMBER])

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self._data[CONTEXT_EXTRAS])

    def get_extra(self, key: str) -> Any:
        """The extra named ``key``; raises :class:`PipesUsageError` naming the known extras when missing."""
        extras = self._data[CONTEXT_EXTRAS]
        if key not in extras:
            raise PipesUsageError(
                f"extra {key!r} is undefined; extras must be provided by the orchestrator (known: {sorted(extras)})"
            )
        return extras[key]

    # ---------------------------------------------------------------- reporting

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise PipesUsageError(f"cannot send {method}: the Pipes context is closed")

    def _send(self, method: str, params: Mapping[str, Any]) -> None:
        self._check_open(method)
        self._channel.write_line(dumps_message(method, params))

    def _resolve_asset_key(self, method: str, asset_key: str | Sequence[str] | None) -> str:
        keys = self._data[CONTEXT_ASSET_KEYS]
        if asset_key is None:
            if not keys:
                raise PipesUsageError(f"{method}: no asset_key given and this step has no asset in scope")
            if len(keys) != 1:
                raise PipesUsageError(
                    f"{method}: {len(keys)} assets are in scope ({keys}); pass asset_key= to say which one"
                )
            return str(keys[0])
        if not isinstance(asset_key, str):
            if isinstance(asset_key, (list, tuple)) and all(isinstance(p, str) for p in asset_key):
                asset_key = escape_asset_key(asset_key)
            else:
                raise PipesUsageError(f"{method}: asset_key must be a string or a list of strings")
        if keys is not None and asset_key not in keys:
            raise PipesUsageError(f"{method}: asset key {asset_key!r} is not in scope (in scope: {keys})")
        return asset_key

    def report_asset_materialization(
        self,
        metadata: Mapping[str, Any] | None = None,
        data_version: str | None = None,
        asset_key: str | Sequence[str] | None = None,
    ) -> None:
        """Report that an asset was materialized. Each asset may be materialized once per run."""
        method = METHOD_REPORT_ASSET_MATERIALIZATION
        key = self._resolve_asset_key(method, asset_key)
        if key in self._materialized:
            raise PipesUsageError(f"{method}: asset {key!r} was already materialized in this run")
        if data_version is not None and not isinstance(data_version, str):
            raise PipesUsageError(f"{method}: data_version must be a string or None")
        params = {PARAM_ASSET_KEY: key, PARAM_DATA_VERSION: data_version, PARAM_METADATA: normalize_metadata(metadata)}
        self._send(method, params)
        self._materialized.add(key)

    def report_asset_check(
        self,
        check_name: str,
        passed: bool,
        severity: str = SEVERITY_ERROR,
        metadata: Mapping[str, Any] | None = None,
        asset_key: str | Sequence[str] | None = None,
    ) -> None:
        """Report the result of an asset check; ``severity`` is ``"ERROR"`` (default) or ``"WARN"``."""
        method = METHOD_REPORT_ASSET_CHECK
        key = self._resolve_asset_key(method, asset_key)
        if not isinstance(check_name, str) or not check_name:
            raise PipesUsageError(f"{method}: check_name must be a non-empty string")
        if not isinstance(passed, bool):
            raise PipesUsageError(f"{method}: passed must be a bool, got {type(passed).__name__}")
        if severity not in SEVERITIES:
            raise PipesUsageError(f"{method}: severity must be one of {SEVERITIES}, got {severity!r}")
        params = {
            PARAM_ASSET_KEY: key,
            PARAM_CHECK_NAME: check_name,
            PARAM_PASSED: passed,
            PARAM_METADATA: normalize_metadata(metadata),
            PARAM_SEVERITY: severity,
        }
        self._send(method, params)

    def report_custom_message(self, payload: Any) -> None:
        """Send any JSON-serialisable payload; it is serialised here, so a bad payload raises here."""
        self._check_open(METHOD_REPORT_CUSTOM_MESSAGE)
        self._channel.write_line(dumps_custom_message(payload))

    def log_external_stream(self, stream: str, text: str, extras: Mapping[str, Any] | None = None) -> None:
        """Forward text written to ``"stdout"`` or ``"stderr"``."""
        if stream not in STREAMS:
            raise PipesUsageError(f"{METHOD_LOG_EXTERNAL_STREAM}: stream must be one of {STREAMS}, got {stream!r}")
        if not isinstance(text, str):
            raise PipesUsageError(f"{METHOD_LOG_EXTERNAL_STREAM}: text must be a string")
        params = {PARAM_STREAM: stream, PARAM_TEXT: text, PARAM_EXTRAS: dict(extras or {})}
        self._send(METHOD_LOG_EXTERNAL_STREAM, params)

    def _log(self, level_name: str, message: str) -> None:
        self._send(METHOD_LOG, {PARAM_MESSAGE: message, PARAM_LEVEL: level_name})

    @property
    def log(self) -> logging.Logger:
        """A :class:`logging.Logger` whose records become ``log`` messages (all levels, DEBUG included).

        It is private to this context (not registered with ``logging.getLogger``) and does not propagate.
        """
        if self._logger is None:
            self._logger = _make_logger(self)
        return self._logger


def _level_name(levelno: int, levelname: str) -> str:
    """A level name the orchestrator accepts: custom levels map to the standard level at or below them."""
    if levelname in LOG_LEVELS:
        return levelname
    for name in ("CRITICAL", "ERROR", "WARNING", "INFO"):
        if levelno >= LOG_LEVELS[name]:
            return name
    return "DEBUG"


def _make_logger(context: PipesContext) -> logging.Logger:
    import logging  # only when the logger is used: keeps start-up lean

    class _PipesLogHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            context._log(_level_name(record.levelno, record.levelname), message)

    # NOTSET with no parent: every level is enabled, custom ones below DEBUG too (mapped by _level_name).
    logger = logging.Logger("pipes_ext", level=logging.NOTSET)
    logger.propagate = False
    logger.addHandler(_PipesLogHandler())
    return logger


def open_pipes(
    context_loader: PipesContextLoader | None = None,
    message_writer: PipesMessageWriter | None = None,
    params_loader: PipesParamsLoader | None = None,
) -> PipesContext:
    """Open the external side of a Pipes session and send ``opened``.

    Args:
        context_loader: reads the context data; default: a local file (``path``) or inline ``data``.
        message_writer: opens the messages channel; default: file, stdio or buffered stdio by params.
        params_loader: finds the bootstrap params; default: the environment.

    Returns:
        An open :class:`PipesContext`, to use as a context manager. Outside an orchestrated run (no context
        param found), a local context: empty context data, messages discarded, and a :class:`PipesWarning`.

    Raises:
        PipesProtocolError: bootstrap params or context data that cannot be decoded.
        PipesTransportError: a context file or messages channel that cannot be opened.
        OSError: the stdio capture asked for by ``include_stdio_in_messages`` cannot be set up (``closed``
            carrying this error has been sent).
    """
    params_loader = params_loader or PipesEnvVarParamsLoader()
    if not params_loader.is_pipes_process():
        warnings.warn(
            "This process was not launched by a Pipes orchestrator (no DAGSTER_PIPES_CONTEXT found): "
            "open_pipes() returns a local context whose messages are not sent anywhere.",
            PipesWarning,
            stacklevel=2,
        )
        local = PipesContext(
            empty_context_data(LOCAL_RUN_ID), PipesDiscardMessageWriterChannel(), is_local=True
        )
        return local.open()
    context_loader = context_loader or PipesDefaultContextLoader()
    message_writer = message_writer or PipesDefaultMessageWriter()
    context_params = params_loader.load_context_params()
    messages_params = params_loader.load_messages_params()
    try:
        data = context_loader.load_context(context_params)
    except BaseException:
        context_loader.close()
        raise
    context_loader.close()
    channel = message_writer.open(messages_params)
    capture = _stdio_capture(messages_params, channel)
    # The orchestrator's trace context (TRACEPARENT), current for OpenTelemetry while the block is open; detached
    # first on close, before the capture drains and closed is sent.
    trace_context = attach_trace_context()
    before_close = [resource for resource in (trace_context, capture) if resource is not None]
    context = PipesContext(
        data,
        channel,
        opened_extras=message_writer.get_opened_extras(),
        before_close=before_close,
    )
    try:
        context.open()
    except BaseException:
        if trace_context is not None:
            trace_context.close()
        channel.close()
        raise
    if capture is not None:
        try:
            capture.start()  # after opened, so that opened is the first message
        except BaseException as exc:
            context.close(exc)
            raise
    return context


def _stdio_capture(
    messages_params: Mapping[str, Any], channel: PipesMessageWriterChannel
) -> PipesStdioCapture | None:
    """The (not yet started) stdio capture the messages params ask for, if any."""
    capture, problem = include_stdio_param(messages_params)
    if problem is not None:  # a foreign orchestrator's "false": not truthy, a warning (the protocol's leniency)
        warnings.warn(problem, PipesWarning, stacklevel=3)
    if not capture:
        return None
    if channel.writes_to_stdio:
        warnings.warn(
            f'messages params ask for "{PARAM_INCLUDE_STDIO_IN_MESSAGES}", but the messages channel writes to '
            "stdout/stderr itself: not capturing stdio",
            PipesWarning,
            stacklevel=3,
        )
        return None
    from ._capture import PipesStdioCapture  # only when asked for: keeps start-up lean

    return PipesStdioCapture(channel)


# The name used by the ``dagster-pipes`` package: a script only has to change its import.
open_dagster_pipes = open_pipes

