"""Two external scripts run concurrently through pipes_core in a plain ThreadPoolExecutor (or ProcessPoolExecutor).

Each run logs to its own logger (``logger=``), so their lines can be told apart; every record also carries
``pipes_run_id`` and ``pipes_command``. Results are collected as plain dicts (``to_dict()``, the objects
``pipes run --json`` prints); a failed run raises ``PipesExecutionError`` from ``future.result()``, carrying the
remote exception. With ``--processes`` the runs happen in worker processes, and what they return or raise comes
back pickled. ``scripts/refunds.py`` raises on purpose, so this exits with status 1:
    python examples/concurrent_futures_runs.py [--processes]
See docs/embedding/concurrent-futures.md and docs/embedding/process-pools.md.
"""

from __future__ import annotations

import json
import logging
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from pipes_core import PipesClientCompletedInvocation, PipesExecutionError, PipesRunContext, PipesSubprocessClient

SCRIPTS = Path(__file__).resolve().parent / "scripts"
STEPS = {"orders.py": ["warehouse/orders", "warehouse/customers"], "refunds.py": ["warehouse/refunds"]}


def run_script(script: str, asset_keys: list[str]) -> PipesClientCompletedInvocation:
    return PipesSubprocessClient().run(
        command=[sys.executable, str(SCRIPTS / script)],
        context=PipesRunContext(asset_keys=asset_keys),
        logger=logging.getLogger(f"steps.{Path(script).stem}"),  # one logger per run
    )


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")  # INFO: the scripts' logs


def main(argv: list[str]) -> int:
    configure_logging()
    pool_class = ProcessPoolExecutor if "--processes" in argv else ThreadPoolExecutor
    # initializer: a worker process configures its own logging (a spawned one inherits none)
    with pool_class(max_workers=len(STEPS), initializer=configure_logging) as pool:
        futures = {script: pool.submit(run_script, script, keys) for script, keys in STEPS.items()}
    failed = 0
    for script, future in futures.items():
        try:
            invocation = future.result()
        except PipesExecutionError as error:
            failed += 1
            remote = error.remote_exception
            print(f"{script}: FAILED: {remote or error}")  # the remote exception, or why the run failed
            continue
        for result in invocation.get_results():
            print(f"{script}: {json.dumps(result.to_dict())}")
        print(f"{script}: custom messages {json.dumps(invocation.get_custom_messages())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
