"""``PipesSubprocessClient``: run a command as a Pipes external process and collect its results.

It is a :class:`~pipes_core.PipesClient`: the lifecycle (session, output, timeout, termination, drain, verdict)
is the launchers' shared one (see :mod:`pipes_core.launch.client`); this module only starts a local process and
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

Orphans: a local child ends within a few seconds of its orchestrator's death, however that dies (SIGKILL
included), and the session's local files holding the context or the messages are removed: see
``_OrphanGuard`` in :mod:`pipes_core.launch.local`. A durable run (``launch_key``) turns this off with
:attr:`PipesSubprocessClient.end_with_orchestrator`.

Channels: temp files by default (as the reference); ``message_reader=PipesStdioMessageReader()`` reads the
messages from the child's stdout (its other lines are forwarded); ``bootstrap="cli"`` appends
``--dagster-pipes-context`` / ``--dagster-pipes-messages`` to the command instead of setting env vars.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from pipes_core.channels.injectors import PipesContextInjector, PipesTempFileContextInjector
from pipes_core.channels.readers import PipesMessageReader, PipesTempFileMessageReader
from pipes_core.channels.stdio import PipesOutputTarget
from pipes_core.launch.client import (
    BOOTSTRAP_ENV,
    OUTPUT_DRAIN_SECONDS,
    OUTPUT_TAIL_BYTES,
    TERM_GRACE_SECONDS,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesLaunchedProcess,
    PipesLaunchRequest,
)
from pipes_core.launch.local import _LocalProcess, check_env, command_name, start_local_process
from pipes_core.launch.options import RunOptions, Unpack, check_run_options, common_options, run_signature
from pipes_core.launch.process import DurableLaunch
from pipes_core.launch.session import PipesSession
from pipes_core.protocol.errors import PipesUsageError
from pipes_core.protocol.run_context import PipesRunContext

__all__ = [
    "PipesSubprocessClient",
    "SubprocessRunOptions",
    "PipesClientCompletedInvocation",
    "TERM_GRACE_SECONDS",
    "OUTPUT_TAIL_BYTES",
    "OUTPUT_DRAIN_SECONDS",
]


class SubprocessRunOptions(RunOptions, total=False):
    """The options of :meth:`PipesSubprocessClient.run` (and its asyncio twin's): its own, then the
    :class:`~pipes_core.RunOptions`.

    Keys:
        command: what to run (required): a list, or a string split with :func:`shlex.split`.
        env: environment added to the client's for this run.
        cwd: working directory for this run (default the client's).
        stdin: passed to :class:`subprocess.Popen` (e.g. ``subprocess.DEVNULL``).
    """

    command: str | Sequence[str]
    env: Mapping[str, str] | None
    cwd: str | None
    stdin: int | IO[Any] | None


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

    Attributes:
        end_with_orchestrator: (default True) a watchdog ends the child and removes the session's local files if
            this process dies during the run, SIGKILL included (see ``_OrphanGuard`` in
            :mod:`pipes_core.launch.local`); the hook by which a durable run (one meant to outlive its
            orchestrator) turns that off.
    """

    end_with_orchestrator: bool = True

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

    def attach(self, handle: dict[str, Any], request: PipesLaunchRequest | None = None) -> PipesLaunchedProcess:
        """The durable child of a run with a ``launch_key``, found again from its handle (README "Durable runs")."""
        from pipes_core.launch.durable_local import DurableLocalProcess

        return DurableLocalProcess(handle)

    def find_launch(self, durable: DurableLaunch) -> dict[str, Any] | None:
        """The durable child launched for ``durable`` whose handle was never recorded: its supervisor's pid file."""
        from pipes_core.launch.durable_local import read_pid_file

        return read_pid_file(durable.directory, f"the durable run {durable.launch_key!r}")

    @run_signature(SubprocessRunOptions, required=("command",))
    def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
            **options: Unpack[SubprocessRunOptions]) -> PipesClientCompletedInvocation:
        """Run ``command`` (a list, or a string split with :func:`shlex.split`) in a Pipes session.

        Its own options (:class:`SubprocessRunOptions`): ``command``; ``env`` (added to the client's);
        ``cwd``; ``stdin``, passed to :class:`subprocess.Popen` (e.g. ``subprocess.DEVNULL``). Every other
        option is one of the :class:`~pipes_core.RunOptions` that every client takes: ``stdout`` / ``stderr`` (with
        ``forward_stdio``) redirect the child's output, e.g. stdout to ``sys.stderr`` when this process's own
        stdout carries machine-readable output; a file with a descriptor is handed to the child, anything else (a
        callable, a file object without one) is fed through a pipe. ``logger`` receives this run's ``log``
        messages and protocol issues, every record carrying ``pipes_run_id`` and ``pipes_command``.

        Raises:
            PipesExecutionError: see the module docstring; ``.invocation`` holds what was received.
            PipesTimeoutError: the run exceeded ``timeout_seconds``.
            PipesTransportError: the message channel failed; ``.invocation`` holds what was received.
            KeyboardInterrupt: re-raised after the child was terminated and the channel drained.
        """
        launch, command, common = self.launcher(options, where="PipesSubprocessClient.run")
        return self.run_launcher(launch, context=context, extras=extras, command=command, **common)

    def launcher(self, options: SubprocessRunOptions, *, where: str
                 ) -> tuple[Callable[[PipesLaunchRequest], PipesLaunchedProcess], list[str], RunOptions]:
        """Check the run's own options; the launch function (shared by the asyncio twin), the command (for
        ``pipes_command``) and the shared options."""
        check_run_options(options, SubprocessRunOptions, where, required=("command",))
        command = options["command"]
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise PipesUsageError("command is empty")
        child_cwd = options.get("cwd") or self.cwd
        check_env({**self.env, **(options.get("env") or {})})
        base_env = {**(os.environ if self.inherit_env else {}), **self.env, **(options.get("env") or {})}
        stdin, stdout, stderr = options.get("stdin"), options.get("stdout"), options.get("stderr")

        def launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
            if request.durable is not None:  # a run with a launch_key: the child outlives this process
                from pipes_core.launch.durable_local import start_durable_child

                return start_durable_child(argv + request.bootstrap_args, {**base_env, **request.bootstrap_env},
                                           child_cwd, request.durable, f"the external process {command_name(argv)!r}")
            return self._start(argv + request.bootstrap_args, {**base_env, **request.bootstrap_env}, child_cwd,
                               stdin, _popen_target(stdout, request.stdout_needed),
                               _popen_target(stderr, request.stderr_needed), request.session)

        return launch, argv, common_options(options)

    def _start(self, argv: list[str], env: dict[str, str], cwd: str | None, stdin: int | IO[Any] | None,
               stdout: int | IO[Any] | None, stderr: int | IO[Any] | None,
               session: PipesSession | None = None) -> _LocalProcess:
        process, guard = start_local_process(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
                                             own_group=self.forward_termination, session=session,
                                             guarded=self.end_with_orchestrator)
        return _LocalProcess(process, command_name(argv), self.forward_termination, guard)
