"""Log readers with real writers: child processes writing (and rotating, truncating) files, a child process
uploading a growing log object to a real local S3 server (moto), and the session lifecycle around them."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesBlobStoreLogReader,
    PipesChunkedLogReader,
    PipesFileLogReader,
    PipesLogReader,
    PipesParams,
    PipesRunContext,
    PipesSession,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesUsageError,
    open_pipes_session,
)
from pipes_core.channels.log_readers import LOG_READ_BLOCK_BYTES
from pipes_ext import PipesMappingParamsLoader, open_pipes
from tests.support import servers
from tests.support.helpers import PYTHON


class Collector:
    """A log target: collects the forwarded text; ``wait_for(text)`` returns once it has arrived."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self._condition = threading.Condition()

    def __call__(self, text: str) -> None:
        with self._condition:
            self.pieces.append(text)
            self._condition.notify_all()

    @property
    def text(self) -> str:
        with self._condition:
            return "".join(self.pieces)

    def wait_for(self, expected: str, timeout: float = 30.0) -> None:
        with self._condition:
            if not self._condition.wait_for(lambda: expected in "".join(self.pieces), timeout):
                raise AssertionError(f"{expected!r} was not forwarded; got {''.join(self.pieces)!r}")


def session_with(*log_readers: PipesLogReader, asset_keys: list[str] | None = None,
                 on_event: Callable[[object], None] | None = None) -> Any:
    return open_pipes_session(PipesRunContext(asset_keys=asset_keys), PipesTempFileContextInjector(),
                              PipesTempFileMessageReader(log_readers=list(log_readers)), on_event=on_event)


class Seen:
    """An ``on_event`` callback: ``wait()`` returns once an event of the kind arrived (for ``opened``: the
    session has started its log readers before it calls this)."""

    def __init__(self, kind: str = "PipesOpenedEvent") -> None:
        self.kind = kind
        self.event = threading.Event()

    def __call__(self, event: object) -> None:
        if type(event).__name__ == self.kind:
            self.event.set()

    def wait(self) -> None:
        assert self.event.wait(30), f"{self.kind} never arrived"


def launch(session: PipesSession, script: Path, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PYTHON, str(script), *args], env={**os.environ, **session.get_bootstrap_env_vars()},
                            **popen)


def release(process: subprocess.Popen[bytes]) -> None:
    """Let a child gated on stdin go on."""
    assert process.stdin is not None
    process.stdin.write(b"go\n")
    process.stdin.flush()


