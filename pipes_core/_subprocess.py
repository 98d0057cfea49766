"""``PipesSubprocessClient``: run a command as a Pipes external process and collect its results.

Lifecycle rules (strict by default):

* a command that cannot be started raises :class:`PipesExecutionError` (and leaves no temp files);
* a non-zero exit raises, carrying the remote exception (type, message, stack, cause chain) if one was
  reported; a process killed by a signal raises naming the signal;
* a process that exits 0 without ever sending ``opened`` raises ("never opened the Pipes channel"), unless
  ``strict=False`` (for commands that are not Pipes-aware);
* protocol issues (malformed lines, unknown methods, unselected or duplicate assets) raise in strict mode;
* opened but no ``closed``: a warning and ``missing_closed`` on the result.

Termination: on KeyboardInterrupt, SIGTERM to this process (main thread only) or ``timeout_seconds``, with
``forward_termination`` on, the child's whole process group gets SIGINT, then after
``termination_timeout_seconds`` SIGTERM, then after :data:`TERM_GRACE_SECONDS` SIGKILL. The channel is still
drained, and the interruption is re-raised (or a :class:`PipesTimeoutError` raised).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import IO, Any

from ._errors import PipesExecutionError, PipesInterruptedError, PipesTimeoutError, PipesUsageError
from ._injectors import PipesContextInjector, PipesTempFileContextInjector
from ._readers import PipesMessageReader, PipesTempFileMessageReader
from ._results import AssetCheckResult, MaterializeResult, PipesEvent, PipesExecutionResult
from ._run_context import PipesRunContext
from ._session import PipesSession, open_pipes_session

__all__ = [
    "PipesSubprocessClient",
    "PipesClientCompletedInvocation",
    "TERM_GRACE_SECONDS",
    "OUTPUT_TAIL_BYTES",
]

# After SIGTERM, how long the process group gets before SIGKILL. SIGINT already had the full
# termination_timeout_seconds to clean up; SIGTERM is the last polite request.
TERM_GRACE_SECONDS = 5.0
# With forward_stdio=False the child's output is read continuously (so it never blocks on a full pipe) and
# only this many trailing bytes per stream are kept, for the error message.
OUTPUT_TAIL_BYTES = 64 * 1024
# After the child exits, how long to wait for its output pipes to reach end-of-file (a background process it
# left behind may hold them open).
OUTPUT_DRAIN_SECONDS = 5.0

logger = logging.getLogger("pipes_core")


class _TerminationRequested(BaseException):
    """Raised in the main thread by our SIGTERM handler while a child runs."""


class _TailReader:
    """Reads a pipe to its end on a thread, keeping the last ``limit`` bytes."""

    def __init__(self, pipe: IO[bytes], limit: int = OUTPUT_TAIL_BYTES) -> None:
        self._pipe = pipe
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit
        self._thread = threading.Thread(target=self._run, daemon=True, name="pipes-output-tail")
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                chunk = self._pipe.read1(65536) if hasattr(self._pipe, "read1") else self._pipe.read(65536)
                if not chunk:
                    break
                self._chunks.append(chunk)
                self._size += len(chunk)
                while self._size - len(self._chunks[0]) >= self._limit:
                    self._size -= len(self._chunks.popleft())
        finally:
            self._pipe.close()

    def text(self, timeout: float = 5.0) -> str:
        self._thread.join(timeout)
        data = b"".join(self._chunks)[-self._limit :]
        return data.decode("utf-8", "replace")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class PipesClientCompletedInvocation:
    """What a finished run produced: the session's results plus the process's exit."""

    def __init__(
        self,
        session: PipesSession,
        *,
        exit_code: int | None,
        duration_seconds: float,
        output_tail: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.session = session
        self.exit_code = exit_code
        self.duration_seconds = duration_seconds
        self.output_tail = output_tail
        self.metadata = dict(metadata or {})

    @property
    def missing_closed(self) -> bool:
        """The process opened the channel but never sent ``closed``: buffered messages may be missing."""
        return self.session.opened and not self.session.closed

    def get_results(self, implicit_materializations: bool = True) -> list[PipesExecutionResult]:
        """Every result of the run (implicit materializations included unless turned off), with the run's
        ``metadata``; complete and repeatable, whatever was streamed from the session before."""
        return self.session.get_all_results(
            implicit_materializations=implicit_materializations, metadata=self.metadata
        )

    def get_materialize_result(self, implicit_materializations: bool = True) -> MaterializeResult:
        """The single materialization of the run, with the run's check results folded into ``check_results``.

        Raises:
            PipesUsageError: when the run has zero or several materializations.
        """
        results = self.get_results(implicit_materializations=implicit_materializations)
        materializations = [r for r in results if isinstance(r, MaterializeResult)]
        if len(materializations) != 1:
            raise PipesUsageError(f"expected exactly one materialization, got {len(materializations)}")
        return materializations[0]

    def get_asset_check_results(self) -> list[AssetCheckResult]:
        return [r for r in self.get_results(implicit_materializations=False) if isinstance(r, AssetCheckResult)]

    def get_asset_check_result(self) -> AssetCheckResult:
        """The single check result of the run (and no materialization).

        Raises:
            PipesUsageError: when the run has zero or several checks, or materializations too.
        """
        results = self.get_results(implicit_materializations=False)
        checks = [r for r in results if isinstance(r, AssetCheckResult)]
        if len(checks) != 1 or len(results) != 1:
            raise PipesUsageError(
                f"expected exactly one check result and nothing else, got {len(checks)} checks among "
                f"{len(results)} results"
            )
        return checks[0]

    def get_custom_messages(self) -> list[Any]:
        return self.session.get_custom_messages()


class PipesSubprocessClient:
    """Runs a command as a Pipes external process.

    Args:
        env: environment added to this process's own for every run.
        cwd: working directory for every run.
        context_injector: default :class:`PipesTempFileContextInjector`.
        message_reader: default :class:`PipesTempFileMessageReader`.
        forward_termination: on interruption or timeout, terminate the child's process group (see module doc).
        forward_stdio: let the child write to this process's stdout/stderr; with False they are read
            concurrently and the last :data:`OUTPUT_TAIL_BYTES` kept for error messages.
        termination_timeout_seconds: how long the child gets after SIGINT before SIGTERM.
        strict: raise when the process never opens the channel or breaks the protocol.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        context_injector: PipesContextInjector | None = None,
        message_reader: PipesMessageReader | None = None,
        forward_termination: bool = True,
        forward_stdio: bool = True,
        termination_timeout_seconds: float = 20,
        *,
        strict: bool = True,
    ) -> None:
        self.env = dict(env or {})
        self.cwd = cwd
        self.context_injector = context_injector or PipesTempFileContextInjector()
        self.message_reader = message_reader or PipesTempFileMessageReader()
        self.forward_termination = forward_termination
        self.forward_stdio = forward_stdio
        self.termination_timeout_seconds = termination_timeout_seconds
        self.strict = strict

    def run(
        self,
        *,
        context: PipesRunContext | None = None,
        command: str | Sequence[str],
        extras: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_seconds: float | None = None,
        strict: bool | None = None,
        on_event: Callable[[PipesEvent], None] | None = None,
        retain_messages: bool = True,
        metadata: Mapping[str, Any] | None = None,
        stdout: int | IO[Any] | None = None,
    ) -> PipesClientCompletedInvocation:
        """Run ``command`` (a list, or a string split with :func:`shlex.split`) in a Pipes session.

        ``stdout`` (with ``forward_stdio``) redirects the child's stdout, e.g. to ``sys.stderr`` when this
        process's own stdout carries machine-readable output.

        Raises:
            PipesExecutionError: see the module docstring; ``.invocation`` holds what was received.
            PipesTimeoutError: the run exceeded ``timeout_seconds``.
            KeyboardInterrupt: re-raised after the child was terminated and the channel drained.
        """
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise PipesUsageError("command is empty")
        strict = self.strict if strict is None else strict
        started = time.monotonic()
        exit_code: int | None = None
        output_tail = ""
        timed_out = False
        terminated = False
        with open_pipes_session(
            context, self.context_injector, self.message_reader, extras,
            on_event=on_event, retain_messages=retain_messages,
        ) as session:
            child_env = {**os.environ, **self.env, **(env or {}), **session.get_bootstrap_env_vars()}
            pipe = None if self.forward_stdio else subprocess.PIPE
            try:
                process = subprocess.Popen(
                    argv,
                    env=child_env,
                    cwd=cwd or self.cwd,
                    stdout=stdout if (self.forward_stdio and stdout is not None) else pipe,
                    stderr=pipe,
                    # Own process group, so termination reaches grandchildren; a terminal's Ctrl-C then
                    # reaches only us, and we forward it.
                    start_new_session=self.forward_termination,
                )
            except OSError as exc:
                raise PipesExecutionError(f"cannot start the external process {argv[0]!r}: {exc}") from exc
            tails = []
            if process.stdout is not None and process.stderr is not None:
                tails = [_TailReader(process.stdout), _TailReader(process.stderr)]
            previous_handler = self._install_sigterm_handler()
            try:
                try:
                    exit_code = process.wait(timeout=timeout_seconds)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    exit_code = self._terminate(process)
                except (KeyboardInterrupt, _TerminationRequested) as interrupt:
                    terminated = isinstance(interrupt, _TerminationRequested)
                    if self.forward_termination:
                        logger.warning("[pipes] interrupted: terminating the external process (SIGINT first)")
                        exit_code = self._terminate(process)
                    if not terminated:
                        raise
            except _TerminationRequested:  # SIGTERM during the escalation: the group was killed at once
                terminated = True
                exit_code = process.returncode
            finally:
                self._restore_sigterm_handler(previous_handler)
                # One shared deadline: a background process holding both pipes costs it once, not per stream.
                deadline = time.monotonic() + OUTPUT_DRAIN_SECONDS
                output_tail = "".join(tail.text(max(0.0, deadline - time.monotonic())) for tail in tails)
        invocation = PipesClientCompletedInvocation(
            session,
            exit_code=exit_code,
            duration_seconds=time.monotonic() - started,
            output_tail=output_tail,
            metadata=metadata,
        )
        self._check(invocation, argv, strict, timed_out, terminated, timeout_seconds)
        return invocation

    # ------------------------------------------------------------------ termination

    def _install_sigterm_handler(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None

        def _on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise _TerminationRequested()

        try:
            return signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # pragma: no cover - not the main interpreter
            return None

    def _restore_sigterm_handler(self, previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    def _signal_group(self, process: subprocess.Popen[bytes], sig: int) -> None:
        try:
            if self.forward_termination:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _terminate(self, process: subprocess.Popen[bytes]) -> int:
        """SIGINT, wait, SIGTERM, wait, SIGKILL, to the child's process group. Returns the exit code.

        A second interruption while waiting (Ctrl-C twice) skips the rest of the grace: the group is killed at
        once and the interruption propagates. The child runs in its own session, so nothing else would stop it.
        """
        try:
            for sig, wait_seconds in (
                (signal.SIGINT, self.termination_timeout_seconds),
                (signal.SIGTERM, min(TERM_GRACE_SECONDS, self.termination_timeout_seconds)),
            ):
                self._signal_group(process, sig)
                try:
                    code = process.wait(timeout=wait_seconds)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                self._signal_group(process, signal.SIGKILL)
                code = process.wait()
        except BaseException:
            self._signal_group(process, signal.SIGKILL)
            process.wait()
            raise
        # Grandchildren that outlived the child are not left behind as orphans.
        self._signal_group(process, signal.SIGKILL)
        return code

    # ------------------------------------------------------------------ verdict

    def _check(
        self,
        invocation: PipesClientCompletedInvocation,
        argv: list[str],
        strict: bool,
        timed_out: bool,
        terminated: bool,
        timeout_seconds: float | None,
    ) -> None:
        session = invocation.session
        code = invocation.exit_code
        remote = session.exception
        tail = invocation.output_tail
        details = ""
        if remote is not None:
            details = "\n\nThe external process reported:\n" + remote.format()
        if tail:
            details += "\n\nLast output of the external process:\n" + tail[-4000:]

        def fail(cls: type[PipesExecutionError], message: str) -> None:
            raise cls(message + details, exit_code=code, remote_exception=remote, invocation=invocation,
                      output_tail=tail)

        if timed_out:
            fail(PipesTimeoutError, f"the external process {argv[0]!r} ran past its timeout of {timeout_seconds} s "
                 "and was terminated")
        if terminated:
            fate = "was terminated" if self.forward_termination else "was left running (forward_termination=False)"
            fail(PipesInterruptedError, f"the orchestrator received SIGTERM; the external process {argv[0]!r} {fate}")
        if code is not None and code < 0:
            fail(PipesExecutionError, f"the external process {argv[0]!r} was killed by {_signal_name(-code)}")
        if code:
            what = ""
            if remote is not None:
                # A Python peer's message already starts with its type ("ValueError: ..."): don't repeat it.
                text = str(remote)
                named = not remote.name or text.startswith(remote.name)
                what = f" with {text}" if named else f" with {remote.name}: {text}"
            fail(PipesExecutionError, f"the external process {argv[0]!r} failed with exit code {code}{what}")
        if remote is not None:
            fail(PipesExecutionError, f"the external process {argv[0]!r} exited 0 but reported an exception")
        if strict and not session.opened:
            fail(
                PipesExecutionError,
                f"the external process {argv[0]!r} never opened the Pipes channel. "
                f"{session.context_injector.no_messages_debug_text()} "
                f"{session.message_reader.no_messages_debug_text()} Check that it calls open_pipes() (or "
                "open_dagster_pipes()) and that DAGSTER_PIPES_CONTEXT / DAGSTER_PIPES_MESSAGES reach it; pass "
                "strict=False for a command that is not Pipes-aware.",
            )
        if strict and session.issue_count:
            issues = "\n".join(f"  - {issue}" for issue in session.protocol_issues[:10])
            fail(
                PipesExecutionError,
                f"the external process {argv[0]!r} broke the Pipes protocol {session.issue_count} time(s):\n{issues}",
            )
        if invocation.missing_closed:
            logger.warning(
                "[pipes] the external process %r opened the channel but never sent closed; buffered messages "
                "may be missing", argv[0]
            )
