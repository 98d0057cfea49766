"""Plan the runs (case x channel combination), launch the harness for each with ``pipes_core`` as the
orchestrator, and judge what arrived.

One run: ``PipesSubprocessClient`` (non-strict: the suite judges by its own rules) with the combination's
context injector and message reader from the channel registry, the bootstrap params as env vars or CLI
arguments appended to the command, and the run's timeout (then the harness's process group is killed at once);
the client drains the channel, then the suite compares. On the ``stdio`` message channel the harness's stdout
goes through ``PipesStdioMessageReader``: its lines that are not messages are kept as the harness's output.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import IO, Any

from pipes_core import (
    PipesContextInjector,
    PipesError,
    PipesEvent,
    PipesExecutionError,
    PipesLaunchedProcess,
    PipesMessageReader,
    PipesRunContext,
    PipesStdioMessageReader,
    PipesSubprocessClient,
    PipesTimeoutError,
    PipesTransportError,
    event_to_json,
)
from pipes_core.channels.registry import PipesChannelOptions, make_context_injector, make_message_reader
from pipes_core.protocol.failures import last_line
from pipes_ext._protocol import (
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    LOG_LEVELS,
    METHOD_LOG,
    PIPES_PROTOCOL_VERSION,
    PIPES_PROTOCOL_VERSION_FIELD,
    normalize_log_level,
)

from ._capabilities import BOOTSTRAP_MODES, CONTEXT_CHANNELS, MESSAGE_CHANNELS, Capabilities
from ._cases import Case, ExceptionSpec, Seen
from ._compare import first_difference, short
from ._schema import message_problem
from ._servers import BLOB_STORES, BlobServer, start_store, unavailable_reason

__all__ = [
    "BLOB_STORE_ENV_VAR",
    "Combo",
    "Planned",
    "Result",
    "plan",
    "run_plan",
    "DEFAULT_TIMEOUT",
    "READER_INTERVAL",
]

BLOB_STORE_ENV_VAR = "PIPES_CONFORMANCE_BLOB_STORE"
DEFAULT_TIMEOUT = 60.0
# How often the blob-store readers poll: short, so a run waits little for its last chunk.
READER_INTERVAL = 0.05
# How long to wait for the stdio pipe's end after the harness exited (a grandchild may hold it open).
STDIO_EOF_TIMEOUT = 10.0
# The suite's channel names that the registry calls otherwise: the suite's "file" is a private temp file.
_REGISTRY_NAMES = {"file": "tempfile"}

# Harness processes running now, killed (by process group) if the suite itself is interrupted.
_RUNNING: set[PipesLaunchedProcess] = set()
_RUNNING_LOCK = threading.Lock()

# The external process's log messages and the session's warnings are part of the outcome, not console output.
_QUIET = logging.getLogger("conformance.external")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Combo:
    bootstrap: str
    context: str
    messages: str

    @property
    def label(self) -> str:
        return f"{self.bootstrap}/{self.context}/{self.messages}"

    @property
    def stores(self) -> set[str]:
        return {c for c in (self.context, self.messages) if c in BLOB_STORES}


@dataclass
class Planned:
    case: Case
    combo: Combo
    skip: str | None = None


@dataclass
class Result:
    case: str
    combo: Combo
    status: str  # "pass" | "fail" | "skip"
    reason: str = ""
    duration: float = 0.0
    returncode: int | None = None
    stderr_tail: str = ""
    variant: str = ""  # the parameters of a run beyond its channels (community mode), "" when none


# ------------------------------------------------------------------------------------------------ planning


def _default(declared: Sequence[str], preferred: Sequence[str]) -> str:
    for choice in preferred:
        if choice in declared:
            return choice
    return declared[0]


def _combos(case: Case, caps: Capabilities) -> list[Combo]:
    """Every combination of the case's scope, declared or not (the undeclared are reported as skipped)."""
    boot = _default(caps.bootstrap, ("env", "cli"))
    context = _default(caps.context_channels, ("env", "file"))
    messages = _default(caps.message_channels, ("file", "stdio"))
    if case.scope == "full":
        return [Combo(b, c, m) for b in BOOTSTRAP_MODES for c in CONTEXT_CHANNELS for m in MESSAGE_CHANNELS]
    if case.scope == "context":
        return [Combo(b, c, messages) for b in BOOTSTRAP_MODES for c in CONTEXT_CHANNELS]
    return [Combo(boot, context, m) for m in MESSAGE_CHANNELS]


