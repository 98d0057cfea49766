"""S3 channels for the external side (extra ``s3``: boto3).

``PipesS3ContextLoader(client)`` and ``PipesS3MessageWriter(client, interval=...)``. The client is any boto3
S3 client (injected; built with ``boto3.client("s3")`` when omitted). boto3 is imported only when a class
here is constructed without a client or needs to classify an error.
"""

from __future__ import annotations

from typing import Any, Protocol

from ._blob import (
    PipesBlobBackend,
    PipesBlobStore,
    PipesBlobStoreContextLoader,
    PipesBlobStoreMessageWriter,
    PipesBlobTooLarge,
)

__all__ = [
    "S3_BACKEND", "S3ClientLike", "S3BlobStore", "PipesS3ContextLoader", "PipesS3MessageWriter", "default_s3_client",
]

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
    def list_objects_v2(self, **kwargs: Any) -> Any: ...


def _build_s3_client() -> Any:
    import boto3
    from botocore.config import Config

    # botocore's own retries are turned off: RetryPolicy is the one retry layer (stacked layers multiply the
    # requests and stretch close times). A client you inject keeps whatever retries it was built with.
    return boto3.client("s3", config=Config(retries={"total_max_attempts": 1}))


def default_s3_client() -> Any:
    """``boto3.client("s3")`` with botocore's retries off; an ImportError names the ``s3`` extra."""
    return S3_BACKEND.default_client()


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
        return self._get(key, None)

    def get_at_most(self, key: str, max_bytes: int) -> bytes | None:
        return self._get(key, max_bytes)

    def _get(self, key: str, max_bytes: int | None) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise
        size = response.get("ContentLength")
        if max_bytes is not None and isinstance(size, int) and size > max_bytes:
            response["Body"].close()  # checked before the body is read: nothing downloaded
            raise PipesBlobTooLarge(key, size, max_bytes)
        body: bytes = response["Body"].read()  # one buffer of the object's size (measured: 1.0x)
        return body

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def list_keys(self, prefix: str) -> list[str] | None:
        keys: list[str] = []
        page: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            response = self.client.list_objects_v2(**page)
            keys.extend(str(entry["Key"]) for entry in response.get("Contents", ()))
            if not response.get("IsTruncated"):
                return keys
            page["ContinuationToken"] = response["NextContinuationToken"]

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


S3_BACKEND = PipesBlobBackend(label="S3", extra="s3", package="boto3", store=S3BlobStore,
                              build_client=_build_s3_client)


class PipesS3ContextLoader(PipesBlobStoreContextLoader[S3ClientLike]):
    """Loads the context from ``{"bucket", "key"}`` in S3."""

    backend = S3_BACKEND


class PipesS3MessageWriter(PipesBlobStoreMessageWriter[S3ClientLike]):
    """Writes messages as numbered chunks under ``{"bucket", "key_prefix"}`` in S3."""

    backend = S3_BACKEND
