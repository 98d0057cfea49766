"""An external step for the integration examples that fails: it logs, then raises.

The exception reaches the orchestrator (type, message, traceback) in the Pipes ``closed`` message and fails the
run there. Run by ``examples/prefect_flow.py`` and ``examples/concurrent_futures_runs.py``.
"""

from pipes_ext import open_pipes


def main() -> None:
    with open_pipes() as pipes:
        pipes.log.info("loading refunds")
        raise ValueError("the refunds feed is empty for 2024-06-01")


if __name__ == "__main__":
    main()