def _skip_reason(case: Case, combo: Combo, caps: Capabilities) -> str | None:
    missing = [f for f in case.requires if f not in caps.features]
    if missing:
        return f"feature {', '.join(missing)} not declared"
    if combo.bootstrap not in caps.bootstrap:
        return f"bootstrap {combo.bootstrap!r} not declared"
    if combo.context not in caps.context_channels:
        return f"context channel {combo.context!r} not declared"
    if combo.messages not in caps.message_channels:
        return f"message channel {combo.messages!r} not declared"
    if combo.messages in case.skip_messages:
        return case.skip_messages[combo.messages]
    if len(combo.stores) > 1:
        return (f"two blob stores in one run (context {combo.context}, messages {combo.messages}): the harness "
                f"contract has one blob-store hint ({BLOB_STORE_ENV_VAR})")
    for store in sorted(combo.stores):
        reason = unavailable_reason(store)
        if reason:
            return reason
    return None


STREAM_OP = "stream"
STREAM_FEATURE = "external_stream"


def without_streams(case: Case) -> Case:
    """``case`` for a harness without ``log_external_stream``: its ``stream`` steps, and the messages they produce,
    are left out, so one missing feature does not fail cases about something else."""
    steps = tuple(step for step in case.steps if step.get("op") != STREAM_OP)
    if len(steps) == len(case.steps) or case.body is None:
        return case
    body = case.body

    def without(context_data: dict[str, Any]) -> list[dict[str, Any]]:
        return [m for m in body(context_data) if m["method"] != "log_external_stream"]

    return replace(case, steps=steps, body=without)


def plan(cases: Sequence[Case], caps: Capabilities) -> list[Planned]:
    if STREAM_FEATURE not in caps.features:
        cases = [case if STREAM_FEATURE in case.requires else without_streams(case) for case in cases]
    return [Planned(case, combo, _skip_reason(case, combo, caps)) for case in cases for combo in _combos(case, caps)]


# ------------------------------------------------------------------------------------------------ channels


def _options(server: BlobServer | None, capture: bool = False) -> PipesChannelOptions:
    if server is None:
        return PipesChannelOptions(include_stdio_in_messages=capture, stdio_drain_timeout_seconds=STDIO_EOF_TIMEOUT)
    return PipesChannelOptions(bucket=server.bucket, client=server.make_client(), interval=READER_INTERVAL,
                               include_stdio_in_messages=capture)


def _injector(channel: str, server: BlobServer | None) -> PipesContextInjector:
    return make_context_injector(_REGISTRY_NAMES.get(channel, channel), _options(server))


def _reader(channel: str, server: BlobServer | None, capture: bool) -> PipesMessageReader:
    return make_message_reader(_REGISTRY_NAMES.get(channel, channel), _options(server, capture))


# ------------------------------------------------------------------------------------------------ events


def event_json(event: PipesEvent) -> dict[str, Any]:
    """A message as the suite compares it: ``method`` and what ``pipes_core`` decoded (``event_to_json``'s
    wire form)."""
    return event_to_json(event, "wire")


# ------------------------------------------------------------------------------------------------ literals

# The level names the protocol fixes (Python's own): the orchestrator tolerates "info" or "WARN", the suite does not.
LEVEL_NAMES = frozenset(name for name in (normalize_log_level(level) for level in LOG_LEVELS) if name)


