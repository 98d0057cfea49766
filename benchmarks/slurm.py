"""``python -m benchmarks.slurm [--quick] [--repeat N] [--json FILE] [--slurm-conf PATH]``: the Slurm client
against the bare engine, side by side in one run.

Without ``--slurm-conf`` a private one-node cluster is started for the run (tests/support/engines_slurm.py: munged,
slurmctld, slurmd under a temp dir; needs root and Debian's slurm-wlm + munge) and stopped at the end.

* **per-job wall time**, the same Pipes-aware command (start Python, open, one message, close): ours
  (``PipesSlurmClient.run``) against bare ``sbatch --wait --wrap`` (the reference), and against a *floor*:
  ``sbatch --parsable`` followed by ``scontrol show job`` every 0.1 s until the job has ended, which is the
  fastest any client polling the controller can learn of the end. Repetitions alternate the three. Slurm's
  scheduler starts jobs on its own tick (0-3 s here), which dominates every figure: read medians and minima.
* **the session's own cost**: open + close of a Pipes session with the client's default channels, no job.
* **delivery latency** from the job writing a message to ``on_event``, 50 messages 20 ms apart (same machine,
  so one clock), with the messages file read by polling (``shared_dir``, as on a cluster) and by inotify.
* **10,000 messages** from one job: all received, in order (a note says otherwise); wall time ours against
  bare ``sbatch --wait`` of the same command (whose messages then go nowhere).

Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.helpers import PYTHON

from ._report import benchmark_parser, print_header, print_report, repetitions, write_json

ONE_MESSAGE_CHILD = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message({"done": True})
"""

LATENCY_CHILD = """
import sys, time
from pipes_ext import open_pipes
n, gap = int(sys.argv[1]), float(sys.argv[2])
with open_pipes() as pipes:
    for i in range(n):
        time.sleep(gap)
        pipes.report_custom_message({"seq": i, "t": time.time()})
"""

MANY_CHILD = """
import sys
from pipes_ext import open_pipes
n = int(sys.argv[1])
with open_pipes() as pipes:
    send = pipes.report_custom_message
    for i in range(n):
        send({"seq": i, "name": "row", "value": 1.5})
"""

FLOOR_POLL_SECONDS = 0.1


@contextmanager
def _cluster(slurm_conf: str | None) -> Iterator[str]:
    if slurm_conf is not None:
        yield slurm_conf
        return
    from tests.support.engines_slurm import slurm_unavailable_reason, start_slurm_cluster

    reason = slurm_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"benchmarks.slurm: {reason}")
    root = Path(tempfile.mkdtemp(prefix="pipes-slurm-bench-"))
    cluster = start_slurm_cluster(root)
    try:
        yield str(cluster.conf)
    finally:
        cluster.cancel_all_jobs()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _env(conf: str) -> dict[str, str]:
    env = {**os.environ, "SLURM_CONF": conf}
    for name in [n for n in env if n.startswith("DAGSTER_PIPES_")]:
        del env[name]
    return env


def _bare_wait(conf: str, argv: list[str], out_dir: str) -> float:
    started = time.perf_counter()
    subprocess.run(["sbatch", "--wait", "--parsable", "--no-requeue", f"--output={out_dir}/bare-%j.out",
                    "--wrap", "exec " + shlex.join(argv)], env=_env(conf), check=True, capture_output=True)
    return time.perf_counter() - started


def _floor(conf: str, argv: list[str], out_dir: str) -> float:
    env = _env(conf)
    started = time.perf_counter()
    done = subprocess.run(["sbatch", "--parsable", "--no-requeue", f"--output={out_dir}/floor-%j.out",
                           "--wrap", "exec " + shlex.join(argv)], env=env, check=True, capture_output=True, text=True)
    job_id = done.stdout.strip().split(";")[0]
    pause = threading.Event()
    while True:
        shown = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True)
        state = shown.stdout.split("JobState=", 1)[1].split()[0] if "JobState=" in shown.stdout else ""
        if state and state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return time.perf_counter() - started
        pause.wait(FLOOR_POLL_SECONDS)


def _client(conf: str, shared_dir: str | None = None) -> Any:
    from pipes_core.slurm import PipesSlurmClient, SlurmCommands

    return PipesSlurmClient(commands=SlurmCommands(slurm_conf=conf), shared_dir=shared_dir, forward_stdio=False)