def finish(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    assert process.wait(timeout=60) == 0


# ---------------------------------------------------------------------------------------------- lifecycle


class RecordingLogReader(PipesLogReader):
    """Records what the session does to it, and what the session looked like at that moment."""

    def __init__(self, session_ref: list[PipesSession]) -> None:
        self.session_ref = session_ref
        self.calls: list[tuple[str, Any]] = []
        self.running = False
        self.closed_event: threading.Event | None = None

    def start(self, params: PipesParams, is_session_closed: threading.Event) -> None:
        session = self.session_ref[0]
        self.calls.append(("start", (dict(params), session.opened, is_session_closed.is_set())))
        self.closed_event = is_session_closed
        self.running = True

    def stop(self) -> None:
        assert self.closed_event is not None
        self.calls.append(("stop", self.closed_event.is_set()))
        self.running = False

    def is_running(self) -> bool:
        return self.running


def test_log_readers_start_on_opened_and_stop_at_the_end() -> None:
    ref: list[PipesSession] = []
    reader = RecordingLogReader(ref)
    closed = Seen("PipesClosedEvent")
    with session_with(reader, on_event=closed) as session:
        ref.append(session)
        assert reader.calls == []  # not before `opened`
        with open_pipes(params_loader=PipesMappingParamsLoader(session.get_bootstrap_env_vars())) as pipes:
            pipes.report_custom_message("hello")
        closed.wait()
        assert [name for name, _ in reader.calls] == ["start"]
        [(_, (params, was_opened, was_closed))] = reader.calls
        assert params == session.message_reader_params  # the messages params, to derive a location from
        assert was_opened and not was_closed
    assert reader.calls[1:] == [("stop", True)]  # stopped once the session ended, the event set before
    assert not reader.is_running()


def test_log_readers_run_once_when_opened_never_came(tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    collected = Collector()
    with session_with(PipesFileLogReader(log, target=collected)) as session:
        # A "job" that fails before it can open the channel: only its output file tells why.
        with log.open("w") as out:
            completed = subprocess.run(
                [PYTHON, "-c", "import sys; print('cannot import pandas'); sys.exit(3)"],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **session.get_bootstrap_env_vars()},
            )
        assert completed.returncode == 3
    assert not session.opened
    assert collected.text == "cannot import pandas\n"


def test_a_session_that_fails_to_start_does_not_run_log_readers(tmp_path: Path) -> None:
    ref: list[PipesSession] = []
    reader = RecordingLogReader(ref)
    with pytest.raises(Exception, match="context"):
        with open_pipes_session(PipesRunContext(), BrokenInjector(),
                                PipesTempFileMessageReader(log_readers=[reader])):
            raise AssertionError("not reached")  # pragma: no cover
    assert reader.calls == []


class BrokenInjector(PipesTempFileContextInjector):
    def inject_context(self, context_data: dict[str, Any]) -> Any:
        raise OSError("cannot write the context")


# ---------------------------------------------------------------------------------------------- targets and bad input


def test_targets_stdout_stderr_stream_and_callable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "out.log"
    log.write_bytes(b"one\ntwo\n")
    stream = io.StringIO()
    collected = Collector()
    readers = [
        PipesFileLogReader(log),  # default: this process's stdout
        PipesFileLogReader(log, target="stderr"),
        PipesFileLogReader(log, target=stream),
        PipesFileLogReader(log, target=collected),
    ]
    with session_with(*readers) as session:
        with open_pipes(params_loader=PipesMappingParamsLoader(session.get_bootstrap_env_vars())):
            pass
    captured = capsys.readouterr()
    assert captured.out == "one\ntwo\n"
    assert captured.err == "one\ntwo\n"
    assert stream.getvalue() == "one\ntwo\n"
    assert collected.text == "one\ntwo\n"


@pytest.mark.parametrize("target", ["stdin", "", 42, None])
def test_a_bad_target_is_a_usage_error(target: Any) -> None:
    with pytest.raises(PipesUsageError, match="log target"):
        PipesFileLogReader("x", target=target)


@pytest.mark.parametrize("interval", [0, -1])
def test_a_non_positive_interval_is_a_usage_error(interval: float) -> None:
    with pytest.raises(PipesUsageError, match="interval"):
        PipesFileLogReader("x", interval=interval)


def test_a_raising_target_does_not_stop_the_reader(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    log.write_bytes(b"x" * (3 * LOG_READ_BLOCK_BYTES))
    seen: list[int] = []

    def target(text: str) -> None:
        seen.append(len(text))
        raise RuntimeError("the target is broken")

    reader = PipesFileLogReader(log, target=target)
    reader.start({})
    reader.stop()
    assert sum(seen) == 3 * LOG_READ_BLOCK_BYTES  # every piece was offered, despite each one raising


def test_undecodable_bytes_are_replaced_and_split_characters_kept(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    # "é" (two bytes) straddles the first read's boundary; then a byte that is not UTF-8.
    log.write_bytes(b"a" * (LOG_READ_BLOCK_BYTES - 1) + "é".encode() + b"\xff-end")
    collected = Collector()
    reader = PipesFileLogReader(log, target=collected)
    reader.start({})
    reader.stop()
    assert collected.text == "a" * (LOG_READ_BLOCK_BYTES - 1) + "é\ufffd-end"
    assert all(len(piece) <= LOG_READ_BLOCK_BYTES for piece in collected.pieces)  # forwarded in pieces


def test_a_read_error_is_retried_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[int] = []
    gate = threading.Event()

    class Flaky(PipesChunkedLogReader):
        def read_chunk(self, params: PipesParams) -> bytes | None:
            attempts.append(1)
            if len(attempts) < 5:
                raise ConnectionError("store unreachable")
            if len(attempts) == 5:
                gate.set()
                return b"finally\n"
            return None

    collected = Collector()
    reader = Flaky(interval=0.01, target=collected)
    reader.start({})
    assert gate.wait(30)
    reader.stop()
    assert collected.text == "finally\n"
    assert reader.errors == 4
    warnings = [r.getMessage() for r in caplog.records if "store unreachable" in r.getMessage()]
    assert len(warnings) == 1  # the same error is not logged at every poll


def test_path_from_params_and_reuse_across_sessions(tmp_path: Path) -> None:
    collected = Collector()
    # The log's location derived from the messages params (here: next to the messages file).
    reader = PipesFileLogReader(lambda params: params["path"] + ".log", target=collected)
    for n in range(2):
        with session_with(reader) as session:
            Path(session.message_reader_params["path"] + ".log").write_text(f"session {n}\n")
            with open_pipes(params_loader=PipesMappingParamsLoader(session.get_bootstrap_env_vars())):
                pass
    assert collected.text == "session 0\nsession 1\n"


# ---------------------------------------------------------------------------------------------- files, real writers


CHILD_FILE_WRITER = """
import os, sys
from pipes_ext import open_pipes

log, mode = sys.argv[1], sys.argv[2]

def write(path, text, flag="a"):
    with open(path, flag) as f:
        f.write(text)

with open_pipes() as pipes:
    pipes.report_custom_message("opened")
    sys.stdin.readline()                      # the test saw `opened`: the log does not exist yet
    write(log, "".join(f"part1 {i}\\n" for i in range(100)) + "part1 end\\n")
    sys.stdin.readline()                      # the test saw part 1 forwarded
    if mode == "rotate":
        old = open(log, "a")
        os.rename(log, log + ".1")
        old.write("late line in the old file\\n")   # a writer that has not reopened yet
        old.close()
        write(log, "part2 in the new file\\n", "w")
    elif mode == "truncate":
        with open(log, "r+") as f:
            f.truncate(0)
        write(log, "part2 after truncation\\n")
    write(log, "last\\n")
"""


def part1() -> str:
    return "".join(f"part1 {i}\n" for i in range(100)) + "part1 end\n"


@pytest.mark.parametrize(
    ("mode", "rest"),
    [
        ("append", "last\n"),
        ("rotate", "late line in the old file\npart2 in the new file\nlast\n"),
        ("truncate", "part2 after truncation\nlast\n"),
    ],
)
def test_file_log_reader_late_file_rotation_truncation(tmp_path: Path, mode: str, rest: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD_FILE_WRITER, encoding="utf-8")
    log = tmp_path / "job.out"
    collected = Collector()
    reader = PipesFileLogReader(log, target=collected, interval=0.02)
    opened = Seen()
    with session_with(reader, on_event=opened) as session:
        process = launch(session, script, str(log), mode, stdin=subprocess.PIPE)
        try:
            opened.wait()
            assert reader.is_running() and not log.exists()  # running, on a file that does not exist yet
            release(process)
            collected.wait_for("part1 end\n")  # forwarded while the process runs
            release(process)
        finally:
            finish(process)
    assert collected.text == part1() + rest
    if mode != "append":
        assert reader.rotations >= 1
    assert not reader.is_running()


def test_file_log_reader_on_a_process_whose_output_goes_to_a_file(tmp_path: Path) -> None:
    """The Slurm shape: the launcher sends the process's stdout and stderr to a file we follow."""
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        "from pipes_ext import open_pipes\n"
        "with open_pipes() as pipes:\n"
        "    for i in range(1000):\n"
        "        print(f'out {i}', flush=True)\n"
        "    print('to stderr', file=sys.stderr, flush=True)\n"
        "    pipes.report_asset_materialization()\n",
        encoding="utf-8",
    )
    log = tmp_path / "slurm-1.out"
    collected = Collector()
    with session_with(PipesFileLogReader(log, target=collected), asset_keys=["a"]) as session:
        env = {**os.environ, **session.get_bootstrap_env_vars()}
        shell = f'exec "{PYTHON}" "{script}" > "{log}" 2>&1'
        assert subprocess.run(["sh", "-c", shell], env=env, timeout=60).returncode == 0
    assert collected.text == "".join(f"out {i}\n" for i in range(1000)) + "to stderr\n"
    assert [r.asset_key for r in session.get_results()] == ["a"]


# ---------------------------------------------------------------------------------------------- blob store, moto


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture
def s3(moto: servers.Server) -> Iterator[tuple[Any, str, dict[str, str]]]:
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"logs-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=bucket)
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(S3_ENV, AWS_ENDPOINT_URL=moto.url)
    try:
        yield client, bucket, env
    finally:
        client.close()


CHILD_BLOB_WRITER = """
import sys
import boto3
from pipes_ext import open_pipes

bucket, key = sys.argv[1], sys.argv[2]
client = boto3.client("s3")
log = ""

def upload(text):
    global log
    log += text
    client.put_object(Bucket=bucket, Key=key, Body=log.encode())   # the whole log, rewritten as it grows

with open_pipes() as pipes:
    for i in range(20):
        upload(f"step {i}\\n")
    upload("part1 end\\n")
    sys.stdin.readline()                       # the test saw part 1 forwarded, while the job runs
    upload("ünïcode and the rest\\n")
    pipes.report_custom_message("done")
upload("after closed\\n")                      # still read: the session drains its logs at the end
"""


def test_blob_log_reader_follows_a_log_uploaded_by_a_child(tmp_path: Path, s3: tuple[Any, str, dict[str, str]]) -> None:
    from pipes_ext.s3 import S3BlobStore

    client, bucket, env = s3
    script = tmp_path / "child.py"
    script.write_text(CHILD_BLOB_WRITER, encoding="utf-8")
    collected = Collector()
    reader = PipesBlobStoreLogReader(S3BlobStore(client, bucket), "jobs/1/stdout", target=collected, interval=0.05)
    with session_with(reader) as session:
        process = subprocess.Popen(
            [PYTHON, str(script), bucket, "jobs/1/stdout"], stdin=subprocess.PIPE,
            env={**env, **session.get_bootstrap_env_vars()},
        )
        try:
            collected.wait_for("part1 end\n")
            release(process)
        finally:
            finish(process)
        assert session.get_custom_messages() == ["done"]
    expected = "".join(f"step {i}\n" for i in range(20)) + "part1 end\nünïcode and the rest\nafter closed\n"
    assert collected.text == expected
    assert reader.requests >= 2


def test_blob_log_reader_replaced_object_and_missing_object(s3: tuple[Any, str, dict[str, str]]) -> None:
    from pipes_ext.s3 import S3BlobStore

    client, bucket, _ = s3
    collected = Collector()
    reader = PipesBlobStoreLogReader(S3BlobStore(client, bucket), lambda params: f"{params['key']}.log",
                                     target=collected, interval=0.02)
    reader.start({"key": "job"})
    client.put_object(Bucket=bucket, Key="job.log", Body=b"first run, a long line\n")
    collected.wait_for("first run")
    client.put_object(Bucket=bucket, Key="job.log", Body=b"second\n")  # shorter: a new log
    collected.wait_for("second\n")
    reader.stop()
    assert collected.text == "first run, a long line\nsecond\n"
    # A log that never appears: nothing forwarded, no error.
    quiet = Collector()
    missing = PipesBlobStoreLogReader(S3BlobStore(client, bucket), "nothing-here", target=quiet, interval=0.02)
    missing.start({})
    missing.stop()
    assert quiet.text == "" and missing.errors == 0


def test_names(tmp_path: Path) -> None:
    assert PipesFileLogReader(tmp_path / "x").name == f"file log {tmp_path / 'x'}"
    assert "(from params)" in PipesFileLogReader(lambda p: "y").name



def test_a_path_that_is_a_directory_is_logged_once_and_stops_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    collected = Collector()
    reader = PipesFileLogReader(tmp_path, target=collected, interval=0.01)
    reader.start({})
    reader.stop()
    assert collected.text == ""
    assert reader.errors >= 1
    assert sum("Is a directory" in r.getMessage() for r in caplog.records) == 1


def test_a_fifo_never_blocks_the_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    collected = Collector()
    reader = PipesFileLogReader(fifo, target=collected, interval=0.01)
    reader.start({})
    # A real writer process on the FIFO; the reader forwards what it writes.
    writer = subprocess.Popen([PYTHON, "-c", f"open({str(fifo)!r}, 'w').write('through a fifo\\n')"])
    collected.wait_for("through a fifo\n")
    assert writer.wait(timeout=60) == 0
    reader.stop()  # returns: nothing blocks in open() or read()
    assert collected.text == "through a fifo\n" and not reader.is_running()
