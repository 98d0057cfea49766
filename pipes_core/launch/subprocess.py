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
:class:`_OrphanGuard`. A later "durable run" turns this off with :attr:`PipesSubprocessClient.end_with_orchestrator`.

Channels: temp files by default (as the reference); ``message_reader=PipesStdioMessageReader()`` reads the
messages from the child's stdout (its other lines are forwarded); ``bootstrap="cli"`` appends
``--dagster-pipes-context`` / ``--dagster-pipes-messages`` to the command instead of setting env vars.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from pipes_core.channels.files import SessionPath
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
    PipesExitStatus,
    PipesLaunchedProcess,
    PipesLaunchRequest,
)
from pipes_core.launch.options import RunOptions, Unpack, check_run_options, common_options, run_signature
from pipes_core.launch.session import PipesSession
from pipes_core.protocol.errors import PipesExecutionError, PipesUsageError, descriptor_error
from pipes_core.protocol.run_context import PipesRunContext

__all__ = [
    "PipesSubprocessClient",
    "SubprocessRunOptions",
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


# ---------------------------------------------------------------------------------------------- orphan guard

# Why a watchdog process and not PR_SET_PDEATHSIG. The parent-death signal fires when the *thread* that forked
# exits (a run started from a worker thread that ends would kill its child), needs a preexec_fn (not safe with
# the reader threads a session runs, and it disables vfork), reaches the child only, not the grandchildren of its
# process group, is Linux-only, and removes no file. A watchdog that holds the read end of a pipe whose only write
# end is ours sees EOF when we die, however we die (the kernel closes our descriptors), on every POSIX system; it
# then stops the child's whole process group and removes the session's local files. A `sh` script adds 2 to 5 ms
# to a run (its start, and its end at "done"; a Python one would cost ~20 ms) and a few hundred KiB while it waits.
#
# The script reads commands, one a line: "group PGID" (the child leads its own process group) or "pid PID"
# (it shares ours: only it is signalled), "ended" (the child was reaped: its pid may be reused, forget it) and
# "done" (the run ended normally: exit). On EOF without "done": SIGTERM to the child, up to
# ORPHAN_TERM_GRACE_SECONDS for it to end (looked at every 0.1 s), SIGKILL, then the paths given as arguments
# are removed ("d:DIR" a private temp dir of the session, with what it holds; "f:FILE" a file at a path the user
# named). It ignores SIGINT, SIGHUP and SIGTERM: a Ctrl-C or a group-wide signal meant for the orchestrator must
# not end the guard (the orchestrator itself stops the child then, and says "done").
ORPHAN_TERM_GRACE_SECONDS = 2  # as long as a child gets to clean up once its orchestrator is gone ("a few s")
_GUARD_SHELL = "/bin/sh"
_GUARD_SCRIPT = f"""trap '' INT HUP TERM
target=
while read -r verb arg; do
  case $verb in
    group) target="-$arg" ;;
    pid) target="$arg" ;;
    ended) target= ;;
    done) exit 0 ;;
  esac
done
if [ -n "$target" ] && kill -TERM "$target" 2>/dev/null; then
  left={ORPHAN_TERM_GRACE_SECONDS * 10}
  while [ "$left" -gt 0 ] && kill -0 "$target" 2>/dev/null; do sleep 0.1; left=$((left - 1)); done
  kill -KILL "$target" 2>/dev/null
fi
for p; do
  case $p in
    d:*) rm -rf -- "${{p#d:}}" ;;
    f:*) rm -f -- "${{p#f:}}" ;;
  esac
done
"""
# After "done", how long the guard gets to exit before it is killed (it exits at once; this only bounds a guard
# that was stopped with SIGSTOP).
GUARD_EXIT_SECONDS = 5.0


class _OrphanGuard:
    """The watchdog of one local child (see the comment above): started before the child, told its process
    (group), disarmed when the run ends. Holds one descriptor (the pipe's write end, close-on-exec, so no other
    child inherits it) and one small process for the length of the run."""

    def __init__(self, paths: Sequence[SessionPath]) -> None:
        arguments = [("d:" if p.tree else "f:") + p.path for p in paths]
        read_end, self._write_end = os.pipe()
        try:
            self._process = subprocess.Popen(
                [_GUARD_SHELL, "-c", _GUARD_SCRIPT, "pipes-orphan-guard", *arguments],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # no terminal signal reaches it; it outlives our process group
            )
        except BaseException:
            os.close(self._write_end)
            self._write_end = -1
            raise
        finally:
            os.close(read_end)

    def _say(self, line: str) -> None:
        if self._write_end < 0:
            return
        try:
            os.write(self._write_end, (line + "\n").encode("ascii"))
        except OSError:  # the guard is gone (killed by someone): nothing to tell
            pass

    def watch(self, pid: int, own_group: bool) -> None:
        """The child was started: on our death, stop its group (``own_group``) or it alone."""
        self._say(f"{'group' if own_group else 'pid'} {pid}")

    def ended(self) -> None:
        """The child was reaped; with no group of its own its pid may be reused: never signal it."""
        self._say("ended")

    def release(self) -> None:
        """The run is over: the guard exits and is reaped. Idempotent."""
        if self._write_end < 0:
            return
        self._say("done")
        os.close(self._write_end)
        self._write_end = -1
        try:
            self._process.wait(GUARD_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _session_paths(session: PipesSession) -> list[SessionPath]:
    """The local files and temp dirs of ``session`` that hold its context or messages."""
    paths: list[SessionPath] = []
    for channel, params in ((session.context_injector, session.context_params),
                            (session.message_reader, session.message_params)):
        session_paths = getattr(channel, "session_paths", None)  # a duck-typed channel may not have it
        if session_paths is not None:
            paths.extend(session_paths(params))
    return paths


def start_local_process(argv: list[str], *, env: dict[str, str], cwd: str | None, stdin: int | IO[Any] | None,
                        stdout: int | IO[Any] | None, stderr: int | IO[Any] | None, own_group: bool,
                        session: PipesSession | None, guarded: bool, pass_fds: Sequence[int] = (),
                        ) -> tuple[subprocess.Popen[bytes], _OrphanGuard | None]:
    """Start a local child for a run (the one launch primitive of the sync and asyncio clients): its own
    session when ``own_group`` and, when ``guarded``, an :class:`_OrphanGuard` that ends it and removes the
    ``session``'s local files should this process die first; ``pass_fds`` are inherited (a durable run's lock).

    Raises:
        PipesResourceError: no file descriptor was left (nothing is started).
        PipesExecutionError: the command cannot be started (``exit_code=None``).
    """
    guard: _OrphanGuard | None = None
    if guarded:
        try:
            guard = _OrphanGuard(_session_paths(session) if session is not None else [])
        except OSError as exc:
            raise descriptor_error(exc, "start the external process") or PipesExecutionError(
                f"cannot start the orphan guard of the external process ({_GUARD_SHELL}): {exc}") from exc
    try:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
                                   # Own process group, so termination reaches grandchildren; a terminal's
                                   # Ctrl-C then reaches only us, and we forward it.
                                   start_new_session=own_group, pass_fds=tuple(pass_fds))
    except OSError as exc:
        if guard is not None:
            guard.release()
        raise descriptor_error(exc, f"start the external process {argv[0]!r}") or PipesExecutionError(
            f"cannot start the external process {argv[0]!r}: {exc}") from exc
    except BaseException:
        if guard is not None:
            guard.release()
        raise
    if guard is not None:
        guard.watch(process.pid, own_group)
    return process, guard


def check_env(env: Mapping[Any, Any]) -> None:
    """Refuse an environment the system cannot take, before anything starts: names and values must be strings
    (a NUL byte in neither, no ``=`` in a name, no empty name).

    Raises:
        PipesUsageError: naming the variable and what is wrong with it.
    """
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise PipesUsageError(
                f"env: {name!r} = {value!r:.80}: environment variable names and values must be str, got "
                f"{type(name).__name__} = {type(value).__name__}; convert it (str(...)) in env=")
        if "\0" in name or "\0" in value:
            raise PipesUsageError(f"env: {name!r:.80} holds a NUL byte, which no environment variable can carry; "
                                  "remove it from env=")
        if not name or "=" in name:
            raise PipesUsageError(f"env: {name!r:.80} is not a valid environment variable name (empty, or with "
                                  "'='); fix it in env=")


class LocalSignals(PipesLaunchedProcess):
    """The escalation steps of a local process as signals (SIGINT, SIGTERM, SIGKILL) through its ``_signal``."""

    def _signal(self, sig: int) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


class _LocalProcess(LocalSignals):
    """A :class:`subprocess.Popen` child; signals go to its whole process group when it has its own."""

    def __init__(self, process: subprocess.Popen[bytes], argv0: str, own_group: bool,
                 guard: _OrphanGuard | None = None) -> None:
        self.process = process
        self.own_group = own_group
        self.description = f"the external process {argv0!r}"
        self.stdout = process.stdout
        self.stderr = process.stderr
        self._guard = guard

    def _ended(self) -> bool:
        if self.process.returncode is None:
            return False
        if self._guard is not None and not self.own_group:  # reaped: its pid may be reused
            self._guard.ended()
            self._guard = None
        return True

    def poll(self) -> bool:
        self.process.poll()
        return self._ended()

    def wait(self, timeout: float | None) -> bool:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return self._ended()

    def close(self) -> None:
        if self._guard is not None:
            self._guard.release()
            self._guard = None

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
            this process dies during the run, SIGKILL included (see :class:`_OrphanGuard`); the hook by which a
            durable run (one meant to outlive its orchestrator) turns that off.
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

    def attach(self, handle: dict[str, Any]) -> PipesLaunchedProcess:
        """The durable child of a run with a ``launch_key``, found again from its handle (README "Durable runs")."""
        from pipes_core.launch.durable_local import DurableLocalProcess

        return DurableLocalProcess(handle)

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
