"""Managing durable runs from outside a run (``pipes runs stop|forget|sweep``, README "Durable runs"): a run's
launched work rebuilt from its recorded handle by a client of the launcher it was recorded with, stopped or
forgotten; leftovers swept. Above the launchers (it imports them, lazily); nothing in a run imports it."""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from pipes_core.launch.durable import handle_with_end, lock, run_directory, runs_directory
from pipes_core.launch.process import PipesLaunchedProcess
from pipes_core.launch.run_store import RUN_CONCLUDED, RUN_LAUNCHING, RUN_RUNNING, PipesRunRecord, PipesRunStore
from pipes_core.launch.supervisor import LOCK_FILE
from pipes_core.protocol.errors import PipesUsageError

if TYPE_CHECKING:
    from pipes_core.launch.client import PipesClient

__all__ = ["LAUNCHER_CLIENTS", "client_for", "live_process", "stop_run", "forget_run", "sweep", "STOP_GRACE_SECONDS"]

# How long `stop` gives a run after SIGTERM before SIGKILL.
STOP_GRACE_SECONDS: Final = 5.0

# The launcher a run was recorded with (its client's class name, sync or async) -> the sync client ("module:class")
# that rebuilds its launched work from the handle (a handle holds all it needs: the client is made with defaults).
LAUNCHER_CLIENTS: Final = {
    "PipesSubprocessClient": "pipes_core.launch.subprocess:PipesSubprocessClient",
    "PipesAsyncSubprocessClient": "pipes_core.launch.subprocess:PipesSubprocessClient",
    "PipesDockerClient": "pipes_core.docker:PipesDockerClient",
    "PipesAsyncDockerClient": "pipes_core.docker:PipesDockerClient",
    "PipesRayJobClient": "pipes_core.ray:PipesRayJobClient",
    "PipesAsyncRayJobClient": "pipes_core.ray:PipesRayJobClient",
    "PipesSlurmClient": "pipes_core.slurm:PipesSlurmClient",
    "PipesAsyncSlurmClient": "pipes_core.slurm:PipesSlurmClient",
}


def client_for(launcher: str) -> PipesClient:
    """A client of the launcher a run was recorded with, to rebuild its launched work from the handle."""
    target = LAUNCHER_CLIENTS.get(launcher)
    if target is None:
        raise PipesUsageError(f"runs of {launcher} cannot be managed from here (known launchers: "
                              f"{', '.join(sorted(name for name in LAUNCHER_CLIENTS if 'Async' not in name))})")
    module, _, name = target.partition(":")
    client: PipesClient = getattr(importlib.import_module(module), name)()
    return client


def live_process(record: PipesRunRecord, store: PipesRunStore | None = None) -> PipesLaunchedProcess | None:
    """The run's launched work when it still runs, else None. Found ended, how it ended is recorded in ``store``
    first (as a run does): closing it may remove what the engine knew of it (a Docker container)."""
    if record.handle is None or record.state not in (RUN_RUNNING, RUN_LAUNCHING):
        return None
    process = client_for(record.launcher).attach(record.handle)
    if process.poll():
        if store is not None:
            store.record_ended(record.launch_key, handle_with_end(record.handle, process.exit_status()))
        process.close()
        return None
    return process


def stop_run(store: PipesRunStore, launch_key: str) -> bool:
    """Stop the run's job (SIGTERM, SIGKILL after :data:`STOP_GRACE_SECONDS`); False when it was not running.
    The run is not concluded: the next run with the key drains it and says how it ended."""
    record = store.get(launch_key)
    if record is None:
        raise KeyError(launch_key)
    process = live_process(record, store)
    if process is None:
        return False
    process.terminate()
    if not process.wait(STOP_GRACE_SECONDS):
        process.kill()
        process.wait(STOP_GRACE_SECONDS)
    return True


def forget_run(store: PipesRunStore, launch_key: str) -> None:
    """Remove the run and its files from the store; a run that still runs is refused (stop it first)."""
    record = store.get(launch_key)
    if record is None:
        raise KeyError(launch_key)
    process = live_process(record, store)
    if process is not None:
        raise PipesUsageError(f"the run {launch_key!r} is still running: stop it first (`pipes runs stop KEY`)")
    store.forget(launch_key)
    shutil.rmtree(run_directory(store, launch_key), ignore_errors=True)


def sweep(store: PipesRunStore, clients: Sequence[PipesClient] = ()) -> list[str]:
    """Remove what no run owns any more: run directories that no run of the store names (a run forgotten while
    its files were in use), and those of concluded runs (a crash between the conclusion and the clean-up); and
    stop, on each engine of ``clients``, what an orchestrator of this host that is gone launched without a key
    (:meth:`pipes_core.PipesClient.sweep_orphans`). Returns what was done, each said in a line."""
    said: list[str] = []
    runs_dir = runs_directory(store)
    if runs_dir.is_dir():
        wanted = {run_directory(store, record.launch_key).name: record for record in store.runs()}
        for directory in sorted(runs_dir.iterdir()):
            record = wanted.get(directory.name)
            if record is None:
                lock_fd = lock(directory / LOCK_FILE, wait=False) if (directory / LOCK_FILE).exists() else -1
                if lock_fd is None:
                    continue  # a launch under way, or a job still running: not ours to remove
                if lock_fd >= 0:
                    os.close(lock_fd)
                shutil.rmtree(directory, ignore_errors=True)
                said.append(f"removed {directory} (no run in the store names it)")
            elif record.state == RUN_CONCLUDED:
                shutil.rmtree(directory, ignore_errors=True)
                said.append(f"removed {directory} (the run {record.launch_key!r} is concluded)")
    for client in clients:
        said.extend(client.sweep_orphans())
    return said
