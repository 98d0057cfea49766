"""A durable local child: a command that outlives the orchestrator that launched it (README "Durable runs").

The orchestrator starts a small supervisor (:mod:`pipes_core.launch.supervisor`, run by its path) in a session of its
own, without the orphan guard, handing it the run directory's lock. The supervisor writes its pid to ``pid``, runs
the command with its output going to the files ``stdout`` and ``stderr`` of the run directory, waits for it, and
writes its return code to ``exit`` before it ends; until then it holds the lock. Any orchestrator can then find
it (the handle: the supervisor's pid and start time, so that a reused pid is never taken for it), signal its
process group, forward its output from the files, and learn how it ended from ``exit`` (a supervisor killed with
the group leaves none: the run was killed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

from pipes_core.launch import supervisor as _supervisor
from pipes_core.launch.lifecycle import PipesExitStatus
from pipes_core.launch.local import LocalSignals, start_local_process
from pipes_core.launch.process import DurableLaunch
from pipes_core.launch.run_store import process_start_time
from pipes_core.launch.supervisor import EXIT_FILE, PID_FIELD, PID_FILE, RETURNCODE_FIELD, STDERR_FILE, STDOUT_FILE
from pipes_core.protocol.errors import PipesEngineErrorKind

__all__ = ["DurableLocalProcess", "start_durable_child", "read_pid_file", "OUTPUT_POLL_SECONDS"]

# The handle's fields.
HANDLE_PID: Final = "pid"
HANDLE_STARTED: Final = "started"
HANDLE_DIRECTORY: Final = "directory"
HANDLE_DESCRIPTION: Final = "description"
# How often the output files are looked at for more while the child runs (they are plain files: no end to wait
# for); a forwarded line is late by at most this much.
OUTPUT_POLL_SECONDS: Final = 0.05
# One read of an output file.
OUTPUT_READ_BYTES: Final = 64 * 1024
# After writing its exit file the supervisor only closes the lock and exits: how long it gets for that.
SUPERVISOR_EXIT_SECONDS: Final = 5.0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as file:
            return dict(json.load(file))
    except (OSError, ValueError):
        return None


def read_pid_file(directory: Path, description: str) -> dict[str, Any] | None:
    """The handle of the supervisor of ``directory`` from its pid file (None: not written yet). Its start time is
    read now: the caller knows it still runs (it holds the run's lock), or that it has ended (then it is unused)."""
    data = _read_json(directory / PID_FILE)
    if data is None:
        return None
    pid = int(data[PID_FIELD])
    return {HANDLE_PID: pid, HANDLE_STARTED: process_start_time(pid), HANDLE_DIRECTORY: str(directory),
            HANDLE_DESCRIPTION: description}


def start_durable_child(argv: list[str], env: dict[str, str], cwd: str | None, durable: DurableLaunch,
                        description: str) -> DurableLocalProcess:
    """Start ``argv`` under a supervisor that outlives this process (module doc)."""
    supervisor = [sys.executable, "-I", "-S", _supervisor.__file__, str(durable.directory), str(durable.lock_fd), "--",
                  *argv]
    # Its own session, and unguarded: the opt-out of end_with_orchestrator that a durable run is.
    process, _ = start_local_process(supervisor, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, own_group=True,
                                     session=None, guarded=False, pass_fds=(durable.lock_fd,))
    handle = {HANDLE_PID: process.pid, HANDLE_STARTED: process_start_time(process.pid),
              HANDLE_DIRECTORY: str(durable.directory), HANDLE_DESCRIPTION: description}
    return DurableLocalProcess(handle, process)


class DurableLocalProcess(LocalSignals):
    """A durable local child, launched here (``popen``) or found again from its handle."""

    poll_interval_seconds = 0.05

    def __init__(self, handle: dict[str, Any], popen: subprocess.Popen[bytes] | None = None) -> None:
        self._handle = dict(handle)
        self.pid = int(handle[HANDLE_PID])
        self.started = handle.get(HANDLE_STARTED)
        self.directory = Path(handle[HANDLE_DIRECTORY])
        self.popen = popen
        self.description = str(handle.get(HANDLE_DESCRIPTION) or f"the durable process {self.pid}")
        self.stdout = _follow(self.directory / STDOUT_FILE, self.poll)
        self.stderr = _follow(self.directory / STDERR_FILE, self.poll)

    def handle(self) -> dict[str, Any]:
        return dict(self._handle)

    def _alive(self) -> bool:
        """The supervisor still runs (a reused pid has another start time; a zombie of ours is reaped)."""
        if self.popen is not None:
            return self.popen.poll() is None
        started = process_start_time(self.pid)
        return (started is not None and (self.started is None or started == self.started)
                and not _is_zombie(self.pid))

    def poll(self) -> bool:
        return (self.directory / EXIT_FILE).exists() or not self._alive()

    def wait(self, timeout: float | None) -> bool:
        if self.popen is None:  # not our child: poll for its exit file
            return super().wait(timeout)
        try:  # our child: its end wakes us at once
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.poll()
        return True

    def exit_status(self) -> PipesExitStatus:
        data = _read_json(self.directory / EXIT_FILE)
        if data is None:
            return PipesExitStatus(None, killed=True, description="was killed (with its supervisor)",
                                   kind=PipesEngineErrorKind.KILLED)
        return PipesExitStatus.from_returncode(int(data[RETURNCODE_FIELD]))

    def _signal(self, sig: int) -> None:
        if not self._alive():
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        if self.popen is None:
            return
        if (self.directory / EXIT_FILE).exists():  # it is ending (the exit file is its last act): reap it
            try:
                self.popen.wait(SUPERVISOR_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        # else still running (left running): a later run re-attaches; nothing of ours to release


def _is_zombie(pid: int) -> bool:
    """The process has ended but was not reaped yet (its parent, this process's init, has not waited for it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].startswith(b"Z")


def _follow(path: Path, ended: Callable[[], bool]) -> Iterator[bytes]:
    """The chunks of an output file as they are written, until the child has ended and all is read."""
    pause = threading.Event()
    file: IO[bytes] | None = None
    try:
        while True:
            finished = ended()
            if file is None:
                try:
                    file = open(path, "rb")
                except FileNotFoundError:
                    if finished:
                        return
                    pause.wait(OUTPUT_POLL_SECONDS)
                    continue
            chunk = file.read(OUTPUT_READ_BYTES)
            if chunk:
                yield chunk
            elif finished:
                return
            else:
                pause.wait(OUTPUT_POLL_SECONDS)
    finally:
        if file is not None:
            file.close()
