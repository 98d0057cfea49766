"""GCS channels (pipes_ext.gcs / pipes_core.gcs) against a real local server: gcp-storage-emulator.

One emulator process for the test session (started on a free port, stopped by its pid); a new bucket per test.
Children are real subprocesses that build their client from ``STORAGE_EMULATOR_HOST`` with anonymous
credentials. Faults come from tests/support/faultproxy.py, a real HTTP proxy between the clients and the emulator.
No mocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import PYTHON, wait_until

with warnings.catch_warnings():
    # google-api-core warns at import when grpcio is installed (dagster brings it) without grpcio-status; this
    # runs at collection time, where pytest marks do not apply.
    warnings.filterwarnings("ignore", "Please install grpcio-status", ImportWarning)
    from google.api_core import exceptions as _google_exceptions  # noqa: F401
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from pipes_core import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExternalStreamEvent,
    PipesLogEvent,
    PipesMessageHandler,
    PipesOpenedEvent,
    PipesRunContext,
    PipesSubprocessClient,
    PipesTransportError,
    open_pipes_session,
)
from pipes_core.gcs import PipesGCSContextInjector, PipesGCSMessageReader
from pipes_ext._blob import RetryPolicy
from pipes_ext._protocol import dumps_message
from pipes_ext.gcs import GCSBlobStore, PipesGCSContextLoader, PipesGCSMessageWriter
from tests.support.faultproxy import FaultProxy
from tests.support.servers import Server, start_gcs

FAST_RETRY = RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.2)
CHUNK_KEY = re.compile(r"^[A-Za-z]{30}/(\d+)\.json$")

# Every child builds its client the documented emulator way: STORAGE_EMULATOR_HOST + anonymous credentials.
CHILD_PRELUDE = """
import json, os, sys, time
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from pipes_ext import open_pipes
from pipes_ext._blob import RetryPolicy
from pipes_ext.gcs import PipesGCSContextLoader, PipesGCSMessageWriter

assert os.environ["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
client = storage.Client(project="test", credentials=AnonymousCredentials())
FAST_RETRY = RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.2)


def save_stats(writer):
    with open(os.environ["STATS_PATH"], "w") as f:
        json.dump({"chunks": writer.channel.chunks_uploaded, "requests": writer.channel.requests}, f)
"""


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[Server]:
    server = start_gcs()
    try:
        yield server
    finally:
        server.stop()


def make_client(endpoint: str) -> Any:
    credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
    return storage.Client(project="test", credentials=credentials, client_options={"api_endpoint": endpoint})


@pytest.fixture(scope="session")
def client(gcs_server: Server) -> Any:
    return make_client(gcs_server.url)


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"pipes-{uuid.uuid4().hex[:16]}"
    client.create_bucket(name)
    return name


ChildFactory = Callable[..., tuple[Path, dict[str, str]]]


@pytest.fixture
def child(write_script: Callable[[str, str], Path], gcs_server: Server, tmp_path: Path) -> ChildFactory:
    """``child(body, endpoint=None)`` -> (script path, env): the prelude + body, and the env pointing at the
    emulator (or at ``endpoint``, e.g. a fault proxy)."""

    def make(body: str, endpoint: str | None = None) -> tuple[Path, dict[str, str]]:
        script = write_script(CHILD_PRELUDE + body, "child.py")
        env = {"STORAGE_EMULATOR_HOST": endpoint or gcs_server.url, "STATS_PATH": str(tmp_path / "stats.json")}
        return script, env

    return make


def stats(env: dict[str, str]) -> dict[str, int]:
    result: dict[str, int] = json.loads(Path(env["STATS_PATH"]).read_text())
    return result


def objects(client: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix``, downloaded through ``client``. (A listed blob's media link names the host
    it was uploaded through, perhaps a stopped proxy, so each is downloaded by name.)"""
    names = [blob.name for blob in client.list_blobs(bucket, prefix=prefix, retry=None, timeout=10)]
    return {name: client.bucket(bucket).blob(name).download_as_bytes(retry=None, timeout=10) for name in names}


