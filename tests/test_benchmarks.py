"""The benchmark suite keeps working: one ``--quick`` run with tiny sizes. No timing is asserted here; speed is
read from ``python -m benchmarks`` itself (see the README's Performance section)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_quick_benchmark_run_reports_every_benchmark_for_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"throughput", "latency", "startup", "memory", "idle", "blob"}
    for name, result in report["results"].items():
        assert result["metrics"], name
        for metric in result["metrics"]:
            assert metric["ours"] and metric["reference"], (name, metric["name"])
            ratio = metric["ratio_ours_over_reference"]  # None only when the reference measured 0
            assert ratio is None or ratio >= 0, (name, metric["name"])
    throughput = report["results"]["throughput"]["metrics"][0]
    assert throughput["limit"] and throughput["ours_over_limit"] > 0
    assert "ours/ref" in proc.stdout and "## blob" in proc.stdout


def test_quick_lines_benchmark_run_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "lines.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lines", "--quick", "--json", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["handler_msgs_per_s"] > 0 and report["long_line_peak_x"] > 0
    assert report["skip_peak_x"] is not None and "msg/s" in proc.stdout


def test_quick_observability_benchmark_reports_tracing_on_against_off(tmp_path: Path) -> None:
    out = tmp_path / "observability.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.observability", "--quick", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"otel", "trace_file"}
    for result in report["results"].values():
        for metric in result["metrics"]:
            assert metric["ratio_ours_over_reference"] > 0, metric["name"]
    assert "ratio ours/ref" in proc.stdout


def test_quick_durable_benchmark_run_reports_both_sides(tmp_path: Path) -> None:
    # The re-attach is measured here for the subprocess launcher only (Docker, Ray and Slurm take long to start:
    # `python -m benchmarks.durable` measures all four); Docker is asked for too, with no dockerd on the PATH: it is
    # reported as skipped, with the reason, and the others are measured.
    out = tmp_path / "durable.json"
    env = {**os.environ, "PATH": str(tmp_path / "no-such-dir")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.durable", "--quick", "--launchers", "subprocess,docker",
                           "--json", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"throughput", "reattach"}
    (metric,) = report["results"]["throughput"]["metrics"]
    assert metric["ours"] and metric["reference"]
    reattach = report["results"]["reattach"]
    metrics = {metric["name"]: metric for metric in reattach["metrics"]}
    assert set(metrics) == {"subprocess: start to (re-)attached", "subprocess: of which in attach"}
    assert metrics["subprocess: start to (re-)attached"]["ratio_ours_over_reference"] > 0
    assert metrics["subprocess: of which in attach"]["ours"][0] > 0
    assert reattach["failed"] == {} and list(reattach["skipped"]) == ["docker"]
    assert "dockerd is not installed" in reattach["skipped"]["docker"]
    assert "docker: skipped" in proc.stdout
