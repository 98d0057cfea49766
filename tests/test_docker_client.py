"""PipesDockerClient against the private Docker daemon (tests/support/engines_docker.py): channels, container options,
every failure named, termination, floods. Containers always run with ``network="none"``."""

from __future__ import annotations

import io
import json
import os
import signal
import textwrap
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesExecutionError,
    PipesInterruptedError,
    PipesOpenedEvent,
    PipesRunContext,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesTimeoutError,
    PipesUsageError,
)
from pipes_core.docker import RUN_ID_LABEL, PipesDockerClient, describe_docker_host
from tests.support.engines_docker import DockerEngine

pytestmark = pytest.mark.docker

OPEN_AND_REPORT = """
    import sys
    from pipes_ext import PipesCliArgsParamsLoader, PipesEnvVarParamsLoader, open_pipes
    cli = "--dagster-pipes-context" in sys.argv
    with open_pipes(params_loader=PipesCliArgsParamsLoader() if cli else PipesEnvVarParamsLoader()) as pipes:
        print("plain stdout line", flush=True)
        print("plain stderr line", file=sys.stderr, flush=True)
        pipes.log.info("hello from a container")
        if pipes.is_asset_step:
            pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows")})
        pipes.report_custom_message({"argv": sys.argv[1:]})
"""


