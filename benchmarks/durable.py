"""Durable runs (README "Durable runs", "Performance"), side by side in one run:

``python -m benchmarks.durable [--quick] [--repeat N] [--launchers subprocess,docker,ray,slurm] [--json FILE]``

* ``throughput``: one local child sends N custom messages on the file channel; messages per second of the whole
  run with a store (``launch_key=``: every read block recorded in SQLite, offset included) against the same run
  without (``ours`` is with the store, ``reference`` without; the issue's target: within 10 %);
* ``reattach``, per launcher (``--launchers``, default all; each engine private to the run, started in turn and
  stopped once measured: tests/support/engines_{docker,ray,slurm}.py): an orchestrator process is SIGKILLed right
  after recording its launch; a new orchestrator process with the same key and store is started, and the time from
  before its start to its ``on_launched`` (re-attached: the store read, the launcher's ``attach`` with the engine's
  own API call, the recorded messages replayed) is measured (``ours``), against the time from before a fresh
  orchestrator's start to its ``on_launched`` with no key (``reference``: the launch itself); both pay the
  interpreter's start and the imports, whose floor is measured too (``limit``: a bare interpreter importing the
  launcher's client and its engine's SDK). The time spent in ``attach`` is reported on its own line. The job, the
  clients and their options are the durable kill tests' (tests/support/durable_kills.py, durable_launchers.py).
  The issue's target: at most 1 s plus the engine's own API call. A launcher whose engine cannot start here is
  reported as skipped, with the reason; one that fails while measured, as failed (the exit code is then 1).

Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.support.durable_kills import MESSAGES as JOB_MESSAGES
from tests.support.durable_kills import Launcher, Scenario, result_of
from tests.support.helpers import PYTHON
from tests.support.helpers import REPO_ROOT as REPO

from ._report import benchmark_parser, print_header, print_report, repetitions, write_json

MESSAGES = 100_000
QUICK_MESSAGES = 2_000

CHILD = textwrap.dedent("""
    import os, sys, time
    from pipes_ext import open_pipes
    with open_pipes() as pipes:
        for i in range(int(sys.argv[1])):
            pipes.report_custom_message(i)
        time.sleep(float(sys.argv[2]))
""")

ORCHESTRATOR = textwrap.dedent("""
    import json, sys, time
    from pipes_core import PipesSubprocessClient

    child, messages, hold, store_path, key = sys.argv[1:6]

    launched = []
    options = {"launch_key": key, "store": store_path} if key else {}
    started = time.time()
    invocation = PipesSubprocessClient(forward_stdio=False).run(
        command=[sys.executable, child, messages, hold], on_launched=lambda p: launched.append(time.time()),
        **options)
    print(json.dumps({"launched": launched[0], "run": time.time() - started,
                      "messages": len(invocation.get_custom_messages())}), flush=True)
