"""Orchestrator-side errors. The tree is drawn in :mod:`pipes_ext._errors`; this module adds the branch for
a failed external process."""

from __future__ import annotations

import errno
import resource
from enum import Enum
from typing import TYPE_CHECKING, Any

from pipes_ext._errors import (
    PipesError,
    PipesProtocolError,
    PipesProtocolErrorKind,
    PipesTransportError,
    PipesUsageError,
    PipesWarning,
)

if TYPE_CHECKING:
    from pipes_core.protocol.results import PipesRemoteException

__all__ = [
    "PipesError",
    "PipesProtocolError",
    "PipesProtocolErrorKind",
    "PipesUsageError",
    "PipesTransportError",
    "PipesWarning",
    "PipesExecutionError",
    "PipesEngineErrorKind",
    "PipesTimeoutError",
    "PipesInterruptedError",
    "PipesResourceError",
    "descriptor_error",
]


class PipesEngineErrorKind(str, Enum):
    """Why a launcher's run failed, in one vocabulary for every engine (Docker, Ray, Slurm, the local process):
    the ``kind`` of a :class:`PipesExecutionError` (None when the process simply failed: a non-zero exit, a
    reported exception, a broken protocol). A member compares equal to its value.
    """

    UNREACHABLE = "unreachable"  # the engine (daemon, cluster, controller) cannot be reached
    REFUSED = "refused"  # the engine refused the submission (a bad option, an impossible request)
    IMAGE_MISSING = "image_missing"  # the container image is not there (and was not pulled)
    TOOL_MISSING = "tool_missing"  # the engine's command or SDK is not installed (sbatch, the docker extra)
    QUERY_FAILED = "query_failed"  # the engine stopped answering about a job that may still run
    OUT_OF_MEMORY = "out_of_memory"  # killed for memory (the OOM killer, Slurm OUT_OF_MEMORY)
    KILLED = "killed"  # killed by a signal
    TIMEOUT = "timeout"  # a time limit passed: the run's timeout_seconds, or the engine's own (Slurm TIMEOUT)
    CANCELLED = "cancelled"  # stopped from outside (scancel, stop_job, SIGTERM to the orchestrator)
    NODE_FAIL = "node_fail"  # the machine it ran on failed (Slurm NODE_FAIL, BOOT_FAIL)

    def __str__(self) -> str:
        return self.value


class PipesExecutionError(PipesError):
    """The external process failed: it could not start, exited non-zero, was killed, never opened the
    channel, or sent messages that broke the protocol.

    Attributes:
        exit_code: the process's return code (negative: killed by that signal), or None if it never ran.
        remote_exception: the exception the process reported in ``closed``, if any.
        invocation: the completed invocation (results, messages, issues), when the process ran.
        output_tail: the last bytes of the captured stdout/stderr, when they were captured.
        kind: why, when the engine said (a :class:`PipesEngineErrorKind`), else None.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        remote_exception: PipesRemoteException | None = None,
        invocation: Any = None,
        output_tail: str = "",
        kind: PipesEngineErrorKind | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code
        self.remote_exception = remote_exception
        self.invocation: Any = invocation
        self.output_tail = output_tail


class PipesTimeoutError(PipesExecutionError):
    """The external process ran past ``timeout_seconds`` and was terminated."""


class PipesInterruptedError(PipesExecutionError):
    """The orchestrator received SIGTERM while the external process ran; the process was terminated."""


class PipesResourceError(PipesExecutionError):
    """The run could not start: the orchestrator ran out of a system resource it needs (file descriptors). The
    message names what to do; nothing was launched and no temp file was left behind."""


def descriptor_error(exc: OSError, what: str) -> PipesResourceError | None:
    """A :class:`PipesResourceError` for ``exc`` when it says that descriptors ran out (EMFILE: this process;
    ENFILE: the whole system), saying that ``what`` could not be done and what to do; None for any other error."""
    if exc.errno == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return PipesResourceError(
            f"cannot {what}: this process has no free file descriptor (its limit is {soft}, RLIMIT_NOFILE); raise "
            "it (ulimit -n, resource.setrlimit) or run fewer sessions at once. Nothing was launched and no temp "
            "file was left behind")
    if exc.errno == errno.ENFILE:
        return PipesResourceError(
            f"cannot {what}: the system's table of open files is full (ENFILE); close files or raise "
            "fs.file-max, then retry. Nothing was launched and no temp file was left behind")
    return None
