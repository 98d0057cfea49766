"""Log readers: forward an external process's own log output (a file, a blob) while a session runs.

Some launchers cannot hand us the process's stdout/stderr as a pipe: a Slurm job writes them to an output file,
a cloud job to a blob of logs. A :class:`PipesLogReader` follows such a log and forwards its text to this
process's stdout/stderr, to any text stream, or to a callable. Log readers are given to a message reader
(``log_readers=[...]``); the session starts them when the external process sends ``opened`` and, when the
session ends, reads what is left and stops them. If ``opened`` never came (the process failed before it could
speak the protocol, which is exactly when its log matters), each log reader is run once at the end, so its
output is still forwarded.

Shipped: :class:`PipesFileLogReader` (follows a path; the file may appear late, be rotated or truncated) and
:class:`PipesBlobStoreLogReader` (follows a log object in S3, GCS, Azure or any
:class:`~pipes_ext._blob.PipesBlobStore`). Both are :class:`PipesChunkedLogReader` objects: one background thread
that asks :meth:`PipesChunkedLogReader.read_chunk` for new bytes every ``interval`` seconds; a new kind of log
only implements that method (and :meth:`PipesChunkedLogReader.reset` if it keeps a position).

Text is decoded as UTF-8 incrementally (a character split across two reads is not broken; bytes that are not
UTF-8 are replaced, never dropped) and forwarded as it arrives, in pieces of at most :data:`LOG_READ_BLOCK_BYTES`.
A failing read never stops a log reader: the error is logged once (until the reads succeed again) and the read
is tried again at the next interval.
"""

from __future__ import annotations

import codecs
import errno
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

from pipes_core.protocol.errors import PipesUsageError
from pipes_ext._blob import DEFAULT_RETRY_POLICY, PipesBlobStore, RetryPolicy
from pipes_ext._protocol import STREAM_STDERR, STREAM_STDOUT
from pipes_ext._types import PipesParams

__all__ = [
    "PipesLogReader",
    "PipesChunkedLogReader",
    "PipesFileLogReader",
    "PipesBlobStoreLogReader",
    "PipesLogTarget",
    "DEFAULT_LOG_POLL_INTERVAL",
    "DEFAULT_BLOB_LOG_POLL_INTERVAL",
    "LOG_READ_BLOCK_BYTES",
    "LOG_DRAIN_TIMEOUT",
    "LOG_REWRITE_CHECK_BYTES",
]

logger = logging.getLogger("pipes_core")

# A local file costs one read() per poll: ten a second keeps a job's output near-live for nothing.
DEFAULT_LOG_POLL_INTERVAL = 0.1
# A blob costs one request per poll (and a download of the whole object when it grew): once a second.
DEFAULT_BLOB_LOG_POLL_INTERVAL = 1.0
# One read takes at most this much, so a huge log is forwarded in pieces and never held whole.
LOG_READ_BLOCK_BYTES = 64 * 1024
# How many of the bytes last read a file log reader keeps to recognise its file at the next poll: a file truncated
# and written again past the position read between two polls has other bytes there (one pread of this size per
# poll that finds the file changed). A file rewritten with the very bytes it had is indistinguishable from one
# that grew, and is forwarded from the old position.
LOG_REWRITE_CHECK_BYTES = 4096
# At the end of a session, how long a log reader may spend forwarding what is left before it is abandoned
# (a log still growing without end, e.g. a process the session left behind, must not hold the session).
LOG_DRAIN_TIMEOUT = 30.0

# Where a log reader's text goes: "stdout" / "stderr" (this process's streams, looked up at each write so that
# redirections apply), a text stream, or a callable receiving each piece of text.
PipesLogTarget = str | IO[str] | Callable[[str], None]


