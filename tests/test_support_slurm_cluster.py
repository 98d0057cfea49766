"""The private Slurm cluster fixture itself: it runs a batch job, and its client commands reach only it."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.engines_slurm import SlurmCluster


def test_private_cluster_runs_a_batch_job_and_reports_its_exit_code(slurm_cluster: SlurmCluster,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    submitted = slurm_cluster.run("sbatch", "--parsable", f"--output={out}", "--wrap", "echo hello; exit 3")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    assert job_id.isdigit()
    deadline = time.monotonic() + 120
    state = ""
    while time.monotonic() < deadline:
        shown = slurm_cluster.run("scontrol", "show", "job", job_id)
        assert shown.returncode == 0, shown.stderr
        state = shown.stdout.split("JobState=", 1)[1].split()[0]
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            break
        time.sleep(0.1)
    assert state == "FAILED"
    assert "ExitCode=3:0" in shown.stdout
    assert out.read_text() == "hello\n"
    assert str(slurm_cluster.root) in slurm_cluster.conf.read_text()  # munge socket, state, spool: all private
