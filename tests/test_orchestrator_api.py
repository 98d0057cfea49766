"""The orchestrator API as the Dagster Pipes reference documents it (issue 15): one test per documented class
and method, checking its signature and its behaviour, and the reference's own ``open_pipes_session`` example
run with a real child.

The reference text is ``dagster-pipes-orchestrator-api.txt`` (Dagster's API docs). Where we extend a signature
the documented parameters come first, in the documented order, with the documented defaults (or a documented
difference, e.g. the blob reader's poll interval).
"""

from __future__ import annotations

import base64
import gzip
import importlib
import inspect
import json
import os
import shutil
import subprocess
import threading
import typing
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import pipes_core
from pipes_core import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesBlobStoreMessageReader,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesContextData,
    PipesContextInjector,
    PipesEnvContextInjector,
    PipesExecutionResult,
    PipesExtras,
    PipesFileContextInjector,
    PipesFileLogReader,
    PipesFileMessageReader,
    PipesMessage,
    PipesMessageHandler,
    PipesMessageReader,
    PipesParams,
    PipesRunContext,
    PipesSession,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesTransportError,
    PipesUsageError,
    open_pipes_session,
)
from pipes_core.channels.blob import DEFAULT_POLL_INTERVAL
from pipes_ext import PipesContext, PipesMappingParamsLoader, open_pipes
from pipes_ext import _types as ext_types
from pipes_ext._blob import RetryPolicy
from pipes_ext._protocol import dumps_message
from tests.support.helpers import PYTHON


