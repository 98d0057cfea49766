"""``PipesSlurmClient``: run a command as a Slurm batch job in a Pipes session.

No Python dependency: the client drives Slurm's own commands (``sbatch``, ``scontrol``, ``scancel`` and, when
accounting is enabled, ``sacct``), found on ``PATH`` or given in :class:`SlurmCommands` together with the
``SLURM_CONF`` to use. The lifecycle (session, output, timeout, termination, drain, verdict) is the launchers'
shared one, :class:`~pipes_core.PipesClient`.

Submission
    ``sbatch --parsable`` with the command as ``--wrap "exec COMMAND"`` (the shell ``exec``s it, so signals
    and the exit code are the command's own), or a batch script (its ``#SBATCH`` lines apply) with arguments.
    The client's and the run's ``sbatch_args`` are passed through as they are, after the client's own
    defaults, so they win: ``--no-requeue`` (a requeued job would run a second time into the same session;
    pass ``--requeue`` to allow it) and ``--output``/``--error`` files in a private directory (unless the
    arguments or the script's ``#SBATCH`` lines name their own).

Bootstrap
    With ``bootstrap="env"`` (default) ``DAGSTER_PIPES_CONTEXT`` / ``DAGSTER_PIPES_MESSAGES`` and the ``env``
    variables are set in ``sbatch``'s own environment, and ``--export=ALL`` carries them to the job; a user's own
    ``--export=NONE`` or list is kept and our names are appended without their values (``--export=NONE,NAME``).
    Slurm copies each value from the submitting environment, so no value ever appears on a command line:
    commas, ``=`` and newlines in values are safe (``--export=NAME=value`` would split a value at its commas).
    Names must be plain environment names (letters, digits, ``_``); anything else is refused. The limit is the
    OS's: 128 KiB per variable on Linux, so large extras need a file context injector on a shared directory.
    With ``bootstrap="cli"`` the params are appended to the command (or the script's arguments).

Channels
    Context: inline in the environment (:class:`PipesEnvContextInjector`) by default, which needs nothing
    shared with the node. Messages: a file in a private directory under ``shared_dir``, which must be on a
    filesystem that this process and the compute nodes share (NFS, Lustre, ...). Without ``shared_dir`` the
    directory is a local temp dir: that only works when the job runs on this machine (a one-node cluster).
    The reader does not rely on inotify to see the job's writes (inotify never sees writes made on another
    host): with ``shared_dir`` it polls, and otherwise its periodic re-read catches what inotify missed. Any
    reader works, e.g. ``PipesStdioMessageReader()`` reads the messages from the job's stdout file.

Output
    The job's stdout and stderr files are followed while it runs and forwarded to this process's
    stdout/stderr (or ``stdout``/``stderr``), and drained to their end once it has ended; with
    ``forward_stdio=False`` only their last bytes are kept, for error messages. Files in the client's private
    directory are removed after the run; files the user named are left alone.

Job states
    The state comes from ``scontrol show job`` while the controller remembers the job (``MinJobAge``), then
    from ``sacct`` when accounting is enabled. COMPLETED is success; FAILED gives the job's exit code (or the
    signal that killed it); CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, PREEMPTED, BOOT_FAIL and DEADLINE
    fail the run naming the state and Slurm's reason. Every state change is logged (logger ``pipes_core``,
    INFO), and passed to ``on_job_state``; a job still PENDING after ``pending_warning_seconds`` is logged as
    a WARNING with Slurm's reason. ``timeout_seconds`` counts from submission, so it covers a job stuck in the
    queue.

Termination
    On timeout, Ctrl-C or SIGTERM: ``scancel --full --signal=INT`` (a pending job is cancelled outright),
    after ``termination_timeout_seconds`` a plain ``scancel`` (SIGTERM, then Slurm's own SIGKILL after its
    ``KillWait``), then ``scancel --full --signal=KILL``; the client waits for the job's end, drains the
    channel and raises as the subprocess client does.

Errors
    ``sbatch`` missing, the controller not reachable and a refused submission (bad option, bad partition, a
    request no node can satisfy) raise :class:`PipesSlurmError` (a :class:`PipesExecutionError`) whose
    ``kind`` says which, with ``sbatch``'s own words.

Owner labels and durable runs (docs/launchers/slurm.md, "Durable runs")
    Every job carries who submitted it in its ``--comment`` (:func:`job_comment` of
    :func:`~pipes_core.launch.process.launch_labels`), which :meth:`PipesSlurmClient.sweep_orphans` reads. With a
    ``launch_key`` the job is named by the key (``--job-name``), its output files and a copy of its handle go into
    the run's directory (which the node must reach at the same path), and any client follows it again from the
    handle (:meth:`PipesSlurmClient.attach`); how it ended is Slurm's to say, so it is known after its
    orchestrator died for as long as Slurm knows the job (``MinJobAge``, or for ever with accounting).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, unquote

from pipes_core.channels.injectors import PipesContextInjector, PipesEnvContextInjector
from pipes_core.channels.readers import PipesMessageReader, PipesTempFileMessageReader
from pipes_core.launch.async_client import PipesAsyncClient, same_arguments_as
from pipes_core.launch.async_session import PipesAsyncTempFileMessageReader
from pipes_core.launch.client import (
    PipesClient,
    PipesClientCompletedInvocation,
    PipesExitStatus,
    PipesLaunchedProcess,
    PipesLaunchRequest,
    signal_name,
)
from pipes_core.launch.durable import recorded_end
from pipes_core.launch.local import command_name
from pipes_core.launch.options import RunOptions, Unpack, check_run_options, common_options, run_signature
from pipes_core.launch.process import DurableLaunch, launch_labels, orphan_owner
from pipes_core.launch.session import PipesSession
from pipes_core.protocol.errors import PipesEngineErrorKind, PipesExecutionError, PipesUsageError
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_core.protocol.lines import DEFAULT_MAX_LINE_BYTES
from pipes_core.protocol.run_context import PipesRunContext

__all__ = [
    "PipesSlurmClient",
    "PipesAsyncSlurmClient",
    "SlurmRunOptions",
    "PipesSlurmError",
    "PipesSlurmMessageReader",
    "SlurmCommands",
    "SlurmJobInfo",
    "slurm_exit_status",
    "parse_scontrol_job",
    "parse_sacct_line",
    "SLURM_ERROR_SBATCH_MISSING",
    "SLURM_ERROR_UNREACHABLE",
    "SLURM_ERROR_REFUSED",
    "SLURM_ERROR_QUERY",
    "ACTIVE_STATES",
    "FAILURE_STATES",
    "FORGOTTEN_STATE",
    "job_comment",
    "labels_from_comment",
    "DEFAULT_POLL_MIN_SECONDS",
    "DEFAULT_POLL_MAX_SECONDS",
    "DEFAULT_PENDING_WARNING_SECONDS",
    "COMMAND_TIMEOUT_SECONDS",
    "QUERY_FAILURE_GRACE_SECONDS",
    "OUTPUT_POLL_SECONDS",
]

logger = logging.getLogger("pipes_core")

# The job's state is asked of the controller this often right after submission and again as soon as the job
# sent ``closed`` (it is about to end): short jobs are seen to end quickly ...
DEFAULT_POLL_MIN_SECONDS = 0.1
# ... and the interval grows by half each time up to this while it runs: one cheap ``scontrol`` query every
# 2 s keeps the load on a shared controller low.
DEFAULT_POLL_MAX_SECONDS = 2.0
POLL_GROWTH = 1.5
# After the job sent ``closed`` its state is asked every DEFAULT_POLL_MIN_SECONDS for this long (the end is
# near: a Pipes-aware job is seen to end within ~0.1 s), then the interval grows again.
CLOSED_FAST_POLL_SECONDS = 10.0
# While waiting between two queries, whether ``closed`` has arrived is looked at this often (no query involved).
CLOSED_CHECK_SECONDS = 0.05
# A job still PENDING this long is logged as a WARNING with Slurm's reason (it may wait for hours).
DEFAULT_PENDING_WARNING_SECONDS = 60.0
# A Slurm command that has not answered after this long is given up (they retry for about 10 s themselves
# when the controller does not answer).
COMMAND_TIMEOUT_SECONDS = 120.0
# While a job runs, failing state queries are retried this long (a controller restart or fail-over) before
# the run gives up on the job, which may still be running: its id is in the error.
QUERY_FAILURE_GRACE_SECONDS = 120.0
# The job's output files are re-read this often while it runs (the node writes them; inotify would not see a
# writer on another host).
OUTPUT_POLL_SECONDS = 0.2
OUTPUT_READ_BYTES = 64 * 1024

# Error kinds of PipesSlurmError: the engines' shared ones (PipesEngineErrorKind).
SLURM_ERROR_SBATCH_MISSING = PipesEngineErrorKind.TOOL_MISSING
SLURM_ERROR_UNREACHABLE = PipesEngineErrorKind.UNREACHABLE
SLURM_ERROR_REFUSED = PipesEngineErrorKind.REFUSED
SLURM_ERROR_QUERY = PipesEngineErrorKind.QUERY_FAILED

# The job has not ended yet in these states (the base name, without "+" flags or "by UID").
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE", "UPDATE_DB",
})
# Not a Slurm state, ours: a durable run's job that Slurm no longer knows (the controller forgets an ended job after
# its MinJobAge) and that accounting has no record of: it has ended, how is lost.
FORGOTTEN_STATE: Final = "FORGOTTEN"
# Ended states that are not plain exits, with what they mean (worded to follow "the Slurm job 12 ...").
FAILURE_STATES = {
    "CANCELLED": "was cancelled",
    "TIMEOUT": "ran past its Slurm time limit",
    "OUT_OF_MEMORY": "ran out of memory",
    "NODE_FAIL": "lost its node (node failure)",
    "PREEMPTED": "was preempted",
    "BOOT_FAIL": "never started: its node failed to boot",
    "DEADLINE": "missed its deadline",
    "REVOKED": "was revoked (it ran on another cluster of a federation)",
    "SPECIAL_EXIT": "ended in the special-exit state (requeued and held)",
    FORGOTTEN_STATE: ("ended, but Slurm no longer says how: its controller forgot the job (MinJobAge) and accounting "
                      "has no record of it (turn accounting on, or raise MinJobAge, where orchestrators may be away "
                      "that long)"),
}
# The engines' shared kind of each failure state (PipesEngineErrorKind); any other: killed.
STATE_KINDS = {
    "CANCELLED": PipesEngineErrorKind.CANCELLED,
    "TIMEOUT": PipesEngineErrorKind.TIMEOUT,
    "DEADLINE": PipesEngineErrorKind.TIMEOUT,
    "OUT_OF_MEMORY": PipesEngineErrorKind.OUT_OF_MEMORY,
    "NODE_FAIL": PipesEngineErrorKind.NODE_FAIL,
    "BOOT_FAIL": PipesEngineErrorKind.NODE_FAIL,
    "PREEMPTED": PipesEngineErrorKind.CANCELLED,
    "REVOKED": PipesEngineErrorKind.CANCELLED,
    FORGOTTEN_STATE: PipesEngineErrorKind.QUERY_FAILED,
}
_NOT_A_REASON = ("None", "(null)", "")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# scontrol's one-value-per-line fields (their values may contain spaces).
_WHOLE_LINE_FIELDS = ("Command", "WorkDir", "StdErr", "StdIn", "StdOut", "Comment", "Reason", "AdminComment")
_UNREACHABLE_MARKERS = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
                        "Zero Bytes were transmitted or received", "Communication connection failure",
                        "Could not establish a configuration source", "Unable to establish controller")
_UNKNOWN_JOB_MARKER = "Invalid job id specified"
_NO_ACCOUNTING_MARKER = "accounting storage is disabled"
# squeue prints this for a job without a comment.
_NO_COMMENT = "(null)"

# A durable run's job (README "Durable runs"): its handle's fields, what a client in another process needs to
# follow it (the commands and SLURM_CONF it was submitted with included) ...
HANDLE_JOB_ID: Final = "job_id"
HANDLE_NAME: Final = "name"
HANDLE_STDOUT: Final = "stdout"
HANDLE_STDERR: Final = "stderr"
HANDLE_COMMANDS: Final = "commands"
HANDLE_DESCRIPTION: Final = "description"
# ... and its files in the run directory, each named by the job id: its output (slurm-ID.out, slurm-ID.err, unless
# the run names its own) and a copy of its handle (slurm-ID.json, written once sbatch answered). A job named by the
# key that left none of them there was launched for an earlier run with the key (forgotten since), not this one.
JOB_FILE_PATTERN: Final = "slurm-%j.{}"
_JOB_FILE = re.compile(r"slurm-(\d+)\.(?:out|err|json)\Z")


def job_comment(labels: Mapping[str, str]) -> str:
    """A job's ``--comment`` carrying ``labels`` (:func:`pipes_core.launch.process.launch_labels`):
    ``name=value`` pairs joined by ``,``, each value percent-encoded (Slurm keeps a comment as given, newlines
    included; ``,`` and ``=`` are the separators)."""
    return ",".join(f"{name}={quote(value, safe='')}" for name, value in labels.items())


def labels_from_comment(comment: str) -> dict[str, str]:
    """The labels of a job's comment (:func:`job_comment`); words that are not ``name=value`` are skipped."""
    labels: dict[str, str] = {}
    for word in comment.split(","):
        name, sep, value = word.partition("=")
        if sep and name.strip():
            labels[name.strip()] = unquote(value.strip())
    return labels


