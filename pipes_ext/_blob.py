"""Blob-store channels, external side: the chunked message writer and the context loader, for any store.

Wire layout (as the reference): messages are uploaded as chunks ``<key_prefix>/<n>.json`` (``<n>.json`` with
no prefix), ``n`` counting from 1 with no gaps, each chunk the messages' JSON lines joined by ``"\\n"`` with
no trailing newline. The context is one JSON object at ``key`` in ``bucket``.

A backend (``pipes_ext.s3``, ``.gcs``, ``.azure``) only supplies a :class:`PipesBlobStore` (put, get, delete
and a classification of its SDK's errors) and one :class:`PipesBlobBackend` declaration (store class, default
client, label, extra), which the shared bases here (and ``pipes_core.channels.blob``'s) consume; its public classes
are thin names over those bases. Everything else is here:

* the writer uploads every ``interval`` seconds **and** whenever ``max_chunk_bytes`` are buffered, so a burst
  does not build one huge chunk; one message larger than that travels alone in its chunk;
* transient errors (5xx, throttling, timeouts, connection resets) are retried with exponential backoff; a
  failed upload keeps its messages and is retried with the same chunk number, so nothing is lost or
  reordered; an outage that outlasts the retries pauses the upload thread, which then tries again; a permanent
  error (no such bucket, access denied) fails fast, naming bucket and key;
* ``close()`` uploads everything before returning (so before ``closed`` is sent), within ``close_timeout``
  seconds, and raises :class:`PipesTransportError` saying how many messages were not uploaded otherwise;
* if the process exits without closing, an ``atexit`` hook flushes what is buffered; if the upload thread
  dies, ``close()`` uploads the rest from the calling thread.
"""

from __future__ import annotations

import atexit
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

from ._context_loaders import PipesContextLoader
from ._errors import PipesProtocolError, PipesTransportError, install_hint
from ._errors import PipesProtocolErrorKind as _Kind
from ._protocol import PARAM_BUCKET, PARAM_KEY, PARAM_KEY_PREFIX, validate_context_data
from ._writers import PipesMessageWriter, PipesMessageWriterChannel

__all__ = [
    "PipesBlobBackend",
    "PipesBlobStore",
    "PipesBlobTooLarge",
    "RetryPolicy",
    "DEFAULT_RETRY_POLICY",
    "PipesBlobStoreMessageWriter",
    "PipesBlobStoreMessageWriterChannel",
    "PipesBlobStoreContextLoader",
    "DEFAULT_UPLOAD_INTERVAL",
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEFAULT_CLOSE_TIMEOUT",
    "chunk_key",
    "chunk_index",
    "chunk_prefix",
    "missing_extra_error",
    "is_transient_failure",
]

# The reference uploads every ~11 s and its reader fetches one chunk per 10 s. Our reader takes every
# available chunk per poll, so a 1 s upload interval gives near-live messages at one request per second.
DEFAULT_UPLOAD_INTERVAL = 1.0
# A chunk is uploaded as soon as this much is buffered: large enough that 10,000 small messages need a handful
# of requests, small enough that a burst never builds a chunk too big to download comfortably.
DEFAULT_MAX_CHUNK_BYTES = 4 * 1024 * 1024
# How long close() may spend uploading what is left (the reference waits 60 s, then drops messages silently).
DEFAULT_CLOSE_TIMEOUT = 60.0

T = TypeVar("T")
# The SDK client type of a backend (any object with the calls its store makes).
ClientT = TypeVar("ClientT")


def missing_extra_error(extra: str, package: str, exc: ImportError) -> ImportError:
    """The ImportError raised when a backend's SDK is not installed, naming the extra to install."""
    return ImportError(
        f"this channel needs the {package!r} package: {install_hint(package, extra, 'pipes-ext and pipes-sdk')} "
        f"({exc})"
    )


def chunk_key(key_prefix: str | None, index: int) -> str:
    """The object key of chunk ``index`` (from 1)."""
    return f"{key_prefix}/{index}.json" if key_prefix else f"{index}.json"


def chunk_prefix(key_prefix: str | None) -> str:
    """What every chunk key of ``key_prefix`` starts with (for listing them)."""
    return chunk_key(key_prefix, 0)[: -len("0.json")]


def chunk_index(key_prefix: str | None, key: str) -> int | None:
    """The index of the chunk whose key is ``key`` (the inverse of :func:`chunk_key`), or None for another key."""
    prefix = chunk_prefix(key_prefix)
    if not key.startswith(prefix) or not key.endswith(".json"):
        return None
    number = key[len(prefix) : -len(".json")]
    return int(number) if number.isdigit() and number.isascii() and number[0] != "0" else None


