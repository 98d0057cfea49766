"""The hook interface a launcher implements: :class:`PipesLaunchRequest`, what the lifecycle asks it to start, and
:class:`PipesLaunchedProcess`, one launched external process as the run lifecycle drives it (see
:mod:`pipes_core.launch.client`, "Hook interface"); with them what a launch carries for durable runs and for
finding orphans (:class:`DurableLaunch`, the launch labels). Its own module, below the per-run options (whose
``on_launched`` callback receives a process), the client that drives it and the durable runs."""

from __future__ import annotations

import hashlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from pipes_core.channels.stdio import PipesByteSource
from pipes_core.launch.lifecycle import PipesExitStatus
from pipes_core.launch.run_store import PipesRunOwner

if TYPE_CHECKING:
    from pipes_core.launch.session import PipesSession

__all__ = ["PipesLaunchedProcess", "PipesLaunchRequest", "DurableLaunch", "launch_name", "launch_labels",
           "owner_from_labels", "orphan_owner", "LAUNCH_LABEL", "OWNER_HOST_LABEL", "OWNER_PID_LABEL",
           "OWNER_STARTED_LABEL"]

# The labels every remote launch carries (container labels, Ray job metadata, the words of a Slurm job's
# comment): who launched it, and for a durable run under which key (as :func:`launch_name`, a digest: a key may be
# any string, a label value may not).
LAUNCH_LABEL: Final = "io.pipes-sdk.launch"
OWNER_HOST_LABEL: Final = "io.pipes-sdk.owner.host"
OWNER_PID_LABEL: Final = "io.pipes-sdk.owner.pid"
OWNER_STARTED_LABEL: Final = "io.pipes-sdk.owner.started"
# A durable launch's engine name starts with this (a container's name, a Ray submission id, a Slurm job name).
LAUNCH_NAME_PREFIX: Final = "pipes-"


def launch_name(launch_key: str) -> str:
    """The engine name of the durable launch of ``launch_key``: the same for every orchestrator, valid as a
    container name, a Ray submission id and a Slurm job name (``pipes-`` and 32 hex digits of its SHA-256)."""
    return LAUNCH_NAME_PREFIX + hashlib.sha256(launch_key.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class DurableLaunch:
    """What a launcher gets in :attr:`PipesLaunchRequest.durable`: the run's key, its directory (the messages file
    is there), and the lock's descriptor (to hand to what it launches, so that the lock lives as long as the
    launched work; a remote launcher leaves it alone: the orchestrator holds it while it launches)."""

    launch_key: str
    directory: Path
    lock_fd: int

    @property
    def name(self) -> str:
        """The launch's engine name (:func:`launch_name`): a remote launcher names what it launches so, and
        finds it again by it."""
        return launch_name(self.launch_key)


def launch_labels(owner: PipesRunOwner, durable: DurableLaunch | None) -> dict[str, str]:
    """The labels of a launch made by ``owner`` (string values, as every engine takes them)."""
    labels = {OWNER_HOST_LABEL: owner.host, OWNER_PID_LABEL: str(owner.pid),
              OWNER_STARTED_LABEL: "" if owner.started is None else repr(owner.started)}
    if durable is not None:
        labels[LAUNCH_LABEL] = durable.name
    return labels


def owner_from_labels(labels: Mapping[str, Any]) -> PipesRunOwner | None:
    """The owner a launch's labels name (None: not launched by us, or labels we cannot read)."""
    try:
        host = str(labels[OWNER_HOST_LABEL])
        pid = int(labels[OWNER_PID_LABEL])
        started = str(labels.get(OWNER_STARTED_LABEL) or "")
        return PipesRunOwner(host, pid, float(started) if started else None)
    except (KeyError, TypeError, ValueError):
        return None


def orphan_owner(labels: Mapping[str, Any]) -> PipesRunOwner | None:
    """The owner of a launch left behind, when it is one: launched by us without a launch key (a durable launch
    waits for its key's next run to re-attach), by an orchestrator on this host that is gone. None otherwise
    (an owner on another host cannot be checked from here: left alone)."""
    if labels.get(LAUNCH_LABEL):
        return None
    owner = owner_from_labels(labels)
    return owner if owner is not None and owner.is_alive() is False else None


@dataclass(frozen=True)
class PipesLaunchRequest:
    """What the lifecycle asks a launcher to start.

    Attributes:
        session: the open session (its context data, params and handler), for launchers that need more.
        bootstrap_env: env vars to set in the process (empty with the CLI bootstrap).
        bootstrap_args: arguments to append to its command (empty with the env bootstrap).
        stdout_needed: the lifecycle needs the process's stdout as ``PipesLaunchedProcess.stdout`` (it carries the
            stdio message channel, or output is redirected or not forwarded).
        stderr_needed: the same for stderr.
        durable: set for a run with a ``launch_key`` (README "Durable runs"): the run's key, its directory and
            the lock to hand to what is launched; a launcher that supports it (:meth:`PipesClient.attach`) makes
            the launch outlive this process and findable by the key.
        owner: this orchestrator process; remote launchers label what they launch with it
            (:func:`launch_labels`), so that work an orchestrator that died left behind can be found and stopped
            (:meth:`pipes_core.PipesClient.sweep_orphans`).
    """

    session: PipesSession
    bootstrap_env: dict[str, str] = field(default_factory=dict)
    bootstrap_args: list[str] = field(default_factory=list)
    stdout_needed: bool = False
    stderr_needed: bool = False
    durable: DurableLaunch | None = None
    owner: PipesRunOwner = field(default_factory=PipesRunOwner.current)


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
