"""Embedding pipes_core in another orchestrator (issue 16): per-run loggers, run fields on every record."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesClientCompletedInvocation,
    PipesExecutionError,
    PipesInterruptedError,
    PipesRunContext,
    PipesSubprocessClient,
    PipesTimeoutError,
)
from pipes_core.launch.async_client import PipesAsyncSubprocessClient
from pipes_core.launch.local import command_name
from pipes_core.protocol.json_events import event_to_json
from tests.support.helpers import PYTHON

WriteScript = Callable[..., Path]

LOGGING_CHILD = """
import sys
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.log.info("hello from " + sys.argv[1])
    pipes.log.warning("careful " + sys.argv[1])
"""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)


@pytest.fixture
def collected() -> tuple[logging.Logger, _Collect]:
    logger = logging.getLogger(f"embedding-test-{id(object())}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = _Collect()
    logger.addHandler(handler)
    return logger, handler


def test_per_run_logger_gets_the_external_logs_with_run_id_and_command(
        write_script: WriteScript, collected: tuple[logging.Logger, _Collect]) -> None:
    logger, handler = collected
    script = write_script(LOGGING_CHILD)
    default_records: list[logging.LogRecord] = []
    default = _Collect()
    logging.getLogger("pipes_core.external").addHandler(default)
    try:
        PipesSubprocessClient().run(context=PipesRunContext(run_id="run-1"), command=[PYTHON, str(script), "one"],
                                    logger=logger)
    finally:
        logging.getLogger("pipes_core.external").removeHandler(default)
        default_records = default.records
    messages = [(r.levelname, r.getMessage()) for r in handler.records if not r.getMessage().startswith("[pipes]")]
    assert messages == [("INFO", "hello from one"), ("WARNING", "careful one")]
    for record in handler.records:
        assert record.pipes_run_id == "run-1"  # type: ignore[attr-defined]
        assert record.pipes_command == f"{PYTHON} {script} one"  # type: ignore[attr-defined]
    assert default_records == []  # nothing went to the process-wide logger


def test_a_logger_adapter_keeps_its_own_extra_and_gets_the_run_fields(
        write_script: WriteScript, collected: tuple[logging.Logger, _Collect]) -> None:
    logger, handler = collected
    adapter = logging.LoggerAdapter(logger, {"task_run": "t-7"})  # a stock adapter replaces `extra`
    script = write_script(LOGGING_CHILD)
    PipesSubprocessClient().run(context=PipesRunContext(run_id="run-2"), command=[PYTHON, str(script), "two"],
                                logger=adapter)
    infos = [r for r in handler.records if r.getMessage() == "hello from two"]
    assert len(infos) == 1
    assert infos[0].task_run == "t-7"  # type: ignore[attr-defined]
    assert infos[0].pipes_run_id == "run-2"  # type: ignore[attr-defined]
    assert infos[0].pipes_command.endswith(" two")  # type: ignore[attr-defined]


def test_concurrent_runs_are_told_apart(write_script: WriteScript,
                                       collected: tuple[logging.Logger, _Collect]) -> None:
    logger, handler = collected
    script = write_script(LOGGING_CHILD)
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            PipesSubprocessClient().run(context=PipesRunContext(run_id=name), command=[PYTHON, str(script), name],
                                        logger=logger)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"r{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    infos = [r for r in handler.records if r.getMessage().startswith("hello from")]
    assert sorted((r.pipes_run_id, r.getMessage()) for r in infos) == [  # type: ignore[attr-defined]
        (f"r{i}", f"hello from r{i}") for i in range(3)]


STREAM_CHILD = """
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.log_external_stream("stdout", "captured line\\n")
"""


def test_external_stream_handler_per_run(write_script: WriteScript, capfd: pytest.CaptureFixture[str]) -> None:
    script = write_script(STREAM_CHILD)
    seen: list[tuple[str, str]] = []
    PipesSubprocessClient().run(command=[PYTHON, str(script)],
                                external_stream_handler=lambda stream, text: seen.append((stream, text)))
    assert seen == [("stdout", "captured line\n")]
    assert "captured line" not in capfd.readouterr().out  # not written to this process's stdout as well


def test_async_external_stream_handler_per_run(write_script: WriteScript) -> None:
    script = write_script(STREAM_CHILD)
    seen: list[tuple[str, str]] = []
    asyncio.run(PipesAsyncSubprocessClient().run(
        command=[PYTHON, str(script)], external_stream_handler=lambda stream, text: seen.append((stream, text))))
    assert seen == [("stdout", "captured line\n")]


def test_async_client_per_run_logger(write_script: WriteScript, collected: tuple[logging.Logger, _Collect]) -> None:
    logger, handler = collected
    script = write_script(LOGGING_CHILD)
    asyncio.run(PipesAsyncSubprocessClient().run(context=PipesRunContext(run_id="run-a"),
                                                 command=[PYTHON, str(script), "async"], logger=logger))
    infos = [r for r in handler.records if r.getMessage() == "hello from async"]
    assert len(infos) == 1
    assert infos[0].pipes_run_id == "run-a"  # type: ignore[attr-defined]
    assert infos[0].pipes_command.endswith(" async")  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- pickling

RESULTS_CHILD = """
import sys
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.log.info("starting")
    pipes.report_asset_materialization(metadata={"rows": 3}, data_version="v1", asset_key="a")
    pipes.report_asset_check("positive", passed=True, asset_key="a")
    pipes.report_custom_message({"n": 1})
    if sys.argv[1:] == ["fail"]:
        raise ValueError("boom")
