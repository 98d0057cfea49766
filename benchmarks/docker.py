"""``python -m benchmarks.docker [--quick] [--repeat N] [--json FILE] [--docker-host URL --image IMAGE]``: the
Docker client against plain ``docker run`` and against Dagster's ``PipesDockerClient``, side by side in one run.

Without ``--docker-host`` a private daemon is started for the run and the test image built in it
(tests/support/engines_docker.py: needs root and Debian's docker.io + busybox-static), and stopped at the end. Every
container runs with ``--network none`` and an init process (our client's default; the same for the others).

* **launch to exit**, the same image and Pipes-aware command (start Python, open, one message, close; its
  messages on stdout): ours (``PipesDockerClient.run``) against plain ``docker run --rm`` of the same image,
  command and bootstrap environment (the reference; target: within 10 %), and against the Docker SDK's own
  ``containers.run(remove=True)`` (the floor for a client built on the SDK). Repetitions alternate the three.
  Dagster's ``PipesDockerClient.run`` is timed around the call, inside ``materialize()``.
* **throughput**: N messages from one container, all counted and checked in order; messages per second over
  the receiving window (first to last message received) and the run's wall time; over the container's log
  stream (ours: stdout through the attach stream; Dagster's: stderr through the logs API) and over a
  bind-mounted messages file (ours, ``PipesTempFileMessageReader``).
* **delivery latency**: 200 messages 20 ms apart, each carrying the container's ``time.time()`` (one kernel,
  one clock), to the orchestrator's receipt; median, p99 and max, for the same three channels.

Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._report import benchmark_parser, print_header, print_report, repetitions, write_json

ONE_MESSAGE = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_custom_message({"done": True})
"""

MANY = """
import sys, time
from pipes_ext import open_pipes
n = int(sys.argv[1])
with open_pipes() as pipes:
    send = pipes.report_custom_message
    for i in range(n):
        send({"seq": i, "name": "row", "value": 1.5})
"""

TIMED = """
import sys, time
from pipes_ext import open_pipes
n, gap = int(sys.argv[1]), float(sys.argv[2])
with open_pipes() as pipes:
    for i in range(n):
        time.sleep(gap)
        pipes.report_custom_message({"seq": i, "t": time.time()})
"""

BENCH_LABEL = "io.pipes-sdk.benchmark"


def _cmd(source: str, *args: object) -> list[str]:
    return ["python3", "-c", textwrap.dedent(source), *[str(a) for a in args]]


@contextmanager
def _engine(docker_host: str | None, image: str | None) -> Iterator[tuple[Any, str, str]]:
    """(docker SDK client, DOCKER_HOST, image): the given daemon, or a private one started for the run."""
    import docker

    if docker_host is not None:
        if image is None:
            raise SystemExit("benchmarks.docker: --docker-host needs --image")
        client = docker.DockerClient(base_url=docker_host, version="auto")
        try:
            yield client, docker_host, image
        finally:
            client.close()
        return
    from tests.support.engines_docker import DockerUnavailable, start_engine

    try:
        engine = start_engine()
    except DockerUnavailable as exc:
        raise SystemExit(f"benchmarks.docker: Docker cannot run here: {exc}") from exc
    try:
        yield engine.client, engine.host, engine.images.test
    finally:
        engine.daemon.stop()


def _docker_cli() -> str:
    cli = shutil.which("docker")
    if cli is None:
        raise SystemExit("benchmarks.docker: no docker command line on PATH")
    return cli


def _bootstrap_env() -> dict[str, str]:
    """What our client injects (the context inline, messages on stdout), so the container does the same work
    under ``docker run`` (its message lines then go to /dev/null)."""
    from pipes_core import PipesEnvContextInjector, PipesRunContext, PipesStdioMessageReader, open_pipes_session

    with open_pipes_session(PipesRunContext(), PipesEnvContextInjector(), PipesStdioMessageReader()) as session:
        return session.get_bootstrap_env_vars()


