"""Waiting for a file to grow without burning CPU: inotify on Linux, adaptive polling elsewhere.

:class:`FileWatcher` offers ``wait(timeout)`` (returns when the file was written, when :meth:`wake` was
called, or after ``timeout``) and ``wake()``. On Linux it blocks in ``poll`` on an inotify descriptor and a
self-pipe, so a write wakes the reader within microseconds and an idle reader costs nothing. Where inotify is
not available it falls back to polling on an :class:`threading.Event`, starting fast after activity and
backing off while idle.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import sys
import threading

__all__ = ["FileWatcher", "InotifyGroup", "open_inotify", "POLL_MIN_SECONDS", "POLL_MAX_SECONDS"]

# Polling fallback: 1 ms right after data arrived, doubling while idle up to 50 ms. Latency stays low while a
# process is chatty and an idle reader wakes 20 times a second at most.
POLL_MIN_SECONDS = 0.001
POLL_MAX_SECONDS = 0.05

_IN_MODIFY = 0x00000002
_IN_CLOSE_WRITE = 0x00000008
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000


_LIBC: list[ctypes.CDLL | None] = []


def _load_libc() -> ctypes.CDLL | None:
    """libc, loaded once (the running program's own symbols: no library search, which would spawn processes)."""
    if not _LIBC:
        _LIBC.append(_find_libc())
    return _LIBC[0]


def _find_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1  # noqa: B018 - probe that the symbol exists
        libc.inotify_add_watch  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def open_inotify(path: str) -> int:
    """A non-blocking inotify descriptor watching ``path`` for writes (a group of one), or -1 where inotify is not
    available (or the user's instance limit is reached)."""
    group = InotifyGroup()
    if not group.open():
        return -1
    if group.add(path) < 0:
        group.close()
        return -1
    return group.fd


class InotifyGroup:
    """One inotify descriptor watching many files: the kernel allows few inotify instances per user
    (``fs.inotify.max_user_instances``, 128 by default) but many watches, so hundreds of readers in one event loop
    share one group. No I/O in the constructor; :meth:`open` sets it up. Not thread-safe (one loop uses it)."""

    def __init__(self) -> None:
        self.fd = -1
        self._libc: ctypes.CDLL | None = None

    def open(self) -> bool:
        """Create the descriptor (non-blocking); False where inotify is not available."""
        libc = _load_libc()
        if libc is None:
            return False
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return False
        self.fd, self._libc = int(fd), libc
        return True

    def add(self, path: str) -> int:
        """Watch ``path`` for writes; its watch descriptor (the same for the same file), or -1 on failure."""
        assert self._libc is not None, "open() first"
        return int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), _IN_MODIFY | _IN_CLOSE_WRITE))

    def remove(self, wd: int) -> None:
        if self._libc is not None and self.fd >= 0:
            self._libc.inotify_rm_watch(self.fd, wd)  # fails harmlessly for a file already gone

    def read_events(self) -> set[int]:
        """The watch descriptors with events since the last call (without blocking)."""
        wds: set[int] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return wds
            if not data:
                return wds
            offset = 0
            while offset + 16 <= len(data):  # struct inotify_event: int wd; uint32 mask, cookie, len; name[len]
                wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                wds.add(wd)
                offset += 16 + length

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class FileWatcher:
    """Wait for writes to one existing file; see the module docstring."""

    def __init__(self, path: str, *, use_inotify: bool = True) -> None:
        self.path = path
        self._inotify_fd = -1
        self._wake_r = -1
        self._wake_w = -1
        self._event = threading.Event()
        self._fd_lock = threading.Lock()  # wake() from another thread must not write to a closed, reused fd
        self._poll = POLL_MIN_SECONDS
        self._started = False
        self._use_inotify = use_inotify

    def start(self) -> None:
        """Set up the watch (the file must exist)."""
        self._started = True
        fd = open_inotify(self.path) if self._use_inotify else -1
        if fd < 0:
            return
        self._inotify_fd = fd
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    @property
    def uses_inotify(self) -> bool:
        return self._inotify_fd >= 0

    def data_seen(self) -> None:
        """Tell the polling fallback that data just arrived (poll fast again)."""
        self._poll = POLL_MIN_SECONDS

    def wait(self, timeout: float) -> None:
        """Block until the file is written, :meth:`wake` is called, or ``timeout`` seconds pass."""
        if self._inotify_fd >= 0:
            # poll(), not select(): a descriptor numbered past FD_SETSIZE (1024), in a process with many open
            # files, would make select() fail.
            poller = select.poll()
            poller.register(self._inotify_fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            for fd, _events in poller.poll(max(0.0, timeout) * 1000):
                try:
                    while os.read(fd, 65536):
                        pass
                except BlockingIOError:
                    pass
            return
        self._event.wait(min(timeout, self._poll))
        self._event.clear()
        self._poll = min(self._poll * 2, POLL_MAX_SECONDS)

    def wake(self) -> None:
        """Make a current or the next :meth:`wait` return at once (thread-safe)."""
        self._event.set()
        with self._fd_lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass

    def close(self) -> None:
        """Release the descriptors. Closing an inotify descriptor can take milliseconds in the kernel, so the
        reader calls this from its own thread after it has finished, not on the session's exit path."""
        with self._fd_lock:
            fds = [self._inotify_fd, self._wake_r, self._wake_w]
            self._inotify_fd = self._wake_r = self._wake_w = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
