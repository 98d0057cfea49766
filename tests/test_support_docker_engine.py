"""The private Docker daemon and the locally built image the Docker tests run on (tests/support/engines_docker.py)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from pipes_core import PipesEnvContextInjector, PipesFileMessageReader, PipesRunContext, open_pipes_session
from tests.support.engines_docker import (
    IMAGE_CODE_DIR,
    SKIPS,
    DockerDaemon,
    DockerEngine,
    _children,
    _start_time,
    unavailable_reason,
)

pytestmark = pytest.mark.docker


def test_the_daemon_is_private_and_leaves_the_network_alone(docker_engine: DockerEngine) -> None:
    root = docker_engine.daemon.root
    info = docker_engine.client.info()
    assert docker_engine.host == f"unix://{root}/docker.sock"
    assert info["DockerRootDir"] == str(root / "data")
    assert (root / "key.json").is_file()  # not /etc/docker/key.json, shared by every daemon here
    assert docker_engine.client.api.inspect_network("none")["Driver"] == "null"
    assert not [n for n in docker_engine.client.networks.list() if n.name == "bridge"]  # --bridge=none


def test_a_container_runs_the_machines_python_without_network(docker_engine: DockerEngine) -> None:
    script = "import sys, ssl, json, pipes_ext, dagster_pipes; print(sys.version); print(open('/proc/net/dev').read())"
    out = docker_engine.client.containers.run(docker_engine.images.test, ["python3", "-c", script],
                                              network_mode="none", remove=True).decode()
    assert out.splitlines()[0] == sys.version.splitlines()[0]
    interfaces = [line.split(":")[0].strip() for line in out.splitlines()[3:] if ":" in line]
    assert interfaces == ["lo"]


def test_a_pipes_round_trip_through_a_bind_mounted_messages_file(docker_engine: DockerEngine, tmp_path: Path) -> None:
    (tmp_path / "child.py").write_text(textwrap.dedent("""
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.log.info("hello from a container")
            pipes.report_custom_message({"rows": pipes.get_extra("rows")})
            pipes.report_asset_materialization(metadata={"n": 1})
    """))
    messages = tmp_path / "messages.jsonl"
    with open_pipes_session(PipesRunContext(asset_keys=["a"]), PipesEnvContextInjector(),
                            PipesFileMessageReader(messages), extras={"rows": 3}) as session:
        docker_engine.client.containers.run(
            docker_engine.images.test, ["python3", str(tmp_path / "child.py")], network_mode="none", remove=True,
            environment=session.get_bootstrap_env_vars(),
            volumes={str(tmp_path): {"bind": str(tmp_path), "mode": "rw"}})
    assert session.opened and session.closed and not session.protocol_issues
    assert session.get_custom_messages() == [{"rows": 3}]
    assert [log.message for log in session.get_logs()] == ["hello from a container"]
    assert len(session.get_results()) == 1


def test_the_image_keeps_pipes_ext_on_its_python_path(docker_engine: DockerEngine) -> None:
    out = docker_engine.client.containers.run(
        docker_engine.images.test, ["python3", "-c", "import pipes_ext; print(pipes_ext.__file__)"],
        network_mode="none", remove=True).decode().strip()
    assert out.startswith(f"{IMAGE_CODE_DIR}/pipes_ext/")


def test_a_stopped_daemon_leaves_no_process_mount_or_file_behind() -> None:
    reason = unavailable_reason()
    if reason is not None:
        SKIPS.skip(f"Docker unavailable: {reason}")
    daemon = DockerDaemon.start()
    pid = daemon.process.pid
    family = _children(pid)
    assert family  # dockerd started its own containerd
    daemon.stop()
    assert daemon.process.returncode is not None
    assert [p for p in family if Path(f"/proc/{p}").exists() and _start_time(p) is not None] == []
    assert not daemon.root.exists()
