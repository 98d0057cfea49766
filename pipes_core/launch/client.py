"""``PipesClient``: the launcher base, one lifecycle for every place an external process can run.

``PipesClient.run(*, context, extras=None, **kwargs)`` is the documented entry point of every client (the
local subprocess, a Docker container, a Ray job, a Slurm job...). Each client checks its own options, then hands
the run to :meth:`PipesClient.run_launcher`, which is written once and does the rest the same way for all:

1. open the session (the client's context injector and message reader, or the launcher's defaults);
2. call the launcher's ``launch(request)`` (a :class:`PipesLaunchRequest`: the bootstrap env vars or CLI
   arguments, and which output streams the lifecycle needs) and get a :class:`PipesLaunchedProcess`;
3. forward its output: the stream that carries the stdio message channel goes to the
   :class:`PipesStdioMessageReader`, whose other lines are the process's output; any other stream it
   provides is forwarded as is (to this process's stdout/stderr, or where the run says; with
   ``forward_stdio=False`` only its last :data:`OUTPUT_TAIL_BYTES` are kept, for error messages); a local
   process's stderr forwarded to ours is read and passed on (not inherited), so that its last line is known;
4. wait for it, up to ``timeout_seconds``; meanwhile SIGTERM to this process (main thread only) becomes an
   interruption;
5. on timeout, Ctrl-C or SIGTERM (Ctrl-C only with ``forward_termination``): ``interrupt()``, wait
   ``termination_timeout_seconds``; ``terminate()``, wait :data:`TERM_GRACE_SECONDS` (at most
   ``termination_timeout_seconds``); ``kill()``, wait :data:`KILL_WAIT_SECONDS`; then ``kill()`` once more to
   sweep anything left behind. A second Ctrl-C during that escalation kills at once and propagates;
6. drain: the output streams up to :data:`OUTPUT_DRAIN_SECONDS` after the end, then the message channel
   (leaving the session); then ``close()`` the launched process;
7. judge, by one set of rules (see :meth:`PipesClient.check`), raising one family of errors that all carry the
   :class:`PipesClientCompletedInvocation` (what was received so far) as ``.invocation``.

The run's observers (:mod:`pipes_core.observe.observer`: OpenTelemetry's, the run's ``observer=``) are told when the
session opens, each phase (launch: step 2; wait: 3-5; drain: 6), each message and event, and the verdict; the env
vars they give (the trace context) are added to the launch request's ``bootstrap_env``.

Hook interface (what a launcher writes)
---------------------------------------
* A subclass of :class:`PipesClient` whose ``run(*, context=None, extras=None, **options: Unpack[XRunOptions])``
  takes the shared :class:`~pipes_core.RunOptions` and its own (``XRunOptions``, a ``RunOptions`` subclass;
  ``@run_signature(XRunOptions)`` lists them all for ``help()``), and a ``launcher(options, where=...)`` that checks
  its own options and returns ``(launch, command, shared options)``; ``run`` returns ``self.run_launcher(launch,
  context=context, extras=extras, command=command, **shared)``. The lifecycle does the rest (the per-run logger
  and its ``pipes_run_id`` / ``pipes_command`` fields included). Its asyncio twin is a
  :class:`~pipes_core.launch.async_client.PipesAsyncClient` holding the sync client as ``config`` whose async ``run``
  does the same with ``await self.run_launcher(...)``: no option, no decision and no launch code is written twice.
* Optionally :meth:`PipesClient.default_context_injector` / :meth:`PipesClient.default_message_reader`: the
  channels used when the user passes none (the base: env context + stdio messages, which need nothing shared
  with the process; the subprocess client: temp files; Slurm: env + a messages file).
* ``launch(request: PipesLaunchRequest) -> PipesLaunchedProcess``: start the process with
  ``request.bootstrap_env`` in its environment and ``request.bootstrap_args`` appended to its command (one of
  the two is empty, per the client's ``bootstrap``); raise :class:`PipesExecutionError` (``exit_code=None``)
  when it cannot start, naming the cause. ``request.stdout_needed`` / ``stderr_needed`` say that the lifecycle
  needs that stream as a source (it carries the stdio messages, or output is not forwarded directly); a
  launcher may provide its streams always.
* A :class:`PipesLaunchedProcess` subclass, one per run:

  - ``description``: the subject of every message about it: "the external process 'python'", "the container
    3f2a... (image x)", "the Ray job raysubmit_...";
  - ``stdout`` / ``stderr``: a :data:`PipesByteSource` (a binary file object, or an iterable of byte chunks
    such as a log stream) or None when the process writes straight to its destination (an inherited fd);
    ``one_log = True`` (a class attribute) when its one source is a log carrying both streams (a Ray job's):
    a failure message then quotes that log's last line rather than a stderr line;
  - ``poll() -> bool``: has it ended? (cheap, never blocks long);
  - ``wait(timeout) -> bool``: block up to ``timeout`` seconds (None: without limit) for the end; True when it
    has ended. The default polls ``poll()`` every ``poll_interval_seconds`` on an event; override it when
    the engine can block (``Popen.wait``, ``container.wait``). Must let KeyboardInterrupt through;
  - ``exit_status() -> PipesExitStatus``: called once ended: the exit code (negative -N: killed by signal N),
    ``killed`` and a ``description`` when the end was not a plain exit ("was OOM-killed", "was killed by
    SIGKILL", "ended in job state STOPPED");
  - ``interrupt()`` / ``terminate()`` / ``kill()``: the three escalation steps (SIGINT / SIGTERM / SIGKILL;
    ``docker kill -s INT`` / ``stop`` / ``kill``; ``scancel --signal=INT`` / ``scancel`` / ``scancel -s KILL``;
    Ray: ``stop_job`` for all three). Each must be harmless when the process has already ended, and must not
    block for long;
  - ``close()``: release what the run holds (remove the container, close log streams); called exactly once, last,
    after the channel was drained, whatever happened.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pipes_core.channels.injectors import PipesContextInjector, PipesEnvContextInjector
from pipes_core.channels.readers import PipesMessageReader
from pipes_core.channels.stdio import (
    PipesByteSource,
    PipesOutputTarget,
    PipesStdioMessageReader,
    _chunks,
    as_output_writer,
    close_quietly,
)
from pipes_core.launch.invocation import OUTPUT_TAIL_BYTES, PipesClientCompletedInvocation
from pipes_core.launch.lifecycle import (
    CLIENT_LOG,
    ERROR_ISSUES_LISTED,
    KEYBOARD,
    KILL_WAIT_SECONDS,
    SESSION_LOG,
    SIGTERM,
    TERM_GRACE_SECONDS,
    Action,
    Begin,
    Done,
    PipesExitStatus,
    RunCore,
    RunFacts,
    Signal,
    Wait,
    judge,
    signal_name,
)
from pipes_core.launch.options import RUN_OPTION_DEFAULTS, RunOptions, Unpack, check_run_options, run_signature
from pipes_core.launch.process import DurableLaunch, PipesLaunchedProcess, PipesLaunchRequest
from pipes_core.launch.session import PipesSession, never_opened_hint, open_pipes_session
from pipes_core.observe.fanout import RunObservers, observers_for
from pipes_core.observe.observer import PHASE_DRAIN, PHASE_LAUNCH, PHASE_WAIT, run_attributes
from pipes_core.protocol.errors import PipesExecutionError
from pipes_core.protocol.failures import last_line
from pipes_core.protocol.handler import DEFAULT_LOGGER_NAME, command_logger
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._errors import PipesError, PipesUsageError
from pipes_ext._protocol import STREAM_STDERR, STREAM_STDOUT

__all__ = [
    "PipesClient",
    "PipesClientCompletedInvocation",
    "PipesLaunchRequest",
    "PipesLaunchedProcess",
    "PipesExitStatus",
    "BOOTSTRAP_ENV",
    "BOOTSTRAP_CLI",
    "BOOTSTRAPS",
    "TERM_GRACE_SECONDS",
    "KILL_WAIT_SECONDS",
    "OUTPUT_TAIL_BYTES",
    "OUTPUT_DRAIN_SECONDS",
    "signal_name",
]

# The two ways the bootstrap params reach the process.
BOOTSTRAP_ENV = "env"  # DAGSTER_PIPES_CONTEXT / DAGSTER_PIPES_MESSAGES env vars
BOOTSTRAP_CLI = "cli"  # --dagster-pipes-context / --dagster-pipes-messages appended to the command
BOOTSTRAPS = (BOOTSTRAP_ENV, BOOTSTRAP_CLI)

# After the process has ended, how long to wait for its output streams to reach their end (a background
# process it left behind may hold them open).
OUTPUT_DRAIN_SECONDS = 5.0
# The source of an invocation's ``last_output_line`` when the launcher has one log for both streams.
LOG_SOURCE = "log"

if TYPE_CHECKING:
    from pipes_core.launch.durable import DurableRun

client_logger = logging.getLogger("pipes_core")
# The attribute of a log record that names the fact it warns about, for a caller that says it another way (the
# command line's summary says a missing ``closed``), and the facts so named.
LOG_FACT = "pipes_fact"
FACT_MISSING_CLOSED = "missing_closed"
_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------- invocation


class _Tail:
    """The last ``limit`` bytes written to it, of one output ``stream`` (stdout or stderr)."""

    def __init__(self, stream: str, limit: int = OUTPUT_TAIL_BYTES) -> None:
        self.stream = stream
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._chunks.append(data)
            self._size += len(data)
            while self._size - len(self._chunks[0]) >= self._limit:
                self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        with self._lock:
            data = b"".join(self._chunks)[-self._limit :]
        return data.decode("utf-8", "replace")


def _sink(tail: _Tail, destination: Callable[[bytes], None] | None) -> Callable[[bytes], None]:
    if destination is None:
        return tail.write

    def write(data: bytes) -> None:
        tail.write(data)
        try:
            destination(data)
        except (OSError, ValueError):  # our own stdout closed: keep reading so the process never blocks
            pass

    return write


def read_to_end(source: PipesByteSource, sink: Callable[[bytes], object]) -> None:
    """Read ``source`` chunk by chunk into ``sink`` until its end (or until ``sink`` returns False: no one takes
    more), then close it. A stream closed under us (``close()`` of a launcher) ends it too."""
    try:
        for chunk in _chunks(source):
            if sink(chunk) is False:
                break
    except (OSError, ValueError):  # the stream was closed under us
        pass
    finally:
        close_quietly(source)


class _Pump:
    """Reads one output source to its end on a thread into a sink."""

    def __init__(self, source: PipesByteSource, sink: Callable[[bytes], None], name: str) -> None:
        self._source = source
        self._sink = sink
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"pipes-output:{name}")
        self._thread.start()

    def _run(self) -> None:
        read_to_end(self._source, self._sink)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class _TerminationRequested(BaseException):
    """Raised in the main thread by our SIGTERM handler while a process runs."""


@dataclass
class _Run:
    """The state of one run, filled in as it goes (by the sync driver here, or the asyncio one)."""

    options: RunOptions = field(default_factory=lambda: RunOptions())  # with RUN_OPTION_DEFAULTS filled in
    strict: bool = True
    started: float = 0.0
    session_log: logging.Logger | logging.LoggerAdapter[Any] = client_logger
    session: PipesSession | None = None
    process: PipesLaunchedProcess | None = None
    status: PipesExitStatus | None = None
    core: RunCore | None = None  # the decisions: timed out, terminated (SIGTERM), interrupted, crashed
    interrupt: BaseException | None = None  # KeyboardInterrupt (a cancellation in the asyncio twin), re-raised
    # after the verdict's invocation
    error: BaseException | None = None  # launch failure or a bug: raised as is (with the invocation)
    channel_error: Exception | None = None  # the message channel failed while draining
    tails: list[_Tail] = field(default_factory=list)
    pumps: list[_Pump] = field(default_factory=list)
    closing: list[Any] = field(default_factory=list)  # what the asyncio driver closes once the channel drained
    description: str = "the external process"
    log: logging.Logger | logging.LoggerAdapter[Any] = client_logger
    command: str | Sequence[str] | None = None  # as the user gave it
    observer: RunObservers | None = None  # OpenTelemetry's and the run's observer= (None: none, nothing to pay)

    durable: DurableRun | None = None  # a run with a launch_key

    def phase(self, name: str) -> None:
        """The run entered phase ``name`` (pipes_core.observe.observer): its observers are told."""
        if self.observer is not None:
            self.observer.phase(name)


# ---------------------------------------------------------------------------------------------- the client


class PipesClient(ABC):
    """Base class of every Pipes client: one lifecycle for every place a process can run (see module doc).

    Args:
        context_injector: how the context reaches the process; default :meth:`default_context_injector`.
        message_reader: how messages come back; default :meth:`default_message_reader` (a fresh one per run).
        forward_termination: on Ctrl-C, stop the process (escalating) before re-raising; timeouts and SIGTERM
            always stop it.
        forward_stdio: forward the process's output to this process's stdout/stderr; with False it is read and
            only the last :data:`OUTPUT_TAIL_BYTES` per stream are kept for error messages.
        termination_timeout_seconds: how long ``interrupt()`` gets before ``terminate()``.
        strict: raise when the process never opens the channel or breaks the protocol.
        bootstrap: ``"env"`` (the bootstrap params as env vars) or ``"cli"`` (as arguments appended to the
            command).
    """

    def __init__(
        self,
        *,
        context_injector: PipesContextInjector | None = None,
        message_reader: PipesMessageReader | None = None,
        forward_termination: bool = True,
        forward_stdio: bool = True,
        termination_timeout_seconds: float = 20,
        strict: bool = True,
        bootstrap: str = BOOTSTRAP_ENV,
    ) -> None:
        if bootstrap not in BOOTSTRAPS:
            raise PipesUsageError(f"bootstrap must be one of {', '.join(BOOTSTRAPS)}; got {bootstrap!r}")
        if not termination_timeout_seconds >= 0:  # also refuses nan
            raise PipesUsageError(f"termination_timeout_seconds must be >= 0, got {termination_timeout_seconds!r}")
        self.context_injector = context_injector
        self.message_reader = message_reader
        self.forward_termination = forward_termination
        self.forward_stdio = forward_stdio
        self.termination_timeout_seconds = termination_timeout_seconds
        self.strict = strict
        self.bootstrap = bootstrap

    @abstractmethod
    def run(
        self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
        **options: Unpack[RunOptions],
    ) -> PipesClientCompletedInvocation:
        """Run one external process in a Pipes session, synchronously, and return what it reported. Every client
        takes the :class:`~pipes_core.RunOptions`, and its own options besides."""

    # ------------------------------------------------------------------ channel defaults

    def default_context_injector(self) -> PipesContextInjector:
        """The context injector when none was given: the context inline in an env var."""
        return PipesEnvContextInjector()

    def default_message_reader(self) -> PipesMessageReader:
        """The message reader when none was given: messages on the process's stdout."""
        return PipesStdioMessageReader()

    def attach(self, handle: dict[str, Any], request: PipesLaunchRequest | None = None) -> PipesLaunchedProcess:
        """The launched process of a durable run, rebuilt from its recorded handle
        (:meth:`PipesLaunchedProcess.handle`); a launcher that supports ``launch_key`` overrides it. ``request``:
        the run re-attaching (its session, e.g. to see ``closed`` arrive); None when a run is managed from outside
        (``pipes runs stop``)."""
        raise PipesUsageError(f"{type(self).__name__} cannot re-attach to a run (launch_key= is not supported)")

    def find_launch(self, durable: DurableLaunch) -> dict[str, Any] | None:
        """The handle of the launch made for ``durable`` (a run's launch key) when it exists, else None: asked
        before launching, so that a launch whose handle never reached the store (its orchestrator died in
        between) is re-attached, not made twice. A launcher names what it launches by ``durable.name`` (a
        container's name, a Ray submission id, a Slurm job name) and looks it up by that name here."""
        return None

    def sweep_orphans(self) -> list[str]:
        """Stop what this launcher's engine runs that an orchestrator on this host launched without a launch key
        and that orchestrator is gone (:func:`pipes_core.launch.process.orphan_owner` of its labels); one line
        said per launch stopped. Called by ``pipes runs sweep`` and at the start of each durable run."""
        return []

    def _channels(self) -> tuple[PipesContextInjector, PipesMessageReader]:
        return (self.context_injector or self.default_context_injector(),
                self.message_reader or self.default_message_reader())

    # ------------------------------------------------------------------ the lifecycle

    @run_signature(RunOptions)
    def run_launcher(
        self,
        launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess],
        *,
        context: PipesRunContext | None = None,
        extras: Mapping[str, Any] | None = None,
        command: str | Sequence[str] | None = None,
        **options: Unpack[RunOptions],
    ) -> PipesClientCompletedInvocation:
        """The one lifecycle (module doc): session, launch, output, wait, escalation, drain, verdict; its
        decisions are those of :class:`pipes_core.launch.lifecycle.RunCore` and
        :func:`pipes_core.launch.lifecycle.judge`.

        Args:
            launch: starts the process for a :class:`PipesLaunchRequest` (see "Hook interface").
            command: the command as the user gave it (a list, or a shell string kept as is), for
                ``pipes_command``; None: the field is not set.
            options: the :class:`~pipes_core.RunOptions` (``timeout_seconds``, ``strict``, ``on_event``,
                ``stdout`` / ``stderr``, ``on_launched``, ``logger``...), each described there.

        Raises:
            PipesExecutionError: the process could not start, failed, was killed, never opened the channel or
                broke the protocol; :class:`PipesTimeoutError` / :class:`PipesInterruptedError` for a timeout or
                SIGTERM. ``.invocation`` holds what was received.
            PipesTransportError: the message channel failed; ``.invocation`` holds what was received.
            KeyboardInterrupt: re-raised after the process was stopped and the channel drained, with an
                ``invocation`` attribute.
        """
        run = self.begin_run(options, command)
        try:
            injector, reader = self._channels() if run.durable is None else run.durable.channels()
            if run.durable is not None:
                launch = run.durable.launcher(launch)
            try:
                with self.open_session(run, injector, reader, open_pipes_session, context, extras) as session:
                    self.observe_session(run, session, type(self).__name__)
                    try:
                        self._launch_and_wait(launch, session, reader, run)
                    except KeyboardInterrupt as exc:
                        run.interrupt = exc  # drain first (leaving the session), then re-raise
                    except BaseException as exc:
                        run.error = exc
                    run.phase(PHASE_DRAIN)  # leaving the block drains the channel
            except PipesError as exc:
                if run.session is None:
                    raise  # the channels could not be set up: nothing was launched
                run.channel_error = exc
            except Exception as exc:  # a channel's SDK failed while draining
                if run.session is None:
                    raise
                run.channel_error = exc
            finally:
                if run.process is not None:
                    try:
                        run.process.close()
                    except Exception:
                        run.log.exception("[pipes] releasing %s failed", run.description)
            return self.conclude(run)
        finally:
            if run.durable is not None:
                run.durable.release()

    def begin_run(self, options: RunOptions, command: str | Sequence[str] | None) -> _Run:
        """Check a run's options (each once, for the sync and the async driver) and start its record."""
        check_run_options(options, RunOptions, "run_launcher")
        timeout_seconds = options.get("timeout_seconds")
        if timeout_seconds is not None and not timeout_seconds > 0:  # also refuses nan
            raise PipesUsageError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        strict = options.get("strict")
        session_log, own_log = run_loggers(options.get("logger"), command)
        durable: DurableRun | None = None
        if options.get("launch_key") is not None:
            if type(self).attach is PipesClient.attach:
                raise PipesUsageError(
                    f"{type(self).__name__} cannot re-attach to a run: launch_key= is not supported by it; run "
                    "without launch_key")
            from pipes_core.launch.durable import DurableRun

            durable = DurableRun(self, options)
        elif options.get("store") is not None:
            raise PipesUsageError("store= is only used with launch_key=: pass launch_key too, or leave store out")
        return _Run(options=cast(RunOptions, {**RUN_OPTION_DEFAULTS, **options}),
                    strict=self.strict if strict is None else strict, started=time.monotonic(),
                    session_log=session_log, log=own_log, command=command,
                    observer=observers_for(options.get("observer")), durable=durable)

    @staticmethod
    def observe_session(run: _Run, session: PipesSession, launcher: str) -> None:
        """The session is open: keep it in the run, and tell the run's observers (they see its messages and
        events from now on). Shared with the asyncio driver; ``launcher``: the client's class name."""
        run.session = session
        if run.observer is not None:
            session.message_handler.observer = run.observer
            run.observer.started(run_attributes(launcher, run.command, session.context_data))

    def open_session(self, run: _Run, injector: PipesContextInjector, reader: Any, opener: Callable[..., _T],
                     context: PipesRunContext | None, extras: Mapping[str, Any] | None) -> _T:
        """``opener`` (:func:`open_pipes_session` or its asyncio twin) called with the run's session options."""
        options = run.options
        return opener(context, injector, reader, extras, on_event=options.get("on_event"),
                      retain_messages=options["retain_messages"], logger=run.session_log,
                      external_stream_handler=options.get("external_stream_handler"),
                      on_message=options.get("on_message"),
                      warn_unclosed=False,  # said once by the verdict, naming the process
                      warn_unopened=False)

    def new_core(self, run: _Run) -> RunCore:
        """The decisions of ``run`` (:class:`RunCore`), for the client's termination settings."""
        run.core = RunCore(timeout_seconds=run.options.get("timeout_seconds"),
                           termination_timeout_seconds=self.termination_timeout_seconds,
                           forward_termination=self.forward_termination, subject=run.description)
        return run.core

    def conclude(self, run: _Run) -> PipesClientCompletedInvocation:
        """After the drain: the invocation, then the interruption re-raised or the launch error raised (both
        carrying it), else the verdict. Shared with the asyncio driver (whose cancellation is ``run.interrupt``)."""
        assert run.session is not None  # the session opened, else we raised above
        observer = run.observer
        if observer is None:
            return self._conclude(run)
        try:
            invocation = self._conclude(run)
        except BaseException as exc:
            observer.finished(getattr(exc, "invocation", None), exc)
            raise
        observer.finished(invocation, None)
        return invocation

    def _conclude(self, run: _Run) -> PipesClientCompletedInvocation:
        assert run.session is not None
        invocation = PipesClientCompletedInvocation(
            run.session,
            exit_code=None if run.status is None else run.status.exit_code,
            exit_status=run.status,
            duration_seconds=time.monotonic() - run.started,
            output_tail=_joined_tails(run.tails),
            metadata=run.options.get("metadata"),
            description=run.description,
            **_last_output_line(run),
        )
        if run.interrupt is not None:
            run.interrupt.invocation = invocation  # type: ignore[attr-defined]  # documented: what arrived
            raise run.interrupt
        if run.error is not None:
            if isinstance(run.error, PipesError):
                run.error.invocation = invocation
            raise run.error
        if run.durable is not None:
            try:
                self._check_run(run, invocation)
            except BaseException as exc:
                run.durable.conclude(run.status, exc)
                raise
            run.durable.conclude(run.status, None)
            return invocation
        self._check_run(run, invocation)
        return invocation

    def _check_run(self, run: _Run, invocation: PipesClientCompletedInvocation) -> None:
        core = run.core
        options = run.options
        self.check(invocation, strict=run.strict, timed_out=core is not None and core.timed_out,
                   terminated=core is not None and core.terminated,
                   timeout_seconds=options.get("timeout_seconds"), channel_error=run.channel_error, logger=run.log,
                   fail_on_check_error=options["fail_on_check_error"],
                   raise_on_event_error=options["raise_on_event_error"])

    def launch_request(self, session: PipesSession, stdio: str | None, stdout: PipesOutputTarget | None,
                       stderr: PipesOutputTarget | None, run: _Run | None = None) -> PipesLaunchRequest:
        """What to ask of the launcher; ``stdio``: the stream the stdio message reader reads (or None); the
        ``run``'s observers add their env vars (the trace context: ``TRACEPARENT`` / ``TRACESTATE``)."""
        cli = self.bootstrap == BOOTSTRAP_CLI
        observed = {} if run is None or run.observer is None else run.observer.child_env()
        return PipesLaunchRequest(
            session=session,
            bootstrap_env={**observed, **({} if cli else session.get_bootstrap_env_vars())},
            bootstrap_args=session.get_bootstrap_argv() if cli else [],
            stdout_needed=stdio == STREAM_STDOUT or not self.forward_stdio or not _has_fileno(stdout),
            # stderr forwarded to ours is read and passed on rather than inherited, so that a failure can quote
            # its last line (a crash on import says why in the error, not only on a terminal nobody watches).
            stderr_needed=stdio == STREAM_STDERR or not self.forward_stdio or stderr is None
            or not _has_fileno(stderr),
        )

    def output_destination(self, stream: str, target: PipesOutputTarget | None,
                           reader_output: PipesOutputTarget | None) -> Callable[[bytes], None] | None:
        """Where a stream's output is forwarded (None: only its tail is kept): the run's ``stdout=`` /
        ``stderr=``, else the stdio reader's ``output`` for the stream it reads, else our own stream."""
        if not self.forward_stdio:
            return None
        if target is not None:
            return as_output_writer(target)
        if reader_output is not None:
            return as_output_writer(reader_output)
        return _own_stream(stream)

    def _launch_and_wait(
        self,
        launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess],
        session: PipesSession,
        reader: PipesMessageReader,
        run: _Run,
    ) -> None:
        """Launch, then carry out the core's actions (the sync driver)."""
        options = run.options
        stdio = reader.stream if isinstance(reader, PipesStdioMessageReader) else None
        run.phase(PHASE_LAUNCH)
        process = launch(self.launch_request(session, stdio, options.get("stdout"), options.get("stderr"), run))
        run.phase(PHASE_WAIT)
        run.process = process
        run.description = process.description
        core = self.new_core(run)
        previous_handler = _install_sigterm_handler()
        failure: BaseException | None = None
        interrupt: BaseException | None = None
        action: Action = core.first()
        try:
            while not isinstance(action, Done):
                try:
                    if isinstance(action, Begin):
                        on_launched = options.get("on_launched")
                        if on_launched is not None:
                            on_launched(process)
                        self._start_output(process, reader, run)
                        action = core.begun()
                    elif isinstance(action, Wait):
                        action = core.waited(process.wait(action.seconds))
                    elif isinstance(action, Signal):
                        getattr(process, action.step)()
                        action = core.proceed()
                    else:
                        run.log.log(action.level, "%s", action.message)
                        action = core.proceed()
                except KeyboardInterrupt as exc:
                    interrupt = interrupt or exc
                    action = core.interrupted_by(KEYBOARD)
                except _TerminationRequested:
                    action = core.interrupted_by(SIGTERM)
                except BaseException as exc:  # the run cannot go on (e.g. its output cannot be read)
                    failure = failure or exc
                    action = core.failed()
        finally:
            _restore_sigterm_handler(previous_handler)
            run.phase(PHASE_DRAIN)
            # One shared deadline: a leftover process holding both streams costs it once, not per stream.
            deadline = time.monotonic() + OUTPUT_DRAIN_SECONDS
            for pump in run.pumps:
                pump.join(max(0.0, deadline - time.monotonic()))
            if process.poll():
                run.status = process.exit_status()
            else:
                run.status = PipesExitStatus(None, description="was left running")
        if interrupt is not None:
            raise interrupt
        if failure is not None:
            raise failure

    def _start_output(self, process: PipesLaunchedProcess, reader: PipesMessageReader, run: _Run) -> None:
        stdio = reader.stream if isinstance(reader, PipesStdioMessageReader) else None
        for stream, source, target in ((STREAM_STDOUT, process.stdout, run.options.get("stdout")),
                                       (STREAM_STDERR, process.stderr, run.options.get("stderr"))):
            if source is None:
                if stream == stdio:
                    raise PipesUsageError(
                        f"the stdio message reader reads the process's {stream}, but {process.description} "
                        "provides no such stream")
                continue
            tail = _Tail(stream)
            run.tails.append(tail)
            reader_output = reader.output if stream == stdio and isinstance(reader, PipesStdioMessageReader) else None
            sink = _sink(tail, self.output_destination(stream, target, reader_output))
            if stream == stdio:
                assert isinstance(reader, PipesStdioMessageReader)
                reader.consume(source, output=sink, name=f"the {stream} of {process.description}")
            else:
                run.pumps.append(_Pump(source, sink, stream))

    # ------------------------------------------------------------------ verdict

    def check(
        self,
        invocation: PipesClientCompletedInvocation,
        *,
        strict: bool,
        timed_out: bool = False,
        terminated: bool = False,
        timeout_seconds: float | None = None,
        channel_error: Exception | None = None,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        fail_on_check_error: bool = False,
        raise_on_event_error: bool = True,
    ) -> None:
        """Judge a finished run; raises on failure, every error carrying ``invocation``. In this order:

        ran past its timeout (:class:`PipesTimeoutError`); the orchestrator got SIGTERM
        (:class:`PipesInterruptedError`); the message channel failed (:class:`PipesTransportError`); killed or
        non-zero exit (strict and never opened: said as a crash before opening the channel), with the reported
        exception, else the last stderr line; no exit status; exited 0 but reported an exception; exited 0 and
        never opened (strict: an error with what to check; else a warning on the run's logger); strict: protocol
        issues; ``raise_on_event_error`` (default on): the ``on_event`` callback raised (the first exception
        chained as ``__cause__``; with it off, callback exceptions are only logged); with
        ``fail_on_check_error``, a check of severity ERROR failed (as ``pipes run --fail-on-check-error``).
        Opened but no ``closed``: a warning, and ``invocation.missing_closed``.

        The rules are :func:`pipes_core.launch.lifecycle.judge` (no I/O); this method gathers the facts, logs the
        warnings and raises. Each message states each fact once 
        (see :func:`pipes_core.protocol.failures.failure_details`):
        the headline says how it ended and why; the details add the reported traceback and the output tail
        without what the headline said.
        """
        session = invocation.session
        handler = session.message_handler
        status = invocation.exit_status or PipesExitStatus(None)
        verdict = judge(RunFacts(
            subject=invocation.description, status=status, strict=strict, opened=session.opened,
            remote=session.exception, output_tail=invocation.output_tail,
            last_output_line=invocation.last_output_line,
            last_output_line_source=invocation.last_output_line_source, timed_out=timed_out, terminated=terminated,
            timeout_seconds=timeout_seconds, forward_termination=self.forward_termination,
            bootstrap_cli=self.bootstrap == BOOTSTRAP_CLI, channel_error=channel_error,
            never_opened_hint="" if session.opened else never_opened_hint(session),
            issue_count=session.issue_count,
            protocol_issues=session.protocol_issues[:ERROR_ISSUES_LISTED] if strict else (),
            callback_errors=handler.callback_errors, raise_on_event_error=raise_on_event_error,
            fail_on_check_error=fail_on_check_error, failed_error_check_count=handler.failed_error_check_count,
            missing_closed=invocation.missing_closed,
        ))
        for where, text in verdict.warnings:
            # The client's warning of a run that succeeded is its missing ``closed`` (see judge): tagged, so that
            # a caller that says it elsewhere (pipes run's summary) can leave the log line out.
            fact = {LOG_FACT: FACT_MISSING_CLOSED} if where == CLIENT_LOG and invocation.missing_closed else {}
            (handler.logger if where == SESSION_LOG else logger or client_logger).warning("%s", text, extra=fact)
        if verdict.error is None:
            return
        if issubclass(verdict.error, PipesExecutionError) and verdict.carries_details:
            error: PipesError = verdict.error(verdict.message, exit_code=status.exit_code,
                                              remote_exception=session.exception, invocation=invocation,
                                              output_tail=invocation.output_tail, kind=verdict.kind)
        else:
            error = verdict.error(verdict.message)
            error.invocation = invocation  # every run error carries it
        if verdict.cause is not None:
            raise error from verdict.cause
        raise error


