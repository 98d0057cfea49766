"""Start and stop a private local Ray head node for tests and benchmarks.

``ray start --head --block`` runs in its own session, bound to 127.0.0.1, with every port it opens pinned to a
free one (worker ports chosen by the OS), its temp dir private, usage stats off. Stopping sends SIGTERM to that
``ray start`` process, which ends the whole local cluster, then checks that no process of its session is left
(killing stragglers by their pids). See ../shared/reference/engines.md (Ray section).

The pytest fixture ``ray_head`` (this module is a plugin registered from tests/conftest.py) starts one head
for the whole run; when Ray cannot run it skips with the reason, and the terminal summary prints it in
capitals.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance._servers import free_port
from tests.support.engine_skips import EngineSkips

# A cold head answers the Jobs API about 5 s after start on a quiet 2-CPU machine; several test runs at once
# on a shared machine are much slower.
START_TIMEOUT_SECONDS = 120.0
# After SIGTERM (no drain, see below) the head stops every process of the cluster, usually within ~5 s.
STOP_TIMEOUT_SECONDS = 60.0
NUM_CPUS = 2


class RayUnavailable(RuntimeError):
    """Ray cannot run here: not installed, or the head did not come up (the message says why)."""

    def __init__(self, message: str, *, exited: bool = False) -> None:
        super().__init__(message)
        self.exited = exited  # the head started and exited (worth another try), rather than never answering


def _ray_binary() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _session_pids(session_id: int) -> list[int]:
    """Processes whose session id is ``session_id`` (everything the head started stays in its session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp session ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == session_id and fields[0] != b"Z":
            pids.append(int(entry))
    return pids


class RayHead:
    """A running local head: ``address`` is the Jobs API (dashboard) URL on 127.0.0.1."""

    def __init__(self, process: subprocess.Popen[bytes], temp_dir: str, log_path: str, dashboard_port: int,
                 gcs_port: int) -> None:
        self.process = process
        self.temp_dir = temp_dir
        self.log_path = log_path
        self.dashboard_port = dashboard_port
        self.gcs_port = gcs_port
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.started_seconds = 0.0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> list[int]:
        """SIGTERM to ``ray start``; wait until no process of its session is left. Returns stragglers killed."""
        session = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        left = _session_pids(session)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)  # polling /proc: there is no event for "another process's children have all gone"
            left = _session_pids(session)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'pipes-sdk[dev]' installs ray[default])"
    return None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            json.loads(response.read())
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return True  # up, even if it does not like this request
    except (OSError, ValueError):
        return False


def _jobs_api_ready(address: str, agent_port: int) -> bool:
    """The dashboard's Jobs API answers, and so does the head's job agent (which runs the submitted jobs:
    until it is up the head answers submissions with "No available agent")."""
    return _answers(f"{address}/api/jobs/") and _answers(f"http://127.0.0.1:{agent_port}/api/job_agent/jobs/x")


# Ray gives its raylet a fixed 30 s to register at start-up; on a heavily loaded machine that can fail, and
# another try usually does not.
START_ATTEMPTS = 3


def start_head(num_cpus: int = NUM_CPUS, timeout: float = START_TIMEOUT_SECONDS) -> RayHead:
    """Start a head and wait until its Jobs API answers. Raises :class:`RayUnavailable` with the reason."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_head_once(num_cpus, timeout)
        except RayUnavailable as exc:
            if attempt == START_ATTEMPTS or not exc.exited:
                raise
    raise AssertionError("unreachable")


def _start_head_once(num_cpus: int, timeout: float) -> RayHead:
    reason = unavailable_reason()
    if reason:
        raise RayUnavailable(reason)
    # Short path: Ray puts unix sockets under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    log_path = os.path.join(temp_dir, "ray-start.log")
    dashboard_port, gcs_port, agent_port = free_port(), free_port(), free_port()
    argv = [
        _ray_binary(), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", f"--port={gcs_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={agent_port}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--object-manager-port={free_port()}", f"--node-manager-port={free_port()}",
        "--min-worker-port=0", "--max-worker-port=0",  # 0: each worker gets a port from the OS
        f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        "--log-style=record", "--log-color=false",
        "--include-log-monitor=false",  # streams workers' logs to drivers: jobs' logs are written without it
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_PIPES_", "RAY_"))}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # SIGTERM would otherwise "drain" the node for up to 30 s (for Serve replicas); a test cluster has
    # nothing to hand over, so it shuts down at once.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        except OSError as exc:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise RayUnavailable(f"cannot run {argv[0]!r}: {exc}") from exc
    head = RayHead(process, temp_dir, log_path, dashboard_port, gcs_port)
    deadline = started + timeout
    while not _jobs_api_ready(head.address, agent_port):
        if not head.alive() or time.monotonic() > deadline:
            why = (f"exited with {process.returncode}" if not head.alive()
                   else f"did not answer the Jobs API at {head.address} within {timeout:.0f} s")
            tail = head.log_tail()
            exited = not head.alive()
            head.stop()
            raise RayUnavailable(f"the Ray head {why}; its output ends with:\n{tail}", exited=exited)
        time.sleep(0.2)  # polling an HTTP endpoint of another process: no event to wait on
    head.started_seconds = time.monotonic() - started
    return head


# ------------------------------------------------------------------------------------------------ pytest plugin

SKIPS = EngineSkips("Ray")


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """One private local Ray head for the whole run (started on first use, stopped at the end of the run)."""
    SKIPS.skip_if_known()
    try:
        head = start_head()
    except RayUnavailable as exc:
        SKIPS.skip(f"Ray: {exc}")
    try:
        yield head
    finally:
        left = head.stop()
        assert not left, f"Ray processes outlived the head's SIGTERM and were killed: {left}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly when the Ray tests could not run."""
    SKIPS.report(terminalreporter)
