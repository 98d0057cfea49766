"""Durable runs of the subprocess launcher (issue 22), sync and async: the kill matrix of
:mod:`tests.support.durable_kills` (a real orchestrator SIGKILLed at each point of a run, a new one finishing it).

Each scenario checks: one launch per key (counted by the job itself), every message once and in order in the
final invocation, the verdict (success, a non-zero exit, a reported exception), no process of the job's group
left, no file left in the run directory, and a later run with the key returning the recorded outcome without
launching. Orchestrators run in their own session and are killed by process group at teardown, as is the job's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import PipesRunStore
from pipes_core.launch.durable import run_directory
from tests.support.durable_kills import CASES, FLAVOURS, Scenario, kill_and_finish, race, scenarios
from tests.support.durable_launchers import SUBPROCESS
from tests.support.helpers import PYTHON


@pytest.fixture
def scenario_factory(tmp_path: Path) -> Iterator[Callable[..., Scenario]]:
    yield from scenarios(tmp_path, SUBPROCESS)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("point", "mode"), CASES)
def test_a_killed_orchestrator_is_replaced_and_the_run_finishes_once(scenario_factory: Any, point: str, mode: str,
                                                                     flavour: str) -> None:
    kill_and_finish(scenario_factory(mode), point, mode, flavour)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_two_orchestrators_racing_on_one_key_launch_once(scenario_factory: Any, flavour: str) -> None:
    race(scenario_factory(), flavour)


def test_a_launch_key_on_a_launcher_without_attach_is_a_clear_error(tmp_path: Path) -> None:
    from pipes_core import PipesClient, PipesUsageError

    class NoAttach(PipesClient):
        def run(self, **options: Any) -> Any:
            return self.run_launcher(lambda request: None, **options)  # type: ignore[arg-type,return-value]

    with pytest.raises(PipesUsageError, match="launch_key= is not supported by it"):
        NoAttach().run(launch_key="k", store=str(tmp_path / "runs.sqlite3"))
    with pytest.raises(PipesUsageError, match="launch_key must be a non-empty string"):
        from pipes_core import PipesSubprocessClient

        PipesSubprocessClient().run(command=["true"], launch_key="", store=str(tmp_path / "runs.sqlite3"))


def test_each_event_carries_its_line_position_in_the_channel(tmp_path: Path) -> None:
    from pipes_core import PipesRunContext, PipesSubprocessClient

    child = tmp_path / "child.py"
    child.write_text("from pipes_ext import open_pipes\nwith open_pipes() as pipes:\n"
                     "    pipes.report_custom_message(1)\n    pipes.report_asset_materialization()\n")
    seen: list[tuple[str, int | None]] = []
    invocation = PipesSubprocessClient().run(command=[PYTHON, str(child)], context=PipesRunContext(asset_keys=["a"]),
                                             on_event=lambda event: seen.append((type(event).__name__,
                                                                                 event.position)))
    assert seen == [("PipesOpenedEvent", 0), ("PipesCustomMessageEvent", 1), ("MaterializeResult", 2),
                    ("PipesClosedEvent", 3)]
    assert [result.position for result in invocation.get_results()] == [2]


def test_a_durable_command_that_cannot_start_fails_with_the_reason_and_is_concluded(tmp_path: Path) -> None:
    from pipes_core import PipesExecutionError, PipesSubprocessClient

    store = tmp_path / "runs.sqlite3"
    with pytest.raises(PipesExecutionError) as error:
        PipesSubprocessClient(forward_stdio=False).run(command=[str(tmp_path / "missing")], launch_key="k",
                                                       store=str(store))
    assert error.value.exit_code == 127 and "cannot start" in str(error.value)
    with PipesRunStore(store) as opened:
        record = opened.get("k")
    assert record is not None and record.state == "concluded" and record.outcome is not None
    assert record.outcome["exit_code"] == 127 and record.outcome["error"] == "PipesExecutionError"
    assert not run_directory(PipesRunStore(store), "k").exists()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_store_given_by_its_path_is_closed_after_the_run(tmp_path: Path, flavour: str) -> None:
    import asyncio

    from pipes_core import PipesAsyncSubprocessClient, PipesSubprocessClient

    store = tmp_path / "runs.sqlite3"

    def open_store_files() -> list[str]:
        names = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return [name for name in names if name.startswith(str(store))]

    for key in ("first", "second"):  # a launch, then (the same key again) a replay of the concluded run
        options: dict[str, Any] = {"command": [PYTHON, "-c", "pass"], "launch_key": key, "store": str(store),
                                   "strict": False}
        if flavour == "async":
            asyncio.run(PipesAsyncSubprocessClient(forward_stdio=False).run(**options))
        else:
            PipesSubprocessClient(forward_stdio=False).run(**options)
        assert open_store_files() == []


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_on_launched_of_a_keyed_run_reads_the_launchers_own_attributes(tmp_path: Path, flavour: str) -> None:
    import asyncio

    from pipes_core import PipesAsyncSubprocessClient, PipesSubprocessClient

    store = tmp_path / "runs.sqlite3"
    pids: list[int] = []
    options: dict[str, Any] = {"command": [PYTHON, "-c", "pass"], "launch_key": "k", "store": str(store),
                               "strict": False, "on_launched": lambda process: pids.append(process.pid)}
    if flavour == "async":
        asyncio.run(PipesAsyncSubprocessClient(forward_stdio=False).run(**options))
    else:
        PipesSubprocessClient(forward_stdio=False).run(**options)
    with PipesRunStore(store) as opened:
        record = opened.get("k")
    assert record is not None and record.handle is not None
    assert pids == [record.handle["pid"]]  # the durable child's, as a keyless run's on_launched reads its pid
