"""The concurrent.futures example (examples/concurrent_futures_runs.py), run as a user runs it: with threads, and
with worker processes (``--processes``: the invocation and the error come back pickled)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.helpers import PYTHON, REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "concurrent_futures_runs.py"
TIMEOUT_SECONDS = 120  # a bound that only catches hangs; the example takes about a second


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_concurrent_futures_example_collects_results_errors_and_per_run_logs(tmp_path: Path, pool: str) -> None:
    args = ["--processes"] if pool == "processes" else []
    done = subprocess.run([PYTHON, str(EXAMPLE), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT_SECONDS)
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 1, output  # scripts/refunds.py raises on purpose
    lines = done.stdout.splitlines()
    orders = [json.loads(line.removeprefix("orders.py: ")) for line in lines
              if line.startswith("orders.py: {")]
    assert [(r["event"], r["asset_key"]) for r in orders] == [
        ("materialization", "warehouse/orders"), ("check", "warehouse/orders"),
        ("materialization", "warehouse/customers"), ("check", "warehouse/customers"),
    ]
    assert orders[3]["passed"] is False and orders[3]["severity"] == "WARN"
    assert 'orders.py: custom messages [{"orders": 5, "customers": 3}]' in lines
    # The remote exception, from the PipesExecutionError (pickled back from the worker process with --processes).
    [failure] = [line for line in lines if line.startswith("refunds.py:")]
    assert failure.startswith("refunds.py: FAILED: ")
    assert "ValueError" in failure and "the refunds feed is empty for 2024-06-01" in failure
    # Each run's external logs went to its own logger (shown at INFO, as configured by the example).
    logs = done.stderr.splitlines()
    assert "steps.orders INFO loading orders" in logs
    assert "steps.orders INFO loaded 5 orders of 3 customers" in logs
    assert "steps.refunds INFO loading refunds" in logs
    assert not any(line.startswith("steps.orders") and "refunds" in line for line in logs)
