"""``benchmarks/docker.py`` keeps working: one ``--quick`` run on the session's private daemon. No timing is
asserted; the figures are read from the benchmark itself (README, Performance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.support.engines_docker import DockerEngine


@pytest.mark.docker
@pytest.mark.slow
def test_quick_docker_benchmark_reports_every_figure(docker_engine: DockerEngine, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.docker", "--quick", "--json", str(out),
                           "--docker-host", docker_engine.host, "--image", docker_engine.images.test],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["docker"]
    names = [metric["name"] for metric in result["metrics"]]
    launch = result["metrics"][0]
    assert launch["name"] == "launch to exit" and launch["ours"] and launch["reference"] and launch["limit"]
    assert launch["ratio_ours_over_reference"] > 0
    assert "launch to exit, Dagster's client" in names  # Dagster's PipesDockerClient ran
    for channel in ("log stream (stdout, attach)", "bind-mounted messages file"):
        assert f"2,000 messages, ours, {channel}" in names and f"latency p99, ours, {channel}" in names
    assert any(name.startswith("2,000 messages, Dagster") for name in names)
    assert not [note for note in result["notes"] if "ours" in note], result["notes"]  # ours lost nothing
    assert "ours/ref" in proc.stdout