def run_loggers(logger: logging.Logger | logging.LoggerAdapter[Any] | None, command: str | Sequence[str] | None,
                ) -> tuple[logging.Logger | logging.LoggerAdapter[Any], logging.Logger | logging.LoggerAdapter[Any]]:
    """The two loggers of one run: the session's (the user's ``logger``, default ``pipes_core.external``, adding
    ``pipes_command`` to every record; the session adds ``pipes_run_id``) and the client's own, for its warnings
    about the run (the same one when the user gave a logger, else ``pipes_core``)."""
    if command is None:
        session_logger: logging.Logger | logging.LoggerAdapter[Any] = logger or logging.getLogger(DEFAULT_LOGGER_NAME)
        return session_logger, client_logger if logger is None else session_logger
    wrapped = command_logger(logger, command)
    return wrapped, client_logger if logger is None else wrapped


def _last_output_line(run: _Run) -> dict[str, str]:
    """The invocation's ``last_output_line`` and its source: from the one log of a launcher that has one for both
    streams (:attr:`PipesLaunchedProcess.one_log`), else from the stderr the lifecycle read."""
    if run.process is not None and run.process.one_log:
        return {"last_output_line": last_line("".join(tail.text() for tail in run.tails)),
                "last_output_line_source": LOG_SOURCE}
    stderr = [tail for tail in run.tails if tail.stream == STREAM_STDERR]
    return {"last_output_line": last_line("".join(tail.text() for tail in stderr)),
            "last_output_line_source": STREAM_STDERR}


def _joined_tails(tails: list[_Tail]) -> str:
    """The streams' tails one after the other, each starting on a line of its own."""
    texts = [text for text in (tail.text() for tail in tails) if text]
    return "".join(text if text.endswith("\n") or i == len(texts) - 1 else text + "\n"
                   for i, text in enumerate(texts))


def _has_fileno(target: PipesOutputTarget | None) -> bool:
    """None (inherit ours) or a file with a real descriptor can be handed to a local process directly."""
    if target is None:
        return True
    fileno = getattr(target, "fileno", None)
    if fileno is None:
        return False
    try:
        fileno()
    except (OSError, ValueError, AttributeError):
        return False
    return True


def _own_stream(stream: str) -> Callable[[bytes], None]:
    return as_output_writer(sys.stdout if stream == STREAM_STDOUT else sys.stderr)


def _install_sigterm_handler() -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise _TerminationRequested()

    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # pragma: no cover - not the main interpreter
        return None


def _restore_sigterm_handler(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
