"""``pipes run --trace FILE``: a run as a Chrome trace-event file (it opens in Perfetto or ``chrome://tracing``).

No OpenTelemetry needed. The file is the trace-event format's JSON array form, written as the run goes (one event
a line, so memory stays flat however many messages arrive) and closed with ``]`` when the run ends:

* metadata events (``ph`` ``M``) naming the process (the run) and its two tracks: the lifecycle and the messages;
* the run and its phases (launch, wait, drain) as complete events (``ph`` ``X``, with ``dur``), on the
  lifecycle track, each written when it ends (the run's ``args``: its attributes, outcome and exit code);
* each message as an instant event (``ph`` ``i``) on the messages track, named by its method, with its asset key
  (``args.asset_key``) when it has one, a log's level and text (``args.level``, ``args.message``), a check's name;
  each protocol issue as an instant event ``protocol_issue`` with its kind and reason.

Times (``ts``, ``dur``) are whole microseconds from the writer's creation, on the monotonic clock.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

from pipes_core.observe.observer import ATTR_EXIT_CODE, ATTR_OUTCOME, ATTR_PROCESS, RunObserver, cut_text, outcome_of
from pipes_core.protocol.results import PipesProtocolIssue
from pipes_ext._protocol import (
    METHOD_LOG,
    PARAM_ASSET_KEY,
    PARAM_CHECK_NAME,
    PARAM_LEVEL,
    PARAM_MESSAGE,
)

if TYPE_CHECKING:
    from pipes_core.launch.invocation import PipesClientCompletedInvocation
    from pipes_core.protocol.results import PipesEvent

__all__ = ["TraceFileWriter", "TRACE_PHASE_COMPLETE", "TRACE_PHASE_INSTANT", "TRACE_PHASE_METADATA",
           "TRACK_LIFECYCLE", "TRACK_MESSAGES"]

# The trace-event format's phases ("ph") used here, and its other field names.
TRACE_PHASE_COMPLETE = "X"
TRACE_PHASE_INSTANT = "i"
TRACE_PHASE_METADATA = "M"
INSTANT_SCOPE_THREAD = "t"
METADATA_PROCESS_NAME = "process_name"
METADATA_THREAD_NAME = "thread_name"
# The tracks (the format's thread ids) of the run's one process.
TRACE_PID = 1
TRACK_LIFECYCLE = 1
TRACK_MESSAGES = 2
# Event names and categories.
EVENT_RUN = "run"
EVENT_ISSUE = "protocol_issue"
CATEGORY_LIFECYCLE = "lifecycle"
CATEGORY_MESSAGE = "message"
CATEGORY_ISSUE = "issue"


class TraceFileWriter(RunObserver):
    """Writes one run to ``target`` (a path, or a text file left open) as trace events (module doc). Pass it as
    a run's ``observer=``; one writer per run."""

    def __init__(self, target: str | os.PathLike[str] | IO[str]) -> None:
        if isinstance(target, (str, os.PathLike)):
            self._file: IO[str] = open(target, "w", encoding="utf-8")
            self._owned = True
        else:
            self._file = target
            self._owned = False
        self._lock = threading.Lock()
        self._origin = time.monotonic_ns()
        self._first = True
        self._ended = False
        self._run_started: int | None = None
        self._attributes: dict[str, Any] = {}
        self._phase: tuple[str, int] | None = None
        self._file.write("[\n")

    def _now(self) -> int:
        """Whole microseconds since the writer's creation (integers: a phase's end, ts + dur, is exact)."""
        return (time.monotonic_ns() - self._origin) // 1000

    def _write(self, event: dict[str, Any]) -> None:
        """One event, as a line of the array (under the lock)."""
        if self._ended:
            return
        self._file.write(("" if self._first else ",\n") + json.dumps(event, default=str))
        self._first = False

    def started(self, attributes: Mapping[str, Any]) -> None:
        with self._lock:
            self._run_started = self._now()
            self._attributes = dict(attributes)
            base = {"pid": TRACE_PID, "ts": 0}
            self._write({**base, "tid": TRACK_LIFECYCLE, "ph": TRACE_PHASE_METADATA, "name": METADATA_PROCESS_NAME,
                         "args": {"name": f"pipes run {attributes.get('pipes.run_id', '')}"}})
            self._write({**base, "tid": TRACK_LIFECYCLE, "ph": TRACE_PHASE_METADATA, "name": METADATA_THREAD_NAME,
                         "args": {"name": CATEGORY_LIFECYCLE}})
            self._write({**base, "tid": TRACK_MESSAGES, "ph": TRACE_PHASE_METADATA, "name": METADATA_THREAD_NAME,
                         "args": {"name": "messages"}})

    def _end_phase(self, now: int) -> None:
        if self._phase is not None:
            name, began = self._phase
            self._write({"name": name, "cat": CATEGORY_LIFECYCLE, "ph": TRACE_PHASE_COMPLETE, "ts": began,
                         "dur": now - began, "pid": TRACE_PID, "tid": TRACK_LIFECYCLE})
            self._phase = None

    def phase(self, name: str) -> None:
        with self._lock:
            now = self._now()
            self._end_phase(now)
            self._phase = (name, now)

    def message(self, method: str, params: Mapping[str, Any], size: int) -> None:
        args: dict[str, Any] = {}
        if isinstance(params, Mapping):
            asset_key = params.get(PARAM_ASSET_KEY)
            if asset_key is not None:
                args["asset_key"] = asset_key
            check_name = params.get(PARAM_CHECK_NAME)
            if check_name is not None:
                args["check_name"] = check_name
            if method == METHOD_LOG:
                args["level"] = params.get(PARAM_LEVEL)
                args["message"] = cut_text(params.get(PARAM_MESSAGE))
        with self._lock:
            self._write({"name": method, "cat": CATEGORY_MESSAGE, "ph": TRACE_PHASE_INSTANT,
                         "s": INSTANT_SCOPE_THREAD, "ts": self._now(), "pid": TRACE_PID, "tid": TRACK_MESSAGES,
                         "args": args})

    def event(self, event: PipesEvent) -> None:
        if not isinstance(event, PipesProtocolIssue):
            return  # messages are written by message()
        with self._lock:
            self._write({"name": EVENT_ISSUE, "cat": CATEGORY_ISSUE, "ph": TRACE_PHASE_INSTANT,
                         "s": INSTANT_SCOPE_THREAD, "ts": self._now(), "pid": TRACE_PID, "tid": TRACK_MESSAGES,
                         "args": {"kind": str(event.kind.value), "reason": cut_text(event.reason)}})

    def finished(self, invocation: PipesClientCompletedInvocation | None, error: BaseException | None) -> None:
        with self._lock:
            if self._ended:
                return
            now = self._now()
            self._end_phase(now)
            if self._run_started is not None:
                args = {**self._attributes, ATTR_OUTCOME: outcome_of(error)}
                if invocation is not None:
                    args[ATTR_PROCESS] = invocation.description
                    args[ATTR_EXIT_CODE] = invocation.exit_code
                if error is not None:
                    args["error"] = cut_text(str(error).split("\n", 1)[0])
                self._write({"name": EVENT_RUN, "cat": CATEGORY_LIFECYCLE, "ph": TRACE_PHASE_COMPLETE,
                             "ts": self._run_started, "dur": now - self._run_started, "pid": TRACE_PID,
                             "tid": TRACK_LIFECYCLE, "args": args})
            self._file.write("\n]\n")
            self._ended = True
            self._file.flush()
            if self._owned:
                self._file.close()

    def close(self) -> None:
        """End the file without a run (e.g. the run could not start): a valid, possibly empty, trace."""
        self.finished(None, None)