"""


def _run_child(script: str, mode: str) -> PipesClientCompletedInvocation:
    """Runs in a worker process: returns the invocation, or raises the run's error."""
    return PipesSubprocessClient(forward_stdio=False).run(
        context=PipesRunContext(asset_keys=["a", "b"], run_id="pickled"), command=[PYTHON, script, mode],
        metadata={"m": "x"})


def _assert_same_reads(copy: PipesClientCompletedInvocation, original: PipesClientCompletedInvocation) -> None:
    assert copy.get_results() == original.get_results()
    assert copy.get_results(implicit_materializations=False) == original.get_results(implicit_materializations=False)
    assert copy.get_custom_messages() == original.get_custom_messages() == [{"n": 1}]
    assert copy.session.get_logs() == original.session.get_logs()
    assert [log.message for log in copy.session.get_logs()] == ["starting"]
    assert copy.session.protocol_issues == original.session.protocol_issues
    assert (copy.session.opened, copy.session.closed) == (original.session.opened, original.session.closed)
    assert copy.session.exception == original.session.exception
    assert copy.exit_code == original.exit_code
    assert copy.exit_status == original.exit_status
    assert copy.missing_closed == original.missing_closed
    assert copy.session.context_data["run_id"] == "pickled"


def test_invocation_pickles_as_a_detached_snapshot(write_script: WriteScript) -> None:
    script = write_script(RESULTS_CHILD)
    invocation = _run_child(str(script), "ok")
    copy = pickle.loads(pickle.dumps(invocation))
    _assert_same_reads(copy, invocation)
    assert len(copy.get_results()) == 3  # a, its check, and b (implicit)
    assert pickle.loads(pickle.dumps(copy)).get_results() == invocation.get_results()  # and again


def test_execution_error_pickles_with_its_invocation(write_script: WriteScript) -> None:
    script = write_script(RESULTS_CHILD)
    with pytest.raises(PipesExecutionError) as info:
        _run_child(str(script), "fail")
    error = info.value
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is PipesExecutionError
    assert str(copy) == str(error)
    assert copy.exit_code == error.exit_code == 1
    assert copy.remote_exception == error.remote_exception
    assert copy.remote_exception is not None and "boom" in copy.remote_exception.message
    assert copy.output_tail == error.output_tail
    _assert_same_reads(copy.invocation, error.invocation)


@pytest.mark.parametrize("cls", [PipesExecutionError, PipesTimeoutError, PipesInterruptedError])
def test_error_classes_pickle(cls: type[PipesExecutionError]) -> None:
    error = cls("it failed", exit_code=-15, output_tail="tail")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert (str(copy), copy.exit_code, copy.output_tail, copy.invocation) == ("it failed", -15, "tail", None)


def test_across_a_process_boundary(write_script: WriteScript) -> None:
    script = str(write_script(RESULTS_CHILD))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        invocation = pool.submit(_run_child, script, "ok").result(timeout=120)
        failed = pool.submit(_run_child, script, "fail")
        with pytest.raises(PipesExecutionError, match="boom") as info:
            failed.result(timeout=120)
    assert invocation.exit_code == 0
    assert [type(r).__name__ for r in invocation.get_results()] == [
        "MaterializeResult", "AssetCheckResult", "MaterializeResult"]
    assert invocation.get_custom_messages() == [{"n": 1}]
    assert info.value.exit_code == 1
    assert info.value.invocation.get_custom_messages() == [{"n": 1}]
    assert info.value.remote_exception is not None and info.value.remote_exception.name == "ValueError"


# ---------------------------------------------------------------------------------------------- what the CLI has

