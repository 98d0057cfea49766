"""``python -m benchmarks.concurrent [--sessions N] [--sleep S] [--messages M] [--only VARIANT ...]``

N concurrent sessions, each child opening, waiting until all have opened, sleeping S seconds, sending M custom
messages and closing, run three
ways side by side in one run, each in a fresh process of its own so its threads and memory are its own:

* ``async``: our :class:`PipesAsyncSubprocessClient`, N tasks in one event loop;
* ``sync``: our :class:`PipesSubprocessClient`, N threads;
* ``dagster``: Dagster's own ``open_pipes_session`` around ``subprocess.run``, N threads (inside an op invoked
  directly, as the other reference benchmarks do).

Reported per variant: messages delivered in order per session, the orchestrator's peak thread count, its memory
growth per concurrent session (RSS once every child has opened, minus the RSS before the first launch), its CPU
while every child sleeps (from the barrier's release to the first message after the sleep), and
the total wall time against the slowest single session. The child is the same small ``pipes_ext`` script for all
three (``python -S``). Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.helpers import REPO_ROOT as REPO

from ._report import machine_info, write_json

# The child opens, waits at a barrier until every child has opened (opening a FIFO for reading blocks, at no CPU
# cost, until the orchestrator opens its other end), sleeps, sends its messages and closes. Without the barrier
# the sleeps would not overlap: starting 500 Python processes takes longer than 2 s on 2 CPUs.
CHILD = """
import os, signal, sys, time
from pipes_ext import open_pipes
signal.alarm(600)  # if the orchestrator dies, a child blocked at the barrier does not wait forever
barrier, sleep, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
with open_pipes() as pipes:
    os.close(os.open(barrier, os.O_RDONLY))
    time.sleep(sleep)
    for i in range(count):
        pipes.report_custom_message({"seq": i})