class RecordingProxy(FaultProxy):
    """A FaultProxy that also records each request's method and path."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: list[tuple[str, str]] = []

    def __enter__(self) -> RecordingProxy:
        self.start()
        return self

    def _take_rule(self, method: str, path: str) -> Any:
        self.seen.append((method, path))
        return super()._take_rule(method, path)

    def object_requests(self, method: str | None = None) -> list[str]:
        """Paths of the requests on objects (not the bucket-metadata GET that google-cloud-storage 3.17 makes in
        the background, once per client and bucket, whatever the caller does)."""
        return [path for m, path in self.seen if "/o" in path.split("?")[0] and method in (None, m)]


def chunks_in(client: Any, bucket: str) -> list[bytes]:
    """The message chunks in ``bucket`` (one key prefix), checked to be numbered 1..n with no gap."""
    found = {}
    for name, data in objects(client, bucket).items():
        match = CHUNK_KEY.match(name)
        assert match is not None, f"unexpected object {name!r}"
        found[int(match.group(1))] = data
    assert sorted(found) == list(range(1, len(found) + 1))
    return [found[i] for i in sorted(found)]



def custom_payloads(events: list[PipesEvent]) -> list[Any]:
    return [e.payload for e in events if isinstance(e, PipesCustomMessageEvent)]


def run_child(script: Path, env: dict[str, str], bucket: str, client: Any, *, context: PipesRunContext | None = None,
              **reader_kwargs: Any) -> tuple[Any, list[PipesEvent], PipesGCSMessageReader]:
    """Run ``script`` with the GCS injector and reader on ``bucket``; returns (invocation, events, reader)."""
    events: list[PipesEvent] = []
    reader = PipesGCSMessageReader(bucket, client, **{"interval": 0.05, **reader_kwargs})
    runner = PipesSubprocessClient(
        context_injector=PipesGCSContextInjector(bucket, client),
        message_reader=reader,
        forward_stdio=False,
    )
    invocation = runner.run(context=context, command=[PYTHON, str(script)], env=env, on_event=events.append)
    return invocation, events, reader


# ---------------------------------------------------------------------------------------------- context


@pytest.mark.parametrize("key_prefix", [None, "runs/ctx-"])
def test_context_round_trip_and_object_deleted_after(client: Any, bucket: str, key_prefix: str | None) -> None:
    data = PipesRunContext(asset_keys=["a", ["b", "c/d"]], run_id="run-gcs", job_name="job").to_context_data(
        {"rows": 3, "text": "h\u00e9llo \U0001f680"}
    )
    injector = PipesGCSContextInjector(bucket, client, key_prefix=key_prefix)
    with injector.inject_context(data) as params:
        assert set(params) == {"bucket", "key"}
        assert params["bucket"] == bucket
        # The prefix is concatenated with no slash, then 30 ASCII letters, then "/context.json".
        assert re.fullmatch(re.escape(key_prefix or "") + r"[A-Za-z]{30}/context\.json", params["key"])
        stored = objects(client, bucket)
        assert list(stored) == [params["key"]]
        assert json.loads(stored[params["key"]]) == data
        assert PipesGCSContextLoader(client).load_context(params) == data
    assert objects(client, bucket) == {}
    # Gone means gone: loading it now is an error naming the object.
    with pytest.raises(PipesTransportError, match=f"gs://{bucket}/{re.escape(params['key'])} does not exist"):
        PipesGCSContextLoader(client).load_context(params)


# ---------------------------------------------------------------------------------------------- end to end


def test_all_seven_methods_through_a_child_process(
    child: ChildFactory, client: Any, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    script, env = child("""
writer = PipesGCSMessageWriter(client, interval=0.05)
with open_pipes(context_loader=PipesGCSContextLoader(client), message_writer=writer) as pipes:
    pipes.log.info("hello from gcs")
    pipes.log.warning("careful \\u00e9")
    pipes.report_asset_materialization(metadata={"rows": 3, "kind": {"raw_value": "x", "type": "text"}},
                                       data_version="v1")
    pipes.report_asset_check("not_null", passed=False, severity="WARN", metadata={"nulls": 2})
    pipes.report_custom_message({"extras": pipes.extras, "run_id": pipes.run_id, "asset_key": pipes.asset_key})
    pipes.log_external_stream("stdout", "external text via gcs\\n")
