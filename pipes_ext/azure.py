"""Azure Blob Storage channels for the external side (extra ``azure``: azure-storage-blob).

``PipesAzureBlobStorageContextLoader(client)`` and ``PipesAzureBlobStorageMessageWriter(client, interval=...)``.
The client is any ``azure.storage.blob.BlobServiceClient`` (injected; built from the env var
``AZURE_STORAGE_CONNECTION_STRING`` when omitted). The SDK is imported only when a class here is constructed
without a client or needs to classify an error.

As in the reference, the params key ``"bucket"`` holds the **container** name.

Retries: our :class:`~pipes_ext._blob.RetryPolicy` is meant to be the one retry layer. The SDK's own default
(``ExponentialRetry``: up to 3 retries, 15 s + 3**n s apart) hides a transient error inside one call for up to
a minute, past the writer's ``close_timeout``, and multiplies our attempts. So :func:`default_azure_client`
builds its client with ``retry_total=0``; pass ``retry_total=0`` to a client you inject too, unless you want
both layers.
"""

from __future__ import annotations

import io
import os
from typing import Any, Protocol

from ._blob import (
    PipesBlobBackend,
    PipesBlobStore,
    PipesBlobStoreContextLoader,
    PipesBlobStoreMessageWriter,
    PipesBlobTooLarge,
)
from ._errors import PipesUsageError

__all__ = [
    "AZURE_BACKEND",
    "AzureBlobServiceClientLike",
    "AzureBlobStore",
    "PipesAzureBlobStorageContextLoader",
    "PipesAzureBlobStorageMessageWriter",
    "default_azure_client",
    "AZURE_CONNECTION_STRING_ENV_VAR",
]

AZURE_CONNECTION_STRING_ENV_VAR = "AZURE_STORAGE_CONNECTION_STRING"

# The error code of a missing blob. Any other 404 (ContainerNotFound above all) is a permanent error.
_BLOB_NOT_FOUND = "BlobNotFound"
# With a size limit, a blob is downloaded in ranges of this size: the first one tells the blob's size (checked
# before more is read), and the SDK's download costs several times the bytes of one request while it runs
# (measured: about 9x with azure-storage-blob 12.31), so 1 MiB ranges keep that to a few MiB whatever the size.
AZURE_RANGE_BYTES = 1024 * 1024
# HTTP statuses worth retrying besides 5xx: throttling and request timeouts.
_TRANSIENT_STATUSES = frozenset({408, 429})


class AzureBlobServiceClientLike(Protocol):
    """The part of an ``azure.storage.blob.BlobServiceClient`` this module uses."""

    def get_blob_client(self, container: str, blob: str) -> Any: ...
    def get_container_client(self, container: str) -> Any: ...


def _build_azure_client() -> Any:
    from azure.storage.blob import BlobServiceClient

    connection_string = os.environ.get(AZURE_CONNECTION_STRING_ENV_VAR)
    if not connection_string:
        raise PipesUsageError(
            f"no Azure client given and {AZURE_CONNECTION_STRING_ENV_VAR} is not set: pass client= (a "
            "BlobServiceClient) or set the connection string"
        )
    return BlobServiceClient.from_connection_string(connection_string, retry_total=0)


def default_azure_client() -> Any:
    """A ``BlobServiceClient`` from ``AZURE_STORAGE_CONNECTION_STRING``, with the SDK's retries off (our
    :class:`RetryPolicy` retries; see the module docstring); an ImportError names the ``azure`` extra."""
    return AZURE_BACKEND.default_client()


def _error_code(exc: BaseException) -> str | None:
    code = getattr(exc, "error_code", None)
    return None if code is None else str(code)


def _is_blob_not_found(exc: BaseException) -> bool:
    return getattr(exc, "status_code", None) == 404 and _error_code(exc) == _BLOB_NOT_FOUND


def _blob_size(downloader: Any) -> int:
    """The whole blob's size from a ranged download (``Content-Range: bytes 0-1048575/52428800``)."""
    content_range = getattr(downloader.properties, "content_range", None)
    if isinstance(content_range, str) and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(downloader.size)


class AzureBlobStore(PipesBlobStore):
    """One Azure Blob Storage container through a ``BlobServiceClient``."""

    scheme = "azure"

    def __init__(self, client: AzureBlobServiceClientLike, container: str) -> None:
        super().__init__(container)
        self.client = client

    @property
    def container(self) -> str:
        return self.bucket

    def put(self, key: str, data: bytes) -> None:
        # overwrite=True: a retry after a lost response must succeed (the same bytes), not fail as a conflict.
        self.client.get_blob_client(self.bucket, key).upload_blob(data, overwrite=True)

    def get(self, key: str) -> bytes | None:
        try:
            data: bytes = self.client.get_blob_client(self.bucket, key).download_blob().readall()
        except Exception as exc:
            if _is_blob_not_found(exc):
                return None
            raise
        return data

    def get_at_most(self, key: str, max_bytes: int) -> bytes | None:
        blob = self.client.get_blob_client(self.bucket, key)
        try:
            first = blob.download_blob(offset=0, length=AZURE_RANGE_BYTES)
        except Exception as exc:
            if _is_blob_not_found(exc):
                return None
            raise
        size = _blob_size(first)
        if size > max_bytes:
            raise PipesBlobTooLarge(key, size, max_bytes)
        data = io.BytesIO()
        data.write(first.readall())
        del first
        while data.tell() < size:
            data.write(blob.download_blob(offset=data.tell(), length=min(AZURE_RANGE_BYTES, size - data.tell()))
                       .readall())
        return data.getvalue()  # (BytesIO hands over its buffer: no copy)

    def list_keys(self, prefix: str) -> list[str] | None:
        container = self.client.get_container_client(self.bucket)
        return [str(blob.name) for blob in container.list_blobs(name_starts_with=prefix)]

    def delete(self, key: str) -> None:
        try:
            self.client.get_blob_client(self.bucket, key).delete_blob()
        except Exception as exc:
            if not _is_blob_not_found(exc):
                raise

    def is_transient(self, exc: BaseException) -> bool:
        if super().is_transient(exc):
            return True
        try:
            from azure.core import exceptions as aex
        except ImportError:  # pragma: no cover - a client without azure-core
            return False
        # ServiceRequestError: the request was not sent (connection refused/reset, DNS); ServiceResponseError:
        # no (complete) response (connection dropped, read timeout); IncompleteReadError: the body was cut.
        if isinstance(exc, (aex.ServiceRequestError, aex.ServiceResponseError, aex.IncompleteReadError)):
            return True
        if isinstance(exc, aex.HttpResponseError):
            status = exc.status_code
            return status is not None and (status >= 500 or status in _TRANSIENT_STATUSES)
        return False


AZURE_BACKEND = PipesBlobBackend(label="Azure Blob Storage", extra="azure", package="azure-storage-blob",
                                 store=AzureBlobStore, build_client=_build_azure_client, bucket_word="container")


class PipesAzureBlobStorageContextLoader(PipesBlobStoreContextLoader[AzureBlobServiceClientLike]):
    """Loads the context from ``{"bucket": <container>, "key"}`` in Azure Blob Storage."""

    backend = AZURE_BACKEND


class PipesAzureBlobStorageMessageWriter(PipesBlobStoreMessageWriter[AzureBlobServiceClientLike]):
    """Writes messages as numbered chunks under ``{"bucket": <container>, "key_prefix"}`` in Azure Blob
    Storage."""

    backend = AZURE_BACKEND
