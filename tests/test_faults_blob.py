"""Fault injection on the blob-store message readers (issue 20, items 3, 4 and 5), each tried against real local
stores (moto for S3, gcp-storage-emulator for GCS, Azurite for Azure) or a real socket that never answers:

* a gap of three chunks (1, 5 and 6 present): the missing ones named in one issue, 5, 6 and ``closed`` delivered
  in order by the final drain (S3, GCS, Azure);
* 8 asyncio sessions whose store accepts connections and never answers, next to one healthy S3 session in the
  same loop: the healthy one completes; each hung one fails with an error naming the store within the reader's
  ``request_timeout``;
* a chunk over the reader's ``max_chunk_bytes``: an issue, never downloaded whole; a chunk of many messages
  under it peaks at most 1.5x its size, one message alone in its chunk about 2x (S3, Azurite, GCS; tracemalloc).

Figures are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from azure.storage.blob import BlobServiceClient
from botocore.config import Config

from tests.support.helpers import PYTHON

with warnings.catch_warnings():
    # google-api-core warns at import when grpcio is installed without grpcio-status (see test_blob_gcs).
    warnings.filterwarnings("ignore", "Please install grpcio-status", ImportWarning)
    from google.api_core import exceptions as _google_exceptions  # noqa: F401
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from pipes_core import (
    PipesAsyncSubprocessClient,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesProtocolErrorKind,
    PipesTempFileContextInjector,
    PipesTransportError,
    open_pipes_session,
    open_pipes_session_async,
)
from pipes_core.azure import PipesAzureBlobStorageMessageReader
from pipes_core.channels.blob import PipesBlobStoreMessageReader
from pipes_core.gcs import PipesGCSMessageReader
from pipes_core.s3 import PipesS3ContextInjector, PipesS3MessageReader
from pipes_ext._blob import PipesBlobStore, chunk_key
from pipes_ext._protocol import dumps_message
from pipes_ext.azure import AzureBlobStore
from pipes_ext.gcs import GCSBlobStore
from pipes_ext.s3 import S3BlobStore
from tests.support import servers

S3_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
# One attempt per SDK call: the library's RetryPolicy is the only retry layer (as in test_blob_s3).
S3_ONE_ATTEMPT = Config(retries={"total_max_attempts": 1, "mode": "standard"})
POLL = 0.05


# ---------------------------------------------------------------------------------------------- stores


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, config=S3_ONE_ATTEMPT, **S3_KEYS)


@dataclass
class Bucket:
    """One fresh bucket (container) of one store: the store, and the message reader of that backend."""

    store: PipesBlobStore
    make_reader: Callable[..., PipesBlobStoreMessageReader]


def s3_bucket(moto: servers.Server) -> Bucket:
    client = s3_client(moto.url)
    name = f"pipes-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    return Bucket(S3BlobStore(client, name), lambda **kw: PipesS3MessageReader(name, client, **kw))


def gcs_bucket(gcs_server: servers.Server) -> Bucket:
    client = storage.Client(project="test", credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                            client_options={"api_endpoint": gcs_server.url})
    name = f"pipes-{uuid.uuid4().hex[:16]}"
    client.create_bucket(name)
    return Bucket(GCSBlobStore(client, name), lambda **kw: PipesGCSMessageReader(name, client, **kw))


def azure_bucket(azurite: servers.Server) -> Bucket:
    client = BlobServiceClient.from_connection_string(servers.azurite_connection_string(azurite.url), retry_total=0)
    name = f"pipes-{uuid.uuid4().hex[:20]}"
    client.create_container(name)
    return Bucket(AzureBlobStore(client, name), lambda **kw: PipesAzureBlobStorageMessageReader(name, client, **kw))


@pytest.fixture(params=["s3", "gcs", "azure"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    """A fresh bucket on each of the three stores (each server started once per module, on first use)."""
    make: dict[str, tuple[str, Callable[[servers.Server], Bucket]]] = {
        "s3": ("moto", s3_bucket), "gcs": ("gcs_server", gcs_bucket), "azure": ("azurite", azure_bucket)}
    fixture, build = make[request.param]
    return build(request.getfixturevalue(fixture))


def put_chunk(store: PipesBlobStore, prefix: str, index: int, *messages: tuple[str, Any]) -> None:
    store.put(chunk_key(prefix, index), "\n".join(dumps_message(m, p) for m, p in messages).encode("utf-8"))


def custom_payloads(events: list[PipesEvent]) -> list[Any]:
    return [e.payload for e in events if isinstance(e, PipesCustomMessageEvent)]


# ---------------------------------------------------------------------------------------------- item 4: gaps


def test_a_gap_of_three_chunks_is_reported_and_the_chunks_after_it_delivered_in_order(bucket: Bucket) -> None:
    events: list[PipesEvent] = []
    # A grace far longer than the test: the gap is left to the final drain, the case that lost 5, 6 and closed.
    reader = bucket.make_reader(interval=POLL, missing_chunk_grace=600.0)
    with open_pipes_session(None, PipesTempFileContextInjector(), reader, on_event=events.append) as session:
        prefix = session.message_params["key_prefix"]
        put_chunk(bucket.store, prefix, 1, ("opened", {"extras": {}}), ("report_custom_message", {"payload": 1}))
        put_chunk(bucket.store, prefix, 5, ("report_custom_message", {"payload": 5}))
        put_chunk(bucket.store, prefix, 6, ("report_custom_message", {"payload": 6}), ("closed", {}))
    assert custom_payloads(events) == [1, 5, 6]
    assert session.closed
    [issue] = session.protocol_issues
    assert issue.kind == PipesProtocolErrorKind.MISSING_CHUNK
    url = bucket.store.url
    assert url(chunk_key(prefix, 2)) in issue.reason and url(chunk_key(prefix, 4)) in issue.reason
    assert "(3 chunks)" in issue.reason
    assert reader.last_stats["chunks"] == 3


def test_two_gaps_at_the_end_are_each_reported_once(bucket: Bucket) -> None:
    events: list[PipesEvent] = []
    reader = bucket.make_reader(interval=POLL, missing_chunk_grace=600.0)
    with open_pipes_session(None, PipesTempFileContextInjector(), reader, on_event=events.append) as session:
        prefix = session.message_params["key_prefix"]
        put_chunk(bucket.store, prefix, 1, ("opened", {"extras": {}}))
        put_chunk(bucket.store, prefix, 3, ("report_custom_message", {"payload": 3}))
        for index in range(12, 14):  # 4..11 missing: far past any fixed probe
            put_chunk(bucket.store, prefix, index, ("report_custom_message", {"payload": index}))
        put_chunk(bucket.store, prefix, 14, ("closed", {}))
    assert custom_payloads(events) == [3, 12, 13]
    assert session.closed
    reasons = [issue.reason for issue in session.protocol_issues]
    assert len(reasons) == 2
    assert bucket.store.url(chunk_key(prefix, 2)) in reasons[0] and "chunks)" not in reasons[0]
    assert "(8 chunks)" in reasons[1] and bucket.store.url(chunk_key(prefix, 11)) in reasons[1]


class UnlistableS3Store(S3BlobStore):
    """A real S3 store whose owner did not implement listing (the default of ``PipesBlobStore.list_keys``)."""

    def list_keys(self, prefix: str) -> list[str] | None:
        return PipesBlobStore.list_keys(self, prefix)


def test_a_store_that_cannot_list_is_probed_two_chunks_past_a_gap(moto: servers.Server) -> None:
    """What a store without ``list_keys`` gets: the final drain looks GAP_PROBE_CHUNKS past a missing chunk, so a
    gap of two is crossed (one of three is not: see the README)."""
    client = s3_client(moto.url)
    bucket = s3_bucket(moto).store.bucket

    class Reader(PipesBlobStoreMessageReader):
        def make_store(self) -> PipesBlobStore:
            return UnlistableS3Store(client, bucket)

    events: list[PipesEvent] = []
    reader = Reader(interval=POLL, missing_chunk_grace=600.0)
    store = UnlistableS3Store(client, bucket)
    with open_pipes_session(None, PipesTempFileContextInjector(), reader, on_event=events.append) as session:
        prefix = session.message_params["key_prefix"]
        put_chunk(store, prefix, 1, ("opened", {"extras": {}}))
        put_chunk(store, prefix, 4, ("report_custom_message", {"payload": 4}), ("closed", {}))
    assert custom_payloads(events) == [4] and session.closed
    [issue] = session.protocol_issues
    assert "(2 chunks)" in issue.reason and store.url(chunk_key(prefix, 3)) in issue.reason


# ---------------------------------------------------------------------------------------------- item 3: a hung store

HUNG_SESSIONS = 8
# Short for the test; the default is DEFAULT_REQUEST_TIMEOUT (60 s). Long enough that the healthy session (a
# Python child importing boto3 on a busy machine) finishes well before it.
HUNG_REQUEST_TIMEOUT = 8.0
HEALTHY_MESSAGES = 20

HEALTHY_CHILD = f"""
import boto3
from pipes_ext import open_pipes
from pipes_ext.s3 import PipesS3ContextLoader, PipesS3MessageWriter

