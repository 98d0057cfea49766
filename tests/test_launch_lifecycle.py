"""The I/O-free run core (``pipes_core.launch.lifecycle``), table-driven, without processes: which actions follow
which facts (timeouts, interruptions, escalation), and which verdict follows which finished run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest

from pipes_core import PipesExecutionError, PipesInterruptedError, PipesTimeoutError, PipesTransportError
from pipes_core.launch.lifecycle import (
    CLIENT_LOG,
    DURABLE_ATTACH,
    DURABLE_DRAIN,
    DURABLE_FIND,
    DURABLE_LAUNCH,
    DURABLE_REPLAY,
    DURABLE_WAIT,
    INTERRUPT,
    KEYBOARD,
    KILL,
    KILL_WAIT_SECONDS,
    SESSION_LOG,
    SIGTERM,
    TERM_GRACE_SECONDS,
    TERMINATE,
    Action,
    Begin,
    Done,
    Log,
    PipesExitStatus,
    RunCore,
    RunFacts,
    Signal,
    Wait,
    durable_step,
    judge,
)


@dataclass
class Engine:
    """A process as the core sees it, described by facts: which signal ends it, and when interruptions come."""

    ends_after: str | None = "run"  # "run": ends on its own within the timeout; or a step's name; None: never
    interrupts: dict[int, str] = field(default_factory=dict)  # action index -> KEYBOARD / SIGTERM, instead of it
    sent: set[str] = field(default_factory=set)

    def ended(self) -> bool:
        if self.ends_after == "run":
            return True
        return self.ends_after in self.sent


def drive(engine: Engine, *, timeout: float | None = 10, grace: float = 20, forward: bool = True,
          ) -> tuple[list[Action], RunCore]:
    core = RunCore(timeout_seconds=timeout, termination_timeout_seconds=grace, forward_termination=forward,
                   subject="the job")
    actions: list[Action] = []
    action = core.first()
    while not isinstance(action, Done):
        actions.append(action)
        assert len(actions) < 50, actions
        cause = engine.interrupts.get(len(actions) - 1)
        if cause is not None:
            action = core.interrupted_by(cause)
        elif isinstance(action, Begin):
            action = core.begun()
        elif isinstance(action, Wait):
            action = core.waited(engine.ended())
        elif isinstance(action, Signal):
            engine.sent.add(action.step)
            action = core.proceed()
        else:
            action = core.proceed()
    return actions, core


ESCALATION = [Signal(INTERRUPT), Wait(20), Signal(TERMINATE), Wait(TERM_GRACE_SECONDS), Signal(KILL),
              Wait(KILL_WAIT_SECONDS, last=True)]
WARNING = Log(logging.WARNING, "[pipes] interrupted: terminating the job (interrupt first)")

CASES = {
    # name: (engine, core options, expected actions, expected flags (timed_out, terminated, interrupted))
    "ends in time": (Engine(), {}, [Begin(), Wait(10)], (False, False, False)),
    "no timeout": (Engine(), {"timeout": None}, [Begin(), Wait(None)], (False, False, False)),
    "timeout, ends on interrupt": (Engine("interrupt"), {}, [Begin(), Wait(10), *ESCALATION[:2], Signal(KILL)],
                                   (True, False, False)),
    "timeout, ends on terminate": (Engine("terminate"), {}, [Begin(), Wait(10), *ESCALATION[:4], Signal(KILL)],
                                   (True, False, False)),
    "timeout, ignores SIGINT and SIGTERM": (Engine("kill"), {}, [Begin(), Wait(10), *ESCALATION, Signal(KILL)],
                                            (True, False, False)),
    "timeout, survives kill": (Engine(None), {}, [Begin(), Wait(10), *ESCALATION,
                                                  Log(logging.ERROR, "[pipes] the job did not end 60 s after kill()"),
                                                  Signal(KILL)], (True, False, False)),
    "short grace caps terminate's": (Engine("kill"), {"grace": 1}, [
        Begin(), Wait(10), Signal(INTERRUPT), Wait(1), Signal(TERMINATE), Wait(1), Signal(KILL),
        Wait(KILL_WAIT_SECONDS, last=True), Signal(KILL)], (True, False, False)),
    "Ctrl-C while running": (Engine("interrupt", {1: KEYBOARD}), {}, [Begin(), Wait(10), WARNING, *ESCALATION[:2],
                                                                      Signal(KILL)], (False, False, True)),
    "SIGTERM while running": (Engine("terminate", {1: SIGTERM}), {}, [Begin(), Wait(10), WARNING, *ESCALATION[:4],
                                                                      Signal(KILL)], (False, True, False)),
    "Ctrl-C during on_launched": (Engine("interrupt", {0: KEYBOARD}), {}, [Begin(), WARNING, *ESCALATION[:2],
                                                                           Signal(KILL)], (False, False, True)),
    "Ctrl-C, forward_termination off": (Engine(None, {1: KEYBOARD}), {"forward": False}, [Begin(), Wait(10)],
                                        (False, False, True)),
    "SIGTERM, forward_termination off": (Engine(None, {1: SIGTERM}), {"forward": False}, [Begin(), Wait(10)],
                                         (False, True, False)),
    "second Ctrl-C kills at once": (Engine("kill", {1: KEYBOARD, 4: KEYBOARD}), {}, [
        Begin(), Wait(10), WARNING, Signal(INTERRUPT), Wait(20), Signal(KILL), Wait(KILL_WAIT_SECONDS, last=True)],
        (False, False, True)),
    "Ctrl-C during a timeout's escalation": (Engine("kill", {3: KEYBOARD}), {}, [
        Begin(), Wait(10), Signal(INTERRUPT), Wait(20), Signal(KILL), Wait(KILL_WAIT_SECONDS, last=True)],
        (True, False, True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_core_decides_each_step(name: str) -> None:
    engine, options, expected, flags = CASES[name]
    actions, core = drive(engine, **options)  # type: ignore[arg-type]
    assert actions == expected
    assert (core.timed_out, core.terminated, core.interrupted) == flags


def test_a_failure_of_the_run_kills_at_once_and_only_once() -> None:
    core = RunCore(timeout_seconds=None, termination_timeout_seconds=20, forward_termination=True)
    assert core.first() == Begin()
    assert core.failed() == Signal(KILL)  # e.g. on_launched raised
    assert core.proceed() == Wait(KILL_WAIT_SECONDS, last=True)
    assert core.failed() == Done()  # failing again while killing: stop driving
    assert core.crashed


# ---------------------------------------------------------------------------------------------- verdict


def facts(**changes: object) -> RunFacts:
    values: dict[str, object] = {"subject": "the job", "status": PipesExitStatus(0), "strict": True, "opened": True}
    values.update(changes)
    return RunFacts(**values)  # type: ignore[arg-type]


VERDICTS = {
    # name: (facts, error class or None, the message's start, warnings' destinations)
    "success": (facts(), None, "", ()),
    "timeout": (facts(timed_out=True, timeout_seconds=2.0, status=PipesExitStatus(-9, True, "was killed by SIGKILL")),
                PipesTimeoutError, "the job ran past its timeout of 2.0 s and was terminated", ()),
    "SIGTERM": (facts(terminated=True), PipesInterruptedError,
                "the orchestrator received SIGTERM; the job was terminated", ()),
    "SIGTERM, left running": (facts(terminated=True, forward_termination=False), PipesInterruptedError,
                              "the orchestrator received SIGTERM; the job was left running", ()),
    "channel failed": (facts(channel_error=OSError("disk gone")), PipesTransportError,
                       "the message channel failed (OSError: disk gone); the job exited with code 0", ()),
    "non-zero exit": (facts(status=PipesExitStatus(3)), PipesExecutionError, "the job failed with exit code 3", ()),
    "non-zero exit, last line": (facts(status=PipesExitStatus(3), last_output_line="boom"), PipesExecutionError,
                                 "the job failed with exit code 3; its last stderr line: boom", ()),
    "crash before opening": (facts(status=PipesExitStatus(1), opened=False), PipesExecutionError,
                             "the job crashed (exit code 1) before opening the Pipes channel", ()),
    "crash, not strict": (facts(status=PipesExitStatus(1), opened=False, strict=False), PipesExecutionError,
                          "the job failed with exit code 1", ()),
    "killed": (facts(status=PipesExitStatus(-9, True, "was killed by SIGKILL")), PipesExecutionError,
               "the job was killed by SIGKILL", ()),
    "no exit status": (facts(status=PipesExitStatus(None)), PipesExecutionError,
                       "the job ended without an exit status", ()),
    "exited 0 without opening": (facts(opened=False, never_opened_hint="(hint)"), PipesExecutionError,
                                 "the job exited 0 but never opened the Pipes channel. (hint) Check that", ()),
    "exited 0 without opening, not strict": (facts(opened=False, strict=False), None, "", (SESSION_LOG,)),
    "protocol issues": (facts(issue_count=2, protocol_issues=["a", "b"]), PipesExecutionError,
                        "the job broke the Pipes protocol 2 time(s):\n  - a\n  - b", ()),
    "on_event raised": (facts(callback_errors=[ValueError("x")]), PipesExecutionError,
                        "the on_event callback raised 1 time(s) during the run of the job; first: ValueError: x", ()),
    "on_event raised, only logged": (facts(callback_errors=[ValueError("x")], raise_on_event_error=False), None, "",
                                     ()),
    "failed check": (facts(fail_on_check_error=True, failed_error_check_count=1), PipesExecutionError,
                     "the job reported 1 failed check(s) of severity ERROR (fail_on_check_error)", ()),
    "failed check, not asked": (facts(failed_error_check_count=1), None, "", ()),
    "missing closed": (facts(missing_closed=True), None, "", (CLIENT_LOG,)),
}


@pytest.mark.parametrize("name", list(VERDICTS))
def test_the_verdict_of_each_ending(name: str) -> None:
    given, error, start, warnings = VERDICTS[name]
    verdict = judge(given)
    assert verdict.error is error
    assert verdict.message.startswith(start), verdict.message
    assert tuple(where for where, _ in verdict.warnings) == warnings


def test_the_verdict_chains_the_callbacks_first_exception_and_the_channels_error() -> None:
    first = ValueError("x")
    assert judge(facts(callback_errors=[first, KeyError("y")])).cause is first
    broken = OSError("gone")
    assert judge(facts(channel_error=broken)).cause is broken


# ---------------------------------------------------------------------------------------------- durable runs

DURABLE_TABLE = [
    # (state in the store, this process created the run, its owner is alive) -> first step
    ("launching", True, True, DURABLE_LAUNCH),
    ("launching", False, True, DURABLE_WAIT),  # another live process is launching it
    ("launching", False, None, DURABLE_WAIT),  # an owner on another host is taken for alive
    ("launching", False, False, DURABLE_FIND),  # its owner died before recording the launch
    ("running", False, True, DURABLE_ATTACH),
    ("running", False, False, DURABLE_ATTACH),
    ("ended", False, False, DURABLE_DRAIN),
    ("concluded", False, False, DURABLE_REPLAY),
    ("concluded", False, True, DURABLE_REPLAY),
]


@pytest.mark.parametrize(("state", "created", "owner_alive", "step"), DURABLE_TABLE)
def test_the_first_step_of_a_run_with_a_launch_key(state: str, created: bool, owner_alive: bool | None,
                                                    step: str) -> None:
    assert durable_step(state, created=created, owner_alive=owner_alive) == step