save_stats(writer)
""")
    invocation, events, reader = run_child(
        script, env, bucket, client, context=PipesRunContext(asset_keys=["gcs/asset"], run_id="run-7")
    )
    assert invocation.exit_code == 0
    assert [type(e) for e in events] == [
        PipesOpenedEvent, PipesLogEvent, PipesLogEvent, MaterializeResult, AssetCheckResult,
        PipesCustomMessageEvent, PipesExternalStreamEvent, PipesClosedEvent,
    ]
    logs = [e for e in events if isinstance(e, PipesLogEvent)]
    assert [(e.level, e.message) for e in logs] == [("INFO", "hello from gcs"), ("WARNING", "careful \u00e9")]
    [materialization] = [e for e in events if isinstance(e, MaterializeResult)]
    assert materialization.asset_key == "gcs/asset"
    assert materialization.data_version == "v1"
    assert {k: (v.type, v.value) for k, v in materialization.metadata.items()} == {
        "rows": ("int", 3), "kind": ("text", "x")
    }
    [check] = [e for e in events if isinstance(e, AssetCheckResult)]
    assert (check.check_name, check.passed, check.severity) == ("not_null", False, "WARN")
    assert custom_payloads(events) == [{"extras": {}, "run_id": "run-7", "asset_key": "gcs/asset"}]
    assert [e.text for e in events if isinstance(e, PipesExternalStreamEvent)] == ["external text via gcs\n"]
    assert "external text via gcs" in capsys.readouterr().out
    closed = events[-1]
    assert isinstance(closed, PipesClosedEvent) and closed.exception is None
    assert invocation.session.issue_count == 0
    # What is left in the bucket: the chunks (1..n under one 30-letter prefix); the context object is gone.
    chunks = chunks_in(client, bucket)
    assert reader.last_stats["chunks"] == len(chunks) == stats(env)["chunks"]
    lines = [line for data in chunks for line in data.decode().split("\n")]
    assert [json.loads(line)["method"] for line in lines] == [
        "opened", "log", "log", "report_asset_materialization", "report_asset_check", "report_custom_message",
        "log_external_stream", "closed",
    ]
    assert not any(data.endswith(b"\n") for data in chunks)  # the reference's layout: no trailing newline


def test_a_20_mb_message_travels_alone_in_its_chunk(
    child: ChildFactory, client: Any, bucket: str
) -> None:
    script, env = child("""
import string
payload = (string.ascii_letters * 400_000)[:20_000_000]
writer = PipesGCSMessageWriter(client, interval=0.05)
with open_pipes(context_loader=PipesGCSContextLoader(client), message_writer=writer) as pipes:
    pipes.report_custom_message("before")
    pipes.report_custom_message(payload)
    pipes.report_custom_message("after")
save_stats(writer)
""")
    invocation, events, reader = run_child(script, env, bucket, client)
    assert invocation.exit_code == 0
    payloads = custom_payloads(events)
    assert len(payloads) == 3
    assert payloads[0] == "before" and payloads[2] == "after"
    expected = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 400_000)[:20_000_000]
    assert len(payloads[1]) == 20_000_000
    assert hashlib.sha256(payloads[1].encode()).digest() == hashlib.sha256(expected.encode()).digest()
    chunks = chunks_in(client, bucket)
    [big] = [data for data in chunks if len(data) > 20_000_000]
    assert big.count(b"\n") == 0  # alone: one line
    assert all(len(data) < 4 * 1024 * 1024 for data in chunks if data is not big)
    assert reader.last_stats["chunks"] == len(chunks) == stats(env)["chunks"]


def test_10000_messages_across_many_chunks_arrive_in_order(
    child: ChildFactory, client: Any, bucket: str
) -> None:
    script, env = child("""
writer = PipesGCSMessageWriter(client, interval=0.02, max_chunk_bytes=64 * 1024)
with open_pipes(context_loader=PipesGCSContextLoader(client), message_writer=writer) as pipes:
    for i in range(10_000):
        pipes.report_custom_message({"i": i, "pad": "p" * 40})
        if i % 500 == 499:
            time.sleep(0.005)
save_stats(writer)
""")
    started = time.monotonic()
    invocation, events, reader = run_child(script, env, bucket, client, interval=0.02)
    elapsed = time.monotonic() - started
    assert invocation.exit_code == 0
    assert custom_payloads(events) == [{"i": i, "pad": "p" * 40} for i in range(10_000)]
    assert invocation.session.issue_count == 0
    writer_stats = stats(env)
    chunks = chunks_in(client, bucket)
    assert reader.last_stats["chunks"] == writer_stats["chunks"] == len(chunks)
    assert len(chunks) >= 10  # ~0.6 MB of messages under a 64 KiB cap
    assert all(len(data) <= 64 * 1024 for data in chunks)
    assert writer_stats["requests"] == writer_stats["chunks"]  # one request per chunk, no retries needed
    # The reader costs one request per chunk plus one per poll that found nothing new.
    assert reader.last_stats["requests"] <= len(chunks) + elapsed / 0.02 + 5
    print(
        f"\n10,000 messages via GCS: {elapsed:.2f} s end to end (child start included); writer "
        f"{writer_stats['chunks']} chunks / {writer_stats['requests']} requests; reader "
        f"{reader.last_stats['chunks']} chunks / {reader.last_stats['requests']} requests"
    )


def test_child_sigkilled_after_some_chunks_every_uploaded_chunk_is_delivered(
    child: ChildFactory, client: Any, bucket: str
) -> None:
    script, env = child("""
