"""GCS channels for the external side (extra ``gcs``: google-cloud-storage).

``PipesGCSContextLoader(client)`` and ``PipesGCSMessageWriter(client, interval=...)``. The client is any
``google.cloud.storage.Client`` (injected; built with ``storage.Client()`` when omitted, which honours
``STORAGE_EMULATOR_HOST``). google-cloud-storage is imported only when a class here is constructed without a
client or needs to classify an error.

Retries: google-cloud-storage retries some calls by itself (downloads and deletes with its ``DEFAULT_RETRY``,
for up to 120 s). Every call here passes ``retry=None`` and an explicit ``timeout``, so :class:`RetryPolicy`
is the only retry layer: its attempts are bounded, counted, and stop at the writer's ``close_timeout``
deadline, and a permanent error is never retried. Two stacked retry layers would multiply the attempts and
could outlast ``close_timeout`` by minutes.

google-cloud-storage 3.17+ also GETs a bucket's metadata once per client and bucket, in a background thread, to
label tracing spans (errors swallowed); ``DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA=true`` turns it off.
"""

from __future__ import annotations

import http.client
from typing import Any, Protocol

from ._blob import (
    PipesBlobBackend,
    PipesBlobStore,
    PipesBlobStoreContextLoader,
    PipesBlobStoreMessageWriter,
    PipesBlobTooLarge,
)

__all__ = [
    "GCS_BACKEND",
    "GCSClientLike",
    "GCSBlobStore",
    "PipesGCSContextLoader",
    "PipesGCSMessageWriter",
    "default_gcs_client",
    "DEFAULT_GCS_REQUEST_TIMEOUT",
]

# Seconds one HTTP request may take (connect and each read), as google-cloud-storage's own default.
DEFAULT_GCS_REQUEST_TIMEOUT = 60.0
# HTTP statuses worth retrying (as google-cloud-storage's own retry predicate).
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class GCSClientLike(Protocol):
    """The part of a ``google.cloud.storage.Client`` this module uses: ``bucket(name)`` (no request)."""

    def bucket(self, bucket_name: str, /) -> Any: ...


def _build_gcs_client() -> Any:
    from google.cloud import storage

    return storage.Client()


def default_gcs_client() -> Any:
    """``google.cloud.storage.Client()``; an ImportError names the ``gcs`` extra."""
    return GCS_BACKEND.default_client()


