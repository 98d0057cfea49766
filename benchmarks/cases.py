"""The benchmarks. Each returns ``{"description", "metrics": [{"name", "unit", "ours", "reference", ...}]}``
with raw samples; ``__main__`` summarises them. Children are real processes started with this interpreter."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tests.support.helpers import PYTHON

OURS_THROUGHPUT_CHILD = """
import sys
from pipes_ext import open_pipes
n = int(sys.argv[1])
with open_pipes() as pipes:
    send = pipes.report_custom_message
    for i in range(n):
        send({"seq": i, "name": "row", "value": 1.5})
"""

REF_THROUGHPUT_CHILD = OURS_THROUGHPUT_CHILD.replace(
    "from pipes_ext import open_pipes", "from dagster_pipes import open_dagster_pipes as open_pipes"
)

OURS_LATENCY_CHILD = """
import sys, time
from pipes_ext import open_pipes
n, gap = int(sys.argv[1]), float(sys.argv[2])
with open_pipes() as pipes:
    for i in range(n):
        time.sleep(gap)
        pipes.report_custom_message({"seq": i, "t": time.monotonic()})
"""

REF_LATENCY_CHILD = OURS_LATENCY_CHILD.replace(
    "from pipes_ext import open_pipes", "from dagster_pipes import open_dagster_pipes as open_pipes"
)

OURS_STARTUP_CHILD = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_asset_materialization(metadata={"rows": 1})
"""

REF_STARTUP_CHILD = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.report_asset_materialization(metadata={"rows": 1})
"""

SLEEP_CHILD = """
import sys, time
from pipes_ext import open_pipes
with open_pipes() as pipes:
    time.sleep(float(sys.argv[1]))
"""


def _script(directory: str, name: str, source: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(source))
    return path


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------- ours


@contextmanager
def _ours_session(on_event: Callable[[Any], None] | None, retain: bool = False) -> Iterator[Any]:
    from pipes_core import PipesRunContext, PipesTempFileContextInjector, PipesTempFileMessageReader, open_pipes_session

    with open_pipes_session(PipesRunContext(), PipesTempFileContextInjector(), PipesTempFileMessageReader(),
                            on_event=on_event, retain_messages=retain) as session:
        yield session


def _run_ours(script: str, args: list[str], on_event: Callable[[Any], None] | None) -> float:
    started = time.perf_counter()
    with _ours_session(on_event) as session:
        subprocess.run([PYTHON, script, *args], env=_child_env(session.get_bootstrap_env_vars()), check=True)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- reference


def _run_reference(script: str, args: list[str], on_custom: Callable[[Any], None] | None = None) -> tuple[float, Any]:
    """Run a child under Dagster's own open_pipes_session, inside a directly invoked op."""
    import logging
    import warnings

    from dagster import build_op_context, op, open_pipes_session
    from dagster._core.pipes.context import PipesMessageHandler
    from dagster._core.pipes.utils import PipesTempFileContextInjector, PipesTempFileMessageReader

    logging.getLogger("dagster").setLevel(logging.ERROR)
    out: dict[str, Any] = {}
    original = PipesMessageHandler._handle_extra_message

    def hooked(self: Any, payload: Any) -> None:
        if on_custom is not None:
            on_custom(payload)
        original(self, payload)

    @op
    def run_child(context):  # type: ignore[no-untyped-def]  # dagster rejects an Any annotation
        started = time.perf_counter()
        with open_pipes_session(context=context, context_injector=PipesTempFileContextInjector(),
                                message_reader=PipesTempFileMessageReader()) as session:
            subprocess.run([PYTHON, script, *args], env=_child_env(session.get_bootstrap_env_vars()), check=True)
        out["elapsed"] = time.perf_counter() - started
        out["custom"] = session.get_custom_messages()
        return 0

    PipesMessageHandler._handle_extra_message = hooked  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_child(build_op_context())
    finally:
        PipesMessageHandler._handle_extra_message = original  # type: ignore[method-assign]
    return out["elapsed"], out["custom"]


