"""``python -m benchmarks.ray [--repeat N] [--messages N] [--json FILE]``: PipesRayJobClient on a real local Ray head.

One private head (tests/support/engines_ray.py) for the whole run, then, side by side in one run:

* per-job overhead: the same trivial command (a Pipes script that opens, sends one message and closes) as a bare
  ``JobSubmissionClient`` submit-and-wait (status polled at the same interval as ours) vs ``PipesRayJobClient``,
  alternately, ``--repeat`` times each; the bare side reads no logs at all;
* delivery latency: a job sends messages at a steady pace, each carrying its ``time.time()``; the orchestrator's
  ``on_event`` notes its own ``time.time()`` (same machine, same clock) on arrival;
* 10,000 messages from one job (``--messages``): all arrive, in order, and the run's wall time.

Not a test: nothing here asserts on time. Prints the figures and the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from typing import Any

from pipes_core import PipesCustomMessageEvent, PipesEvent
from pipes_core.ray import RAY_STATUS_POLL_SECONDS, PipesRayJobClient
from tests.support.engines_ray import start_head

from ._report import machine_info, summarise, write_json

TRIVIAL = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message("ok")
"""

PACED = """
import time
from pipes_ext import open_pipes
with open_pipes() as pipes:
    for i in range({count}):
        pipes.report_custom_message({{"i": i, "sent": time.time()}})
        time.sleep({pause})
"""

MANY = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    for i in range({count}):
        pipes.report_custom_message(i)
"""


def _script(directory: str, name: str, source: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(source))
    return path


def _bare(client: Any, entrypoint: str) -> float:
    started = time.monotonic()
    submission_id = client.submit_job(entrypoint=entrypoint)
    while str(client.get_job_status(submission_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(RAY_STATUS_POLL_SECONDS)
    return time.monotonic() - started


def _ours(client: PipesRayJobClient, command: list[str]) -> float:
    started = time.monotonic()
    client.run(command=command, stdout=lambda data: None)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="jobs per side for the overhead (default 5)")
    parser.add_argument("--messages", type=int, default=10_000, help="messages in the bulk job (default 10,000)")
    parser.add_argument("--latency-messages", type=int, default=20)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    from ray.job_submission import JobSubmissionClient

    machine = {**machine_info(), "load_average_at_start": os.getloadavg()}
    print(f"machine: {machine}")
    head = start_head()
    report: dict[str, Any] = {"machine": machine, "head_start_seconds": head.started_seconds}
    try:
        with tempfile.TemporaryDirectory() as directory:
            bare_client = JobSubmissionClient(head.address)
            ours = PipesRayJobClient(head.address)
            trivial = _script(directory, "trivial.py", TRIVIAL)
            entrypoint = f"{sys.executable} {trivial}"
            _ours(ours, [sys.executable, trivial])  # warm-up: the first job on a fresh head is slower
            _bare(bare_client, entrypoint)
            bare_times, our_times = [], []
            for _ in range(args.repeat):
                bare_times.append(_bare(bare_client, entrypoint))
                our_times.append(_ours(ours, [sys.executable, trivial]))
            bare, mine = summarise(bare_times), summarise(our_times)
            report["overhead"] = {"bare_seconds": bare, "ours_seconds": mine,
                                  "ratio_median": mine["median"] / bare["median"]}
            print(f"per-job wall time (submit and wait), {args.repeat} jobs each, alternating:")
            print(f"  bare JobSubmissionClient  median {bare['median']:.3f} s  (min {bare['min']:.3f}, "
                  f"max {bare['max']:.3f})")
            print(f"  PipesRayJobClient         median {mine['median']:.3f} s  (min {mine['min']:.3f}, "
                  f"max {mine['max']:.3f})")
            print(f"  ratio ours/bare {mine['median'] / bare['median']:.3f}  "
                  f"(+{mine['median'] - bare['median']:.3f} s)")

            arrivals: list[float] = []

            def on_event(event: PipesEvent) -> None:
                if isinstance(event, PipesCustomMessageEvent):
                    arrivals.append(time.time() - event.payload["sent"])

            paced = _script(directory, "paced.py", PACED.format(count=args.latency_messages, pause=0.25))
            ours.run(command=[sys.executable, paced], on_event=on_event, stdout=lambda data: None)
            latency = summarise(arrivals)
            report["latency_seconds"] = latency
            print(f"delivery latency job -> on_event, {len(arrivals)} messages 0.25 s apart: median "
                  f"{latency['median']:.3f} s (min {latency['min']:.3f}, max {latency['max']:.3f})")

            received: list[Any] = []

            def collect(event: PipesEvent) -> None:
                if isinstance(event, PipesCustomMessageEvent):
                    received.append(event.payload)

            many = _script(directory, "many.py", MANY.format(count=args.messages))
            started = time.monotonic()
            ours.run(command=[sys.executable, many], on_event=collect, retain_messages=False,
                     stdout=lambda data: None)
            wall = time.monotonic() - started
            in_order = received == list(range(args.messages))
            report["bulk"] = {"messages": args.messages, "received": len(received), "in_order": in_order,
                              "wall_seconds": wall}
            print(f"{args.messages:,} messages from one job: received {len(received):,}, in order: {in_order}, "
                  f"wall {wall:.3f} s")
    finally:
        head.stop()
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