CHECKS_CHILD = """
import sys
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.log.info("checking")
    pipes.report_asset_materialization(asset_key="a", metadata={"rows": 2})
    pipes.report_asset_check("warn_only", passed=False, severity="WARN", asset_key="a")
    if sys.argv[1:] == ["error"]:
        pipes.report_asset_check("must_hold", passed=False, severity="ERROR", asset_key="a")
"""


def test_fail_on_check_error(write_script: WriteScript) -> None:
    script = write_script(CHECKS_CHILD)
    client = PipesSubprocessClient()
    # A failed WARN check never fails the run; a failed ERROR check only with fail_on_check_error.
    client.run(command=[PYTHON, str(script), "warn"], fail_on_check_error=True)
    invocation = client.run(command=[PYTHON, str(script), "error"])
    assert [c.passed for c in invocation.get_asset_check_results()] == [False, False]
    with pytest.raises(PipesExecutionError, match=r"1 failed check.*severity ERROR") as info:
        client.run(command=[PYTHON, str(script), "error"], fail_on_check_error=True)
    assert len(info.value.invocation.get_asset_check_results()) == 2  # what arrived is kept


def test_get_logs_and_to_dict_match_the_json_events(write_script: WriteScript) -> None:
    script = write_script(CHECKS_CHILD)
    events: list[Any] = []
    invocation = PipesSubprocessClient().run(command=[PYTHON, str(script), "warn"], on_event=events.append)
    assert [(log.level, log.message) for log in invocation.get_logs()] == [("INFO", "checking")]
    assert invocation.get_logs()[0].to_dict() == {"event": "log", "level": "INFO", "message": "checking"}
    materialization = invocation.get_materialize_result()
    assert materialization.to_dict() == event_to_json(materialization)
    assert materialization.to_dict()["event"] == "materialization"
    assert materialization.to_dict()["metadata"] == {"rows": {"type": "int", "value": 2}}
    names = [event.to_dict()["event"] for event in events]
    assert names == ["opened", "log", "materialization", "check", "closed"]
    for event in events:
        assert event.to_dict() == event_to_json(event)
        json.dumps(event.to_dict())  # JSON-ready
        assert pickle.loads(pickle.dumps(event)) == event


def test_an_on_event_exception_fails_the_run_unless_turned_off(write_script: WriteScript) -> None:
    script = write_script(CHECKS_CHILD)

    def on_event(event: Any) -> None:
        if event.to_dict()["event"] == "check":
            raise KeyError("no such artifact")

    with pytest.raises(PipesExecutionError, match=r"on_event callback raised 1 time.*KeyError") as info:
        PipesSubprocessClient().run(command=[PYTHON, str(script), "warn"], on_event=on_event)
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.invocation.get_materialize_result().asset_key == "a"  # later messages were not lost
    invocation = PipesSubprocessClient().run(command=[PYTHON, str(script), "warn"], on_event=on_event,
                                             raise_on_event_error=False)
    assert invocation.exit_code == 0
    with pytest.raises(PipesExecutionError, match="on_event callback raised"):
        asyncio.run(PipesAsyncSubprocessClient().run(command=[PYTHON, str(script), "warn"], on_event=on_event))


def test_dagster_pipes_error_alias_is_importable() -> None:
    from pipes_core import DagsterPipesError, PipesError

    assert DagsterPipesError is PipesError
    assert issubclass(PipesExecutionError, DagsterPipesError)


def test_the_failure_names_the_script_not_the_interpreter(write_script: WriteScript) -> None:
    script = write_script(RESULTS_CHILD, "load_orders.py")
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient(forward_stdio=False).run(command=[PYTHON, str(script), "fail"])
    headline = str(info.value).splitlines()[0]
    assert headline.startswith(f"the external process {str(script)!r} failed with exit code 1")
    assert repr(PYTHON) not in headline
    with pytest.raises(PipesExecutionError) as async_info:
        asyncio.run(PipesAsyncSubprocessClient(forward_stdio=False).run(command=[PYTHON, str(script), "fail"]))
    assert str(async_info.value).splitlines()[0].startswith(f"the external process {str(script)!r} failed")


@pytest.mark.parametrize(("argv", "name"), [
    (["python3", "etl.py", "--day", "1"], "etl.py"),
    (["/usr/bin/python3.11", "-m", "pkg.job"], "-m pkg.job"),
    (["python", "-c", "print(1)"], "python -c"),
    (["python", "-u", "x.py"], "python"),
    (["./run.sh", "a"], "./run.sh"),
    (["bash", "job.sh"], "job.sh"),
])
def test_command_name(argv: list[str], name: str) -> None:
    assert command_name(argv) == name
