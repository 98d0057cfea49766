"""The decisions of a run, with no I/O: what to do next, and the verdict (in the spirit of a sans-IO protocol core).

A driver (the sync one in :mod:`pipes_core.launch.client`, the asyncio one in
:mod:`pipes_core.launch.async_client`) launches the process, then feeds a :class:`RunCore` the facts as they
happen and carries out the actions it returns:

* facts: the launch was set up (:meth:`RunCore.begun`), a wait ended with the process ended or not
  (:meth:`RunCore.waited`), a signal was sent or a line logged (:meth:`RunCore.proceed`), an interruption arrived
  (Ctrl-C or an async task's cancellation: :data:`KEYBOARD`; SIGTERM to this process: :data:`SIGTERM`;
  :meth:`RunCore.interrupted`), the run itself failed (:meth:`RunCore.crashed`);
* actions: :class:`Begin` (call ``on_launched``, start reading the output), :class:`Wait` (up to ``seconds`` for
  the end), :class:`Signal` (``interrupt`` / ``terminate`` / ``kill``), :class:`Log` and :class:`Done` (stop
  driving: drain the output and the channel, then judge).

The phases: launched -> running -> (timeout or interruption) stopping: interrupt, wait
``termination_timeout_seconds``; terminate, wait :data:`TERM_GRACE_SECONDS` (at most the former); kill, wait
:data:`KILL_WAIT_SECONDS`; then kill once more to sweep what it left behind -> draining -> verdict. A second
interruption while stopping kills at once (forced); a failure of the run itself (its output cannot be read) kills
at once too.

The verdict (:func:`judge`) takes the facts of a finished run (:class:`RunFacts`) and says which error, with which
message, or none (:class:`Verdict`); see :meth:`pipes_core.PipesClient.check` for the order of its rules.
"""

from __future__ import annotations

import logging
import signal
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipes_core.launch.run_store import RUN_CONCLUDED, RUN_ENDED, RUN_RUNNING
from pipes_core.protocol.errors import (
    PipesEngineErrorKind,
    PipesExecutionError,
    PipesInterruptedError,
    PipesTimeoutError,
)
from pipes_core.protocol.failures import excerpt_line, failure_details
from pipes_ext._errors import PipesError, PipesTransportError

if TYPE_CHECKING:
    from pipes_core.protocol.results import PipesRemoteException

__all__ = [
    "TERM_GRACE_SECONDS",
    "KILL_WAIT_SECONDS",
    "INTERRUPT",
    "TERMINATE",
    "KILL",
    "KEYBOARD",
    "SIGTERM",
    "Begin",
    "Wait",
    "Signal",
    "Log",
    "Done",
    "Action",
    "RunCore",
    "PipesExitStatus",
    "RunFacts",
    "Verdict",
    "judge",
    "signal_name",
    "DURABLE_LAUNCH",
    "DURABLE_ATTACH",
    "DURABLE_DRAIN",
    "DURABLE_REPLAY",
    "DURABLE_FIND",
    "DURABLE_WAIT",
    "durable_step",
]

# After terminate(), how long the process gets before kill(). interrupt() already had the full
# termination_timeout_seconds to clean up; terminate() is the last polite request.
TERM_GRACE_SECONDS = 5.0
# After kill(), how long to wait for the end before giving up on it (a remote engine may be slow to confirm;
# a local SIGKILL takes milliseconds).
KILL_WAIT_SECONDS = 60.0
# How many protocol issues an error message lists.
ERROR_ISSUES_LISTED = 10

# The escalation steps: the names of a launched process's methods (PipesLaunchedProcess.interrupt ...).
INTERRUPT = "interrupt"
TERMINATE = "terminate"
KILL = "kill"

# What interrupted the run: Ctrl-C (KeyboardInterrupt) or an async task's cancellation, re-raised after the
# drain; SIGTERM to this process, judged as PipesInterruptedError.
KEYBOARD = "keyboard"
SIGTERM = "sigterm"

# Where a verdict's warning goes: the session's logger (the process's own messages) or the client's.
SESSION_LOG = "session"
CLIENT_LOG = "client"