def py(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


class Collect:
    """A ``write(bytes)`` target for forwarded output."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.data += data

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@pytest.fixture
def docker_client(docker_engine: DockerEngine) -> PipesDockerClient:
    return PipesDockerClient(client=docker_engine.client)


def containers_of(engine: DockerEngine, run_id: str) -> list[Any]:
    return list(engine.client.containers.list(all=True, filters={"label": f"{RUN_ID_LABEL}={run_id}"}))


def running(engine: DockerEngine) -> list[Any]:
    return list(engine.client.containers.list())


# ---------------------------------------------------------------------------------------------- channels


def test_round_trip_over_the_containers_stdout(docker_engine: DockerEngine, docker_client: PipesDockerClient) -> None:
    out, err = Collect(), Collect()
    context = PipesRunContext(asset_keys=["a"])
    invocation = docker_client.run(context=context, image=docker_engine.images.test, command=py(OPEN_AND_REPORT),
                                   extras={"rows": 3}, network="none", stdout=out, stderr=err)
    session = invocation.session
    assert session.opened and session.closed and not session.protocol_issues
    assert [log.message for log in session.get_logs()] == ["hello from a container"]
    assert invocation.get_custom_messages() == [{"argv": []}]
    assert invocation.get_materialize_result().metadata["rows"].value == 3  # type: ignore[union-attr]
    assert invocation.exit_code == 0
    # non-message lines are the container's output, each stream to its own place; no message line leaks
    assert out.text == "plain stdout line\n"
    assert err.text == "plain stderr line\n"
    assert invocation.description.startswith("the container ") and docker_engine.images.test in invocation.description
    assert containers_of(docker_engine, context.run_id) == []  # removed after the run


def test_cli_bootstrap_appends_the_arguments_to_the_command(docker_engine: DockerEngine) -> None:
    client = PipesDockerClient(client=docker_engine.client, bootstrap="cli")
    invocation = client.run(image=docker_engine.images.test, command=py(OPEN_AND_REPORT), extras={"rows": 1},
                            network="none", stdout=Collect(), stderr=Collect())
    (message,) = invocation.get_custom_messages()
    assert message["argv"][0::2] == ["--dagster-pipes-context", "--dagster-pipes-messages"]


def test_cli_bootstrap_appends_to_the_images_own_command(docker_engine: DockerEngine, tmp_path: Path) -> None:
    image = "pipes-test-cmd:latest"
    dockerfile = f"FROM {docker_engine.images.test}\nCMD {json.dumps(py(OPEN_AND_REPORT))}\n"
    docker_engine.client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=image, rm=True,
                                      network_mode="none", pull=False)
    client = PipesDockerClient(client=docker_engine.client, bootstrap="cli")
    invocation = client.run(image=image, extras={"rows": 1}, network="none", stdout=Collect(), stderr=Collect())
    assert invocation.get_custom_messages()[0]["argv"][0] == "--dagster-pipes-context"


def test_file_channels_are_bind_mounted_at_the_same_path(docker_engine: DockerEngine) -> None:
    client = PipesDockerClient(client=docker_engine.client, context_injector=PipesTempFileContextInjector(),
                               message_reader=PipesTempFileMessageReader())
    out = Collect()
    invocation = client.run(context=PipesRunContext(asset_keys=["a"]), image=docker_engine.images.test,
                            command=py(OPEN_AND_REPORT), extras={"rows": 2},
                            network="none", stdout=out, stderr=Collect())
    assert invocation.get_custom_messages() == [{"argv": []}]
    assert out.text == "plain stdout line\n"  # stdout is only output now
    assert invocation.get_materialize_result().metadata["rows"].value == 2  # type: ignore[union-attr]


def test_container_options_reach_the_container(docker_engine: DockerEngine, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "input.txt").write_text("from the host")
    code = """
        import os
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message({
                "cwd": os.getcwd(), "uid": os.getuid(), "env": os.environ.get("GREETING"),
                "env2": os.environ.get("FROM_CLIENT"), "input": open("/data/input.txt").read(),
                "memory": open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read().strip()
                    if os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes") else None,
            })
    """
    client = PipesDockerClient(client=docker_engine.client, env={"FROM_CLIENT": "client"})
    invocation = client.run(image=docker_engine.images.test, command=py(code), network="none", working_dir="/tmp",
                            user="1000", env={"GREETING": "hi"}, mem_limit="256m", cpus=0.5,
                            volumes={str(shared): {"bind": "/data", "mode": "ro"}}, stdout=Collect(),
                            stderr=Collect(), container_kwargs={"pids_limit": 64})
    (message,) = invocation.get_custom_messages()
    assert message["cwd"] == "/tmp" and message["uid"] == 1000
    assert message["env"] == "hi" and message["env2"] == "client" and message["input"] == "from the host"
    assert message["memory"] in (None, str(256 * 1024 * 1024))


def test_keep_container_leaves_the_stopped_container(docker_engine: DockerEngine) -> None:
    client = PipesDockerClient(client=docker_engine.client, keep_container=True)
    context = PipesRunContext()
    client.run(context=context, image=docker_engine.images.test, command=py(OPEN_AND_REPORT), network="none",
               stdout=Collect(), stderr=Collect())
    (container,) = containers_of(docker_engine, context.run_id)
    assert container.status == "exited"
    container.remove()


def test_the_default_client_comes_from_docker_host(docker_engine: DockerEngine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    invocation = PipesDockerClient().run(image=docker_engine.images.test, command=py(OPEN_AND_REPORT),
                                         network="none", stdout=Collect(), stderr=Collect())
    assert invocation.session.closed


# ---------------------------------------------------------------------------------------------- failures


def test_daemon_not_reachable_names_docker_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = f"unix://{tmp_path}/no-daemon.sock"
    monkeypatch.setenv("DOCKER_HOST", missing)
    with pytest.raises(PipesExecutionError) as caught:
        PipesDockerClient().run(image="anything", command=["true"])
    assert f"cannot reach the Docker daemon at {missing} (DOCKER_HOST)" in str(caught.value)
    assert caught.value.invocation is not None and not caught.value.invocation.session.opened


def test_daemon_not_reachable_with_a_given_client(tmp_path: Path) -> None:
    import docker

    client = docker.DockerClient(base_url=f"unix://{tmp_path}/gone.sock", version="1.41")
    try:
        with pytest.raises(PipesExecutionError) as caught:
            PipesDockerClient(client=client).run(image="anything", command=["true"])
    finally:
        client.close()
    assert f"cannot reach the Docker daemon at unix://{tmp_path}/gone.sock (the given client)" in str(caught.value)
    assert describe_docker_host(environ={}) == "unix:///var/run/docker.sock (the default; DOCKER_HOST is not set)"


def test_image_not_found_is_named_and_not_pulled(docker_engine: DockerEngine,
                                                 docker_client: PipesDockerClient) -> None:
    with pytest.raises(PipesExecutionError) as caught:
        docker_client.run(image="no-such-image:1", command=["true"], network="none")
    message = str(caught.value)
    assert "the image 'no-such-image:1' is not on the Docker daemon" in message
    assert "no pull was attempted" in message


def test_pull_is_attempted_when_asked_and_its_failure_named(docker_engine: DockerEngine) -> None:
    client = PipesDockerClient(client=docker_engine.client, pull=True)
    with pytest.raises(PipesExecutionError, match=r"pulling the image 'no-such-image:1' on .* failed"):
        client.run(image="no-such-image:1", command=["true"], network="none")


def test_a_command_missing_from_the_image_is_named(docker_engine: DockerEngine) -> None:
    # Without an init process the daemon cannot start the container, and says why.
    context = PipesRunContext()
    client = PipesDockerClient(client=docker_engine.client, init=False)
    with pytest.raises(PipesExecutionError, match=r"cannot start a container of image .*no-such-binary"):
        client.run(context=context, image=docker_engine.images.test, command=["no-such-binary"], network="none")
    assert containers_of(docker_engine, context.run_id) == []
    # With one (the default), the init process reports it and exits 127.
    client = PipesDockerClient(client=docker_engine.client)
    # It crashed before opening the channel: said so, with its last stderr line (the init process's).
    with pytest.raises(PipesExecutionError, match=r"crashed \(exit code 127\) before opening the Pipes channel; "
                                                  r"its last stderr line: .*exec no-such-binary failed"):
        client.run(image=docker_engine.images.test, command=["no-such-binary"], network="none", stderr=Collect())


def test_non_zero_exit_carries_the_remote_exception(docker_engine: DockerEngine,
                                                    docker_client: PipesDockerClient) -> None:
    code = """
        import sys
        from pipes_ext import open_pipes
        try:
            with open_pipes() as pipes:
                raise ValueError("bad rows")
        except ValueError:
            sys.exit(3)
    """
    with pytest.raises(PipesExecutionError) as caught:
        docker_client.run(image=docker_engine.images.test, command=py(code), network="none", stdout=Collect(),
                          stderr=Collect())
    assert caught.value.exit_code == 3
    assert "failed with exit code 3 with ValueError: bad rows" in str(caught.value)
    assert caught.value.remote_exception is not None and caught.value.remote_exception.name == "ValueError"


def test_a_container_that_never_opens(docker_engine: DockerEngine, docker_client: PipesDockerClient) -> None:
    with pytest.raises(PipesExecutionError, match="never opened the Pipes channel"):
        docker_client.run(image=docker_engine.images.test, command=["echo", "not pipes"], network="none",
                          stdout=Collect())
    invocation = docker_client.run(image=docker_engine.images.test, command=["echo", "not pipes"], network="none",
                                   stdout=Collect(), strict=False)
    assert invocation.exit_code == 0 and invocation.output_tail == "not pipes\n"


def test_oom_kill_is_said_as_such(docker_engine: DockerEngine, docker_client: PipesDockerClient) -> None:
    code = """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            hog = [bytearray(1 << 20) for _ in range(512)]
    """
    with pytest.raises(PipesExecutionError) as caught:
        docker_client.run(image=docker_engine.images.test, command=py(code), network="none", mem_limit="32m",
                          container_kwargs={"memswap_limit": "32m"}, stdout=Collect(), stderr=Collect())
    assert "was OOM-killed (memory limit 32 MiB)" in str(caught.value)
    assert caught.value.invocation.exit_status.killed


def test_container_kwargs_we_set_ourselves_are_refused(docker_engine: DockerEngine) -> None:
    for key in ("tty", "auto_remove", "command"):
        with pytest.raises(PipesUsageError, match=f"container_kwargs may not set {key}"):
            PipesDockerClient(client=docker_engine.client, container_kwargs={key: True})
    client = PipesDockerClient(client=docker_engine.client)
    with pytest.raises(PipesUsageError, match="image must be a non-empty string"):
        client.run(image="", command=["true"])
    with pytest.raises(PipesUsageError, match="command is empty"):
        client.run(image="x", command=[])
    with pytest.raises(PipesUsageError, match="cpus must be positive"):
        client.run(image="x", command=["true"], cpus=0)


# ---------------------------------------------------------------------------------------------- termination

SLEEPER = """
    import time
    from pipes_ext import open_pipes
    with open_pipes() as pipes:
        pipes.log.info("sleeping")
        time.sleep(600)
"""

STUBBORN = """
    import signal, time
    from pipes_ext import open_pipes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open_pipes() as pipes:
        pipes.log.info("ignoring signals")
        time.sleep(600)
"""


def on_opened(action: Callable[[], None]) -> Callable[[Any], None]:
    def on_event(event: Any) -> None:
        if isinstance(event, PipesOpenedEvent):
            action()

    return on_event


def test_timeout_interrupts_the_container_and_removes_it(docker_engine: DockerEngine) -> None:
    client = PipesDockerClient(client=docker_engine.client, termination_timeout_seconds=30)
    context = PipesRunContext()
    with pytest.raises(PipesTimeoutError) as caught:
        client.run(context=context, image=docker_engine.images.test, command=py(SLEEPER), network="none",
                   timeout_seconds=3, stdout=Collect(), stderr=Collect())
    invocation = caught.value.invocation
    # SIGINT was enough: Python's KeyboardInterrupt went out through open_pipes as a reported exception
    assert invocation.session.closed and invocation.session.exception.name == "KeyboardInterrupt"
    assert invocation.duration_seconds < 30
    assert containers_of(docker_engine, context.run_id) == []


def test_a_container_ignoring_signals_is_killed_after_the_grace(docker_engine: DockerEngine) -> None:
    client = PipesDockerClient(client=docker_engine.client, termination_timeout_seconds=1)
    context = PipesRunContext()
    with pytest.raises(PipesTimeoutError) as caught:
        client.run(context=context, image=docker_engine.images.test, command=py(STUBBORN), network="none",
                   timeout_seconds=2, stdout=Collect(), stderr=Collect())
    status = caught.value.invocation.exit_status
    assert status.killed and status.exit_code == -signal.SIGKILL
    assert "was killed by SIGKILL (exit status 137)" in status.description
    assert containers_of(docker_engine, context.run_id) == []


def test_without_init_sigterm_still_ends_in_a_kill(docker_engine: DockerEngine) -> None:
    # PID 1 ignores SIGTERM without a handler: the escalation's SIGKILL ends it.
    client = PipesDockerClient(client=docker_engine.client, termination_timeout_seconds=1, init=False)
    with pytest.raises(PipesTimeoutError) as caught:
        client.run(image=docker_engine.images.test, command=["sh", "-c", "sleep 600"], network="none",
                   timeout_seconds=1, strict=False)
    assert caught.value.invocation.exit_status.killed


def test_ctrl_c_stops_the_container_drains_and_reraises(docker_engine: DockerEngine) -> None:
    client = PipesDockerClient(client=docker_engine.client, termination_timeout_seconds=30)
    context = PipesRunContext()
    with pytest.raises(KeyboardInterrupt) as caught:
        client.run(context=context, image=docker_engine.images.test, command=py(SLEEPER), network="none",
                   stdout=Collect(), stderr=Collect(), on_event=on_opened(lambda: os.kill(os.getpid(), signal.SIGINT)))
    invocation = caught.value.invocation  # type: ignore[attr-defined]
    assert invocation.session.opened and invocation.session.closed  # drained up to the container's closed
    assert containers_of(docker_engine, context.run_id) == []
    assert running(docker_engine) == []


def test_sigterm_to_the_orchestrator_stops_the_container(docker_engine: DockerEngine) -> None:
    client = PipesDockerClient(client=docker_engine.client, termination_timeout_seconds=30)
    context = PipesRunContext()
    with pytest.raises(PipesInterruptedError, match="received SIGTERM"):
        client.run(context=context, image=docker_engine.images.test, command=py(SLEEPER), network="none",
                   stdout=Collect(), stderr=Collect(), on_event=on_opened(lambda: os.kill(os.getpid(), signal.SIGTERM)))
    assert containers_of(docker_engine, context.run_id) == []


# ---------------------------------------------------------------------------------------------- floods


def test_a_flood_of_output_neither_deadlocks_nor_grows_memory(docker_engine: DockerEngine) -> None:
    # 64 MiB of output lines and one 8 MiB line without a newline, then messages: all read with flat memory.
    code = """
        import sys
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            line = b"x" * 1023 + b"\\n"
            block = line * 1024
            for _ in range(64):
                sys.stdout.buffer.write(block)
            sys.stderr.buffer.write(b"y" * (8 << 20))
            sys.stdout.flush(); sys.stderr.flush()
            pipes.report_custom_message({"done": True})
    """
    client = PipesDockerClient(client=docker_engine.client, forward_stdio=False)
    tracemalloc.start()
    try:
        invocation = client.run(image=docker_engine.images.test, command=py(code), network="none",
                                timeout_seconds=300)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert invocation.get_custom_messages() == [{"done": True}]
    assert len(invocation.output_tail) <= 2 * 64 * 1024
    assert peak < 32 << 20, f"peak {peak / (1 << 20):.1f} MiB while reading 72 MiB of output"