class Arrivals:
    """An ``on_event`` callback that wakes waiters: ``wait_for(predicate)`` returns once an arrival made it
    true (a generous deadline catches hangs)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()

    def __call__(self, event: object) -> None:
        with self._condition:
            self._condition.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        with self._condition:
            if not self._condition.wait_for(predicate, timeout):
                raise AssertionError("condition not met within the timeout")


@contextmanager
def session_for(asset_keys: list[str] | None = None, **kwargs: Any) -> Iterator[tuple[PipesSession, Arrivals]]:
    arrivals = Arrivals()
    with open_pipes_session(PipesRunContext(asset_keys=asset_keys), PipesTempFileContextInjector(),
                            PipesTempFileMessageReader(), on_event=arrivals, **kwargs) as session:
        yield session, arrivals


def external(session: PipesSession) -> PipesContext:
    """The external side of ``session``, opened in this process."""
    return open_pipes(params_loader=PipesMappingParamsLoader(session.get_bootstrap_env_vars()))


def params_of(fn: Callable[..., Any]) -> list[tuple[str, Any, str]]:
    """(name, default, kind) of each parameter, ``self`` left out."""
    return [
        (p.name, p.default, p.kind.name)
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self"
    ]


def keys(results: list[PipesExecutionResult]) -> list[tuple[str, bool]]:
    return [(r.asset_key, getattr(r, "implicit", False)) for r in results]


# ---------------------------------------------------------------------------------------------- type names


def test_documented_type_names_exist_once() -> None:
    # One home: pipes_core re-exports the protocol module's types, it does not copy them.
    assert PipesParams is ext_types.PipesParams
    assert PipesExtras is ext_types.PipesExtras
    assert PipesContextData is ext_types.PipesContextData
    assert PipesMessage is ext_types.PipesMessage
    for name in ("PipesParams", "PipesExtras", "PipesContextData", "PipesMessage"):
        assert name in pipes_core.__all__
    # PipesParams / PipesExtras: read-only string-keyed mappings of JSON values.
    assert typing.get_origin(PipesParams) is typing.get_origin(typing.Mapping[str, Any])
    assert typing.get_args(PipesParams) == (str, Any)
    assert typing.get_args(PipesExtras) == (str, Any)
    # PipesContextData / PipesMessage: TypedDicts of the wire documents, with the wire's key names.
    assert set(typing.get_type_hints(PipesContextData)) == {
        "asset_keys", "code_version_by_asset_key", "provenance_by_asset_key", "partition_key",
        "partition_key_range", "partition_time_window", "run_id", "job_name", "retry_number", "extras",
    }
    assert set(PipesMessage.__annotations__) == {"__dagster_pipes_version", "method", "params"}
    # What the session sends is a PipesContextData with exactly those keys.
    with open_pipes_session(PipesRunContext(asset_keys=["a"]), PipesEnvContextInjector(),
                            PipesTempFileMessageReader()) as session:
        assert set(session.context_data) == set(typing.get_type_hints(PipesContextData))


# ---------------------------------------------------------------------------------------------- PipesSession


def test_pipes_session_constructor_and_documented_fields() -> None:
    assert [name for name, _, _ in params_of(PipesSession)][:6] == [
        "context_data", "message_handler", "context_injector_params", "message_reader_params", "context",
        "created_at",
    ]
    before = datetime.now(timezone.utc)
    context = PipesRunContext(asset_keys=["a"], run_id="r-1")
    injector = PipesTempFileContextInjector()
    reader = PipesTempFileMessageReader()
    with open_pipes_session(context, injector, reader, extras={"foo": "bar"}) as session:
        after = datetime.now(timezone.utc)
        assert session.context_data["run_id"] == "r-1"
        assert session.context_data["extras"] == {"foo": "bar"}
        assert session.context_data["asset_keys"] == ["a"]
        assert isinstance(session.message_handler, PipesMessageHandler)
        assert set(session.context_injector_params) == {"path"}
        assert os.path.isfile(session.context_injector_params["path"])
        assert set(session.message_reader_params) == {"path", "include_stdio_in_messages"}
        assert session.context is context
        assert session.context_injector is injector and session.message_reader is reader
        # created_at: the session's start, timezone-aware UTC.
        assert session.created_at.tzinfo is not None
        assert before <= session.created_at <= after
        # The short names are the same objects.
        assert session.handler is session.message_handler
        assert session.context_params is session.context_injector_params
        assert session.message_params is session.message_reader_params
        # The bootstrap params are the documented params.
        assert session.get_bootstrap_params() == {
            "DAGSTER_PIPES_CONTEXT": session.context_injector_params,
            "DAGSTER_PIPES_MESSAGES": session.message_reader_params,
        }
    # Built by hand (e.g. by a custom launcher), created_at defaults to now.
    handler = PipesMessageHandler(dict(session.context_data))
    made = PipesSession(session.context_data, handler, {"data": {}}, {"path": "/x"}, context)
    assert made.created_at >= session.created_at
    assert made.get_bootstrap_params()["DAGSTER_PIPES_MESSAGES"] == {"path": "/x"}


def test_get_results_signature_is_keyword_only() -> None:
    assert params_of(PipesSession.get_results) == [
        ("implicit_materializations", True, "KEYWORD_ONLY"),
        ("metadata", None, "KEYWORD_ONLY"),
    ]
    assert params_of(PipesSession.get_all_results) == params_of(PipesSession.get_results)
    assert params_of(PipesSession.get_reported_results) == []
    assert params_of(PipesSession.get_custom_messages) == []
    assert params_of(PipesSession.get_bootstrap_env_vars) == []
    assert params_of(PipesSession.get_bootstrap_cli_arguments) == []
    assert params_of(PipesSession.get_bootstrap_params) == []


def test_get_results_hands_out_each_result_once_and_implicit_ones_at_the_end() -> None:
    with session_for(["a", "b", "c"]) as (session, arrivals):
        assert session.get_results() == []
        pipes = external(session)
        pipes.report_asset_materialization(asset_key="a", metadata={"n": 1})
        arrivals.wait_for(lambda: session.message_count >= 2)
        assert keys(session.get_results()) == [("a", False)]
        assert session.get_results() == []  # nothing new; no implicit materialization while the process runs
        pipes.report_asset_check("ok", passed=True, asset_key="a")
        pipes.report_asset_materialization(asset_key="b")
        arrivals.wait_for(lambda: session.message_count >= 4)
        streamed = session.get_results()
        assert [type(r) for r in streamed] == [AssetCheckResult, MaterializeResult]
        assert not session.process_finished
        assert session.get_results() == []
        pipes.close()
        arrivals.wait_for(lambda: session.closed)
        # `closed` arrived: the process has finished reporting, so "c" (never reported) is implied, once.
        assert session.process_finished
        assert keys(session.get_results()) == [("c", True)]
        assert session.get_results() == []
    assert session.get_results() == []
    # The snapshots still see everything.
    assert keys(session.get_all_results()) == [("a", False), ("a", False), ("b", False), ("c", True)]
    assert keys(session.get_reported_results()) == [("a", False), ("a", False), ("b", False)]


def test_get_results_implicit_materializations_only_after_the_block_without_closed() -> None:
    with session_for(["a", "b"]) as (session, arrivals):
        pipes = external(session)
        pipes.report_asset_materialization(asset_key="b")
        arrivals.wait_for(lambda: session.message_count >= 2)
        assert keys(session.get_results()) == [("b", False)]
        # The process stops without sending `closed` (it crashed): nothing implied until the block ends.
        assert not session.closed
        assert session.get_results() == []
    assert session.finished and not session.closed
    assert keys(session.get_results()) == [("a", True)]
    assert session.get_results() == []


def test_get_results_without_implicit_then_with() -> None:
    with session_for(["a", "b"]) as (session, _arrivals):
        with external(session) as pipes:
            pipes.report_asset_materialization(asset_key="a")
    assert keys(session.get_results(implicit_materializations=False)) == [("a", False)]
    # The implicit one was not handed out yet: a later call asking for it gets it, once.
    assert keys(session.get_results()) == [("b", True)]
    assert session.get_results() == []


def test_get_results_metadata_applies_to_what_it_returns() -> None:
    with session_for(["a", "b"]) as (session, arrivals):
        pipes = external(session)
        pipes.report_asset_materialization(asset_key="a", metadata={"own": 1, "job_id": "ext"})
        arrivals.wait_for(lambda: session.message_count >= 2)
        [first] = session.get_results(metadata={"job_id": "j-1"})
        assert first.metadata == {"own": MetadataValue("int", 1), "job_id": MetadataValue("text", "j-1")}
        pipes.close()
    [implicit] = session.get_results(metadata={"job_id": "j-2", "url": MetadataValue("url", "http://x")})
    assert implicit.asset_key == "b" and implicit.implicit
    assert implicit.metadata == {"job_id": MetadataValue("text", "j-2"), "url": MetadataValue("url", "http://x")}
    # The stored results are untouched.
    [stored] = session.get_reported_results()
    assert stored.metadata == {"own": MetadataValue("int", 1), "job_id": MetadataValue("text", "ext")}


def test_get_results_with_retain_messages_false_still_knows_what_was_reported() -> None:
    with open_pipes_session(PipesRunContext(asset_keys=["a", "b"]), PipesTempFileContextInjector(),
                            PipesTempFileMessageReader(), retain_messages=False) as session:
        with external(session) as pipes:
            pipes.report_asset_materialization(asset_key="a")
    # Nothing retained, but "a" was reported: only "b" is implied.
    assert keys(session.get_results()) == [("b", True)]
    assert keys(session.get_all_results()) == [("b", True)]


def test_a_materialization_after_closed_is_not_handed_out_twice() -> None:
    with session_for(["a"]) as (session, arrivals):
        pipes = external(session)
        pipes.close()
        arrivals.wait_for(lambda: session.closed)
        assert keys(session.get_results()) == [("a", True)]
        # A peer breaking the protocol: a materialization after `closed`.
        with open(session.message_reader_params["path"], "a", encoding="utf-8") as f:
            f.write(dumps_message("report_asset_materialization",
                                  {"asset_key": "a", "metadata": {}, "data_version": None}) + "\n")
    assert session.get_results() == []  # "a" was already handed out (implicitly)
    assert any(isinstance(r, MaterializeResult) and r.asset_key == "a" and not r.implicit
               for r in session.get_reported_results()) or session.issue_count > 0


def test_get_results_from_several_threads_hands_out_each_result_once() -> None:
    count = 300
    assets = [f"asset_{i}" for i in range(count)]
    got: list[PipesExecutionResult] = []
    lock = threading.Lock()
    stop = threading.Event()

    def consume(session: PipesSession) -> None:
        while not stop.is_set():
            batch = session.get_results()
            with lock:
                got.extend(batch)

    with session_for(assets) as (session, arrivals):
        consumers = [threading.Thread(target=consume, args=(session,)) for _ in range(3)]
        for thread in consumers:
            thread.start()
        with external(session) as pipes:
            for name in assets[: count // 2]:
                pipes.report_asset_materialization(asset_key=name)
        arrivals.wait_for(lambda: session.closed)
    stop.set()
    for thread in consumers:
        thread.join()
    got.extend(session.get_results())
    assert sorted(keys(got)) == sorted(
        [(name, False) for name in assets[: count // 2]] + [(name, True) for name in assets[count // 2 :]]
    )


# The reference's example, as written there (a generator asset body), with a real child that reports "a" and
# then "b" 0.3 s later, as in the issue. "c" is selected but never reported.
CHILD_A_THEN_B = """
import time
from pipes_ext import open_pipes