# The phases of a run.
LAUNCHED = "launched"
RUNNING = "running"
STOPPING = "stopping"
FORCED = "forced"  # a second interruption, or the run itself failed: kill at once
DONE = "done"


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; ``signal 99`` for a number with no name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class PipesExitStatus:
    """How a launched process ended.

    Attributes:
        exit_code: its exit code; negative -N when killed by signal N (as :mod:`subprocess` says); None when
            unknown (it never ended, or the engine does not say).
        killed: it was ended from outside (a signal, the OOM killer, a cancelled job), not by exiting.
        description: how it ended, when that is not a plain exit, worded to follow the process's description:
            "was killed by SIGKILL", "was OOM-killed", "ended in job state STOPPED".
        kind: why, in the engines' shared words (:class:`PipesEngineErrorKind`: ``killed``, ``out_of_memory``,
            ``cancelled``, ``node_fail``...), when the engine said; the failure's error carries it as ``kind``.
    """

    exit_code: int | None
    killed: bool = False
    description: str = ""
    kind: PipesEngineErrorKind | None = None

    @classmethod
    def from_returncode(cls, returncode: int | None) -> PipesExitStatus:
        """From a :class:`subprocess.Popen` return code."""
        if returncode is not None and returncode < 0:
            return cls(returncode, killed=True, description=f"was killed by {signal_name(-returncode)}",
                       kind=PipesEngineErrorKind.KILLED)
        return cls(returncode)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.killed


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Begin:
    """Call ``on_launched`` and start reading the process's output; then :meth:`RunCore.begun`."""


@dataclass(frozen=True)
class Wait:
    """Wait up to ``seconds`` (None: no limit) for the process's end; then :meth:`RunCore.waited`."""

    seconds: float | None
    last: bool = False  # the wait after kill(): not ending is logged


@dataclass(frozen=True)
class Signal:
    """Call the process's ``step`` (:data:`INTERRUPT`, :data:`TERMINATE` or :data:`KILL`); then
    :meth:`RunCore.proceed`."""

    step: str


@dataclass(frozen=True)
class Log:
    """Log ``message`` at ``level`` on the client's logger for the run; then :meth:`RunCore.proceed`."""

    level: int
    message: str


@dataclass(frozen=True)
class Done:
    """Stop driving the process: drain its output and the channel, then judge."""


Action = Begin | Wait | Signal | Log | Done


class RunCore:
    """The decisions of one run between launch and drain (module doc). It does no I/O: the driver tells it what
    happened and does what it says.

    Attributes (read by the verdict): ``timed_out``, ``terminated`` (SIGTERM to this process), ``interrupted``
    (Ctrl-C or a cancellation: re-raised after the drain), ``crashed`` (the run itself failed: raised as is).
    """

    def __init__(self, *, timeout_seconds: float | None, termination_timeout_seconds: float,
                 forward_termination: bool, subject: str = "the external process") -> None:
        self.timeout_seconds = timeout_seconds
        self.termination_timeout_seconds = termination_timeout_seconds
        self.forward_termination = forward_termination
        self.subject = subject
        self.phase = LAUNCHED
        self.timed_out = False
        self.terminated = False
        self.interrupted = False
        self.crashed = False
        self._plan: deque[Action] = deque()
        self._last: Action | None = None

    # ------------------------------------------------------------------ facts

    def first(self) -> Action:
        """The first action once the process was launched."""
        return Begin()

    def begun(self) -> Action:
        """``on_launched`` was called and the output is being read: wait for the end, up to the timeout."""
        self.phase = RUNNING
        return Wait(self.timeout_seconds)

    def waited(self, ended: bool) -> Action:
        """A :class:`Wait` is over; ``ended``: the process has ended."""
        if self.phase == RUNNING:
            if ended:
                return self._done()
            self.timed_out = True
            return self._stop()
        if self.phase == STOPPING:
            if not self._plan:  # pragma: no cover - every wait of the plan is followed by an action
                return self._done()
            if ended:  # skip the rest of the escalation: only the sweep is left
                self._plan = deque([Signal(KILL), Done()])
                return self.proceed()
            if isinstance(self._last, Wait) and self._last.last:
                self._plan.appendleft(Log(logging.ERROR, f"[pipes] {self.subject} did not end "
                                                         f"{KILL_WAIT_SECONDS:.0f} s after kill()"))
            return self.proceed()
        return self._done()  # forced: after the one wait following kill(), whatever it found

    def proceed(self) -> Action:
        """A :class:`Signal` was sent or a :class:`Log` line written: the next action."""
        if not self._plan:
            return self._done()
        self._last = self._plan.popleft()
        if isinstance(self._last, Done):
            self.phase = DONE
        return self._last

    def interrupted_by(self, cause: str) -> Action:
        """An interruption arrived (:data:`KEYBOARD` or :data:`SIGTERM`), whatever the driver was doing."""
        if cause == SIGTERM:
            self.terminated = True
        else:
            self.interrupted = True
        if self.phase in (LAUNCHED, RUNNING):
            if not self.forward_termination:
                return self._done()  # left running: the verdict (or the re-raised interruption) says so
            return self._stop(Log(logging.WARNING, f"[pipes] interrupted: terminating {self.subject} "
                                                   "(interrupt first)"))
        if self.phase == STOPPING:  # a second interruption: kill at once
            return self._force()
        return self._done()

    def failed(self) -> Action:
        """The run itself failed (an exception that is not an interruption): kill at once, then stop."""
        self.crashed = True
        if self.phase in (FORCED, DONE):
            return self._done()
        return self._force()

    # ------------------------------------------------------------------ plans

    def _stop(self, *first: Action) -> Action:
        grace = self.termination_timeout_seconds
        self.phase = STOPPING
        self._plan = deque([*first, Signal(INTERRUPT), Wait(grace), Signal(TERMINATE),
                            Wait(min(TERM_GRACE_SECONDS, grace)), Signal(KILL), Wait(KILL_WAIT_SECONDS, last=True),
                            Signal(KILL), Done()])  # the second kill sweeps what outlived it (its group's orphans)
        return self.proceed()

    def _force(self) -> Action:
        self.phase = FORCED
        self._plan = deque([Signal(KILL), Wait(KILL_WAIT_SECONDS, last=True)])
        return self.proceed()

    def _done(self) -> Action:
        self.phase = DONE
        self._plan.clear()
        return Done()