def _status(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _is_not_found(exc: BaseException) -> bool:
    try:
        from google.api_core.exceptions import NotFound
    except ImportError:  # pragma: no cover - a client without google-api-core
        return _status(exc) == 404
    return isinstance(exc, NotFound)


def _is_forbidden(exc: BaseException) -> bool:
    return _status(exc) in (401, 403)


class GCSBlobStore(PipesBlobStore):
    """One GCS bucket through a ``google.cloud.storage.Client``.

    GCS answers 404 both for a missing object and for a missing bucket. ``get`` returns None only for a
    missing object: on its first 404 it checks once that the bucket exists (one extra request per store), so
    a reader pointed at a bucket that does not exist fails at once instead of waiting for chunks forever. A
    404 on an upload can only mean a missing bucket.
    """

    scheme = "gs"

    def __init__(self, client: GCSClientLike, bucket: str, *, timeout: float = DEFAULT_GCS_REQUEST_TIMEOUT) -> None:
        super().__init__(bucket)
        self.client = client
        self.timeout = timeout
        self._bucket = client.bucket(bucket)
        self._bucket_exists = False

    def _missing_bucket_error(self, exc: BaseException | None = None) -> LookupError:
        detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        return LookupError(f"the GCS bucket {self.bucket!r} does not exist{detail}")

    def put(self, key: str, data: bytes) -> None:
        try:
            self._bucket.blob(key).upload_from_string(data, retry=None, timeout=self.timeout)
        except Exception as exc:
            if _is_not_found(exc):
                raise self._missing_bucket_error(exc) from exc
            raise
        self._bucket_exists = True

    def get(self, key: str) -> bytes | None:
        return self._get(key, None)

    def get_at_most(self, key: str, max_bytes: int) -> bytes | None:
        data = self._get(key, max_bytes)
        if data is not None and len(data) > max_bytes:
            raise PipesBlobTooLarge(key, None, max_bytes)
        return data

    def _get(self, key: str, max_bytes: int | None) -> bytes | None:
        # With a limit, a range of at most max_bytes + 1 bytes: one request, and an over-limit object costs at
        # most the limit (its size is not asked: that would be a second request for every chunk).
        window = {} if max_bytes is None else {"start": 0, "end": max_bytes}
        try:
            data: bytes = self._bucket.blob(key).download_as_bytes(retry=None, timeout=self.timeout, **window)
        except Exception as exc:
            if not _is_not_found(exc):
                raise
        else:
            self._bucket_exists = True
            return data
        if not self._check_bucket_exists():
            raise self._missing_bucket_error()
        return None

    def _check_bucket_exists(self) -> bool:
        if self._bucket_exists:
            return True
        try:
            exists = bool(self._bucket.exists(retry=None, timeout=self.timeout))
        except Exception as exc:
            if not _is_forbidden(exc):
                raise  # transient ones are retried by the caller's RetryPolicy
            exists = True  # may read objects but not the bucket's metadata: assume it exists
        self._bucket_exists = exists
        return exists

    def list_keys(self, prefix: str) -> list[str] | None:
        return [str(blob.name) for blob in self._bucket.list_blobs(prefix=prefix, retry=None, timeout=self.timeout)]

    def delete(self, key: str) -> None:
        try:
            self._bucket.blob(key).delete(retry=None, timeout=self.timeout)
        except Exception as exc:
            if not _is_not_found(exc):
                raise

    def is_transient(self, exc: BaseException) -> bool:
        if super().is_transient(exc):
            return True
        try:
            from google.api_core import exceptions as gex
        except ImportError:  # pragma: no cover - a client without google-api-core
            return False
        if isinstance(exc, (gex.ServiceUnavailable, gex.InternalServerError, gex.TooManyRequests,
                            gex.BadGateway, gex.GatewayTimeout, gex.DeadlineExceeded)):
            return True
        if isinstance(exc, gex.GoogleAPICallError):
            return _status(exc) in _TRANSIENT_STATUS
        return _is_transient_transport(exc)


def _is_transient_transport(exc: BaseException) -> bool:
    """Network-level errors of the HTTP stack under google-cloud-storage (requests, urllib3, google-auth)."""
    if isinstance(exc, (http.client.IncompleteRead, http.client.BadStatusLine, http.client.ResponseNotReady)):
        return True
    try:
        import requests.exceptions as rex
        import urllib3.exceptions as uex
    except ImportError:  # pragma: no cover - google-cloud-storage always brings both
        return False
    if isinstance(exc, (rex.ConnectionError, rex.Timeout, rex.ChunkedEncodingError)):
        return True
    if isinstance(exc, (uex.ProtocolError, uex.TimeoutError, uex.PoolError, uex.SSLError, uex.NewConnectionError)):
        return True
    try:
        from google.auth import exceptions as aex
        from google.cloud.storage import exceptions as sex
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, sex.DataCorruption):  # a download whose checksum did not match: fetch it again
        return True
    if isinstance(exc, sex.InvalidResponse):
        response = getattr(exc, "response", None)
        return getattr(response, "status_code", None) in _TRANSIENT_STATUS
    if isinstance(exc, aex.TransportError):  # refreshing credentials failed on the network
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        return cause is None or _is_transient_transport(cause) or isinstance(cause, (ConnectionError, TimeoutError))
    return False


GCS_BACKEND = PipesBlobBackend(label="GCS", extra="gcs", package="google-cloud-storage", store=GCSBlobStore,
                               build_client=_build_gcs_client)


class PipesGCSContextLoader(PipesBlobStoreContextLoader[GCSClientLike]):
    """Loads the context from ``{"bucket", "key"}`` in GCS."""

    backend = GCS_BACKEND


class PipesGCSMessageWriter(PipesBlobStoreMessageWriter[GCSClientLike]):
    """Writes messages as numbered chunks under ``{"bucket", "key_prefix"}`` in GCS."""

    backend = GCS_BACKEND
