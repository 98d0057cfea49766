"""Fault injection: bad input at the call or on the command line is a usage error said before anything starts
(issue 20, items 11 and 12): a ``--docker-arg`` value the daemon would refuse, a missing Docker SDK, extras over
the external side's context limit, an environment the system cannot carry. Each is a :class:`PipesUsageError` in
Python and ``pipes: error: ...`` with exit code 2 on the command line, naming the flag or parameter; nothing is
launched and no temp file is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipes_core import PipesSubprocessClient, PipesTempFileContextInjector, PipesUsageError
from pipes_core.docker import PipesDockerClient
from pipes_core.launch.async_client import PipesAsyncSubprocessClient
from pipes_ext._protocol import MAX_DECODED_PARAM_BYTES
from tests.conftest import REPO_ROOT

CLI_SECONDS = 120


def _pipes(args: list[str], tmp_path: Path, first_on_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    # DOCKER_HOST names a socket that does not exist: a run that got as far as the daemon exits 127 saying so.
    path = [str(first_on_path)] if first_on_path is not None else []
    return subprocess.run([sys.executable, "-m", "pipes_core", "run", *args], capture_output=True, text=True,
                          timeout=CLI_SECONDS, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(REPO_ROOT)]),
                               "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})


# ------------------------------------------------------------------------------------------------ item 11


@pytest.mark.parametrize(("arg", "flag"), [
    ("--memory=lots", "--docker-arg=--memory"),
    ("-m=12 MB", "--docker-arg=--memory"),
    ("--memory-swap=big", "--docker-arg=--memory-swap"),
    ("--cpus=inf", "--docker-arg=--cpus"),
    ("--cpus=nan", "--docker-arg=--cpus"),
    ("--cpus=-1", "--docker-arg=--cpus"),
    ("--pids-limit=-5", "--docker-arg=--pids-limit"),
])
def test_a_docker_arg_value_the_daemon_would_refuse_is_a_usage_error(tmp_path: Path, arg: str, flag: str) -> None:
    proc = _pipes(["--docker", "busybox", f"--docker-arg={arg}", "--", "true"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"pipes: error: {flag} "), proc.stderr
    assert "Docker daemon" not in proc.stderr + proc.stdout  # said before the daemon is contacted
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("arg", ["--memory=512m", "--memory=1.5g", "-m=64MB", "--memory-swap=-1", "--cpus=0.5"])
def test_valid_docker_arg_values_go_through_to_the_daemon(tmp_path: Path, arg: str) -> None:
    proc = _pipes(["--docker", "busybox", f"--docker-arg={arg}", "--", "true"], tmp_path)
    assert proc.returncode == 127, proc.stderr  # refused by no check of ours: the (missing) daemon is next
    assert "cannot reach the Docker daemon" in proc.stdout


def test_python_api_refuses_the_same_values_naming_the_parameter() -> None:
    with pytest.raises(PipesUsageError, match=r"^mem_limit must be a size"):
        PipesDockerClient().run(image="busybox", command="true", mem_limit="lots")
    with pytest.raises(PipesUsageError, match=r"^cpus must be positive and finite"):
        PipesDockerClient().run(image="busybox", command="true", cpus=float("inf"))


def test_a_missing_docker_sdk_is_a_usage_error_with_the_install_hint(tmp_path: Path) -> None:
    # A package named docker that cannot be imported, first on the path: as if the SDK were not installed.
    fake = tmp_path / "fake"
    (fake / "docker").mkdir(parents=True)
    (fake / "docker" / "__init__.py").write_text('raise ImportError("No module named \'docker\'")\n')
    proc = _pipes(["--docker", "busybox", "--", "true"], tmp_path, first_on_path=fake)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("pipes: error: PipesDockerClient needs the Docker SDK for Python: "
                                  "pip install 'docker' (it is the 'docker' extra of pipes-sdk)"), proc.stderr
    assert "internal error" not in proc.stderr


# ------------------------------------------------------------------------------------------------ item 12

MARKER_CHILD = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('launched')"


def _launched(tmp_path: Path) -> tuple[list[str], Path]:
    marker = tmp_path / "launched"
    return [sys.executable, "-c", MARKER_CHILD, str(marker)], marker


def test_extras_over_the_context_limit_fail_at_the_call_not_in_the_child(tmp_path: Path) -> None:
    command, marker = _launched(tmp_path)
    contexts = tmp_path / "contexts"
    contexts.mkdir()
    client = PipesSubprocessClient(context_injector=PipesTempFileContextInjector(dir=str(contexts)))
    with pytest.raises(PipesUsageError) as caught:
        client.run(command=command, extras={"blob": "x" * MAX_DECODED_PARAM_BYTES})
    message = str(caught.value)
    assert message.startswith("the context data (extras included) is ")
    assert f"over the {MAX_DECODED_PARAM_BYTES}-byte limit of the external side (MAX_DECODED_PARAM_BYTES)" in message
    size = int(message.split(" is ")[1].split(" bytes")[0])
    assert size > MAX_DECODED_PARAM_BYTES
    assert not marker.exists()  # nothing was launched
    assert list(contexts.iterdir()) == []  # no context file was written


def test_extras_just_under_the_limit_still_run(tmp_path: Path) -> None:
    # The check is the external side's own limit, not a tighter one: a context just under it is read there.
    probe = "from pipes_ext import open_pipes\nwith open_pipes() as p: p.log.info(str(len(p.extras['blob'])))"
    overhead = 1024  # the context's other keys, with room to spare
    blob = "x" * (MAX_DECODED_PARAM_BYTES - overhead)
    invocation = PipesSubprocessClient(forward_stdio=False).run(command=[sys.executable, "-c", probe],
                                                                extras={"blob": blob})
    assert [log.message for log in invocation.get_logs()] == [str(len(blob))]


def test_pipes_run_extras_file_over_the_context_limit_is_exit_2(tmp_path: Path) -> None:
    # An --extras-file within its own cap whose context (extras plus the rest) is over the limit.
    command, marker = _launched(tmp_path)
    extras = tmp_path / "extras.json"
    body = json.dumps({"blob": ""})
    extras.write_text(json.dumps({"blob": "x" * (MAX_DECODED_PARAM_BYTES - len(body))}))
    assert extras.stat().st_size == MAX_DECODED_PARAM_BYTES
    proc = _pipes(["--extras-file", str(extras), "--", *command], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("pipes: error: the context data (extras included) is "), proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(("env", "expected"), [
    ({"A": "x\0y"}, "holds a NUL byte"),
    ({"A\0B": "x"}, "holds a NUL byte"),
    ({"A": 1}, "must be str, got str = int"),
    ({1: "x"}, "must be str, got int = str"),
    ({"A=B": "x"}, "is not a valid environment variable name"),
    ({"": "x"}, "is not a valid environment variable name"),
])
@pytest.mark.parametrize("where", ["run", "client", "async"])
def test_an_environment_the_system_cannot_carry_is_a_usage_error(tmp_path: Path, env: dict[Any, Any],
                                                                  expected: str, where: str) -> None:
    command, marker = _launched(tmp_path)
    with pytest.raises(PipesUsageError, match=f"^env: .*{expected}"):
        if where == "run":
            PipesSubprocessClient().run(command=command, env=env)
        elif where == "client":
            PipesSubprocessClient(env=env).run(command=command)
        else:
            asyncio.run(PipesAsyncSubprocessClient().run(command=command, env=env))
    assert not marker.exists()