with open_pipes() as pipes:
    assert pipes.get_extra("foo") == "bar"
    pipes.report_asset_materialization(asset_key="a", metadata={"n": 1})
    time.sleep(0.3)
    pipes.report_asset_materialization(asset_key="b")
"""


def test_the_reference_example_yields_each_materialization_exactly_once(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(CHILD_A_THEN_B, encoding="utf-8")
    polls = 0

    def ext_asset(context: PipesRunContext) -> Iterator[PipesExecutionResult]:
        nonlocal polls
        with open_pipes_session(
            context=context,
            extras={"foo": "bar"},
            context_injector=PipesTempFileContextInjector(),
            message_reader=PipesTempFileMessageReader(),
        ) as pipes_session:
            process = subprocess.Popen(
                [PYTHON, str(script)],
                env={**pipes_session.get_bootstrap_env_vars()}
            )
            while process.poll() is None:
                polls += 1
                yield from pipes_session.get_results()

        yield from pipes_session.get_results()

    results = list(ext_asset(PipesRunContext(asset_keys=["a", "b", "c"])))
    assert polls > 1  # the loop did poll while the child ran
    assert keys(results) == [("a", False), ("b", False), ("c", True)]
    assert results[0].metadata == {"n": MetadataValue("int", 1)}


# The same with the child gated on stdin, so that the test knows the order of events: "b" is only reported
# after the loop has yielded "a", and nothing implicit may have come out by then.
CHILD_GATED = """
import sys
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.report_asset_materialization(asset_key="a")
    sys.stdin.readline()
    pipes.report_asset_materialization(asset_key="b")
