"""The PipesClient lifecycle through its hook interface, with a launcher written the way a remote one is:
output as an iterator of byte chunks (a "log stream"), the default poll-based wait, its own exit description,
and escalation steps it records. Real child processes; no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesClient,
    PipesClientCompletedInvocation,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExecutionError,
    PipesExitStatus,
    PipesLaunchedProcess,
    PipesLaunchRequest,
    PipesRunContext,
    PipesStdioMessageReader,
    PipesTempFileMessageReader,
    PipesTimeoutError,
    PipesTransportError,
    PipesUsageError,
)
from tests.support.helpers import PYTHON


class LogStreamProcess(PipesLaunchedProcess):
    """A local child seen as a remote engine sees it: merged output as a chunk iterator, polled status."""

    poll_interval_seconds = 0.02

    def __init__(self, argv: list[str], env: dict[str, str], *, oom: bool = False,
                 fail_stream_after: int | None = None) -> None:
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.description = f"the test job {os.path.basename(argv[1])!r}"
        self.steps: list[str] = []
        self.closed = 0
        self.oom = oom
        self.stdout = self._chunks(fail_stream_after)

    def _chunks(self, fail_after: int | None) -> Iterator[bytes]:
        assert self.process.stdout is not None
        sent = 0
        while True:
            chunk = self.process.stdout.read1(4096)
            if not chunk:
                return
            sent += 1
            if fail_after is not None and sent > fail_after:
                raise ConnectionResetError("the log stream was cut")
            yield chunk

    def poll(self) -> bool:
        return self.process.poll() is not None

    def exit_status(self) -> PipesExitStatus:
        if self.oom:
            return PipesExitStatus(137, killed=True, description="was OOM-killed")
        return PipesExitStatus.from_returncode(self.process.returncode)

    def _signal(self, name: str, sig: int) -> None:
        self.steps.append(name)
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def interrupt(self) -> None:
        self._signal("interrupt", signal.SIGINT)

    def terminate(self) -> None:
        self._signal("terminate", signal.SIGTERM)

    def kill(self) -> None:
        self._signal("kill", signal.SIGKILL)

    def close(self) -> None:
        self.closed += 1
        if self.process.stdout is not None:
            self.process.stdout.close()


class LogStreamClient(PipesClient):
    """A launcher on the base: only ``run`` and ``launch``; channels are the base's defaults (env + stdio)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.launched: list[LogStreamProcess] = []
        self.requests: list[PipesLaunchRequest] = []

    def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,  # type: ignore[override]
            script: str, args: tuple[str, ...] = (), oom: bool = False, fail_stream_after: int | None = None,
            **options: Any) -> PipesClientCompletedInvocation:
        def launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
            self.requests.append(request)
            env = {**os.environ, **request.bootstrap_env}
            process = LogStreamProcess([PYTHON, script, *args, *request.bootstrap_args], env, oom=oom,
                                       fail_stream_after=fail_stream_after)
            self.launched.append(process)
            return process

        return self.run_launcher(launch, context=context, extras=extras, **options)


CHILD = """
import sys, time
from pipes_ext import PipesCliArgsParamsLoader, PipesEnvVarParamsLoader, open_pipes

mode = sys.argv[1]
if mode == "hang":  # before anything is reported: an interruption may come as soon as messages arrive
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
loader = PipesCliArgsParamsLoader() if "--dagster-pipes-context" in sys.argv else PipesEnvVarParamsLoader()
with open_pipes(params_loader=loader) as pipes:
    print("hello from the job")
    pipes.report_asset_materialization(asset_key="a", metadata={"n": 1})
    for i in range(50):
        pipes.report_custom_message(i)
    print("goodbye", flush=True)
    if mode == "fail":
        raise ValueError("bad rows")
    if mode == "exit3":
        sys.exit(3)
    if mode == "hang":
        while True:
            time.sleep(0.05)
"""


@pytest.fixture
def child(write_script: Callable[..., Path]) -> str:
    return str(write_script(CHILD, "job.py"))


