"""A Prefect 3 flow whose tasks run external scripts through pipes_core, concurrently.

- the scripts' ``log`` messages are the task run's logs (Prefect's run logger, passed as ``logger=``);
- materializations become a table artifact and checks a markdown artifact (``to_dict()`` gives plain data);
- a remote exception fails the task with a ``PipesExecutionError`` carrying it (type, message, traceback); the
  invocation and the error pickle, so Prefect can persist them (``persist_result=True``).

Run it against a Prefect server (``PREFECT_API_URL`` set), or alone (Prefect then starts a temporary one):
    python examples/prefect_flow.py
``scripts/refunds.py`` raises on purpose, so the flow ends Failed (exit status 1). See docs/embedding/prefect.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipes_core import MaterializeResult, PipesClientCompletedInvocation, PipesRunContext, PipesSubprocessClient

SCRIPTS = Path(__file__).resolve().parent / "scripts"


# persist_result: Prefect pickles what the task returned or raised into its result storage (a retried flow run
# then reuses a completed script's invocation instead of running the script again).
@task(persist_result=True)
def run_script(script: str, asset_keys: list[str]) -> PipesClientCompletedInvocation:
    invocation = PipesSubprocessClient().run(
        command=[sys.executable, str(SCRIPTS / script)],
        context=PipesRunContext(asset_keys=asset_keys),
        logger=get_run_logger(),  # the external logs land in this task run's logs
    )  # a remote exception raises PipesExecutionError here, and fails the task
    name = Path(script).stem  # artifact keys: lowercase letters, digits and dashes
    if materializations := [r.to_dict() for r in invocation.get_results() if isinstance(r, MaterializeResult)]:
        create_table_artifact(materializations, key=f"{name}-materializations")
    if checks := invocation.get_asset_check_results():
        create_markdown_artifact(
            "\n".join(f"- {'passed' if c.passed else 'FAILED'}: `{c.asset_key}` {c.check_name} (severity {c.severity})"
                      for c in checks),
            key=f"{name}-checks",
        )
    return invocation


@flow
def warehouse() -> list[PipesClientCompletedInvocation]:
    orders = run_script.submit("orders.py", ["warehouse/orders", "warehouse/customers"])
    refunds = run_script.submit("refunds.py", ["warehouse/refunds"])  # runs at the same time
    logger = get_run_logger()
    logger.info("orders reported %s", orders.result().get_custom_messages())
    return [orders.result(), refunds.result()]  # refunds' error fails the flow


if __name__ == "__main__":
    state = warehouse(return_state=True)
    sys.exit(0 if state.is_completed() else 1)