writer = PipesGCSMessageWriter(client, interval=0.03)
pipes = open_pipes(context_loader=PipesGCSContextLoader(client), message_writer=writer)
announced = False
deadline = time.monotonic() + 30
i = 0
while time.monotonic() < deadline:
    pipes.report_custom_message(i)
    i += 1
    if i % 20 == 0:
        time.sleep(0.005)
    if not announced and writer.channel.chunks_uploaded >= 5:
        print("READY", flush=True)
        announced = True
""")
    events: list[PipesEvent] = []
    reader = PipesGCSMessageReader(bucket, client, interval=0.05)
    with open_pipes_session(None, PipesGCSContextInjector(bucket, client), reader, on_event=events.append) as session:
        process = subprocess.Popen([PYTHON, str(script)], env={**os.environ, **env, **session.get_bootstrap_env_vars()},
                                   stdout=subprocess.PIPE)
        assert process.stdout is not None
        assert process.stdout.readline() == b"READY\n"
        time.sleep(0.2)  # a few more chunks, and a buffer that will never be uploaded
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
        process.stdout.close()
    chunks = chunks_in(client, bucket)
    assert len(chunks) >= 5
    uploaded = [json.loads(line) for data in chunks for line in data.decode().split("\n")]
    uploaded_payloads = [m["params"]["payload"] for m in uploaded if m["method"] == "report_custom_message"]
    assert uploaded_payloads == list(range(len(uploaded_payloads)))
    # Everything that reached the store was delivered, in order, and nothing else.
    assert custom_payloads(events) == uploaded_payloads
    assert reader.last_stats["chunks"] == len(chunks)
    assert session.opened and not session.closed


@pytest.mark.slow
def test_500_chunks_none_lost(child: ChildFactory, client: Any, bucket: str) -> None:
    # max_chunk_bytes=1: every message is larger, so each travels alone: opened + 498 + closed = 500 chunks.
    script, env = child("""
writer = PipesGCSMessageWriter(client, interval=0.02, max_chunk_bytes=1)
with open_pipes(context_loader=PipesGCSContextLoader(client), message_writer=writer) as pipes:
    for i in range(498):
        pipes.report_custom_message(i)
save_stats(writer)
""")
    invocation, events, reader = run_child(script, env, bucket, client)
    assert invocation.exit_code == 0
    assert custom_payloads(events) == list(range(498))
    assert isinstance(events[0], PipesOpenedEvent) and isinstance(events[-1], PipesClosedEvent)
    names = [blob.name for blob in client.list_blobs(bucket, retry=None, timeout=10)]
    numbers = sorted(int(match.group(1)) for match in map(CHUNK_KEY.match, names) if match is not None)
    assert len(names) == len(numbers) and numbers == list(range(1, 501))  # chunks only, 1..500, no gap
    assert reader.last_stats["chunks"] == stats(env)["chunks"] == 500


# ---------------------------------------------------------------------------------------------- faults


def test_503s_and_dropped_connections_are_retried_nothing_lost_or_duplicated(
    child: ChildFactory, gcs_server: Server, client: Any, bucket: str
) -> None:
    with RecordingProxy(gcs_server.url) as proxy:
        proxy_client = make_client(proxy.url)
        script, env = child("""
writer = PipesGCSMessageWriter(client, interval=0.03, retry=FAST_RETRY)
with open_pipes(context_loader=PipesGCSContextLoader(client, retry=FAST_RETRY), message_writer=writer) as pipes:
    for i in range(1000):
        pipes.report_custom_message(i)
        if i % 10 == 9:
            time.sleep(0.015)
