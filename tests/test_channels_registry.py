"""The channel registry, and the command line choosing channels through it: `pipes run --message-reader stdio`
and `--bootstrap cli` end to end with real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipes_core import (
    PipesContextInjector,
    PipesEnvContextInjector,
    PipesFileContextInjector,
    PipesFileMessageReader,
    PipesMessageReader,
    PipesStdioMessageReader,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesUsageError,
)
from pipes_core.channels.registry import (
    BLOB_CHANNELS,
    CONTEXT_CHANNELS,
    MESSAGE_CHANNELS,
    PipesChannelOptions,
    blob_channel_class,
    make_context_injector,
    make_message_reader,
)
from tests.conftest import REPO_ROOT, cli_json_events

PIPES = [sys.executable, "-m", "pipes_core"]


# ---------------------------------------------------------------------------------------------- registry


def test_every_local_channel_builds_its_class(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    assert type(make_context_injector("env")) is PipesEnvContextInjector
    assert type(make_context_injector("tempfile")) is PipesTempFileContextInjector
    injector = make_context_injector("file", PipesChannelOptions(path=path))
    assert type(injector) is PipesFileContextInjector
    reader = make_message_reader("file", PipesChannelOptions(path=path, include_stdio_in_messages=True,
                                                             max_line_bytes=500))
    assert type(reader) is PipesFileMessageReader and reader.include_stdio_in_messages
    assert reader.max_line_bytes == 500
    assert type(make_message_reader("tempfile")) is PipesTempFileMessageReader
    stdio = make_message_reader("stdio", PipesChannelOptions(max_line_bytes=1000, stdio_drain_timeout_seconds=2))
    assert isinstance(stdio, PipesStdioMessageReader)
    assert stdio.max_line_bytes == 1000 and stdio.drain_timeout_seconds == 2


@pytest.mark.parametrize("channel", BLOB_CHANNELS)
def test_blob_channels_build_their_backend_with_the_given_client(channel: str) -> None:
    client = object()  # constructors do no I/O: any object stands for the client here
    options = PipesChannelOptions(bucket="b", client=client, interval=0.25, include_stdio_in_messages=True)
    injector = make_context_injector(channel, options)
    reader = make_message_reader(channel, options)
    assert channel in type(injector).__module__ and channel in type(reader).__module__
    assert injector.client is client and reader.client is client  # type: ignore[attr-defined]
    assert reader.interval == 0.25  # type: ignore[attr-defined]
    assert reader.include_stdio_in_messages  # type: ignore[attr-defined]


@pytest.mark.parametrize("make,name,options,match", [
    (make_context_injector, "smoke", None, "unknown context channel 'smoke'; known: env, file, tempfile"),
    (make_message_reader, "env", None, "unknown message channel 'env'; known: file, tempfile, stdio"),
    (make_context_injector, "file", None, "the file context injector needs a path"),
    (make_message_reader, "file", PipesChannelOptions(path=""), "the file message reader needs a path"),
    (make_context_injector, "s3", None, "the s3 context injector needs a bucket"),
    (make_message_reader, "azure", None, "the azure message reader needs a bucket"),
])
def test_bad_channel_requests(make: Callable[..., object], name: str, options: PipesChannelOptions | None,
                              match: str) -> None:
    with pytest.raises(PipesUsageError, match=match):
        make(name, options)


def test_the_registry_names() -> None:
    assert list(CONTEXT_CHANNELS) == ["env", "file", "tempfile", "s3", "gcs", "azure"]
    assert list(MESSAGE_CHANNELS) == ["file", "tempfile", "stdio", "s3", "gcs", "azure"]


# ---------------------------------------------------------------------------------------------- command line


CHILD = """
import sys
from pipes_ext import PipesCliArgsParamsLoader, PipesEnvVarParamsLoader, open_pipes

cli = "--dagster-pipes-context" in sys.argv
with open_pipes(params_loader=PipesCliArgsParamsLoader() if cli else PipesEnvVarParamsLoader()) as pipes:
    print("child says hello", flush=True)
    pipes.report_asset_materialization(asset_key="a")
    pipes.report_custom_message({"cli": cli})
    print("child says bye", flush=True)
"""


def run_pipes(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PIPES, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


@pytest.mark.parametrize("bootstrap", ["env", "cli"])
def test_pipes_run_stdio_json(write_script: Callable[..., Path], bootstrap: str) -> None:
    script = write_script(CHILD)
    done = run_pipes("run", "--json", "--asset", "a", "--message-reader", "stdio", "--bootstrap", bootstrap,
                     "--", sys.executable, str(script))
    assert done.returncode == 0, done.stderr
    events = cli_json_events(done.stdout)  # stdout is JSON only
    kinds = [e["event"] for e in events]
    assert kinds[0] == "opened" and "materialization" in kinds and kinds[-1] == "summary"
    assert {"event": "custom_message", "payload": {"cli": bootstrap == "cli"}} in events
    assert events[-1]["closed"] is True and events[-1]["error"] is None
    # The child's own lines were passed through, to stderr in --json mode; the messages were not.
    assert "child says hello\nchild says bye\n" in done.stderr
    assert "__dagster_pipes_version" not in done.stderr


def test_pipes_run_stdio_human(write_script: Callable[..., Path]) -> None:
    script = write_script(CHILD)
    done = run_pipes("run", "--message-reader", "stdio", "--bootstrap", "cli", "--", sys.executable, str(script))
    assert done.returncode == 0, done.stderr
    assert "child says hello" in done.stdout and "materialized" in done.stdout
    assert "__dagster_pipes_version" not in done.stdout


def test_pipes_run_include_stdio_with_the_stdio_reader_is_refused(write_script: Callable[..., Path]) -> None:
    script = write_script(CHILD)
    done = run_pipes("run", "--message-reader", "stdio", "--include-stdio", "--", sys.executable, str(script))
    assert done.returncode == 2
    assert done.stderr.startswith("pipes: error: --include-stdio does not apply to --message-reader stdio")
    assert "Traceback" not in done.stderr


def test_pipes_run_bad_bootstrap() -> None:
    done = run_pipes("run", "--bootstrap", "smoke", "--", "true")
    assert done.returncode == 2 and "--bootstrap" in done.stderr and "Traceback" not in done.stderr


def test_blob_channels_are_a_registry_by_name() -> None:
    # every entry names a module and two classes that exist there, of the right kind
    for name in BLOB_CHANNELS:
        injector, reader = blob_channel_class(name, "context"), blob_channel_class(name, "messages")
        assert issubclass(injector, PipesContextInjector) and issubclass(reader, PipesMessageReader)
        assert injector.__module__ == reader.__module__ == f"pipes_core.{name}"


@pytest.mark.parametrize("name", ["minio", "AZURE", ""])
def test_an_unknown_blob_channel_is_an_error_listing_the_known_ones(name: str) -> None:
    # before the registry, any name that was not s3 or gcs got the Azure classes
    with pytest.raises(PipesUsageError, match=rf"^unknown blob channel {name!r}; known: s3, gcs, azure$"):
        blob_channel_class(name, "context")
