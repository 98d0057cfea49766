"""Files the orchestrator creates at a path the user names (``PipesFileContextInjector``,
``PipesFileMessageReader``, ``pipes run --context-path/--messages-path``).

The rules, the same for both files:

* The file is created by the session, never reused: ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600 (set with
  ``fchmod``, so the umask cannot widen or narrow it). Any existing path is refused with one clear line, and
  left untouched: a regular file (it may be someone else's, or carry stale messages), a symbolic link (even a
  dangling one; following it could clobber its target), a FIFO, a device, a socket, a directory.
* A missing parent directory, or a parent that is not a directory, is refused the same way.
* At the end of the session the file is removed only if the path still names the very file the session
  created (same device and inode): a file someone put in its place is left alone.

Bad paths are the caller's fault and raise :class:`PipesUsageError`; an I/O failure the caller could not have
prevented (no space, read-only file system, ...) raises :class:`PipesTransportError`. Both happen before the
external process is launched.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass

from pipes_core.protocol.errors import descriptor_error
from pipes_ext._errors import PipesTransportError, PipesUsageError

__all__ = ["PRIVATE_FILE_MODE", "CreatedFile", "SessionPath", "create_private_file", "describe_path_kind",
           "remove_temp_dir"]

# Owner read/write only: the context carries the extras, and anyone who can write the messages file can forge
# results.
PRIVATE_FILE_MODE = 0o600

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "a regular file"),
)


def describe_path_kind(mode: int) -> str:
    """``"a directory"``, ``"a FIFO (named pipe)"``, ... for an ``st_mode``."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


class CreatedFile:
    """A file this session created: its path, an open descriptor and its identity, for a safe removal."""

    def __init__(self, path: str, fd: int, st: os.stat_result) -> None:
        self.path = path
        self.fd = fd
        self._identity = (st.st_dev, st.st_ino)

    def close_fd(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def remove(self) -> None:
        """Delete the path if it still names the file created here; otherwise leave whatever is there."""
        self.close_fd()
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity and stat.S_ISREG(st.st_mode):
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def create_private_file(path: str, what: str, *, readable: bool = False) -> CreatedFile:
    """Create ``path`` as a new, empty, 0600 regular file and return it open (write-only, or read-write with
    ``readable``). ``what`` names the file in errors, e.g. ``"the messages file"``.

    Raises:
        PipesUsageError: the path exists (whatever it is), its directory does not exist or is not a directory,
            permission denied.
        PipesTransportError: any other failure to create it.
    """
    if not path:
        raise PipesUsageError(f"{what}: the path is empty")
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise _creation_error(path, what, exc) from exc
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise PipesTransportError(f"cannot create {what} {path!r}: {exc.strerror}") from exc
    return CreatedFile(path, fd, st)


def _creation_error(path: str, what: str, exc: OSError) -> Exception:
    if exc.errno in (errno.EEXIST, errno.ELOOP, errno.EISDIR):
        try:
            kind = describe_path_kind(os.lstat(path).st_mode)
        except OSError:
            kind = "something"
        return PipesUsageError(
            f"{what} {path!r} already exists and is {kind}: the session creates this file itself (mode 0600) "
            "and never reuses, truncates or follows an existing path; remove it or choose a new path"
        )
    parent = os.path.dirname(path) or "."
    exhausted = descriptor_error(exc, f"create {what} {path!r}")
    if exhausted is not None:
        return exhausted
    if exc.errno == errno.ENOENT:
        return PipesUsageError(f"cannot create {what} {path!r}: the directory {parent!r} does not exist")
    if exc.errno == errno.ENOTDIR:
        return PipesUsageError(f"cannot create {what} {path!r}: a component of {parent!r} is not a directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PipesUsageError(f"cannot create {what} {path!r}: permission denied in {parent!r}")
    return PipesTransportError(f"cannot create {what} {path!r}: {exc.strerror or exc}")


@dataclass(frozen=True)
class SessionPath:
    """A path a session created on this machine for the external process (a context or messages file, or the
    private temp dir holding one), as the orphan guard of a local process removes it when the orchestrator
    dies (see :mod:`pipes_core.launch.subprocess`).

    Attributes:
        path: the file or directory.
        tree: a private temp dir of the session (0700, made by it): removed with whatever it holds. Otherwise a
            file at a path the user named: only that file is removed.
    """

    path: str
    tree: bool = False


def remove_temp_dir(path: str, *names: str) -> None:
    """Remove a private temp dir of the session that holds the files ``names`` (and possibly more).

    The known files are removed by name and the directory with ``rmdir``, which need no file descriptor: when
    the process has run out of them (the very failure that may be unwinding a session), ``shutil.rmtree``
    (which opens the directory to list it) would fail silently and leave the directory behind. Only a directory
    holding something else falls back to it.
    """
    for name in names:
        try:
            os.remove(os.path.join(path, name))
        except OSError:
            pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
