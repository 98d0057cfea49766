"""Azure Blob Storage channels for the orchestrator (extra ``azure``: azure-storage-blob):
``PipesAzureBlobStorageContextInjector`` and ``PipesAzureBlobStorageMessageReader``. Clients are injected (any
``BlobServiceClient``; built from ``AZURE_STORAGE_CONNECTION_STRING`` with the SDK's retries off when omitted,
see :mod:`pipes_ext.azure`); the SDK is imported lazily. The params key ``"bucket"`` holds the container."""

from __future__ import annotations

from collections.abc import Sequence

from pipes_ext._blob import DEFAULT_RETRY_POLICY, PipesBlobStore, RetryPolicy
from pipes_ext.azure import AzureBlobServiceClientLike, AzureBlobStore, default_azure_client

from ._blob import (
    DEFAULT_MISSING_CHUNK_GRACE,
    DEFAULT_POLL_INTERVAL,
    PipesBlobStoreContextInjector,
    PipesBlobStoreMessageReader,
)
from ._log_readers import PipesLogReader

__all__ = ["PipesAzureBlobStorageContextInjector", "PipesAzureBlobStorageMessageReader"]


class PipesAzureBlobStorageContextInjector(PipesBlobStoreContextInjector):
    """Uploads the context to ``<container>/<key_prefix><30 letters>/context.json``; deleted afterwards."""

    def __init__(self, container: str, client: AzureBlobServiceClientLike | None = None,
                 key_prefix: str | None = None, *, retry: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        super().__init__(key_prefix=key_prefix, retry=retry)
        self.container = container
        self.client = client if client is not None else default_azure_client()

    def make_store(self) -> PipesBlobStore:
        return AzureBlobStore(self.client, self.container)

    def describe(self) -> str:
        return f"the Azure Blob Storage context injector (container {self.container!r})"


class PipesAzureBlobStorageMessageReader(PipesBlobStoreMessageReader):
    """Reads numbered message chunks from ``<container>/<30 letters>/<n>.json``."""

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
    ) -> None:
        super().__init__(interval, log_readers, include_stdio_in_messages=include_stdio_in_messages,
                         missing_chunk_grace=missing_chunk_grace, retry=retry)
        self.container = container
        self.client = client if client is not None else default_azure_client()

    def make_store(self) -> PipesBlobStore:
        return AzureBlobStore(self.client, self.container)

    def describe(self) -> str:
        return f"the Azure Blob Storage message reader (container {self.container!r})"