class LiteralChecker:
    """Checks what the protocol fixes as a literal in every message as sent: the envelope version and the log level
    names (method names, severities, stream names and metadata types are already checked by validation); then the
    whole message against message.schema.json (conformance/_schema.py). Keeps only the first deviation of each kind
    and a count, so a harness that gets it wrong 10,000 times costs nothing."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None
        self.schema_count = 0
        self.schema_first: str | None = None
        self._index = 0
        self._lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        with self._lock:
            index = self._index
            self._index += 1
        problem = None
        version = message.get(PIPES_PROTOCOL_VERSION_FIELD)
        if version != PIPES_PROTOCOL_VERSION:
            problem = (f"message {index} ({message['method']}) has {PIPES_PROTOCOL_VERSION_FIELD} {version!r}; the "
                       f"protocol fixes {PIPES_PROTOCOL_VERSION!r}")
        elif message["method"] == METHOD_LOG and message["params"].get("level", "INFO") not in LEVEL_NAMES:
            problem = (f"message {index} (log) has level {message['params'].get('level')!r}; the protocol's level "
                       f"names are {', '.join(sorted(LEVEL_NAMES, key=LOG_LEVELS.__getitem__))}")
        if problem is not None:
            with self._lock:
                self.count += 1
                if self.first is None:
                    self.first = problem
            return
        against_schema = message_problem(message)
        if against_schema is not None:
            with self._lock:
                self.schema_count += 1
                if self.schema_first is None:
                    self.schema_first = f"message {index} ({message['method']}) breaks message.schema.json: " \
                                        f"{against_schema}"


# ------------------------------------------------------------------------------------------------ one run


@dataclass
class Outcome:
    messages: list[dict[str, Any]] = field(default_factory=list)
    context_data: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    start_error: str | None = None
    channel_error: str | None = None
    timed_out: bool = False
    eof_missing: bool = False
    literal_count: int = 0
    literal_first: str | None = None
    schema_count: int = 0
    schema_first: str | None = None


def last_output_lines(text: str, lines: int = 3, chars: int = 400) -> str:
    """The last non-blank ``lines`` of a run's output joined by " / ", at most ``chars`` characters (for a
    result's one-line reason)."""
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    joined = " / ".join(kept)
    return joined if len(joined) <= chars else "..." + joined[-chars:]


def _base_env(server: BlobServer | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (DAGSTER_PIPES_CONTEXT_ENV_VAR, DAGSTER_PIPES_MESSAGES_ENV_VAR, BLOB_STORE_ENV_VAR)}
    if server is not None:
        env.update(server.env)
        env[BLOB_STORE_ENV_VAR] = server.store
    return env


