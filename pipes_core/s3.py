"""S3 channels for the orchestrator (extra ``s3``: boto3): ``PipesS3ContextInjector`` and
``PipesS3MessageReader``. Clients are injected (any boto3 S3 client); the SDK is imported lazily."""

from __future__ import annotations

from collections.abc import Sequence

from pipes_ext._blob import DEFAULT_RETRY_POLICY, PipesBlobStore, RetryPolicy
from pipes_ext.s3 import S3BlobStore, S3ClientLike, default_s3_client

from ._blob import (
    DEFAULT_MISSING_CHUNK_GRACE,
    DEFAULT_POLL_INTERVAL,
    PipesBlobStoreContextInjector,
    PipesBlobStoreMessageReader,
)
from ._log_readers import PipesLogReader

__all__ = ["PipesS3ContextInjector", "PipesS3MessageReader"]


class PipesS3ContextInjector(PipesBlobStoreContextInjector):
    """Uploads the context to ``s3://bucket/<key_prefix><30 letters>/context.json``; deleted afterwards."""

    def __init__(self, bucket: str, client: S3ClientLike | None = None, key_prefix: str | None = None,
                 *, retry: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        super().__init__(key_prefix=key_prefix, retry=retry)
        self.bucket = bucket
        self.client = client if client is not None else default_s3_client()

    def make_store(self) -> PipesBlobStore:
        return S3BlobStore(self.client, self.bucket)

    def describe(self) -> str:
        return f"the S3 context injector (bucket {self.bucket!r})"


class PipesS3MessageReader(PipesBlobStoreMessageReader):
    """Reads numbered message chunks from ``s3://bucket/<30 letters>/<n>.json``."""

    def __init__(
        self,
        bucket: str,
        client: S3ClientLike | None = None,
        interval: float = DEFAULT_POLL_INTERVAL,
        include_stdio_in_messages: bool = False,
        *,
        log_readers: Sequence[PipesLogReader] | None = None,
        missing_chunk_grace: float = DEFAULT_MISSING_CHUNK_GRACE,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> None:
        super().__init__(interval, log_readers, include_stdio_in_messages=include_stdio_in_messages,
                         missing_chunk_grace=missing_chunk_grace, retry=retry)
        self.bucket = bucket
        self.client = client if client is not None else default_s3_client()

    def make_store(self) -> PipesBlobStore:
        return S3BlobStore(self.client, self.bucket)

    def describe(self) -> str:
        return f"the S3 message reader (bucket {self.bucket!r})"
