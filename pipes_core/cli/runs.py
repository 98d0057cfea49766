"""The command line's durable runs (README "Durable runs"): ``pipes run --launch-key KEY [--state-dir DIR]`` and
``pipes runs [list|stop KEY|forget KEY|sweep] [--state-dir DIR] [--json]``. Kept apart from the rest of
:mod:`pipes_core.cli.main`, which only calls these functions."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import IO, Any, Final

from pipes_core.launch.client import PipesClient
from pipes_core.launch.manage import forget_run, stop_run, sweep
from pipes_core.launch.run_store import PipesRunRecord, PipesRunStore
from pipes_core.protocol.errors import PipesUsageError
from pipes_core.protocol.failures import escape_controls

__all__ = ["add_run_arguments", "add_runs_parser", "durable_options", "runs_main", "RUNS_ACTIONS"]

# `pipes runs ACTION`: list (the default), and the three that change something.
LIST: Final = "list"
STOP: Final = "stop"
FORGET: Final = "forget"
SWEEP: Final = "sweep"
RUNS_ACTIONS: Final = (LIST, STOP, FORGET, SWEEP)
# What `pipes runs` shows of a handle: the fields that name the launched work, whichever launcher made it (a local
# supervisor's pid and start time, a container, a Ray job at its address, a Slurm job), not the paths and commands.
HANDLE_FIELDS: Final = ("pid", "started", "container", "name", "docker_host", "address", "submission_id", "job_id")
# ... and in text, the first of these a handle has.
HANDLE_WORDS: Final = (("pid", "pid"), ("container", "container"), ("submission_id", "Ray job"),
                       ("job_id", "Slurm job"))


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """``pipes run``'s durable options."""
    group = run.add_argument_group("durable runs", "survive this process: run the same command again to finish it")
    group.add_argument("--launch-key", metavar="KEY",
                       help="the run's key: a run with this key in the store is re-attached, drained or reported "
                            "instead of launched again")
    group.add_argument("--state-dir", metavar="DIR",
                       help="where the run store is (default $PIPES_STATE_DIR, else ~/.local/state/pipes)")


def add_runs_parser(sub: Any) -> None:
    """``pipes runs``."""
    runs = sub.add_parser("runs", help="list, stop or forget durable runs (pipes run --launch-key)")
    runs.add_argument("action", nargs="?", default=LIST, choices=RUNS_ACTIONS,
                      help="list (default); stop KEY: stop its job; forget KEY: remove it from the store; sweep: "
                           "remove files that no run owns, and stop orphans on the engines named")
    runs.add_argument("key", nargs="?", metavar="KEY", help="the run's launch key (for stop and forget)")
    runs.add_argument("--state-dir", metavar="DIR",
                      help="where the run store is (default $PIPES_STATE_DIR, else ~/.local/state/pipes)")
    runs.add_argument("--json", action="store_true", help="one JSON object per run on stdout")
    engines = runs.add_argument_group("sweep's engines", "also stop, on these engines, what an orchestrator of this "
                                      "host that is gone launched without --launch-key")
    engines.add_argument("--docker", action="store_true", help="the Docker daemon of the environment (DOCKER_HOST)")
    engines.add_argument("--ray", metavar="ADDRESS", help="the Ray cluster at ADDRESS (its dashboard/jobs address)")
    engines.add_argument("--slurm", action="store_true", help="this user's Slurm jobs")
    engines.add_argument("--slurm-conf", metavar="PATH", help="SLURM_CONF for the Slurm commands (with --slurm)")


def _store(args: argparse.Namespace) -> PipesRunStore:
    return PipesRunStore.in_state_dir(args.state_dir)