class PipesSlurmError(PipesExecutionError):
    """Slurm itself failed us: ``kind`` is one of ``tool_missing`` (sbatch), ``unreachable`` (the controller),
    ``refused`` (the submission), ``query_failed`` (a :class:`~pipes_core.PipesEngineErrorKind`); ``stderr``
    holds the command's own words; ``job_id`` is set when a job had been submitted."""

    def __init__(self, message: str, *, kind: PipesEngineErrorKind, stderr: str = "", job_id: str | None = None
                 ) -> None:
        super().__init__(message, kind=kind)
        self.stderr = stderr
        self.job_id = job_id


# ---------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class SlurmCommands:
    """Where Slurm's commands are and which cluster they talk to.

    Attributes:
        sbatch / scontrol / scancel / squeue: the programs (names on ``PATH`` or paths).
        sacct: the accounting command, asked about jobs the controller has forgotten; None never asks.
        slurm_conf: ``SLURM_CONF`` for every command (and the job, through ``--export=ALL``); None keeps the
            environment's (or Slurm's default).
        env: more environment for the commands (e.g. ``SLURM_CLUSTERS``).
        timeout_seconds: a command still running after this long is given up.
    """

    sbatch: str = "sbatch"
    scontrol: str = "scontrol"
    scancel: str = "scancel"
    squeue: str = "squeue"
    sacct: str | None = "sacct"
    slurm_conf: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: float = COMMAND_TIMEOUT_SECONDS

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, **self.env, **(extra or {})}
        if self.slurm_conf is not None:
            env["SLURM_CONF"] = self.slurm_conf
        return env

    def to_handle(self) -> dict[str, Any]:
        """The commands and the cluster (``SLURM_CONF`` as the commands see it, from the environment too) in a
        durable job's handle: a client in another process follows the job with these (:meth:`from_handle`)."""
        return {"sbatch": self.sbatch, "scontrol": self.scontrol, "scancel": self.scancel, "squeue": self.squeue,
                "sacct": self.sacct, "slurm_conf": self.environ().get("SLURM_CONF"), "env": dict(self.env)}

    def from_handle(self, data: Mapping[str, Any] | None) -> SlurmCommands:
        """These commands with those a handle recorded (:meth:`to_handle`): the job's cluster is the one it was
        submitted to, whatever this client was given."""
        known = ("sbatch", "scontrol", "scancel", "squeue", "sacct", "slurm_conf", "env")
        return replace(self, **{name: value for name, value in (data or {}).items() if name in known})

    def call(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run one command; raises FileNotFoundError/PermissionError when it cannot start."""
        try:
            return subprocess.run(list(argv), env=self.environ(env), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, errors="replace", timeout=self.timeout_seconds)
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            return subprocess.CompletedProcess(list(argv), -1, "", f"timed out after {self.timeout_seconds} s. "
                                               f"{stderr}")


# ---------------------------------------------------------------------------------------------- job state


@dataclass(frozen=True)
class SlurmJobInfo:
    """What Slurm says about a job.

    Attributes:
        job_id: the id ``sbatch`` printed.
        state: the base state name (``RUNNING``, ``FAILED``...), without flags or "by UID".
        reason: Slurm's reason (why pending, why failed), or "".
        exit_code / signal: the two halves of Slurm's ``ExitCode=N:S``, None when not given.
        stdout_path / stderr_path: the job's output files (from ``scontrol``; None from ``sacct``).
        source: ``"scontrol"`` or ``"sacct"``.
        fields: every field as Slurm printed it.
    """

    job_id: str
    state: str
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None
    source: str = "scontrol"
    fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state not in ACTIVE_STATES

    @property
    def pending(self) -> bool:
        return self.state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD")

    def describe(self) -> str:
        """``PENDING (Resources)``."""
        return f"{self.state} ({self.reason})" if self.reason else self.state


def _base_state(raw: str) -> str:
    # "CANCELLED by 0", "COMPLETING+", "RUNNING+SIGNALING": the first word, up to any "+".
    return raw.strip().split(" ", 1)[0].split("+", 1)[0].upper()


def _exit_pair(raw: str | None) -> tuple[int | None, int | None]:
    if not raw:
        return None, None
    code, _, sig = raw.partition(":")
    try:
        return int(code), (int(sig) if sig else None)
    except ValueError:
        return None, None


def _reason(raw: str | None) -> str:
    return "" if raw is None or raw in _NOT_A_REASON else raw


def parse_scontrol_job(text: str) -> dict[str, str]:
    """The fields of ``scontrol show job ID`` (multi-line form) as a dict. Paths and commands keep their
    spaces: scontrol prints each of those fields alone on its line."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if sep and key in _WHOLE_LINE_FIELDS:
            fields[key] = value
            continue
        for token in line.split(" "):
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
            elif fields and token:  # a value with a space on a shared line: glue it back
                last = next(reversed(fields))
                fields[last] += " " + token
    return fields


def _info_from_scontrol(job_id: str, text: str) -> SlurmJobInfo:
    fields = parse_scontrol_job(text)
    code, sig = _exit_pair(fields.get("ExitCode"))
    return SlurmJobInfo(
        job_id=job_id, state=_base_state(fields.get("JobState", "UNKNOWN")), reason=_reason(fields.get("Reason")),
        exit_code=code, signal=sig, stdout_path=fields.get("StdOut") or None,
        stderr_path=fields.get("StdErr") or None, source="scontrol", fields=fields,
    )


# sacct is asked for these fields, in this order, with -P (| separated).
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Reason")


def parse_sacct_line(job_id: str, text: str) -> SlurmJobInfo | None:
    """The job's allocation line of ``sacct -X -n -P -o JobID,State,ExitCode,Reason -j ID``; None when absent."""
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < len(SACCT_FIELDS) or parts[0].strip() != job_id:
            continue
        fields = dict(zip(SACCT_FIELDS, (part.strip() for part in parts), strict=False))
        code, sig = _exit_pair(fields["ExitCode"])
        return SlurmJobInfo(job_id=job_id, state=_base_state(fields["State"]), reason=_reason(fields["Reason"]),
                            exit_code=code, signal=sig, source="sacct", fields=fields)
    return None


def slurm_exit_status(info: SlurmJobInfo) -> PipesExitStatus:
    """How an ended job ended, in the launchers' terms.

    COMPLETED: exit code 0. FAILED: the job's exit code, or -N when signal N killed it (then ``killed``); a
    failure with neither (the job never launched) has no exit code and says so. Every state of
    :data:`FAILURE_STATES`: ``killed``, the signal as exit code when Slurm gives one, and the state named.
    """
    reason = f", reason: {info.reason}" if info.reason else ""
    if info.state == "COMPLETED":
        return PipesExitStatus(info.exit_code or 0)
    if info.state == "FAILED":
        if info.signal:
            return PipesExitStatus(-info.signal, killed=True,
                                   description=f"was killed by {signal_name(info.signal)} (job state FAILED{reason})",
                                   kind=PipesEngineErrorKind.KILLED)
        if info.exit_code:
            return PipesExitStatus(info.exit_code, description=f"job state FAILED{reason}")
        return PipesExitStatus(None, description=f"failed without an exit code (job state FAILED{reason})")
    what = FAILURE_STATES.get(info.state, "ended")
    by = f", signal {signal_name(info.signal)}" if info.signal else ""
    return PipesExitStatus(-info.signal if info.signal else None, killed=True,
                           description=f"{what} (job state {info.state}{reason}{by})",
                           kind=STATE_KINDS.get(info.state, PipesEngineErrorKind.KILLED))


# ---------------------------------------------------------------------------------------------- the job


class _JobOutput:
    """One of the job's output files, followed as an iterable of byte chunks until the job has ended and the file
    has been read to its end. The path may be known only after the first state query (a user's ``--output``)."""

    def __init__(self, job: _SlurmJob, stream: str) -> None:
        self._job = job
        self._stream = stream

    def _path(self) -> str | None:
        return self._job.output_path(self._stream)

    def __iter__(self) -> Iterator[bytes]:
        job = self._job
        fd = -1
        try:
            while True:
                ended = job.ended_event.is_set()  # read before reading: what follows is then complete
                path = self._path()
                if fd < 0 and path is not None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError:
                        fd = -1
                if fd >= 0:
                    while True:
                        block = os.read(fd, OUTPUT_READ_BYTES)
                        if not block:
                            break
                        yield block
                if ended or job.closing.is_set():
                    return
                job.ended_event.wait(OUTPUT_POLL_SECONDS)
        finally:
            if fd >= 0:
                os.close(fd)


class _AsyncJobOutput:
    """The asyncio twin of :class:`_JobOutput`: the same file followed from the loop (reads of a regular file
    do not block for long; between them a loop timer), no thread."""

    def __init__(self, job: _SlurmJob, stream: str) -> None:
        self._job = job
        self._stream = stream
        self._fd = -1

    async def read(self, size: int = OUTPUT_READ_BYTES) -> bytes:
        job = self._job
        while True:
            ended = job.ended_event.is_set()  # read before reading: what follows is then complete
            path = job.output_path(self._stream)
            if self._fd < 0 and path is not None:
                try:
                    self._fd = os.open(path, os.O_RDONLY)
                except OSError:
                    self._fd = -1
            if self._fd >= 0:
                block = os.read(self._fd, OUTPUT_READ_BYTES)
                if block:
                    return block
            if ended or job.closing.is_set():
                self.close()
                return b""
            await asyncio.sleep(OUTPUT_POLL_SECONDS)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _SlurmJob(PipesLaunchedProcess):
    """A submitted batch job, as the lifecycle drives it: submitted here (with the run's ``session``), or a durable
    run's job followed again from its handle (no session: :meth:`PipesSlurmClient.attach`)."""

    def __init__(
        self,
        commands: SlurmCommands,
        job_id: str,
        what: str,
        *,
        session: PipesSession | None,
        output_paths: dict[str, str | None],
        own_dir: str | None,
        poll_min_seconds: float,
        poll_max_seconds: float,
        pending_warning_seconds: float | None,
        on_job_state: Callable[[SlurmJobInfo], None] | None,
        handle: dict[str, Any] | None = None,
        ended_status: PipesExitStatus | None = None,
    ) -> None:
        self.commands = commands
        self.job_id = job_id
        self.description = f"the Slurm job {job_id} ({what})"
        self.session = session
        self._output_paths = output_paths
        self._own_dir = own_dir
        self._poll_min = poll_min_seconds
        self._poll_max = poll_max_seconds
        self.poll_interval_seconds = poll_min_seconds  # the asyncio driver's backoff between state queries
        self.max_poll_interval_seconds = poll_max_seconds
        self._pending_warning = pending_warning_seconds
        self._on_job_state = on_job_state
        self.info: SlurmJobInfo | None = None
        self.history: list[SlurmJobInfo] = []  # one entry per state change
        self.ended_event = threading.Event()
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._submitted = time.monotonic()
        self._last_query = -1.0
        self._failing_since: float | None = None
        self._warned_pending = False
        self._wake = threading.Event()
        # A durable run's job: its handle, and how it ended when a run saw its end before (then Slurm is not asked).
        self._handle = handle
        self._ended_status = ended_status
        if ended_status is not None:
            self.ended_event.set()
        self.stdout = _JobOutput(self, "stdout")
        same = output_paths.get("stdout") is not None and output_paths.get("stdout") == output_paths.get("stderr")
        self.stderr = None if same else _JobOutput(self, "stderr")

    # ------------------------------------------------------------------ state

    def handle(self) -> dict[str, Any]:
        if self._handle is None:
            return super().handle()  # not submitted for a durable run: it has none
        return dict(self._handle)

    def _opened(self) -> bool:
        return self.session is not None and self.session.opened

    def _closed(self) -> bool:
        return self.session is not None and self.session.closed

    def open_async_streams(self) -> dict[str, _AsyncJobOutput]:
        """Its output files followed from an event loop (the async client's), instead of a thread each."""
        streams = {"stdout": _AsyncJobOutput(self, "stdout")}
        if self.stderr is not None:
            streams["stderr"] = _AsyncJobOutput(self, "stderr")
        return streams

    def output_path(self, stream: str) -> str | None:
        path = self._output_paths.get(stream)
        if path is not None:
            return path
        info = self.info
        if info is None or info.source != "scontrol":
            return None
        path = info.stdout_path if stream == "stdout" else info.stderr_path
        if stream == "stderr" and path is not None and path == info.stdout_path:
            return None  # one file for both: forwarded once, as stdout
        return path

    def query(self) -> SlurmJobInfo | None:
        """Ask Slurm once: ``scontrol show job``, then ``sacct`` when the controller no longer knows the job.
        Returns None when the answer is not available (yet); raises once queries fail past the grace period."""
        with self._lock:
            self._last_query = time.monotonic()
            try:
                shown = self.commands.call([self.commands.scontrol, "show", "job", self.job_id])
            except OSError as exc:  # nothing to wait for: scontrol will not appear within a grace period
                raise PipesSlurmError(
                    f"cannot learn the state of {self.description}: {self.commands.scontrol!r} cannot run ({exc}); "
                    f"the job may still be running (scancel {self.job_id})",
                    kind=SLURM_ERROR_QUERY, stderr=str(exc), job_id=self.job_id,
                ) from exc
            info: SlurmJobInfo | None = None
            problem = ""
            if shown.returncode == 0 and "JobState=" in shown.stdout:
                info = _info_from_scontrol(self.job_id, shown.stdout)
            elif _UNKNOWN_JOB_MARKER in shown.stderr:
                info, problem = self._query_sacct()
                if info is None and self._handle is not None:  # a durable job, ended long ago: how is lost
                    info = SlurmJobInfo(job_id=self.job_id, state=FORGOTTEN_STATE, source="none")
            else:
                problem = (shown.stderr or shown.stdout).strip() or f"scontrol exited with {shown.returncode}"
            if info is None:
                self._query_failed(problem)
                return None
            self._failing_since = None
            self._update(info)
            return info

    def _query_sacct(self) -> tuple[SlurmJobInfo | None, str]:
        forgotten = f"the controller no longer knows job {self.job_id} (MinJobAge passed)"
        if self.commands.sacct is None:
            return None, f"{forgotten} and sacct is not to be asked (SlurmCommands.sacct=None)"
        try:
            acct = self.commands.call([self.commands.sacct, "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS),
                                       "-j", self.job_id])
        except OSError as exc:
            return None, f"{forgotten}, and sacct cannot run: {exc}"
        info = parse_sacct_line(self.job_id, acct.stdout) if acct.returncode == 0 else None
        if info is None:
            said = (acct.stderr or acct.stdout).strip() or "no record"
            return None, f"{forgotten}, and sacct has no record of it: {said}"
        return info, ""

    def _query_failed(self, problem: str) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            logger.warning("[pipes] asking Slurm about job %s failed (retrying for up to %.0f s): %s", self.job_id,
                           QUERY_FAILURE_GRACE_SECONDS, problem)
        elif now - self._failing_since >= QUERY_FAILURE_GRACE_SECONDS:
            raise PipesSlurmError(
                f"cannot learn the state of {self.description} for {now - self._failing_since:.0f} s; it may "
                f"still be running (scancel {self.job_id}): {problem}",
                kind=SLURM_ERROR_QUERY, stderr=problem, job_id=self.job_id,
            )

    def _update(self, info: SlurmJobInfo) -> None:
        previous = self.info
        self.info = info
        if previous is None or (previous.state, previous.reason) != (info.state, info.reason):
            self.history.append(info)
            logger.info("[pipes] %s is %s", self.description, info.describe())
            if self._on_job_state is not None:
                try:
                    self._on_job_state(info)
                except Exception:
                    logger.exception("[pipes] on_job_state raised; the run goes on")
        if info.pending and not self._warned_pending and self._pending_warning is not None:
            waited = time.monotonic() - self._submitted
            if waited >= self._pending_warning:
                self._warned_pending = True
                logger.warning("[pipes] %s has been PENDING for %.0f s (reason: %s)", self.description, waited,
                               info.reason or "none given")
        if info.ended:
            self.ended_event.set()

    # ------------------------------------------------------------------ lifecycle hooks

    def poll(self) -> bool:
        if self.ended_event.is_set():
            return True
        if time.monotonic() - self._last_query >= self._poll_min:
            self.query()
        return self.ended_event.is_set()

    def wait(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = self._poll_min
        closed_at: float | None = None
        while True:
            if self.ended_event.is_set():
                return True
            self.query()
            if self.ended_event.is_set():
                return True
            if self._closed():
                # The job sent `closed`: it is about to end. Look often for a while, then back off again.
                now = time.monotonic()
                if closed_at is None:
                    closed_at = now
                if now - closed_at < CLOSED_FAST_POLL_SECONDS:
                    interval = self._poll_min
            pause = interval
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                pause = min(pause, left)
            self._pause(pause, watch_closed=closed_at is None)
            interval = min(interval * POLL_GROWTH, self._poll_max)

    def _pause(self, seconds: float, *, watch_closed: bool) -> None:
        """Sleep up to ``seconds``; wake early on :meth:`_scancel` and, until it has come, on ``closed`` (looked
        at every :data:`CLOSED_CHECK_SECONDS`, which costs no query), after which the end comes soon."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            if self._wake.wait(min(left, CLOSED_CHECK_SECONDS) if watch_closed else left):
                self._wake.clear()
                return
            if watch_closed and self._closed():
                return

    def exit_status(self) -> PipesExitStatus:
        if self._ended_status is not None:
            return self._ended_status
        if self.info is None or not self.info.ended:
            return PipesExitStatus(None, description="ended in an unknown Slurm state")
        return slurm_exit_status(self.info)

    def _scancel(self, *options: str) -> None:
        try:
            done = self.commands.call([self.commands.scancel, *options, self.job_id])
        except OSError as exc:
            logger.error("[pipes] cannot run scancel for job %s: %s", self.job_id, exc)
            return
        if done.returncode != 0 and not self.ended_event.is_set():
            logger.warning("[pipes] scancel %s %s: %s", " ".join(options), self.job_id,
                           (done.stderr or done.stdout).strip())
        self._wake.set()

    def interrupt(self) -> None:
        if self.ended_event.is_set():
            return
        if not self._opened() and (self.info is None or self.info.pending):
            try:
                self.query()  # the last answer may be old: the job may have started since
            except PipesSlurmError:
                pass
        if self.ended_event.is_set():
            return
        if not self._opened() and (self.info is None or self.info.pending):
            self._scancel()  # nothing runs yet: nothing to interrupt gracefully
        else:
            self._scancel("--full", "--signal=INT")

    def terminate(self) -> None:
        if not self.ended_event.is_set():
            self._scancel()

    def kill(self) -> None:
        if not self.ended_event.is_set():
            self._scancel("--full", "--signal=KILL")

    def close(self) -> None:
        self.closing.set()
        self.ended_event.set()  # any output follower still waiting stops
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the reader


class PipesSlurmMessageReader(PipesTempFileMessageReader):
    """The Slurm client's default message reader: a messages file in a fresh private directory (0700; file
    0600) under ``shared_dir``, removed after the session.

    ``shared_dir`` must be on a filesystem the compute nodes share with this process; None makes a local temp
    dir, which only works when the job runs on this machine. ``use_inotify`` defaults to False when a
    ``shared_dir`` is given: the job writes from another host, which inotify cannot see, so the reader polls.
    """

    def __init__(self, shared_dir: str | os.PathLike[str] | None = None, *, include_stdio_in_messages: bool = False,
                 use_inotify: bool | None = None, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.shared_dir = None if shared_dir is None else os.fspath(shared_dir)
        super().__init__(include_stdio_in_messages=include_stdio_in_messages, dir=self.shared_dir,
                         use_inotify=self.shared_dir is None if use_inotify is None else use_inotify,
                         max_line_bytes=max_line_bytes)

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        if self.shared_dir is not None and not os.path.isdir(self.shared_dir):
            raise PipesUsageError(f"shared_dir {self.shared_dir!r} is not a directory")
        with super().read_messages(handler) as params:
            yield params

    def describe(self) -> str:
        where = self.shared_dir or "a local temp dir (one node only)"
        return f"the Slurm messages file under {where}"

    def async_twin(self) -> PipesAsyncTempFileMessageReader | None:
        """Its asyncio twin (an async Slurm client's session): the same file, followed from the loop; None for a
        subclass that reads its own way (it keeps its reading, on a thread)."""
        if type(self).read_messages is not PipesSlurmMessageReader.read_messages:
            return None
        return _AsyncSlurmMessageReader(self)

    def no_messages_debug_text(self) -> str:
        text = f"Messages were expected through {self.describe()}."
        if self.shared_dir is None:
            text += (" Without shared_dir the file is on this machine: a job running on another node cannot "
                     "write it; pass a directory the nodes share.")
        return text


class _AsyncSlurmMessageReader(PipesAsyncTempFileMessageReader):
    """The asyncio twin of a :class:`PipesSlurmMessageReader`: its settings, its checks and its words."""

    def __init__(self, reader: PipesSlurmMessageReader) -> None:
        super().__init__(reader.include_stdio_in_messages, reader.dir, log_readers=reader.log_readers,
                         use_inotify=reader.use_inotify, max_line_bytes=reader.max_line_bytes)
        self.reader = reader

    @asynccontextmanager
    async def aread_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        if self.reader.shared_dir is not None and not os.path.isdir(self.reader.shared_dir):
            raise PipesUsageError(f"shared_dir {self.reader.shared_dir!r} is not a directory")
        async with super().aread_messages(handler) as params:
            yield params

    def describe(self) -> str:
        return self.reader.describe()

    def no_messages_debug_text(self) -> str:
        return self.reader.no_messages_debug_text()


# ---------------------------------------------------------------------------------------------- the client


def _option_names(args: Sequence[str]) -> set[str]:
    names = set()
    for arg in args:
        if arg.startswith("--"):
            names.add(arg[2:].split("=", 1)[0])
        elif arg.startswith("-") and len(arg) >= 2:
            names.add(arg[1])
    return names


def _script_option_names(path: str) -> set[str]:
    """The options of a batch script's ``#SBATCH`` lines (read until the first command, as sbatch does)."""
    names: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f):
                stripped = line.strip()
                if number == 0 and stripped.startswith("#!"):
                    continue
                if stripped.startswith("#SBATCH"):
                    names |= _option_names(shlex.split(stripped[len("#SBATCH"):], comments=True))
                elif stripped and not stripped.startswith("#"):
                    break
    except (OSError, ValueError):
        pass
    return names


_OUTPUT_OPTIONS = frozenset({"output", "o", "error", "e"})


def _merge_export(args: list[str], names: Sequence[str]) -> list[str]:
    """``args`` with our variable names appended to the user's last ``--export``, or ``--export=ALL``.

    Plain ``ALL`` already carries our variables (they are in sbatch's environment), and anything other than
    exactly ``ALL`` makes slurmd load the user's login environment first (about 1 s per job here)."""
    merged = list(args)
    for i in range(len(merged) - 1, -1, -1):
        arg = merged[i]
        if arg.startswith("--export="):
            merged[i] = ",".join([arg, *names])
            return merged
        if arg == "--export" and i + 1 < len(merged):
            merged[i + 1] = ",".join([merged[i + 1], *names])
            return merged
    return [*merged, "--export=ALL"]


def _classify_refusal(stderr: str) -> PipesEngineErrorKind:
    return SLURM_ERROR_UNREACHABLE if any(marker in stderr for marker in _UNREACHABLE_MARKERS) else SLURM_ERROR_REFUSED


class SlurmRunOptions(RunOptions, total=False):
    """The options of :meth:`PipesSlurmClient.run` (and its asyncio twin's): its own, then the
    :class:`~pipes_core.RunOptions`.

    Keys:
        command: a list, or a string split with :func:`shlex.split` (exactly one of ``command`` and ``script``).
        script: a batch script's path, with ``script_args``.
        script_args: the batch script's arguments.
        sbatch_args: added after the client's.
        env: environment variables for this job, added to the client's.
        on_job_state: receives a :class:`SlurmJobInfo` at each state change.
    """

    command: str | Sequence[str] | None
    script: str | os.PathLike[str] | None
    script_args: Sequence[str]
    sbatch_args: Sequence[str]
    env: Mapping[str, str] | None
    on_job_state: Callable[[SlurmJobInfo], None] | None


class PipesSlurmClient(PipesClient):
    """Runs a command (or a batch script) as a Slurm batch job in a Pipes session; see the module doc.

    Args:
        shared_dir: a directory on a filesystem shared by this process and the compute nodes; the messages
            file and the job's output files go into private directories under it, removed after the run.
            None: local temp dirs, which only work when jobs run on this machine.
        sbatch_args: options for every submission (``--partition=debug``, ``--time=10``...), passed through.
        env: environment variables for every job (exported by name; any value is safe).
        commands: the Slurm commands and ``SLURM_CONF``; default: found on ``PATH``.
        context_injector: default :class:`PipesEnvContextInjector` (the context travels in the job's
            environment; nothing shared needed).
        message_reader: default :class:`PipesSlurmMessageReader` under ``shared_dir``.
        forward_termination / forward_stdio / termination_timeout_seconds / strict / bootstrap: as for every
            :class:`PipesClient`; ``termination_timeout_seconds`` is the grace between ``scancel
            --signal=INT`` and ``scancel``.
        poll_interval_seconds: the longest pause between two state queries while the job runs.
        pending_warning_seconds: log a WARNING when the job is still pending after this long (None: never).
    """

    def __init__(
        self,
        *,
        shared_dir: str | os.PathLike[str] | None = None,
        sbatch_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        commands: SlurmCommands | None = None,
        context_injector: PipesContextInjector | None = None,
        message_reader: PipesMessageReader | None = None,
        forward_termination: bool = True,
        forward_stdio: bool = True,
        termination_timeout_seconds: float = 20,
        strict: bool = True,
        bootstrap: str = "env",
        poll_interval_seconds: float = DEFAULT_POLL_MAX_SECONDS,
        pending_warning_seconds: float | None = DEFAULT_PENDING_WARNING_SECONDS,
    ) -> None:
        super().__init__(context_injector=context_injector, message_reader=message_reader,
                         forward_termination=forward_termination, forward_stdio=forward_stdio,
                         termination_timeout_seconds=termination_timeout_seconds, strict=strict, bootstrap=bootstrap)
        if isinstance(sbatch_args, str):
            raise PipesUsageError("sbatch_args must be a sequence of arguments, not one string")
        if not poll_interval_seconds > 0:
            raise PipesUsageError(f"poll_interval_seconds must be positive, got {poll_interval_seconds!r}")
        self.shared_dir = None if shared_dir is None else os.fspath(shared_dir)
        self.sbatch_args = list(sbatch_args)
        self.env = dict(env or {})
        self.commands = commands or SlurmCommands()
        self.poll_interval_seconds = poll_interval_seconds
        self.pending_warning_seconds = pending_warning_seconds

    def default_context_injector(self) -> PipesContextInjector:
        return PipesEnvContextInjector()

    def default_message_reader(self) -> PipesMessageReader:
        return PipesSlurmMessageReader(self.shared_dir)

    @run_signature(SlurmRunOptions, defaults={"script_args": (), "sbatch_args": ()})
    def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
            **options: Unpack[SlurmRunOptions]) -> PipesClientCompletedInvocation:
        """Submit ``command`` (a list, or a string split with :func:`shlex.split`) or ``script`` (a batch script
        path, with ``script_args``) and follow the job to its end.

        ``sbatch_args`` are added after the client's. ``on_job_state`` receives a :class:`SlurmJobInfo` at each
        state change. The invocation's ``description`` names the job id; ``on_launched`` receives the job
        object (``.job_id``, ``.info``, ``.history``).

        ``logger`` (a :class:`logging.Logger` or :class:`logging.LoggerAdapter`, e.g. an orchestrator's per-task
        logger) receives this run's ``log`` messages and protocol issues instead of ``pipes_core.external``, each
        record carrying ``pipes_run_id`` and ``pipes_command`` (the command, or the batch script's path and
        arguments) as ``extra`` fields; ``external_stream_handler`` receives the text the process sends with
        ``log_external_stream`` as ``(stream, text)``; ``fail_on_check_error``, ``raise_on_event_error`` and
        ``on_message``: as for every client (see :meth:`pipes_core.PipesClient.run_launcher`).

        Raises:
            PipesSlurmError: sbatch missing, controller unreachable, submission refused (``kind``).
            PipesExecutionError: the job failed, was cancelled, timed out, ran out of memory, lost its node,
                never opened the channel or broke the protocol; ``.invocation`` holds what was received.
            PipesTimeoutError: the run (queue time included) exceeded ``timeout_seconds``; the job was cancelled.
            KeyboardInterrupt: re-raised after the job was cancelled and the channel drained.
        """
        launch, command, common = self.launcher(options, where="PipesSlurmClient.run")
        return self.run_launcher(launch, context=context, extras=extras, command=command, **common)

    def launcher(self, options: SlurmRunOptions, *, where: str
                 ) -> tuple[Callable[[PipesLaunchRequest], PipesLaunchedProcess], list[str], RunOptions]:
        """Check the run's own options; the launch function (shared by the asyncio twin), the command (for
        ``pipes_command``) and the shared options."""
        check_run_options(options, SlurmRunOptions, where)
        command = options.get("command")
        script = options.get("script")
        script_args = options.get("script_args", ())
        sbatch_args = options.get("sbatch_args", ())
        env = options.get("env")
        on_job_state = options.get("on_job_state")
        if (command is None) == (script is None):
            raise PipesUsageError("give exactly one of command and script")
        if isinstance(sbatch_args, str) or isinstance(script_args, str):
            raise PipesUsageError("sbatch_args and script_args must be sequences of arguments, not one string")
        argv: list[str] = []
        script_path: str | None = None
        if command is not None:
            argv = shlex.split(command) if isinstance(command, str) else list(command)
            if not argv:
                raise PipesUsageError("command is empty")
            what = repr(command_name(argv))  # the script, not its interpreter
        else:
            assert script is not None
            script_path = os.fspath(script)
            if not os.path.isfile(script_path):
                raise PipesUsageError(f"the batch script {script_path!r} is not a file")
            what = f"script {os.path.basename(script_path)!r}"
        user_args = [*self.sbatch_args, *sbatch_args]
        job_env = {**self.env, **(env or {})}
        for name in job_env:
            if not _ENV_NAME.match(name):
                raise PipesUsageError(f"environment variable name {name!r} cannot be exported to a Slurm job "
                                      "(letters, digits and _ only)")

        def launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
            return self._submit(request, argv, script_path, list(script_args), user_args, job_env, what,
                                on_job_state)

        return launch, argv if script_path is None else [script_path, *script_args], common_options(options)

    # ------------------------------------------------------------------ submission

    def _submit(
        self,
        request: PipesLaunchRequest,
        argv: list[str],
        script_path: str | None,
        script_args: list[str],
        user_args: list[str],
        job_env: dict[str, str],
        what: str,
        on_job_state: Callable[[SlurmJobInfo], None] | None,
    ) -> _SlurmJob:
        exported = {**job_env, **request.bootstrap_env}
        durable = request.durable
        named = set(_option_names(user_args))
        if script_path is not None:
            named |= _script_option_names(script_path)
        own_dir: str | None = None
        output_paths: dict[str, str | None] = {"stdout": None, "stderr": None}
        # Who launched it (and for a durable run under which key), for sweep_orphans: a comment of the run's own
        # (a later --comment) replaces it.
        defaults: list[str] = [f"--comment={job_comment(launch_labels(request.owner, durable))}"]
        if "requeue" not in named and "no-requeue" not in named:
            defaults.append("--no-requeue")
        # A user who names either file gets Slurm's own rules for the other (stderr joins a named --output).
        if not _OUTPUT_OPTIONS & named:
            if durable is None:
                own_dir = tempfile.mkdtemp(prefix="pipes-slurm-output-", dir=self.shared_dir)
                os.chmod(own_dir, 0o700)
                output_dir = own_dir
            else:  # beside the messages file, where a later orchestrator follows them; removed with the run
                output_dir = str(durable.directory)
            for stream in ("stdout", "stderr"):
                path = os.path.join(output_dir, JOB_FILE_PATTERN.format("out" if stream == "stdout" else "err"))
                defaults.append(f"--{'output' if stream == 'stdout' else 'error'}={path}")
                output_paths[stream] = path
        # A durable run's job is named by its key (found again by find_launch): after the run's own arguments, so
        # that it wins over a --job-name of theirs or of the script's.
        named_by_key = [] if durable is None else [f"--job-name={durable.name}"]
        sbatch = [self.commands.sbatch, "--parsable",
                  *_merge_export(defaults + user_args + named_by_key, sorted(exported))]
        if script_path is not None:
            sbatch += [script_path, *script_args, *request.bootstrap_args]
        else:
            sbatch += ["--wrap", "exec " + shlex.join(argv + request.bootstrap_args)]
        try:
            try:
                done = self.commands.call(sbatch, env=exported)
            except OSError as exc:
                raise PipesSlurmError(
                    f"cannot submit {what}: {self.commands.sbatch!r} cannot run ({exc}); install Slurm's client "
                    "commands or give their paths in SlurmCommands", kind=SLURM_ERROR_SBATCH_MISSING,
                    stderr=str(exc),
                ) from exc
            said = (done.stderr or "").strip()
            if done.returncode != 0:
                kind = _classify_refusal(said)
                if kind == SLURM_ERROR_UNREACHABLE:
                    conf = self.commands.environ().get("SLURM_CONF", "Slurm's default configuration")
                    message = (f"cannot submit {what}: the Slurm controller is not reachable (SLURM_CONF: {conf}): "
                               f"{said}")
                else:
                    message = f"Slurm refused to submit {what} (sbatch exited with {done.returncode}): {said}"
                raise PipesSlurmError(message, kind=kind, stderr=said)
            job_id = done.stdout.strip().split(";", 1)[0]
            if not job_id:
                raise PipesSlurmError(f"sbatch accepted {what} but printed no job id: {done.stdout!r} {said}",
                                      kind=SLURM_ERROR_REFUSED, stderr=said)
        except BaseException:
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)
            raise
        if said:
            logger.warning("[pipes] sbatch said: %s", said)
        for stream, pattern in output_paths.items():
            if pattern is not None:
                output_paths[stream] = pattern.replace("%j", job_id)
        description = f"the Slurm job {job_id} ({what})"
        handle: dict[str, Any] | None = None
        if durable is not None:
            handle = {HANDLE_JOB_ID: job_id, HANDLE_NAME: durable.name, HANDLE_STDOUT: output_paths["stdout"],
                      HANDLE_STDERR: output_paths["stderr"], HANDLE_COMMANDS: self.commands.to_handle(),
                      HANDLE_DESCRIPTION: description}
            _write_handle_file(durable.directory, handle)
        job = self._job(job_id, what, self.commands, session=request.session, output_paths=output_paths,
                        own_dir=own_dir, on_job_state=on_job_state, handle=handle)
        logger.info("[pipes] submitted %s", job.description)
        return job

    def _job(self, job_id: str, what: str, commands: SlurmCommands, **kwargs: Any) -> _SlurmJob:
        return _SlurmJob(commands, job_id, what, poll_min_seconds=min(DEFAULT_POLL_MIN_SECONDS,
                                                                      self.poll_interval_seconds),
                         poll_max_seconds=self.poll_interval_seconds,
                         pending_warning_seconds=self.pending_warning_seconds, **kwargs)

    # ------------------------------------------------------------------ durable runs

    def attach(self, handle: dict[str, Any], request: PipesLaunchRequest | None = None) -> PipesLaunchedProcess:
        """The job of a durable run (README "Durable runs"), followed again from its handle: its state asked of
        the cluster and with the commands it was submitted with (the handle's), its output files read from their
        start. A job whose end a run saw before is not asked about again. Re-attached by a run (``request``),
        the job is polled sooner once that run's session has seen ``closed``, as a job submitted here is."""
        job_id = str(handle[HANDLE_JOB_ID])
        job = self._job(job_id, str(handle.get(HANDLE_NAME) or "a durable run"),
                        self.commands.from_handle(handle.get(HANDLE_COMMANDS)),
                        session=None if request is None else request.session,
                        output_paths={"stdout": handle.get(HANDLE_STDOUT), "stderr": handle.get(HANDLE_STDERR)},
                        own_dir=None, on_job_state=None, handle=dict(handle),
                        ended_status=recorded_end(handle))
        if handle.get(HANDLE_DESCRIPTION):
            job.description = str(handle[HANDLE_DESCRIPTION])
        return job

    def find_launch(self, durable: DurableLaunch) -> dict[str, Any] | None:
        """The handle of the newest job launched for ``durable`` (its run's key): one named ``durable.name`` that
        Slurm has pending or running for this user, or one that left its files in the run directory (ended,
        perhaps long ago); None when there is none (a job named so that left nothing there was launched for an
        earlier run with the key, forgotten since)."""
        listed = self._squeue(["--name", durable.name], "%i", f"look for the job of the durable run "
                                                                 f"{durable.launch_key!r}")
        found = {int(line.strip()) for line in listed if line.strip().isdigit()}
        try:
            names = os.listdir(durable.directory)
        except OSError:
            names = []
        found |= {int(match[1]) for name in names if (match := _JOB_FILE.match(name))}
        if not found:
            return None
        job_id = str(max(found))
        recorded = _read_handle_file(durable.directory, job_id)
        if recorded is not None:
            return recorded
        # Submitted, but its orchestrator died before writing the handle's copy: its output paths from Slurm.
        return {HANDLE_JOB_ID: job_id, HANDLE_NAME: durable.name, HANDLE_STDOUT: None, HANDLE_STDERR: None,
                HANDLE_COMMANDS: self.commands.to_handle(),
                HANDLE_DESCRIPTION: f"the Slurm job {job_id} (durable run {durable.launch_key!r})"}

    def sweep_orphans(self) -> list[str]:
        """Cancel this user's pending and running jobs that an orchestrator of this host launched without a
        launch key and that is gone (the labels in the job's comment); one line said per job cancelled."""
        said = []
        for line in self._squeue([], "%i\t%k\t%j", "look for orphaned jobs"):
            job_id, _, rest = line.partition("\t")
            job_id = job_id.strip()
            comment, _, name = rest.partition("\t")
            if not job_id[:1].isdigit() or comment in ("", _NO_COMMENT):  # (a line of a comment with a newline)
                continue
            owner = orphan_owner(labels_from_comment(comment))
            if owner is None:
                continue
            done = self.commands.call([self.commands.scancel, job_id])
            if done.returncode != 0:
                logger.warning("[pipes] cannot cancel the orphaned Slurm job %s: %s", job_id,
                               (done.stderr or done.stdout).strip())
                continue
            said.append(f"stopped the Slurm job {job_id} ({name.strip()!r}) launched by process {owner.pid} "
                        f"on host {owner.host}, which is gone")
        return said

    def _squeue(self, selection: list[str], fields: str, why: str) -> list[str]:
        """The lines of ``squeue`` for this user's pending and running jobs (``selection`` narrows them)."""
        argv = [self.commands.squeue, "--noheader", f"--user={os.getuid()}", *selection, f"--format={fields}"]
        try:
            listed = self.commands.call(argv)
        except OSError as exc:
            raise PipesSlurmError(f"cannot {why}: {self.commands.squeue!r} cannot run ({exc}); install Slurm's "
                                  "client commands or give their paths in SlurmCommands",
                                  kind=SLURM_ERROR_SBATCH_MISSING, stderr=str(exc)) from exc
        if listed.returncode != 0:
            said = (listed.stderr or listed.stdout).strip()
            conf = self.commands.environ().get("SLURM_CONF", "Slurm's default configuration")
            raise PipesSlurmError(f"cannot {why}: squeue exited with {listed.returncode} (SLURM_CONF: {conf}): "
                                  f"{said}", kind=_classify_refusal(said), stderr=said)
        return listed.stdout.splitlines()