def _writer_for(target: PipesLogTarget) -> Callable[[str], None]:
    if isinstance(target, str):
        if target not in (STREAM_STDOUT, STREAM_STDERR):
            raise PipesUsageError(
                f'a log target must be "stdout", "stderr", a text stream or a callable, got {target!r}'
            )

        def write_std(text: str) -> None:
            stream = sys.stdout if target == STREAM_STDOUT else sys.stderr
            stream.write(text)
            stream.flush()

        return write_std
    write = getattr(target, "write", None)
    if write is not None:
        stream: IO[str] = target  # type: ignore[assignment]

        def write_stream(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write_stream
    if callable(target):
        return target
    raise PipesUsageError(f"a log target must be 'stdout', 'stderr', a text stream or a callable, got {target!r}")


class PipesLogReader:
    """Base of the log readers: follows one log of the external process from ``start`` to ``stop``.

    The session calls :meth:`start` when ``opened`` arrives (on the message reader's thread: it must return
    at once) and :meth:`stop` when the session ends, which forwards what is left and returns when the reader
    has stopped. One instance serves one session at a time, and can be reused for the next.
    """

    @property
    def name(self) -> str:
        """A short description for messages, e.g. ``file log /path/slurm-12.out``."""
        return type(self).__name__

    def start(self, params: PipesParams, is_session_closed: threading.Event) -> None:
        """Begin forwarding. ``params`` are the session's messages params (where a log's location may be
        derived from); ``is_session_closed`` is set when the session ends."""
        raise NotImplementedError

    def stop(self) -> None:
        """Forward what is left, then stop; returns when done (within :data:`LOG_DRAIN_TIMEOUT`)."""
        raise NotImplementedError

    def is_running(self) -> bool:
        raise NotImplementedError

    def target_is_readable(self, params: PipesParams) -> bool:
        """Can the log be read yet (e.g. the file exists)? Informational; readers wait for it themselves."""
        return True

    def close(self) -> None:
        if self.is_running():
            self.stop()

    def __enter__(self) -> PipesLogReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PipesChunkedLogReader(PipesLogReader):
    """A log reader with one background thread polling :meth:`read_chunk`.

    Subclasses implement :meth:`read_chunk` (the bytes that appeared since the previous call, or None) and, if
    they keep a position, :meth:`reset` (called at each start).

    Args:
        interval: seconds between polls while nothing new arrives (new data is read again at once).
        target: where the text goes; see :data:`PipesLogTarget`. Default: this process's stdout.
        drain_timeout: see :data:`LOG_DRAIN_TIMEOUT`.
    """

    def __init__(
        self,
        *,
        interval: float = DEFAULT_LOG_POLL_INTERVAL,
        target: PipesLogTarget = STREAM_STDOUT,
        drain_timeout: float = LOG_DRAIN_TIMEOUT,
    ) -> None:
        if interval <= 0:
            raise PipesUsageError(f"interval must be positive, got {interval!r}")
        self.interval = interval
        self.target = target
        self._write = _writer_for(target)
        self.drain_timeout = drain_timeout
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._params: PipesParams = {}
        self._last_error: str | None = None
        self.bytes_forwarded = 0
        self.errors = 0

    def read_chunk(self, params: PipesParams) -> bytes | None:
        """The log bytes that appeared since the previous call (at most :data:`LOG_READ_BLOCK_BYTES` is
        advised), or None / ``b""`` when there is nothing new. May raise: the error is logged and the read
        retried at the next interval."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the position: called at each :meth:`start`, so one instance can serve several sessions."""

    def release(self) -> None:
        """Release what the reads hold open (a file descriptor); called when the thread ends."""

    def start(self, params: PipesParams, is_session_closed: threading.Event | None = None) -> None:
        if self.is_running():
            return
        self.reset()
        self._params = params
        self._stop.clear()
        self._last_error = None
        self._thread = threading.Thread(target=self._run, name=f"pipes-log-reader:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(self.drain_timeout + 5.0)
        if thread.is_alive():  # pragma: no cover - a read blocked past the drain deadline
            logger.warning("[pipes] log reader %s did not stop in time; abandoning it", self.name)
        self._thread = None

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _read_once(self) -> bytes | None:
        try:
            data = self.read_chunk(self._params)
        except Exception as exc:
            self.errors += 1
            text = f"{type(exc).__name__}: {exc}"
            if text != self._last_error:  # once per distinct error, not once per poll
                logger.warning("[pipes] log reader %s: %s (retrying every %s s)", self.name, text, self.interval)
                self._last_error = text
            return None
        if data:
            self._last_error = None
        return data

    def _run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        drain_deadline: float | None = None
        try:
            while True:
                finishing = self._stop.is_set()
                if finishing and drain_deadline is None:
                    drain_deadline = time.monotonic() + self.drain_timeout
                data = self._read_once()
                if data:
                    self._forward(decoder.decode(data))
                    if drain_deadline is not None and time.monotonic() > drain_deadline:
                        logger.warning("[pipes] log reader %s: the log still grows after %s s at the end of the "
                                       "session; stopped forwarding it", self.name, self.drain_timeout)
                        break
                    continue
                if finishing:
                    break
                self._stop.wait(self.interval)
            self._forward(decoder.decode(b"", final=True))
        finally:
            self.release()

    def _forward(self, text: str) -> None:
        if not text:
            return
        self.bytes_forwarded += len(text.encode("utf-8", "surrogatepass"))
        try:
            self._write(text)
        except Exception:
            logger.exception("[pipes] log reader %s: the target raised", self.name)


class PipesFileLogReader(PipesChunkedLogReader):
    """Follows a file the external process (or its launcher) writes, e.g. a Slurm job's output file.

    The file may not exist yet when the session opens (it is waited for), may be rotated (renamed away and
    a new one created at the path: the old one is read to its end, then the new one from its start) or
    truncated in place (read again from its start, also when it grew past the position read before the next
    poll: see :data:`LOG_REWRITE_CHECK_BYTES`). The whole file is forwarded, from its first byte. A FIFO (or any
    file that is not a regular file) is read as a stream, to its end.

    A symbolic link at the path is never followed (``O_NOFOLLOW``), at the first open or after a rotation: the
    job may run as another user and swap in a link to a file it may not read. The swap is logged as a warning
    (on the ``pipes_core`` logger) and the link's target is not forwarded; give the resolved path
    (``os.path.realpath``) if the link is one you made.

    Args:
        path: the file, or a callable deriving it from the session's messages params.
        interval, target, drain_timeout: see :class:`PipesChunkedLogReader`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Callable[[PipesParams], str | os.PathLike[str]],
        *,
        interval: float = DEFAULT_LOG_POLL_INTERVAL,
        target: PipesLogTarget = STREAM_STDOUT,
        drain_timeout: float = LOG_DRAIN_TIMEOUT,
    ) -> None:
        super().__init__(interval=interval, target=target, drain_timeout=drain_timeout)
        self._path_spec = path
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._position = 0
        self._seekable = True
        # The last bytes read (at most LOG_REWRITE_CHECK_BYTES, ending at _position), and the file's (size,
        # mtime) when last looked at: together they tell a file rewritten past our position from one that grew.
        self._tail = b""
        self._seen: tuple[int, int] | None = None
        self._link_reported = False
        self.rotations = 0
        self.symlinks_refused = 0

    @property
    def name(self) -> str:
        spec = self._path_spec
        return f"file log {os.fspath(spec) if not callable(spec) else '(from params)'}"

    def path_for(self, params: PipesParams) -> str:
        spec = self._path_spec
        return os.fspath(spec(params) if callable(spec) else spec)

    def target_is_readable(self, params: PipesParams) -> bool:
        return os.access(self.path_for(params), os.R_OK)

    def reset(self) -> None:
        self.release()
        self._position = 0
        self._link_reported = False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._identity = None

    def _open(self, path: str) -> bool:
        # Non-blocking: opening a FIFO without a writer would otherwise block this thread. No-follow: see the
        # class docstring.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP and os.path.islink(path):
                self._refuse_link(path)
                return False
            raise
        st = os.fstat(fd)
        self._fd, self._identity, self._position = fd, (st.st_dev, st.st_ino), 0
        self._seekable = stat.S_ISREG(st.st_mode)
        self._tail, self._seen = b"", None
        self._link_reported = False
        return True

    def _refuse_link(self, path: str) -> None:
        if self._link_reported:  # once per swap, not once per poll
            return
        self._link_reported = True
        self.symlinks_refused += 1
        try:
            link_target = os.readlink(path)
        except OSError:  # already gone again
            link_target = "?"
        logger.warning("[pipes] log reader %s: %s is now a symbolic link (to %s); it is not followed and its "
                       "target is not forwarded. If the link is yours, give the reader the resolved path "
                       "(os.path.realpath).", self.name, path, link_target)

    def _rewritten(self, st: os.stat_result) -> bool:
        """Was the file we hold truncated in place since the last read (it shrank, or the bytes before our
        position are no longer those we read: truncated and written again past it between two polls)?"""
        if st.st_size < self._position:
            return True
        seen = (st.st_size, st.st_mtime_ns)
        if seen == self._seen or not self._tail:
            return False
        self._seen = seen
        assert self._fd is not None
        return os.pread(self._fd, len(self._tail), self._position - len(self._tail)) != self._tail

    def _advance(self, data: bytes) -> bytes:
        self._position += len(data)
        if self._seekable:
            keep = LOG_REWRITE_CHECK_BYTES
            self._tail = data[-keep:] if len(data) >= keep else (self._tail + data)[-keep:]
        return data

    def read_chunk(self, params: PipesParams) -> bytes | None:
        path = self.path_for(params)
        if self._fd is None and not self._open(path):
            return None
        assert self._fd is not None
        if self._seekable and self._rewritten(os.fstat(self._fd)):  # truncated in place (copytruncate): start over
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._position, self._tail, self._seen = 0, b"", None
            self.rotations += 1
        try:
            data = os.read(self._fd, LOG_READ_BLOCK_BYTES)
        except BlockingIOError:  # a FIFO with nothing to read yet
            return None
        if data:
            return self._advance(data)
        # At the end of the file we hold: has the path moved on to a new file (or to a link, not followed)?
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None  # renamed away, no new file yet: the old one may still grow
        if (st.st_dev, st.st_ino) != self._identity:
            # Rotated. What was written to the old file before the new one appeared is read first.
            data = os.read(self._fd, LOG_READ_BLOCK_BYTES)
            if data:
                return self._advance(data)
            self.release()
            self.rotations += 1
            if self._open(path):
                return self.read_chunk(params)
        return None


class PipesBlobStoreLogReader(PipesChunkedLogReader):
    """Follows a log object in a blob store (rewritten as it grows, as cloud jobs do with their logs).

    Each poll downloads the object and forwards the bytes past what was already forwarded; an object that got
    shorter was replaced, and is forwarded again from its start. The object is held in memory while it is
    compared, so this suits logs of up to some hundreds of MB.

    Args:
        store: the bucket or container, e.g. ``pipes_ext.s3.S3BlobStore(client, bucket)``.
        key: the object's key, or a callable deriving it from the session's messages params.
        interval, target, drain_timeout: see :class:`PipesChunkedLogReader`.
        retry: backoff for transient store errors within one poll.
    """

    def __init__(
        self,
        store: PipesBlobStore,
        key: str | Callable[[PipesParams], str],
        *,
        interval: float = DEFAULT_BLOB_LOG_POLL_INTERVAL,
        target: PipesLogTarget = STREAM_STDOUT,
        drain_timeout: float = LOG_DRAIN_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> None:
        super().__init__(interval=interval, target=target, drain_timeout=drain_timeout)
        self.store = store
        self._key_spec = key
        self.retry = retry
        self._offset = 0
        self._pending = b""
        self.requests = 0

    @property
    def name(self) -> str:
        spec = self._key_spec
        return f"blob log {self.store.url(spec) if isinstance(spec, str) else self.store.url('(from params)')}"

    def key_for(self, params: PipesParams) -> str:
        spec = self._key_spec
        return spec(params) if callable(spec) else spec

    def reset(self) -> None:
        self._offset = 0
        self._pending = b""

    def read_chunk(self, params: PipesParams) -> bytes | None:
        if self._pending:  # the rest of the previous download, forwarded in blocks
            data, self._pending = self._pending[:LOG_READ_BLOCK_BYTES], self._pending[LOG_READ_BLOCK_BYTES:]
            return data
        key = self.key_for(params)

        def get() -> bytes | None:
            self.requests += 1
            return self.store.get(key)

        blob = self.retry.call(self.store, "reading the log", key, get)
        if blob is None:
            return None
        if len(blob) < self._offset:  # replaced by a shorter object: a new log
            self._offset = 0
        new = blob[self._offset :]
        self._offset = len(blob)
        data, self._pending = new[:LOG_READ_BLOCK_BYTES], new[LOG_READ_BLOCK_BYTES:]
        return data


class PipesLogReaderGroup:
    """The session's side: starts a message reader's log readers on ``opened`` and stops them at the end."""

    def __init__(self, log_readers: Sequence[PipesLogReader]) -> None:
        self.log_readers = tuple(log_readers)
        self.session_closed = threading.Event()
        self.params: Mapping[str, Any] = {}
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._started or self.session_closed.is_set():
                return
            self._started = True
        for reader in self.log_readers:
            try:
                reader.start(self.params, self.session_closed)
            except Exception:
                logger.exception("[pipes] log reader %s failed to start", reader.name)

    def stop(self, *, run_unstarted: bool = True) -> None:
        """Stop every reader after a last read. With ``run_unstarted``, readers that never started (no
        ``opened``: the process failed early) run once first, so its output is still forwarded."""
        if run_unstarted:
            self.start()
        self.session_closed.set()
        for reader in self.log_readers:
            try:
                reader.stop()
            except Exception:
                logger.exception("[pipes] log reader %s failed to stop", reader.name)

    def __iter__(self) -> Iterator[PipesLogReader]:
        return iter(self.log_readers)
