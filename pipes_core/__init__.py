"""pipes_core: the orchestrator side of the Pipes protocol (wire-compatible with Dagster Pipes "0.1").

Typical use::

    from pipes_core import PipesRunContext, PipesSubprocessClient

    invocation = PipesSubprocessClient().run(
        context=PipesRunContext(asset_keys=["my_asset"]),
        command=["python", "script.py"],
        extras={"rows": 10},
    )
    for result in invocation.get_results():
        print(result)

Or, to launch the process yourself, ``open_pipes_session`` yields a session whose bootstrap env vars or CLI
arguments you pass to it.
"""

from __future__ import annotations

from pipes_core.channels.blob import PipesBlobStoreMessageReader
from pipes_core.channels.injectors import (
    PipesContextInjector,
    PipesEnvContextInjector,
    PipesFileContextInjector,
    PipesTempFileContextInjector,
)
from pipes_core.channels.log_readers import (
    PipesBlobStoreLogReader,
    PipesChunkedLogReader,
    PipesFileLogReader,
    PipesLogReader,
)
from pipes_core.channels.readers import PipesFileMessageReader, PipesMessageReader, PipesTempFileMessageReader
from pipes_core.channels.stdio import PipesStdioMessageReader
from pipes_core.launch.client import (
    PipesClient,
    PipesExitStatus,
    PipesLaunchedProcess,
    PipesLaunchRequest,
)
from pipes_core.launch.options import RunOptions
from pipes_core.launch.run_store import PipesRunRecord, PipesRunStore, PipesRunStoreError
from pipes_core.launch.session import PipesSession, open_pipes_session
from pipes_core.launch.subprocess import PipesClientCompletedInvocation, PipesSubprocessClient, SubprocessRunOptions
from pipes_core.observe.observer import RunObserver
from pipes_core.observe.trace_file import TraceFileWriter
from pipes_core.protocol.errors import (
    PipesEngineErrorKind,
    PipesError,
    PipesExecutionError,
    PipesInterruptedError,
    PipesProtocolError,
    PipesProtocolErrorKind,
    PipesResourceError,
    PipesTimeoutError,
    PipesTransportError,
    PipesUsageError,
    PipesWarning,
)
from pipes_core.protocol.errors import (
    PipesError as DagsterPipesError,
)
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_core.protocol.json_events import event_to_json
from pipes_core.protocol.results import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExecutionResult,
    PipesExternalStreamEvent,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesProtocolIssue,
    PipesRemoteException,
)
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._blob import PipesBlobStore
from pipes_ext._protocol import (
    DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    PIPES_PROTOCOL_VERSION,
    decode_param,
    encode_param,
)
from pipes_ext._types import PipesContextData, PipesExtras, PipesMessage, PipesParams

__all__ = [
    # sessions and clients
    "open_pipes_session",
    "PipesSession",
    "PipesRunContext",
    "PipesSubprocessClient",
    "SubprocessRunOptions",
    "PipesClientCompletedInvocation",
    "PipesClient",
    "PipesLaunchRequest",
    "PipesLaunchedProcess",
    "PipesExitStatus",
    "RunOptions",
    "PipesMessageHandler",
    # durable runs
    "PipesRunStore",
    "PipesRunRecord",
    "PipesRunStoreError",
    # channels
    "PipesContextInjector",
    "PipesEnvContextInjector",
    "PipesFileContextInjector",
    "PipesTempFileContextInjector",
    "PipesMessageReader",
    "PipesFileMessageReader",
    "PipesTempFileMessageReader",
    "PipesBlobStoreMessageReader",
    "PipesBlobStore",
    "PipesLogReader",
    "PipesChunkedLogReader",
    "PipesFileLogReader",
    "PipesBlobStoreLogReader",
    "PipesStdioMessageReader",
    # results and events
    "MaterializeResult",
    "AssetCheckResult",
    "MetadataValue",
    "PipesExecutionResult",
    "PipesRemoteException",
    "PipesEvent",
    "PipesOpenedEvent",
    "PipesClosedEvent",
    "PipesLogEvent",
    "PipesCustomMessageEvent",
    "PipesExternalStreamEvent",
    "PipesProtocolIssue",
    "event_to_json",
    # protocol
    "PIPES_PROTOCOL_VERSION",
    "DAGSTER_PIPES_CONTEXT_ENV_VAR",
    "DAGSTER_PIPES_MESSAGES_ENV_VAR",
    "DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT",
    "DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT",
    "encode_param",
    "decode_param",
    "PipesParams",
    "PipesExtras",
    "PipesContextData",
    "PipesMessage",
    # errors
    "PipesError",
    "DagsterPipesError",
    "PipesProtocolError",
    "PipesProtocolErrorKind",
    "PipesUsageError",
    "PipesTransportError",
    "PipesExecutionError",
    "PipesEngineErrorKind",
    "PipesTimeoutError",
    "PipesInterruptedError",
    "PipesResourceError",
    "PipesWarning",
    # observability (OpenTelemetry needs no name: see the README, Observability)
    "RunObserver",
    "TraceFileWriter",
    # asyncio twins (loaded on first use: asyncio is not imported by a sync program)
    "open_pipes_session_async",
    "PipesAsyncSubprocessClient",
    "PipesAsyncClient",
    "PipesAsyncLaunchedProcess",
    "PipesAsyncMessageReader",
    "PipesAsyncFileMessageReader",
    "PipesAsyncTempFileMessageReader",
    "PipesAsyncStdioMessageReader",
    "PipesAsyncBlobStoreMessageReader",
]

_ASYNC_NAMES = frozenset(__all__[__all__.index("open_pipes_session_async"):])


def __getattr__(name: str) -> object:
    if name not in _ASYNC_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from pipes_core.launch import async_client as _async_client
    from pipes_core.launch import async_session as _async

    value = getattr(_async_client if name in _async_client.__all__ else _async, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _ASYNC_NAMES)
