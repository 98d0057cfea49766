"""``python -m benchmarks.async_engines [--engine slurm|docker] [--jobs N] [--slurm-conf PATH] [--quick]
[--json FILE]``: many Slurm jobs (or Docker containers) run at once from one event loop by the async twin
(``PipesAsyncSlurmClient``, ``PipesAsyncDockerClient``), against the sync client on a thread per run.

Each side runs ``--jobs`` (default 50; ``--quick``: 5) Pipes-aware jobs at once (open, one message, close) and
reports the wall time of the batch, the peak of this process's threads while it runs and its resident memory
(the peak growth over the start of the batch, and both per run). The engine is private to the run
(tests/support/engines_slurm.py,
tests/support/engines_docker.py), started first and stopped at the end. Not a test: nothing here
asserts on time; read the ratios.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.helpers import PYTHON

from ._report import benchmark_parser, print_header, print_report, write_json

# How many runs at once by default, and with --quick (keeps it working on a small machine).
DEFAULT_JOBS = 50
QUICK_JOBS = 5
# How often the thread count is sampled while a batch runs.
THREAD_SAMPLE_SECONDS = 0.05

CHILD = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message({"done": True})
"""


class _Peaks:
    """The peak thread count (this process) while a batch runs, sampled on a thread of its own (not counted)."""

    def __init__(self) -> None:
        self.threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(THREAD_SAMPLE_SECONDS):
            self.threads = max(self.threads, threading.active_count() - 1)

    def __enter__(self) -> _Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rss_mb() -> float:
    """This process's current resident memory, in MB (from /proc; the peak from getrusage otherwise)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() / 1e6
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def _measure(batch: Callable[[], list[BaseException | None]], jobs: int) -> dict[str, float]:
    before_rss = _rss_mb()
    peak_rss = [before_rss]
    stop = threading.Event()

    def rss_sampler() -> None:
        while not stop.wait(THREAD_SAMPLE_SECONDS):
            peak_rss[0] = max(peak_rss[0], _rss_mb())

    sampler = threading.Thread(target=rss_sampler, daemon=True)
    sampler.start()
    started = time.monotonic()
    with _Peaks() as peaks:
        errors = batch()
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    failed = [e for e in errors if e is not None]
    return {"wall": wall, "threads": peaks.threads - 1,  # the RSS sampler
            "threads_per_run": (peaks.threads - 1) / jobs, "rss_growth_mb": peak_rss[0] - before_rss,
            "rss_per_run_mb": (peak_rss[0] - before_rss) / jobs, "failed": len(failed),
            "first_error": f"{type(failed[0]).__name__}: {str(failed[0])[:200]}" if failed else ""}


@contextmanager
def _slurm(slurm_conf: str | None) -> Iterator[tuple[Callable[[], Any], Callable[[], Any], dict[str, Any]]]:
    from pipes_core.slurm import PipesAsyncSlurmClient, PipesSlurmClient, SlurmCommands

    from .slurm import _cluster

    shared = Path(tempfile.mkdtemp(prefix="pipes-async-engines-"))
    script = shared / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    try:
        with _cluster(slurm_conf) as conf:
            options = {"commands": SlurmCommands(slurm_conf=conf), "shared_dir": str(shared), "forward_stdio": False}
            yield (lambda: PipesSlurmClient(**options), lambda: PipesAsyncSlurmClient(**options),
                   {"command": [PYTHON, str(script)]})
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@contextmanager
def _docker(slurm_conf: str | None) -> Iterator[tuple[Callable[[], Any], Callable[[], Any], dict[str, Any]]]:
    from pipes_core.docker import PipesAsyncDockerClient, PipesDockerClient
    from tests.support.engines_docker import start_engine

    engine = start_engine()
    try:
        options = {"client": engine.client, "forward_stdio": False}
        yield (lambda: PipesDockerClient(**options), lambda: PipesAsyncDockerClient(**options),
               {"image": engine.images.test, "command": ["python3", "-c", CHILD], "network": "none"})
    finally:
        engine.daemon.stop()


ENGINES = {"slurm": _slurm, "docker": _docker}


def run(engine: str, jobs: int, slurm_conf: str | None = None) -> dict[str, Any]:
    with ENGINES[engine](slurm_conf) as (make_sync, make_async, run_options):
        def sync_batch() -> list[BaseException | None]:
            client = make_sync()

            def one(_: int) -> BaseException | None:
                try:
                    client.run(**run_options)
                except Exception as exc:
                    return exc
                return None

            with ThreadPoolExecutor(max_workers=jobs) as pool:
                return list(pool.map(one, range(jobs)))

        def async_batch() -> list[BaseException | None]:
            client = make_async()

            async def main() -> list[BaseException | None]:
                results = await asyncio.gather(*(client.run(**run_options) for _ in range(jobs)),
                                               return_exceptions=True)
                return [r if isinstance(r, BaseException) else None for r in results]

            try:
                return asyncio.run(main())
            finally:
                client.close()

        ours = _measure(async_batch, jobs)
        reference = _measure(sync_batch, jobs)
    metrics = [{"name": name, "unit": unit, "ours": [ours[key]], "reference": [reference[key]]}
               for name, unit, key in (("batch wall time", "s", "wall"), ("peak threads", "threads", "threads"),
                                       ("threads per run", "threads", "threads_per_run"),
                                       ("peak RSS growth", "MB", "rss_growth_mb"),
                                       ("RSS per run", "MB", "rss_per_run_mb"))]
    notes = [f"{jobs} {engine} runs at once; ours: one event loop (the async twin, its executor of 8 threads); "
             "reference: the sync client, a thread per run"]
    for side, figures in (("ours", ours), ("reference", reference)):
        if figures["failed"]:
            notes.append(f"{side}: {figures['failed']} run(s) failed, first: {figures['first_error']}")
    return {"description": f"{jobs} concurrent {engine} runs from one process", "metrics": metrics, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks.async_engines", __doc__, repeated="each batch",
                              default_repeat=1, quick=f"{QUICK_JOBS} runs at once")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="slurm")
    parser.add_argument("--jobs", type=int, help=f"runs at once (default {DEFAULT_JOBS}, quick {QUICK_JOBS})")
    parser.add_argument("--slurm-conf", metavar="PATH", help="a running cluster's slurm.conf (default: start one)")
    args = parser.parse_args(argv)
    jobs = args.jobs or (QUICK_JOBS if args.quick else DEFAULT_JOBS)
    report = print_header(f"Async engines: {jobs} concurrent {args.engine} runs", quick=args.quick, repeat=1)
    result = run(args.engine, jobs, args.slurm_conf)
    report["results"][f"async_{args.engine}"] = result
    print_report(f"async_{args.engine}", result)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