def durable_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options of ``pipes run --launch-key KEY [--state-dir DIR]``."""
    if args.launch_key is None:
        if args.state_dir is not None:
            raise PipesUsageError("--state-dir is for durable runs: give --launch-key KEY too")
        return {}
    return {"launch_key": args.launch_key, "store": _store(args)}


def _row(record: PipesRunRecord) -> dict[str, Any]:
    handle = record.handle or {}
    outcome = record.outcome or {}
    return {
        "key": record.launch_key,
        "launcher": record.launcher,
        "handle": {name: handle[name] for name in HANDLE_FIELDS if name in handle} or None,
        "state": record.state,
        "started": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="seconds"),
        "position": {"messages": record.messages, **(record.position or {})},
        "outcome": None if not outcome else {"exit_code": outcome.get("exit_code"), "error": outcome.get("error"),
                                             "message": outcome.get("message")},
    }


def _text(row: dict[str, Any]) -> str:
    outcome = row["outcome"]
    if outcome is None:
        said = "-"
    elif outcome["error"]:
        said = f"{outcome['error']}: {outcome['message']}"
    else:
        said = f"succeeded (exit {outcome['exit_code']})"
    handle = row["handle"] or {}
    found = next((f"{label} {handle[name]}" for name, label in HANDLE_WORDS if name in handle), "-")
    # One line per run, whatever the key or the job's error message holds (a terminal sequence, a newline).
    return escape_controls(f"{row['key']}  {row['launcher']}  {found}  {row['state']}  {row['started']}  "
                           f"{row['position']['messages']} messages  {said}")


def sweep_clients(args: argparse.Namespace) -> list[PipesClient]:
    """The clients of the engines ``pipes runs sweep`` was asked to sweep (``--docker``, ``--ray``, ``--slurm``)."""
    clients: list[PipesClient] = []
    if args.slurm_conf is not None and not args.slurm:
        raise PipesUsageError("--slurm-conf is for --slurm: give --slurm too")
    if args.docker:
        from pipes_core.docker import PipesDockerClient

        clients.append(PipesDockerClient())
    if args.ray is not None:
        from pipes_core.ray import PipesRayJobClient

        clients.append(PipesRayJobClient(args.ray))
    if args.slurm:
        from pipes_core.slurm import PipesSlurmClient, SlurmCommands

        clients.append(PipesSlurmClient(commands=SlurmCommands(slurm_conf=args.slurm_conf)))
    return clients


def runs_main(args: argparse.Namespace, out: IO[str]) -> int:
    """``pipes runs ...``; a usage problem raises :class:`PipesUsageError` (the caller prints it)."""
    engine_flags = [flag for flag, given in (("--docker", args.docker), ("--ray", args.ray is not None),
                                             ("--slurm", args.slurm), ("--slurm-conf", args.slurm_conf is not None))
                    if given]
    if engine_flags and args.action != SWEEP:
        raise PipesUsageError(f"{engine_flags[0]} is for `pipes runs sweep`: it names an engine to sweep")
    clients = sweep_clients(args) if args.action == SWEEP else []
    store = _store(args)
    if args.action in (STOP, FORGET) and not args.key:
        raise PipesUsageError(f"pipes runs {args.action} needs the run's KEY (see `pipes runs`)")
    if args.action not in (STOP, FORGET) and args.key:
        raise PipesUsageError(f"pipes runs {args.action} takes no KEY")
    with store:
        try:
            if args.action == STOP:
                stopped = stop_run(store, args.key)
                out.write(f"stopped the job of {args.key!r}; `pipes run --launch-key {args.key} ...` concludes it\n"
                          if stopped else f"the run {args.key!r} was not running; nothing stopped\n")
                return 0
            if args.action == FORGET:
                forget_run(store, args.key)
                out.write(f"forgot the run {args.key!r}; the next run with this key launches anew\n")
                return 0
        except KeyError:
            raise PipesUsageError(f"no run with launch key {args.key!r} in {store.path} (see `pipes runs`)") from None
        if args.action == SWEEP:
            said = sweep(store, clients)
            for line in said:
                out.write(line + "\n")
            engines = "" if clients else " (name engines to sweep for orphans too: --docker, --ray ADDRESS, --slurm)"
            out.write(f"swept {len(said)} leftover{'' if len(said) == 1 else 's'}{engines}\n")
            return 0
        rows = [_row(record) for record in store.runs()]
    for row in rows:
        out.write((json.dumps(row, sort_keys=True) if args.json else _text(row)) + "\n")
    if not rows and not args.json:
        out.write(f"no durable runs in {store.path} (pipes run --launch-key KEY starts one)\n")
    return 0
