"""pipes_ext: the external side of the Pipes protocol (wire-compatible with Dagster Pipes "0.1").

Standard library only. Typical use::

    from pipes_ext import open_pipes

    with open_pipes() as pipes:
        pipes.log.info("hello")
        pipes.report_asset_materialization(metadata={"rows": 42})

Scripts written for the ``dagster-pipes`` package run unchanged with ``pipes_ext`` in its place: the names they
import (``open_dagster_pipes``, ``PipesContext``, the typed shapes such as ``PipesContextData``, the codec aliases
``encode_env_var``/``decode_env_var``, ``to_asset_key_path``, the blob-store writers and loaders...) exist here with
the same meaning. The typed shapes and the blob-store names are loaded on first use (module ``__getattr__``), so
they cost nothing at start-up to a script that does not use them.
"""

from __future__ import annotations

from ._context import LOCAL_RUN_ID, PipesContext, open_dagster_pipes, open_pipes
from ._context_loaders import PipesContextLoader, PipesDefaultContextLoader, PipesDirectContextLoader
from ._errors import (
    DagsterPipesError,
    DagsterPipesWarning,
    PipesError,
    PipesProtocolError,
    PipesProtocolErrorKind,
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
    ESCAPE_CHARACTER,
    PIPES_PROTOCOL_VERSION,
    PIPES_PROTOCOL_VERSION_FIELD,
    decode_param,
    encode_param,
)
from ._protocol import METADATA_TYPE_INFER as PIPES_METADATA_TYPE_INFER
from ._protocol import parse_asset_key as to_asset_key_path
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
    # dagster-pipes names, same meaning
    "encode_env_var",
    "decode_env_var",
    "to_asset_key_path",
    "PIPES_METADATA_TYPE_INFER",
    "ESCAPE_CHARACTER",
    # typed shapes of the protocol's JSON documents (loaded on first use)
    "PipesContextData",
    "PipesDataProvenance",
    "PipesPartitionKeyRange",
    "PipesTimeWindow",
    "PipesException",
    "PipesMessage",
    "PipesMetadataValue",
    "PipesOpenedData",
    # blob-store writers and loaders (loaded on first use; their SDKs only when a client is built)
    "PipesBlobStoreMessageWriter",
    "PipesS3MessageWriter",
    "PipesS3ContextLoader",
    "PipesGCSMessageWriter",
    "PipesGCSContextLoader",
    "PipesAzureBlobStorageMessageWriter",
    "PipesAzureBlobStorageContextLoader",
    # errors
    "PipesError",
    "PipesProtocolError",
    "PipesProtocolErrorKind",
    "PipesUsageError",
    "PipesTransportError",
    "PipesWarning",
    "DagsterPipesError",
    "DagsterPipesWarning",
]

# dagster-pipes' names for the codec and the asset-key parser, and its constant names.
encode_env_var = encode_param
decode_env_var = decode_param
# (to_asset_key_path and PIPES_METADATA_TYPE_INFER are imported under those names above.)

# Names resolved on first access: the typed shapes need ``typing`` (which the default start-up path avoids) and the
# blob-store classes need the blob machinery (threads, retries) that a local run never uses.
_LAZY = {
    **{name: "._types" for name in (
        "PipesContextData", "PipesDataProvenance", "PipesPartitionKeyRange", "PipesTimeWindow", "PipesException",
        "PipesMessage", "PipesMetadataValue", "PipesOpenedData",
    )},
    "PipesBlobStoreMessageWriter": "._blob",
    "PipesS3MessageWriter": ".s3",
    "PipesS3ContextLoader": ".s3",
    "PipesGCSMessageWriter": ".gcs",
    "PipesGCSContextLoader": ".gcs",
    "PipesAzureBlobStorageMessageWriter": ".azure",
    "PipesAzureBlobStorageContextLoader": ".azure",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
