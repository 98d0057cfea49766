"""GCS channels for the orchestrator (extra ``gcs``: google-cloud-storage): ``PipesGCSContextInjector`` and
``PipesGCSMessageReader``. Clients are injected (any ``google.cloud.storage.Client``); the SDK is imported
lazily. Every request is made with google-cloud-storage's own retry off; see :mod:`pipes_ext.gcs`, which declares
the backend (:data:`pipes_ext.gcs.GCS_BACKEND`)."""

from __future__ import annotations

from pipes_core.channels import blob as _blob  # the bases by module, so that this module names only its own classes
from pipes_ext.gcs import GCS_BACKEND, GCSClientLike

__all__ = ["PipesGCSContextInjector", "PipesGCSMessageReader"]


class PipesGCSContextInjector(_blob.PipesBackendContextInjector[GCSClientLike]):
    """Uploads the context to ``gs://bucket/<key_prefix><30 letters>/context.json`` (the prefix is concatenated
    with no slash, as the reference); deleted afterwards."""

    backend = GCS_BACKEND


class PipesGCSMessageReader(_blob.PipesBackendMessageReader[GCSClientLike]):
    """Reads numbered message chunks from ``gs://bucket/<30 letters>/<n>.json``."""

    backend = GCS_BACKEND
