"""The concurrent-engines benchmark keeps working: one ``--quick`` run on the tests' Slurm cluster. No timing is
asserted; it reports figures (see ``benchmarks/async_engines.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.support.engines_slurm import SlurmCluster


def test_quick_async_engines_benchmark_reports_every_figure(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "async_engines.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.async_engines", "--quick", "--jobs", "3",
                           "--slurm-conf", str(slurm_cluster.conf), "--json", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["async_slurm"]
    assert [m["name"] for m in result["metrics"]] == ["batch wall time", "peak threads", "threads per run",
                                                      "peak RSS growth", "RSS per run"]
    for metric in result["metrics"]:
        assert metric["ours"] and metric["reference"], metric["name"]
    assert not [note for note in result["notes"] if "failed" in note], result["notes"]