"""
VARIANTS = ("async", "sync", "dagster")


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Probe:
    """Collects what a variant measures; thread-safe. ``opened`` / ``message`` are called from the variant's
    event callbacks."""

    def __init__(self, sessions: int) -> None:
        self.sessions = sessions
        self.lock = threading.Lock()
        self.seen: dict[int, list[int]] = {i: [] for i in range(sessions)}
        self.opened = 0
        self.all_opened = threading.Event()
        self.first_after_sleep: tuple[float, float] | None = None
        self.all_opened_at: tuple[float, float, int] | None = None
        self.durations: list[float] = []
        self.peak_threads = threading.active_count()
        self.errors: list[str] = []

    def on_opened(self) -> None:
        with self.lock:
            self.opened += 1
            if self.opened == self.sessions:
                self.all_opened.set()

    def release(self, barrier: str, stop: threading.Event) -> None:
        """Once every child has opened: measure, then open the barrier (every child then sleeps). The write end
        stays open until the run ends: a child that sent ``opened`` but has not yet reached the barrier's open
        would otherwise block for good once the writer closed (a FIFO opened for reading with no writer waits)."""
        while not self.all_opened.wait(0.05):
            if stop.is_set():
                return
        self.all_opened_at = (time.monotonic(), _cpu_seconds(), _rss_bytes())
        fd = os.open(barrier, os.O_WRONLY)
        try:
            stop.wait()
        finally:
            os.close(fd)

    def on_message(self, session: int, seq: int) -> None:
        with self.lock:
            if self.first_after_sleep is None and self.all_opened_at is not None:
                self.first_after_sleep = (time.monotonic(), _cpu_seconds())
            self.seen[session].append(seq)

    def sample_threads(self, stop: threading.Event) -> None:
        while not stop.wait(0.05):
            self.peak_threads = max(self.peak_threads, threading.active_count() - 2)  # not this one, nor release


def _event_callback(probe: Probe, index: int) -> Callable[[Any], None]:
    def on_event(event: Any) -> None:
        name = type(event).__name__
        if name == "PipesOpenedEvent":
            probe.on_opened()
        elif name == "PipesCustomMessageEvent":
            probe.on_message(index, event.payload["seq"])

    return on_event


def _child_command(script: str, barrier: str, sleep: float, messages: int) -> list[str]:
    return [sys.executable, "-S", script, barrier, str(sleep), str(messages)]


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_async(probe: Probe, command: list[str]) -> None:
    import asyncio

    from pipes_core.launch.async_client import PipesAsyncSubprocessClient

    async def one(index: int) -> None:
        started = time.monotonic()
        client = PipesAsyncSubprocessClient(env={"PYTHONPATH": str(REPO)}, forward_stdio=False)
        try:
            await client.run(command=command, on_event=_event_callback(probe, index), retain_messages=False)
        except Exception as exc:
            probe.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        probe.durations.append(time.monotonic() - started)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(probe.sessions)))

    asyncio.run(main())


def run_sync(probe: Probe, command: list[str]) -> None:
    from pipes_core import PipesSubprocessClient

    def one(index: int) -> None:
        started = time.monotonic()
        try:
            PipesSubprocessClient(env={"PYTHONPATH": str(REPO)}, forward_stdio=False).run(
                command=command, on_event=_event_callback(probe, index), retain_messages=False)
        except Exception as exc:
            probe.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        probe.durations.append(time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=probe.sessions) as pool:
        list(pool.map(one, range(probe.sessions)))


def run_dagster(probe: Probe, command: list[str]) -> None:
    import logging
    import warnings

    from dagster import build_op_context, op, open_pipes_session
    from dagster._core.pipes.context import PipesMessageHandler
    from dagster._core.pipes.utils import PipesTempFileContextInjector, PipesTempFileMessageReader

    logging.getLogger("dagster").setLevel(logging.CRITICAL)
    local = threading.local()
    original_opened = PipesMessageHandler._handle_opened
    original_extra = PipesMessageHandler._handle_extra_message

    def opened(self: Any, opened_payload: Any) -> None:
        probe.on_opened()
        original_opened(self, opened_payload)

    def extra(self: Any, payload: Any) -> None:
        probe.on_message(self._benchmark_index, payload["seq"])
        original_extra(self, payload)

    @op
    def run_child(context):  # type: ignore[no-untyped-def]  # dagster rejects an Any annotation
        with open_pipes_session(context=context, context_injector=PipesTempFileContextInjector(),
                                message_reader=PipesTempFileMessageReader()) as session:
            session.message_handler._benchmark_index = local.index
            subprocess.run(command, env={**_child_env(), **session.get_bootstrap_env_vars()}, check=True,
                           stdout=subprocess.DEVNULL)
        return 0

    def one(index: int) -> None:
        local.index = index
        started = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_child(build_op_context())
        except Exception as exc:
            probe.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        probe.durations.append(time.monotonic() - started)

    PipesMessageHandler._handle_opened = opened  # type: ignore[method-assign]
    PipesMessageHandler._handle_extra_message = extra  # type: ignore[method-assign]
    try:
        with ThreadPoolExecutor(max_workers=probe.sessions) as pool:
            list(pool.map(one, range(probe.sessions)))
    finally:
        PipesMessageHandler._handle_opened = original_opened  # type: ignore[method-assign]
        PipesMessageHandler._handle_extra_message = original_extra  # type: ignore[method-assign]


RUNNERS = {"async": run_async, "sync": run_sync, "dagster": run_dagster}


def measure(variant: str, sessions: int, sleep: float, messages: int) -> dict[str, Any]:
    """One variant in this process; returns its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        Path(script).write_text(CHILD, encoding="utf-8")
        barrier = os.path.join(tmp, "barrier")
        os.mkfifo(barrier)
        command = _child_command(script, barrier, sleep, messages)
        if variant == "dagster":  # import the framework before the baseline, as the others import ours
            import dagster  # noqa: F401
        import pipes_core
        import pipes_core.launch.async_session  # noqa: F401

        probe = Probe(sessions)
        stop = threading.Event()
        sampler = threading.Thread(target=probe.sample_threads, args=(stop,), daemon=True)
        releaser = threading.Thread(target=probe.release, args=(barrier, stop), daemon=True)
        sampler.start()
        releaser.start()
        threads_before = threading.active_count() - 2
        rss_before = _rss_bytes()
        started = time.monotonic()
        RUNNERS[variant](probe, command)
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
        releaser.join()
    in_order = sum(seen == list(range(messages)) for seen in probe.seen.values())
    result: dict[str, Any] = {
        "variant": variant,
        "sessions": sessions,
        "sessions_complete_in_order": in_order,
        "errors": probe.errors[:5],
        "error_count": len(probe.errors),
        "threads_before": threads_before,
        "peak_threads": probe.peak_threads,
        "wall_seconds": round(wall, 3),
        "slowest_session_seconds": round(max(probe.durations), 3) if probe.durations else None,
    }
    if probe.all_opened_at is not None:
        opened_time, opened_cpu, opened_rss = probe.all_opened_at
        result["memory_growth_per_session_kb"] = round((opened_rss - rss_before) / 1024 / sessions, 1)
        if probe.first_after_sleep is not None:
            after_time, after_cpu = probe.first_after_sleep
            window = after_time - opened_time
            if window > 0:
                result["sleep_window_seconds"] = round(window, 3)
                result["cpu_percent_while_children_sleep"] = round(100 * (after_cpu - opened_cpu) / window, 2)
    if result["slowest_session_seconds"]:
        result["wall_over_slowest_session"] = round(wall / result["slowest_session_seconds"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concurrent", description=__doc__)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--sleep", type=float, default=2.0)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--only", nargs="*", choices=VARIANTS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child mode: one variant
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.sessions, args.sleep, args.messages)))
        return 0
    results = []
    machine = machine_info()
    print(f"# {args.sessions} concurrent sessions: child opens, sleeps {args.sleep:g} s, sends {args.messages} "
          f"messages, closes; {machine['cpus']} CPUs, Python {machine['python']}")
    for variant in args.only or VARIANTS:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.concurrent", "--variant", variant, "--sessions",
                               str(args.sessions), "--sleep", str(args.sleep), "--messages", str(args.messages)],
                              cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            result = {"variant": variant, "failed": proc.stderr.strip().splitlines()[-3:]}
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
