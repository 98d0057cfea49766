"""The command line's durable runs: ``pipes run --launch-key KEY --state-dir DIR`` run again after its process was
SIGKILLed finishes the run with one launch; ``pipes runs`` lists the runs (text and ``--json``); ``pipes runs stop``
stops a job whose orchestrator is gone, ``forget`` removes a run, ``sweep`` removes leftover files; each misuse is
a one-line error with exit code 2 and no traceback. Processes started here are killed by group at teardown."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import PipesRunStore
from tests.support.durable_kills import stop_groups
from tests.support.durable_launchers import live_members
from tests.support.helpers import REPO_ROOT as REPO

PIPES = [sys.executable, "-m", "pipes_core"]
WAIT_SECONDS = 120.0  # a bound on helper waits, not an assertion on speed

CHILD = """
import os, sys, time
from pipes_ext import open_pipes
with open(os.environ["COUNT_FILE"], "a") as count:
    count.write("launch\\n")
with open_pipes() as pipes:
    for i in range(4):
        pipes.report_custom_message({"i": i})
        time.sleep(float(os.environ["DELAY"]))
"""


class Cli:
    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        self.child = tmp / "child.py"
        self.child.write_text(CHILD)
        self.count = tmp / "count"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "COUNT_FILE": str(self.count), "DELAY": "0.3"}
        self.groups: list[int] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen([*PIPES, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        self.groups.append(process.pid)
        return process

    def call(self, *args: str) -> tuple[int, str, str]:
        process = self.start(*args)
        out, err = process.communicate(timeout=WAIT_SECONDS)
        return process.returncode, out, err

    def run_args(self, key: str) -> list[str]:
        return ["run", "--launch-key", key, "--state-dir", str(self.state), "--", sys.executable, str(self.child)]

    def record(self, key: str) -> Any:
        with PipesRunStore.in_state_dir(self.state) as store:
            return store.get(key)

    def wait_until(self, key: str, what: Any) -> Any:
        deadline = time.monotonic() + WAIT_SECONDS
        pause = threading.Event()
        while True:
            record = self.record(key) if (self.state / "runs.sqlite3").exists() else None
            if record is not None and what(record):
                return record
            assert time.monotonic() < deadline, f"the run {key!r} never got there: {record}"
            pause.wait(0.05)

    def stop_all(self) -> None:
        stop_groups(self.groups)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    made = Cli(tmp_path)
    yield made
    made.stop_all()


def _kill_mid_run(cli: Cli, key: str) -> Any:
    first = cli.start(*cli.run_args(key))
    record = cli.wait_until(key, lambda r: r.messages >= 2)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=WAIT_SECONDS)
    if record.handle is not None:
        cli.groups.append(int(record.handle["pid"]))
    return record


def test_running_the_same_command_again_finishes_a_killed_run(cli: Cli) -> None:
    _kill_mid_run(cli, "nightly")
    code, out, err = cli.call(*cli.run_args("nightly"))
    assert code == 0, err
    assert "Traceback" not in err
    assert len(cli.count.read_text().splitlines()) == 1
    code, out, err = cli.call("runs", "--state-dir", str(cli.state), "--json")
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert (row["key"], row["state"], row["outcome"]["exit_code"]) == ("nightly", "concluded", 0)
    assert row["position"]["messages"] == 6  # opened, 4 custom messages, closed
    code, out, err = cli.call("runs", "--state-dir", str(cli.state))
    assert code == 0 and "nightly" in out and "succeeded (exit 0)" in out
    # A third run reports the recorded outcome without launching.
    assert cli.call(*cli.run_args("nightly"))[0] == 0
    assert len(cli.count.read_text().splitlines()) == 1


def test_stop_forget_and_sweep(cli: Cli) -> None:
    cli.env["DELAY"] = "600"  # the job runs until stopped
    first = cli.start(*cli.run_args("long"))
    record = cli.wait_until("long", lambda r: r.messages >= 2)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=WAIT_SECONDS)
    job = int(record.handle["pid"])
    cli.groups.append(job)
    code, out, err = cli.call("runs", "forget", "long", "--state-dir", str(cli.state))
    assert code == 2 and "still running: stop it first" in err and "Traceback" not in err
    code, out, err = cli.call("runs", "stop", "long", "--state-dir", str(cli.state))
    assert code == 0 and "stopped the job of 'long'" in out, err
    assert live_members(job) == []
    code, out, err = cli.call(*cli.run_args("long"))  # concludes it: terminated by SIGTERM
    assert code == 128 + signal.SIGTERM, (out, err)
    assert cli.record("long").state == "concluded"
    code, out, err = cli.call("runs", "stop", "long", "--state-dir", str(cli.state))
    assert code == 0 and "was not running" in out
    code, out, err = cli.call("runs", "forget", "long", "--state-dir", str(cli.state))
    assert code == 0 and "forgot the run 'long'" in out
    assert cli.record("long") is None
    leftover = cli.state / "runs" / "leftover"
    leftover.mkdir(parents=True)
    code, out, err = cli.call("runs", "sweep", "--state-dir", str(cli.state))
    assert code == 0 and "swept 1 leftover (name engines to sweep for orphans too" in out and not leftover.exists()
    code, out, err = cli.call("runs", "--state-dir", str(cli.state))
    assert code == 0 and "no durable runs" in out


@pytest.mark.parametrize(("args", "said"), [
    (["runs", "stop"], "pipes runs stop needs the run's KEY"),
    (["runs", "forget", "nothing"], "no run with launch key 'nothing'"),
    (["runs", "sweep", "extra"], "pipes runs sweep takes no KEY"),
    (["runs", "stop", "k", "--docker"], "--docker is for `pipes runs sweep`: it names an engine to sweep"),
    (["runs", "--ray", "127.0.0.1:1"], "--ray is for `pipes runs sweep`"),
    (["runs", "sweep", "--slurm-conf", "x"], "--slurm-conf is for --slurm: give --slurm too"),
    (["run", "--state-dir", "x", "--", "true"], "--state-dir is for durable runs: give --launch-key KEY too"),
])
def test_misuse_is_one_line_and_exit_2(cli: Cli, args: list[str], said: str) -> None:
    if args[0] == "runs":
        args = [*args, "--state-dir", str(cli.state)]
    code, _, err = cli.call(*args)
    assert code == 2
    assert said in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_store_that_is_not_a_database_is_named(cli: Cli) -> None:
    cli.state.mkdir()
    (cli.state / "runs.sqlite3").write_bytes(b"this is not a database" * 100)
    code, _, err = cli.call("runs", "--state-dir", str(cli.state))
    assert code == 2 and "runs.sqlite3" in err and "move it aside" in err and "Traceback" not in err


@pytest.mark.parametrize(("launcher", "handle", "shown", "said"), [
    ("PipesSubprocessClient", {"pid": 7, "started": 12.0, "directory": "/d", "description": "x"},
     {"pid": 7, "started": 12.0}, "pid 7"),
    ("PipesDockerClient", {"container": "c0ffee", "name": "pipes-1", "image": "i", "docker_host": "unix:///s",
                           "description": "x"}, {"container": "c0ffee", "name": "pipes-1", "docker_host": "unix:///s"},
     "container c0ffee"),
    ("PipesRayJobClient", {"address": "http://127.0.0.1:1", "submission_id": "pipes-2", "description": "x"},
     {"address": "http://127.0.0.1:1", "submission_id": "pipes-2"}, "Ray job pipes-2"),
    ("PipesSlurmClient", {"job_id": "42", "name": "pipes-3", "stdout": "/o", "commands": {}, "description": "x"},
     {"job_id": "42", "name": "pipes-3"}, "Slurm job 42"),
])
def test_runs_shows_what_names_each_launchers_work(tmp_path: Path, launcher: str, handle: dict[str, Any],
                                                   shown: dict[str, Any], said: str) -> None:
    from pipes_core.cli.main import main

    with PipesRunStore.in_state_dir(tmp_path) as store:
        store.claim("k", launcher)
        store.record_handle("k", handle)
    out = io.StringIO()
    assert main(["runs", "--state-dir", str(tmp_path), "--json"], out=out) == 0
    assert json.loads(out.getvalue())["handle"] == shown
    out = io.StringIO()
    assert main(["runs", "--state-dir", str(tmp_path)], out=out) == 0
    assert f"k  {launcher}  {said}  running" in out.getvalue()


def test_runs_escapes_what_a_key_or_a_jobs_error_holds(tmp_path: Path) -> None:
    # The key is the user's and the error message the job's: neither may move the cursor, retitle the terminal or
    # break the one-line-per-run listing; --json keeps them as they are (JSON escapes them itself).
    from pipes_core.cli.main import main

    key = "evil\x1b]0;pwned\x07\nkey"
    with PipesRunStore.in_state_dir(tmp_path) as store:
        store.claim(key, "PipesSubprocessClient")
        store.record_handle(key, {"pid": 7})
        store.conclude(key, {"exit_code": 1, "error": "PipesExecutionError", "message": "boom\x1b[2J\rhidden"})
    out = io.StringIO()
    assert main(["runs", "--state-dir", str(tmp_path)], out=out) == 0
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert len(text.splitlines()) == 1
    assert "evil\\x1b]0;pwned\\x07\\x0akey" in text and "boom\\x1b[2J\\x0dhidden" in text
    out = io.StringIO()
    assert main(["runs", "--state-dir", str(tmp_path), "--json"], out=out) == 0
    row = json.loads(out.getvalue())
    assert row["key"] == key and row["outcome"]["message"] == "boom\x1b[2J\rhidden"
