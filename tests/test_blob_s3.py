"""The S3 channels (pipes_ext.s3 / pipes_core.s3) against a real local S3 server (moto), no mocks.

One moto server per test session (started by tests.support.servers, stopped by its own pid), one bucket per test.
Faults (503s, dropped connections, slow answers) come from tests.support.faultproxy.FaultProxy sitting between a
boto3 client and moto; those clients make exactly one attempt per call (``total_max_attempts=1``: botocore's
``max_attempts`` counts *retries*), so the retries observed are the library's own.

No ``from __future__ import annotations``: Dagster inspects the asset function's annotations at runtime.
"""

import json
import os
import re
import secrets
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from pipes_core import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExternalStreamEvent,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesRunContext,
    PipesSession,
    PipesSubprocessClient,
    PipesTransportError,
    open_pipes_session,
)
from pipes_core.channels.blob import GAP_PROBE_CHUNKS
from pipes_core.s3 import PipesS3ContextInjector, PipesS3MessageReader
from pipes_ext import PipesContext, PipesMappingParamsLoader, open_pipes
from pipes_ext._blob import RetryPolicy
from pipes_ext.s3 import PipesS3ContextLoader, PipesS3MessageWriter
from tests.support import servers
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import PYTHON, wait_until

REGION = "us-east-1"
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
# One attempt per SDK call: the retries under test are pipes_ext's (RetryPolicy), not botocore's.
ONE_ATTEMPT = {"total_max_attempts": 1, "mode": "standard"}

