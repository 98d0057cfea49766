"""``open_pipes_session``: inject the context, read messages, and collect what the external process reported.

The session is independent of how the external process is launched: it yields the bootstrap params (as env
vars, CLI arguments or raw dicts) for whatever launches it, and when the ``with`` block ends (the process has
finished) it drains the channel before returning, so every message that reached the channel is handled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pipes_ext._protocol import (
    DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    encode_param,
)

from ._errors import PipesUsageError
from ._handler import PipesMessageHandler
from ._injectors import PipesContextInjector
from ._readers import PipesMessageReader
from ._results import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesEvent,
    PipesExecutionResult,
    PipesLogEvent,
    PipesProtocolIssue,
    PipesRemoteException,
)
from ._run_context import PipesRunContext

__all__ = ["PipesSession", "open_pipes_session"]


def _as_metadata_value(value: Any) -> MetadataValue:
    if isinstance(value, MetadataValue):
        return value
    return MetadataValue.from_wire({"type": "__infer__", "raw_value": value})


class PipesSession:
    """One exchange with one external process. Built by :func:`open_pipes_session`."""

    def __init__(
        self,
        context_data: dict[str, Any],
        context_params: dict[str, Any],
        message_params: dict[str, Any],
        handler: PipesMessageHandler,
        context_injector: PipesContextInjector,
        message_reader: PipesMessageReader,
    ) -> None:
        self.context_data = context_data
        self.context_params = context_params
        self.message_params = message_params
        self.handler = handler
        self.context_injector = context_injector
        self.message_reader = message_reader
        self.finished = False

    # ------------------------------------------------------------------ bootstrap

    def get_bootstrap_params(self) -> dict[str, dict[str, Any]]:
        """The raw (unencoded) params, keyed by env-var name."""
        return {DAGSTER_PIPES_CONTEXT_ENV_VAR: self.context_params, DAGSTER_PIPES_MESSAGES_ENV_VAR: self.message_params}

    def get_bootstrap_env_vars(self) -> dict[str, str]:
        """``DAGSTER_PIPES_CONTEXT`` / ``DAGSTER_PIPES_MESSAGES`` with base64(zlib(json)) values."""
        return {
            DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_param(self.context_params),
            DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_param(self.message_params),
        }

    def get_bootstrap_cli_arguments(self) -> dict[str, str]:
        """``{"--dagster-pipes-context": value, "--dagster-pipes-messages": value}`` (as the reference)."""
        return {
            DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT: encode_param(self.context_params),
            DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT: encode_param(self.message_params),
        }

    def get_bootstrap_argv(self) -> list[str]:
        """The CLI arguments as a flat argv list, ready to append to a command."""
        return [token for pair in self.get_bootstrap_cli_arguments().items() for token in pair]

    # ------------------------------------------------------------------ lifecycle

    @property
    def opened(self) -> bool:
        """The external process sent ``opened``."""
        return self.handler.opened_count > 0

    @property
    def closed(self) -> bool:
        """The external process sent ``closed``."""
        return self.handler.closed_count > 0

    @property
    def exception(self) -> PipesRemoteException | None:
        """The exception the external process reported in ``closed``, if any."""
        return self.handler.exception

    @property
    def protocol_issues(self) -> list[PipesProtocolIssue]:
        """What broke the protocol (first :data:`MAX_RETAINED_ISSUES` kept; see ``issue_count``)."""
        return list(self.handler.issues)

    @property
    def issue_count(self) -> int:
        return self.handler.issue_count

    @property
    def message_count(self) -> int:
        """Valid messages handled so far."""
        return self.handler.message_count

    # ------------------------------------------------------------------ results

    def get_reported_results(self) -> list[PipesExecutionResult]:
        """Materializations and checks the external process reported, in arrival order."""
        return list(self.handler.results)

    def get_results(
        self, implicit_materializations: bool = True, metadata: Mapping[str, Any] | None = None
    ) -> list[PipesExecutionResult]:
        """Reported results, then (with ``implicit_materializations``) a bare materialization for each selected
        asset the process did not report. ``metadata`` is merged into every result and wins over reported
        keys. A snapshot: calling it again while the session runs is safe."""
        results = self.get_reported_results()
        if implicit_materializations:
            reported = {r.asset_key for r in results if isinstance(r, MaterializeResult)}
            for key in self.context_data.get("asset_keys") or []:
                if key not in reported:
                    results.append(MaterializeResult(key, implicit=True))
        if metadata:
            extra = {label: _as_metadata_value(value) for label, value in metadata.items()}
            merged: list[PipesExecutionResult] = []
            for result in results:
                if isinstance(result, MaterializeResult):
                    merged.append(
                        MaterializeResult(result.asset_key, {**result.metadata, **extra}, result.data_version,
                                          result.implicit)
                    )
                else:
                    merged.append(
                        AssetCheckResult(result.asset_key, result.check_name, result.passed, result.severity,
                                         {**result.metadata, **extra})
                    )
            results = merged
        return results

    def get_custom_messages(self) -> list[Any]:
        """Payloads of ``report_custom_message``, in arrival order."""
        return list(self.handler.custom_messages)

    def get_logs(self) -> list[PipesLogEvent]:
        """``log`` messages, in arrival order."""
        return list(self.handler.logs)


@contextmanager
def open_pipes_session(
    context: PipesRunContext | None,
    context_injector: PipesContextInjector,
    message_reader: PipesMessageReader,
    extras: Mapping[str, Any] | None = None,
    *,
    on_event: Callable[[PipesEvent], None] | None = None,
    retain_messages: bool = True,
    logger: logging.Logger | None = None,
    external_stream_handler: Callable[[str, str], None] | None = None,
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

    Yields:
        The :class:`PipesSession`; launch the process with its bootstrap env vars or CLI arguments inside the
        block. On exit the channel is drained, then the context is cleaned up. A process that never opened
        the channel, or opened but never closed it, is logged as a warning here; clients decide whether it is
        an error.
    """
    if context is None:
        context = PipesRunContext()
    if not isinstance(context, PipesRunContext):
        raise PipesUsageError(f"context must be a PipesRunContext, got {type(context).__name__}")
    if extras is not None and not isinstance(extras, Mapping):
        raise PipesUsageError("extras must be a mapping (a JSON object)")
    context_data = context.to_context_data(extras)
    handler = PipesMessageHandler(
        context_data,
        on_event=on_event,
        retain_messages=retain_messages,
        logger=logger,
        external_stream_handler=external_stream_handler,
    )
    with context_injector.inject_context(context_data) as context_params:
        with message_reader.read_messages(handler) as message_params:
            session = PipesSession(
                context_data, dict(context_params), dict(message_params), handler, context_injector, message_reader
            )
            yield session
    session.finished = True
    if not session.opened:
        handler.logger.warning(
            "[pipes] the external process never opened the Pipes channel. %s %s",
            context_injector.no_messages_debug_text(),
            message_reader.no_messages_debug_text(),
        )
    elif not session.closed:
        handler.logger.warning(
            "[pipes] the external process opened the channel but never sent closed; buffered messages may be "
            "missing."
        )
