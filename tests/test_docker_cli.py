"""``pipes run --docker IMAGE [--docker-arg ARG]... -- COMMAND``: real ``pipes`` processes against the private
Docker daemon (live view, --json, exit codes), and the ``docker run`` flags it understands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pipes_core import PipesUsageError
from pipes_core.docker import RUN_ID_LABEL, run_options_from_docker_args
from tests.conftest import REPO_ROOT, cli_json_events
from tests.support.engines_docker import DockerEngine

PIPES = [sys.executable, "-m", "pipes_core"]

CHILD = """
    import os, sys
    from pipes_ext import open_pipes
    with open_pipes() as pipes:
        print("container stdout line", flush=True)
        pipes.log.info("hello from the container")
        pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows")})
        pipes.report_custom_message({"cwd": os.getcwd(), "uid": os.getuid(), "greeting": os.environ.get("GREETING"),
                                     "data": sorted(os.listdir("/data")) if os.path.isdir("/data") else None})
    sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


def pipes(engine: DockerEngine, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **engine.daemon.env()}
    return subprocess.run([*PIPES, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)


def child(code: str = CHILD) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


def events(stdout: str) -> list[dict[str, object]]:
    return cli_json_events(stdout)


def leftovers(engine: DockerEngine, run_id: str) -> list[object]:
    return list(engine.client.containers.list(all=True, filters={"label": f"{RUN_ID_LABEL}={run_id}"}))


@pytest.mark.docker
def test_human_mode_shows_the_container_live(docker_engine: DockerEngine) -> None:
    run_id = str(uuid.uuid4())
    proc = pipes(docker_engine, "run", "--docker", docker_engine.images.test, "--docker-arg=--network=none",
                 "--run-id", run_id, "--asset", "a", "--extras", '{"rows": 3}', "--", *child())
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0] == "[pipes] opened"
    assert "container stdout line" in lines  # the container's own output, forwarded
    assert any("INFO" in line and "hello from the container" in line for line in lines)
    assert any(line.startswith("[pipes] materialized a") for line in lines)
    assert "status    succeeded" in proc.stdout
    assert leftovers(docker_engine, run_id) == []