def _read(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode("utf-8", "replace")


def execute(case: Case, combo: Combo, command: Sequence[str], servers: dict[str, BlobServer],
            timeout: float) -> Outcome:
    """Run ``case`` once over ``combo``; never raises for anything the harness or a channel does."""
    outcome = Outcome()
    server = next((servers[s] for s in sorted(combo.stores)), None)
    extras = {**case.extras, "conformance": {"case": case.name, "steps": [dict(s) for s in case.steps]}}
    events: list[PipesEvent] = []
    literals = LiteralChecker()
    try:
        injector = _injector(combo.context, server)
        reader = _reader(combo.messages, server, case.capture)
    except Exception as exc:  # a client that cannot be built: the run fails, the suite goes on
        outcome.start_error = f"cannot set up the channels: {type(exc).__name__}: {exc}"
        return outcome
    stdio = isinstance(reader, PipesStdioMessageReader)
    client = PipesSubprocessClient(context_injector=injector, message_reader=reader, strict=False,
                                   bootstrap=combo.bootstrap, inherit_env=False, termination_timeout_seconds=0)

    mine: list[PipesLaunchedProcess] = []

    def launched(process: PipesLaunchedProcess) -> None:
        mine.append(process)
        with _RUNNING_LOCK:
            _RUNNING.add(process)

    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        try:
            invocation = client.run(
                context=PipesRunContext(**case.run_context), command=list(command), extras=extras,
                env=_base_env(server), timeout_seconds=timeout, on_event=events.append, retain_messages=False,
                stdin=subprocess.DEVNULL, stdout=out_file, stderr=err_file, on_launched=launched, logger=_QUIET,
                external_stream_handler=lambda _stream, _text: None, on_message=literals,
            )
            outcome.returncode = invocation.exit_code
            outcome.context_data = dict(invocation.session.context_data)
        except PipesTimeoutError as exc:
            outcome.timed_out = True
            _record(outcome, exc)
        except PipesExecutionError as exc:  # non-zero exit, killed, a reported exception, or could not start
            if exc.invocation is None or exc.invocation.exit_status is None:
                outcome.start_error = str(exc).replace("external process", "harness", 1)
            _record(outcome, exc)
        except PipesTransportError as exc:
            outcome.channel_error = f"{type(exc).__name__}: {exc}"
            _record(outcome, exc)
        except PipesError as exc:
            outcome.channel_error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # the channel's SDK failed (e.g. the local server went away)
            outcome.channel_error = f"{type(exc).__name__}: {exc}"
        finally:
            with _RUNNING_LOCK:
                _RUNNING.difference_update(mine)
        outcome.stdout = _read(out_file)
        outcome.stderr = _read(err_file)
    if stdio:
        assert isinstance(reader, PipesStdioMessageReader)
        outcome.eof_missing = reader.unfinished_sources > 0
    outcome.messages = [event_json(e) for e in events]
    outcome.literal_count, outcome.literal_first = literals.count, literals.first
    outcome.schema_count, outcome.schema_first = literals.schema_count, literals.schema_first
    return outcome


def _record(outcome: Outcome, exc: PipesError) -> None:
    """What a failed run received: its exit code and context data."""
    invocation = exc.invocation
    if invocation is not None:
        outcome.returncode = invocation.exit_code
        outcome.context_data = dict(invocation.session.context_data)


# ------------------------------------------------------------------------------------------------ judging


def _check_exception(spec: ExceptionSpec, exc: dict[str, Any] | None) -> str | None:
    if exc is None:
        return f"closed carries no exception; expected one with message containing {spec.message!r}"
    if spec.message not in exc["message"]:
        return f"closed.exception.message is {short(exc['message'])}; expected it to contain {spec.message!r}"
    if not isinstance(exc["name"], str) or not exc["name"]:
        return f"closed.exception.name is {short(exc['name'])}; expected the error's type name"
    for link, wanted in (("cause", spec.cause), ("context", spec.context)):
        got = exc[link]
        if wanted is None and got is not None:
            return f"closed.exception.{link} is {short(got['message'])}; expected null"
        if wanted is not None:
            if got is None:
                return f"closed.exception.{link} is null; expected an exception with message containing {wanted!r}"
            if wanted not in got["message"]:
                return f"closed.exception.{link}.message is {short(got['message'])}; expected it to contain {wanted!r}"
    return None


def _exit_text(outcome: Outcome) -> str:
    where = f"exit code {outcome.returncode}"
    last = last_line(outcome.stderr).strip()
    return f"{where}; last stderr line: {short(last, 200)}" if last else where


def judge(case: Case, outcome: Outcome, timeout: float) -> str | None:
    """None when the run conforms, else the first difference found."""
    if outcome.start_error:
        return outcome.start_error
    if outcome.timed_out:
        return f"the harness did not exit within {timeout:g} s (killed); {_exit_text(outcome)}"
    if outcome.channel_error:
        return f"the context injector or message reader failed: {outcome.channel_error}"
    messages = outcome.messages
    methods = [m["method"] for m in messages]
    if "opened" not in methods:
        if messages:
            return f"the harness never sent opened (got {methods[0]} first); {_exit_text(outcome)}"
        return f"the harness never sent opened: no message arrived ({_exit_text(outcome)})"
    issues = [m for m in messages if m["method"] == "protocol_issue"]
    if issues:
        return f"protocol issue ({len(issues)} in all): {issues[0]['reason']}"
    if outcome.literal_first is not None:
        return f"wire literal ({outcome.literal_count} in all): {outcome.literal_first}"
    if outcome.schema_first is not None:
        return f"schema ({outcome.schema_count} in all): {outcome.schema_first}"
    if methods[0] != "opened":
        return f"the first message is {methods[0]}, not opened"
    if methods.count("opened") > 1:
        return f"opened arrived {methods.count('opened')} times"
    closed_at = [i for i, m in enumerate(methods) if m == "closed"]
    if case.closed:
        if not closed_at:
            return f"closed never arrived; {_exit_text(outcome)}"
        closed = messages[closed_at[0]]
        exc = closed["exception"]
        if case.exception is None and exc is not None:
            return f"closed carries an unexpected exception: {last_line(exc['message']).strip() or exc['name']}"
        if len(closed_at) > 1:
            return f"closed arrived {len(closed_at)} times"
        after = messages[closed_at[0] + 1:]
        if not case.streams_before_closed:
            after = [m for m in after if m["method"] != "log_external_stream"]
        if after:
            return f"{len(after)} message(s) arrived after closed, the first: {short(after[0], 160)}"
        if case.exception is not None:
            problem = _check_exception(case.exception, exc)
            if problem:
                return problem
        body = messages[1:closed_at[0]]
    else:
        if closed_at:
            return "closed arrived, but the harness was told to stop without closing"
        body = messages[1:]
    if case.body is not None:
        found = first_difference(case.body(outcome.context_data), body, "messages")
        if found:
            return found
    if case.exit_code is None:
        if outcome.returncode == 0:
            return "exit code 0; expected a non-zero exit code"
    elif outcome.returncode != case.exit_code:
        return f"expected exit code {case.exit_code}; got {_exit_text(outcome)}"
    if case.check is not None:
        found = case.check(Seen(messages, body, outcome.context_data, outcome.returncode, outcome.stdout,
                                outcome.stderr))
        if found:
            return found
    if outcome.eof_missing:
        return f"the harness's stdout stayed open {STDIO_EOF_TIMEOUT:g} s after it exited (a process left behind?)"
    return None


def run_one(case: Case, combo: Combo, command: Sequence[str], servers: dict[str, BlobServer],
            timeout: float) -> Result:
    started = time.monotonic()
    outcome = execute(case, combo, command, servers, timeout)
    problem = judge(case, outcome, timeout)
    return Result(case.name, combo, "fail" if problem else "pass", problem or "", time.monotonic() - started,
                  outcome.returncode, last_output_lines(outcome.stderr))


# ------------------------------------------------------------------------------------------------ the plan


def _start_servers(stores: set[str]) -> tuple[dict[str, BlobServer], dict[str, str]]:
    """Start the needed servers in parallel; the stores that failed to start, with why."""
    servers: dict[str, BlobServer] = {}
    failed: dict[str, str] = {}

    def start(store: str) -> None:
        try:
            servers[store] = start_store(store)
        except Exception as exc:
            failed[store] = f"{store} server failed to start: {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=start, args=(s,), daemon=True) for s in sorted(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return servers, failed


def run_plan(planned: Sequence[Planned], command: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
             jobs: int = 4, progress: Callable[[Result], None] | None = None) -> list[Result]:
    """Run every planned (not skipped) run, ``jobs`` at a time; results in plan order."""
    needed: set[str] = set().union(*(p.combo.stores for p in planned if p.skip is None))
    servers, failed = _start_servers(needed)
    try:
        results: list[Result | None] = [None] * len(planned)
        todo: list[int] = []
        for index, item in enumerate(planned):
            reason = item.skip or next((failed[s] for s in sorted(item.combo.stores) if s in failed), None)
            if reason:
                skipped = results[index] = Result(item.case.name, item.combo, "skip", reason)
                if progress:
                    progress(skipped)
            else:
                todo.append(index)
        # The heaviest runs first, so they do not end the whole run alone.
        heavy = {"large_payload", "many_messages"}
        todo.sort(key=lambda i: (planned[i].case.name not in heavy, not planned[i].combo.stores))

        def work(index: int) -> None:
            item = planned[index]
            result = run_one(item.case, item.combo, command, servers, timeout)
            results[index] = result
            if progress:
                progress(result)

        pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        try:
            for future in [pool.submit(work, i) for i in todo]:
                future.result()
        except BaseException:  # interrupted (or a bug): stop at once, leave no harness running
            pool.shutdown(wait=False, cancel_futures=True)
            with _RUNNING_LOCK:
                for process in list(_RUNNING):
                    process.kill()
            raise
        pool.shutdown()
        return [r for r in results if r is not None]
    finally:
        for server in servers.values():
            server.stop()
