"""Durable runs (README "Durable runs", "Performance"), side by side in one run:

``python -m benchmarks.durable [--quick] [--repeat N] [--json FILE]``

* ``throughput``: one local child sends N custom messages on the file channel; messages per second of the whole
  run with a store (``launch_key=``: every read block recorded in SQLite, offset included) against the same run
  without (``ours`` is with the store, ``reference`` without; the issue's target: within 10 %);
* ``reattach``: an orchestrator process is SIGKILLed right after recording its launch; a new orchestrator process
  with the same key is started, and the time from before its start to its ``on_launched`` (re-attached: the
  store read, the child's identity checked, the recorded messages replayed) is measured, against the time from
  before a fresh orchestrator's start to its ``on_launched`` with no store (``reference``): both pay the
  interpreter's start. The issue's target: at most 1 s plus the engine's own API call (none for a local child).

Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

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
    import json, os, signal, sys, time
    from pipes_core import PipesRunStore, PipesSubprocessClient

    child, messages, hold, store_path, key, kill = sys.argv[1:7]

    class KillingStore(PipesRunStore):
        def record_handle(self, launch_key, handle):
            record = super().record_handle(launch_key, handle)
            if kill == "yes":
                os.kill(os.getpid(), signal.SIGKILL)
            return record

    launched = []
    options = {"launch_key": key, "store": KillingStore(store_path)} if key else {}
    started = time.time()
    invocation = PipesSubprocessClient(forward_stdio=False).run(
        command=[sys.executable, child, messages, hold], on_launched=lambda p: launched.append(time.time()),
        **options)
    print(json.dumps({"launched": launched[0], "run": time.time() - started,
                      "messages": len(invocation.get_custom_messages())}), flush=True)
""")


def _orchestrate(tmp: Path, messages: int, hold: float, key: str, *, kill: bool) -> dict[str, Any] | None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([PYTHON, str(tmp / "orchestrator.py"), str(tmp / "child.py"), str(messages), str(hold),
                                str(tmp / "state" / "runs.sqlite3"), key, "yes" if kill else "no"],
                               env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=600)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.returncode != 0:
        return None
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
            plain = _orchestrate(tmp, n, 0.0, "", kill=False)
            durable = _orchestrate(tmp, n, 0.0, f"throughput-{i}", kill=False)
            assert plain is not None and durable is not None and plain["messages"] == durable["messages"] == n
            without.append(n / plain["run"])
            with_store.append(n / durable["run"])
    return {"description": f"{n:,} messages on the file channel, one local child, whole run",
            "metrics": [{"name": "throughput", "unit": "msg/s", "ours": with_store, "reference": without}],
            "notes": ["ours = with a store (launch_key=), reference = the same run without one"]}


def reattach(quick: bool, repeat: int) -> dict[str, Any]:
    n = 100 if quick else 1_000
    attached: list[float] = []
    fresh: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "child.py").write_text(CHILD)
        (tmp / "orchestrator.py").write_text(ORCHESTRATOR)
        for i in range(repeat):
            before = time.time()
            plain = _orchestrate(tmp, n, 0.0, "", kill=False)
            assert plain is not None
            fresh.append(plain["launched"] - before)
            key = f"reattach-{i}"
            assert _orchestrate(tmp, n, 2.0, key, kill=True) is None  # killed right after recording its launch
            before = time.time()
            again = _orchestrate(tmp, n, 2.0, key, kill=False)
            assert again is not None and again["messages"] == n
            attached.append(again["launched"] - before)
    return {"description": "from an orchestrator's start to its on_launched: restarted and re-attached (ours) "
                           "against fresh with no store (reference); the subprocess launcher",
            "metrics": [{"name": "start to (re-)attached", "unit": "s", "ours": attached, "reference": fresh}],
            "notes": ["both include the Python interpreter's start and pipes_core's import"]}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks.durable", __doc__, repeated="each side", default_repeat=5)
    args = parser.parse_args(argv)
    repeat = repetitions(args)
    report = print_header("Durable runs: with a store vs without", quick=args.quick, repeat=repeat)
    for name, function in (("throughput", throughput), ("reattach", reattach)):
        result = function(args.quick, repeat)
        report["results"][name] = result
        print_report(name, result)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