# ---------------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class RunFacts:
    """What the verdict looks at, gathered by the driver from the invocation and the session."""

    subject: str
    status: PipesExitStatus
    strict: bool
    opened: bool
    remote: PipesRemoteException | None = None
    output_tail: str = ""
    last_output_line: str = ""
    last_output_line_source: str = "stderr"
    timed_out: bool = False
    terminated: bool = False
    timeout_seconds: float | None = None
    forward_termination: bool = True
    bootstrap_cli: bool = False
    channel_error: Exception | None = None
    never_opened_hint: str = ""
    issue_count: int = 0
    protocol_issues: Sequence[Any] = ()
    callback_errors: Sequence[Any] = ()
    raise_on_event_error: bool = True
    fail_on_check_error: bool = False
    failed_error_check_count: int = 0
    missing_closed: bool = False


@dataclass(frozen=True)
class Verdict:
    """The judgement of a run: ``error`` (a class; None: it succeeded) with its whole ``message`` and the
    exception to chain (``cause``); ``warnings`` to log first, each ``(SESSION_LOG or CLIENT_LOG, text)``."""

    error: type[PipesError] | None = None
    message: str = ""
    cause: BaseException | None = None
    warnings: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    carries_details: bool = True  # False: the error carries no exit code, remote exception or tail
    kind: PipesEngineErrorKind | None = None  # the error's kind


def _ending(status: PipesExitStatus) -> str:
    if status.description:
        return status.description
    if status.exit_code is None:
        return "ended without an exit status"
    return f"exited with code {status.exit_code}"


