"""pipes_ext: the external side of the Pipes protocol (wire-compatible with Dagster Pipes "0.1").

Standard library only. Typical use::

    from pipes_ext import open_pipes

    with open_pipes() as pipes:
        pipes.log.info("hello")
        pipes.report_asset_materialization(metadata={"rows": 42})

Scripts written for the ``dagster-pipes`` package can import ``open_dagster_pipes`` from here instead.
"""

from __future__ import annotations

from ._context import LOCAL_RUN_ID, PipesContext, open_dagster_pipes, open_pipes
from ._context_loaders import PipesContextLoader, PipesDefaultContextLoader, PipesDirectContextLoader
from ._errors import (
    DagsterPipesError,
    DagsterPipesWarning,
    PipesError,
    PipesProtocolError,
    PipesTransportError,
    PipesUsageError,
    PipesWarning,
)
from ._params import (
    PipesCliArgsParamsLoader,
    PipesEnvVarParamsLoader,
    PipesMappingParamsLoader,
    PipesParamsLoader,
)
from ._protocol import (
    DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    PIPES_PROTOCOL_VERSION,
    PIPES_PROTOCOL_VERSION_FIELD,
    decode_param,
    encode_param,
)
from ._writers import (
    PipesBufferedStreamMessageWriterChannel,
    PipesDefaultMessageWriter,
    PipesFileMessageWriterChannel,
    PipesInMemoryMessageWriter,
    PipesMessageWriter,
    PipesMessageWriterChannel,
    PipesStreamMessageWriterChannel,
)

__all__ = [
    # entry points
    "open_pipes",
    "open_dagster_pipes",
    "PipesContext",
    "LOCAL_RUN_ID",
    # params loaders
    "PipesParamsLoader",
    "PipesEnvVarParamsLoader",
    "PipesCliArgsParamsLoader",
    "PipesMappingParamsLoader",
    # context loaders
    "PipesContextLoader",
    "PipesDefaultContextLoader",
    "PipesDirectContextLoader",
    # message writers
    "PipesMessageWriter",
    "PipesMessageWriterChannel",
    "PipesDefaultMessageWriter",
    "PipesFileMessageWriterChannel",
    "PipesStreamMessageWriterChannel",
    "PipesBufferedStreamMessageWriterChannel",
    "PipesInMemoryMessageWriter",
    # protocol
    "PIPES_PROTOCOL_VERSION",
    "PIPES_PROTOCOL_VERSION_FIELD",
    "DAGSTER_PIPES_CONTEXT_ENV_VAR",
    "DAGSTER_PIPES_MESSAGES_ENV_VAR",
    "DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT",
    "DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT",
    "encode_param",
    "decode_param",
    # errors
    "PipesError",
    "PipesProtocolError",
    "PipesUsageError",
    "PipesTransportError",
    "PipesWarning",
    "DagsterPipesError",
    "DagsterPipesWarning",
]
