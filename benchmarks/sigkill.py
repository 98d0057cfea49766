"""SIGKILL sweep: kill a reporting external process at random moments and count what was lost.

``python -m benchmarks.sigkill [--runs N] [--mode file|stdio|capture|all] [--seed S] [--json FILE]``

The child reports in a loop and, after each call returns, appends the call's number to an acknowledgement
file (``os.write``: it survives the kill). The orchestrator (``open_pipes_session`` on the file channel, the
child launched with ``Popen``) SIGKILLs the child after a random delay, lets the session drain, and compares:

* ``file`` mode: ``report_custom_message(i)`` in a loop; every acknowledged ``i`` must have arrived;
* ``stdio`` mode: the same on the stdio channel (messages as lines on the child's stdout, read from the pipe
  by ``PipesStdioMessageReader``);
* ``capture`` mode (``include_stdio_in_messages``): ``print(..., flush=True)`` in a loop, to stdout and now and
  then stderr; every acknowledged line must be in the real stdout/stderr (files here) **and** in the
  ``log_external_stream`` messages.

A line is lost when it was acknowledged but is missing. The tests run a small sweep (``tests/test_sigkill_sweep.py``);
this script runs a longer one and prints ``runs``, ``acknowledged``, ``lost`` per mode (the README quotes them).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
from typing import Any

from tests.support.helpers import PYTHON

from ._report import write_json

CHILD = textwrap.dedent(
    """
    import os, sys
    from pipes_ext import open_pipes

    mode, ack_path = sys.argv[1], sys.argv[2]
    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with open_pipes() as pipes:
        i = 0
        while True:
            if mode in ("file", "stdio"):
                pipes.report_custom_message(i)
            elif i % 7 == 3:
                print(f"err {i}", file=sys.stderr, flush=True)
            else:
                print(f"out {i}", flush=True)
            os.write(ack, b"%d\\n" % i)
            i += 1
    """
)

# The child is killed after a delay drawn uniformly from this range (seconds), counted from its "opened"
# message (so a loaded machine does not turn every run into a kill during start-up); one run in
# EARLY_KILL_EVERY is instead killed that long after it was launched, usually before open_pipes() returns.
KILL_DELAY_RANGE = (0.0, 0.3)
EARLY_KILL_EVERY = 10
# How long a run waits for "opened" at most (a generous bound that only catches a broken child).
OPENED_TIMEOUT_SECONDS = 60.0


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def run_once(mode: str, workdir: str, delay: float, early: bool = False) -> dict[str, int]:
    """One run: start the child, SIGKILL it ``delay`` s after its "opened" (after its launch with ``early``),
    drain, and count what was lost."""
    from pipes_core import (
        PipesEvent,
        PipesExternalStreamEvent,
        PipesMessageReader,
        PipesOpenedEvent,
        PipesStdioMessageReader,
        PipesTempFileContextInjector,
        PipesTempFileMessageReader,
        open_pipes_session,
    )

    script = os.path.join(workdir, "child.py")
    if not os.path.exists(script):
        with open(script, "w", encoding="utf-8") as f:
            f.write(CHILD)
    ack_path = os.path.join(workdir, "ack")
    out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
    for path in (ack_path, out_path, err_path):
        if os.path.exists(path):
            os.remove(path)
    streamed: dict[str, list[str]] = {"stdout": [], "stderr": []}
    opened = threading.Event()

    def on_event(event: PipesEvent) -> None:
        if isinstance(event, PipesOpenedEvent):
            opened.set()
        elif isinstance(event, PipesExternalStreamEvent):
            streamed[event.stream].append(event.text)

    quiet = logging.Logger("pipes-sigkill-sweep")  # "never sent closed" is the point here, not news
    quiet.addHandler(logging.NullHandler())
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    reader: PipesMessageReader
    if mode == "stdio":
        reader = PipesStdioMessageReader(drain_timeout_seconds=OPENED_TIMEOUT_SECONDS)
    else:
        reader = PipesTempFileMessageReader(include_stdio_in_messages=(mode == "capture"))
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        with open_pipes_session(
            None,
            PipesTempFileContextInjector(),
            reader,
            on_event=on_event,
            external_stream_handler=lambda stream, text: None,
            logger=quiet,
        ) as session:
            process = subprocess.Popen([PYTHON, script, mode, ack_path], stderr=err,
                                       stdout=subprocess.PIPE if mode == "stdio" else out,
                                       env={**env, **session.get_bootstrap_env_vars()})
            if isinstance(reader, PipesStdioMessageReader):
                assert process.stdout is not None
                reader.consume(process.stdout, output=out.write)
            try:
                if not early:
                    opened.wait(OPENED_TIMEOUT_SECONDS)
                process.wait(timeout=delay)  # the child loops forever: this is the random kill moment
            except subprocess.TimeoutExpired:
                pass
            process.kill()
            process.wait()
    with open(ack_path, encoding="utf-8") if os.path.exists(ack_path) else open(os.devnull) as f:
        acked = [int(line) for line in f.read().split()]
    if mode in ("file", "stdio"):
        received = set(session.get_custom_messages())
        lost = sum(1 for i in acked if i not in received)
        return {"acknowledged": len(acked), "lost": lost, "lost_real": 0}
    expected = {i: (f"err {i}" if i % 7 == 3 else f"out {i}") for i in acked}
    with open(out_path, encoding="utf-8") as f:
        real = set(_lines(f.read()))
    with open(err_path, encoding="utf-8") as f:
        real |= set(_lines(f.read()))
    sent = set(_lines("".join(streamed["stdout"]))) | set(_lines("".join(streamed["stderr"])))
    return {
        "acknowledged": len(acked),
        "lost": sum(1 for line in expected.values() if line not in sent),
        "lost_real": sum(1 for line in expected.values() if line not in real),
    }


def sweep(mode: str, runs: int, seed: int = 0) -> dict[str, Any]:
    """``runs`` kill runs of ``mode``; totals of acknowledged and lost (messages, and real output)."""
    rng = random.Random(seed)
    acknowledged = lost = lost_real = runs_with_loss = 0
    with tempfile.TemporaryDirectory(prefix="pipes-sigkill-") as workdir:
        for _ in range(runs):
            early = rng.randrange(EARLY_KILL_EVERY) == 0
            result = run_once(mode, workdir, rng.uniform(*KILL_DELAY_RANGE), early)
            acknowledged += result["acknowledged"]
            lost += result["lost"]
            lost_real += result["lost_real"]
            runs_with_loss += bool(result["lost"] or result["lost_real"])
    return {"mode": mode, "runs": runs, "acknowledged": acknowledged, "lost": lost, "lost_real": lost_real,
            "runs_with_loss": runs_with_loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sigkill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--mode", choices=["file", "stdio", "capture", "all"], default="all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    modes = ["file", "stdio", "capture"] if args.mode == "all" else [args.mode]
    results = [sweep(mode, args.runs, args.seed) for mode in modes]
    for r in results:
        real = f", lost on the real stdout/stderr {r['lost_real']}" if r["mode"] == "capture" else ""
        print(f"{r['mode']:<8} runs {r['runs']}, acknowledged {r['acknowledged']:,}, lost {r['lost']}{real}")
    write_json(args.json, results)
    return 1 if any(r["lost"] or r["lost_real"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