save_stats(writer)
""", endpoint=proxy.url)
        # Faults on object requests only ("/o" in the path), not on google-cloud-storage's background bucket
        # lookup, whose errors it swallows. Each run of faults is shorter than the retry budget (8 attempts).
        # Round 1, armed now: the context upload (POST), the first reads (the child's context download or the
        # reader's first polls) and the context deletion.
        proxy.fail_next(2, 503, method="POST", path_contains="/o")
        proxy.drop_next(1, method="POST", path_contains="/o")
        proxy.fail_next(1, 429, method="POST", path_contains="/o")
        proxy.fail_next(2, 503, method="GET", path_contains="/o")
        proxy.drop_next(1, method="GET", path_contains="/o")
        proxy.fail_next(1, 500, method="GET", path_contains="/o")
        proxy.fail_next(1, 502, method="DELETE", path_contains="/o")
        round_one = 9
        armed = []

        # Round 2, armed mid-stream (when message 100 is read): the child's chunk uploads and the reader's polls.
        def on_event(event: PipesEvent) -> None:
            events.append(event)
            if isinstance(event, PipesCustomMessageEvent) and event.payload == 100:
                proxy.fail_next(2, 503, method="POST", path_contains="/o")
                proxy.drop_next(2, method="POST", path_contains="/o")
                proxy.fail_next(2, 503, method="GET", path_contains="/o")
                proxy.drop_next(1, method="GET", path_contains="/o")
                armed.append(len(proxy.object_requests("POST")))

        events: list[PipesEvent] = []
        reader = PipesGCSMessageReader(bucket, proxy_client, interval=0.03, retry=FAST_RETRY)
        invocation = PipesSubprocessClient(
            context_injector=PipesGCSContextInjector(bucket, proxy_client, retry=FAST_RETRY),
            message_reader=reader,
            forward_stdio=False,
        ).run(command=[PYTHON, str(script)], env=env, on_event=on_event)
        faults = proxy.faults
        uploads = proxy.object_requests("POST")
    assert invocation.exit_code == 0
    assert faults == round_one + 7  # every armed fault was met (and survived)
    assert custom_payloads(events) == list(range(1000))  # nothing lost, nothing duplicated, in order
    assert invocation.session.issue_count == 0
    # Only chunks are left (the context was deleted despite the 502), numbered 1..n: a retried upload reused its
    # chunk number rather than leaving a gap or a duplicate.
    chunks = chunks_in(client, bucket)
    writer_stats = stats(env)
    assert reader.last_stats["chunks"] == writer_stats["chunks"] == len(chunks)
    # Round 2's four upload faults were retried by the child's RetryPolicy: one request per attempt, so the
    # google client's own retry (off) did not hide them; round 1's four hit the context upload.
    assert armed and len(uploads) - armed[0] >= 5
    assert writer_stats["requests"] == writer_stats["chunks"] + 4
    assert len(uploads) == 1 + 4 + writer_stats["requests"]


def test_missing_bucket_fails_fast_on_the_orchestrator_naming_bucket_and_key(gcs_server: Server) -> None:
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with RecordingProxy(gcs_server.url) as proxy:  # no faults: records the requests
        proxy_client = make_client(proxy.url)
        started = time.monotonic()
        with pytest.raises(PipesTransportError) as injector_error:
            with PipesGCSContextInjector(missing, proxy_client).inject_context(PipesRunContext().to_context_data()):
                raise AssertionError("unreachable: the context upload must fail")
        assert len(proxy.object_requests()) == 1  # not retried
        message = str(injector_error.value)
        assert f"bucket {missing!r}" in message
        assert re.search(r"key '[A-Za-z]{30}/context\.json'", message)
        assert "does not exist" in message

        proxy.seen.clear()
        handler = PipesMessageHandler(PipesRunContext().to_context_data())
        with pytest.raises(PipesTransportError) as reader_error:
            with PipesGCSMessageReader(missing, proxy_client, interval=0.05).read_messages(handler) as params:
                # the reader's thread looks at the bucket after its first 404 (and the final drain would too)
                wait_until(lambda: any(path.startswith(f"/storage/v1/b/{missing}?fields=name")
                                       for _, path in list(proxy.seen)), timeout=30)
        # Chunk 1 (404), then one look at the bucket (404): no retries, and no further polls.
        assert proxy.object_requests() == [f"/download/storage/v1/b/{missing}/o/{params['key_prefix']}%2F1.json"
                                           "?alt=media"]
        assert len([path for _, path in proxy.seen if path.startswith(f"/storage/v1/b/{missing}?fields=name")]) == 1
        message = str(reader_error.value)
        assert f"bucket {missing!r}" in message
        assert f"key '{params['key_prefix']}/1.json'" in message
        assert "does not exist" in message
        assert time.monotonic() - started < 30  # a hang guard only: the request lists above prove no retries


def test_missing_bucket_fails_fast_in_the_child_naming_bucket_and_key(
    child: ChildFactory, gcs_server: Server, client: Any, bucket: str
) -> None:
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with RecordingProxy(gcs_server.url) as proxy:  # between the child and the server only: records its requests
        script, env = child("""
