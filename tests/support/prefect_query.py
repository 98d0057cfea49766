"""What a Prefect server recorded for the latest run of one flow, as JSON on stdout (a child of the Prefect tests).

    python tests/support/prefect_query.py FLOW_NAME EXPECTED_TASK_RUNS TIMEOUT_SECONDS

Uses the Prefect client (``PREFECT_API_URL`` from the environment). The server records task runs from the
events the flow sent, after the flow's process has ended, so this waits, with a deadline, until the flow run and
the expected number of task runs are in a final state (polling the API: a server's database has no event to wait
on here). Each task run's persisted result is loaded back (unpickled), so its type and contents can be checked.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import FlowRunSort

POLL_SECONDS = 0.1


def _describe_result(value: Any) -> dict[str, Any]:
    """A persisted task result, unpickled: an invocation, or the exception that failed the task."""
    if isinstance(value, BaseException):
        remote = getattr(value, "remote_exception", None)
        return {"kind": "exception", "type": type(value).__name__, "message": str(value),
                "remote_name": getattr(remote, "name", None), "remote_message": getattr(remote, "message", None)}
    return {"kind": type(value).__name__, "results": [r.to_dict() for r in value.get_results()],
            "custom_messages": value.get_custom_messages(), "logs": [log.message for log in value.get_logs()]}


def main(flow_name: str, expected_task_runs: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            flow_runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                              sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
            ids = [flow_run.id for flow_run in flow_runs]
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            finished = (flow_runs and all(run.state and run.state.is_final() for run in flow_runs)
                        and len(task_runs) >= expected_task_runs
                        and all(run.state and run.state.is_final() for run in task_runs))
            if finished or time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        report = {
            "flow_runs": [{"id": str(run.id), "state": run.state_type.value if run.state_type else None,
                           "message": run.state.message if run.state else None} for run in flow_runs],
            "task_runs": [{"id": str(run.id), "name": run.name,
                           "state": run.state_type.value if run.state_type else None,
                           "message": run.state.message if run.state else None,
                           "result": _describe_result(run.state.result(raise_on_failure=False))
                           if run.state and run.state.is_final() else None} for run in task_runs],
            "logs": [{"task_run_id": str(log.task_run_id) if log.task_run_id else None, "level": log.level,
                      "message": log.message} for log in logs],
            "artifacts": [{"key": a.key, "type": a.type, "task_run_id": str(a.task_run_id) if a.task_run_id else None,
                           "data": a.data} for a in artifacts if a.key],  # keyless ones are persisted results
        }
    json.dump(report, sys.stdout, default=str)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
