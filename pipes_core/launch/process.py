"""The hook interface a launcher implements: :class:`PipesLaunchedProcess`, one launched external process as the
run lifecycle drives it (see :mod:`pipes_core.launch.client`, "Hook interface"). Its own module, below both the
per-run options (whose ``on_launched`` callback receives one) and the client that drives it."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pipes_core.channels.stdio import PipesByteSource
from pipes_core.launch.lifecycle import PipesExitStatus

__all__ = ["PipesLaunchedProcess"]


class PipesLaunchedProcess(ABC):
    """One launched external process, as the lifecycle drives it (see the module doc, "Hook interface")."""

    description: str = "the external process"
    stdout: PipesByteSource | None = None
    stderr: PipesByteSource | None = None
    # How often the default wait() looks at poll(): engines that cannot block on the end poll this often. The
    # asyncio driver polls from the loop, backing off from this to max_poll_interval_seconds.
    poll_interval_seconds: float = 0.1
    max_poll_interval_seconds: float = 1.0
    # True when its one output source (``stdout`` or ``stderr``) is a log carrying both streams (e.g. a Ray
    # job's): a failure message then quotes that log's last line, as such.
    one_log: ClassVar[bool] = False

    @abstractmethod
    def poll(self) -> bool:
        """True once the process has ended."""

    def wait(self, timeout: float | None) -> bool:
        """Block until the process ends or ``timeout`` seconds pass (None: no limit); True when it ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = threading.Event()
        while not self.poll():
            if deadline is None:
                pause.wait(self.poll_interval_seconds)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            pause.wait(min(self.poll_interval_seconds, left))
        return True

    @abstractmethod
    def exit_status(self) -> PipesExitStatus:
        """How it ended; called once :meth:`poll` is True."""

    @abstractmethod
    def interrupt(self) -> None:
        """First escalation step: ask it to stop (SIGINT). Harmless once it has ended."""

    @abstractmethod
    def terminate(self) -> None:
        """Second step: tell it to stop (SIGTERM). Harmless once it has ended."""

    @abstractmethod
    def kill(self) -> None:
        """Last step, also called after a forced stop to sweep leftovers (SIGKILL). Harmless once ended."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the run holds; called once, last, after the channel was drained."""

    def handle(self) -> dict[str, Any]:
        """How to find it again (a JSON object), recorded for a durable run; :meth:`PipesClient.attach` rebuilds
        the process from it. Only launchers that support ``launch_key`` have one."""
        raise NotImplementedError(f"{self.description} has no handle: its launcher does not support launch_key")
