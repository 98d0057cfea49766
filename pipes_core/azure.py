"""Azure Blob Storage channels for the orchestrator (extra ``azure``: azure-storage-blob):
``PipesAzureBlobStorageContextInjector`` and ``PipesAzureBlobStorageMessageReader``. Clients are injected (any
``BlobServiceClient``; built from ``AZURE_STORAGE_CONNECTION_STRING`` with the SDK's retries off when omitted,
see :mod:`pipes_ext.azure`, which declares the backend: :data:`pipes_ext.azure.AZURE_BACKEND`); the SDK is
imported lazily. The params key ``"bucket"`` holds the container; the classes take it as ``container``."""

from __future__ import annotations

from collections.abc import Sequence

from pipes_core.channels import blob as _blob  # the bases by module, so that this module names only its own classes
from pipes_core.channels.blob import (
    DEFAULT_MAX_READ_CHUNK_BYTES,
    DEFAULT_MISSING_CHUNK_GRACE,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_REQUEST_TIMEOUT,
)
from pipes_core.channels.log_readers import PipesLogReader
from pipes_ext._blob import DEFAULT_RETRY_POLICY, RetryPolicy
from pipes_ext.azure import AZURE_BACKEND, AzureBlobServiceClientLike

__all__ = ["PipesAzureBlobStorageContextInjector", "PipesAzureBlobStorageMessageReader"]


class PipesAzureBlobStorageContextInjector(_blob.PipesBackendContextInjector[AzureBlobServiceClientLike]):
    """Uploads the context to ``<container>/<key_prefix><30 letters>/context.json``; deleted afterwards."""

    backend = AZURE_BACKEND

    def __init__(self, container: str, client: AzureBlobServiceClientLike | None = None,
                 key_prefix: str | None = None, *, retry: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        super().__init__(container, client, key_prefix, retry=retry)

    @property
    def container(self) -> str:
        return self.bucket


class PipesAzureBlobStorageMessageReader(_blob.PipesBackendMessageReader[AzureBlobServiceClientLike]):
    """Reads numbered message chunks from ``<container>/<key_prefix><30 letters>/<n>.json``."""

    backend = AZURE_BACKEND

    def __init__(
        self,
        container: str,
        client: AzureBlobServiceClientLike | None = None,
        interval: float = DEFAULT_POLL_INTERVAL,
        include_stdio_in_messages: bool = False,
        *,
        log_readers: Sequence[PipesLogReader] | None = None,
        missing_chunk_grace: float = DEFAULT_MISSING_CHUNK_GRACE,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_chunk_bytes: int = DEFAULT_MAX_READ_CHUNK_BYTES,
        key_prefix: str | None = None,
    ) -> None:
        super().__init__(container, client, interval, include_stdio_in_messages, log_readers=log_readers,
                         missing_chunk_grace=missing_chunk_grace, retry=retry, request_timeout=request_timeout,
                         max_chunk_bytes=max_chunk_bytes, key_prefix=key_prefix)

    @property
    def container(self) -> str:
        return self.bucket