writer = PipesGCSMessageWriter(client, interval=0.05)
with open_pipes(context_loader=PipesGCSContextLoader(client), message_writer=writer) as pipes:
    pipes.log.info("this cannot be uploaded")
""", endpoint=proxy.url)
        # The context goes to a real bucket; the messages to one that does not exist.
        reader = PipesGCSMessageReader(missing, client, interval=0.05)
        with pytest.raises(PipesTransportError) as reader_error:
            with open_pipes_session(None, PipesGCSContextInjector(bucket, client), reader) as session:
                started = time.monotonic()
                result = subprocess.run([PYTHON, str(script)], env={**os.environ, **env,
                                        **session.get_bootstrap_env_vars()}, capture_output=True, timeout=60)
                child_seconds = time.monotonic() - started
        key = f"{session.message_params['key_prefix']}/1.json"
        assert result.returncode == 1, f"child: {result!r}; its requests: {proxy.seen}"
        stderr = result.stderr.decode()
        assert "PipesTransportError" in stderr
        assert f"bucket {missing!r}" in stderr and f"key {key!r}" in stderr
        assert "does not exist" in stderr
        # The upload thread's try, and close()'s one more from the main thread: no retries (6 attempts else).
        assert 1 <= len([p for p in proxy.object_requests("POST") if f"/b/{missing}/" in p]) <= 2
        assert child_seconds < 45  # a hang guard only (start-up included): the POST count proves no retries
    assert f"bucket {missing!r}" in str(reader_error.value) and f"key {key!r}" in str(reader_error.value)


def test_a_missing_chunk_is_reported_and_reading_continues(client: Any, bucket: str) -> None:
    events: list[PipesEvent] = []
    reader = PipesGCSMessageReader(bucket, client, interval=0.02, missing_chunk_grace=0.3)
    store = GCSBlobStore(client, bucket)
    with open_pipes_session(None, PipesGCSContextInjector(bucket, client), reader, on_event=events.append) as session:
        prefix = session.message_params["key_prefix"]

        def put(index: int, *messages: tuple[str, Any]) -> None:
            store.put(f"{prefix}/{index}.json", "\n".join(dumps_message(m, p) for m, p in messages).encode())

        put(1, ("opened", {"extras": {}}), ("report_custom_message", {"payload": 1}))
        wait_until(lambda: custom_payloads(events) == [1])
        put(3, ("report_custom_message", {"payload": 3}))  # chunk 2 never comes
        gap_seen = time.monotonic()
        wait_until(lambda: session.issue_count == 1)
        assert time.monotonic() - gap_seen >= 0.3 - 0.05  # it waited the grace period first
        wait_until(lambda: custom_payloads(events) == [1, 3])
        put(4, ("report_custom_message", {"payload": 4}), ("closed", {}))  # reading went on past the gap
        wait_until(lambda: session.closed)
    assert custom_payloads(events) == [1, 3, 4]
    [issue] = session.protocol_issues
    assert f"gs://{bucket}/{prefix}/2.json" in issue.reason
    assert "never appeared" in issue.reason
    assert reader.last_stats["chunks"] == 3


# ---------------------------------------------------------------------------------------------- store


@pytest.mark.parametrize("fault", ["503", "429", "500", "drop"])
def test_store_errors_surface_after_one_request_and_are_classified_transient(
    gcs_server: Server, client: Any, bucket: str, fault: str
) -> None:
    """Every store call makes exactly one request (google-cloud-storage's own retry is off), so a transient fault
    reaches our RetryPolicy, which is what counts and bounds the attempts."""
    client.bucket(bucket).blob("there").upload_from_string(b"x", retry=None)
    with RecordingProxy(gcs_server.url) as proxy:
        store = GCSBlobStore(make_client(proxy.url), bucket)
        calls: list[tuple[str, Callable[[], object]]] = [
            ("POST", lambda: store.put("k", b"data")),
            ("GET", lambda: store.get("there")),
            ("DELETE", lambda: store.delete("there")),
        ]
        for method, call in calls:
            before = len(proxy.object_requests())
            if fault == "drop":
                proxy.drop_next(1, method=method, path_contains="/o")
            else:
                proxy.fail_next(1, int(fault), method=method, path_contains="/o")
            with pytest.raises(Exception) as error:
                call()
            assert store.is_transient(error.value), repr(error.value)
            assert len(proxy.object_requests()) == before + 1, proxy.object_requests()
            call()  # and the next attempt goes through
        assert objects(client, bucket) == {"k": b"data"}


def test_store_permanent_errors_and_not_found(gcs_server: Server, client: Any, bucket: str) -> None:
    with RecordingProxy(gcs_server.url) as proxy:
        store = GCSBlobStore(make_client(proxy.url), bucket)
        proxy.fail_next(1, 403, method="POST", path_contains="/o")
        with pytest.raises(Exception) as error:
            store.put("k", b"x")
        assert not store.is_transient(error.value)
        assert store.get("nothing-here") is None  # a missing object, in a bucket that exists
        store.delete("nothing-here")  # deleting a missing object is not an error
        assert store.url("a/1.json") == f"gs://{bucket}/a/1.json"
        assert len(proxy.object_requests()) == 3
    # Same retry policy, end to end: the 403 fails at once; a 503 is retried.
    with RecordingProxy(gcs_server.url) as proxy:
        store = GCSBlobStore(make_client(proxy.url), bucket)
        proxy.fail_next(1, 403, method="POST", path_contains="/o")
        with pytest.raises(PipesTransportError, match=f"failed \\(error; bucket '{bucket}', key 'k'\\)"):
            FAST_RETRY.call(store, "uploading", "k", lambda: store.put("k", b"x"))
        proxy.fail_next(3, 503, method="POST", path_contains="/o")
        FAST_RETRY.call(store, "uploading", "k", lambda: store.put("k", b"x"))
        assert len(proxy.object_requests("POST")) == 1 + 3 + 1


# ---------------------------------------------------------------------------------------------- writer


def test_writer_uploads_by_size_between_intervals(client: Any, bucket: str) -> None:
    writer = PipesGCSMessageWriter(client, interval=3600, max_chunk_bytes=10_000, retry=FAST_RETRY)
    channel = writer.open({"bucket": bucket, "key_prefix": "sized"})
    assert writer.channel is not None
    # Lines of 999 characters (1,000 bytes with the newline): exactly 10 fit in one 10,000-byte chunk.
    pad = 999 - len(dumps_message("report_custom_message", {"payload": ""})) - 4
    lines = [dumps_message("report_custom_message", {"payload": f"{i:04d}" + "x" * pad}) for i in range(35)]
    assert {len(line) for line in lines} == {999}
    for line in lines:
        channel.write_line(line)
    wait_until(lambda: writer.channel is not None and writer.channel.chunks_uploaded == 3, timeout=60)
    time.sleep(0.3)  # below the size and an hour from the interval: the other 5 lines stay buffered
    stored = objects(client, bucket, prefix="sized/")
    assert sorted(stored) == ["sized/1.json", "sized/2.json", "sized/3.json"]
    for n in (1, 2, 3):
        assert stored[f"sized/{n}.json"].decode().split("\n") == lines[(n - 1) * 10:n * 10]
    big = dumps_message("report_custom_message", {"payload": "y" * 25_000})
    channel.write_line(big)
    channel.close()
    stored = objects(client, bucket, prefix="sized/")
    assert sorted(stored) == [f"sized/{n}.json" for n in (1, 2, 3, 4, 5)]
    assert stored["sized/4.json"].decode().split("\n") == lines[30:]
    assert stored["sized/5.json"].decode() == big  # larger than max_chunk_bytes: alone in its chunk
    assert writer.channel.chunks_uploaded == 5 and writer.channel.requests == 5


def test_buffered_messages_are_flushed_at_exit_when_the_child_never_closes(
    child: ChildFactory, client: Any, bucket: str
) -> None:
    # Also the default client: storage.Client() finds the emulator through STORAGE_EMULATOR_HOST.
    script, env = child("""
writer = PipesGCSMessageWriter(interval=3600)
pipes = open_pipes(context_loader=PipesGCSContextLoader(), message_writer=writer)
for i in range(100):
    pipes.report_custom_message(i)
assert writer.channel.chunks_uploaded == 0
# never closed: the atexit hook uploads what is buffered
""")
    invocation, events, reader = run_child(script, env, bucket, client)
    assert invocation.exit_code == 0
    assert invocation.missing_closed
    assert isinstance(events[0], PipesOpenedEvent)
    assert custom_payloads(events) == list(range(100))
    assert len(chunks_in(client, bucket)) == 1 == reader.last_stats["chunks"]


# ---------------------------------------------------------------------------------------------- interop


@pytest.mark.interop
def test_dagster_pipes_child_with_its_gcs_writer_and_loader_is_read_by_ours(
    child: ChildFactory, client: Any, bucket: str
) -> None:
    script, env = child("""
import dagster_pipes as dp

with dp.open_dagster_pipes(
    context_loader=dp.PipesGCSContextLoader(client), message_writer=dp.PipesGCSMessageWriter(client, interval=1)
) as pipes:
    pipes.log.info("from dagster-pipes")
    pipes.report_asset_materialization(metadata={"rows": 5}, data_version="dv")
    pipes.report_asset_check("positive", passed=True)
    pipes.report_custom_message({"extras": pipes.extras, "partition": pipes.partition_key})
    pipes.log_external_stream("stderr", "dagster-pipes stream\\n")
""")
    events: list[PipesEvent] = []
    reader = PipesGCSMessageReader(bucket, client, interval=0.05)
    invocation = PipesSubprocessClient(
        context_injector=PipesGCSContextInjector(bucket, client, key_prefix="ctx-"),
        message_reader=reader,
        forward_stdio=False,
    ).run(
        context=PipesRunContext(asset_keys=["dp_asset"], partition_key="2024-05-01"),
        command=[PYTHON, str(script)], env=env, extras={"from": "us"}, on_event=events.append,
    )
    assert invocation.exit_code == 0
    assert [type(e) for e in events] == [
        PipesOpenedEvent, PipesLogEvent, MaterializeResult, AssetCheckResult, PipesCustomMessageEvent,
        PipesExternalStreamEvent, PipesClosedEvent,
    ]
    [materialization] = [r for r in invocation.get_results() if isinstance(r, MaterializeResult)]
    assert not materialization.implicit
    assert (materialization.asset_key, materialization.data_version) == ("dp_asset", "dv")
    assert materialization.metadata["rows"] == MetadataValue("int", 5)
    assert custom_payloads(events) == [{"extras": {"from": "us"}, "partition": "2024-05-01"}]
    assert invocation.session.issue_count == 0
    assert reader.last_stats["chunks"] == len(chunks_in(client, bucket)) >= 1


@pytest.mark.interop
@pytest.mark.filterwarnings(
    "ignore:Function `PipesMessageReader.expected_writer_count` is currently in preview"
    ":dagster_shared.utils.warnings.PreviewWarning"
)
def test_our_writer_is_read_by_dagsters_gcs_reader(
    child: ChildFactory, client: Any, bucket: str
) -> None:
    """Dagster's own GCS reader (``dagster_gcp.pipes.PipesGCSMessageReader``) reads what our writer uploads."""
    import dagster as dg
    from dagster_gcp.pipes import PipesGCSMessageReader

    script, env = child("""
writer = PipesGCSMessageWriter(client, interval=0.05)
with open_pipes(message_writer=writer) as pipes:
    pipes.log.info("from pipes_ext")
    pipes.report_asset_materialization(metadata={"rows": 7}, data_version="ours")
    pipes.report_custom_message({"extras": pipes.extras})
""")
    stash: dict[str, Any] = {}

    @dg.asset(name="gcs_interop")
    # ``context`` unannotated: with the future import, Dagster would have to resolve a string annotation.
    def gcs_interop(context):  # type: ignore[no-untyped-def]
        runner = dg.PipesSubprocessClient(
            env=env,
            context_injector=dg.PipesEnvContextInjector(),
            message_reader=PipesGCSMessageReader(interval=0, bucket=bucket, client=client),
        )
        invocation = runner.run(context=context, command=[PYTHON, str(script)], extras={"k": "v"})
        stash["custom"] = invocation.get_custom_messages()
        yield from invocation.get_results()

    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([gcs_interop], instance=instance)
        assert result.success
        [materialization] = result.asset_materializations_for_node("gcs_interop")
        assert materialization.metadata == {"rows": dg.MetadataValue.int(7)}
        assert materialization.tags is not None and materialization.tags["dagster/data_version"] == "ours"
        assert list(stash["custom"]) == [{"extras": {"k": "v"}}]
        logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
        assert "from pipes_ext" in logs
