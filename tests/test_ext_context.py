"""The external side (``pipes_ext``): params loaders, context loaders, message writers and PipesContext.

Process behaviour (flushing, SIGKILL, buffering of stdio) is tested with real child processes; everything
else goes through the public test doubles (in-memory writer, direct context loader, mapping params loader).
"""

from __future__ import annotations

import io
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import unittest.mock
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import pipes_ext
from pipes_ext import (
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    LOCAL_RUN_ID,
    DagsterPipesError,
    DagsterPipesWarning,
    PipesBufferedStreamMessageWriterChannel,
    PipesCliArgsParamsLoader,
    PipesContext,
    PipesDefaultContextLoader,
    PipesDefaultMessageWriter,
    PipesDirectContextLoader,
    PipesEnvVarParamsLoader,
    PipesError,
    PipesFileMessageWriterChannel,
    PipesInMemoryMessageWriter,
    PipesMappingParamsLoader,
    PipesProtocolError,
    PipesStreamMessageWriterChannel,
    PipesTransportError,
    PipesUsageError,
    PipesWarning,
    decode_param,
    encode_param,
    open_dagster_pipes,
    open_pipes,
)
from pipes_ext._protocol import empty_context_data, parse_message_line
from tests.support.helpers import REPO_ROOT

CHILD_TIMEOUT = 30.0

# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------

SINGLE_ASSET_DATA: dict[str, Any] = {
    "asset_keys": ["my/asset"],
    "code_version_by_asset_key": {"my/asset": "v7"},
    "provenance_by_asset_key": {
        "my/asset": {"code_version": "v6", "input_data_versions": {"up": "dv1"}, "is_user_provided": True}
    },
    "partition_key": "2024-01-01",
    "partition_key_range": {"start": "2024-01-01", "end": "2024-01-01"},
    "partition_time_window": {"start": "2024-01-01T00:00:00+00:00", "end": "2024-01-02T00:00:00+00:00"},
    "run_id": "run-123",
    "job_name": "my_job",
    "retry_number": 2,
    "extras": {"answer": 42, "nested": {"a": [1, 2]}, "nothing": None},
}

TWO_ASSET_DATA: dict[str, Any] = {
    "asset_keys": ["a/b", "c"],
    "code_version_by_asset_key": {"a/b": "1", "c": None},
    "provenance_by_asset_key": {"a/b": None, "c": None},
    "run_id": "run-2",
}

OP_DATA: dict[str, Any] = {"run_id": "run-op", "job_name": None}


class ExtrasInMemoryWriter(PipesInMemoryMessageWriter):
    """The in-memory double with opened extras, as a real writer subclass may provide."""

    def get_opened_extras(self) -> dict[str, Any]:
        return {"writer": "in-memory", "n": 1}


def bootstrap_mapping(context_params: Any = None, messages_params: Any = None) -> dict[str, str]:
    return {
        DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_param({} if context_params is None else context_params),
        DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_param({} if messages_params is None else messages_params),
    }


def open_in_memory(
    data: dict[str, Any] | None = None, writer: PipesInMemoryMessageWriter | None = None
) -> tuple[PipesContext, PipesInMemoryMessageWriter]:
    writer = writer or PipesInMemoryMessageWriter()
    context = open_pipes(
        context_loader=PipesDirectContextLoader(SINGLE_ASSET_DATA if data is None else data),
        message_writer=writer,
        params_loader=PipesMappingParamsLoader(bootstrap_mapping()),
    )
    return context, writer


@contextmanager
def in_memory(data: dict[str, Any] | None = None) -> Iterator[tuple[PipesContext, PipesInMemoryMessageWriter]]:
    context, writer = open_in_memory(data)
    with context:
        yield context, writer


def methods(writer: PipesInMemoryMessageWriter) -> list[str]:
    return [m["method"] for m in writer.messages]


