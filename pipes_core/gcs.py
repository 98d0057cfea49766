"""GCS channels for the orchestrator (extra ``gcs``: google-cloud-storage): ``PipesGCSContextInjector`` and
``PipesGCSMessageReader``. Clients are injected (any ``google.cloud.storage.Client``); the SDK is imported
lazily. Every request is made with google-cloud-storage's own retry off; see :mod:`pipes_ext.gcs`."""

from __future__ import annotations

from collections.abc import Sequence

from pipes_ext._blob import DEFAULT_RETRY_POLICY, PipesBlobStore, RetryPolicy
from pipes_ext.gcs import GCSBlobStore, GCSClientLike, default_gcs_client

from ._blob import (
    DEFAULT_MISSING_CHUNK_GRACE,
    DEFAULT_POLL_INTERVAL,
    PipesBlobStoreContextInjector,
    PipesBlobStoreMessageReader,
)
from ._log_readers import PipesLogReader

__all__ = ["PipesGCSContextInjector", "PipesGCSMessageReader"]


class PipesGCSContextInjector(PipesBlobStoreContextInjector):
    """Uploads the context to ``gs://bucket/<key_prefix><30 letters>/context.json`` (the prefix is concatenated
    with no slash, as the reference); deleted afterwards."""

    def __init__(self, bucket: str, client: GCSClientLike | None = None, key_prefix: str | None = None,
                 *, retry: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        super().__init__(key_prefix=key_prefix, retry=retry)
        self.bucket = bucket
        self.client = client if client is not None else default_gcs_client()

    def make_store(self) -> PipesBlobStore:
        return GCSBlobStore(self.client, self.bucket)

    def describe(self) -> str:
        return f"the GCS context injector (bucket {self.bucket!r})"


class PipesGCSMessageReader(PipesBlobStoreMessageReader):
    """Reads numbered message chunks from ``gs://bucket/<30 letters>/<n>.json``."""

    def __init__(
        self,
        bucket: str,
        client: GCSClientLike | None = None,
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
        self.client = client if client is not None else default_gcs_client()

    def make_store(self) -> PipesBlobStore:
        return GCSBlobStore(self.client, self.bucket)

    def describe(self) -> str:
        return f"the GCS message reader (bucket {self.bucket!r})"