client = boto3.client("s3")
with open_pipes(context_loader=PipesS3ContextLoader(client),
                message_writer=PipesS3MessageWriter(client, interval=0.05)) as pipes:
    for i in range({HEALTHY_MESSAGES}):
        pipes.report_custom_message(i)
"""


class SilentStore:
    """An endpoint that accepts TCP connections (the kernel completes them in the listen backlog) and never
    answers a byte; closed (every connection reset) at the end."""

    def __enter__(self) -> SilentStore:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


def healthy_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}


async def healthy_run(moto: servers.Server, bucket: str, script: Path) -> tuple[list[Any], float]:
    client = s3_client(moto.url)
    runner = PipesAsyncSubprocessClient(context_injector=PipesS3ContextInjector(bucket, client),
                                        message_reader=PipesS3MessageReader(bucket, client, interval=POLL),
                                        forward_stdio=False)
    invocation = await runner.run(command=[PYTHON, str(script)], env=healthy_env(moto.url), timeout_seconds=120)
    assert invocation.exit_code == 0
    return invocation.session.get_custom_messages(), time.monotonic()


async def hung_session(silent: SilentStore) -> tuple[BaseException | None, float]:
    client = s3_client(silent.url)  # botocore's own timeouts (60 s per read) are longer than the reader's
    reader = PipesS3MessageReader("silent-bucket", client, interval=POLL, request_timeout=HUNG_REQUEST_TIMEOUT)
    try:
        async with open_pipes_session_async(None, PipesTempFileContextInjector(), reader, warn_unopened=False):
            pass  # no process: the reader polls, and the final drain asks the store for chunk 1
    except PipesTransportError as exc:
        return exc, time.monotonic()
    return None, time.monotonic()


def test_hung_stores_do_not_stall_a_healthy_session_of_the_same_loop_and_fail_naming_the_store(
    moto: servers.Server, tmp_path: Path
) -> None:
    bucket = s3_bucket(moto).store.bucket
    script = tmp_path / "healthy.py"
    script.write_text(HEALTHY_CHILD, encoding="utf-8")

    async def alone() -> float:
        started = time.monotonic()
        payloads, ended = await healthy_run(moto, bucket, script)
        assert payloads == list(range(HEALTHY_MESSAGES))
        return ended - started

    async def together(silent: SilentStore) -> tuple[float, float, list[tuple[BaseException | None, float]]]:
        started = time.monotonic()
        hung = [asyncio.ensure_future(hung_session(silent)) for _ in range(HUNG_SESSIONS)]
        await asyncio.sleep(0)  # the hung sessions are polling their store first
        payloads, healthy_ended = await healthy_run(moto, bucket, script)
        assert payloads == list(range(HEALTHY_MESSAGES))  # complete, in order
        outcomes = await asyncio.gather(*hung)
        return started, healthy_ended, outcomes

    alone_seconds = asyncio.run(alone())
    with SilentStore() as silent:
        started, healthy_ended, outcomes = asyncio.run(together(silent))
    for error, _ in outcomes:
        assert isinstance(error, PipesTransportError), error
        assert "s3://silent-bucket/" in str(error) and f"request_timeout={HUNG_REQUEST_TIMEOUT}" in str(error)
        assert "no answer" in str(error)
    first_hung_failure = min(ended for _, ended in outcomes)
    # Starvation guard only (no timing claim): the healthy session did not wait for the hung ones' timeouts.
    assert healthy_ended < first_hung_failure
    print(f"\nhealthy S3 session: {alone_seconds:.2f} s alone, {healthy_ended - started:.2f} s next to "
          f"{HUNG_SESSIONS} hung sessions; the hung ones failed after {first_hung_failure - started:.2f} to "
          f"{max(ended for _, ended in outcomes) - started:.2f} s (request_timeout={HUNG_REQUEST_TIMEOUT} s)")


def test_a_sync_session_on_a_store_that_never_answers_fails_naming_it(tmp_path: Path) -> None:
    """The same timeout in a sync session (its follower thread waits on the reader's request threads)."""
    timeout = 2.0
    with SilentStore() as silent:
        client = s3_client(silent.url)
        reader = PipesS3MessageReader("silent-bucket", client, interval=POLL, request_timeout=timeout)
        with pytest.raises(PipesTransportError) as raised:
            with open_pipes_session(None, PipesTempFileContextInjector(), reader, warn_unopened=False):
                pass
    assert "s3://silent-bucket/" in str(raised.value) and f"request_timeout={timeout}" in str(raised.value)
    assert isinstance(raised.value.__cause__, TimeoutError)


# ---------------------------------------------------------------------------------------------- item 5: big chunks

MIB = 1024 * 1024
# A reader that polls only at its start (before the chunk exists) and at the final drain: what is measured is
# the final drain reading the one chunk.
ONLY_AT_THE_END = 3600.0


@pytest.fixture(params=["s3", "azure", "gcs"])
def big_bucket(request: pytest.FixtureRequest) -> tuple[str, Bucket]:
    """A fresh bucket on S3 (moto), Azurite and the GCS emulator."""
    if request.param == "s3":
        return "S3", s3_bucket(request.getfixturevalue("moto"))
    if request.param == "gcs":
        return "GCS", gcs_bucket(request.getfixturevalue("gcs_server"))
    return "Azurite", azure_bucket(request.getfixturevalue("azurite"))


class Counter:
    """An on_event callback that keeps no message: counts custom messages and the total size of their payloads."""

    def __init__(self) -> None:
        self.count = 0
        self.payload_chars = 0

    def __call__(self, event: PipesEvent) -> None:
        if isinstance(event, PipesCustomMessageEvent):
            self.count += 1
            self.payload_chars += len(event.payload)


def read_one_chunk(bucket: Bucket, make_chunk: Callable[[], bytes], **reader_kw: Any) -> tuple[float, Any, Counter]:
    """Put one chunk (after ``opened`` in chunk 1; ``closed`` in the chunk after it), then measure with tracemalloc
    the peak of the session's end, which reads it. Returns (peak in bytes over what was allocated before, the
    session, the counter)."""
    import gc
    import tracemalloc

    counter = Counter()
    reader = bucket.make_reader(interval=ONLY_AT_THE_END, **reader_kw)
    with open_pipes_session(None, PipesTempFileContextInjector(), reader, on_event=counter,
                            retain_messages=False) as session:
        prefix = session.message_params["key_prefix"]
        put_chunk(bucket.store, prefix, 1, ("opened", {"extras": {}}))
        data = make_chunk()
        bucket.store.put(chunk_key(prefix, 2), data)
        del data
        put_chunk(bucket.store, prefix, 3, ("closed", {}))
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    try:
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert session.closed
    return peak, session, counter


MANY_MESSAGES_BYTES = 48 * MIB
LINE_PAYLOAD = "x" * 1000


def many_messages() -> bytes:
    line = dumps_message("report_custom_message", {"payload": LINE_PAYLOAD}).encode("utf-8")
    return b"\n".join([line] * (MANY_MESSAGES_BYTES // (len(line) + 1)))


def test_a_chunk_of_many_messages_peaks_at_most_1_5x_its_size(big_bucket: tuple[str, Bucket]) -> None:
    store_name, bucket = big_bucket
    size = len(many_messages())
    peak, session, counter = read_one_chunk(bucket, many_messages)
    assert counter.count == MANY_MESSAGES_BYTES // (len(many_messages().split(b"\n")[0]) + 1)  # every message
    assert counter.payload_chars == counter.count * len(LINE_PAYLOAD)
    assert not session.protocol_issues
    ratio = peak / size
    print(f"\n[{store_name}] a {size / MIB:.0f} MiB chunk of {counter.count} messages: peak {ratio:.2f}x its size")
    assert ratio <= 1.5


def test_one_message_alone_in_its_chunk_costs_about_twice_its_size(big_bucket: tuple[str, Bucket]) -> None:
    store_name, bucket = big_bucket
    payload_chars = 24 * MIB

    def one_message() -> bytes:
        return dumps_message("report_custom_message", {"payload": "y" * payload_chars}).encode("utf-8")

    peak, session, counter = read_one_chunk(bucket, one_message)
    assert counter.count == 1 and counter.payload_chars == payload_chars
    assert not session.protocol_issues
    ratio = peak / payload_chars
    print(f"\n[{store_name}] one {payload_chars / MIB:.0f} MiB message alone in its chunk: peak {ratio:.2f}x its size")
    assert ratio <= 2.3  # the line rule: its text and its value (the bytes are dropped before it is parsed)


def test_a_chunk_over_max_chunk_bytes_is_an_issue_and_is_not_downloaded(big_bucket: tuple[str, Bucket]) -> None:
    store_name, bucket = big_bucket
    limit = 4 * MIB
    size = len(many_messages())
    peak, session, counter = read_one_chunk(bucket, many_messages, max_chunk_bytes=limit)
    assert counter.count == 0  # nothing of it parsed ...
    [issue] = session.protocol_issues  # ... one issue, naming the chunk, its size and the parameter
    assert issue.kind == PipesProtocolErrorKind.LINE_TOO_LONG
    # GCS is read as a range of limit + 1 bytes (its size would cost a second request per chunk): "more than".
    told = (f"more than {limit} bytes", None) if store_name == "GCS" else (f"{size} bytes", size)
    assert f"is {told[0]}" in issue.reason and f"max_chunk_bytes={limit}" in issue.reason
    assert issue.reason.split()[2].endswith("/2.json") and issue.size == told[1]
    ratio = peak / size
    print(f"\n[{store_name}] a {size / MIB:.0f} MiB chunk over max_chunk_bytes={limit}: peak {ratio:.2f}x its size")
    assert ratio <= 0.5  # far less than the chunk: its size is checked before its body is read


def test_reader_limits_are_checked_at_construction() -> None:
    from pipes_core import PipesUsageError

    with pytest.raises(PipesUsageError, match="request_timeout"):
        PipesS3MessageReader("bucket", object(), request_timeout=0)  # type: ignore[arg-type]
    with pytest.raises(PipesUsageError, match="max_chunk_bytes"):
        PipesS3MessageReader("bucket", object(), max_chunk_bytes=0)  # type: ignore[arg-type]
