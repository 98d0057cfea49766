"""The per-run options, declared once (``pipes_core.launch.options.RunOptions`` and each launcher's own): every client x
every option, sync and async. Each is in the signature ``help()`` shows, an unknown one is refused as Python
refuses a keyword, and each shared option does what it says on a real child, through the sync and the async
driver alike."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesAsyncSubprocessClient,
    PipesExecutionError,
    PipesRunContext,
    PipesRunStore,
    PipesSubprocessClient,
    PipesTimeoutError,
    PipesUsageError,
    RunOptions,
    TraceFileWriter,
)
from pipes_core.docker import DockerRunOptions, PipesAsyncDockerClient, PipesDockerClient
from pipes_core.launch.options import RUN_OPTION_DEFAULTS, option_names
from pipes_core.launch.subprocess import SubprocessRunOptions
from pipes_core.ray import PipesAsyncRayJobClient, PipesRayJobClient, RayRunOptions
from pipes_core.slurm import PipesAsyncSlurmClient, PipesSlurmClient, SlurmRunOptions
from tests.support.helpers import PYTHON

# (sync client, async twin, its options type, its required options)
CLIENTS = [
    (PipesSubprocessClient, PipesAsyncSubprocessClient, SubprocessRunOptions, {"command"}),
    (PipesDockerClient, PipesAsyncDockerClient, DockerRunOptions, {"image"}),
    (PipesRayJobClient, PipesAsyncRayJobClient, RayRunOptions, {"command"}),
    (PipesSlurmClient, PipesAsyncSlurmClient, SlurmRunOptions, set()),
]
EVERY_RUN = [(client, options, required) for sync, twin, options, required in CLIENTS for client in (sync, twin)]


@pytest.mark.parametrize(("client", "options_type", "required"), EVERY_RUN, ids=[c.__name__ for c, *_ in EVERY_RUN])
def test_every_option_is_a_keyword_of_run(client: type[Any], options_type: type[Any], required: set[str]) -> None:
    parameters = inspect.signature(client.run).parameters
    names = option_names(options_type)
    assert set(RunOptions.__annotations__) <= set(names)  # every client takes the shared ones
    assert list(parameters) == ["self", "context", "extras", *names]
    for name in names:
        parameter = parameters[name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
        if name in required:
            assert parameter.default is inspect.Parameter.empty, name
        else:
            assert parameter.default == RUN_OPTION_DEFAULTS.get(name, parameter.default), name
    # help() describes each: its own in its options type, the shared ones in RunOptions
    documented = (inspect.getdoc(options_type) or "") + (inspect.getdoc(RunOptions) or "")
    for name in names:
        assert f"{name}:" in documented or f"{name} /" in documented or f"/ {name}" in documented, name


@pytest.mark.parametrize(("sync", "twin"), [(s, t) for s, t, *_ in CLIENTS], ids=[s.__name__ for s, *_ in CLIENTS])
def test_the_async_twin_takes_what_its_sync_client_takes(sync: type[Any], twin: type[Any]) -> None:
    assert inspect.signature(twin.run) == inspect.signature(sync.run)
    twin_init, sync_init = inspect.signature(twin.__init__), inspect.signature(sync.__init__)
    assert [(p.name, p.kind, p.default) for p in twin_init.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in sync_init.parameters.values()]
    assert inspect.iscoroutinefunction(twin.run)


def test_an_unknown_option_is_refused_as_python_refuses_a_keyword() -> None:
    with pytest.raises(TypeError, match=r"PipesSubprocessClient.run\(\) got an unexpected keyword argument "
                                        r"'timeout_second'"):
        PipesSubprocessClient().run(command=["true"], timeout_second=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing required keyword argument: 'command'"):
        PipesSubprocessClient().run()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"PipesAsyncSubprocessClient.run\(\) got an unexpected keyword argument"):
        asyncio.run(PipesAsyncSubprocessClient().run(command=["true"], stdn=None))  # type: ignore[call-arg]


def test_a_ray_run_refuses_stderr_rather_than_ignoring_it() -> None:
    from pipes_core import PipesUsageError

    with pytest.raises(PipesUsageError, match="a Ray job has one log"):
        PipesRayJobClient("127.0.0.1:1").run(command="true", stderr=lambda data: None)


# ---------------------------------------------------------------------------------------------- each does its job


CHILD = """
import os, sys
from pipes_ext import open_pipes
with open_pipes() as pipes:
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    pipes.log.info("a log line")
    pipes.log_external_stream("stdout", "external text")
    pipes.report_custom_message({"cwd": os.getcwd(), "env": os.environ.get("FROM_RUN"), "stdin": sys.stdin.read()})
    pipes.report_asset_materialization(metadata={"rows": 1})
    if len(sys.argv) > 1 and sys.argv[1] == "sleep":
        import time
        time.sleep(600)
    if len(sys.argv) > 1 and sys.argv[1] == "check":
        pipes.report_asset_check("positive", passed=False, severity="ERROR")