def _script(directory: str, name: str, source: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    return path


def _session_cost(repeat: int) -> list[float]:
    from pipes_core import PipesEnvContextInjector, PipesRunContext, open_pipes_session
    from pipes_core.slurm import PipesSlurmMessageReader

    samples = []
    for _ in range(max(5, repeat * 5)):
        started = time.perf_counter()
        with open_pipes_session(PipesRunContext(), PipesEnvContextInjector(), PipesSlurmMessageReader()) as session:
            session.get_bootstrap_env_vars()
        samples.append(time.perf_counter() - started)
    return samples


def slurm(*, quick: bool, repeat: int, slurm_conf: str | None = None) -> dict[str, Any]:
    import logging

    logging.getLogger("pipes_core").setLevel(logging.ERROR)  # "never opened" warnings of the bare runs etc.
    notes: list[str] = []
    metrics: list[dict[str, Any]] = []
    work = tempfile.mkdtemp(prefix="pipes-slurm-bench-work-")
    try:
        with _cluster(slurm_conf) as conf:
            one = [PYTHON, _script(work, "one.py", ONE_MESSAGE_CHILD)]
            client = _client(conf)
            ours, bare, floor = [], [], []
            for _ in range(repeat):
                started = time.perf_counter()
                invocation = client.run(command=one)
                ours.append(time.perf_counter() - started)
                if invocation.get_custom_messages() != [{"done": True}]:
                    notes.append("per-job: ours lost the message")
                bare.append(_bare_wait(conf, one, work))
                floor.append(_floor(conf, one, work))
            metrics.append({"name": "per-job wall time", "unit": "s", "ours": ours, "reference": bare,
                            "limit": floor})
            metrics.append({"name": "session open+close", "unit": "s", "ours": _session_cost(repeat)})

            n, gap = (10, 0.02) if quick else (50, 0.02)
            latency = [PYTHON, _script(work, "latency.py", LATENCY_CHILD), str(n), str(gap)]
            for label, shared in (("polling (shared_dir)", work), ("inotify (local temp)", None)):
                delays: list[float] = []

                def on_event(event: Any, delays: list[float] = delays) -> None:
                    payload = getattr(event, "payload", None)
                    if isinstance(payload, dict) and "t" in payload:
                        delays.append(time.time() - payload["t"])

                _client(conf, shared).run(command=latency, on_event=on_event, retain_messages=False)
                if len(delays) != n:
                    notes.append(f"latency {label}: {len(delays)} of {n} messages")
                ordered = sorted(delays)
                metrics.append({"name": f"latency median, {label}", "unit": "s", "ours": [statistics.median(delays)]})
                metrics.append({"name": f"latency p99, {label}", "unit": "s",
                                "ours": [ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]]})
                metrics.append({"name": f"latency max, {label}", "unit": "s", "ours": [ordered[-1]]})

            count = 1_000 if quick else 10_000
            many = [PYTHON, _script(work, "many.py", MANY_CHILD), str(count)]
            ours_many, bare_many = [], []
            for _ in range(max(1, repeat // 2)):
                seen: list[int] = []

                def collect(event: Any, seen: list[int] = seen) -> None:
                    payload = getattr(event, "payload", None)
                    if isinstance(payload, dict):
                        seen.append(payload["seq"])

                started = time.perf_counter()
                _client(conf, work).run(command=many, retain_messages=False, on_event=collect)
                ours_many.append(time.perf_counter() - started)
                if seen != list(range(count)):
                    notes.append(f"{count:,} messages: received {len(seen):,}, in order: {seen == sorted(seen)}")
                bare_many.append(_bare_wait(conf, many, work))
            metrics.append({"name": f"{count:,} messages, wall time", "unit": "s", "ours": ours_many,
                            "reference": bare_many})
            if not any(note.startswith(f"{count:,} messages") for note in notes):
                notes.append(f"{count:,} messages: every run received all, in order")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "description": "PipesSlurmClient vs bare sbatch --wait (reference) and sbatch + scontrol every 0.1 s "
                       "(limit: the floor for a polling client), one-node cluster on this machine",
        "metrics": metrics,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks.slurm", __doc__, repeated="the per-job comparison",
                              default_repeat=5)
    parser.add_argument("--slurm-conf", metavar="PATH", help="use this running cluster instead of starting one")
    args = parser.parse_args(argv)
    repeat = repetitions(args)
    report = print_header("Slurm benchmark", quick=args.quick, repeat=repeat)
    result = slurm(quick=args.quick, repeat=repeat, slurm_conf=args.slurm_conf)
    report["results"]["slurm"] = result
    print_report("slurm", result, name_width=36)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