# Every child builds its client with a bare boto3.client("s3"): endpoint, keys and region come from here.
CHILD_PRELUDE = """
import os, sys, time

import boto3

from pipes_ext import open_pipes
from pipes_ext.s3 import PipesS3ContextLoader, PipesS3MessageWriter

client = boto3.client("s3")
"""


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def moto() -> Iterator[servers.Server]:
    server = servers.start_moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., Any]]:
    """boto3 S3 clients for a given endpoint, closed at the end of the test."""
    made: list[Any] = []

    def make(endpoint: str, *, one_attempt: bool = False, **config: Any) -> Any:
        if one_attempt:
            config["retries"] = ONE_ATTEMPT
        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, config=Config(**config), **KEYS)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(moto: servers.Server, make_client: Callable[..., Any]) -> Any:
    return make_client(moto.url)


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"pipes-{uuid.uuid4().hex[:24]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto: servers.Server) -> Iterator[FaultProxy]:
    with FaultProxy(moto.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def proxied(proxy: FaultProxy, make_client: Callable[..., Any]) -> Any:
    """A client through the fault proxy, one attempt per call."""
    return make_client(proxy.url, one_attempt=True)


# ---------------------------------------------------------------------------------------------- helpers



def chunk_objects(client: Any, bucket: str, prefix: str) -> list[bytes]:
    """The chunks under ``prefix`` in chunk order; asserts they are exactly 1.json .. n.json."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys += [entry["Key"] for entry in page.get("Contents", [])]
    numbers = sorted(int(key[len(prefix) + 1 : -len(".json")]) for key in keys)
    assert numbers == list(range(1, len(keys) + 1)), f"chunk numbering has gaps: {numbers}"
    return [client.get_object(Bucket=bucket, Key=f"{prefix}/{n}.json")["Body"].read() for n in numbers]


def all_keys(client: Any, bucket: str) -> list[str]:
    return [entry["Key"] for entry in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def payloads(session: PipesSession) -> list[Any]:
    return session.get_custom_messages()


def s3_session(
    client: Any, bucket: str, reader_client: Any = None, *, context: PipesRunContext | None = None,
    on_event: Callable[[PipesEvent], None] | None = None, **reader_kw: Any,
) -> Any:
    reader = PipesS3MessageReader(bucket, reader_client if reader_client is not None else client, **reader_kw)
    return open_pipes_session(context, PipesS3ContextInjector(bucket, client), reader, on_event=on_event)


@contextmanager
def external(session: PipesSession, client: Any, **writer_kw: Any) -> Iterator[tuple[PipesContext, Any]]:
    """The external side in this process: context from S3, messages to S3; yields (context, channel)."""
    writer = PipesS3MessageWriter(client, **writer_kw)
    with open_pipes(
        context_loader=PipesS3ContextLoader(client),
        message_writer=writer,
        params_loader=PipesMappingParamsLoader(session.get_bootstrap_env_vars()),
    ) as pipes:
        yield pipes, writer.channel


def child_env(endpoint: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without any AWS_* setting of the runner's, plus the local server's."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEYS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": KEYS["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    env.update(extra or {})
    return env


def run_child(script: Path, endpoint: str, session: PipesSession, timeout: float = 60) -> None:
    completed = subprocess.run(
        [PYTHON, str(script)], env=child_env(endpoint, session.get_bootstrap_env_vars()),
        capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr
    assert "not uploaded" not in completed.stderr


# ---------------------------------------------------------------------------------------------- context


def test_context_round_trip_and_cleanup(client: Any, bucket: str) -> None:
    data = PipesRunContext(asset_keys=["a", ["b", "c/d"]], partition_key="p1").to_context_data(
        {"k": "v", "unicode": "h\u00e9llo \U0001f680", "nested": {"n": [1, None]}}
    )
    for key_prefix, pattern in ((None, r"[A-Za-z]{30}/context\.json"), ("ctx/", r"ctx/[A-Za-z]{30}/context\.json")):
        injector = PipesS3ContextInjector(bucket, client, key_prefix=key_prefix)
        with injector.inject_context(data) as params:
            assert set(params) == {"bucket", "key"}
            assert params["bucket"] == bucket
            assert re.fullmatch(pattern, params["key"]), params["key"]
            assert all_keys(client, bucket) == [params["key"]]
            stored = client.get_object(Bucket=bucket, Key=params["key"])["Body"].read()
            assert json.loads(stored) == data
            assert PipesS3ContextLoader(client).load_context(params) == data
        assert all_keys(client, bucket) == []  # deleted after the session
        with pytest.raises(PipesTransportError, match="does not exist"):
            PipesS3ContextLoader(client).load_context(params)


# ---------------------------------------------------------------------------------------------- end to end


ALL_METHODS_CHILD = CHILD_PRELUDE + """
with open_pipes(context_loader=PipesS3ContextLoader(client),
                message_writer=PipesS3MessageWriter(client, interval=0.1)) as pipes:
    pipes.log.info("hello from %s", pipes.asset_key)
    pipes.report_asset_materialization(metadata={"rows": 3, "where": {"raw_value": "/x", "type": "path"}},
                                       data_version="v1")
    pipes.report_asset_check("non_empty", passed=True, severity="WARN", metadata={"n": 3})
    pipes.report_custom_message({"extras": pipes.extras, "run_id": pipes.run_id})
    pipes.log_external_stream("stderr", "external text\\n", extras={"k": 1})
"""


def test_all_seven_methods_from_a_subprocess(
    moto: servers.Server, client: Any, bucket: str, write_script: Callable[..., Path]
) -> None:
    script = write_script(ALL_METHODS_CHILD)
    events: list[PipesEvent] = []
    streams: list[tuple[str, str]] = []
    context = PipesRunContext(asset_keys=["a"])
    reader = PipesS3MessageReader(bucket, client, interval=0.05)
    with open_pipes_session(
        context, PipesS3ContextInjector(bucket, client), reader, extras={"rows": 3},
        on_event=events.append, external_stream_handler=lambda stream, text: streams.append((stream, text)),
    ) as session:
        assert session.message_params == {"bucket": bucket, "key_prefix": session.message_params["key_prefix"],
                                          "include_stdio_in_messages": False}
        run_child(script, moto.url, session)
    prefix = session.message_params["key_prefix"]
    assert events == [
        PipesOpenedEvent({}),
        PipesLogEvent("INFO", "hello from a"),
        MaterializeResult("a", {"rows": MetadataValue("int", 3), "where": MetadataValue("path", "/x")}, "v1"),
        AssetCheckResult("a", "non_empty", True, "WARN", {"n": MetadataValue("int", 3)}),
        PipesCustomMessageEvent({"extras": {"rows": 3}, "run_id": context.run_id}),
        PipesExternalStreamEvent("stderr", "external text\n", {"k": 1}),
        PipesClosedEvent(None),
    ]
    assert streams == [("stderr", "external text\n")]
    assert session.issue_count == 0
    # The messages really went through S3: the chunks are there; the context object is gone.
    lines = b"\n".join(chunk_objects(client, bucket, prefix)).split(b"\n")
    assert [json.loads(line)["method"] for line in lines] == [
        "opened", "log", "report_asset_materialization", "report_asset_check", "report_custom_message",
        "log_external_stream", "closed",
    ]
    assert all(key.startswith(f"{prefix}/") for key in all_keys(client, bucket))
    assert reader.last_stats["chunks"] == len(chunk_objects(client, bucket, prefix))


def test_a_20_mb_message(client: Any, bucket: str) -> None:
    big = secrets.token_hex(10 * 1024 * 1024)  # 20 MiB of text
    with s3_session(client, bucket, interval=0.05) as session:
        with external(session, client, interval=0.05) as (pipes, channel):
            pipes.report_custom_message("before")
            pipes.report_custom_message(big)
            pipes.report_custom_message("after")
    received = payloads(session)
    assert len(received) == 3
    assert received[0] == "before" and received[2] == "after"
    assert received[1] == big
    assert session.closed and session.issue_count == 0
    # The big message travelled alone in its chunk; the others were not held back with it.
    chunks = chunk_objects(client, bucket, session.message_params["key_prefix"])
    oversized = [chunk for chunk in chunks if len(chunk) > channel.max_chunk_bytes]
    assert len(oversized) == 1
    assert oversized[0].count(b"\n") == 0 and len(oversized[0]) > 20 * 1024 * 1024


def test_10000_messages_in_many_chunks_in_order(client: Any, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    count = 10_000
    cap = 8 * 1024
    started = time.monotonic()
    with s3_session(client, bucket, interval=0.05) as session:
        with external(session, client, interval=0.05, max_chunk_bytes=cap) as (pipes, channel):
            for i in range(count):
                pipes.report_custom_message({"i": i, "pad": "p" * 40})
    elapsed = time.monotonic() - started
    stats = session.message_reader.last_stats
    with capsys.disabled():
        print(
            f"\n[s3 10,000 messages] {elapsed:.2f} s; writer: {channel.chunks_uploaded} chunks, "
            f"{channel.requests} requests; reader: {stats['chunks']} chunks, {stats['requests']} requests"
        )
    assert [p["i"] for p in payloads(session)] == list(range(count))
    assert session.closed and session.issue_count == 0 and session.message_count == count + 2
    chunks = chunk_objects(client, bucket, session.message_params["key_prefix"])
    assert len(chunks) == channel.chunks_uploaded == stats["chunks"]
    assert len(chunks) >= 100  # ~0.7 MB of lines at 8 KiB a chunk
    assert max(len(chunk) for chunk in chunks) <= cap
    assert channel.requests == channel.chunks_uploaded  # no fault, no retry
    assert stats["requests"] >= stats["chunks"]


SIGKILL_CHILD = CHILD_PRELUDE + """
writer = PipesS3MessageWriter(client, interval=0.05)
pipes = open_pipes(context_loader=PipesS3ContextLoader(client), message_writer=writer)
for i in range(60):
    pipes.report_custom_message(i)
    time.sleep(0.004)
# wait until everything written so far is stored, in several chunks, then hang until killed
while writer.channel._pending_count() or writer.channel.chunks_uploaded < 3:
    time.sleep(0.01)
print("uploaded", writer.channel.chunks_uploaded, flush=True)
time.sleep(120)
"""


def test_sigkilled_process_every_uploaded_chunk_is_delivered(
    moto: servers.Server, client: Any, bucket: str, write_script: Callable[..., Path]
) -> None:
    script = write_script(SIGKILL_CHILD)
    with s3_session(client, bucket, interval=0.05) as session:
        child = subprocess.Popen(
            [PYTHON, str(script)], env=child_env(moto.url, session.get_bootstrap_env_vars()),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert child.stdout is not None and child.stderr is not None
        try:
            ready, _, _ = select.select([child.stdout], [], [], 30)
            line = child.stdout.readline() if ready else ""
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        stderr = child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        assert line.startswith("uploaded "), stderr
        uploaded = int(line.split()[1])
    assert child.returncode == -signal.SIGKILL
    chunks = chunk_objects(client, bucket, session.message_params["key_prefix"])
    assert len(chunks) == uploaded >= 3
    assert payloads(session) == list(range(60))
    assert session.opened and not session.closed
    assert session.message_reader.last_stats["chunks"] == uploaded


@pytest.mark.slow
def test_500_chunks_none_lost(client: Any, bucket: str) -> None:
    # max_chunk_bytes=1: every message is its own chunk (opened + 498 + closed = 500). The reader polls once at
    # the start and then only when the session ends: it must drain all 500 then, not one per interval.
    with s3_session(client, bucket, interval=30) as session:
        with external(session, client, interval=30, max_chunk_bytes=1) as (pipes, channel):
            for i in range(498):
                pipes.report_custom_message(i)
        assert channel.chunks_uploaded == 500
    assert payloads(session) == list(range(498))
    assert session.closed and session.issue_count == 0
    stats = session.message_reader.last_stats
    assert stats["chunks"] == 500
    assert 500 <= stats["requests"] <= 506 + GAP_PROBE_CHUNKS  # one per chunk, a few misses, the final gap probe


# ---------------------------------------------------------------------------------------------- faults


def test_transient_errors_on_puts_and_gets_are_retried(
    client: Any, bucket: str, proxy: FaultProxy, proxied: Any
) -> None:
    count = 200
    # The reader reads at its first poll (nothing there yet) and then when the session ends, so its faults
    # below hit GETs of chunks that exist.
    with s3_session(client, bucket, proxied, interval=30) as session:
        with external(session, proxied, interval=30, max_chunk_bytes=2000) as (pipes, channel):
            proxy.fail_next(2, 503, path_contains="/2.json", method="PUT")
            proxy.drop_next(2, path_contains="/3.json", method="PUT")
            proxy.fail_next(2, 503, path_contains="/2.json", method="GET")
            proxy.drop_next(2, path_contains="/3.json", method="GET")
            proxy.fail_next(1, 500, path_contains="/4.json", method="GET")
            for i in range(count):
                pipes.report_custom_message({"i": i, "pad": "x" * 60})
    assert [p["i"] for p in payloads(session)] == list(range(count))  # nothing lost, nothing twice
    assert session.closed and session.issue_count == 0
    assert proxy.faults == 9
    chunks = chunk_objects(client, bucket, session.message_params["key_prefix"])
    assert len(chunks) == channel.chunks_uploaded >= 5
    assert channel.requests == channel.chunks_uploaded + 4
    stats = session.message_reader.last_stats
    assert stats["chunks"] == len(chunks)
    assert stats["requests"] >= stats["chunks"] + 5


def test_an_outage_longer_than_the_retry_budget_does_not_stop_either_side(
    client: Any, bucket: str, proxy: FaultProxy, proxied: Any
) -> None:
    # Two attempts per call, and 4 faults in a row: each outage outlasts two rounds of retries. Neither the
    # writer's upload thread nor the reader may give up for good: delivery is live again afterwards.
    retry = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)
    with s3_session(client, bucket, proxied, interval=0.05, retry=retry) as session:
        with external(session, proxied, interval=0.05, retry=retry) as (pipes, channel):
            pipes.report_custom_message("before")
            wait_until(lambda: payloads(session) == ["before"], what="the first message")
            proxy.fail_next(4, 503, method="PUT")
            pipes.report_custom_message("after a PUT outage")
            wait_until(lambda: payloads(session)[-1:] == ["after a PUT outage"], what="delivery after the PUT outage")
            proxy.fail_next(4, 503, method="GET")
            wait_until(lambda: proxy.faults == 8, what="the GET outage")
            pipes.report_custom_message("after a GET outage")
            wait_until(lambda: payloads(session)[-1:] == ["after a GET outage"], what="delivery after the GET outage")
            assert channel.error is None
    assert payloads(session) == ["before", "after a PUT outage", "after a GET outage"]
    assert session.closed and session.issue_count == 0
    assert len(chunk_objects(client, bucket, session.message_params["key_prefix"])) == channel.chunks_uploaded


@pytest.mark.slow
def test_slow_responses_and_read_timeouts(
    client: Any, bucket: str, proxy: FaultProxy, make_client: Callable[..., Any]
) -> None:
    slow = make_client(proxy.url, one_attempt=True, read_timeout=0.5, connect_timeout=2)
    with s3_session(client, bucket, slow, interval=30) as session:
        wait_until(lambda: proxy.requests >= 1, what="the reader's first poll")  # it looks for chunk 1 only
        with external(session, slow, interval=30, max_chunk_bytes=500) as (pipes, channel):
            # chunk 2's PUT answers after the client gave up: retried, and stored once under the same number
            proxy.delay_next(1, 1.2, path_contains="/2.json")
            for i in range(40):
                pipes.report_custom_message({"i": i, "pad": "y" * 30})
        # the final drain: one slow GET (under the timeout) and one past the timeout (retried)
        proxy.delay_next(1, 0.3, path_contains="/3.json")
        proxy.delay_next(1, 1.0, path_contains="/4.json")
        time.sleep(1.0)  # let chunk 2's late original PUT land (an overwrite with the same bytes)
    assert [p["i"] for p in payloads(session)] == list(range(40))
    assert session.closed and session.issue_count == 0
    assert proxy.faults == 3
    assert channel.requests == channel.chunks_uploaded + 1
    stats = session.message_reader.last_stats
    assert stats["requests"] >= stats["chunks"] + 1
    assert len(chunk_objects(client, bucket, session.message_params["key_prefix"])) == channel.chunks_uploaded


def test_no_such_bucket_fails_fast_on_both_sides(client: Any, bucket: str) -> None:
    missing = f"missing-{uuid.uuid4().hex[:20]}"
    # The context goes to an existing bucket; the reader (and so the writer) use the missing one.
    reader = PipesS3MessageReader(missing, client, interval=0.05)
    with pytest.raises(PipesTransportError) as reader_error:
        with open_pipes_session(None, PipesS3ContextInjector(bucket, client), reader) as session:
            with pytest.raises(PipesTransportError) as writer_error:
                with external(session, client, interval=30) as (_, channel):
                    pass
            # no retrying of a permanent error: the upload thread's one PUT, and close()'s one more
            assert 1 <= channel.requests <= 2
    prefix = session.message_params["key_prefix"]
    for error in (writer_error.value, reader_error.value):
        text = str(error)
        assert missing in text and f"{prefix}/1.json" in text and "NoSuchBucket" in text, text
    assert "message(s) could not be uploaded" in str(writer_error.value)
    # the loader and the injector name the bucket and key too
    with pytest.raises(PipesTransportError, match=rf"{missing}.*ctx/context\.json.*NoSuchBucket"):
        PipesS3ContextLoader(client).load_context({"bucket": missing, "key": "ctx/context.json"})
    with pytest.raises(PipesTransportError, match=rf"{missing}.*context\.json.*NoSuchBucket"):
        with PipesS3ContextInjector(missing, client).inject_context(PipesRunContext().to_context_data()):
            pass


@pytest.fixture
def denying_s3(make_client: Callable[..., Any]) -> Iterator[tuple[servers.Server, Any, str]]:
    """A second moto server that enforces IAM: (server, client of a user with no permissions, bucket)."""
    port = servers.free_port()
    process = subprocess.Popen(
        [servers.bin_path("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        # the first 3 actions (create the bucket, the user, its key) are not checked; everything after is
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    server = servers.Server(process, f"http://127.0.0.1:{port}")
    try:
        servers.wait_http(f"{server.url}/moto-api/", process)
        admin = make_client(server.url)
        iam = boto3.client("iam", endpoint_url=server.url, region_name=REGION, **KEYS)
        name = f"denied-{uuid.uuid4().hex[:20]}"
        admin.create_bucket(Bucket=name)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        iam.close()
        denied = boto3.client("s3", endpoint_url=server.url, region_name=REGION, config=Config(retries=ONE_ATTEMPT),
                              aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        try:
            yield server, denied, name
        finally:
            denied.close()
    finally:
        server.stop()


def test_access_denied_fails_fast_on_both_sides(
    client: Any, bucket: str, denying_s3: tuple[servers.Server, Any, str]
) -> None:
    _, denied, denied_bucket = denying_s3
    try:
        denied.get_object(Bucket=denied_bucket, Key="probe")
    except Exception as exc:
        if getattr(exc, "response", {}).get("Error", {}).get("Code") != "AccessDenied":
            pytest.skip(f"this moto does not enforce IAM: {exc}")
    else:  # pragma: no cover
        pytest.skip("this moto does not enforce IAM")
    # The context goes through the main server; messages through the denying one.
    reader = PipesS3MessageReader(denied_bucket, denied, interval=0.05)
    with pytest.raises(PipesTransportError) as reader_error:
        with open_pipes_session(None, PipesS3ContextInjector(bucket, client), reader) as session:
            writer = PipesS3MessageWriter(denied, interval=30)
            channel = writer.open(session.message_params)
            channel.write_line('{"not": "read"}')
            with pytest.raises(PipesTransportError) as writer_error:
                channel.close()
            # no retrying of a permanent error: the upload thread's one PUT, and close()'s one more
            assert writer.channel is not None and writer.channel.requests <= 2
    prefix = session.message_params["key_prefix"]
    for error in (writer_error.value, reader_error.value):
        text = str(error)
        assert denied_bucket in text and f"{prefix}/1.json" in text and "AccessDenied" in text, text
    assert "1 message(s) could not be uploaded" in str(writer_error.value)


def test_missing_chunk_is_reported_and_reading_goes_on(
    client: Any, bucket: str, proxy: FaultProxy, proxied: Any
) -> None:
    # The reader goes through the proxy, which holds its first GET of chunk 2 for 1.5 s: by the time it is
    # answered, chunk 2 has been written and deleted, whatever the timing of the reader's polls.
    proxy.delay_next(1, 1.5, path_contains="/2.json")
    with s3_session(client, bucket, proxied, interval=0.3, missing_chunk_grace=0.1) as session:
        prefix = session.message_params["key_prefix"]
        with external(session, client, interval=30, max_chunk_bytes=1) as (pipes, channel):
            for text in ("in chunk 2", "in chunk 3", "in chunk 4"):  # opened is chunk 1
                pipes.report_custom_message(text)
            wait_until(lambda: channel.chunks_uploaded == 4, what="4 chunks")
            client.delete_object(Bucket=bucket, Key=f"{prefix}/2.json")
            wait_until(lambda: session.issue_count == 1, what="the missing chunk to be reported")
            wait_until(lambda: len(payloads(session)) == 2, what="the chunks after the gap")  # while still running
            assert not session.closed
            pipes.report_custom_message("after the gap")
    assert payloads(session) == ["in chunk 3", "in chunk 4", "after the gap"]
    assert session.closed and proxy.faults == 1
    [issue] = session.protocol_issues
    assert f"s3://{bucket}/{prefix}/2.json" in issue.reason and "never appeared" in issue.reason


# ---------------------------------------------------------------------------------------------- writer


def test_writer_uploads_on_size_with_chunks_near_the_cap(client: Any, bucket: str) -> None:
    cap = 64 * 1024
    writer = PipesS3MessageWriter(client, interval=60, max_chunk_bytes=cap)
    channel = writer.open({"bucket": bucket, "key_prefix": "burst"})
    lines = [json.dumps({"i": i, "pad": "x" * 600}) for i in range(2000)]
    lines.insert(1000, json.dumps({"big": "z" * (2 * cap)}))  # one message over the cap travels alone
    total = sum(len(line) + 1 for line in lines)
    for line in lines:
        channel.write_line(line)
    # uploaded because of size, long before the 60 s interval
    wait_until(lambda: channel.chunks_uploaded >= total // cap - 3, timeout=20, what="size-triggered uploads")
    channel.close()
    chunks = chunk_objects(client, bucket, "burst")
    assert b"\n".join(chunks).decode().split("\n") == lines
    oversized = [chunk for chunk in chunks if len(chunk) > cap]
    assert len(oversized) == 1 and oversized[0].count(b"\n") == 0
    assert all(len(chunk) <= cap for chunk in chunks if chunk is not oversized[0])
    assert total // cap <= len(chunks) <= total // cap + 4


def test_writer_keeps_messages_across_a_failed_upload(
    client: Any, bucket: str, proxy: FaultProxy, proxied: Any
) -> None:
    # Two attempts only, both fail: the first upload round fails. Its line is kept, and the next round (after a
    # pause) uploads it, with what came meanwhile, under the same chunk number.
    retry = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.3)
    writer = PipesS3MessageWriter(proxied, interval=0.05, retry=retry)
    proxy.fail_next(2, 503, method="PUT")
    channel = writer.open({"bucket": bucket, "key_prefix": "kept"})
    channel.write_line("first")
    wait_until(lambda: proxy.faults == 2, what="the failed upload")
    assert all_keys(client, bucket) == []
    channel.write_line("second")
    wait_until(lambda: channel.chunks_uploaded == 1, what="the retried upload")
    assert chunk_objects(client, bucket, "kept") == [b"first\nsecond"]
    channel.write_line("third")
    channel.close()
    assert chunk_objects(client, bucket, "kept") == [b"first\nsecond", b"third"]
    assert channel.error is None and channel.requests == 4


def test_everything_is_uploaded_before_closed(client: Any, bucket: str) -> None:
    events: list[PipesEvent] = []
    with s3_session(client, bucket, interval=0.05, on_event=events.append) as session:
        prefix = session.message_params["key_prefix"]
        with external(session, client, interval=60, max_chunk_bytes=1_000_000) as (pipes, channel):
            for i in range(2000):
                pipes.report_custom_message(i)
            time.sleep(0.3)
            # ~200 KB buffered: under both the size cap and the interval, so nothing is uploaded yet
            assert channel.chunks_uploaded == 0
            assert not any(key.startswith(f"{prefix}/") for key in all_keys(client, bucket))
        assert channel.chunks_uploaded >= 1  # close() returned after uploading
    assert payloads(session) == list(range(2000))
    assert isinstance(events[-1], PipesClosedEvent) and len(events) == 2002
    last_line = chunk_objects(client, bucket, prefix)[-1].split(b"\n")[-1]
    assert json.loads(last_line)["method"] == "closed"


ATEXIT_CHILD = CHILD_PRELUDE + """
pipes = open_pipes(context_loader=PipesS3ContextLoader(client),
                   message_writer=PipesS3MessageWriter(client, interval=60))
for i in range(100):
    pipes.report_custom_message(i)
# no close(): the atexit hook must upload the buffered messages
"""


def test_atexit_flush_when_the_context_is_never_closed(
    moto: servers.Server, client: Any, bucket: str, write_script: Callable[..., Path]
) -> None:
    script = write_script(ATEXIT_CHILD)
    with s3_session(client, bucket, interval=0.05) as session:
        started = time.monotonic()
        run_child(script, moto.url, session)
        assert time.monotonic() - started < 30  # not the 60 s interval
    assert payloads(session) == list(range(100))
    assert session.opened and not session.closed


def test_close_timeout_exceeded_is_reported(client: Any, bucket: str, proxy: FaultProxy, proxied: Any) -> None:
    writer = PipesS3MessageWriter(proxied, interval=60, close_timeout=0.5)
    channel = writer.open({"bucket": bucket, "key_prefix": "late"})
    # The upload is held far longer than close_timeout, so close() can only return in time by giving up.
    proxy.delay_next(1, 6.0, path_contains="/late/1.json")
    for i in range(25):
        channel.write_line(json.dumps(i))
    started = time.monotonic()
    with pytest.raises(PipesTransportError, match=r"more than 0\.5 s; 25 message\(s\) were not uploaded"):
        channel.close()
    assert time.monotonic() - started < 5.0  # it did not wait for the held upload
    with pytest.raises(PipesTransportError, match="closed"):
        channel.write_line("too late")
    # The late upload still lands (the daemon thread finishes it if the process lives on).
    wait_until(lambda: channel.chunks_uploaded == 1, timeout=30, what="the delayed upload")
    assert chunk_objects(client, bucket, "late") == ["\n".join(json.dumps(i) for i in range(25)).encode()]


# ---------------------------------------------------------------------------------------------- interop


DAGSTER_PIPES_CHILD = """
import time

import boto3
from dagster_pipes import PipesS3ContextLoader, PipesS3MessageWriter, open_dagster_pipes

client = boto3.client("s3")
# interval=0: the reference uploads about once a second (it compares whole seconds, strictly greater)
with open_dagster_pipes(context_loader=PipesS3ContextLoader(client),
                        message_writer=PipesS3MessageWriter(client, interval=0)) as pipes:
    pipes.log.info("from dagster-pipes")
    for i in range(20):
        pipes.report_custom_message(i)
    time.sleep(2.2)  # the first messages go in a chunk of their own
    pipes.report_asset_materialization(metadata={"rows": 7}, data_version="dv")
    pipes.report_asset_check("chk", passed=False, severity="WARN")
    pipes.log_external_stream("stdout", "streamed\\n")
    for i in range(20, 40):
        pipes.report_custom_message(i)
"""


@pytest.mark.interop
@pytest.mark.slow
def test_dagster_pipes_child_read_by_our_s3_reader(
    moto: servers.Server, client: Any, bucket: str, write_script: Callable[..., Path]
) -> None:
    script = write_script(DAGSTER_PIPES_CHILD)
    reader = PipesS3MessageReader(bucket, client, interval=0.1)
    events: list[PipesEvent] = []
    invocation = PipesSubprocessClient(
        env=child_env(moto.url), context_injector=PipesS3ContextInjector(bucket, client), message_reader=reader,
        forward_stdio=False,
    ).run(context=PipesRunContext(asset_keys=["x"]), command=[PYTHON, str(script)], on_event=events.append)
    assert invocation.get_custom_messages() == list(range(40))
    assert invocation.get_results() == [
        MaterializeResult("x", {"rows": MetadataValue("int", 7)}, "dv"), AssetCheckResult("x", "chk", False, "WARN", {})
    ]
    assert invocation.session.get_logs() == [PipesLogEvent("INFO", "from dagster-pipes")]
    assert PipesExternalStreamEvent("stdout", "streamed\n", {}) in events
    assert invocation.session.closed and invocation.session.issue_count == 0
    assert reader.last_stats["chunks"] >= 2
    assert all_keys(client, bucket) and not any(key.endswith("context.json") for key in all_keys(client, bucket))


OUR_CHILD_FOR_DAGSTER = CHILD_PRELUDE + """
writer = PipesS3MessageWriter(client, interval=0.2)
with open_pipes(context_loader=PipesS3ContextLoader(client), message_writer=writer) as pipes:
    pipes.log.info("from pipes_ext over S3")
    pipes.report_custom_message({"extras": pipes.extras})
    while writer.channel.chunks_uploaded < 1:
        time.sleep(0.02)
    pipes.report_asset_materialization(metadata={"rows": 11, "label": "ok"}, data_version="dv-s3")
    pipes.report_asset_check("positive", passed=True, metadata={"min": 1})
"""


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore:Function `PipesMessageReader.expected_writer_count` is currently in preview"
    ":dagster_shared.utils.warnings.PreviewWarning"
)
def test_our_s3_writer_read_by_dagster_aws_reader_in_materialize(
    moto: servers.Server, client: Any, bucket: str, write_script: Callable[..., Path]
) -> None:
    import dagster as dg
    from dagster_aws.pipes import PipesS3ContextInjector as DagsterS3ContextInjector
    from dagster_aws.pipes import PipesS3MessageReader as DagsterS3MessageReader

    script = write_script(OUR_CHILD_FOR_DAGSTER)
    stash: dict[str, Any] = {}

    @dg.asset(check_specs=[dg.AssetCheckSpec("positive", asset="s3_asset")])
    def s3_asset(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient):  # type: ignore[no-untyped-def]
        invocation = pipes.run(context=context, command=[PYTHON, str(script)], extras={"via": "s3"})
        stash["custom"] = invocation.get_custom_messages()
        stash["run_id"] = context.run.run_id
        yield from invocation.get_results()

    pipes_client = dg.PipesSubprocessClient(
        env=child_env(moto.url),
        context_injector=DagsterS3ContextInjector(bucket=bucket, client=client),
        # Dagster's reader takes one chunk per pass of ~1 s, and only after `interval` whole seconds
        message_reader=DagsterS3MessageReader(bucket=bucket, client=client, interval=0),
    )
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([s3_asset], resources={"pipes": pipes_client}, instance=instance)
        assert result.success
        [materialization] = result.asset_materializations_for_node("s3_asset")
        assert materialization.metadata == {"rows": dg.MetadataValue.int(11), "label": dg.MetadataValue.text("ok")}
        assert materialization.tags is not None and materialization.tags["dagster/data_version"] == "dv-s3"
        [evaluation] = result.get_asset_check_evaluations()
        assert (evaluation.check_name, evaluation.passed, dict(evaluation.metadata)) == (
            "positive", True, {"min": dg.MetadataValue.int(1)}
        )
        assert list(stash["custom"]) == [{"extras": {"via": "s3"}}]
        messages = [entry.user_message for entry in instance.all_logs(stash["run_id"])]
        assert "from pipes_ext over S3" in messages
    assert not any(key.endswith("context.json") for key in all_keys(client, bucket))
    assert len([key for key in all_keys(client, bucket) if key.endswith(".json")]) >= 2