def _write_handle_file(directory: Path, handle: dict[str, Any]) -> None:
    """A durable job's handle in the run directory (module constants): found again there if its orchestrator dies
    before the run's store has it. Written whole or not at all; a failure is said, not raised (the job runs)."""
    path = directory / f"slurm-{handle[HANDLE_JOB_ID]}.json"
    part = path.with_name(path.name + ".part")
    try:
        with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as file:
            json.dump(handle, file)
        os.replace(part, path)
    except OSError as exc:
        logger.warning("[pipes] cannot write %s (the job is found again by its name while Slurm knows it): %s",
                       path, exc)


def _read_handle_file(directory: Path, job_id: str) -> dict[str, Any] | None:
    try:
        with open(directory / f"slurm-{job_id}.json", encoding="utf-8") as file:
            return dict(json.load(file))
    except (OSError, ValueError):
        return None



class PipesAsyncSlurmClient(PipesAsyncClient[PipesSlurmClient]):
    """The asyncio twin of :class:`PipesSlurmClient`: the same arguments, the same options of :meth:`run`
    (:class:`SlurmRunOptions`), the same errors and invocation; ``await client.run(command=...)``. ``sbatch``,
    ``scontrol`` and ``scancel`` block, so they run on the client's own bounded executor, the loop waiting on a
    timer between two state queries; the job's output files are followed by a thread each. Cancelling the task
    cancels the job (as Ctrl-C does for the sync client), drains the channel, and re-raises with
    ``.invocation``."""

    @same_arguments_as(PipesSlurmClient.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(PipesSlurmClient(*args, **kwargs))

    @run_signature(SlurmRunOptions, defaults={"script_args": (), "sbatch_args": ()})
    async def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
                  **options: Unpack[SlurmRunOptions]) -> PipesClientCompletedInvocation:
        """Submit ``command`` or ``script`` on the running loop; see :meth:`PipesSlurmClient.run`."""
        launch, command, common = self.config.launcher(options, where="PipesAsyncSlurmClient.run")
        return await self.run_launcher(launch, context=context, extras=extras, command=command, **common)