""")

LAUNCHERS = ("subprocess", "docker", "ray", "slurm")
# The job's pause after each of its messages (tests/support/durable_kills.py's CHILD sends JOB_MESSAGES): long
# enough that the restarted orchestrator usually finds the job still running, short enough for a quick run.
JOB_DELAY = 0.3
# How long one orchestrator process may take (a bound, not a measure).
ORCHESTRATOR_SECONDS = 300.0
# How much of a launcher's failure the report keeps.
FAILURE_CHARS = 1000


def _orchestrate(tmp: Path, messages: int, hold: float, key: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([PYTHON, str(tmp / "orchestrator.py"), str(tmp / "child.py"), str(messages), str(hold),
                                str(tmp / "state" / "runs.sqlite3"), key],
                               env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=ORCHESTRATOR_SECONDS)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.returncode != 0:
        raise RuntimeError(f"the throughput orchestrator exited with {process.returncode}")
    return dict(json.loads(out.splitlines()[-1]))


def throughput(quick: bool, repeat: int) -> dict[str, Any]:
    n = QUICK_MESSAGES if quick else MESSAGES
    with_store: list[float] = []
    without: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "child.py").write_text(CHILD)
        (tmp / "orchestrator.py").write_text(ORCHESTRATOR)
        for i in range(repeat):
            plain = _orchestrate(tmp, n, 0.0, "")
            durable = _orchestrate(tmp, n, 0.0, f"throughput-{i}")
            assert plain["messages"] == durable["messages"] == n
            without.append(n / plain["run"])
            with_store.append(n / durable["run"])
    return {"description": f"{n:,} messages on the file channel, one local child, whole run",
            "metrics": [{"name": "throughput", "unit": "msg/s", "ours": with_store, "reference": without}],
            "notes": ["ours = with a store (launch_key=), reference = the same run without one"]}


# ---------------------------------------------------------------------------------------------- re-attach


@contextmanager
def _subprocess() -> Iterator[Launcher]:
    from tests.support.durable_launchers import SUBPROCESS

    yield SUBPROCESS


@contextmanager
def _docker() -> Iterator[Launcher]:
    from tests.support.durable_launchers import docker_launcher
    from tests.support.engines_docker import start_engine

    engine = start_engine()
    try:
        yield docker_launcher(engine)
    finally:
        engine.daemon.stop()


@contextmanager
def _ray() -> Iterator[Launcher]:
    from tests.support.durable_launchers import ray_launcher
    from tests.support.engines_ray import start_head

    head = start_head()
    try:
        yield ray_launcher(head)
    finally:
        head.stop()


@contextmanager
def _slurm() -> Iterator[Launcher]:
    from tests.support.durable_launchers import slurm_launcher
    from tests.support.engines_slurm import slurm_unavailable_reason, start_slurm_cluster

    reason = slurm_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    root = Path(tempfile.mkdtemp(prefix="pipes-durable-bench-slurm-"))
    try:
        cluster = start_slurm_cluster(root)
        try:
            yield slurm_launcher(cluster)
        finally:
            cluster.cancel_all_jobs()
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Each launcher's engine, private to the run: entered to start it (an error there: the launcher is skipped).
ENGINES: dict[str, Callable[[], AbstractContextManager[Launcher]]] = {
    "subprocess": _subprocess, "docker": _docker, "ray": _ray, "slurm": _slurm}
# What an orchestrator of each launcher imports before it can launch or attach (its client, the engine's SDK): a
# bare interpreter importing them is the floor of both sides.
IMPORTS = {"subprocess": ["pipes_core"], "docker": ["pipes_core.docker", "docker"],
           "ray": ["pipes_core.ray", "ray.job_submission"], "slurm": ["pipes_core.slurm"]}


def _imports_floor(modules: list[str]) -> float:
    """From before an interpreter's start to the end of its importing ``modules``."""
    before = time.time()
    # (with what the orchestrator script itself imports: tests/support/durable_kills.py's ORCHESTRATOR)
    done = subprocess.run([PYTHON, "-c", f"import asyncio, importlib, json, time, {', '.join(modules)}; "
                                         "print(time.time())"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
                          timeout=ORCHESTRATOR_SECONDS)
    return float(done.stdout.strip()) - before


def _orchestrated(scenario: Scenario, point: str, *, keyed: bool, killed: bool = False) -> tuple[float, dict[str, Any]]:
    """Start an orchestrator of the scenario's job and wait for it: (the time before its start, its result); a
    ``killed`` one (at ``point``) has no result."""
    before = time.time()
    code, out, err = scenario.orchestrate(point, "sync", keyed=keyed)
    if killed:
        if code != -signal.SIGKILL:
            raise RuntimeError(f"the orchestrator was not killed at {point} (exit {code}): {err.strip()[-800:]}")
        return before, {}
    if code != 0:
        raise RuntimeError(f"an orchestrator exited with {code}: {err.strip()[-800:]}")
    result = result_of(out)
    if result["error"] is not None or result["messages"] != [{"i": i} for i in range(JOB_MESSAGES)]:
        raise RuntimeError(f"the run did not end as expected: {result}\n{err.strip()[-800:]}")
    if result["launched"] is None:
        raise RuntimeError("on_launched was not called")
    return before, result


def _reattach_samples(launcher: Launcher, imports: list[str], repeat: int, work: Path) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"attached": [], "fresh": [], "in_attach": [], "floor": []}
    for i in range(repeat):
        scenarios = []
        try:
            samples["floor"].append(_imports_floor(imports))
            for kind in ("fresh", "reattach"):
                (work / f"{kind}-{i}").mkdir()
                scenarios.append(Scenario(work / f"{kind}-{i}", launcher, "ok", JOB_DELAY))
            fresh, reattach = scenarios
            before, result = _orchestrated(fresh, "none", keyed=False)
            samples["fresh"].append(result["launched"] - before)
            _orchestrated(reattach, "after_record", keyed=True, killed=True)  # killed right after recording
            before, result = _orchestrated(reattach, "none", keyed=True)
            samples["attached"].append(result["launched"] - before)
            if result["attach_seconds"] is None:
                raise RuntimeError("the restarted orchestrator did not re-attach (its client's attach was not called)")
            samples["in_attach"].append(result["attach_seconds"])
        finally:
            for scenario in scenarios:
                scenario.stop_all()
    return samples


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def reattach(quick: bool, repeat: int, launchers: list[str] | None = None) -> dict[str, Any]:
    metrics: list[dict[str, Any]] = []
    notes = ["ours = restarted with the key and re-attached, reference = fresh with no key (its launch); both "
             "from before the orchestrator process's start (the interpreter's start and the imports included); "
             "limit = the floor: a bare interpreter importing the launcher's client and its engine's SDK",
             "load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())]
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for name in launchers or list(LAUNCHERS):
        with ExitStack() as stack:
            print(f"# reattach: {name}", file=sys.stderr, flush=True)  # (an engine takes a while to start)
            try:
                launcher = stack.enter_context(ENGINES[name]())
            except Exception as exc:  # this engine cannot run here: said, the others measured
                skipped[name] = _first_line(exc)
                notes.append(f"{name}: skipped, its engine cannot start here: {skipped[name]}")
                continue
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"pipes-durable-bench-{name}-")))
            try:
                samples = _reattach_samples(launcher, IMPORTS[name], repeat, work)
            except Exception as exc:  # a bug, or the engine failed meanwhile: said, the others measured
                failed[name] = f"{type(exc).__name__}: {exc}"[:FAILURE_CHARS]
                notes.append(f"{name}: FAILED: {failed[name]}")
                continue
        metrics.append({"name": f"{name}: start to (re-)attached", "unit": "s", "ours": samples["attached"],
                        "reference": samples["fresh"], "limit": samples["floor"]})
        metrics.append({"name": f"{name}: of which in attach", "unit": "s", "ours": samples["in_attach"]})
        attached, in_attach, floor = (statistics.median(samples[side]) for side in ("attached", "in_attach", "floor"))
        notes.append(f"{name}: re-attached {attached:.2f} s after its start: the interpreter and imports "
                     f"{floor:.2f} s, the launcher's attach (the engine's API call) {in_attach:.3f} s, the rest "
                     f"{attached - floor - in_attach:.2f} s (medians)")
    return {"description": "from an orchestrator process's start to its on_launched: restarted after a SIGKILL "
                           "and re-attached (ours) against fresh with no key (reference), per launcher",
            "metrics": metrics, "notes": notes, "skipped": skipped, "failed": failed}


def _launcher_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LAUNCHERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown launcher(s) {', '.join(unknown) or '(none given)'}: give a "
                                         f"comma-separated list of {','.join(LAUNCHERS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks.durable", __doc__, repeated="each side", default_repeat=5)
    parser.add_argument("--launchers", type=_launcher_list, default=list(LAUNCHERS), metavar=",".join(LAUNCHERS),
                        help="the launchers whose re-attach is measured (default: all)")
    args = parser.parse_args(argv)
    repeat = repetitions(args)
    report = print_header("Durable runs: with a store vs without", quick=args.quick, repeat=repeat)
    result = throughput(args.quick, repeat)
    report["results"]["throughput"] = result
    print_report("throughput", result)
    result = reattach(args.quick, repeat, args.launchers)
    report["results"]["reattach"] = result
    print_report("reattach", result, name_width=36)
    write_json(args.json, report)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