def _plain_docker_run(cli: str, host: str, image: str, argv: list[str]) -> float:
    env_args = [part for name, value in _bootstrap_env().items() for part in ("-e", f"{name}={value}")]
    started = time.perf_counter()
    subprocess.run([cli, "run", "--rm", "--network", "none", "--init", "--label", f"{BENCH_LABEL}=1", *env_args,
                    image, *argv], env={**os.environ, "DOCKER_HOST": host}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _sdk_run(client: Any, image: str, argv: list[str]) -> float:
    started = time.perf_counter()
    client.containers.run(image, argv, remove=True, network_mode="none", init=True, environment=_bootstrap_env(),
                          labels={BENCH_LABEL: "1"})
    return time.perf_counter() - started


def _ours(client: Any, **kwargs: Any) -> Any:
    from pipes_core.docker import PipesDockerClient

    return PipesDockerClient(client=client, forward_stdio=False, **kwargs)


class _Receipts:
    """Arrival times of custom messages, and their payloads, in order."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.payloads: list[Any] = []

    def add(self, payload: Any) -> None:
        self.times.append(time.time())
        self.payloads.append(payload)

    def on_event(self, event: Any) -> None:
        payload = getattr(event, "payload", None)
        if isinstance(payload, dict):
            self.add(payload)

    def rate(self) -> float:
        if len(self.times) < 2 or self.times[-1] == self.times[0]:
            return 0.0
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def in_order(self, count: int) -> bool:
        return [p.get("seq") for p in self.payloads] == list(range(count))

    def delays(self) -> list[float]:
        return [arrived - payload["t"] for arrived, payload in zip(self.times, self.payloads, strict=True)]


def _dagster_runs(host: str, image: str, jobs: list[tuple[str, list[str]]]) -> dict[str, tuple[float, _Receipts]]:
    """Run each (name, command) with Dagster's PipesDockerClient inside one materialize(); per job: the time
    around ``run`` and the messages its reader handed to Dagster's handler."""
    import dagster as dg
    from dagster_docker import PipesDockerClient as DagsterPipesDockerClient
    from dagster_docker.pipes import PipesDockerLogsMessageReader

    results: dict[str, tuple[float, _Receipts]] = {}

    class TimedReader(PipesDockerLogsMessageReader):  # type: ignore[misc]
        receipts: _Receipts

        @contextmanager
        def read_messages(self, handler: Any) -> Iterator[Any]:
            receipts = self.receipts
            handle = handler.handle_message

            def timed(message: Any) -> None:
                if message.get("method") == "report_custom_message":
                    receipts.add((message.get("params") or {}).get("payload"))
                handle(message)

            handler.handle_message = timed
            with super().read_messages(handler) as params:
                yield params

    @dg.asset
    def dagster_docker_bench(context):  # type: ignore[no-untyped-def]  # Dagster resolves annotations at runtime

        for name, argv in jobs:
            reader = TimedReader()
            reader.receipts = _Receipts()
            client = DagsterPipesDockerClient(message_reader=reader)
            started = time.perf_counter()
            client.run(context=context, image=image, command=argv,
                       container_kwargs={"network_mode": "none", "init": True, "labels": {BENCH_LABEL: "1"}})
            results[name] = (time.perf_counter() - started, reader.receipts)
        return dg.MaterializeResult()

    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = host  # Dagster's client uses docker.from_env()
    try:
        # Its reader copies every line that is not a message to our stdout: keep that off the report.
        # Its run's console log goes to stderr: keep that off too.
        with dg.DagsterInstance.ephemeral() as instance, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            dg.materialize([dagster_docker_bench], instance=instance, raise_on_error=True)
    finally:
        if previous is None:
            del os.environ["DOCKER_HOST"]
        else:
            os.environ["DOCKER_HOST"] = previous
    return results


def _cleanup(client: Any) -> None:
    for container in client.containers.list(all=True, filters={"label": BENCH_LABEL}):
        container.remove(force=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def docker_benchmark(*, quick: bool, repeat: int, docker_host: str | None = None,
                     image: str | None = None) -> dict[str, Any]:
    from pipes_core import PipesTempFileMessageReader

    logging.getLogger("pipes_core").setLevel(logging.ERROR)
    logging.getLogger("dagster").setLevel(logging.ERROR)
    notes: list[str] = []
    metrics: list[dict[str, Any]] = []
    cli = _docker_cli()
    with _engine(docker_host, image) as (client, host, image_name):
        try:
            one = _cmd(ONE_MESSAGE)
            ours_client = _ours(client)
            # one warm-up of each, so the first sample does not pay for cold caches
            ours_client.run(image=image_name, command=one, network="none")
            _plain_docker_run(cli, host, image_name, one)
            ours, plain, sdk = [], [], []
            for _ in range(repeat):
                started = time.perf_counter()
                invocation = ours_client.run(image=image_name, command=one, network="none")
                ours.append(time.perf_counter() - started)
                if invocation.get_custom_messages() != [{"done": True}]:
                    notes.append("launch: ours lost the message")
                plain.append(_plain_docker_run(cli, host, image_name, one))
                sdk.append(_sdk_run(client, image_name, one))
            metrics.append({"name": "launch to exit", "unit": "s", "ours": ours, "reference": plain, "limit": sdk})

            count = 2_000 if quick else 100_000
            n, gap = (20, 0.02) if quick else (200, 0.02)
            many, timed = _cmd(MANY, count), _cmd(TIMED, n, gap)
            dagster_jobs = [("launch", one)] * repeat + [("throughput", many), ("latency", timed)]
            dagster_jobs = [(f"{name}-{i}", argv) for i, (name, argv) in enumerate(dagster_jobs)]
            try:
                dagster = _dagster_runs(host, image_name, dagster_jobs)
            except Exception as exc:  # Dagster's client failed here: say so, keep our figures
                notes.append(f"Dagster's PipesDockerClient failed: {type(exc).__name__}: {exc}"[:300])
                dagster = {}
            dagster_launch = [seconds for name, (seconds, _) in dagster.items() if name.startswith("launch")]
            if dagster_launch:
                metrics.append({"name": "launch to exit, Dagster's client", "unit": "s", "ours": ours,
                                "reference": dagster_launch})

            channels: list[tuple[str, dict[str, Any]]] = [
                ("log stream (stdout, attach)", {}),
                ("bind-mounted messages file", {"message_reader": PipesTempFileMessageReader()}),
            ]
            for label, options in channels:
                receipts = _Receipts()
                started = time.perf_counter()
                _ours(client, **options).run(image=image_name, command=many, network="none",
                                             on_event=receipts.on_event, retain_messages=False)
                wall = time.perf_counter() - started
                if not receipts.in_order(count):
                    notes.append(f"throughput, ours over the {label}: {len(receipts.times):,} of {count:,}, in order: "
                                 f"{receipts.payloads == sorted(receipts.payloads, key=lambda p: p['seq'])}")
                metrics.append({"name": f"{count:,} messages, ours, {label}", "unit": "msg/s",
                                "ours": [receipts.rate()]})
                metrics.append({"name": f"{count:,} messages wall, ours, {label}", "unit": "s", "ours": [wall]})
            throughput = [value for name, value in dagster.items() if name.startswith("throughput")]
            if throughput:
                wall, receipts = throughput[0]
                got = len(receipts.times)
                if not receipts.in_order(count):
                    notes.append(f"throughput, Dagster's client: received {got:,} of {count:,} messages")
                metrics.append({"name": f"{count:,} messages, Dagster, log stream (stderr, logs API)",
                                "unit": "msg/s", "reference": [receipts.rate()]})
                metrics.append({"name": f"{count:,} messages wall, Dagster, log stream", "unit": "s",
                                "reference": [wall]})

            for label, options in channels:
                receipts = _Receipts()
                _ours(client, **options).run(image=image_name, command=timed, network="none",
                                             on_event=receipts.on_event, retain_messages=False)
                delays = receipts.delays()
                if len(delays) != n:
                    notes.append(f"latency, ours over the {label}: {len(delays)} of {n} messages")
                metrics.append({"name": f"latency median, ours, {label}", "unit": "s",
                                "ours": [statistics.median(delays)]})
                metrics.append({"name": f"latency p99, ours, {label}", "unit": "s", "ours": [_pct(delays, 0.99)]})
                metrics.append({"name": f"latency max, ours, {label}", "unit": "s", "ours": [max(delays)]})
            latency = [value for name, value in dagster.items() if name.startswith("latency")]
            if latency:
                delays = latency[0][1].delays()
                if len(delays) != n:
                    notes.append(f"latency, Dagster's client: {len(delays)} of {n} messages")
                if delays:
                    metrics.append({"name": "latency median, Dagster, log stream", "unit": "s",
                                    "reference": [statistics.median(delays)]})
                    metrics.append({"name": "latency p99, Dagster, log stream", "unit": "s",
                                    "reference": [_pct(delays, 0.99)]})
                    metrics.append({"name": "latency max, Dagster, log stream", "unit": "s",
                                    "reference": [max(delays)]})
        finally:
            _cleanup(client)
    return {
        "description": "PipesDockerClient vs plain `docker run` (reference) and the SDK's containers.run (limit); "
                       "message channels, and Dagster's PipesDockerClient",
        "metrics": metrics,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks.docker", __doc__, repeated="the launch comparison",
                              default_repeat=7)
    parser.add_argument("--docker-host", metavar="URL", help="use this running daemon instead of starting one")
    parser.add_argument("--image", help="with --docker-host: an image with python3 and pipes_ext")
    args = parser.parse_args(argv)
    repeat = repetitions(args)
    report = print_header("Docker benchmark", quick=args.quick, repeat=repeat)
    result = docker_benchmark(quick=args.quick, repeat=repeat, docker_host=args.docker_host, image=args.image)
    report["results"]["docker"] = result
    print_report("docker", result, name_width=62)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