# ---------------------------------------------------------------------------------------------- 1. throughput


def throughput(*, quick: bool, repeat: int) -> dict[str, Any]:
    n = 2_000 if quick else 100_000
    ours: list[float] = []
    ref: list[float] = []
    limit: list[float] = []
    ref_losses: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        ours_child = _script(tmp, "ours.py", OURS_THROUGHPUT_CHILD)
        ref_child = _script(tmp, "ref.py", REF_THROUGHPUT_CHILD)
        for _ in range(repeat):
            seen: list[int] = []

            def on_event(event: Any, seen: list[int] = seen) -> None:
                payload = getattr(event, "payload", None)
                if isinstance(payload, dict):
                    seen.append(payload["seq"])

            elapsed = _run_ours(ours_child, [str(n)], on_event)
            assert seen == list(range(n)), "ours: messages missing or out of order"
            ours.append(n / elapsed)

            elapsed, custom = _run_reference(ref_child, [str(n)])
            received = [p["seq"] for p in custom]
            if received != list(range(n)):
                ref_losses.append(n - len(received))
            ref.append(n / elapsed)

            limit.append(n / _write_flush_limit(n, tmp))
    return {
        "description": f"{n:,} custom messages, child to orchestrator over the file channel, all received in order",
        "metrics": [{"name": "messages per second", "unit": "msg/s", "ours": ours, "reference": ref,
                     "limit": limit}],
        "notes": ["limit = a plain Python loop writing the same lines with one write+flush per line on a kept-open "
                  "file (no reader, no process start)"]
        + ([f"the reference LOST messages in {len(ref_losses)} of {repeat} runs ({ref_losses} missing): its reader "
            "thread dies on a line read before the writer finished it; its rate counts the time until it stopped"]
           if ref_losses else []),
    }


def _write_flush_limit(n: int, tmp: str) -> float:
    import json

    path = os.path.join(tmp, "limit.ndjson")
    started = time.perf_counter()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"__dagster_pipes_version": "0.1", "method": "report_custom_message",
                                "params": {"payload": {"seq": i, "name": "row", "value": 1.5}}}) + "\n")
            f.flush()
    elapsed = time.perf_counter() - started
    os.remove(path)
    return elapsed


# ---------------------------------------------------------------------------------------------- 2. latency