def judge(facts: RunFacts) -> Verdict:
    """The verdict of a finished run, by the rules of :meth:`pipes_core.PipesClient.check`, in their order."""
    status = facts.status
    code = status.exit_code
    remote = facts.remote
    subject = facts.subject
    warnings: list[tuple[str, str]] = []

    def fail(cls: type[PipesExecutionError], message: str, *, says_remote: bool = False,
             says_line: bool = False, kind: PipesEngineErrorKind | None = None) -> Verdict:
        """``cls``: ``message``, then what it did not already say (each fact once)."""
        details = failure_details(remote, facts.output_tail, facts.last_output_line if says_line else "",
                                  says_remote=says_remote)
        return Verdict(cls, message + details, warnings=tuple(warnings), kind=kind)

    if facts.timed_out:
        return fail(PipesTimeoutError, f"{subject} ran past its timeout of {facts.timeout_seconds} s and was "
                    "terminated", kind=PipesEngineErrorKind.TIMEOUT)
    if facts.terminated:
        fate = "was terminated" if facts.forward_termination else "was left running (forward_termination=False)"
        return fail(PipesInterruptedError, f"the orchestrator received SIGTERM; {subject} {fate}",
                    kind=PipesEngineErrorKind.CANCELLED)
    if facts.channel_error is not None:
        error = facts.channel_error
        return Verdict(
            PipesTransportError,
            f"the message channel failed ({type(error).__name__}: {error}); {subject} {_ending(status)}; what "
            "arrived before the failure is in .invocation" + failure_details(remote, facts.output_tail, "",
                                                                              says_remote=False),
            cause=error, carries_details=False)
    if status.killed or code:
        # Why it failed, once: the exception it reported, else its last stderr line (a crash on import, a
        # shell's "command not found"). Before opening the channel (strict: a Pipes process was expected), that
        # is said: the channel was never the problem.
        crashed = facts.strict and not facts.opened
        if status.killed:
            how = f"{subject} {status.description or 'was killed'}"
        elif crashed:
            how = f"{subject} crashed (exit code {code}"
            how += f", {status.description})" if status.description else ")"
        else:
            how = f"{subject} failed with exit code {code}"
            how += f" ({status.description})" if status.description else ""
        if crashed:
            how += " before opening the Pipes channel"
        kind = status.kind or (PipesEngineErrorKind.KILLED if status.killed else None)
        if remote is not None:
            return fail(PipesExecutionError, f"{how}{'; it reported' if status.killed else ' with'} {remote}",
                        says_remote=True, kind=kind)
        if facts.last_output_line:
            return fail(PipesExecutionError, f"{how}; its last {facts.last_output_line_source} line: "
                        f"{excerpt_line(facts.last_output_line)}", says_line=True, kind=kind)
        return fail(PipesExecutionError, how, kind=kind)
    if code is None:
        return fail(PipesExecutionError, f"{subject} {status.description or 'ended without an exit status'}",
                    kind=status.kind)
    if remote is not None:
        return fail(PipesExecutionError, f"{subject} exited 0 but reported an exception: {remote}",
                    says_remote=True)
    if not facts.opened:
        hint = facts.never_opened_hint
        if facts.strict:
            where = ("the --dagster-pipes-context / --dagster-pipes-messages arguments reach it"
                     if facts.bootstrap_cli else "DAGSTER_PIPES_CONTEXT / DAGSTER_PIPES_MESSAGES reach it")
            return fail(
                PipesExecutionError,
                f"{subject} exited 0 but never opened the Pipes channel. {hint} Check that it calls "
                f"open_pipes() (or open_dagster_pipes()) and that {where}; pass strict=False for a command "
                "that is not Pipes-aware.",
            )
        warnings.append((SESSION_LOG, f"[pipes] {subject} never opened the Pipes channel. {hint}"))
    if facts.strict and facts.issue_count:
        issues = "\n".join(f"  - {issue}" for issue in list(facts.protocol_issues)[:ERROR_ISSUES_LISTED])
        return fail(PipesExecutionError, f"{subject} broke the Pipes protocol {facts.issue_count} time(s):\n{issues}")
    if facts.raise_on_event_error and facts.callback_errors:
        first = facts.callback_errors[0]
        return Verdict(
            PipesExecutionError,
            f"the on_event callback raised {len(facts.callback_errors)} time(s) during the run of {subject}; first: "
            f"{first if isinstance(first, str) else f'{type(first).__name__}: {first}'} "
            "(pass raise_on_event_error=False to only log it)",
            cause=first if isinstance(first, BaseException) else None, warnings=tuple(warnings))
    if facts.fail_on_check_error and facts.failed_error_check_count:
        return fail(PipesExecutionError, f"{subject} reported {facts.failed_error_check_count} failed check(s) of "
                    "severity ERROR (fail_on_check_error)")
    if facts.missing_closed:
        warnings.append((CLIENT_LOG, f"[pipes] {subject} opened the channel but never sent closed; buffered "
                                     "messages may be missing"))
    return Verdict(None, warnings=tuple(warnings))


# ---------------------------------------------------------------------------------------------- durable runs

# What a run with a launch key does first, by what the store holds for the key (see :func:`durable_step`).
DURABLE_LAUNCH = "launch"  # no run had the key (this process just claimed it): launch, record the handle
DURABLE_ATTACH = "attach"  # a live run: rebuild its launched process from the handle, read on from the position
DURABLE_DRAIN = "drain"  # it ended while nobody watched: drain from the recorded position, conclude
DURABLE_REPLAY = "replay"  # concluded: the recorded messages and outcome, nothing launched or read
DURABLE_FIND = "find"  # claimed by an owner now gone, no handle recorded: find the launch by its key, else launch
DURABLE_WAIT = "wait"  # claimed by a live owner that is launching it: wait for its handle, then attach


def durable_step(state: str, *, created: bool, owner_alive: bool | None) -> str:
    """The first step of a run with a launch key (no I/O): ``state`` is the run's state in the store
    (:data:`pipes_core.launch.run_store.RUN_STATES`), ``created`` that this process's claim created it, ``owner_alive``
    whether the owner recorded for it is alive (None: on another host, taken for alive)."""
    if created:
        return DURABLE_LAUNCH
    if state == RUN_CONCLUDED:
        return DURABLE_REPLAY
    if state == RUN_ENDED:
        return DURABLE_DRAIN
    if state == RUN_RUNNING:
        return DURABLE_ATTACH
    return DURABLE_FIND if owner_alive is False else DURABLE_WAIT
