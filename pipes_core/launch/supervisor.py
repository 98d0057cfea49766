"""The supervisor of a durable local child (see :mod:`pipes_core.launch.durable_local`), standard library only: it is
run by its path (``python -I -S .../_supervisor.py RUN_DIR LOCK_FD -- COMMAND...``), not as part of the package, so
that it starts in the time of a bare interpreter (``-I``: the package's directory, where ``_json.py`` would shadow
the standard library's accelerator, is not on its path; ``-S``: no site-packages needed).

It ignores SIGINT and SIGTERM sent to its group (they are for the command: it outlives the command to say how it
ended), writes its pid to ``pid`` (atomically), runs the command with its output going to the files ``stdout``
and ``stderr``, waits for it and writes its return code to ``exit`` (atomically) before it ends; until then it
holds the run directory's lock (inherited as LOCK_FD). This module is also the home of those file names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

__all__ = ["supervise", "write_json_atomically"]

# In a run directory: the messages file, the child's output, the supervisor's pid and exit status, and the lock
# held for as long as a launch is under way or its supervisor lives.
MESSAGES_FILE = "messages"
STDOUT_FILE = "stdout"
STDERR_FILE = "stderr"
PID_FILE = "pid"
EXIT_FILE = "exit"
LOCK_FILE = "lock"
# The pid and exit files' fields.
PID_FIELD = "pid"
RETURNCODE_FIELD = "returncode"
# The supervisor's exit code for the command when it cannot be started (as a shell's "command not found").
CANNOT_START_EXIT_CODE = 127


def write_json_atomically(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` so that a reader sees all of it or no file (a temp file renamed)."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def supervise(arguments: list[str]) -> int:
    """``arguments``: RUN_DIR LOCK_FD -- COMMAND..."""
    directory, lock_fd, command = arguments[0], int(arguments[1]), arguments[3:]
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: None)
    write_json_atomically(os.path.join(directory, PID_FILE), {PID_FIELD: os.getpid()})
    with open(os.path.join(directory, STDOUT_FILE), "ab") as out, \
            open(os.path.join(directory, STDERR_FILE), "ab") as err:
        try:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        except OSError as exc:
            err.write(f"cannot start {command[0]!r}: {exc}\n".encode())
            returncode = CANNOT_START_EXIT_CODE
        else:
            returncode = child.wait()
    write_json_atomically(os.path.join(directory, EXIT_FILE), {RETURNCODE_FIELD: returncode})
    os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))