def latency(*, quick: bool, repeat: int) -> dict[str, Any]:
    n = 50 if quick else 200
    gap = 0.02
    ours_lat: list[float] = []
    ref_lat: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        ours_child = _script(tmp, "ours.py", OURS_LATENCY_CHILD)
        ref_child = _script(tmp, "ref.py", REF_LATENCY_CHILD)
        for _ in range(max(1, repeat // 2)):

            def on_event(event: Any) -> None:
                payload = getattr(event, "payload", None)
                if isinstance(payload, dict) and "t" in payload:
                    ours_lat.append(time.monotonic() - payload["t"])

            _run_ours(ours_child, [str(n), str(gap)], on_event)

            def on_custom(payload: Any) -> None:
                if isinstance(payload, dict) and "t" in payload:
                    ref_lat.append(time.monotonic() - payload["t"])

            _run_reference(ref_child, [str(n), str(gap)], on_custom)

    def pct(samples: list[float], q: float) -> list[float]:
        ordered = sorted(samples)
        return [ordered[min(len(ordered) - 1, int(q * len(ordered)))]]

    return {
        "description": f"{n} messages {gap * 1000:.0f} ms apart; time from just before sending to the handler",
        "metrics": [
            {"name": "latency median", "unit": "s", "ours": [statistics.median(ours_lat)],
             "reference": [statistics.median(ref_lat)]},
            {"name": "latency p99", "unit": "s", "ours": pct(ours_lat, 0.99), "reference": pct(ref_lat, 0.99)},
            {"name": "latency max", "unit": "s", "ours": [max(ours_lat)], "reference": [max(ref_lat)]},
        ],
    }


# ---------------------------------------------------------------------------------------------- 3. start-up


def _bootstrap_env(tmp: str) -> dict[str, str]:
    from pipes_ext import encode_param
    from pipes_ext._protocol import (
        CONTEXT_ASSET_KEYS,
        CONTEXT_CODE_VERSION_BY_ASSET_KEY,
        CONTEXT_PROVENANCE_BY_ASSET_KEY,
        empty_context_data,
    )

    context = os.path.join(tmp, "context.json")
    data = {**empty_context_data("r"), CONTEXT_ASSET_KEYS: ["a"], CONTEXT_CODE_VERSION_BY_ASSET_KEY: {"a": None},
            CONTEXT_PROVENANCE_BY_ASSET_KEY: {"a": None}}
    with open(context, "w", encoding="utf-8") as f:
        json.dump(data, f)
    messages = os.path.join(tmp, "messages")
    return {"DAGSTER_PIPES_CONTEXT": encode_param({"path": context}),
            "DAGSTER_PIPES_MESSAGES": encode_param({"path": messages})}


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - started


def startup(*, quick: bool, repeat: int) -> dict[str, Any]:
    runs = 5 if quick else 30
    ours: list[float] = []
    ref: list[float] = []
    session_ours: list[float] = []
    session_ref: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        env = _child_env(_bootstrap_env(tmp))
        ours_child = _script(tmp, "ours.py", OURS_STARTUP_CHILD)
        ref_child = _script(tmp, "ref.py", REF_STARTUP_CHILD)
        for script in (ours_child, ref_child):  # write bytecode caches, as users have them
            _wall([PYTHON, script], env)
        for _ in range(runs):
            bare = _wall([PYTHON, "-c", "pass"], env)
            ours.append(_wall([PYTHON, ours_child], env) - bare)
            bare = _wall([PYTHON, "-c", "pass"], env)
            ref.append(_wall([PYTHON, ref_child], env) - bare)
        for _ in range(runs):
            session_ours.append(_session_open_close_ours())
            session_ref.append(_session_open_close_reference())
    return {
        "description": "child start-up (import + open + one materialization + close) over `python -c pass`; and "
                       "the orchestrator's session open+close around a no-op (no child run)",
        "metrics": [
            {"name": "child start-up over bare", "unit": "s", "ours": ours, "reference": ref},
            {"name": "session open+close", "unit": "s", "ours": session_ours, "reference": session_ref},
        ],
    }


def _session_open_close_ours() -> float:
    import logging

    logging.getLogger("pipes_core.external").setLevel(logging.ERROR)
    started = time.perf_counter()
    with _ours_session(None) as session:
        session.get_bootstrap_env_vars()
    return time.perf_counter() - started


def _session_open_close_reference() -> float:
    import logging
    import warnings

    from dagster import build_op_context, op, open_pipes_session
    from dagster._core.pipes.utils import PipesTempFileContextInjector, PipesTempFileMessageReader

    logging.getLogger("dagster").setLevel(logging.CRITICAL)
    out: dict[str, float] = {}

    @op
    def noop(context):  # type: ignore[no-untyped-def]  # dagster rejects an Any annotation
        started = time.perf_counter()
        with open_pipes_session(context=context, context_injector=PipesTempFileContextInjector(),
                                message_reader=PipesTempFileMessageReader()) as session:
            session.get_bootstrap_env_vars()
        out["t"] = time.perf_counter() - started
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        noop(build_op_context())
    return out["t"]


# ---------------------------------------------------------------------------------------------- 4. memory

MEMORY_ORCHESTRATOR = """
import os, resource, subprocess, sys
side, n, child = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
if side == "ours":
    from pipes_core import (PipesCustomMessageEvent, PipesRunContext, PipesTempFileContextInjector,
                            PipesTempFileMessageReader, open_pipes_session)
    count = [0]
    def on_event(event):
        if isinstance(event, PipesCustomMessageEvent):
            count[0] += 1
    before = rss_mb()
    with open_pipes_session(PipesRunContext(), PipesTempFileContextInjector(), PipesTempFileMessageReader(),
                            on_event=on_event, retain_messages=False) as s:
        subprocess.run([sys.executable, child, str(n)], env={**env, **s.get_bootstrap_env_vars()}, check=True)
else:
    import logging, warnings
    warnings.simplefilter("ignore")
    from dagster import build_op_context, op, open_pipes_session
    from dagster._core.pipes.utils import PipesTempFileContextInjector, PipesTempFileMessageReader
    logging.getLogger("dagster").setLevel(logging.ERROR)
    before = rss_mb()
    @op
    def run(context):
        with open_pipes_session(context=context, context_injector=PipesTempFileContextInjector(),
                                message_reader=PipesTempFileMessageReader()) as s:
            subprocess.run([sys.executable, child, str(n)], env={**env, **s.get_bootstrap_env_vars()}, check=True)
        count[0] = len(s.get_custom_messages())
        return 0
    count = [0]
    run(build_op_context())
print(rss_mb() - before, count[0])
"""


def memory(*, quick: bool, repeat: int) -> dict[str, Any]:
    n = 20_000 if quick else 1_000_000
    ours: list[float] = []
    ref: list[float] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        orchestrator = _script(tmp, "orch.py", MEMORY_ORCHESTRATOR)
        ours_child = _script(tmp, "ours.py", OURS_THROUGHPUT_CHILD)
        ref_child = _script(tmp, "ref.py", REF_THROUGHPUT_CHILD)
        for _ in range(1):  # one run each: a million messages is long enough to be stable
            for side, child, samples in (("ours", ours_child, ours), ("reference", ref_child, ref)):
                out = subprocess.run([PYTHON, orchestrator, side, str(n), child], capture_output=True, text=True,
                                     env=_child_env({}), check=True)
                growth, received = out.stdout.strip().splitlines()[-1].split()
                samples.append(float(growth))
                if int(received) != n:
                    notes.append(f"{side} received {int(received):,} of {n:,} messages (its reader stopped early)")
    return {
        "description": f"orchestrator peak RSS growth while {n:,} messages stream through (ours: on_event with "
                       "retain_messages=False; the reference keeps every message)",
        "metrics": [{"name": "peak RSS growth", "unit": "MB", "ours": ours, "reference": ref}],
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- 5. idle


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def idle(*, quick: bool, repeat: int) -> dict[str, Any]:
    seconds = 1.0 if quick else 5.0
    ours: list[float] = []
    ref: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        ours_child = _script(tmp, "sleep.py", SLEEP_CHILD)
        ref_child = _script(tmp, "sleep_ref.py", SLEEP_CHILD.replace(
            "from pipes_ext import open_pipes", "from dagster_pipes import open_dagster_pipes as open_pipes"))
        for _ in range(max(1, repeat // 3)):
            cpu = _cpu_seconds()
            wall = _run_ours(ours_child, [str(seconds)], None)
            ours.append(100 * (_cpu_seconds() - cpu) / wall)
            cpu = _cpu_seconds()
            wall, _ = _run_reference(ref_child, [str(seconds)])
            ref.append(100 * (_cpu_seconds() - cpu) / wall)
    return {
        "description": f"orchestrator CPU while its child sleeps {seconds:.0f} s and writes nothing "
                       "(percent of one core, whole orchestrator process)",
        "metrics": [{"name": "idle CPU", "unit": "%", "ours": ours, "reference": ref}],
    }


def _blob(*, quick: bool, repeat: int) -> dict[str, Any]:
    from .blob import blob  # needs the blob SDKs, their local servers and the reference's integrations

    return blob(quick=quick, repeat=repeat)


ALL: list[tuple[str, Callable[..., dict[str, Any]]]] = [
    ("throughput", throughput),
    ("latency", latency),
    ("startup", startup),
    ("memory", memory),
    ("idle", idle),
    ("blob", _blob),
]