"""


def test_the_example_loop_with_a_gated_child_never_yields_an_early_implicit(tmp_path: Path) -> None:
    script = tmp_path / "gated.py"
    script.write_text(CHILD_GATED, encoding="utf-8")
    yielded: list[PipesExecutionResult] = []
    with session_for(["a", "b", "c"]) as (session, _arrivals):
        process = subprocess.Popen([PYTHON, str(script)], stdin=subprocess.PIPE,
                                   env={**os.environ, **session.get_bootstrap_env_vars()})
        assert process.stdin is not None
        released = False
        try:
            while process.poll() is None:
                batch = session.get_results()
                yielded += batch
                if not released and keys(yielded) == [("a", False)]:
                    # "a" came out alone: "b" and "c" were not implied while the child still ran.
                    process.stdin.write(b"go\n")
                    process.stdin.close()
                    released = True
                process_wait(process)
        finally:
            if not released:
                process.kill()
        assert process.wait(timeout=30) == 0
    yielded += session.get_results()
    assert released
    assert keys(yielded) == [("a", False), ("b", False), ("c", True)]


def process_wait(process: subprocess.Popen[bytes]) -> None:
    """Pace a poll loop on the child itself rather than a sleep."""
    try:
        process.wait(timeout=0.02)
    except subprocess.TimeoutExpired:
        pass


def test_completed_invocation_get_results_is_complete_and_repeatable(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(CHILD_A_THEN_B.replace("time.sleep(0.3)", ""), encoding="utf-8")
    streamed: list[PipesExecutionResult] = []
    invocation = PipesSubprocessClient().run(
        context=PipesRunContext(asset_keys=["a", "b", "c"]), command=[PYTHON, str(script)],
        extras={"foo": "bar"}, metadata={"job": "j"},
    )
    # Whatever a user streams from the session, the invocation's answer stays complete.
    streamed += invocation.session.get_results()
    first = invocation.get_results()
    assert keys(first) == [("a", False), ("b", False), ("c", True)]
    assert all(r.metadata["job"] == MetadataValue("text", "j") for r in first)
    assert invocation.get_results() == first
    assert keys(streamed) == keys(first)
    assert invocation.session.get_results() == []
    assert invocation.get_results() == first


# ---------------------------------------------------------------------------------------------- open_pipes_session


def test_open_pipes_session_signature() -> None:
    assert [name for name, _, _ in params_of(open_pipes_session)][:4] == [
        "context", "context_injector", "message_reader", "extras",
    ]
    assert inspect.signature(open_pipes_session).parameters["extras"].default is None


def test_open_pipes_session_yields_a_session_and_cleans_up(tmp_path: Path) -> None:
    context_path = tmp_path / "context.json"
    messages_path = tmp_path / "messages.jsonl"
    with open_pipes_session(
        context=PipesRunContext(asset_keys=["a"]), context_injector=PipesFileContextInjector(str(context_path)),
        message_reader=PipesFileMessageReader(str(messages_path)), extras={"k": [1]},
    ) as session:
        assert isinstance(session, PipesSession)
        assert context_path.is_file() and messages_path.is_file()
        with external(session) as pipes:
            assert pipes.extras == {"k": [1]}
            pipes.report_custom_message({"x": 1})
    assert session.get_custom_messages() == [{"x": 1}]
    assert not context_path.exists() and not messages_path.exists()


# ------------------------------------------------------------------------------ PipesBlobStoreMessageReader

# The external side of a store the library does not know: a directory (a shared filesystem, say). The writer is
# the library's blob writer with a store of our own; chunks land atomically (write, then rename).
CHILD_DIRECTORY_WRITER = """
import os, sys
from pipes_ext import open_pipes
from pipes_ext._blob import PipesBlobStore, PipesBlobStoreMessageWriter


