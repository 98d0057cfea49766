"""Fault injection: the orchestrator runs out of file descriptors, or its event loop is closed under a pending run
(issue 20, items 8 and 13). Each case runs in a fresh Python process (the descriptor limit and the loop are
process-wide), which prints what it saw as JSON: the outcome of each run, the descriptors open before and after
(``/proc/self/fd``, once the file readers' threads have finished) and what is left in its TMPDIR.

What must hold: a run that cannot start raises a :class:`PipesError` (a :class:`PipesResourceError` naming the
limit and what to do when descriptors ran out), never a raw ``OSError``; no descriptor and no temp file or dir
is left behind, sync or async, for one session or hundreds at once; closing the loop with a run pending kills the
child and closes every descriptor, without "coroutine ignored GeneratorExit".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

RUN_SECONDS = 300  # bound for one scripted case on a loaded machine

COMMON = """
import asyncio, gc, json, os, resource, sys, threading
from pipes_core import PipesError, PipesSubprocessClient
from pipes_core.launch.async_client import PipesAsyncSubprocessClient
from pipes_core.channels.registry import make_message_reader

CHILD = [sys.executable, "-c", "from pipes_ext import open_pipes\\nwith open_pipes() as p: p.log.info('hi')"]
SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)

def settled_fds():
    for thread in threading.enumerate():  # a file reader closes its watch on its own thread, after the drain
        if thread.name.startswith("pipes-file-reader"):
            thread.join()
    gc.collect()
    return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir opened

def outcome(exc):
    if exc is None:
        return "ok"
    kind = "PipesError" if isinstance(exc, PipesError) else "raw"
    return f"{kind}:{type(exc).__name__}:{exc}"
"""

SWEEP = COMMON + """
mode, reader = sys.argv[1], sys.argv[2]
loop = asyncio.new_event_loop()  # before the limit: a loop that cannot be created is asyncio's error, not ours
results = []
for free in range(0, 12):
    before = settled_fds()
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + 1 + free, HARD))
    error = None
    try:
        if mode == "sync":
            PipesSubprocessClient(message_reader=make_message_reader(reader), forward_stdio=False).run(command=CHILD)
        else:
            client = PipesAsyncSubprocessClient(message_reader=make_message_reader(reader), forward_stdio=False)
            loop.run_until_complete(client.run(command=CHILD))
    except BaseException as exc:
        error = exc
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))
    results.append({"free": free, "outcome": outcome(error), "before": before, "after": settled_fds(),
                    "left": sorted(os.listdir(os.environ["TMPDIR"]))})
print(json.dumps(results))
"""

MANY_ASYNC = COMMON + """
sessions, limit = int(sys.argv[1]), int(sys.argv[2])
before = settled_fds()
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, HARD))
async def main():
    client = PipesAsyncSubprocessClient(forward_stdio=False)
    return await asyncio.gather(*(client.run(command=CHILD) for _ in range(sessions)), return_exceptions=True)
results = asyncio.run(main())
resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))
outcomes = [outcome(None if not isinstance(r, BaseException) else r) for r in results]
print(json.dumps({"outcomes": outcomes, "before": before, "after": settled_fds(),
                  "left": sorted(os.listdir(os.environ["TMPDIR"]))}))
"""

LOOP_CLOSED = COMMON + """
reader, pid_file = sys.argv[1], sys.argv[2]
child = [sys.executable, "-c",
         "import os, pathlib, sys, threading\\nfrom pipes_ext import open_pipes\\n"
         "pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\\n"
         "p = open_pipes()\\np.log.info('started')\\nthreading.Event().wait()", pid_file]
before = settled_fds()
loop = asyncio.new_event_loop()
started = asyncio.Event()
def on_event(event):
    started.set()
client = PipesAsyncSubprocessClient(message_reader=make_message_reader(reader), forward_stdio=False)
task = loop.create_task(client.run(command=child, on_event=on_event))
loop.run_until_complete(started.wait())
loop.close()  # the misuse: the run is still pending
del task
gc.collect()
try:
    os.kill(int(open(pid_file).read()), 0)
    child_alive = True
except ProcessLookupError:  # killed and reaped: not even a zombie
    child_alive = False
print(json.dumps({"before": before, "after": settled_fds(), "left": sorted(os.listdir(os.environ["TMPDIR"])),
                  "child_alive": child_alive}))
"""


def _run(tmp_path: Path, source: str, *args: str) -> tuple[Any, str]:
    script = tmp_path / "orchestrator.py"
    script.write_text(source, encoding="utf-8")
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=RUN_SECONDS,
                          cwd=REPO_ROOT, env={**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(REPO_ROOT)},
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("reader", ["tempfile", "stdio"])
def test_out_of_descriptors_is_a_clear_error_and_leaves_nothing(tmp_path: Path, mode: str, reader: str) -> None:
    # 0 to 11 descriptors free: each step of the set-up fails in turn (context file, messages file, its watch,
    # the orphan guard's pipe, the child's pipes, ...), then the run succeeds.
    results, _ = _run(tmp_path, SWEEP, mode, reader)
    for result in results:
        assert result["outcome"] == "ok" or result["outcome"].startswith("PipesError:"), result
        assert result["after"] == result["before"], result  # no descriptor leaked
        assert result["left"] == [], result  # no temp file or dir left
    exhausted = [r["outcome"] for r in results if "PipesResourceError" in r["outcome"]]
    assert exhausted, results
    assert all("RLIMIT_NOFILE" in text and "ulimit -n" in text for text in exhausted)
    assert results[-1]["outcome"] == "ok"  # with enough descriptors the same run works


def test_hundreds_of_async_sessions_over_the_limit_leave_nothing(tmp_path: Path) -> None:
    # 200 sessions in one loop with room for about a quarter of them: every failure is a PipesError, and no
    # temp dir or descriptor outlives the loop (the issue saw 145 of 400 temp dirs left at ulimit -n 1024).
    result, _ = _run(tmp_path, MANY_ASYNC, "200", "256")
    outcomes = result["outcomes"]
    assert all(o == "ok" or o.startswith("PipesError:") for o in outcomes), [o for o in outcomes if o != "ok"][:5]
    assert any(o == "ok" for o in outcomes)
    assert any("PipesResourceError" in o for o in outcomes)
    assert result["after"] == result["before"]
    assert result["left"] == []


@pytest.mark.parametrize("reader", ["tempfile", "stdio"])
def test_closing_the_loop_with_a_run_pending_kills_the_child_and_closes_every_descriptor(
        tmp_path: Path, reader: str) -> None:
    result, stderr = _run(tmp_path, LOOP_CLOSED, reader, str(tmp_path / "child.pid"))
    assert result["child_alive"] is False
    assert result["after"] == result["before"], stderr
    assert result["left"] == []
    assert "coroutine ignored GeneratorExit" not in stderr
    assert "on_event callback raised" not in stderr