@pytest.mark.docker
def test_json_mode_and_docker_run_flags(docker_engine: DockerEngine, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("x")
    tmp_path.chmod(0o755)  # readable by the container user 1000
    proc = pipes(docker_engine, "run", "--json", "--docker", docker_engine.images.test,
                 "--docker-arg=--network=none", f"--docker-arg=-v={tmp_path}:/data:ro", "--docker-arg=-w=/tmp",
                 "--docker-arg=-e=GREETING=hi", "--docker-arg=--user=1000", "--docker-arg=--memory=256m",
                 "--asset", "a", "--extras", '{"rows": 1}', "--", *child())
    assert proc.returncode == 0, proc.stderr
    got = events(proc.stdout)
    assert [e["event"] for e in got] == ["opened", "log", "materialization", "custom_message", "closed", "summary"]
    assert got[3]["payload"] == {"cwd": "/tmp", "uid": 1000, "greeting": "hi", "data": ["in.csv"]}
    assert "container stdout line" in proc.stderr  # the container's stdout goes to stderr with --json


@pytest.mark.docker
def test_exit_codes(docker_engine: DockerEngine) -> None:
    failed = pipes(docker_engine, "run", "--json", "--docker", docker_engine.images.test,
                   "--docker-arg=--network=none", "--docker-arg=-e=EXIT_CODE=3", "--asset", "a", "--extras",
                   '{"rows": 1}', "--", *child())
    assert failed.returncode == 3
    assert "failed with exit code 3" in str(events(failed.stdout)[-1]["error"])
    missing = pipes(docker_engine, "run", "--json", "--docker", "no-such-image:0", "--docker-arg=--network=none",
                    "--", "true")
    assert missing.returncode == 127  # could not be started, as for a missing command
    assert "the image 'no-such-image:0' is not on the Docker daemon" in str(events(missing.stdout)[-1]["error"])
    never_opened = pipes(docker_engine, "run", "--docker", docker_engine.images.test,
                         "--docker-arg=--network=none", "--", "echo", "hi")
    assert never_opened.returncode == 1 and "never opened" in never_opened.stdout


@pytest.mark.docker
def test_timeout_stops_and_removes_the_container(docker_engine: DockerEngine) -> None:
    run_id = str(uuid.uuid4())
    sleeper = "import time\nfrom pipes_ext import open_pipes\nwith open_pipes() as p:\n    time.sleep(600)\n"
    proc = pipes(docker_engine, "run", "--json", "--timeout", "2", "--run-id", run_id, "--docker",
                 docker_engine.images.test, "--docker-arg=--network=none", "--", "python3", "-c", sleeper)
    assert proc.returncode == 124
    assert leftovers(docker_engine, run_id) == []


@pytest.mark.docker
def test_ctrl_c_stops_the_container_and_exits_130(docker_engine: DockerEngine) -> None:
    run_id = str(uuid.uuid4())
    sleeper = ("import time\nfrom pipes_ext import open_pipes\nwith open_pipes() as p:\n"
               "    p.report_custom_message('working')\n    time.sleep(600)\n")
    env = {**os.environ, **docker_engine.daemon.env()}
    proc = subprocess.Popen([*PIPES, "run", "--json", "--run-id", run_id, "--docker", docker_engine.images.test,
                             "--docker-arg=--network=none", "--", "python3", "-c", sleeper], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait for the container's first message, then press Ctrl-C
        if '"working"' in line:
            break
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert json.loads(rest.splitlines()[-1])["error"] == "interrupted"
    assert leftovers(docker_engine, run_id) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--docker-arg=--network=none", "--", "true"], "--docker-arg needs --docker IMAGE"),
        (["run", "--docker", "img", "--slurm", "--", "true"], "--docker and --slurm cannot be combined"),
        (["run", "--docker", "img", "--docker-arg=--privileged", "--", "true"], "unsupported docker run argument"),
        (["run", "--docker", "img", "--docker-arg=-v=nocolon", "--", "true"], "is not SOURCE:TARGET[:MODE]"),
        (["run", "--docker", "img", "--docker-arg=--cpus=lots", "--", "true"], "invalid float value"),
    ],
)
def test_bad_docker_invocations_give_one_line_and_exit_2(args: list[str], expected: str) -> None:
    proc = subprocess.run([*PIPES, *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipes: error:") and expected in lines[0], proc.stderr
    assert proc.stdout == ""


def test_docker_run_flags_become_run_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    options = run_options_from_docker_args([
        "--network=none", "-v", "/a:/b:ro", "--volume=/c:/d", "-e", "A=1", "--env=FROM_HOST", "-w", "/w",
        "-u", "1000:1000", "-m", "64m", "--memory-swap=64m", "--cpus=1.5", "--name", "job", "--label", "k=v",
        "--pids-limit=32", "--read-only", "--entrypoint=/bin/sh", "--init=false", "--pull=missing", "--rm=false",
    ])
    assert options == {
        "network": "none", "volumes": ["/a:/b:ro", "/c:/d"], "env": {"A": "1", "FROM_HOST": "h"},
        "working_dir": "/w", "user": "1000:1000", "mem_limit": "64m", "cpus": 1.5, "name": "job", "pull": True,
        "keep_container": True,
        "container_kwargs": {"memswap_limit": "64m", "labels": {"k": "v"}, "pids_limit": 32, "read_only": True,
                             "entrypoint": "/bin/sh", "init": False},
    }
    assert run_options_from_docker_args([]) == {}
    assert run_options_from_docker_args(["--pull=never", "--rm"]) == {"pull": False, "keep_container": False}
    for bad, reason in ((["--privileged"], "unsupported"), (["-e", "=x"], "has no name"),
                        (["--init=maybe"], "invalid choice"), (["-v", ":/x"], "SOURCE:TARGET")):
        with pytest.raises(PipesUsageError, match=reason):
            run_options_from_docker_args(bad)
