"""Blob-store channels, orchestrator side: the context injector and the chunk reader, for any store.

A backend (``pipes_core.s3``, ``.gcs``, ``.azure``) supplies a :class:`pipes_ext._blob.PipesBlobStore`;
the logic is here. :class:`PipesBlobStoreMessageReader` is public: subclass it for another store (see its
docstring for the methods to implement). Better than the reference's reader:

* every poll reads **all** chunks available (n, n+1, ... until one is missing), not one per interval, and
  once the process has ended the whole backlog is drained before the session closes;
* transient store errors are retried with backoff (while the process runs, an outage that outlasts the retries
  is tried again at the next poll); a permanent one (no such bucket, access denied) stops the reader and is
  raised when the session ends, naming bucket and key;
* a chunk that never appears while a later one exists is reported as a protocol issue after
  ``missing_chunk_grace`` seconds, and reading goes on with the next one instead of waiting forever; at the final
  drain the session's chunks are listed once, so chunks after a gap of any length are still delivered, in order,
  and the missing ones named in one issue;
* a bad line in a chunk is an issue; the rest of the chunk and later chunks are still read.
"""

from __future__ import annotations

import concurrent.futures
import json
import queue
import random
import string
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, TypeVar

from pipes_core.channels.injectors import PipesContextInjector
from pipes_core.channels.log_readers import PipesLogReader
from pipes_core.channels.readers import PipesMessageReader
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_core.protocol.lines import DEFAULT_MAX_LINE_BYTES
from pipes_ext._blob import (
    DEFAULT_RETRY_POLICY,
    PipesBlobBackend,
    PipesBlobStore,
    PipesBlobTooLarge,
    RetryPolicy,
    chunk_index,
    chunk_key,
    chunk_prefix,
    is_transient_failure,
)
from pipes_ext._errors import PipesProtocolErrorKind, PipesTransportError, PipesUsageError
from pipes_ext._protocol import (
    JSON_WHITESPACE,
    PARAM_BUCKET,
    PARAM_INCLUDE_STDIO_IN_MESSAGES,
    PARAM_KEY,
    PARAM_KEY_PREFIX,
)
from pipes_ext._types import PipesParams

__all__ = [
    "PipesBlobStoreContextInjector",
    "PipesBlobStoreMessageReader",
    "PipesBackendContextInjector",
    "PipesBackendMessageReader",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_MISSING_CHUNK_GRACE",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_MAX_READ_CHUNK_BYTES",
    "READER_THREADS",
    "random_key_component",
]

# How often the reader looks for new chunks while the process runs. Each poll that finds nothing costs one
# request; each chunk costs one.
DEFAULT_POLL_INTERVAL = 1.0
# How long a missing chunk may stay missing while a later one exists before it is reported and skipped.
DEFAULT_MISSING_CHUNK_GRACE = 10.0
# At the final drain, how far past a missing chunk to look for a later one in a store that cannot list its chunks
# (the built-in ones list them: one request, however far the gap). Each probe is a request paid by every session at
# its end, and our writers never skip a number, so two (a double gap is already very unlikely).
GAP_PROBE_CHUNKS = 2
# How long one store request (its retries included) may go unanswered before the reader gives up on it with an
# error naming the store: a store that accepts connections and never answers must not hold a session for the
# SDK's own socket timeouts (botocore: 60 s per read, then its retries and ours, several minutes). A minute, the
# SDKs' own per-read default, so a slow but working store is not cut off.
DEFAULT_REQUEST_TIMEOUT = 60.0
# Threads one reader makes its store requests on (and as many again, in an asyncio loop, that run its polling
# passes): a hung store holds at most these, never a thread of the loop's default executor or of another reader.
# Four requests in flight serve hundreds of sessions polling once a second at a few ms a request; few enough that
# a loop of many sessions stays far below a thread per session.
READER_THREADS = 4
# The largest messages chunk a reader downloads: the longest line a reader parses (one message alone in its chunk
# may be that long); our writer's chunks of many messages stay at its own max_chunk_bytes (4 MiB).
DEFAULT_MAX_READ_CHUNK_BYTES = DEFAULT_MAX_LINE_BYTES
# How long an idle reader thread waits for work before it ends (it is started again when needed).
READER_THREAD_IDLE_SECONDS = 30.0
# The reference's random key component: 30 ASCII letters.
KEY_COMPONENT_LENGTH = 30


def random_key_component() -> str:
    return "".join(random.choices(string.ascii_letters, k=KEY_COMPONENT_LENGTH))


