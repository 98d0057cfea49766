"""PipesSubprocessClient's channel options: the stdio message channel and the CLI-argument bootstrap, in every
combination, with real children; and the errors of a failed run carrying what was received."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipes_core import (
    PipesClientCompletedInvocation,
    PipesEnvContextInjector,
    PipesExecutionError,
    PipesStdioMessageReader,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesTimeoutError,
)
from tests.support.helpers import PYTHON

CHILD = """
import sys, time
from pipes_ext import PipesCliArgsParamsLoader, PipesEnvVarParamsLoader, open_pipes

cli = "--dagster-pipes-context" in sys.argv
with open_pipes(params_loader=PipesCliArgsParamsLoader() if cli else PipesEnvVarParamsLoader()) as pipes:
    print("plain output before")
    pipes.report_custom_message({"cli": cli, "argv": sys.argv[1:2]})
    print("plain output after", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if sys.argv[1] == "fail":
        sys.exit(5)
    if sys.argv[1] == "hang":
        time.sleep(60)
"""


@pytest.fixture
def child(write_script: Callable[..., Path]) -> str:
    return str(write_script(CHILD))


@pytest.mark.parametrize("bootstrap", ["env", "cli"])
@pytest.mark.parametrize("injector", [PipesEnvContextInjector, PipesTempFileContextInjector])
@pytest.mark.parametrize("reader", [PipesStdioMessageReader, PipesTempFileMessageReader])
def test_every_channel_combination(child: str, bootstrap: str, injector: type, reader: type) -> None:
    out = bytearray()
    err = bytearray()
    client = PipesSubprocessClient(context_injector=injector(), message_reader=reader(), bootstrap=bootstrap)
    invocation = client.run(command=[PYTHON, child, "ok"], stdout=out.extend, stderr=err.extend)
    assert invocation.get_custom_messages() == [{"cli": bootstrap == "cli", "argv": ["ok"]}]
    assert invocation.session.closed
    # Messages never show up as output; the child's own output does, whole and in order.
    assert bytes(out) == b"plain output before\nplain output after\n"
    assert bytes(err) == b"to stderr\n"


def test_stdio_with_output_not_forwarded_keeps_a_tail(child: str) -> None:
    client = PipesSubprocessClient(message_reader=PipesStdioMessageReader(), forward_stdio=False)
    with pytest.raises(PipesExecutionError, match="failed with exit code 5") as info:
        client.run(command=[PYTHON, child, "fail"])
    assert "plain output after" in info.value.output_tail and "to stderr" in info.value.output_tail
    invocation = info.value.invocation
    assert isinstance(invocation, PipesClientCompletedInvocation)
    assert invocation.get_custom_messages() == [{"cli": False, "argv": ["fail"]}]


def test_stdio_output_goes_to_the_readers_output_by_default(child: str) -> None:
    seen = bytearray()
    client = PipesSubprocessClient(message_reader=PipesStdioMessageReader(output=seen.extend))
    client.run(command=[PYTHON, child, "ok"], stderr=lambda data: None)
    assert bytes(seen) == b"plain output before\nplain output after\n"


def test_a_timeout_carries_what_arrived(child: str) -> None:
    client = PipesSubprocessClient(message_reader=PipesStdioMessageReader(), bootstrap="cli",
                                   termination_timeout_seconds=1)
    with pytest.raises(PipesTimeoutError) as info:
        client.run(command=[PYTHON, child, "hang"], timeout_seconds=3, stdout=lambda data: None,
                   stderr=lambda data: None)
    assert info.value.invocation.get_custom_messages() == [{"cli": True, "argv": ["hang"]}]
    assert info.value.exit_code is not None and info.value.exit_code != 0


def test_a_command_that_cannot_start_carries_an_invocation_with_no_exit_status() -> None:
    with pytest.raises(PipesExecutionError, match="cannot start") as info:
        PipesSubprocessClient(message_reader=PipesStdioMessageReader()).run(
            command=["/nonexistent/pipes-test-binary"])
    assert info.value.exit_code is None
    assert info.value.invocation.exit_status is None
