"""``pipes run --slurm``: real `pipes run` processes submitting to the real one-node cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, cli_json_events
from tests.support.engines_slurm import SlurmCluster

PIPES = [sys.executable, "-m", "pipes_core"]
EXAMPLE = str(REPO_ROOT / "examples" / "hello_pipes.py")


def run_pipes(cluster: SlurmCluster | None, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(cluster.env if cluster else {})}
    return subprocess.run([*PIPES, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)


def test_human_mode_runs_the_example_as_a_batch_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    proc = run_pipes(slurm_cluster, "run", "--slurm", "--shared-dir", str(tmp_path), "--asset", "examples/hello",
                     "--extras", '{"rows": 3}', "--", sys.executable, EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[pipes] slurm job ") and line.endswith(" COMPLETED") for line in lines), lines
    assert "[pipes] opened" in lines and "[pipes] closed" in lines
    assert '[pipes] message {"squares": [0, 1, 4]}' in lines
    assert "status    succeeded" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == []  # messages and output files cleaned up


def test_json_mode_with_sbatch_args_and_the_conf_given_on_the_command_line(slurm_cluster: SlurmCluster) -> None:
    proc = run_pipes(None, "run", "--slurm", "--slurm-conf", str(slurm_cluster.conf), "--sbatch-arg=--job-name=cli",
                     f"--sbatch-arg=--partition={slurm_cluster.partition}", "--json", "--asset", "examples/hello",
                     "--extras", '{"rows": 1}', "--", sys.executable, EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = cli_json_events(proc.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "slurm_job" and events[0]["state"] == "PENDING"
    assert {"opened", "materialization", "check", "custom_message", "closed"} <= set(kinds)
    assert kinds[-2:] == ["slurm_job", "summary"] and events[-2]["state"] == "COMPLETED"
    job_id = events[0]["job_id"]
    shown = slurm_cluster.run("scontrol", "show", "job", str(job_id))
    assert "JobName=cli" in shown.stdout


def test_a_failing_job_passes_its_exit_code_through(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    proc = run_pipes(slurm_cluster, "run", "--slurm", "--no-strict", "--", "sh", "-c", "echo oops >&2; exit 5")
    assert proc.returncode == 5
    assert "oops" in proc.stderr  # the job's stderr file, forwarded
    assert "failed with exit code 5" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["--sbatch-arg=--partition=x", "--", "true"], "--sbatch-arg needs --slurm"),
    (["--shared-dir", "/tmp", "--", "true"], "--shared-dir needs --slurm"),
    (["--slurm", "--shared-dir", "/no/such/dir", "--", "true"], "is not a directory"),
])
def test_bad_slurm_invocations_give_one_line_and_exit_2(args: list[str], expected: str) -> None:
    proc = run_pipes(None, "run", *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr


def test_a_refused_submission_is_one_clear_line(slurm_cluster: SlurmCluster) -> None:
    proc = run_pipes(slurm_cluster, "run", "--slurm", "--sbatch-arg=--partition=nope", "--", "true")
    assert proc.returncode == 127
    assert "Slurm refused to submit" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
