"""The Slurm benchmark keeps working: one ``--quick`` run against the session's cluster. No timing is asserted
here; the figures come from ``python -m benchmarks.slurm`` (see the README's Performance section)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.support.engines_slurm import SlurmCluster


@pytest.mark.slow
def test_quick_slurm_benchmark_reports_every_figure(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "slurm.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.slurm", "--quick", "--slurm-conf",
                           str(slurm_cluster.conf), "--json", str(out)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["slurm"]
    names = [metric["name"] for metric in result["metrics"]]
    assert names[:2] == ["per-job wall time", "session open+close"]
    assert any(name.startswith("latency median, polling") for name in names)
    assert any(name.startswith("latency median, inotify") for name in names)
    per_job = result["metrics"][0]
    assert per_job["ours"] and per_job["reference"] and per_job["limit"] and per_job["ratio_ours_over_reference"] > 0
    assert "1,000 messages: every run received all, in order" in result["notes"]
    assert not [note for note in result["notes"] if "lost" in note or " of " in note]
