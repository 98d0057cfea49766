"""S3 channels for the external side (extra ``s3``: boto3).

``PipesS3ContextLoader(client)`` and ``PipesS3MessageWriter(client, interval=...)``. The client is any boto3
S3 client (injected; built with ``boto3.client("s3")`` when omitted). boto3 is imported only when a class
here is constructed without a client or needs to classify an error.
"""

from __future__ import annotations

from typing import Any, Protocol

from ._blob import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES,
    DEFAULT_RETRY_POLICY,
    DEFAULT_UPLOAD_INTERVAL,
    PipesBlobStore,
    PipesBlobStoreContextLoader,
    PipesBlobStoreMessageWriter,
    RetryPolicy,
    missing_extra_error,
)

__all__ = ["S3ClientLike", "S3BlobStore", "PipesS3ContextLoader", "PipesS3MessageWriter", "default_s3_client"]

# S3 error codes that mean "try again".
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class S3ClientLike(Protocol):
    """The part of a boto3 S3 client this module uses."""

    def put_object(self, **kwargs: Any) -> Any: ...
    def get_object(self, **kwargs: Any) -> Any: ...
    def delete_object(self, **kwargs: Any) -> Any: ...


def default_s3_client() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise missing_extra_error("s3", "boto3", exc) from exc
    from botocore.config import Config

    # botocore's own retries are turned off: RetryPolicy is the one retry layer (stacked layers multiply the
    # requests and stretch close times). A client you inject keeps whatever retries it was built with.
    return boto3.client("s3", config=Config(retries={"total_max_attempts": 1}))


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code is not None:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is not None:
            return str(status)
    return None


class S3BlobStore(PipesBlobStore):
    """One S3 bucket through a boto3 client."""

    scheme = "s3"

    def __init__(self, client: S3ClientLike, bucket: str) -> None:
        super().__init__(bucket)
        self.client = client

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise
        body: bytes = response["Body"].read()
        return body

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def is_transient(self, exc: BaseException) -> bool:
        if super().is_transient(exc):
            return True
        code = _error_code(exc)
        if code is not None:
            return code in _TRANSIENT_CODES or code.startswith("5")
        try:
            from botocore import exceptions as bex
        except ImportError:  # pragma: no cover - a client without botocore
            return False
        return isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
                                bex.ConnectTimeoutError, bex.ResponseStreamingError))


class PipesS3ContextLoader(PipesBlobStoreContextLoader):
    """Loads the context from ``{"bucket", "key"}`` in S3."""

    def __init__(self, client: S3ClientLike | None = None, *, retry: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        super().__init__(retry=retry)
        self.client = client if client is not None else default_s3_client()

    def make_store(self, bucket: str) -> PipesBlobStore:
        return S3BlobStore(self.client, bucket)


class PipesS3MessageWriter(PipesBlobStoreMessageWriter):
    """Writes messages as numbered chunks under ``{"bucket", "key_prefix"}`` in S3."""

    def __init__(
        self,
        client: S3ClientLike | None = None,
        *,
        interval: float = DEFAULT_UPLOAD_INTERVAL,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> None:
        super().__init__(interval=interval, max_chunk_bytes=max_chunk_bytes, close_timeout=close_timeout, retry=retry)
        self.client = client if client is not None else default_s3_client()

    def make_store(self, bucket: str) -> PipesBlobStore:
        return S3BlobStore(self.client, bucket)
