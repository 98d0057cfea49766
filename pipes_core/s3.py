"""S3 channels for the orchestrator (extra ``s3``: boto3): ``PipesS3ContextInjector`` and
``PipesS3MessageReader``. Clients are injected (any boto3 S3 client); the SDK is imported lazily. The backend
itself (store, default client, label, extra) is declared once, in :data:`pipes_ext.s3.S3_BACKEND`."""

from __future__ import annotations

from pipes_core.channels import blob as _blob  # the bases by module, so that this module names only its own classes
from pipes_ext.s3 import S3_BACKEND, S3ClientLike

__all__ = ["PipesS3ContextInjector", "PipesS3MessageReader"]


class PipesS3ContextInjector(_blob.PipesBackendContextInjector[S3ClientLike]):
    """Uploads the context to ``s3://bucket/<key_prefix><30 letters>/context.json``; deleted afterwards.
    ``PipesS3ContextInjector(bucket, client=None, key_prefix=None, *, retry=...)``."""

    backend = S3_BACKEND


class PipesS3MessageReader(_blob.PipesBackendMessageReader[S3ClientLike]):
    """Reads numbered message chunks from ``s3://bucket/<30 letters>/<n>.json``.
    ``PipesS3MessageReader(bucket, client=None, interval=1.0, include_stdio_in_messages=False, *, log_readers=None,
    missing_chunk_grace=..., retry=..., request_timeout=60.0, max_chunk_bytes=64 MiB)``."""

    backend = S3_BACKEND