class DirectoryStore(PipesBlobStore):
    scheme = "dir"

    def put(self, key, data):
        path = os.path.join(self.bucket, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)

    def get(self, key):
        try:
            with open(os.path.join(self.bucket, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, key):
        try:
            os.remove(os.path.join(self.bucket, key))
        except FileNotFoundError:
            pass


class DirectoryMessageWriter(PipesBlobStoreMessageWriter):
    def make_store(self, bucket):
        return DirectoryStore(bucket)


with open_pipes(message_writer=DirectoryMessageWriter(interval=0.02, max_chunk_bytes=2048)) as pipes:
    for i in range(int(sys.argv[1])):
        pipes.report_custom_message({"i": i, "pad": "x" * 40})
    pipes.report_asset_materialization(asset_key="a", metadata={"n": int(sys.argv[1])})
"""


class DirectoryMessageReader(PipesBlobStoreMessageReader):
    """The orchestrator side, through the two documented hooks only."""

    def __init__(self, root: Path, *, fail_first: int = 0, error: type[Exception] = ConnectionError,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.fail_first = fail_first
        self.error = error
        self.downloads = 0

    @contextmanager
    def get_params(self) -> Iterator[PipesParams]:
        directory = self.root / f"session-{len(list(self.root.iterdir()))}"
        directory.mkdir()
        try:
            yield {"bucket": str(directory), "key_prefix": "messages"}
        finally:
            shutil.rmtree(directory)

    def download_messages_chunk(self, index: int, params: PipesParams) -> str | None:
        self.downloads += 1
        if self.downloads <= self.fail_first:
            raise self.error(f"the share is unavailable (download {self.downloads})")
        try:
            return (Path(params["bucket"]) / params["key_prefix"] / f"{index}.json").read_text("utf-8")
        except FileNotFoundError:
            return None


def run_directory_child(tmp_path: Path, reader: PipesBlobStoreMessageReader, count: int) -> PipesSession:
    script = tmp_path / "writer.py"
    script.write_text(CHILD_DIRECTORY_WRITER, encoding="utf-8")
    with open_pipes_session(PipesRunContext(asset_keys=["a"]), PipesTempFileContextInjector(), reader) as session:
        completed = subprocess.run([PYTHON, str(script), str(count)], capture_output=True, text=True, timeout=120,
                                   env={**os.environ, **session.get_bootstrap_env_vars()})
        assert completed.returncode == 0, completed.stderr
    return session


def test_blob_store_message_reader_signature() -> None:
    assert params_of(PipesBlobStoreMessageReader)[:2] == [
        ("interval", DEFAULT_POLL_INTERVAL, "POSITIONAL_OR_KEYWORD"),
        ("log_readers", None, "POSITIONAL_OR_KEYWORD"),
    ]
    reader = PipesBlobStoreMessageReader(0.5, [PipesFileLogReader("x")])
    assert reader.interval == 0.5 and len(reader.log_readers) == 1
    for backend in ("s3", "gcs", "azure"):
        module = importlib.import_module(f"pipes_core.{backend}")
        [cls] = [c for c in vars(module).values()
                 if isinstance(c, type) and issubclass(c, PipesBlobStoreMessageReader)
                 and c is not PipesBlobStoreMessageReader]
        assert "log_readers" in inspect.signature(cls).parameters, cls


def test_a_subclass_for_another_store_implements_two_hooks(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    reader = DirectoryMessageReader(root, interval=0.02)
    session = run_directory_child(tmp_path, reader, 500)
    assert session.get_custom_messages() == [{"i": i, "pad": "x" * 40} for i in range(500)]
    assert keys(session.get_results()) == [("a", False)]
    assert session.closed and session.issue_count == 0
    assert reader.last_stats["chunks"] > 5  # many chunks (2 KiB each), read in order
    assert list(root.iterdir()) == []  # get_params cleaned up


def test_a_subclass_transient_errors_are_retried(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    reader = DirectoryMessageReader(root, interval=0.02, fail_first=3, retry=RetryPolicy(base_delay=0.001))
    session = run_directory_child(tmp_path, reader, 50)
    assert len(session.get_custom_messages()) == 50
    assert session.issue_count == 0


def test_a_subclass_permanent_error_is_raised_at_the_end(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    reader = DirectoryMessageReader(root, interval=0.02, fail_first=10**9, error=PermissionError)
    with pytest.raises(PipesTransportError, match=r"reading messages chunk.*PermissionError.*unavailable"):
        run_directory_child(tmp_path, reader, 5)
    assert list(root.iterdir()) == []


def test_a_subclass_that_implements_nothing_says_what_to_implement() -> None:
    with pytest.raises(NotImplementedError, match=r"make_store\(\), or get_params\(\) and download_messages_chunk"):
        with open_pipes_session(None, PipesEnvContextInjector(), PipesBlobStoreMessageReader()):
            pass  # pragma: no cover


# ---------------------------------------------------------------------------------------------- bootstrap methods


def test_bootstrap_env_vars_are_base64_zlib_json_not_gzip() -> None:
    # The reference's docs say the env vars are gzip-compressed and the CLI arguments zlib-compressed; on the
    # wire both are zlib (the reference's own code, and ours). A gzip reader would fail on them.
    with session_for(["a"]) as (session, _):
        env = session.get_bootstrap_env_vars()
        cli = session.get_bootstrap_cli_arguments()
        assert set(env) == {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"}
        assert set(cli) == {"--dagster-pipes-context", "--dagster-pipes-messages"}
        for encoded, params in (
            (env["DAGSTER_PIPES_CONTEXT"], session.context_injector_params),
            (env["DAGSTER_PIPES_MESSAGES"], session.message_reader_params),
            (cli["--dagster-pipes-context"], session.context_injector_params),
            (cli["--dagster-pipes-messages"], session.message_reader_params),
        ):
            raw = base64.b64decode(encoded)
            assert raw[:1] == b"\x78"  # a zlib header; gzip would start with 1f 8b
            assert json.loads(zlib.decompress(raw)) == params
            with pytest.raises(OSError):
                gzip.decompress(raw)
        assert env["DAGSTER_PIPES_CONTEXT"] == cli["--dagster-pipes-context"]
        assert session.get_bootstrap_argv() == [token for pair in cli.items() for token in pair]


def test_get_bootstrap_params_and_custom_messages_with_a_real_child(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        "from pipes_ext import PipesCliArgsParamsLoader, open_pipes\n"
        "with open_pipes(params_loader=PipesCliArgsParamsLoader()) as pipes:\n"
        "    pipes.report_custom_message({'n': 1})\n"
        "    pipes.report_custom_message([1, 'two', None])\n"
        "    pipes.report_custom_message('three')\n"
        "    pipes.report_custom_message(None)\n",
        encoding="utf-8",
    )
    with session_for() as (session, _):
        params = session.get_bootstrap_params()
        assert params == {"DAGSTER_PIPES_CONTEXT": session.context_injector_params,
                          "DAGSTER_PIPES_MESSAGES": session.message_reader_params}
        # The CLI form reaches a child as well as the env form.
        subprocess.run([PYTHON, str(script), *session.get_bootstrap_argv()], check=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")})
    assert session.get_custom_messages() == [{"n": 1}, [1, "two", None], "three", None]
    assert session.get_custom_messages() == [{"n": 1}, [1, "two", None], "three", None]  # a snapshot


# ---------------------------------------------------------------------------------------------- clients


def test_pipes_client_is_the_abstract_base_with_the_documented_run() -> None:
    assert inspect.isabstract(PipesClient)
    with pytest.raises(TypeError):
        PipesClient()  # type: ignore[abstract]
    run = inspect.signature(PipesClient.run).parameters
    assert run["context"].kind is inspect.Parameter.KEYWORD_ONLY
    assert run["extras"].kind is inspect.Parameter.KEYWORD_ONLY and run["extras"].default is None
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in run.values())
    assert issubclass(PipesSubprocessClient, PipesClient)

    class Minimal(PipesClient):
        """A client for a new environment: implements run (here: through the subprocess client)."""

        def run(self, *, context: PipesRunContext | None = None, extras: Any = None,
                **kwargs: Any) -> PipesClientCompletedInvocation:
            return PipesSubprocessClient().run(context=context, extras=extras, command=kwargs["command"])

    invocation = Minimal().run(
        context=PipesRunContext(asset_keys=["a"]), extras={"k": 1},
        command=[PYTHON, "-c", "from pipes_ext import open_pipes\n"
                               "with open_pipes() as p: p.report_custom_message(p.extras)"],
    )
    assert isinstance(invocation, PipesClientCompletedInvocation)
    assert invocation.get_custom_messages() == [{"k": 1}]
    assert keys(invocation.get_results()) == [("a", True)]


def test_pipes_subprocess_client_signature() -> None:
    assert params_of(PipesSubprocessClient)[:7] == [
        ("env", None, "POSITIONAL_OR_KEYWORD"),
        ("cwd", None, "POSITIONAL_OR_KEYWORD"),
        ("context_injector", None, "POSITIONAL_OR_KEYWORD"),
        ("message_reader", None, "POSITIONAL_OR_KEYWORD"),
        ("forward_termination", True, "POSITIONAL_OR_KEYWORD"),
        ("forward_stdio", True, "POSITIONAL_OR_KEYWORD"),
        ("termination_timeout_seconds", 20, "POSITIONAL_OR_KEYWORD"),
    ]
    run = {name: (default, kind) for name, default, kind in params_of(PipesSubprocessClient.run)}
    for name in ("context", "extras", "command", "env", "cwd"):
        assert run[name][1] == "KEYWORD_ONLY", name
    assert run["extras"][0] is None and run["env"][0] is None and run["cwd"][0] is None
    assert run["command"][0] is inspect.Parameter.empty


def test_pipes_subprocess_client_env_cwd_and_channels(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    script = tmp_path / "child.py"
    script.write_text(
        "import os\n"
        "from pipes_ext import open_pipes\n"
        "with open_pipes() as pipes:\n"
        "    pipes.report_custom_message({'cwd': os.getcwd(), 'client': os.environ.get('FROM_CLIENT'),\n"
        "                                 'run': os.environ.get('FROM_RUN'), 'extras': pipes.extras})\n"
        "    pipes.report_asset_materialization(metadata={'ok': True})\n",
        encoding="utf-8",
    )
    context_path = tmp_path / "context.json"
    messages_path = tmp_path / "messages"
    client = PipesSubprocessClient(
        env={"FROM_CLIENT": "c", "FROM_RUN": "overridden"}, cwd=str(tmp_path),
        context_injector=PipesFileContextInjector(str(context_path)),
        message_reader=PipesFileMessageReader(str(messages_path)),
        forward_termination=True, forward_stdio=False, termination_timeout_seconds=5,
    )
    invocation = client.run(context=PipesRunContext(asset_keys=["x"]), extras={"e": [1]},
                            command=[PYTHON, str(script)], env={"FROM_RUN": "r"}, cwd=str(workdir))
    assert invocation.get_custom_messages() == [
        {"cwd": str(workdir), "client": "c", "run": "r", "extras": {"e": [1]}}
    ]
    [materialization] = invocation.get_results()
    assert materialization.metadata == {"ok": MetadataValue("bool", True)}
    assert invocation.exit_code == 0
    assert not context_path.exists() and not messages_path.exists()  # both channels cleaned up


# ---------------------------------------------------------------------------------------------- injectors


def read_context_in_child(session: PipesSession) -> Any:
    """What a real external process loads as its context, through the session's bootstrap env vars."""
    completed = subprocess.run(
        [PYTHON, "-c", "import json\nfrom pipes_ext import open_pipes\n"
                       "with open_pipes() as p: print(json.dumps([p.run_id, p.asset_keys, p.extras]))"],
        env={**os.environ, **session.get_bootstrap_env_vars()}, capture_output=True, text=True, timeout=60,
        check=True,
    )
    return json.loads(completed.stdout)


@pytest.mark.parametrize("kind", ["env", "file", "tempfile"])
def test_context_injectors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ctx.json"
    injector: PipesContextInjector = {
        "env": PipesEnvContextInjector(),
        "file": PipesFileContextInjector(str(path)),
        "tempfile": PipesTempFileContextInjector(),
    }[kind]
    assert isinstance(injector, PipesContextInjector)
    context = PipesRunContext(asset_keys=["a", "b"], run_id="run-7")
    with open_pipes_session(context, injector, PipesTempFileMessageReader(), extras={"x": 1}) as session:
        params = session.context_injector_params
        if kind == "env":
            assert set(params) == {"data"} and params["data"] == session.context_data
        else:
            assert set(params) == {"path"}
            assert json.loads(Path(params["path"]).read_text("utf-8")) == session.context_data
            if kind == "file":
                assert params["path"] == str(path)
        assert read_context_in_child(session) == ["run-7", ["a", "b"], {"x": 1}]
    if kind != "env":
        assert not Path(params["path"]).exists()  # deleted on close of the session
    assert params_of(PipesFileContextInjector) == [("path", inspect.Parameter.empty, "POSITIONAL_OR_KEYWORD")]


def test_context_injector_base_names_what_to_implement() -> None:
    with pytest.raises(NotImplementedError):
        with PipesContextInjector().inject_context({}):
            pass  # pragma: no cover


# ---------------------------------------------------------------------------------------------- readers and handler


def test_message_readers_signatures() -> None:
    assert params_of(PipesFileMessageReader)[:3] == [
        ("path", inspect.Parameter.empty, "POSITIONAL_OR_KEYWORD"),
        ("include_stdio_in_messages", False, "POSITIONAL_OR_KEYWORD"),
        ("cleanup_file", True, "POSITIONAL_OR_KEYWORD"),
    ]
    assert params_of(PipesTempFileMessageReader)[:1] == [("include_stdio_in_messages", False, "POSITIONAL_OR_KEYWORD")]
    assert params_of(PipesMessageHandler)[:2] == [
        ("context_data", inspect.Parameter.empty, "POSITIONAL_OR_KEYWORD"),
        ("message_reader", None, "POSITIONAL_OR_KEYWORD"),
    ]
    with pytest.raises(NotImplementedError):
        with PipesMessageReader().read_messages(PipesMessageHandler({})):
            pass  # pragma: no cover


@pytest.mark.parametrize("cleanup_file", [True, False])
@pytest.mark.parametrize("include_stdio", [True, False])
def test_file_message_reader(tmp_path: Path, cleanup_file: bool, include_stdio: bool) -> None:
    path = tmp_path / "messages.jsonl"
    reader = PipesFileMessageReader(str(path), include_stdio_in_messages=include_stdio, cleanup_file=cleanup_file)
    streams: list[tuple[str, str]] = []
    with open_pipes_session(None, PipesEnvContextInjector(), reader,
                            external_stream_handler=lambda stream, text: streams.append((stream, text))) as session:
        assert session.message_reader_params == {"path": str(path), "include_stdio_in_messages": include_stdio}
        subprocess.run(
            [PYTHON, "-c", "from pipes_ext import open_pipes\n"
                           "with open_pipes() as p:\n    print('to stdout', flush=True)\n"
                           "    p.report_custom_message(1)"],
            env={**os.environ, **session.get_bootstrap_env_vars()}, check=True, timeout=60, capture_output=True,
        )
    assert session.get_custom_messages() == [1]
    assert path.exists() is (not cleanup_file)
    assert "".join(text for stream, text in streams if stream == "stdout") == ("to stdout\n" if include_stdio else "")


def test_temp_file_message_reader_include_stdio(tmp_path: Path) -> None:
    reader = PipesTempFileMessageReader(include_stdio_in_messages=True)
    streams: list[tuple[str, str]] = []
    with open_pipes_session(None, PipesEnvContextInjector(), reader,
                            external_stream_handler=lambda stream, text: streams.append((stream, text))) as session:
        path = Path(session.message_reader_params["path"])
        assert session.message_reader_params["include_stdio_in_messages"] is True
        subprocess.run(
            [PYTHON, "-c", "import sys\nfrom pipes_ext import open_pipes\n"
                           "with open_pipes() as p:\n    print('oops', file=sys.stderr, flush=True)"],
            env={**os.environ, **session.get_bootstrap_env_vars()}, check=True, timeout=60, capture_output=True,
        )
    assert "".join(text for stream, text in streams if stream == "stderr") == "oops\n"
    assert not path.exists() and not path.parent.exists()


def test_message_handler_takes_the_documented_context_and_message_reader() -> None:
    reader = PipesTempFileMessageReader()
    context = PipesRunContext(asset_keys=["a"])
    handler = PipesMessageHandler(context, reader)  # the reference's (context, message_reader)
    assert handler.message_reader is reader
    handler.handle_line(dumps_message("opened", {"extras": {}}))
    handler.handle_line(dumps_message("report_asset_materialization",
                                      {"asset_key": "a", "metadata": None, "data_version": None}))
    handler.handle_line(dumps_message("report_asset_materialization",
                                      {"asset_key": "not_selected", "metadata": None, "data_version": None}))
    assert [r.asset_key for r in handler.results] == ["a"]
    assert handler.issue_count == 1  # the context's selection is what it checks against
    with open_pipes_session(context, PipesEnvContextInjector(), reader) as session:
        assert session.message_handler.message_reader is reader


@pytest.mark.parametrize("metadata", [5, "text", ["a"], {1: "not a str label"}])
def test_get_results_bad_metadata_is_a_usage_error_and_consumes_nothing(metadata: Any) -> None:
    with session_for(["a"]) as (session, _):
        with external(session) as pipes:
            pipes.report_asset_materialization()
    with pytest.raises(PipesUsageError, match="metadata must be a mapping"):
        session.get_results(metadata=metadata)
    with pytest.raises(PipesUsageError, match="metadata must be a mapping"):
        session.get_all_results(metadata=metadata)
    assert keys(session.get_results()) == [("a", False)]  # the bad call handed nothing out