"""


class Seen:
    """What the callbacks and targets of a run received."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.messages: list[dict[str, Any]] = []
        self.launched: list[Any] = []
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.external: list[tuple[str, str]] = []
        self.records: list[logging.LogRecord] = []


class _Records(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def _logger(seen: Seen) -> logging.Logger:
    logger = logging.getLogger(f"tests.run_options.{id(seen)}")
    logger.propagate = False
    logger.addHandler(_Records(seen.records))
    logger.setLevel(logging.DEBUG)
    return logger


def _raise(event: Any) -> None:
    raise RuntimeError("on_event failed")


# option -> (the run's options, given what is seen; the child's argument; a check of the outcome)
Check = Callable[[Any, BaseException | None, Seen, Path], Any]
OPTION_CASES: dict[str, tuple[Callable[[Seen, Path], dict[str, Any]], list[str], Check]] = {
    "timeout_seconds": (lambda seen, tmp: {"timeout_seconds": 2.0}, ["sleep"],
                        lambda inv, err, seen, tmp: _is(err, PipesTimeoutError)),
    "strict": (lambda seen, tmp: {"strict": False, "command": [PYTHON, "-c", "pass"]}, [],
               lambda inv, err, seen, tmp: _ok(err) or not inv.session.opened),
    "on_event": (lambda seen, tmp: {"on_event": seen.events.append}, [],
                 lambda inv, err, seen, tmp: _ok(err) or len(seen.events) > 0),
    "retain_messages": (lambda seen, tmp: {"retain_messages": False, "on_event": seen.events.append}, [],
                        lambda inv, err, seen, tmp: _ok(err) or (inv.get_custom_messages() == [] and seen.events)),
    "metadata": (lambda seen, tmp: {"metadata": {"run": "x"}}, [],
                 lambda inv, err, seen, tmp: _ok(err) or "run" in inv.get_results()[0].metadata),
    "stdout": (lambda seen, tmp: {"stdout": seen.stdout.extend}, [],
               lambda inv, err, seen, tmp: _ok(err) or b"to stdout" in seen.stdout),
    "stderr": (lambda seen, tmp: {"stderr": seen.stderr.extend}, [],
               lambda inv, err, seen, tmp: _ok(err) or b"to stderr" in seen.stderr),
    "on_launched": (lambda seen, tmp: {"on_launched": seen.launched.append}, [],
                    lambda inv, err, seen, tmp: _ok(err) or [p.description for p in seen.launched] ==
                    [inv.description]),
    "logger": (lambda seen, tmp: {"logger": _logger(seen)}, [],
               lambda inv, err, seen, tmp: _ok(err) or any(r.getMessage() == "a log line" for r in seen.records)),
    "external_stream_handler": (
        lambda seen, tmp: {"external_stream_handler": lambda s, t: seen.external.append((s, t))}, [],
        lambda inv, err, seen, tmp: _ok(err) or ("stdout", "external text") in seen.external),
    "on_message": (lambda seen, tmp: {"on_message": seen.messages.append}, [],
                   lambda inv, err, seen, tmp: _ok(err) or seen.messages[0]["method"] == "opened"),
    "fail_on_check_error": (lambda seen, tmp: {"fail_on_check_error": True}, ["check"],
                            lambda inv, err, seen, tmp: _is(err, PipesExecutionError, "failed check(s)")),
    "raise_on_event_error": (lambda seen, tmp: {"raise_on_event_error": False, "on_event": _raise}, [],
                             lambda inv, err, seen, tmp: _ok(err) or inv.session.closed),
    "observer": (lambda seen, tmp: {"observer": TraceFileWriter(tmp / "run.json")}, [],
                 lambda inv, err, seen, tmp: _ok(err) or [e["name"] for e in json.loads(
                     (tmp / "run.json").read_text(encoding="utf-8")) if e["ph"] == "X"] ==
                 ["launch", "wait", "drain", "run"]),
    "launch_key": (lambda seen, tmp: {"launch_key": "the-run", "store": str(tmp / "runs.sqlite3")}, [],
                   lambda inv, err, seen, tmp: _ok(err) or (inv.session.closed and _concluded(tmp, "the-run"))),
    "store": (lambda seen, tmp: {"store": str(tmp / "runs.sqlite3")}, [],
              lambda inv, err, seen, tmp: _is(err, PipesUsageError, "store= is only used with launch_key=")),
    # the subprocess clients' own
    "command": (lambda seen, tmp: {}, [], lambda inv, err, seen, tmp: _ok(err) or inv.session.closed),
    "env": (lambda seen, tmp: {"env": {"FROM_RUN": "yes"}}, [],
            lambda inv, err, seen, tmp: _ok(err) or inv.get_custom_messages()[0]["env"] == "yes"),
    "cwd": (lambda seen, tmp: {"cwd": str(tmp)}, [],
            lambda inv, err, seen, tmp: _ok(err) or inv.get_custom_messages()[0]["cwd"] == str(tmp)),
    "stdin": (lambda seen, tmp: {"stdin": subprocess.DEVNULL}, [],
              lambda inv, err, seen, tmp: _ok(err) or inv.get_custom_messages()[0]["stdin"] == ""),
}


def _concluded(tmp: Path, launch_key: str) -> bool:
    with PipesRunStore(tmp / "runs.sqlite3") as store:
        record = store.get(launch_key)
    assert record is not None and record.state == "concluded" and record.outcome is not None
    return record.outcome["exit_code"] == 0


def _ok(error: BaseException | None) -> bool:
    assert error is None, f"{type(error).__name__}: {error}"
    return False


def _is(error: BaseException | None, cls: type[BaseException], text: str = "") -> None:
    assert isinstance(error, cls), f"{type(error).__name__}: {error}"
    assert text in str(error)


def test_the_table_covers_every_option_of_the_subprocess_clients() -> None:
    assert set(OPTION_CASES) == set(SubprocessRunOptions.__annotations__)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("option", list(OPTION_CASES))
def test_each_option_does_its_job_sync_and_async(option: str, mode: str, tmp_path: Path) -> None:
    make_options, args, check = OPTION_CASES[option]
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    seen = Seen()
    options: dict[str, Any] = {"command": [PYTHON, str(script), *args], "context": PipesRunContext(asset_keys=["a"]),
                               "stdin": subprocess.DEVNULL, **make_options(seen, tmp_path)}
    client_options = {"forward_stdio": option in ("stdout", "stderr"), "termination_timeout_seconds": 1}
    invocation: Any = None
    error: BaseException | None = None
    try:
        if mode == "sync":
            invocation = PipesSubprocessClient(**client_options).run(**options)  # type: ignore[arg-type]
        else:
            invocation = asyncio.run(PipesAsyncSubprocessClient(**client_options).run(**options))  # type: ignore[arg-type]
    except Exception as exc:
        error = exc
    observed = check(invocation, error, seen, tmp_path)  # None: it asserted on the error itself
    if observed is not None:
        assert observed, option
