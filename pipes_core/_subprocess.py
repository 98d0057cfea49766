"""``PipesSubprocessClient``: run a command as a Pipes external process and collect its results.

It is a :class:`~pipes_core.PipesClient`: the lifecycle (session, output, timeout, termination, drain, verdict)
is the launchers' shared one (see :mod:`pipes_core._client`); this module only starts a local process and
signals it. Lifecycle rules (strict by default):

* a command that cannot be started raises :class:`PipesExecutionError` (and leaves no temp files);
* a non-zero exit raises, carrying the remote exception (type, message, stack, cause chain) if one was
  reported; a process killed by a signal raises naming the signal;
* a process that exits 0 without ever sending ``opened`` raises ("never opened the Pipes channel"), unless
  ``strict=False`` (for commands that are not Pipes-aware);
* protocol issues (malformed lines, unknown methods, unselected or duplicate assets) raise in strict mode;
* opened but no ``closed``: a warning and ``missing_closed`` on the result.

Termination: on KeyboardInterrupt or SIGTERM to this process (main thread only), with ``forward_termination``
on, and on ``timeout_seconds`` always, the child's whole process group gets SIGINT, then after
``termination_timeout_seconds`` SIGTERM, then after :data:`TERM_GRACE_SECONDS` SIGKILL. The channel is still
drained, and the interruption is re-raised (or a :class:`PipesTimeoutError` raised).

Channels: temp files by default (as the reference); ``message_reader=PipesStdioMessageReader()`` reads the
messages from the child's stdout (its other lines are forwarded); ``bootstrap="cli"`` appends
``--dagster-pipes-context`` / ``--dagster-pipes-messages`` to the command instead of setting env vars.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from ._client import (
    BOOTSTRAP_ENV,
    OUTPUT_DRAIN_SECONDS,
    OUTPUT_TAIL_BYTES,
    TERM_GRACE_SECONDS,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesExitStatus,
    PipesLaunchedProcess,
    PipesLaunchRequest,
)
from ._errors import PipesExecutionError, PipesUsageError
from ._injectors import PipesContextInjector, PipesTempFileContextInjector
from ._readers import PipesMessageReader, PipesTempFileMessageReader
from ._results import PipesEvent
from ._run_context import PipesRunContext
from ._stdio import PipesOutputTarget

__all__ = [
    "PipesSubprocessClient",
    "PipesClientCompletedInvocation",
    "TERM_GRACE_SECONDS",
    "OUTPUT_TAIL_BYTES",
    "OUTPUT_DRAIN_SECONDS",
]


_INTERPRETERS = ("python", "python3", "pypy", "pypy3", "node", "ruby", "perl", "bash", "sh", "Rscript", "java")


def command_name(argv: Sequence[str]) -> str:
    """The command as a person recognises it, for messages: the script run by an interpreter
    (``python etl.py`` -> ``etl.py``; ``python -m pkg.job`` -> ``-m pkg.job``), else the program."""
    program = os.path.basename(argv[0])
    if len(argv) > 1 and (program in _INTERPRETERS or program.startswith("python")):
        if argv[1] in ("-m", "-c") and len(argv) > 2:
            return f"{argv[1]} {argv[2]}" if argv[1] == "-m" else f"{program} -c"
        if not argv[1].startswith("-"):
            return argv[1]
    return argv[0]


class _LocalProcess(PipesLaunchedProcess):
    """A :class:`subprocess.Popen` child; signals go to its whole process group when it has its own."""

    def __init__(self, process: subprocess.Popen[bytes], argv0: str, own_group: bool) -> None:
        self.process = process
        self.own_group = own_group
        self.description = f"the external process {argv0!r}"
        self.stdout = process.stdout
        self.stderr = process.stderr

    def poll(self) -> bool:
        return self.process.poll() is not None

    def wait(self, timeout: float | None) -> bool:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def exit_status(self) -> PipesExitStatus:
        return PipesExitStatus.from_returncode(self.process.returncode)

    def _signal(self, sig: int) -> None:
        try:
            if self.own_group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


def _popen_target(target: PipesOutputTarget | None, needed: bool) -> int | IO[Any] | None:
    if needed:
        return subprocess.PIPE
    return target  # type: ignore[return-value]  # None or a file with a descriptor (see PipesLaunchRequest)


class PipesSubprocessClient(PipesClient):
    """Runs a command as a Pipes external process.

    Args:
        env: environment added to this process's own for every run.
        cwd: working directory for every run.
        context_injector: default :class:`PipesTempFileContextInjector`.
        message_reader: default :class:`PipesTempFileMessageReader`; :class:`PipesStdioMessageReader` reads the
            child's stdout.
        forward_termination: on interruption, terminate the child's process group (see module doc).
        forward_stdio: let the child write to this process's stdout/stderr (its stdout inherited; its stderr read
            through a pipe and passed on, its last :data:`OUTPUT_TAIL_BYTES` kept so that a failure can quote its
            last line); with False both are read concurrently and only their last bytes kept.
        termination_timeout_seconds: how long the child gets after SIGINT before SIGTERM.
        strict: raise when the process never opens the channel or breaks the protocol.
        bootstrap: ``"env"`` (default) or ``"cli"`` (the bootstrap params appended to the command as
            ``--dagster-pipes-context VALUE --dagster-pipes-messages VALUE``).
        inherit_env: start from this process's environment (default); with False the child gets only ``env``
            (the client's and the run's) and the bootstrap variables.
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
        bootstrap: str = BOOTSTRAP_ENV,
        inherit_env: bool = True,
    ) -> None:
        super().__init__(
            context_injector=context_injector,
            message_reader=message_reader,
            forward_termination=forward_termination,
            forward_stdio=forward_stdio,
            termination_timeout_seconds=termination_timeout_seconds,
            strict=strict,
            bootstrap=bootstrap,
        )
        self.env = dict(env or {})
        self.cwd = cwd
        self.inherit_env = inherit_env

    def default_context_injector(self) -> PipesContextInjector:
        return PipesTempFileContextInjector()

    def default_message_reader(self) -> PipesMessageReader:
        return PipesTempFileMessageReader()

    def run(  # type: ignore[override]  # the documented signature: context and extras, plus its own options
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
        stdout: PipesOutputTarget | None = None,
        stderr: PipesOutputTarget | None = None,
        on_launched: Callable[[PipesLaunchedProcess], None] | None = None,
        stdin: int | IO[Any] | None = None,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        external_stream_handler: Callable[[str, str], None] | None = None,
        fail_on_check_error: bool = False,
        raise_on_event_error: bool = True,
        on_message: Callable[[dict[str, Any]], None] | None = None,
    ) -> PipesClientCompletedInvocation:
        """Run ``command`` (a list, or a string split with :func:`shlex.split`) in a Pipes session.

        ``stdout`` / ``stderr`` (with ``forward_stdio``) redirect the child's output, e.g. stdout to
        ``sys.stderr`` when this process's own stdout carries machine-readable output; a file with a descriptor
        is handed to the child, anything else (a callable, a file object without one) is fed through a pipe.
        ``stdin`` is passed to :class:`subprocess.Popen` (e.g. ``subprocess.DEVNULL``). ``on_launched``,
        ``logger``, ``external_stream_handler`` and ``on_message``: see :meth:`PipesClient.run_launcher`.

        ``logger`` (a :class:`logging.Logger` or :class:`logging.LoggerAdapter`, e.g. an orchestrator's per-task
        logger) receives this run's ``log`` messages and protocol issues instead of ``pipes_core.external``;
        every record carries ``pipes_run_id`` and ``pipes_command`` as ``extra`` fields.
        ``external_stream_handler`` receives the captured stdout/stderr text sent by the process as
        ``(stream, text)``.

        ``fail_on_check_error``: a failed check of severity ERROR fails the run (as ``pipes run
        --fail-on-check-error``). An exception raised by ``on_event`` fails the run, chained, unless
        ``raise_on_event_error=False`` (then it is only logged).

        Raises:
            PipesExecutionError: see the module docstring; ``.invocation`` holds what was received.
            PipesTimeoutError: the run exceeded ``timeout_seconds``.
            PipesTransportError: the message channel failed; ``.invocation`` holds what was received.
            KeyboardInterrupt: re-raised after the child was terminated and the channel drained.
        """
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise PipesUsageError("command is empty")
        child_cwd = cwd or self.cwd
        base_env = {**(os.environ if self.inherit_env else {}), **self.env, **(env or {})}

        def launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
            return self._start(argv + request.bootstrap_args, {**base_env, **request.bootstrap_env}, child_cwd,
                               stdin, _popen_target(stdout, request.stdout_needed),
                               _popen_target(stderr, request.stderr_needed))

        return self.run_launcher(
            launch, context=context, extras=extras, timeout_seconds=timeout_seconds, strict=strict,
            on_event=on_event, retain_messages=retain_messages, metadata=metadata, stdout=stdout, stderr=stderr,
            on_launched=on_launched, external_stream_handler=external_stream_handler,
            logger=logger, command=argv, on_message=on_message, fail_on_check_error=fail_on_check_error,
            raise_on_event_error=raise_on_event_error,
        )

    def _start(self, argv: list[str], env: dict[str, str], cwd: str | None, stdin: int | IO[Any] | None,
               stdout: int | IO[Any] | None, stderr: int | IO[Any] | None) -> _LocalProcess:
        try:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                # Own process group, so termination reaches grandchildren; a terminal's Ctrl-C then
                # reaches only us, and we forward it.
                start_new_session=self.forward_termination,
            )
        except OSError as exc:
            raise PipesExecutionError(f"cannot start the external process {argv[0]!r}: {exc}") from exc
        return _LocalProcess(process, command_name(argv), self.forward_termination)
