"""Start and stop a private local Prefect server for the Prefect example's tests.

``prefect server start`` runs in its own session, bound to 127.0.0.1 on a free port, with its own
``PREFECT_HOME`` (its SQLite database and settings) in a temp dir, no UI, no analytics, no scheduler or late-runs
service (the recorder services that store task runs and logs stay on). Readiness is an event, not a poll: the
server runs with uvicorn's INFO logging, a thread reads its output and wakes the fixture when uvicorn says it is
listening (or when the output ends: the server died); one request to ``/api/health`` then confirms it. Stopping
sends SIGTERM to the server's process group, SIGKILL after a deadline, and checks that no process of its
session is left.

Prefect itself is never imported in the test process (its import sets up logging and settings of its own): the
flow and the API queries run in child processes with :meth:`PrefectServer.client_env`.

The pytest fixture ``prefect_server`` (this module is a plugin registered from tests/conftest.py) starts one
server for the whole run; when Prefect cannot run it skips with the reason, and the terminal summary prints it in
capitals.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from conformance._servers import free_port
from tests.support.engine_skips import EngineSkips
from tests.support.engines_ray import _session_pids

# A cold server (database migrations included) answers in about 5-15 s on a 2-CPU machine; several test runs at
# once on a shared machine are much slower.
START_TIMEOUT_SECONDS = 180.0
# uvicorn finishes its shutdown within a second or two after SIGTERM.
STOP_TIMEOUT_SECONDS = 30.0
# What uvicorn prints once the app's start-up is complete and the socket is listening.
READY_LINE = b"Uvicorn running on"
# The port may be taken between free_port() and the server's bind (another test run on this machine): retry.
START_ATTEMPTS = 2


class PrefectUnavailable(RuntimeError):
    """Prefect cannot run here: not installed, or the server did not come up (the message says why)."""

    def __init__(self, message: str, *, exited: bool = False) -> None:
        super().__init__(message)
        self.exited = exited


def _prefect_binary() -> str:
    candidate = Path(sys.executable).parent / "prefect"
    return str(candidate) if candidate.exists() else (shutil.which("prefect") or "prefect")


def _private_env(home: Path) -> dict[str, str]:
    """This machine's environment without any Prefect setting, plus ours: nothing global is read or written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DAGSTER_PIPES_"))}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",  # the client side's analytics switch
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    })
    return env


def _server_env(home: Path) -> dict[str, str]:
    """The server runs none of this project's code: it is not measured by the suite's coverage (which would only
    slow its start-up)."""
    env = _private_env(home)
    for name in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"):
        env.pop(name, None)
    return env


class PrefectServer:
    """A running local server: ``api_url`` is its API on 127.0.0.1."""

    def __init__(self, process: subprocess.Popen[bytes], temp_dir: Path, port: int) -> None:
        self.process = process
        self.temp_dir = temp_dir
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.log_path = temp_dir / "server.log"
        self.started_seconds = 0.0
        self._ready = threading.Event()
        self._drain = threading.Thread(target=self._read_output, name="prefect-server-output", daemon=True)

    def _read_output(self) -> None:
        stream: IO[bytes] | None = self.process.stdout
        assert stream is not None
        with open(self.log_path, "ab") as log:
            for line in stream:  # read to the end, so the server never blocks on a full pipe
                log.write(line)
                log.flush()
                if READY_LINE in line:
                    self._ready.set()
        self._ready.set()  # the output ended: the server exited

    def wait_ready(self, timeout: float) -> bool:
        self._drain.start()
        return self._ready.wait(timeout) and self.alive()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def client_env(self) -> dict[str, str]:
        """The environment of a child that talks to this server (its own PREFECT_HOME: result storage, profiles)."""
        env = _private_env(self.temp_dir / "client-home")
        env["PREFECT_API_URL"] = self.api_url
        return env

    def stop(self) -> list[int]:
        """SIGTERM to the process group, SIGKILL after the deadline; returns the pids of stragglers killed."""
        group = self.process.pid
        if self.process.poll() is None:
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        left = _session_pids(group)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._drain.is_alive():
            self._drain.join(STOP_TIMEOUT_SECONDS)
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("prefect") is None:
        return "prefect is not installed (pip install -e '.[dev]' installs it)"
    return None


def start_server(timeout: float = START_TIMEOUT_SECONDS) -> PrefectServer:
    """Start a server and wait until it answers. Raises :class:`PrefectUnavailable` with the reason."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_once(timeout)
        except PrefectUnavailable as exc:
            if attempt == START_ATTEMPTS or not exc.exited:
                raise
    raise AssertionError("unreachable")


def _start_once(timeout: float) -> PrefectServer:
    reason = unavailable_reason()
    if reason:
        raise PrefectUnavailable(reason)
    temp_dir = Path(tempfile.mkdtemp(prefix="prefect-server-"))
    port = free_port()
    argv = [_prefect_binary(), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
            "--analytics-off", "--no-scheduler", "--no-late-runs", "--log-level", "INFO"]
    started = time.monotonic()
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=_server_env(temp_dir / "server-home"), start_new_session=True)
    except OSError as exc:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise PrefectUnavailable(f"cannot run {argv[0]!r}: {exc}") from exc
    server = PrefectServer(process, temp_dir, port)
    if not server.wait_ready(timeout):
        exited = not server.alive()
        why = f"exited with {process.returncode}" if exited else f"did not start listening within {timeout:.0f} s"
        tail = server.log_tail()
        server.stop()
        raise PrefectUnavailable(f"the Prefect server {why}; its output ends with:\n{tail}", exited=exited)
    try:
        with urllib.request.urlopen(f"{server.api_url}/health", timeout=30) as response:
            body = response.read()
    except OSError as exc:
        server.stop()
        raise PrefectUnavailable(f"the Prefect server listens but /api/health failed: {exc}") from exc
    if body.strip() != b"true":
        server.stop()
        raise PrefectUnavailable(f"the Prefect server's /api/health answered {body[:200]!r}")
    server.started_seconds = time.monotonic() - started
    return server


# ------------------------------------------------------------------------------------------------ pytest plugin

SKIPS = EngineSkips("Prefect")
_STARTED: list[float] = []


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    """One private local Prefect server for the whole run (started on first use, stopped at the end of the run)."""
    SKIPS.skip_if_known()
    try:
        server = start_server()
    except PrefectUnavailable as exc:
        SKIPS.skip(f"Prefect: {exc}")
    _STARTED.append(server.started_seconds)
    try:
        yield server
    finally:
        left = server.stop()
        assert not left, f"Prefect server processes outlived SIGTERM to its group and were killed: {left}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly when the Prefect tests could not run, and how long the server took to start when they did."""
    SKIPS.report(terminalreporter)
    for seconds in _STARTED:
        terminalreporter.write_line(f"Prefect server: started in {seconds:.1f} s")