def test_defaults_env_and_stdio_and_output_forwarded(child: str) -> None:
    out = bytearray()
    client = LogStreamClient()
    invocation = client.run(context=PipesRunContext(asset_keys=["a"]), script=child, args=("ok",),
                            stdout=out.extend)
    request = client.requests[0]
    assert set(request.bootstrap_env) == {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"}
    assert request.bootstrap_args == [] and request.stdout_needed
    assert request.stderr_needed  # forwarded to ours through the lifecycle, which keeps its last line
    assert isinstance(invocation.session.message_reader, PipesStdioMessageReader)
    assert invocation.exit_code == 0 and invocation.session.closed
    assert [r.asset_key for r in invocation.get_results()] == ["a"]
    assert invocation.get_custom_messages() == list(range(50))
    assert bytes(out) == b"hello from the job\ngoodbye\n"
    assert "goodbye" in invocation.output_tail
    assert client.launched[0].closed == 1


def test_cli_bootstrap(child: str) -> None:
    client = LogStreamClient(bootstrap="cli")
    invocation = client.run(script=child, args=("ok",), stdout=lambda data: None)
    request = client.requests[0]
    assert request.bootstrap_env == {}
    assert request.bootstrap_args[0::2] == ["--dagster-pipes-context", "--dagster-pipes-messages"]
    assert invocation.session.closed and invocation.get_custom_messages() == list(range(50))


def test_user_channels_override_the_defaults(child: str) -> None:
    invocation = LogStreamClient(message_reader=PipesTempFileMessageReader()).run(
        script=child, args=("ok",), stdout=lambda data: None)
    assert invocation.get_custom_messages() == list(range(50))
    assert "file" in invocation.session.message_reader.describe() or "tempfile" in \
        invocation.session.message_reader.describe()


def test_a_remote_failure_carries_the_invocation(child: str) -> None:
    with pytest.raises(PipesExecutionError, match=r"the test job 'job\.py' failed with exit code 1 with ValueError: "
                                                  r"bad rows") as info:
        LogStreamClient().run(script=child, args=("fail",), stdout=lambda data: None)
    invocation = info.value.invocation
    assert isinstance(invocation, PipesClientCompletedInvocation)
    assert invocation.get_custom_messages() == list(range(50))
    assert info.value.remote_exception is not None and info.value.remote_exception.name == "ValueError"
    assert "goodbye" in info.value.output_tail


def test_a_non_zero_exit_carries_the_invocation(child: str) -> None:
    with pytest.raises(PipesExecutionError, match="failed with exit code 3") as info:
        LogStreamClient().run(script=child, args=("exit3",), stdout=lambda data: None)
    assert info.value.exit_code == 3
    assert info.value.invocation.get_custom_messages() == list(range(50))


def test_the_launcher_describes_how_it_ended(child: str) -> None:
    with pytest.raises(PipesExecutionError, match=r"the test job 'job\.py' was OOM-killed") as info:
        LogStreamClient().run(script=child, args=("ok",), oom=True, stdout=lambda data: None)
    assert info.value.invocation.exit_status == PipesExitStatus(137, killed=True, description="was OOM-killed")


def test_timeout_escalates_through_the_hooks_and_keeps_what_arrived(child: str) -> None:
    client = LogStreamClient(termination_timeout_seconds=0.2)
    with pytest.raises(PipesTimeoutError, match="ran past its timeout of 2 s") as info:
        client.run(script=child, args=("hang",), timeout_seconds=2, stdout=lambda data: None)
    process = client.launched[0]
    # The child ignores SIGINT and SIGTERM: every step was needed, then kill() once more to sweep leftovers.
    assert process.steps == ["interrupt", "terminate", "kill", "kill"]
    assert process.closed == 1
    invocation = info.value.invocation
    assert invocation.get_custom_messages() == list(range(50))
    assert invocation.exit_status is not None and invocation.exit_status.killed
    assert invocation.missing_closed


def test_a_cut_log_stream_is_a_transport_error_carrying_the_invocation(child: str) -> None:
    with pytest.raises(PipesTransportError, match="the log stream was cut") as info:
        LogStreamClient().run(script=child, args=("ok",), fail_stream_after=1, stdout=lambda data: None)
    invocation = info.value.invocation
    assert isinstance(invocation, PipesClientCompletedInvocation)
    assert invocation.exit_code == 0
    # What arrived in the first chunk was handled; nothing after the cut was invented.
    assert invocation.session.opened
    assert len(invocation.get_custom_messages()) < 50


def test_protocol_issues_carry_the_invocation(write_script: Callable[..., Path]) -> None:
    script = write_script("""
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message("kept")
            print('{"__dagster_pipes_version": "0.1", "method": "no_such_method", "params": {}}', flush=True)
    """, "bad.py")
    with pytest.raises(PipesExecutionError, match="broke the Pipes protocol 1 time") as info:
        LogStreamClient().run(script=str(script), stdout=lambda data: None)
    assert info.value.invocation.get_custom_messages() == ["kept"]
    invocation = LogStreamClient(strict=False).run(script=str(script), stdout=lambda data: None)
    assert invocation.session.issue_count == 1


def test_a_launch_failure_carries_the_invocation() -> None:
    class Broken(PipesClient):
        def run(self, *, context: PipesRunContext | None = None,  # type: ignore[override]
                extras: Mapping[str, Any] | None = None) -> PipesClientCompletedInvocation:
            def launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
                raise PipesExecutionError("cannot start the job: the engine said no")
            return self.run_launcher(launch, context=context, extras=extras)

    with pytest.raises(PipesExecutionError, match="the engine said no") as info:
        Broken().run()
    assert info.value.invocation.exit_status is None
    assert not info.value.invocation.session.opened


def test_a_stdio_reader_needs_the_stream(child: str) -> None:
    """A launcher that provides no stdout while the stdio reader needs it: a usage error, nothing left running."""
    class NoOutput(LogStreamClient):
        def run(self, **kwargs: Any) -> PipesClientCompletedInvocation:  # type: ignore[override]
            def launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
                process = LogStreamProcess([PYTHON, child, "hang"], {**os.environ, **request.bootstrap_env})
                process.stdout = None
                self.launched.append(process)
                return process
            return self.run_launcher(launch)

    client = NoOutput()
    with pytest.raises(PipesUsageError, match="provides no such stream"):
        client.run()
    process = client.launched[0]
    assert process.poll() and process.process.returncode == -signal.SIGKILL
    assert process.closed == 1


def test_keyboard_interrupt_is_reraised_with_the_invocation(child: str) -> None:
    """A real SIGINT to this (main) thread while the job runs: the job is stopped, the channel drained, and the
    KeyboardInterrupt carries the invocation."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals reach the main thread only")
    client = LogStreamClient(termination_timeout_seconds=0.2)
    got: list[PipesEvent] = []
    fired = threading.Event()

    def on_event(event: PipesEvent) -> None:
        got.append(event)
        if isinstance(event, PipesCustomMessageEvent) and event.payload == 49 and not fired.is_set():
            fired.set()
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as info:
        client.run(script=child, args=("hang",), on_event=on_event, stdout=lambda data: None,
                   timeout_seconds=120)
    invocation = info.value.invocation  # type: ignore[attr-defined]
    assert invocation.get_custom_messages() == list(range(50))
    assert client.launched[0].steps[:3] == ["interrupt", "terminate", "kill"]
    assert client.launched[0].poll()


@pytest.mark.parametrize("kwargs,match", [
    ({"bootstrap": "smoke"}, "bootstrap must be"),
    ({"termination_timeout_seconds": float("nan")}, "termination_timeout_seconds"),
    ({"termination_timeout_seconds": -1}, "termination_timeout_seconds"),
])
def test_bad_client_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(PipesUsageError, match=match):
        LogStreamClient(**kwargs)


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_bad_timeouts(child: str, timeout: float) -> None:
    with pytest.raises(PipesUsageError, match="timeout_seconds must be positive"):
        LogStreamClient().run(script=child, timeout_seconds=timeout)


def test_the_abstract_base_cannot_run() -> None:
    with pytest.raises(TypeError):
        PipesClient()  # type: ignore[abstract]
