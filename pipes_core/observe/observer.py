"""The one observer interface of a run: what the lifecycle tells an observer, and when.

Both drivers (the sync one in :mod:`pipes_core.launch.client`,
the asyncio one in :mod:`pipes_core.launch.async_client`) and
the session's event path (:class:`pipes_core.protocol.handler.PipesMessageHandler`) call a :class:`RunObserver` at the
few places where these happen:

* :meth:`RunObserver.started`: the session is open; the run's attributes (:data:`ATTR_LAUNCHER`, ...);
* :meth:`RunObserver.phase`: the run entered a phase (:data:`PHASE_LAUNCH`, :data:`PHASE_WAIT`,
  :data:`PHASE_DRAIN`, in that order; a launch that fails goes from launch straight to drain), which ends the
  previous one;
* :meth:`RunObserver.message`: a valid message came off the wire (its method and params, its size in bytes),
  on the reader's thread (or the loop);
* :meth:`RunObserver.event`: an event (a result, a log, opened / closed, a protocol issue), just after;
* :meth:`RunObserver.finished`: the verdict: the invocation, and the error raised (None: it succeeded); the
  current phase ends with it;
* :meth:`RunObserver.child_env`: asked once before the launch: env vars for the external process (the
  OpenTelemetry observer's ``TRACEPARENT`` / ``TRACESTATE``).

Two observers come with the library: OpenTelemetry spans and metrics (:mod:`pipes_core.observe.otel`, on by itself when
``opentelemetry-api`` is importable and a provider is configured) and the Chrome trace-event file of ``pipes run
--trace`` (:mod:`pipes_core.observe.trace_file`). A run's ``observer=`` option adds one of the user's. An observer must
not raise; the fan-out (:class:`pipes_core.observe.fanout.RunObservers`) logs what one raises and goes on, so
that an observer never changes a run's outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipes_ext._protocol import CONTEXT_ASSET_KEYS, CONTEXT_PARTITION_KEY, CONTEXT_RUN_ID

if TYPE_CHECKING:
    from pipes_core.launch.invocation import PipesClientCompletedInvocation
    from pipes_core.protocol.results import PipesEvent

__all__ = [
    "RunObserver",
    "PHASE_LAUNCH",
    "PHASE_WAIT",
    "PHASE_DRAIN",
    "PHASES",
    "OUTCOME_SUCCEEDED",
    "ATTR_LAUNCHER",
    "ATTR_COMMAND",
    "ATTR_RUN_ID",
    "ATTR_ASSET_KEYS",
    "ATTR_PARTITION",
    "ATTR_PROCESS",
    "ATTR_EXIT_CODE",
    "ATTR_OUTCOME",
    "ATTR_RESULTS",
    "ATTR_ISSUES",
    "ATTR_MESSAGES",
    "outcome_of",
    "run_attributes",
    "cut_text",
    "EVENT_TEXT_CHARS",
]

observe_logger = logging.getLogger("pipes_core.observe")

# The phases of a run, in order.
PHASE_LAUNCH = "launch"
PHASE_WAIT = "wait"
PHASE_DRAIN = "drain"
PHASES = (PHASE_LAUNCH, PHASE_WAIT, PHASE_DRAIN)

# A run's outcome when it raised nothing; otherwise the name of the error's class (PipesExecutionError,
# PipesTimeoutError, KeyboardInterrupt, CancelledError...).
OUTCOME_SUCCEEDED = "succeeded"

# The run's attributes (OpenTelemetry semantic-convention style names, under the pipes namespace).
ATTR_LAUNCHER = "pipes.launcher"  # the client's class name: PipesSubprocessClient, PipesDockerClient...
ATTR_COMMAND = "pipes.command"  # the command as given (a list: its words), or the image that runs its own
ATTR_RUN_ID = "pipes.run_id"
ATTR_ASSET_KEYS = "pipes.asset_keys"
ATTR_PARTITION = "pipes.partition_key"
ATTR_PROCESS = "pipes.process"  # the launched process's description: "the container 3f2a... (image x)"
ATTR_EXIT_CODE = "pipes.exit_code"
ATTR_OUTCOME = "pipes.outcome"
ATTR_RESULTS = "pipes.results"  # materializations and checks reported
ATTR_ISSUES = "pipes.protocol_issues"
ATTR_MESSAGES = "pipes.messages"


def run_attributes(launcher: str, command: str | Sequence[str] | None, context_data: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """The attributes a run starts with (each a str or a list of str: what every observer can record)."""
    attributes: dict[str, Any] = {ATTR_LAUNCHER: launcher, ATTR_RUN_ID: str(context_data.get(CONTEXT_RUN_ID))}
    if command is not None:
        attributes[ATTR_COMMAND] = command if isinstance(command, str) else [str(word) for word in command]
    keys = context_data.get(CONTEXT_ASSET_KEYS)
    if keys:
        attributes[ATTR_ASSET_KEYS] = [str(key) for key in keys]
    partition = context_data.get(CONTEXT_PARTITION_KEY)
    if partition is not None:
        attributes[ATTR_PARTITION] = str(partition)
    return attributes


# A log message, an issue's reason or a remote exception is cut to this many characters in a span event or a trace
# file (neither is a log store: the full text is in the run's logger and its invocation).
EVENT_TEXT_CHARS = 1000


def cut_text(text: object) -> str:
    """``text`` as a str of at most :data:`EVENT_TEXT_CHARS` characters (and "..." when cut)."""
    text = str(text)
    return text if len(text) <= EVENT_TEXT_CHARS else text[:EVENT_TEXT_CHARS] + "..."


def outcome_of(error: BaseException | None) -> str:
    """:data:`OUTCOME_SUCCEEDED`, or the error's class name."""
    return OUTCOME_SUCCEEDED if error is None else type(error).__name__


class RunObserver:
    """Observes one run (module doc). Every method does nothing here; an observer overrides what it needs. One
    observer object may watch many runs only if it says so: the library's make one per run."""

    def started(self, attributes: Mapping[str, Any]) -> None:
        """The session is open; ``attributes``: the run's (:func:`run_attributes`)."""

    def child_env(self) -> dict[str, str]:
        """Env vars to set in the external process (asked once, before the launch)."""
        return {}

    def phase(self, name: str) -> None:
        """The run entered phase ``name`` (:data:`PHASES`), which ends the previous one."""

    def message(self, method: str, params: Mapping[str, Any], size: int) -> None:
        """A valid message arrived: its ``method``, ``params`` and its line's size in bytes (0: it was not read
        as a line). Called on the reader's thread, or on the loop."""

    def event(self, event: PipesEvent) -> None:
        """An event of the run (results, logs, opened / closed, protocol issues...), as ``on_event`` gets it."""

    def finished(self, invocation: PipesClientCompletedInvocation | None, error: BaseException | None) -> None:
        """The verdict: what the run produced (None when no session was open), and what it raises (None: it
        succeeded)."""
