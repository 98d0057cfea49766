"""A private one-node Slurm cluster for tests and benchmarks: munged, slurmctld and slurmd, started by pid.

Everything lives under one temp dir: the munge key, socket, pid and seed files (never /run/munge or
/etc/munge, so several test runs on one machine do not collide), ``slurm.conf`` (controller and node on
127.0.0.1, free ports, no accounting), state, spool, logs and pid files. Client commands find the cluster
through ``SLURM_CONF`` (:attr:`SlurmCluster.env`); ``AuthInfo=socket=...`` in that file points them at the
private munged. See ../shared/reference/engines.md for the set-up this follows.

:func:`slurm_unavailable_reason` says why a cluster cannot run here (binaries missing, not root), and
:func:`start_slurm_cluster` raises :class:`SlurmStartError` with the daemons' own words when one does not come
up. The pytest fixture ``slurm_cluster`` (registered from tests/conftest.py) turns either into a skip with that
reason, and the terminal summary prints it in capitals so that ``.ci/test`` says so loudly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conformance._servers import free_port
from tests.support.engine_skips import EngineSkips

__all__ = [
    "SlurmCluster",
    "SlurmStartError",
    "slurm_unavailable_reason",
    "start_slurm_cluster",
    "slurm_cluster",
    "SLURM_BINARIES",
]

# The programs the cluster and the client need (Debian: slurm-wlm, munge; installed by .ci/test).
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
# Generous bound on start-up: the node is idle about 1-3 s after start here; a loaded 2-CPU machine is slower.
START_TIMEOUT_SECONDS = 60.0
# A daemon that ignores SIGTERM this long gets SIGKILL.
STOP_TIMEOUT_SECONDS = 10.0
# The node offers this share of the machine's memory: a node configured with more than it has is drained.
MEMORY_SHARE = 0.8
PARTITION = "debug"

SKIPS = EngineSkips("Slurm")


class SlurmStartError(RuntimeError):
    """The cluster did not come up; the message carries the daemons' last log lines."""


@dataclass
class SlurmCluster:
    """A running private cluster. ``env`` holds ``SLURM_CONF``; :meth:`stop` ends every daemon by its pid."""

    root: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    memory_mb: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def command_env(self) -> dict[str, str]:
        """This process's environment plus ``SLURM_CONF``, for running Slurm commands."""
        return {**os.environ, **self.env}

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against this cluster."""
        return subprocess.run(list(argv), env=self.command_env(), capture_output=True, text=True, timeout=timeout)

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-n", self.node, "-o", "%T")
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def wait_node_idle(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise SlurmStartError(f"{name} exited with {process.returncode}\n{self.logs()}")
            state = self.node_state()
            if state == "idle":
                return
            time.sleep(0.1)
        raise SlurmStartError(f"the node did not become idle within {timeout} s (last state {state!r})\n{self.logs()}")

    def cancel_all_jobs(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Cancel every job of this cluster (the cluster is private) and wait until none is left."""
        self.run("scancel", "--full", "--user", str(os.getuid()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.run("squeue", "-h", "-o", "%i")
            if proc.returncode != 0 or not proc.stdout.strip():
                return
            time.sleep(0.1)

    def logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM each daemon by its pid (slurmd, slurmctld, then munged), SIGKILL after a grace period."""
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def slurm_unavailable_reason() -> str | None:
    """Why a private Slurm cluster cannot run on this machine, or None."""
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found; .ci/test installs Debian's slurm-wlm "
                "and munge)")
    if os.geteuid() != 0:
        return "the one-node Slurm cluster runs its daemons as root (SlurmUser=root); this test run is not root"
    return None


def _memory_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmStartError("cannot read MemTotal from /proc/meminfo")


def _write_conf(root: Path, node: str, cpus: int, memory_mb: int) -> Path:
    conf = root / "slurm.conf"
    settings = {
        "ClusterName": "pipestest",
        "SlurmctldHost": f"{node}(127.0.0.1)",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "AuthInfo": f"socket={root / 'munge' / 'munge.socket'}",
        "CredType": "cred/munge",
        "StateSaveLocation": str(root / "state"),
        "SlurmdSpoolDir": str(root / "spool"),
        "SlurmctldPidFile": str(root / "slurmctld.pid"),
        "SlurmdPidFile": str(root / "slurmd.pid"),
        "SlurmctldLogFile": str(root / "log" / "slurmctld.log"),
        "SlurmdLogFile": str(root / "log" / "slurmd.log"),
        "SlurmctldPort": str(free_port()),
        "SlurmdPort": str(free_port()),
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "MpiDefault": "none",
        "SchedulerType": "sched/backfill",
        # Schedule a submitted batch job at once: the default batch_sched_delay (3 s) makes every test job wait
        # for the next 3 s tick (jobs started exactly 3.0 s apart here).
        "SchedulerParameters": "batch_sched_delay=0",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "ReturnToService": "2",
        # A finished job stays visible to scontrol this long (there is no accounting database here).
        "MinJobAge": "300",
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines.append(f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN")
    lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return conf


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def start_slurm_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``root`` (an empty directory) and wait until the node is idle.

    Raises:
        SlurmStartError: a daemon exited or the node did not become idle; the message has their logs.
    """
    # munged insists that every directory above its socket is searchable by all, and that the socket's own
    # directory is not writable by others: root 0711, munge/ 0755.
    os.chmod(root, 0o711)
    for sub, mode in (("munge", 0o755), ("state", 0o700), ("spool", 0o700), ("log", 0o700)):
        (root / sub).mkdir(mode=mode)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = max(1, int(_memory_mb() * MEMORY_SHARE))
    conf = _write_conf(root, node, cpus, memory_mb)
    cluster = SlurmCluster(root=root, conf=conf, node=node, partition=PARTITION, cpus=cpus, memory_mb=memory_mb)
    env = cluster.command_env()
    key = root / "munge.key"
    made = subprocess.run(["mungekey", "--create", f"--keyfile={key}"], capture_output=True, text=True)
    if made.returncode != 0:
        raise SlurmStartError(f"mungekey failed: {made.stderr.strip()}")
    try:
        cluster.processes["munged"] = _spawn(
            ["munged", "--foreground", f"--socket={root / 'munge' / 'munge.socket'}", f"--key-file={key}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge.seed'}",
             f"--log-file={root / 'log' / 'munged.log'}"],
            root / "log" / "munged.log", env,
        )
        _wait_for_path(root / "munge" / "munge.socket", cluster.processes["munged"], cluster)
        cluster.processes["slurmctld"] = _spawn(["slurmctld", "-D", "-f", str(conf)], root / "log" / "slurmctld.out",
                                                env)
        cluster.processes["slurmd"] = _spawn(["slurmd", "-D", "-f", str(conf)], root / "log" / "slurmd.out", env)
        cluster.wait_node_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_path(path: Path, process: subprocess.Popen[bytes], cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not path.exists():
        if process.poll() is not None:
            raise SlurmStartError(f"munged exited with {process.returncode}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            raise SlurmStartError(f"munged did not create {path} within {START_TIMEOUT_SECONDS} s\n{cluster.logs()}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The session's private Slurm cluster; skips with the reason when it cannot run here."""
    reason = slurm_unavailable_reason()
    if reason is not None:
        SKIPS.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="pipes-slurm-"))
    try:
        try:
            cluster = start_slurm_cluster(root)
        except (SlurmStartError, OSError) as exc:
            SKIPS.skip(f"the private Slurm cluster did not start: {exc}")
        try:
            yield cluster
        finally:
            cluster.cancel_all_jobs()
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly when the Slurm tests could not run."""
    SKIPS.report(terminalreporter)