class PipesBlobStoreContextInjector(PipesContextInjector):
    """Uploads the context as ``<key_prefix><30 letters>/context.json``; deleted after the session."""

    def __init__(self, *, key_prefix: str | None = None, retry: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        self.key_prefix = key_prefix
        self.retry = retry

    def make_store(self) -> PipesBlobStore:
        raise NotImplementedError

    @contextmanager
    def inject_context(self, context_data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        store = self.make_store()
        key = f"{self.key_prefix or ''}{random_key_component()}/context.json"
        data = json.dumps(context_data).encode("utf-8")
        self.retry.call(store, "uploading the context", key, lambda: store.put(key, data))
        try:
            yield {PARAM_BUCKET: store.bucket, PARAM_KEY: key}
        finally:
            self.retry.call(store, "deleting the context", key, lambda: store.delete(key))

    def describe(self) -> str:
        return f"{type(self).__name__}"


T = TypeVar("T")
JSON_WHITESPACE_BYTES = JSON_WHITESPACE.encode("ascii")


def _handle_chunk_lines(handler: PipesMessageHandler, chunk: list[bytes], source: str) -> None:
    """Handle a chunk's lines one at a time, so that a chunk of many messages costs little more than its bytes
    (never its whole text and every line at once). ``chunk`` holds the only reference to the bytes and is
    emptied: one message alone in its chunk is decoded and its bytes dropped before it is parsed (its text and
    its value, as the line rule of the file readers)."""
    data = chunk.pop()
    if b"\n" not in data:
        try:
            line: str | bytes = data.decode("utf-8")
        except UnicodeDecodeError:
            line = data  # the handler reports it, with an excerpt
        del data
        blank = not (line.strip(JSON_WHITESPACE) if isinstance(line, str) else line.strip(JSON_WHITESPACE_BYTES))
        if not blank:
            handler.handle_line(line, source)
        return
    start, end = 0, len(data)
    while start <= end:
        cut = data.find(b"\n", start)
        if cut < 0:
            cut = end
        handler.handle_lines(data[start:cut], source)  # one line: decoded, skipped when blank, else handled
        start = cut + 1


class _ReaderThreads:
    """A reader's own threads for blocking work: at most ``size`` at once, started as needed, ending when idle.

    Daemon threads (unlike :class:`concurrent.futures.ThreadPoolExecutor`'s, which the interpreter joins at exit):
    a request hung on a socket that never answers must not hold the process at its exit."""

    def __init__(self, name: str, size: int = READER_THREADS) -> None:
        self.name = name
        self.size = size
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, function: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._queue.put((function, args, future))
            if self._idle == 0 and self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, name=self.name, daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                function, args, future = self._queue.get(timeout=READER_THREAD_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queue.empty():  # (checked under the lock submit() holds: no work left unserved)
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))  # (no local keeps a large result alive while this thread waits)
            except BaseException as exc:
                future.set_exception(exc)
            del function, args, future


# What one poll of the store says to do next (see _ChunkFollower.poll).
POLL_DONE = "done"
POLL_AGAIN = "again"
POLL_WAIT = "wait"


class _ChunkFollower:
    """The reader's thread: follows ``<prefix>/1.json``, ``2.json``, ... into a handler."""

    def __init__(self, reader: PipesBlobStoreMessageReader, store: PipesBlobStore, params: PipesParams,
                 handler: PipesMessageHandler) -> None:
        self.reader = reader
        self.store = store
        self.params = params
        prefix = params.get(PARAM_KEY_PREFIX)
        self.key_prefix = prefix if isinstance(prefix, str) else None
        self.handler = handler
        self.next_index = 1
        self.chunks_read = 0
        self.requests = 0
        self.error: PipesTransportError | None = None
        self._finish = threading.Event()
        self._gap_since: float | None = None
        self._last_gap_probe = time.monotonic()
        self._listing: list[int] | None = None
        self._can_list = False
        # The request that last went unanswered past request_timeout, and the error it raised.
        self._hung: tuple[concurrent.futures.Future[Any], PipesTransportError] | None = None
        self._thread = threading.Thread(target=self._run, name="pipes-blob-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        self._finish.set()
        self._thread.join()

    def _request(self, what: str, key: str, call: Callable[[], T], finishing: bool = False) -> T:
        """``call`` (with the retry policy) on the reader's threads, waited for at most ``request_timeout``:
        past it, a :class:`PipesTransportError` naming the store (transient: the next poll tries again). At the
        final drain, a request that already went unanswered that long and is still unanswered fails at once."""
        hung = self._hung
        if hung is not None:
            if not hung[0].done():
                if finishing:
                    raise hung[1]
            else:
                self._hung = None
        retry, store = self.reader.retry, self.store
        future = self.reader.request_threads.submit(lambda: retry.call(store, what, key, call))
        timeout = self.reader.request_timeout
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            error = PipesTransportError(
                f"{what} {self.store.url(key)} got no answer within request_timeout={timeout} s (bucket "
                f"{self.store.bucket!r}, key {key!r}): the store accepts connections but does not answer. Check "
                "the store's endpoint, or raise request_timeout= on the message reader if it is only slow")
            error.__cause__ = TimeoutError(f"no answer within {timeout} s")
            self._hung = (future, error)
            raise error from error.__cause__

    def _get(self, index: int, finishing: bool = False) -> list[bytes | PipesBlobTooLarge] | None:
        """Chunk ``index`` (in a list of one, which the handling empties: see :func:`_handle_chunk_lines`), or
        None while it does not exist."""
        key = chunk_key(self.key_prefix, index)

        def get() -> bytes | PipesBlobTooLarge | None:
            self.requests += 1
            try:
                data = self.reader.download_messages_chunk(index, self.params)
            except PipesBlobTooLarge as exc:  # not an error of the store: reported, and reading goes on
                return exc
            return data.encode("utf-8") if isinstance(data, str) else data

        data = self._request("reading messages chunk", key, get, finishing)
        return None if data is None else [data]

    def _handle_chunk(self, index: int, chunk: list[bytes | PipesBlobTooLarge]) -> None:
        source = self.store.url(chunk_key(self.key_prefix, index))
        limit = self.reader.max_chunk_bytes
        data = chunk[0]
        if isinstance(data, PipesBlobTooLarge) or len(data) > limit:
            size = data.size if isinstance(data, PipesBlobTooLarge) else len(data)
            chunk.clear()
            told = f"{size} bytes" if size is not None else f"more than {limit} bytes"
            self.handler.report_issue(
                f"messages chunk {source} is {told}, over max_chunk_bytes={limit}; it was skipped unread and its "
                "messages are lost (raise max_chunk_bytes= on the message reader to read such chunks)",
                "", source, PipesProtocolErrorKind.LINE_TOO_LONG, size=size)
        else:
            chunk.clear()
            holder = [data]  # the only reference left, emptied by the handling
            del data
            _handle_chunk_lines(self.handler, holder, source)
        self.chunks_read += 1

    def _read_available(self, finishing: bool = False) -> None:
        while True:
            chunk = self._get(self.next_index, finishing)
            if chunk is None:
                return
            self._handle_chunk(self.next_index, chunk)
            self.next_index += 1
            self._gap_since = None

    def _listed_chunks(self) -> list[int] | None:
        """The indices of the chunks in the store past the missing one, from one listing of the session's chunks
        (made once, at the final drain), or None when the store cannot list or the listing failed."""
        if self._listing is None:
            prefix = chunk_prefix(self.key_prefix)

            def list_keys() -> list[str] | None:
                self.requests += 1
                return self.store.list_keys(prefix)

            try:
                keys = self._request("listing messages chunks", prefix, list_keys, finishing=True)
            except PipesTransportError as exc:
                if self._hung is not None:  # a store that does not answer: no probing either
                    raise
                if not self.reader.listing_failed:  # once per reader (e.g. credentials that may read, not list)
                    self.reader.listing_failed = True
                    self.handler.logger.warning(
                        "[pipes] %s; at the end of each session this reader now looks %d chunks past a missing one "
                        "instead (grant the reader's credentials the right to list the bucket to find chunks after "
                        "a longer gap)", exc, GAP_PROBE_CHUNKS)
                keys = None
            self._listing = [] if keys is None else sorted(
                index for index in (chunk_index(self.key_prefix, key) for key in keys) if index is not None)
            self._can_list = keys is not None
        if not self._can_list:
            return None
        return [index for index in self._listing if index > self.next_index]

    def _later_chunk(self, final: bool) -> tuple[int, list[bytes | PipesBlobTooLarge]] | None:
        """The first chunk present past the missing chunk ``next_index``: while the process runs only the next
        one is probed (one request); at the end, every later chunk the store lists (however far the gap goes),
        or the next :data:`GAP_PROBE_CHUNKS` where it cannot list."""
        listed = self._listed_chunks() if final else None
        candidates = listed if listed is not None else [
            self.next_index + distance for distance in range(1, (GAP_PROBE_CHUNKS if final else 1) + 1)]
        for index in candidates:
            chunk = self._get(index, final)
            if chunk is not None:
                return index, chunk
        return None

    def _skip_gap_if_stale(self, final: bool) -> bool:
        """If chunk n is missing but a later one exists: after the grace period (or at the end), report the
        missing ones (one issue naming them) and go on with the later one."""
        later = self._later_chunk(final)
        if later is None:
            self._gap_since = None
            return False
        now = time.monotonic()
        if self._gap_since is None:
            self._gap_since = now
        if not final and now - self._gap_since < self.reader.missing_chunk_grace:
            return False
        index, chunk = later
        first = self.store.url(chunk_key(self.key_prefix, self.next_index))
        if index - self.next_index == 1:
            what = f"messages chunk {first} never appeared while a later chunk did; its messages are lost"
        else:
            last = self.store.url(chunk_key(self.key_prefix, index - 1))
            what = (f"messages chunks {first} to {last} ({index - self.next_index} chunks) never appeared while a "
                    "later chunk did; their messages are lost")
        self.handler.report_issue(f"{what} (skipped after waiting; reading went on with chunk {index})", "",
                                  first, PipesProtocolErrorKind.MISSING_CHUNK, size=None)
        del later
        self._handle_chunk(index, chunk)
        self.next_index = index + 1
        self._gap_since = None
        return True

    def poll(self, finishing: bool) -> str:
        """One pass over the store (blocking I/O): read every chunk available. Returns :data:`POLL_DONE` once the
        final drain (``finishing``) is over, :data:`POLL_AGAIN` to go on at once (a gap was skipped), else
        :data:`POLL_WAIT` (wait ``interval`` or for the finish). The sync reader calls it from its thread, the
        asyncio twin from the reader's poll threads: one polling logic for both. Raises :class:`PipesTransportError`
        when reading cannot go on."""
        try:
            self._read_available(finishing)
            if finishing:
                while self._skip_gap_if_stale(final=True):
                    self._read_available(finishing)
                return POLL_DONE
            now = time.monotonic()
            if now - self._last_gap_probe >= self.reader.missing_chunk_grace / 2:
                self._last_gap_probe = now
                if self._skip_gap_if_stale(final=False):
                    return POLL_AGAIN
        except PipesTransportError as exc:
            # While the process runs, an outage that outlasted the retries is not the end: the chunks
            # wait in the store, so poll again next interval. At the final drain it is raised.
            if finishing or not is_transient_failure(self.store, exc):
                raise
        return POLL_WAIT

    def fail(self, exc: BaseException) -> None:
        """Keep what stopped the reading, raised at the session's end."""
        if isinstance(exc, PipesTransportError):
            self.error = exc
        else:  # pragma: no cover - a bug; surfaced at session end rather than lost
            self.error = PipesTransportError(f"the blob-store reader failed: {type(exc).__name__}: {exc}")
            self.error.__cause__ = exc

    def _run(self) -> None:
        try:
            while True:
                step = self.poll(self._finish.is_set())
                if step == POLL_DONE:
                    return
                if step == POLL_WAIT:
                    self._finish.wait(self.reader.interval)
        except Exception as exc:
            self.fail(exc)


class _HookStore(PipesBlobStore):
    """Presents a reader's hooks to :class:`RetryPolicy`, which classifies errors and names objects through a
    store: for readers that implement ``download_messages_chunk`` rather than ``make_store``."""

    def __init__(self, reader: PipesBlobStoreMessageReader, params: PipesParams) -> None:
        bucket = params.get(PARAM_BUCKET)
        super().__init__(bucket if isinstance(bucket, str) else "")
        self.reader = reader

    def is_transient(self, exc: BaseException) -> bool:
        return self.reader.is_transient_error(exc)


class PipesBlobStoreMessageReader(PipesMessageReader):
    """Reads the numbered message chunks (``<key_prefix>/1.json``, ``2.json``, ...) that a blob-store message
    writer uploads; the base of the S3, GCS and Azure readers. See the module docstring for the behaviour.

    Subclass it for another store in one of two ways:

    * implement :meth:`make_store`, returning a :class:`pipes_ext._blob.PipesBlobStore` (its ``get``, plus
      ``is_transient`` and ``url`` for retries and messages); the built-in backends do this, and the same
      store serves the external side's writer and the blob log reader; or
    * implement the two hooks directly: :meth:`get_params` (a context manager yielding the messages params
      that tell the external side where to write, and cleaning up afterwards) and
      :meth:`download_messages_chunk` (chunk ``index`` or None while it does not exist); optionally
      :meth:`is_transient_error` so that outages are retried.

    Args:
        interval: seconds between polls while the process runs (the reference's default is 10 s; ours is
            :data:`DEFAULT_POLL_INTERVAL`, since each poll takes every chunk available).
        log_readers: :class:`~pipes_core.PipesLogReader` objects, started when ``opened`` arrives and stopped
            when the session ends.
        include_stdio_in_messages: ask the external side to forward its stdout/stderr.
        missing_chunk_grace: see :data:`DEFAULT_MISSING_CHUNK_GRACE`.
        retry: backoff for transient errors.
        request_timeout: seconds one store request (its retries included) may go unanswered before it fails
            with a :class:`PipesTransportError` naming the store; see :data:`DEFAULT_REQUEST_TIMEOUT`.
        max_chunk_bytes: the largest chunk read; a larger one is reported (``line_too_long``) and skipped
            without being downloaded whole; see :data:`DEFAULT_MAX_READ_CHUNK_BYTES`.
        key_prefix: put each session's chunks under this prefix (``<key_prefix><random>/1.json``); None: at the
            top of the bucket.
    """

    def __init__(
        self,
        interval: float = DEFAULT_POLL_INTERVAL,
        log_readers: Sequence[PipesLogReader] | None = None,
        *,
        include_stdio_in_messages: bool = False,
        missing_chunk_grace: float = DEFAULT_MISSING_CHUNK_GRACE,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_chunk_bytes: int = DEFAULT_MAX_READ_CHUNK_BYTES,
        key_prefix: str | None = None,
    ) -> None:
        self.key_prefix = key_prefix
        if not request_timeout > 0:
            raise PipesUsageError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
        if not (isinstance(max_chunk_bytes, int) and max_chunk_bytes >= 1):
            raise PipesUsageError(f"max_chunk_bytes must be a positive number of bytes, got {max_chunk_bytes!r}")
        self.interval = interval
        self.log_readers = tuple(log_readers or ())
        self.include_stdio_in_messages = include_stdio_in_messages
        self.missing_chunk_grace = missing_chunk_grace
        self.retry = retry
        self.request_timeout = request_timeout
        self.max_chunk_bytes = max_chunk_bytes
        # This reader's own threads: its requests, and its polling passes in an asyncio loop (see READER_THREADS).
        self.request_threads = _ReaderThreads("pipes-blob-request")
        self.poll_threads = _ReaderThreads("pipes-blob-poll")
        self.listing_failed = False  # listing a session's chunks failed once (said once, then not said again)
        self.last_stats: dict[str, int] = {}
        # The store of each open session, by its key prefix, between get_params' entry and exit: one reader may
        # serve several sessions at once (a client running many processes concurrently).
        self._stores: dict[str, PipesBlobStore] = {}

    # ------------------------------------------------------------------ what a subclass implements

    def make_store(self) -> PipesBlobStore:
        """The store the messages are read from (called once per session)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_store(), or get_params() and download_messages_chunk()"
        )

    @contextmanager
    def get_params(self) -> Iterator[PipesParams]:
        """Yield the messages params for the external side (where to write the chunks); clean up on exit.

        Default: a fresh random key prefix in :meth:`make_store`'s bucket:
        ``{"bucket", "key_prefix", "include_stdio_in_messages"}``.
        """
        store = self.make_store()
        key_prefix = f"{self.key_prefix or ''}{random_key_component()}"
        self._stores[key_prefix] = store
        try:
            yield {
                PARAM_BUCKET: store.bucket,
                PARAM_KEY_PREFIX: key_prefix,
                PARAM_INCLUDE_STDIO_IN_MESSAGES: self.include_stdio_in_messages,
            }
        finally:
            del self._stores[key_prefix]

    def _session_store(self, params: PipesParams) -> PipesBlobStore | None:
        prefix = params.get(PARAM_KEY_PREFIX)
        return self._stores.get(prefix) if isinstance(prefix, str) else None

    def download_messages_chunk(self, index: int, params: PipesParams) -> bytes | str | None:
        """Chunk ``index`` (counting from 1) of the session described by ``params`` (what :meth:`get_params`
        yielded), or None while it does not exist. May raise; see :meth:`is_transient_error`.

        Default: ``<key_prefix>/<index>.json`` from :meth:`make_store`'s store, through its
        :meth:`~pipes_ext._blob.PipesBlobStore.get_at_most` (a chunk over ``max_chunk_bytes`` is not downloaded;
        raise :class:`~pipes_ext._blob.PipesBlobTooLarge` from your own hook to the same effect).
        """
        store = self._session_store(params)
        if store is None:
            raise NotImplementedError(f"{type(self).__name__} must implement download_messages_chunk()")
        prefix = params.get(PARAM_KEY_PREFIX)
        return store.get_at_most(chunk_key(prefix if isinstance(prefix, str) else None, index), self.max_chunk_bytes)

    def is_transient_error(self, exc: BaseException) -> bool:
        """Is an error raised by :meth:`download_messages_chunk` worth retrying (an outage, not a missing
        bucket)? Default: the store's answer, else connection errors and timeouts."""
        for store in list(self._stores.values())[:1]:  # the backends classify errors alike for every session
            return store.is_transient(exc)
        return isinstance(exc, (ConnectionError, TimeoutError))

    # ------------------------------------------------------------------ the reading itself

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        with self.get_params() as params:
            follower = self.follower(params, handler)
            follower.start()
            try:
                yield dict(params)
            finally:
                follower.finish()
                self.ended(follower)

    def follower(self, params: PipesParams, handler: PipesMessageHandler) -> _ChunkFollower:
        """The chunk follower of one session (driven by a thread here, by the loop in the asyncio twin)."""
        store = self._session_store(params) or _HookStore(self, params)
        return _ChunkFollower(self, store, params, handler)

    def ended(self, follower: _ChunkFollower) -> None:
        """After the final drain: keep the figures, raise what stopped the reading."""
        self.last_stats = {"chunks": follower.chunks_read, "requests": follower.requests}
        if follower.error is not None:
            raise follower.error

    def describe(self) -> str:
        return type(self).__name__


# ------------------------------------------------------------------------------------------------ backends

ClientT = TypeVar("ClientT")


class PipesBackendContextInjector(PipesBlobStoreContextInjector, Generic[ClientT]):
    """The context injector of one declared backend (``backend``: a :class:`pipes_ext._blob.PipesBlobBackend`):
    ``(bucket, client=None, key_prefix=None, *, retry)``, the client built by the backend when omitted."""

    backend: ClassVar[PipesBlobBackend]

    def __init__(self, bucket: str, client: ClientT | None = None, key_prefix: str | None = None,
                 *, retry: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        super().__init__(key_prefix=key_prefix, retry=retry)
        self.bucket = bucket
        self.client: ClientT = client if client is not None else self.backend.default_client()

    def make_store(self) -> PipesBlobStore:
        return self.backend.store(self.client, self.bucket)

    def describe(self) -> str:
        return self.backend.describe("context injector", self.bucket)


class PipesBackendMessageReader(PipesBlobStoreMessageReader, Generic[ClientT]):
    """The message reader of one declared backend: ``(bucket, client=None, interval, include_stdio_in_messages,
    *, log_readers, missing_chunk_grace, retry, request_timeout, max_chunk_bytes, key_prefix)`` (the reference's
    argument order), the client built by the backend when omitted."""

    backend: ClassVar[PipesBlobBackend]

    def __init__(
        self,
        bucket: str,
        client: ClientT | None = None,
        interval: float = DEFAULT_POLL_INTERVAL,
        include_stdio_in_messages: bool = False,
        *,
        log_readers: Sequence[PipesLogReader] | None = None,
        missing_chunk_grace: float = DEFAULT_MISSING_CHUNK_GRACE,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_chunk_bytes: int = DEFAULT_MAX_READ_CHUNK_BYTES,
        key_prefix: str | None = None,
    ) -> None:
        super().__init__(interval, log_readers, include_stdio_in_messages=include_stdio_in_messages,
                         missing_chunk_grace=missing_chunk_grace, retry=retry, request_timeout=request_timeout,
                         max_chunk_bytes=max_chunk_bytes, key_prefix=key_prefix)
        self.bucket = bucket
        self.client: ClientT = client if client is not None else self.backend.default_client()

    def make_store(self) -> PipesBlobStore:
        return self.backend.store(self.client, self.bucket)

    def describe(self) -> str:
        return self.backend.describe("message reader", self.bucket)
