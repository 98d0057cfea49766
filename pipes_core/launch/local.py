"""Local processes, below the subprocess launcher and the durable local child: starting one (in its own group or
session, guarded against outliving its orchestrator by :class:`_OrphanGuard`), signalling it, and how a command is
named in messages. Its own module so that :mod:`pipes_core.launch.subprocess` and
:mod:`pipes_core.launch.durable_local` both build on it without importing each other."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from pipes_core.channels.files import SessionPath
from pipes_core.launch.lifecycle import PipesExitStatus
from pipes_core.launch.process import PipesLaunchedProcess
from pipes_core.protocol.errors import PipesExecutionError, PipesUsageError, descriptor_error

if TYPE_CHECKING:
    from pipes_core.launch.session import PipesSession

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