class PipesBlobTooLarge(Exception):
    """Raised by :meth:`PipesBlobStore.get_at_most`: the object is larger than the limit, and was not downloaded
    whole. ``size`` is its size when the store said it (else None: more than ``limit``)."""

    def __init__(self, key: str, size: int | None, limit: int) -> None:
        super().__init__(f"{key} is {f'more than {limit}' if size is None else size} bytes, over the limit of "
                         f"{limit} bytes")
        self.key = key
        self.size = size
        self.limit = limit


class PipesBlobStore:
    """What a backend supplies: one bucket (or container) of one store, through an injected SDK client."""

    scheme = "blob"

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist (yet)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Delete the object; a missing object is not an error."""
        raise NotImplementedError

    def get_at_most(self, key: str, max_bytes: int) -> bytes | None:
        """Like :meth:`get`, but raise :class:`PipesBlobTooLarge` for an object larger than ``max_bytes``.

        The default downloads the object and then checks its size; the built-in stores check it before the body
        is read (S3, Azure) or read at most ``max_bytes + 1`` bytes (GCS), so an over-limit object costs no
        memory."""
        data = self.get(key)
        if data is not None and len(data) > max_bytes:
            raise PipesBlobTooLarge(key, len(data), max_bytes)
        return data

    def list_keys(self, prefix: str) -> list[str] | None:
        """The keys of the objects whose key starts with ``prefix``, or None when this store cannot list (the
        default). The message reader lists a session's chunks once at its end, to find the chunks after a gap
        however far they are; a store that cannot list is probed a few chunks ahead instead."""
        return None

    def is_transient(self, exc: BaseException) -> bool:
        """Is ``exc`` worth retrying (5xx, throttling, timeout, connection reset)?"""
        return isinstance(exc, (ConnectionError, TimeoutError))

    def url(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"


class PipesBlobBackend:
    """One blob-store backend, declared once and consumed by the shared bases on both sides.

    Args:
        label: the store's name in descriptions and errors ("S3").
        extra: the ``pipes-sdk`` extra that installs its SDK ("s3").
        package: that SDK's distribution name, for the missing-extra error ("boto3").
        store: ``store(client, bucket)`` builds the :class:`PipesBlobStore` of one bucket.
        build_client: builds the default client (importing the SDK) when none is injected.
        bucket_word: what the store calls a bucket ("container" for Azure), in descriptions.
    """

    __slots__ = ("bucket_word", "build_client", "extra", "label", "package", "store")

    def __init__(self, *, label: str, extra: str, package: str, store: Callable[[Any, str], PipesBlobStore],
                 build_client: Callable[[], Any], bucket_word: str = "bucket") -> None:
        self.label = label
        self.extra = extra
        self.package = package
        self.store = store
        self.build_client = build_client
        self.bucket_word = bucket_word

    def default_client(self) -> Any:
        """The client used when none is injected; an ImportError names the extra to install."""
        try:
            return self.build_client()
        except ImportError as exc:
            raise missing_extra_error(self.extra, self.package, exc) from exc

    def describe(self, role: str, bucket: str) -> str:
        """``"the S3 message reader (bucket 'b')"``."""
        return f"the {self.label} {role} ({self.bucket_word} {bucket!r})"

    def __repr__(self) -> str:
        return f"PipesBlobBackend({self.label!r}, extra={self.extra!r})"


class _BackendClient(Generic[ClientT]):
    """The client part shared by every blob-store channel class: an injected client, or the declared backend's
    default one (a subclass without ``backend`` supplies ``make_store`` itself)."""

    backend: ClassVar[PipesBlobBackend | None] = None
    client: ClientT

    def _init_client(self, client: ClientT | None) -> None:
        backend = type(self).backend
        # Without a backend and a client, the subclass's own make_store needs none.
        self.client = client if client is not None or backend is None else backend.default_client()  # type: ignore[assignment]


class RetryPolicy:
    """Exponential backoff with full jitter for transient store errors.

    Args:
        attempts: tries in all, the first included.
        base_delay: the first backoff, doubled per retry.
        max_delay: the cap of one backoff.
    """

    def __init__(self, attempts: int = 6, base_delay: float = 0.1, max_delay: float = 2.0) -> None:
        self.attempts = max(1, attempts)
        self.base_delay = base_delay
        self.max_delay = max_delay

    def call(self, store: PipesBlobStore, what: str, key: str, fn: Callable[[], T],
             deadline: float | None = None) -> T:
        """Run ``fn``, retrying transient errors; raise :class:`PipesTransportError` naming the object."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                transient = store.is_transient(exc)
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if not transient or attempt == self.attempts or out_of_time:
                    kind = "transient error, retries exhausted" if transient else "error"
                    raise PipesTransportError(
                        f"{what} {store.url(key)} failed ({kind}; bucket {store.bucket!r}, key {key!r}): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                delay = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
                if deadline is not None:
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


DEFAULT_RETRY_POLICY = RetryPolicy()


def is_transient_failure(store: PipesBlobStore, exc: BaseException) -> bool:
    """Is ``exc`` (raised by :meth:`RetryPolicy.call`) a transient error whose retries ran out, so that trying
    again later may succeed (unlike a permanent one such as no such bucket)?"""
    cause = exc.__cause__
    return isinstance(exc, PipesTransportError) and cause is not None and store.is_transient(cause)


class PipesBlobStoreMessageWriterChannel(PipesMessageWriterChannel):
    """Buffers message lines and uploads them as numbered chunks; see the module docstring."""

    def __init__(
        self,
        store: PipesBlobStore,
        key_prefix: str | None,
        *,
        interval: float = DEFAULT_UPLOAD_INTERVAL,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> None:
        self.store = store
        self.key_prefix = key_prefix
        self.interval = interval
        self.max_chunk_bytes = max_chunk_bytes
        self.close_timeout = close_timeout
        self.retry = retry
        self._cond = threading.Condition()
        self._buffer: list[str] = []
        self._buffered_bytes = 0
        self._next_index = 1
        self._closing = False
        self._closed = False
        self._deadline: float | None = None
        self._upload_lock = threading.Lock()
        self.error: BaseException | None = None
        self.chunks_uploaded = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="pipes-blob-writer", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PipesBlobStoreMessageWriterChannel:
        self._thread.start()
        atexit.register(self._flush_at_exit)
        return self

    def write_line(self, line: str) -> None:
        with self._cond:
            if self._closed:
                raise PipesTransportError("the blob-store message channel is closed")
            if isinstance(self.error, PipesTransportError):
                # A permanent store error stopped the uploads: say so now rather than buffer without bound.
                raise PipesTransportError(f"messages can no longer be uploaded: {self.error}") from self.error
            self._buffer.append(line)
            self._buffered_bytes += len(line) + 1
            if self._buffered_bytes >= self.max_chunk_bytes:
                self._cond.notify_all()

    def close(self) -> None:
        """Upload everything still buffered, then stop. Raises :class:`PipesTransportError` when messages
        could not be uploaded (permanent error, or ``close_timeout`` exceeded), saying how many."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._deadline = time.monotonic() + self.close_timeout
            self._cond.notify_all()
        atexit.unregister(self._flush_at_exit)
        if self._thread.is_alive():
            self._thread.join(self.close_timeout)
        with self._cond:
            self._closed = True
        if self._thread.is_alive():
            left = self._pending_count()
            raise PipesTransportError(
                f"closing the blob-store channel took more than {self.close_timeout} s; {left} message(s) were "
                f"not uploaded to {self.store.url(self.key_prefix or '')}"
            )
        if self._pending_count():
            # The upload thread stopped early (an error or a crash): try once more from this thread.
            try:
                self._upload_all(deadline=time.monotonic() + self.close_timeout)
            except PipesTransportError as exc:
                raise PipesTransportError(
                    f"{self._pending_count()} message(s) could not be uploaded: {exc}"
                ) from exc

    def _flush_at_exit(self) -> None:
        try:
            self.close()
        except Exception as exc:  # at interpreter exit there is no caller left to raise to
            sys.stderr.write(f"pipes: blob-store messages not uploaded at exit: {exc}\n")

    # ------------------------------------------------------------------ uploading

    def _pending_count(self) -> int:
        with self._cond:
            return len(self._buffer)

    def _take_batch(self) -> tuple[list[str], int]:
        """The next chunk's lines (at least one; at most max_chunk_bytes unless one line is larger) and their
        buffered size."""
        size = 0
        count = 0
        for line in self._buffer:
            if count and size + len(line) + 1 > self.max_chunk_bytes:
                break
            size += len(line) + 1
            count += 1
        return self._buffer[:count], size

    def _upload_one(self, deadline: float | None) -> bool:
        """Upload the next chunk; False when nothing is buffered. The lines leave the buffer only once the
        chunk is stored, so a failed upload keeps them for the next try."""
        with self._upload_lock:
            with self._cond:
                batch, batch_bytes = self._take_batch()
                if not batch:
                    return False
                index = self._next_index
            key = chunk_key(self.key_prefix, index)
            data = "\n".join(batch).encode("utf-8")

            def put() -> None:
                self.requests += 1
                self.store.put(key, data)

            self.retry.call(self.store, "uploading messages chunk", key, put, deadline)
            with self._cond:
                del self._buffer[: len(batch)]
                self._buffered_bytes -= batch_bytes
                self._next_index = index + 1
                self.chunks_uploaded += 1
            return True

    def _upload_all(self, deadline: float | None) -> None:
        while self._upload_one(deadline):
            pass

    def _run(self) -> None:
        next_upload = time.monotonic() + self.interval
        try:
            while True:
                with self._cond:
                    while not self._closing and self._buffered_bytes < self.max_chunk_bytes:
                        remaining = next_upload - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    closing = self._closing
                    deadline = self._deadline
                if closing:
                    self._upload_all(deadline)
                    return
                try:
                    if self._buffered_bytes >= self.max_chunk_bytes:
                        while self._buffered_bytes >= self.max_chunk_bytes and self._upload_one(None):
                            pass
                    else:
                        self._upload_all(None)
                        next_upload = time.monotonic() + self.interval
                except PipesTransportError as exc:
                    if not is_transient_failure(self.store, exc):
                        raise
                    # An outage outlasted the retries: the lines are kept; pause, then try again (the thread
                    # must not die, or nothing would be uploaded before close()).
                    pause_until = time.monotonic() + max(self.interval, self.retry.max_delay)
                    with self._cond:
                        while not self._closing and time.monotonic() < pause_until:
                            self._cond.wait(pause_until - time.monotonic())
                    next_upload = time.monotonic()
        except BaseException as exc:  # kept for close(), which retries from the caller's thread
            self.error = exc


class PipesBlobStoreMessageWriter(PipesMessageWriter, _BackendClient[ClientT]):
    """Base of the blob-store message writers: a subclass declares ``backend`` (or overrides
    ``make_store(bucket)``)."""

    def __init__(
        self,
        client: ClientT | None = None,
        *,
        interval: float = DEFAULT_UPLOAD_INTERVAL,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> None:
        self.interval = interval
        self.max_chunk_bytes = max_chunk_bytes
        self.close_timeout = close_timeout
        self.retry = retry
        self.channel: PipesBlobStoreMessageWriterChannel | None = None
        self._init_client(client)

    def make_store(self, bucket: str) -> PipesBlobStore:
        if self.backend is None:
            raise NotImplementedError("a blob-store writer declares a backend or overrides make_store")
        return self.backend.store(self.client, bucket)

    def open(self, params: Mapping[str, Any]) -> PipesMessageWriterChannel:
        bucket = params.get(PARAM_BUCKET)
        if not isinstance(bucket, str) or not bucket:
            raise PipesProtocolError(f'blob-store messages params need a string "{PARAM_BUCKET}" (got {dict(params)})',
                                     _Kind.BAD_MESSAGES_PARAMS)
        key_prefix = params.get(PARAM_KEY_PREFIX)
        if key_prefix is not None and not isinstance(key_prefix, str):
            raise PipesProtocolError(f'blob-store messages params "{PARAM_KEY_PREFIX}" must be a string',
                                     _Kind.BAD_MESSAGES_PARAMS)
        self.channel = PipesBlobStoreMessageWriterChannel(
            self.make_store(bucket),
            key_prefix,
            interval=self.interval,
            max_chunk_bytes=self.max_chunk_bytes,
            close_timeout=self.close_timeout,
            retry=self.retry,
        ).start()
        return self.channel


class PipesBlobStoreContextLoader(PipesContextLoader, _BackendClient[ClientT]):
    """Base of the blob-store context loaders: reads the JSON object at ``{"bucket", "key"}``. A subclass
    declares ``backend`` (or overrides ``make_store(bucket)``)."""

    def __init__(self, client: ClientT | None = None, *, retry: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        self.retry = retry
        self._init_client(client)

    def make_store(self, bucket: str) -> PipesBlobStore:
        if self.backend is None:
            raise NotImplementedError("a blob-store context loader declares a backend or overrides make_store")
        return self.backend.store(self.client, bucket)

    def load_context(self, params: Mapping[str, Any]) -> dict[str, Any]:
        bucket, key = params.get(PARAM_BUCKET), params.get(PARAM_KEY)
        if not isinstance(bucket, str) or not isinstance(key, str):
            raise PipesProtocolError(
                f'blob-store context params need string "{PARAM_BUCKET}" and "{PARAM_KEY}" (got {dict(params)})',
                _Kind.BAD_CONTEXT
            )
        store = self.make_store(bucket)
        data = self.retry.call(store, "downloading the context", key, lambda: store.get(key))
        if data is None:
            raise PipesTransportError(f"the context object {store.url(key)} does not exist")
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise PipesProtocolError(f"the context object {store.url(key)} is not UTF-8 JSON: {exc}",
                                     _Kind.NOT_JSON) from exc
        return validate_context_data(document)