def read_messages(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "last line is incomplete"
    return [parse_message_line(line) for line in text.splitlines()]


def open_file_channel(path: Path, data: dict[str, Any] | None = None) -> PipesContext:
    return open_pipes(
        context_loader=PipesDirectContextLoader(SINGLE_ASSET_DATA if data is None else data),
        params_loader=PipesMappingParamsLoader(bootstrap_mapping({}, {"path": str(path)})),
    )


def child_env(**pipes_params: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)  # the autouse fixture already removed every DAGSTER_PIPES_* variable
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONUNBUFFERED", None)  # stdout must be block-buffered under a pipe, as in production
    if "context" in pipes_params:
        env[DAGSTER_PIPES_CONTEXT_ENV_VAR] = encode_param(pipes_params["context"])
    if "messages" in pipes_params:
        env[DAGSTER_PIPES_MESSAGES_ENV_VAR] = encode_param(pipes_params["messages"])
    return env


def read_lines_while_running(proc: subprocess.Popen[bytes], count: int, timeout: float) -> list[bytes]:
    """Read ``count`` complete lines from the child's stdout pipe, failing after ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while buffer.count(b"\n") < count:
            if not selector.select(timeout):
                pytest.fail(f"no complete line within {timeout}s; got so far: {buffer!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"child closed stdout early; got: {buffer!r}")
            buffer += chunk
    return buffer.splitlines()[:count]


# ----------------------------------------------------------------------------------------------------------
# Names and aliases
# ----------------------------------------------------------------------------------------------------------


def test_dagster_names_are_aliases() -> None:
    assert open_dagster_pipes is open_pipes
    assert DagsterPipesError is PipesError
    assert DagsterPipesWarning is PipesWarning
    assert issubclass(PipesUsageError, DagsterPipesError)
    assert issubclass(PipesProtocolError, DagsterPipesError)
    assert issubclass(PipesTransportError, DagsterPipesError)
    for name in pipes_ext.__all__:
        assert hasattr(pipes_ext, name), name


# ----------------------------------------------------------------------------------------------------------
# Params loaders
# ----------------------------------------------------------------------------------------------------------


def test_env_loader_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = PipesEnvVarParamsLoader()
    assert not loader.is_pipes_process()
    assert not loader.is_dagster_pipes_process()
    # The default loader reads the live environment, not a snapshot taken at construction.
    monkeypatch.setenv(DAGSTER_PIPES_CONTEXT_ENV_VAR, encode_param({"data": {"run_id": "x"}}))
    monkeypatch.setenv(DAGSTER_PIPES_MESSAGES_ENV_VAR, encode_param({"stdio": "stderr"}))
    assert loader.is_pipes_process()
    assert loader.is_dagster_pipes_process()
    assert loader.load_context_params() == {"data": {"run_id": "x"}}
    assert loader.load_messages_params() == {"stdio": "stderr"}


def test_env_loader_with_explicit_environ() -> None:
    loader = PipesEnvVarParamsLoader(bootstrap_mapping({"path": "/c"}, {"path": "/m"}))
    assert loader.is_pipes_process()
    assert loader.load_context_params() == {"path": "/c"}
    assert loader.load_messages_params() == {"path": "/m"}


def test_env_loader_missing_messages_param_is_a_clear_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DAGSTER_PIPES_CONTEXT_ENV_VAR, encode_param({"data": {}}))
    loader = PipesEnvVarParamsLoader()
    assert loader.is_pipes_process()
    with pytest.raises(PipesProtocolError, match=f"environment variable {DAGSTER_PIPES_MESSAGES_ENV_VAR}.*not set"):
        loader.load_messages_params()
    # open_pipes surfaces the same error rather than a KeyError or a local context.
    with pytest.raises(PipesProtocolError, match=DAGSTER_PIPES_MESSAGES_ENV_VAR):
        open_pipes()


def test_undecodable_param_names_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DAGSTER_PIPES_CONTEXT_ENV_VAR, "not base64 !!")
    with pytest.raises(PipesProtocolError, match=f"environment variable {DAGSTER_PIPES_CONTEXT_ENV_VAR}"):
        PipesEnvVarParamsLoader().load_context_params()


def _encoded_with_padding() -> tuple[dict[str, Any], str]:
    for size in range(64):
        params = {"path": "p" * size}
        encoded = encode_param(params)
        if encoded.endswith("="):
            return params, encoded
    raise AssertionError("no padded encoding found")


def test_cli_loader_accepts_both_flag_forms_among_other_args() -> None:
    context_params, context_encoded = _encoded_with_padding()  # "=" inside the value must survive
    messages_params = {"stdio": "stdout"}
    argv = [
        "--verbose",
        "positional",
        "--dagster-pipes-context",
        context_encoded,
        "--other=1",
        f"--dagster-pipes-messages={encode_param(messages_params)}",
        "trailing",
    ]
    loader = PipesCliArgsParamsLoader(argv)
    assert loader.is_pipes_process()
    assert loader.load_context_params() == context_params
    assert loader.load_messages_params() == messages_params


def test_cli_loader_detects_equals_form_alone() -> None:
    # The reference misses this form; argparse users write it routinely.
    loader = PipesCliArgsParamsLoader([f"--dagster-pipes-context={encode_param({'data': {}})}"])
    assert loader.is_pipes_process()
    with pytest.raises(PipesProtocolError, match="command-line argument --dagster-pipes-messages"):
        loader.load_messages_params()


def test_cli_loader_without_flags_is_not_a_pipes_process() -> None:
    loader = PipesCliArgsParamsLoader(["--dagster-pipes-contextual", "x", "--dagster-pipes-messages-x=1"])
    assert not loader.is_pipes_process()
    with pytest.raises(PipesProtocolError, match="--dagster-pipes-context"):
        loader.load_context_params()


def test_cli_loader_flag_without_value_raises() -> None:
    loader = PipesCliArgsParamsLoader(["a", "--dagster-pipes-context"])
    with pytest.raises(PipesProtocolError, match="no value"):
        loader.load_context_params()


def test_cli_loader_defaults_to_sys_argv_at_load_time(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = PipesCliArgsParamsLoader()
    monkeypatch.setattr(sys, "argv", ["prog"])
    assert not loader.is_pipes_process()
    monkeypatch.setattr(
        sys, "argv", ["prog", "--dagster-pipes-context", encode_param({"data": {"run_id": "cli"}})]
    )
    assert loader.is_pipes_process()
    assert loader.load_context_params() == {"data": {"run_id": "cli"}}


def test_cli_loader_in_a_real_child_process(write_script: Callable[..., Path], tmp_path: Path) -> None:
    messages = tmp_path / "messages.jsonl"
    script = write_script(
        """
        import sys
        from pipes_ext import PipesCliArgsParamsLoader, open_pipes

        with open_pipes(params_loader=PipesCliArgsParamsLoader()) as pipes:
            pipes.report_custom_message({"run_id": pipes.run_id, "argv": sys.argv[1:3]})
        """
    )
    args = [
        "--mode",
        "fast",
        f"--dagster-pipes-context={encode_param({'data': {'run_id': 'from-cli'}})}",
        "--dagster-pipes-messages",
        encode_param({"path": str(messages)}),
    ]
    result = subprocess.run(
        [sys.executable, str(script), *args], env=child_env(), capture_output=True, timeout=CHILD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr.decode()
    msgs = read_messages(messages)
    assert [m["method"] for m in msgs] == ["opened", "report_custom_message", "closed"]
    assert msgs[1]["params"]["payload"] == {"run_id": "from-cli", "argv": ["--mode", "fast"]}


def test_mapping_loader() -> None:
    loader = PipesMappingParamsLoader(bootstrap_mapping({"data": {"run_id": "m"}}, {"path": "/tmp/x"}))
    assert loader.is_pipes_process()
    assert loader.load_context_params() == {"data": {"run_id": "m"}}
    assert loader.load_messages_params() == {"path": "/tmp/x"}
    assert decode_param(encode_param({"k": [1]})) == {"k": [1]}


def test_mapping_loader_detection_and_missing_messages() -> None:
    assert not PipesMappingParamsLoader({}).is_pipes_process()
    assert not PipesMappingParamsLoader({DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_param({})}).is_pipes_process()
    loader = PipesMappingParamsLoader({DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_param({"data": {}})})
    assert loader.is_pipes_process()
    with pytest.raises(PipesProtocolError, match=f'mapping key "{DAGSTER_PIPES_MESSAGES_ENV_VAR}".*not set'):
        loader.load_messages_params()


def test_mapping_loader_rejects_non_string_value() -> None:
    loader = PipesMappingParamsLoader({DAGSTER_PIPES_CONTEXT_ENV_VAR: {"data": {}}})
    with pytest.raises(PipesProtocolError, match="must be a string"):
        loader.load_context_params()


# ----------------------------------------------------------------------------------------------------------
# Context loaders
# ----------------------------------------------------------------------------------------------------------


def test_context_loader_path(tmp_path: Path) -> None:
    path = tmp_path / "context.json"
    path.write_text(json.dumps(SINGLE_ASSET_DATA), encoding="utf-8")
    assert PipesDefaultContextLoader().load_context({"path": str(path)}) == SINGLE_ASSET_DATA


def test_context_loader_data_fills_missing_keys() -> None:
    data = PipesDefaultContextLoader().load_context({"data": {"run_id": "inline", "asset_keys": ["x"]}})
    expected = empty_context_data("inline")
    expected["asset_keys"] = ["x"]
    assert data == expected


def test_context_loader_path_wins_over_data(tmp_path: Path) -> None:
    path = tmp_path / "context.json"
    path.write_text(json.dumps({"run_id": "from-path"}), encoding="utf-8")
    data = PipesDefaultContextLoader().load_context({"path": str(path), "data": {"run_id": "from-data"}})
    assert data["run_id"] == "from-path"


def test_context_loader_neither_path_nor_data() -> None:
    with pytest.raises(PipesProtocolError, match='neither "path" nor "data"'):
        PipesDefaultContextLoader().load_context({"bucket": "b"})


def test_context_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(PipesTransportError, match="cannot read the context file"):
        PipesDefaultContextLoader().load_context({"path": str(tmp_path / "missing.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(PipesProtocolError, match="not JSON"):
        PipesDefaultContextLoader().load_context({"path": str(bad)})
    with pytest.raises(PipesProtocolError, match="run_id"):
        PipesDefaultContextLoader().load_context({"data": {"run_id": 5}})


def test_open_pipes_with_env_and_context_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    context_file = tmp_path / "context.json"
    context_file.write_text(json.dumps(SINGLE_ASSET_DATA), encoding="utf-8")
    messages = tmp_path / "messages.jsonl"
    monkeypatch.setenv(DAGSTER_PIPES_CONTEXT_ENV_VAR, encode_param({"path": str(context_file)}))
    monkeypatch.setenv(DAGSTER_PIPES_MESSAGES_ENV_VAR, encode_param({"path": str(messages)}))
    with open_pipes() as pipes:
        assert not pipes.is_local
        assert pipes.context_data == SINGLE_ASSET_DATA
        pipes.report_asset_materialization(metadata={"rows": 3})
    msgs = read_messages(messages)
    assert [m["method"] for m in msgs] == ["opened", "report_asset_materialization", "closed"]
    assert msgs[1]["params"] == {
        "asset_key": "my/asset",
        "data_version": None,
        "metadata": {"rows": {"raw_value": 3, "type": "__infer__"}},
    }


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------


def test_default_writer_rejects_unknown_or_bad_params(tmp_path: Path) -> None:
    writer = PipesDefaultMessageWriter()
    with pytest.raises(PipesProtocolError, match="no channel"):
        writer.open({"bucket": "b"})
    with pytest.raises(PipesProtocolError, match='"stdio"'):
        writer.open({"stdio": "stdlog"})
    with pytest.raises(PipesProtocolError, match='"path"'):
        writer.open({"path": 3})
    with pytest.raises(PipesTransportError, match="cannot open the messages file"):
        writer.open({"path": str(tmp_path / "no" / "such" / "dir" / "m.jsonl")})


def test_file_channel_appends_one_complete_line_per_message(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    path.write_text("pre-existing\n", encoding="utf-8")
    with open_file_channel(path) as pipes:
        pipes.log.info("héllo\nwith newline")
        pipes.report_custom_message({"unicode": "☃", "n": 1})
        pipes.report_asset_check("chk", passed=True)
    raw = path.read_bytes()
    assert raw.startswith(b"pre-existing\n"), "the file was truncated instead of appended to"
    assert raw.endswith(b"\n")
    lines = raw.decode("utf-8").splitlines()[1:]
    assert len(lines) == 5
    msgs = [parse_message_line(line) for line in lines]
    assert [m["method"] for m in msgs] == ["opened", "log", "report_custom_message", "report_asset_check", "closed"]
    assert msgs[1]["params"] == {"message": "héllo\nwith newline", "level": "INFO"}
    assert msgs[2]["params"]["payload"] == {"unicode": "☃", "n": 1}
    # Byte for byte what json.dumps writes for the envelope (the reference's format).
    for line in lines:
        assert line == json.dumps(json.loads(line))


def test_file_channel_message_is_on_disk_when_the_call_returns(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    pipes = open_file_channel(path)
    with pipes:
        assert [m["method"] for m in read_messages(path)] == ["opened"]
        for i in range(20):
            pipes.report_custom_message(i)
            msgs = read_messages(path)  # a fresh reader, right after the call
            assert len(msgs) == i + 2
            assert msgs[-1]["params"] == {"payload": i}
        pipes.log.debug("last")
        assert read_messages(path)[-1]["params"] == {"message": "last", "level": "DEBUG"}
    assert read_messages(path)[-1]["method"] == "closed"


def test_file_channel_concurrent_threads_never_break_lines(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    threads_count, per_thread = 8, 2000
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def work(pipes: PipesContext, thread: int) -> None:
        try:
            barrier.wait()
            for seq in range(per_thread):
                # Mostly small lines, some well past PIPE_BUF and typical write chunk sizes.
                pad = "x" * (100_000 if seq % 250 == 0 else seq % 300)
                pipes.report_custom_message({"thread": thread, "seq": seq, "pad": pad})
        except BaseException as exc:
            errors.append(exc)

    with open_file_channel(path) as pipes:
        workers = [threading.Thread(target=work, args=(pipes, t)) for t in range(threads_count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert errors == []
    msgs = read_messages(path)  # every line must parse
    assert len(msgs) == threads_count * per_thread + 2
    assert msgs[0]["method"] == "opened"
    assert msgs[-1]["method"] == "closed"
    seen: dict[int, list[int]] = {t: [] for t in range(threads_count)}
    for msg in msgs[1:-1]:
        payload = msg["params"]["payload"]
        expected_pad = 100_000 if payload["seq"] % 250 == 0 else payload["seq"] % 300
        assert len(payload["pad"]) == expected_pad
        seen[payload["thread"]].append(payload["seq"])
    for thread, seqs in seen.items():
        assert seqs == list(range(per_thread)), f"thread {thread} lost or reordered messages"


def test_file_channel_survives_sigkill_right_after_report(
    write_script: Callable[..., Path], tmp_path: Path
) -> None:
    messages = tmp_path / "messages.jsonl"
    script = write_script(
        """
        import os
        import signal
        from pipes_ext import open_pipes

        pipes = open_pipes()
        for i in range(300):
            pipes.report_custom_message({"i": i})
        pipes.report_asset_materialization(metadata={"final": True})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = child_env(context={"data": {"asset_keys": ["k"], "run_id": "r"}}, messages={"path": str(messages)})
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    msgs = read_messages(messages)
    assert [m["method"] for m in msgs] == [
        "opened",
        *["report_custom_message"] * 300,
        "report_asset_materialization",
    ]
    assert [m["params"]["payload"]["i"] for m in msgs[1:301]] == list(range(300))
    assert msgs[-1]["params"]["asset_key"] == "k"


def test_stdio_writer_flushes_each_message(write_script: Callable[..., Path]) -> None:
    # The child cannot exit before we close its stdin, so the lines must arrive while it is running:
    # with stdout block-buffered under a pipe, only a flush per message gets them out.
    script = write_script(
        """
        import sys
        from pipes_ext import open_pipes

        with open_pipes() as pipes:
            pipes.report_custom_message("first")
            sys.stdin.read()
            pipes.report_custom_message("after stdin closed")
        """
    )
    env = child_env(context={"data": {"run_id": "r"}}, messages={"stdio": "stdout"})
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines = read_lines_while_running(proc, 2, timeout=CHILD_TIMEOUT)
        assert proc.poll() is None, "the child exited before we read its lines"
        msgs = [parse_message_line(line) for line in lines]
        assert [m["method"] for m in msgs] == ["opened", "report_custom_message"]
        assert msgs[1]["params"] == {"payload": "first"}
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.stdout is not None
        rest = proc.stdout.read()
        assert proc.wait(timeout=CHILD_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    after = [parse_message_line(line) for line in rest.splitlines()]
    assert [m["method"] for m in after] == ["report_custom_message", "closed"]


def test_stdio_writer_channel_flushes_in_process() -> None:
    class CountingStream(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            super().flush()

    stream = CountingStream()
    channel = PipesStreamMessageWriterChannel(stream)
    channel.write_line('{"a": 1}')
    assert stream.getvalue() == '{"a": 1}\n'
    assert stream.flushes == 1
    channel.write_line('{"b": 2}')
    assert stream.getvalue() == '{"a": 1}\n{"b": 2}\n'
    assert stream.flushes == 2


def test_buffered_stdio_writes_everything_at_close_only(capsys: pytest.CaptureFixture[str]) -> None:
    pipes = open_pipes(
        context_loader=PipesDirectContextLoader(SINGLE_ASSET_DATA),
        params_loader=PipesMappingParamsLoader(bootstrap_mapping({}, {"buffered_stdio": "stdout"})),
    )
    with pipes:
        pipes.report_custom_message(1)
        pipes.log.warning("w")
        assert capsys.readouterr().out == ""
    out = capsys.readouterr().out
    msgs = [parse_message_line(line) for line in out.splitlines()]
    assert [m["method"] for m in msgs] == ["opened", "report_custom_message", "log", "closed"]
    assert out.endswith("\n")


def test_buffered_stdio_channel_close_is_idempotent() -> None:
    stream = io.StringIO()
    channel = PipesBufferedStreamMessageWriterChannel(stream)
    channel.write_line("one")
    channel.write_line("two")
    assert stream.getvalue() == ""
    channel.close()
    assert stream.getvalue() == "one\ntwo\n"
    channel.close()
    assert stream.getvalue() == "one\ntwo\n"


def test_buffered_stdio_in_a_child_comes_after_everything_else(write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        import sys
        from pipes_ext import open_pipes

        with open_pipes() as pipes:
            pipes.report_custom_message("m")
            print("PLAIN OUTPUT", flush=True)
        print("AFTER CLOSE", flush=True)
        """
    )
    env = child_env(context={"data": {"run_id": "r"}}, messages={"buffered_stdio": "stdout"})
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "PLAIN OUTPUT"
    assert [parse_message_line(line)["method"] for line in lines[1:4]] == [
        "opened",
        "report_custom_message",
        "closed",
    ]
    assert lines[4:] == ["AFTER CLOSE"]


def test_file_channel_close_is_idempotent_and_rejects_later_writes(tmp_path: Path) -> None:
    channel = PipesFileMessageWriterChannel.open_path(str(tmp_path / "m.jsonl"))
    channel.write_line("x")
    channel.close()
    channel.close()
    with pytest.raises(PipesTransportError, match="closed"):
        channel.write_line("y")
    assert (tmp_path / "m.jsonl").read_text() == "x\n"


# ----------------------------------------------------------------------------------------------------------
# PipesContext: properties
# ----------------------------------------------------------------------------------------------------------


def test_properties_single_asset_partitioned_step() -> None:
    with in_memory(SINGLE_ASSET_DATA) as (pipes, _):
        assert pipes.is_asset_step is True
        assert pipes.asset_key == "my/asset"
        assert pipes.asset_keys == ["my/asset"]
        assert pipes.provenance == SINGLE_ASSET_DATA["provenance_by_asset_key"]["my/asset"]
        assert pipes.provenance_by_asset_key == SINGLE_ASSET_DATA["provenance_by_asset_key"]
        assert pipes.code_version == "v7"
        assert pipes.code_version_by_asset_key == {"my/asset": "v7"}
        assert pipes.is_partition_step is True
        assert pipes.partition_key == "2024-01-01"
        assert pipes.partition_key_range == {"start": "2024-01-01", "end": "2024-01-01"}
        assert pipes.partition_time_window == SINGLE_ASSET_DATA["partition_time_window"]
        assert pipes.run_id == "run-123"
        assert pipes.job_name == "my_job"
        assert pipes.retry_number == 2
        assert pipes.extras == SINGLE_ASSET_DATA["extras"]
        assert pipes.get_extra("answer") == 42
        assert pipes.get_extra("nested") == {"a": [1, 2]}
        assert pipes.get_extra("nothing") is None
        assert pipes.is_local is False
        assert pipes.is_closed is False


def test_properties_return_copies() -> None:
    with in_memory(SINGLE_ASSET_DATA) as (pipes, _):
        pipes.asset_keys.append("intruder")
        pipes.extras["answer"] = 0
        pipes.context_data["run_id"] = "changed"
        assert pipes.asset_keys == ["my/asset"]
        assert pipes.get_extra("answer") == 42
        assert pipes.run_id == "run-123"


def test_get_extra_missing_names_known_extras() -> None:
    with in_memory(SINGLE_ASSET_DATA) as (pipes, _), pytest.raises(PipesUsageError) as info:
        pipes.get_extra("missing")
    assert "'missing'" in str(info.value)
    assert "answer" in str(info.value)


def test_properties_several_assets() -> None:
    with in_memory(TWO_ASSET_DATA) as (pipes, _):
        assert pipes.is_asset_step is True
        assert pipes.asset_keys == ["a/b", "c"]
        assert pipes.code_version_by_asset_key == {"a/b": "1", "c": None}
        assert pipes.provenance_by_asset_key == {"a/b": None, "c": None}
        for name in ("asset_key", "provenance", "code_version"):
            with pytest.raises(PipesUsageError, match="2 assets"):
                getattr(pipes, name)


def test_properties_op_step_not_partitioned() -> None:
    with in_memory(OP_DATA) as (pipes, _):
        assert pipes.is_asset_step is False
        assert pipes.is_partition_step is False
        for name in (
            "asset_key",
            "asset_keys",
            "provenance",
            "provenance_by_asset_key",
            "code_version",
            "code_version_by_asset_key",
            "partition_key",
            "partition_key_range",
            "partition_time_window",
        ):
            with pytest.raises(PipesUsageError):
                getattr(pipes, name)
        assert pipes.run_id == "run-op"
        assert pipes.job_name is None
        assert pipes.retry_number == 0
        assert pipes.extras == {}


def test_partition_range_without_single_key_or_window() -> None:
    data = {"run_id": "r", "partition_key_range": {"start": "a", "end": "c"}}
    with in_memory(data) as (pipes, _):
        assert pipes.is_partition_step is True
        assert pipes.partition_key_range == {"start": "a", "end": "c"}
        assert pipes.partition_time_window is None
        with pytest.raises(PipesUsageError, match="single partition"):
            _ = pipes.partition_key


# ----------------------------------------------------------------------------------------------------------
# PipesContext: lifecycle
# ----------------------------------------------------------------------------------------------------------


def test_opened_carries_writer_extras_and_closed_is_sent_on_close() -> None:
    writer = ExtrasInMemoryWriter()
    pipes, _ = open_in_memory(writer=writer)
    assert writer.messages == [
        {"__dagster_pipes_version": "0.1", "method": "opened", "params": {"extras": {"writer": "in-memory", "n": 1}}}
    ]
    with pipes:
        pass
    assert writer.messages[-1] == {"__dagster_pipes_version": "0.1", "method": "closed", "params": {}}
    assert pipes.is_closed is True
    for line in writer.channel.lines:
        parse_message_line(line)


def test_exception_is_sent_in_closed_with_cause_and_context_and_reraised() -> None:
    pipes, writer = open_in_memory()
    with pytest.raises(ValueError, match="outer") as info, pipes:
        try:
            try:
                raise KeyError("root")
            except KeyError:
                raise RuntimeError("middle") from None
        except RuntimeError as middle:
            raise ValueError("outer") from middle
    assert info.value.__cause__ is not None
    closed = writer.messages[-1]
    assert closed["method"] == "closed"
    exc = closed["params"]["exception"]
    assert exc["name"] == "ValueError"
    assert "outer" in exc["message"]
    assert exc["stack"] and all(isinstance(line, str) for line in exc["stack"])
    assert exc["context"] is None  # suppressed by "raise ... from"
    cause = exc["cause"]
    assert cause["name"] == "RuntimeError"
    assert "middle" in cause["message"]
    assert cause["cause"] is None
    assert cause["context"] is None  # "from None" suppresses it


def test_exception_context_chain_is_sent() -> None:
    pipes, writer = open_in_memory()
    with pytest.raises(TypeError), pipes:
        try:
            raise KeyError("first")
        except KeyError:
            raise TypeError("while handling")  # noqa: B904
    exc = writer.messages[-1]["params"]["exception"]
    assert exc["name"] == "TypeError"
    assert exc["cause"] is None
    assert exc["context"]["name"] == "KeyError"
    assert "first" in exc["context"]["message"]
    parse_message_line(writer.channel.lines[-1])


@pytest.mark.parametrize("code", [0, None])
def test_system_exit_success_is_not_an_exception(code: int | None) -> None:
    pipes, writer = open_in_memory()
    with pytest.raises(SystemExit), pipes:
        sys.exit(code)
    assert writer.messages[-1] == {"__dagster_pipes_version": "0.1", "method": "closed", "params": {}}


@pytest.mark.parametrize("code", [1, "fatal"])
def test_system_exit_failure_is_an_exception(code: int | str) -> None:
    pipes, writer = open_in_memory()
    with pytest.raises(SystemExit), pipes:
        sys.exit(code)
    assert writer.messages[-1]["params"]["exception"]["name"] == "SystemExit"


def test_close_is_idempotent() -> None:
    pipes, writer = open_in_memory()
    pipes.close()
    pipes.close()
    with pipes:
        pass
    assert methods(writer) == ["opened", "closed"]


def test_writes_after_close_raise_and_write_nothing() -> None:
    pipes, writer = open_in_memory(SINGLE_ASSET_DATA)
    logger = pipes.log
    pipes.close()
    calls: list[Callable[[], object]] = [
        lambda: pipes.report_asset_materialization(),
        lambda: pipes.report_asset_check("c", passed=True),
        lambda: pipes.report_custom_message({}),
        lambda: pipes.log_external_stream("stdout", "x"),
        lambda: logger.info("late"),
        lambda: pipes.log.error("late"),
    ]
    for call in calls:
        with pytest.raises(PipesUsageError, match="closed"):
            call()
    assert methods(writer) == ["opened", "closed"]


def test_close_closes_the_file_channel(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    pipes = open_file_channel(path)
    fd_count_open = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else None
    pipes.close()
    if fd_count_open is not None:
        assert len(os.listdir("/proc/self/fd")) == fd_count_open - 1
    assert [m["method"] for m in read_messages(path)] == ["opened", "closed"]


# ----------------------------------------------------------------------------------------------------------
# PipesContext: logger
# ----------------------------------------------------------------------------------------------------------


def test_logger_sends_every_standard_level() -> None:
    with in_memory() as (pipes, writer):
        pipes.log.debug("d %s", 1)
        pipes.log.info("i")
        pipes.log.warning("w")
        pipes.log.error("e")
        pipes.log.critical("c")
    logs = [m["params"] for m in writer.messages if m["method"] == "log"]
    assert logs == [
        {"message": "d 1", "level": "DEBUG"},
        {"message": "i", "level": "INFO"},
        {"message": "w", "level": "WARNING"},
        {"message": "e", "level": "ERROR"},
        {"message": "c", "level": "CRITICAL"},
    ]


@pytest.mark.parametrize(
    ("levelno", "expected"),
    [(5, "DEBUG"), (15, "DEBUG"), (25, "INFO"), (35, "WARNING"), (45, "ERROR"), (55, "CRITICAL")],
)
def test_logger_maps_custom_levels_to_a_standard_name(levelno: int, expected: str) -> None:
    assert logging.getLevelName(levelno) == f"Level {levelno}"  # unregistered: no global state touched
    with in_memory() as (pipes, writer):
        pipes.log.log(levelno, "custom")
    logs = [m for m in writer.messages if m["method"] == "log"]
    assert [m["params"] for m in logs] == [{"message": "custom", "level": expected}]
    parse_message_line(json.dumps(logs[0]))


def test_logger_includes_exc_info() -> None:
    with in_memory() as (pipes, writer):
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            pipes.log.exception("boom")
    params = next(m["params"] for m in writer.messages if m["method"] == "log")
    assert params["level"] == "ERROR"
    assert params["message"].startswith("boom\nTraceback")
    assert "ZeroDivisionError" in params["message"]


def test_logger_is_private_and_does_not_propagate(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG), in_memory() as (pipes, writer):
        logger = pipes.log
        assert logger is pipes.log
        assert logger.propagate is False
        assert logging.getLogger(logger.name) is not logger
        assert all(registered is not logger for registered in logging.root.manager.loggerDict.values())
        logger.warning("only to pipes")
    assert caplog.records == []
    assert capfd.readouterr() == ("", "")
    assert [m["params"]["message"] for m in writer.messages if m["method"] == "log"] == ["only to pipes"]


def test_each_context_has_its_own_logger() -> None:
    with in_memory() as (first, first_writer), in_memory() as (second, second_writer):
        assert first.log is not second.log
        first.log.info("one")
        second.log.info("two")
    assert [m["params"]["message"] for m in first_writer.messages if m["method"] == "log"] == ["one"]
    assert [m["params"]["message"] for m in second_writer.messages if m["method"] == "log"] == ["two"]


# ----------------------------------------------------------------------------------------------------------
# PipesContext: reporting and validation at the call site
# ----------------------------------------------------------------------------------------------------------


def test_report_messages_on_the_wire() -> None:
    with in_memory(TWO_ASSET_DATA) as (pipes, writer):
        pipes.report_asset_materialization(
            metadata={"rows": 42, "ratio": {"raw_value": 1, "type": "float"}, "url": {"raw_value": "u", "type": "url"}},
            data_version="dv",
            asset_key="a/b",
        )
        pipes.report_asset_check("not_null", passed=False, severity="WARN", metadata={"n": 0}, asset_key="c")
        pipes.report_asset_check("default_severity", passed=True, asset_key="c")
        pipes.report_custom_message({"any": ["json", 1, None]})
        pipes.log_external_stream("stderr", "text", extras={"k": 1})
    msgs = writer.messages
    assert msgs[1]["params"] == {
        "asset_key": "a/b",
        "data_version": "dv",
        "metadata": {
            "rows": {"raw_value": 42, "type": "__infer__"},
            "ratio": {"raw_value": 1.0, "type": "float"},
            "url": {"raw_value": "u", "type": "url"},
        },
    }
    assert isinstance(msgs[1]["params"]["metadata"]["ratio"]["raw_value"], float)
    assert msgs[2]["params"] == {
        "asset_key": "c",
        "check_name": "not_null",
        "passed": False,
        "metadata": {"n": {"raw_value": 0, "type": "__infer__"}},
        "severity": "WARN",
    }
    assert msgs[3]["params"]["severity"] == "ERROR"
    assert msgs[3]["params"]["metadata"] is None
    assert msgs[4]["params"] == {"payload": {"any": ["json", 1, None]}}
    assert msgs[5]["params"] == {"stream": "stderr", "text": "text", "extras": {"k": 1}}
    for line in writer.channel.lines:
        parse_message_line(line)


def test_asset_key_defaults_to_the_single_asset_in_scope() -> None:
    with in_memory(SINGLE_ASSET_DATA) as (pipes, writer):
        pipes.report_asset_materialization()
        pipes.report_asset_check("chk", passed=True)
    assert [m["params"]["asset_key"] for m in writer.messages[1:3]] == ["my/asset", "my/asset"]


def test_asset_key_as_components_is_escaped() -> None:
    data = {"asset_keys": ["a/b", "x\\/y/z"], "run_id": "r"}
    with in_memory(data) as (pipes, writer):
        pipes.report_asset_materialization(asset_key=["a", "b"])
        pipes.report_asset_check("chk", passed=True, asset_key=("x/y", "z"))
        with pytest.raises(PipesUsageError, match="not in scope"):
            pipes.report_asset_materialization(asset_key=["a/b"])  # one component "a/b" is "a\/b"
        with pytest.raises(PipesUsageError, match="already materialized"):
            pipes.report_asset_materialization(asset_key="a/b")  # the same key as ["a", "b"]
    assert writer.messages[1]["params"]["asset_key"] == "a/b"
    assert writer.messages[2]["params"]["asset_key"] == "x\\/y/z"
    assert methods(writer) == ["opened", "report_asset_materialization", "report_asset_check", "closed"]


def test_op_step_accepts_an_explicit_asset_key_only() -> None:
    with in_memory(OP_DATA) as (pipes, writer):
        with pytest.raises(PipesUsageError, match="no asset in scope"):
            pipes.report_asset_materialization()
        pipes.report_asset_materialization(asset_key=["any", "key"])
    assert writer.messages[1]["params"]["asset_key"] == "any/key"


class Unserialisable:
    pass


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


INVALID_CALLS: dict[str, Callable[[PipesContext], object]] = {
    "materialize key not in scope": lambda p: p.report_asset_materialization(asset_key="zzz"),
    "materialize no key with several assets": lambda p: p.report_asset_materialization(),
    "materialize key of wrong type": lambda p: p.report_asset_materialization(asset_key=5),  # type: ignore[arg-type]
    "materialize key list of non-strings": lambda p: p.report_asset_materialization(asset_key=["a", 1]),  # type: ignore[list-item]
    "data_version not a string": lambda p: p.report_asset_materialization(asset_key="c", data_version=5),  # type: ignore[arg-type]
    "check key not in scope": lambda p: p.report_asset_check("chk", passed=True, asset_key="zzz"),
    "check no key with several assets": lambda p: p.report_asset_check("chk", passed=True),
    "bad severity lowercase": lambda p: p.report_asset_check("chk", passed=True, severity="warn", asset_key="c"),
    "bad severity INFO": lambda p: p.report_asset_check("chk", passed=True, severity="INFO", asset_key="c"),
    "passed not bool (str)": lambda p: p.report_asset_check("chk", passed="yes", asset_key="c"),  # type: ignore[arg-type]
    "passed not bool (int)": lambda p: p.report_asset_check("chk", passed=1, asset_key="c"),  # type: ignore[arg-type]
    "check_name empty": lambda p: p.report_asset_check("", passed=True, asset_key="c"),
    "check_name not a string": lambda p: p.report_asset_check(5, passed=True, asset_key="c"),  # type: ignore[arg-type]
    "metadata label not a string": lambda p: p.report_asset_materialization(asset_key="c", metadata={1: "x"}),
    "metadata unknown type": lambda p: p.report_asset_materialization(
        asset_key="c", metadata={"x": {"raw_value": 1, "type": "nope"}}
    ),
    "metadata value of wrong shape": lambda p: p.report_asset_materialization(
        asset_key="c", metadata={"x": {"raw_value": "abc", "type": "int"}}
    ),
    "metadata bool given as int": lambda p: p.report_asset_materialization(
        asset_key="c", metadata={"x": {"raw_value": True, "type": "int"}}
    ),
    "metadata partial typed entry": lambda p: p.report_asset_materialization(
        asset_key="c", metadata={"x": {"raw_value": 1}}
    ),
    "metadata plain value not JSON": lambda p: p.report_asset_materialization(
        asset_key="c", metadata={"x": {1, 2}}
    ),
    "metadata nested value not JSON": lambda p: p.report_asset_materialization(
        asset_key="c", metadata={"x": {"deep": Unserialisable()}}
    ),
    "check metadata of wrong shape": lambda p: p.report_asset_check(
        "chk", passed=True, asset_key="c", metadata={"t": {"raw_value": {"rows": []}, "type": "table"}}
    ),
    "custom payload not JSON": lambda p: p.report_custom_message(Unserialisable()),
    "custom payload set": lambda p: p.report_custom_message({1, 2}),
    "custom payload circular": lambda p: p.report_custom_message(_circular()),
    "custom payload non-string dict key": lambda p: p.report_custom_message({(1, 2): "x"}),
    "external stream unknown": lambda p: p.log_external_stream("stdlog", "x"),
    "external stream text not str": lambda p: p.log_external_stream("stdout", b"x"),  # type: ignore[arg-type]
    "external stream extras not JSON": lambda p: p.log_external_stream("stdout", "x", extras={"o": object()}),
}


@pytest.mark.parametrize("name", list(INVALID_CALLS))
def test_invalid_call_raises_writes_nothing_and_context_stays_usable(name: str) -> None:
    with in_memory(TWO_ASSET_DATA) as (pipes, writer):
        before = list(writer.channel.lines)
        with pytest.raises(PipesUsageError):
            INVALID_CALLS[name](pipes)
        assert writer.channel.lines == before, "a rejected call wrote something"
        pipes.report_asset_materialization(asset_key="c", metadata={"ok": True})
        pipes.report_asset_check("chk", passed=True, asset_key="c")
    assert methods(writer) == ["opened", "report_asset_materialization", "report_asset_check", "closed"]
    assert writer.messages[1]["params"]["asset_key"] == "c"


def test_duplicate_materialization_raises_and_other_assets_still_work() -> None:
    with in_memory(TWO_ASSET_DATA) as (pipes, writer):
        pipes.report_asset_materialization(asset_key="c")
        with pytest.raises(PipesUsageError, match="already materialized"):
            pipes.report_asset_materialization(asset_key="c", data_version="2")
        pipes.report_asset_materialization(asset_key="a/b")
        pipes.report_asset_check("after", passed=True, asset_key="c")  # checks may follow
    assert [m["params"].get("asset_key") for m in writer.messages[1:4]] == ["c", "a/b", "c"]
    assert len(writer.messages) == 5


def test_rejected_materialization_can_be_retried() -> None:
    # A materialization rejected for its payload does not count as done.
    with in_memory(SINGLE_ASSET_DATA) as (pipes, writer):
        with pytest.raises(PipesUsageError):
            pipes.report_asset_materialization(metadata={"x": Unserialisable()})
        pipes.report_asset_materialization(metadata={"x": "fine"})
    assert methods(writer) == ["opened", "report_asset_materialization", "closed"]


# ----------------------------------------------------------------------------------------------------------
# No singleton trap
# ----------------------------------------------------------------------------------------------------------


def test_open_close_open_again_gives_new_context_with_new_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A warm serverless process handles two invocations with different params.
    first_file, second_file = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    monkeypatch.setenv(
        DAGSTER_PIPES_CONTEXT_ENV_VAR, encode_param({"data": {"run_id": "run-1", "asset_keys": ["k"]}})
    )
    monkeypatch.setenv(DAGSTER_PIPES_MESSAGES_ENV_VAR, encode_param({"path": str(first_file)}))
    with open_pipes() as first:
        assert PipesContext.get() is first
        first.report_asset_materialization()
    with pytest.raises(PipesUsageError):
        PipesContext.get()

    monkeypatch.setenv(
        DAGSTER_PIPES_CONTEXT_ENV_VAR,
        encode_param({"data": {"run_id": "run-2", "asset_keys": ["k"], "extras": {"n": 2}}}),
    )
    monkeypatch.setenv(DAGSTER_PIPES_MESSAGES_ENV_VAR, encode_param({"path": str(second_file)}))
    with open_pipes() as second:
        assert second is not first
        assert second.is_closed is False
        assert second.run_id == "run-2"
        assert second.get_extra("n") == 2
        assert PipesContext.get() is second
        second.report_asset_materialization()  # the same asset again: a new run, not a duplicate
    assert first.run_id == "run-1"
    assert [m["method"] for m in read_messages(first_file)] == ["opened", "report_asset_materialization", "closed"]
    second_msgs = read_messages(second_file)
    assert [m["method"] for m in second_msgs] == ["opened", "report_asset_materialization", "closed"]
    with pytest.raises(PipesUsageError, match="closed"):
        first.report_custom_message("late")
    assert len(read_messages(first_file)) == 3


def test_get_returns_the_open_context_and_raises_after_close() -> None:
    assert not PipesContext.is_initialized()
    with pytest.raises(PipesUsageError, match="no Pipes context is open"):
        PipesContext.get()
    outer, _ = open_in_memory()
    assert PipesContext.is_initialized()
    assert PipesContext.get() is outer
    inner, _ = open_in_memory()
    assert PipesContext.get() is inner
    inner.close()
    assert PipesContext.get() is outer
    outer.close()
    assert not PipesContext.is_initialized()
    with pytest.raises(PipesUsageError):
        PipesContext.get()


# ----------------------------------------------------------------------------------------------------------
# Local context outside an orchestrated run
# ----------------------------------------------------------------------------------------------------------


def test_local_context_outside_a_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.warns(PipesWarning) as record:
        pipes = open_pipes()
    assert len(record) == 1
    assert "not launched by a Pipes orchestrator" in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller
    assert type(pipes) is PipesContext
    assert not isinstance(pipes, unittest.mock.Base)
    with pipes:
        assert pipes.is_local is True
        assert PipesContext.get() is pipes
        assert pipes.context_data == empty_context_data(LOCAL_RUN_ID)
        assert pipes.run_id == LOCAL_RUN_ID
        assert pipes.is_asset_step is False
        assert pipes.is_partition_step is False
        assert pipes.extras == {}
        with pytest.raises(AttributeError):
            _ = pipes.not_an_attribute  # type: ignore[attr-defined]
        with pytest.raises(PipesUsageError):
            _ = pipes.asset_key
        with pytest.raises(PipesUsageError):
            pipes.get_extra("x")
        # Methods work and validate like a real context.
        pipes.report_asset_materialization(asset_key="local/asset", metadata={"rows": 1})
        pipes.report_asset_check("chk", passed=True, asset_key="local/asset")
        pipes.report_custom_message({"x": 1})
        pipes.log.info("hello")
        pipes.log_external_stream("stdout", "text")
        with pytest.raises(PipesUsageError, match="severity"):
            pipes.report_asset_check("chk", passed=True, severity="LOW", asset_key="local/asset")
        with pytest.raises(PipesUsageError, match="already materialized"):
            pipes.report_asset_materialization(asset_key="local/asset")
        with pytest.raises(PipesUsageError, match="no asset"):
            pipes.report_asset_materialization()
        with pytest.raises(PipesUsageError):
            pipes.report_custom_message(object())
    assert pipes.is_closed
    with pytest.raises(PipesUsageError, match="closed"):
        pipes.report_custom_message(1)
    assert capfd.readouterr() == ("", "")
    assert list(tmp_path.iterdir()) == []


def test_local_context_via_open_dagster_pipes_in_a_child(write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        import warnings
        from pipes_ext import PipesWarning, open_dagster_pipes

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with open_dagster_pipes() as pipes:
                pipes.report_custom_message("nowhere")
                pipes.log.error("nowhere either")
        assert [w.category for w in caught] == [PipesWarning], caught
        assert pipes.is_local
        """
    )
    result = subprocess.run(
        [sys.executable, str(script)], env=child_env(), capture_output=True, timeout=CHILD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    assert result.stderr == b""
