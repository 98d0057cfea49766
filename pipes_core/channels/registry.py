"""The channel registry: one place that maps a channel's name to the context injector or message reader that
implements it. The command line (``pipes run --context-injector NAME --message-reader NAME``) and the
conformance suite choose channels through it; a new channel is added here once.

Context channels: ``env`` (inline in the env var), ``file`` (a file at ``path``), ``tempfile`` (a private temp
file), ``s3`` / ``gcs`` / ``azure`` (an object in ``bucket``, written with ``client``).
Message channels: ``file`` (a file at ``path``), ``tempfile``, ``stdio`` (lines on the process's stdout),
``s3`` / ``gcs`` / ``azure`` (chunks under ``bucket``).

Blob-store channels import their SDK module lazily (the extra ``s3``, ``gcs`` or ``azure``); the others need
nothing beyond ``pipes_core``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipes_core.channels.injectors import (
    PipesContextInjector,
    PipesEnvContextInjector,
    PipesFileContextInjector,
    PipesTempFileContextInjector,
)
from pipes_core.channels.readers import PipesFileMessageReader, PipesMessageReader, PipesTempFileMessageReader
from pipes_core.channels.stdio import PipesStdioMessageReader
from pipes_ext._errors import PipesUsageError

__all__ = [
    "PipesChannelOptions",
    "CONTEXT_CHANNELS",
    "MESSAGE_CHANNELS",
    "BLOB_CHANNELS",
    "BlobChannel",
    "blob_channel_class",
    "make_context_injector",
    "make_message_reader",
]


@dataclass(frozen=True)
class PipesChannelOptions:
    """What a channel may need; each channel reads only its own fields.

    Attributes:
        path: the file of the ``file`` channels.
        bucket: the bucket (Azure: container) of the blob-store channels.
        client: the blob-store client (None: the backend's default client).
        interval: how often a blob-store reader polls (None: the backend's default).
        include_stdio_in_messages: ask the external side to send its stdout/stderr as messages (``file``,
            ``tempfile`` and blob-store readers; the ``stdio`` reader gets the output with the messages anyway).
        max_line_bytes: the line limit of the ``file``, ``tempfile`` and ``stdio`` readers (None: their default).
        stdio_drain_timeout_seconds: how long the ``stdio`` reader waits for its stream's end (None: default).
        key_prefix: where under the bucket the blob-store channels put their objects (None: at its top).
    """

    path: str | None = None
    bucket: str | None = None
    client: Any = None
    interval: float | None = None
    include_stdio_in_messages: bool = False
    max_line_bytes: int | None = None
    stdio_drain_timeout_seconds: float | None = None
    key_prefix: str | None = None


def _need_path(options: PipesChannelOptions, what: str) -> str:
    if not options.path:
        raise PipesUsageError(f"the {what} needs a path")
    return options.path


def _need_bucket(options: PipesChannelOptions, what: str) -> str:
    if not options.bucket:
        raise PipesUsageError(f"the {what} needs a bucket")
    return options.bucket


@dataclass(frozen=True)
class BlobChannel:
    """A blob-store channel: the module holding its classes (imported on first use, as it needs the backend's
    SDK extra) and the names of its context injector and message reader there."""

    module: str
    injector: str
    reader: str


BLOB_CHANNELS: dict[str, BlobChannel] = {
    "s3": BlobChannel("pipes_core.s3", "PipesS3ContextInjector", "PipesS3MessageReader"),
    "gcs": BlobChannel("pipes_core.gcs", "PipesGCSContextInjector", "PipesGCSMessageReader"),
    "azure": BlobChannel(
        "pipes_core.azure", "PipesAzureBlobStorageContextInjector", "PipesAzureBlobStorageMessageReader"),
}
"""Blob channel name -> where its classes are; a new blob store is one entry here."""


def blob_channel_class(channel: str, role: str) -> Any:
    """The backend's injector (``role="context"``) or reader class, imported on first use.

    Raises:
        PipesUsageError: ``channel`` is not a blob channel (the message lists the known ones).
    """
    entry = BLOB_CHANNELS.get(channel)
    if entry is None:
        raise PipesUsageError(f"unknown blob channel {channel!r}; known: {', '.join(BLOB_CHANNELS)}")
    module = importlib.import_module(entry.module)
    return getattr(module, entry.injector if role == "context" else entry.reader)


def _blob_injector(channel: str) -> Callable[[PipesChannelOptions], PipesContextInjector]:
    def make(options: PipesChannelOptions) -> PipesContextInjector:
        injector: PipesContextInjector = blob_channel_class(channel, "context")(
            _need_bucket(options, f"{channel} context injector"), options.client, key_prefix=options.key_prefix)
        return injector

    return make


def _blob_reader(channel: str) -> Callable[[PipesChannelOptions], PipesMessageReader]:
    def make(options: PipesChannelOptions) -> PipesMessageReader:
        kwargs: dict[str, Any] = {"include_stdio_in_messages": options.include_stdio_in_messages,
                                  "key_prefix": options.key_prefix}
        if options.interval is not None:
            kwargs["interval"] = options.interval
        reader: PipesMessageReader = blob_channel_class(channel, "messages")(
            _need_bucket(options, f"{channel} message reader"), options.client, **kwargs)
        return reader

    return make


def _line_limit(options: PipesChannelOptions) -> dict[str, Any]:
    return {} if options.max_line_bytes is None else {"max_line_bytes": options.max_line_bytes}


def _stdio_reader(options: PipesChannelOptions) -> PipesMessageReader:
    kwargs: dict[str, Any] = _line_limit(options)
    if options.stdio_drain_timeout_seconds is not None:
        kwargs["drain_timeout_seconds"] = options.stdio_drain_timeout_seconds
    return PipesStdioMessageReader(**kwargs)



CONTEXT_CHANNELS: dict[str, Callable[[PipesChannelOptions], PipesContextInjector]] = {
    "env": lambda options: PipesEnvContextInjector(),
    "file": lambda options: PipesFileContextInjector(_need_path(options, "file context injector")),
    "tempfile": lambda options: PipesTempFileContextInjector(),
    **{name: _blob_injector(name) for name in BLOB_CHANNELS},
}
"""Context channel name -> factory of its injector."""

MESSAGE_CHANNELS: dict[str, Callable[[PipesChannelOptions], PipesMessageReader]] = {
    "file": lambda options: PipesFileMessageReader(
        _need_path(options, "file message reader"), include_stdio_in_messages=options.include_stdio_in_messages,
        **_line_limit(options)),
    "tempfile": lambda options: PipesTempFileMessageReader(
        include_stdio_in_messages=options.include_stdio_in_messages, **_line_limit(options)),
    "stdio": _stdio_reader,
    **{name: _blob_reader(name) for name in BLOB_CHANNELS},
}
"""Message channel name -> factory of its reader."""


def make_context_injector(name: str, options: PipesChannelOptions | None = None) -> PipesContextInjector:
    """The context injector of the channel ``name`` (see :data:`CONTEXT_CHANNELS`).

    Raises:
        PipesUsageError: an unknown name, or an option the channel needs is missing.
    """
    factory = CONTEXT_CHANNELS.get(name)
    if factory is None:
        raise PipesUsageError(f"unknown context channel {name!r}; known: {', '.join(CONTEXT_CHANNELS)}")
    return factory(options or PipesChannelOptions())


def make_message_reader(name: str, options: PipesChannelOptions | None = None) -> PipesMessageReader:
    """The message reader of the channel ``name`` (see :data:`MESSAGE_CHANNELS`).

    Raises:
        PipesUsageError: an unknown name, or an option the channel needs is missing.
    """
    factory = MESSAGE_CHANNELS.get(name)
    if factory is None:
        raise PipesUsageError(f"unknown message channel {name!r}; known: {', '.join(MESSAGE_CHANNELS)}")
    return factory(options or PipesChannelOptions())
