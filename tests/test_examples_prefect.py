"""The Prefect example (examples/prefect_flow.py) run against a real local Prefect server
(tests/support/engines_prefect.py).

The flow runs as a child process pointed at the server (PREFECT_API_URL), as a user runs it; what the server
recorded is then read with the Prefect client in another child (tests/support/prefect_query.py): task runs and their
states, the task runs' logs, the artifacts, and the persisted (pickled) task results loaded back.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.engines_prefect import PrefectServer
from tests.support.helpers import PYTHON, REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "prefect_flow.py"
QUERY = Path(__file__).resolve().parent / "support" / "prefect_query.py"
# Generous bounds that only catch hangs: the flow takes a few seconds, the server records its task runs within one.
FLOW_TIMEOUT_SECONDS = 300
RECORDED_TIMEOUT_SECONDS = 120

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded(prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the example flow once against the server; return what the server recorded for it."""
    env = prefect_server.client_env()
    cwd = tmp_path_factory.mktemp("prefect-flow")
    flow = subprocess.run([PYTHON, str(EXAMPLE)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=FLOW_TIMEOUT_SECONDS)
    output = f"stdout:\n{flow.stdout}\nstderr:\n{flow.stderr}"
    # scripts/refunds.py raises on purpose: the flow ends Failed, and the example exits 1 (not with a crash).
    assert flow.returncode == 1, output
    assert "Finished in state Failed" in flow.stderr + flow.stdout, output
    query = subprocess.run([PYTHON, str(QUERY), "warehouse", "2", str(RECORDED_TIMEOUT_SECONDS)], env=env, cwd=cwd,
                           capture_output=True, text=True, timeout=RECORDED_TIMEOUT_SECONDS + 60)
    assert query.returncode == 0, f"{query.stderr}\n{output}"
    report: dict[str, Any] = json.loads(query.stdout)
    report["flow_output"] = output
    return report


def _task_runs(recorded: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    runs = recorded["task_runs"]
    assert sorted(run["state"] for run in runs) == ["COMPLETED", "FAILED"], runs
    completed = next(run for run in runs if run["state"] == "COMPLETED")
    failed = next(run for run in runs if run["state"] == "FAILED")
    return completed, failed


def test_one_flow_run_failed_by_the_remote_exception(recorded: dict[str, Any]) -> None:
    [flow_run] = recorded["flow_runs"]
    assert flow_run["state"] == "FAILED"
    assert "PipesExecutionError" in flow_run["message"]
    assert "the refunds feed is empty for 2024-06-01" in flow_run["message"]


def test_two_task_runs_one_completed_one_failed_with_the_remote_message(recorded: dict[str, Any]) -> None:
    completed, failed = _task_runs(recorded)
    assert completed["message"] in ("", None)
    assert "PipesExecutionError" in failed["message"]
    assert "ValueError" in failed["message"]
    assert "the refunds feed is empty for 2024-06-01" in failed["message"]


def test_external_logs_are_the_task_runs_own_logs(recorded: dict[str, Any]) -> None:
    completed, failed = _task_runs(recorded)
    external = ("loading orders", "loaded 5 orders of 3 customers", "loading refunds")
    by_run: dict[str | None, list[str]] = {}
    for log in recorded["logs"]:
        if log["message"] in external:
            by_run.setdefault(log["task_run_id"], []).append(log["message"])
    # Each line is attached to the task run that launched its script (in order), and to no other run.
    assert by_run == {completed["id"]: ["loading orders", "loaded 5 orders of 3 customers"],
                      failed["id"]: ["loading refunds"]}
    info = [log for log in recorded["logs"] if log["message"] == "loading orders"]
    assert info[0]["level"] == 20  # the external INFO level is kept


def test_materializations_and_checks_are_artifacts_of_the_completed_task_run(recorded: dict[str, Any]) -> None:
    completed, _failed = _task_runs(recorded)
    artifacts = {artifact["key"]: artifact for artifact in recorded["artifacts"]}
    assert set(artifacts) == {"orders-materializations", "orders-checks"}  # the failed task made none
    table = artifacts["orders-materializations"]
    assert table["type"] == "table"
    assert table["task_run_id"] == completed["id"]
    rows = json.loads(table["data"])
    assert [row["asset_key"] for row in rows] == ["warehouse/orders", "warehouse/customers"]
    assert rows[0]["metadata"]["rows"] == {"type": "int", "value": 5}
    assert rows[0]["data_version"] == "5"
    checks = artifacts["orders-checks"]
    assert checks["type"] == "markdown"
    assert checks["task_run_id"] == completed["id"]
    assert checks["data"].splitlines() == [
        "- passed: `warehouse/orders` amounts_positive (severity ERROR)",
        "- FAILED: `warehouse/customers` all_customers_active (severity WARN)",
    ]


def test_persisted_results_load_back_the_invocation_and_the_error(recorded: dict[str, Any]) -> None:
    """Prefect pickled what each task returned or raised into its result storage; both unpickle."""
    completed, failed = _task_runs(recorded)
    invocation = completed["result"]
    assert invocation["kind"] == "PipesClientCompletedInvocation"
    assert [(r["event"], r["asset_key"]) for r in invocation["results"]] == [
        ("materialization", "warehouse/orders"), ("check", "warehouse/orders"),
        ("materialization", "warehouse/customers"), ("check", "warehouse/customers"),
    ]
    assert invocation["custom_messages"] == [{"orders": 5, "customers": 3}]
    assert invocation["logs"] == ["loading orders", "loaded 5 orders of 3 customers"]
    error = failed["result"]
    assert error["kind"] == "exception"
    assert error["type"] == "PipesExecutionError"
    assert error["remote_name"] == "ValueError"
    assert "the refunds feed is empty for 2024-06-01" in error["remote_message"]
