"""Azure Blob Storage channels against a real Azurite server (no mocks): context round trip, real child
processes, big and many messages, a SIGKILLed writer, faults injected by a proxy, permanent errors, chunk
gaps, size-based uploads, the atexit flush, and interop with ``dagster_pipes`` and Dagster's blob reader.

Every client built here has ``retry_total=0``: the Azure SDK's own retry policy (ExponentialRetry, 15 s + 3**n
s between up to 3 retries) would otherwise swallow the injected 503s and dropped connections inside one SDK
call, so the tests would not see our RetryPolicy at work (and would take minutes). It is also what
``pipes_ext.azure.default_azure_client`` builds.

Figures (the 10,000-message run) are printed; run with ``-s`` to see them with the rest of the output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient

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
    PipesSubprocessClient,
    PipesTransportError,
    open_pipes_session,
)
from pipes_core.azure import PipesAzureBlobStorageContextInjector, PipesAzureBlobStorageMessageReader
from pipes_ext import PipesUsageError
from pipes_ext._blob import chunk_key
from pipes_ext._protocol import dumps_message
from pipes_ext.azure import (
    AzureBlobStore,
    PipesAzureBlobStorageContextLoader,
    PipesAzureBlobStorageMessageWriter,
    default_azure_client,
)
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import PYTHON, wait_until
from tests.support.servers import Server, azurite_connection_string, start_azurite

CONN_ENV = "AZURE_STORAGE_CONNECTION_STRING"
# Fast polling so the tests do not wait on the defaults (1 s).
POLL = 0.05


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def azurite() -> Iterator[Server]:
    server = start_azurite()
    try:
        yield server
    finally:
        server.stop()  # by the server's own pid / process group


@pytest.fixture(scope="session")
def conn_str(azurite: Server) -> str:
    return azurite_connection_string(azurite.url)


def make_client(connection_string: str) -> BlobServiceClient:
    # retry_total=0: see the module docstring; our RetryPolicy is the only retry layer under test.
    return BlobServiceClient.from_connection_string(connection_string, retry_total=0)


@pytest.fixture(scope="session")
def service(conn_str: str) -> BlobServiceClient:
    return make_client(conn_str)


@pytest.fixture
def container(service: BlobServiceClient) -> Iterator[str]:
    """A fresh container per test (Azurite has no reset)."""
    name = f"pipes-{uuid.uuid4().hex[:20]}"
    service.create_container(name)
    yield name
    service.delete_container(name)


def missing_container_name() -> str:
    return f"missing-{uuid.uuid4().hex[:16]}"


# ---------------------------------------------------------------------------------------------------- helpers

CHILD_HEADER = """
import json, os, signal, sys, time

from azure.storage.blob import BlobServiceClient

from pipes_ext import open_pipes
from pipes_ext.azure import PipesAzureBlobStorageContextLoader, PipesAzureBlobStorageMessageWriter


def client():
    # retry_total=0: our RetryPolicy is the only retry layer (see the test module docstring)
    return BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"], retry_total=0)


def save_stats(writer):
    with open(sys.argv[1], "w") as f:
        json.dump({"chunks": writer.channel.chunks_uploaded, "requests": writer.channel.requests}, f)

"""



def stored_chunks(service: BlobServiceClient, container: str, key_prefix: str) -> dict[int, bytes]:
    """Every chunk blob under ``key_prefix``, by index (read straight from the server)."""
    client = service.get_container_client(container)
    chunks: dict[int, bytes] = {}
    for blob in client.list_blobs(name_starts_with=f"{key_prefix}/"):
        index = int(blob.name[len(key_prefix) + 1 :].removesuffix(".json"))
        chunks[index] = client.download_blob(blob.name).readall()
    return dict(sorted(chunks.items()))


def blob_names(service: BlobServiceClient, container: str) -> list[str]:
    return [blob.name for blob in service.get_container_client(container).list_blobs()]


def custom_payloads(events: list[PipesEvent]) -> list[Any]:
    return [e.payload for e in events if isinstance(e, PipesCustomMessageEvent)]


def run_child(
    write_script: Callable[..., Path],
    tmp_path: Path,
    body: str,
    *,
    container: str,
    service: BlobServiceClient,
    conn: str,
    reader: PipesAzureBlobStorageMessageReader | None = None,
    context: PipesRunContext | None = None,
    extras: dict[str, Any] | None = None,
    header: str = CHILD_HEADER,
) -> tuple[Any, list[PipesEvent], dict[str, int]]:
    """Run ``body`` (after the header) as a real child under our injector and reader; returns the invocation,
    the events in arrival order, and the writer stats the child saved (if it called save_stats)."""
    script = write_script(header + body)
    stats_path = tmp_path / "stats.json"
    events: list[PipesEvent] = []
    client = PipesSubprocessClient(
        context_injector=PipesAzureBlobStorageContextInjector(container, service),
        message_reader=reader or PipesAzureBlobStorageMessageReader(container, service, interval=POLL),
        env={CONN_ENV: conn},
    )
    invocation = client.run(context=context, command=[PYTHON, str(script), str(stats_path)], extras=extras,
                            on_event=events.append)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return invocation, events, stats


# ---------------------------------------------------------------------------------------------------- context


def test_context_round_trip_and_deleted_after(service: BlobServiceClient, container: str) -> None:
    import dagster_pipes

    injector = PipesAzureBlobStorageContextInjector(container, service)
    context = PipesRunContext(asset_keys=["a", ["b", "c/d"]], run_id="run-1", job_name="job")
    data = context.to_context_data({"k": "v", "unicode": "h\u00e9llo \U0001f680"})
    with injector.inject_context(data) as params:
        assert set(params) == {"bucket", "key"}
        assert params["bucket"] == container  # the key is "bucket" even for Azure
        prefix, name = params["key"].split("/")
        assert name == "context.json"
        assert len(prefix) == 30 and prefix.isascii() and prefix.isalpha()
        assert blob_names(service, container) == [params["key"]]
        loaded = PipesAzureBlobStorageContextLoader(service).load_context(params)
        assert loaded == data
        # The reference loader reads what we injected, too.
        with dagster_pipes.PipesAzureBlobStorageContextLoader(service).load_context(params) as reference:
            assert reference == data
    assert blob_names(service, container) == []
    # Gone: loading it now is a clear error naming the object.
    with pytest.raises(PipesTransportError, match=f"azure://{container}/{params['key']} does not exist"):
        PipesAzureBlobStorageContextLoader(service).load_context(params)


# ---------------------------------------------------------------------------------------------------- children

EVERY_METHOD_CHILD = """
# No client passed: both are built by default_azure_client() from AZURE_STORAGE_CONNECTION_STRING.
writer = PipesAzureBlobStorageMessageWriter(interval=0.05)
with open_pipes(context_loader=PipesAzureBlobStorageContextLoader(), message_writer=writer) as pipes:
    pipes.log.info("info from the child")
    pipes.log.warning("warning \\u00e9")
    pipes.report_asset_materialization(metadata={"rows": 3, "note": {"raw_value": "# hi", "type": "md"}},
                                       data_version="dv-1", asset_key="a")
    pipes.report_asset_check("check_ok", passed=True, asset_key="a", metadata={"ratio": 0.5})
    pipes.report_asset_check("check_warn", passed=False, severity="WARN", asset_key="a")
    pipes.report_custom_message({"extras": pipes.extras, "run_id": pipes.run_id, "keys": pipes.asset_keys})
    pipes.log_external_stream("stderr", "external stderr text\\n", extras={"origin": "child"})
save_stats(writer)
"""


def test_every_method_through_a_real_child(
    service: BlobServiceClient, container: str, conn_str: str, tmp_path: Path, write_script: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    extras = {"k": "v", "nested": {"list": [1, None]}}
    invocation, events, stats = run_child(
        write_script, tmp_path, EVERY_METHOD_CHILD, container=container, service=service, conn=conn_str,
        context=PipesRunContext(asset_keys=["a"], run_id="run-azure"), extras=extras,
    )
    session = invocation.session
    assert invocation.exit_code == 0
    assert session.protocol_issues == []
    assert session.message_params["bucket"] == container
    assert len(session.message_params["key_prefix"]) == 30
    # opened first, closed last, and the five other methods in between, in order.
    assert events[0] == PipesOpenedEvent({})
    assert events[-1] == PipesClosedEvent(None)
    assert events[1:-1] == [
        PipesLogEvent("INFO", "info from the child"),
        PipesLogEvent("WARNING", "warning \u00e9"),
        MaterializeResult("a", {"rows": MetadataValue("int", 3), "note": MetadataValue("md", "# hi")}, "dv-1"),
        AssetCheckResult("a", "check_ok", True, "ERROR", {"ratio": MetadataValue("float", 0.5)}),
        AssetCheckResult("a", "check_warn", False, "WARN", {}),
        PipesCustomMessageEvent({"extras": extras, "run_id": "run-azure", "keys": ["a"]}),
        PipesExternalStreamEvent("stderr", "external stderr text\n", {"origin": "child"}),
    ]
    assert "external stderr text" in capsys.readouterr().err
    # What the reader read is what the writer uploaded; only the chunks are left (the context was deleted).
    assert stats["chunks"] >= 1
    assert session.message_reader.last_stats["chunks"] == stats["chunks"]
    chunks = stored_chunks(service, container, session.message_params["key_prefix"])
    assert list(chunks) == list(range(1, stats["chunks"] + 1))
    assert not any(name.endswith("context.json") for name in blob_names(service, container))


BIG_MESSAGE_CHILD = """
import base64, random
big = base64.b64encode(random.Random(20).randbytes(15 * 1024 * 1024)).decode()  # 20 MiB of text
writer = PipesAzureBlobStorageMessageWriter(client(), interval=0.05)
with open_pipes(context_loader=PipesAzureBlobStorageContextLoader(client()), message_writer=writer) as pipes:
    pipes.report_custom_message("before")
    time.sleep(0.2)
    pipes.report_custom_message(big)
    pipes.report_custom_message("after")
save_stats(writer)
"""


def test_20_mb_message(
    service: BlobServiceClient, container: str, conn_str: str, tmp_path: Path, write_script: Callable[..., Path]
) -> None:
    big = base64.b64encode(random.Random(20).randbytes(15 * 1024 * 1024)).decode()
    assert len(big) == 20 * 1024 * 1024
    invocation, events, _ = run_child(write_script, tmp_path, BIG_MESSAGE_CHILD, container=container,
                                      service=service, conn=conn_str)
    assert invocation.exit_code == 0
    assert invocation.session.protocol_issues == []
    payloads = custom_payloads(events)
    assert [p if len(p) < 100 else "<big>" for p in payloads] == ["before", "<big>", "after"]
    assert hashlib.sha256(payloads[1].encode()).digest() == hashlib.sha256(big.encode()).digest()
    # The big message is larger than max_chunk_bytes (4 MiB), so it travelled alone in its chunk.
    chunks = stored_chunks(service, container, invocation.session.message_params["key_prefix"])
    big_chunks = [data for data in chunks.values() if len(data) > 20 * 1024 * 1024]
    assert len(big_chunks) == 1
    assert big_chunks[0].count(b"\n") == 0
    assert json.loads(big_chunks[0])["params"]["payload"] == big


MANY_MESSAGES_CHILD = """
writer = PipesAzureBlobStorageMessageWriter(client(), interval=0.05, max_chunk_bytes=16 * 1024)
with open_pipes(context_loader=PipesAzureBlobStorageContextLoader(client()), message_writer=writer) as pipes:
    for i in range(10_000):
        pipes.report_custom_message(i)
save_stats(writer)
"""


def test_10000_messages_in_order_across_many_chunks(
    service: BlobServiceClient, container: str, conn_str: str, tmp_path: Path, write_script: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    reader = PipesAzureBlobStorageMessageReader(container, service, interval=POLL)
    started = time.monotonic()
    invocation, events, stats = run_child(write_script, tmp_path, MANY_MESSAGES_CHILD, container=container,
                                          service=service, conn=conn_str, reader=reader)
    elapsed = time.monotonic() - started
    assert invocation.exit_code == 0
    assert invocation.session.protocol_issues == []
    assert custom_payloads(events) == list(range(10_000))
    read = reader.last_stats
    with capsys.disabled():
        print(f"\n[azure] 10,000 messages: {elapsed:.2f} s end to end (child start included); "
              f"writer {stats['chunks']} chunks / {stats['requests']} requests; "
              f"reader {read['chunks']} chunks / {read['requests']} requests")
    # ~85 bytes a message, 16 KiB chunks: size-based uploads make ~50 chunks.
    assert stats["chunks"] >= 40
    assert read["chunks"] == stats["chunks"]
    assert stats["requests"] == stats["chunks"]  # no error, so one PUT per chunk
    # One GET per chunk plus about one per poll that found nothing (and the occasional gap probe).
    assert read["requests"] <= read["chunks"] + elapsed / POLL + 10
    assert elapsed < 30


KILLED_CHILD = """
writer = PipesAzureBlobStorageMessageWriter(client(), interval=0.05)
pipes = open_pipes(context_loader=PipesAzureBlobStorageContextLoader(client()), message_writer=writer)
i = 0
while writer.channel.chunks_uploaded < 5:
    pipes.report_custom_message(i)
    i += 1
    time.sleep(0.001)
for _ in range(100):  # buffered, never uploaded
    pipes.report_custom_message(i)
    i += 1
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkilled_child_every_uploaded_chunk_is_delivered(
    service: BlobServiceClient, container: str, conn_str: str, write_script: Callable[..., Path]
) -> None:
    script = write_script(CHILD_HEADER + KILLED_CHILD)
    events: list[PipesEvent] = []
    reader = PipesAzureBlobStorageMessageReader(container, service, interval=POLL)
    with open_pipes_session(None, PipesAzureBlobStorageContextInjector(container, service), reader,
                            on_event=events.append) as session:
        env = {**os.environ, CONN_ENV: conn_str, **session.get_bootstrap_env_vars()}
        process = subprocess.run([PYTHON, str(script), "unused"], env=env, timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not session.closed
    assert session.protocol_issues == []
    key_prefix = session.message_params["key_prefix"]
    chunks = stored_chunks(service, container, key_prefix)
    assert len(chunks) >= 5
    assert list(chunks) == list(range(1, len(chunks) + 1))
    # Exactly what was uploaded was delivered, in order: opened, then 0..n-1 with no hole.
    uploaded = [json.loads(line) for data in chunks.values() for line in data.split(b"\n")]
    assert uploaded[0]["method"] == "opened"
    uploaded_payloads = [m["params"]["payload"] for m in uploaded[1:]]
    assert uploaded_payloads == list(range(len(uploaded_payloads)))
    assert isinstance(events[0], PipesOpenedEvent)
    assert custom_payloads(events) == uploaded_payloads
    assert len(events) == len(uploaded)
    assert reader.last_stats["chunks"] == len(chunks)


FIVE_HUNDRED_CHUNKS_CHILD = """
# max_chunk_bytes=1: every message travels alone in its chunk.
writer = PipesAzureBlobStorageMessageWriter(client(), interval=0.05, max_chunk_bytes=1)
with open_pipes(context_loader=PipesAzureBlobStorageContextLoader(client()), message_writer=writer) as pipes:
    for i in range(500):
        pipes.report_custom_message(i)
save_stats(writer)
"""


def test_500_chunks_none_lost(
    service: BlobServiceClient, container: str, conn_str: str, tmp_path: Path, write_script: Callable[..., Path]
) -> None:
    reader = PipesAzureBlobStorageMessageReader(container, service, interval=POLL)
    invocation, events, stats = run_child(write_script, tmp_path, FIVE_HUNDRED_CHUNKS_CHILD, container=container,
                                          service=service, conn=conn_str, reader=reader)
    assert invocation.exit_code == 0
    assert invocation.session.protocol_issues == []
    assert custom_payloads(events) == list(range(500))
    assert stats["chunks"] == 502  # opened + 500 + closed
    assert reader.last_stats["chunks"] == 502
    chunks = stored_chunks(service, container, invocation.session.message_params["key_prefix"])
    assert list(chunks) == list(range(1, 503))
    assert all(data.count(b"\n") == 0 for data in chunks.values())


# ---------------------------------------------------------------------------------------------------- faults

FAULTY_CHILD = """
writer = PipesAzureBlobStorageMessageWriter(client(), interval=0.05)
with open_pipes(context_loader=PipesAzureBlobStorageContextLoader(client()), message_writer=writer) as pipes:
    for batch in range(4):
        for i in range(50):
            pipes.report_custom_message(batch * 50 + i)
        # each batch in its own chunk: wait until the upload thread has stored every buffered line
        deadline = time.monotonic() + 120
        while writer.channel._pending_count() and time.monotonic() < deadline:
            time.sleep(0.01)
save_stats(writer)
"""


def test_transient_faults_are_retried_nothing_lost_or_duplicated(
    azurite: Server, service: BlobServiceClient, container: str, tmp_path: Path, write_script: Callable[..., Path]
) -> None:
    with FaultProxy(azurite.url.removesuffix("/devstoreaccount1")) as proxy:
        proxied_conn = azurite_connection_string(proxy.url + "/devstoreaccount1")
        proxied = make_client(proxied_conn)
        # Each object gets at most 4 consecutive faults: within the default 6 attempts.
        proxy.fail_next(2, 503, path_contains="context.json", method="PUT")   # injector
        proxy.drop_next(1, path_contains="context.json", method="GET")        # child's loader
        proxy.fail_next(1, 429, path_contains="context.json", method="GET")
        proxy.fail_next(3, 503, path_contains="/1.json", method="PUT")        # child's writer
        proxy.drop_next(2, path_contains="/2.json", method="PUT")
        proxy.fail_next(1, 500, path_contains="/3.json", method="PUT")
        proxy.drop_next(1, path_contains="/3.json", method="PUT")
        proxy.fail_next(2, 503, path_contains="/2.json", method="GET")        # our reader
        proxy.drop_next(2, path_contains="/3.json", method="GET")
        proxy.fail_next(1, 503, path_contains="context.json", method="DELETE")  # injector's clean-up
        expected_faults = 2 + 1 + 1 + 3 + 2 + 1 + 1 + 2 + 2 + 1
        reader = PipesAzureBlobStorageMessageReader(container, proxied, interval=POLL)
        injector = PipesAzureBlobStorageContextInjector(container, proxied)
        script = write_script(CHILD_HEADER + FAULTY_CHILD)
        stats_path = tmp_path / "stats.json"
        events: list[PipesEvent] = []
        invocation = PipesSubprocessClient(context_injector=injector, message_reader=reader,
                                           env={CONN_ENV: proxied_conn}).run(
            command=[PYTHON, str(script), str(stats_path)], on_event=events.append
        )
        faults = proxy.faults
    stats = json.loads(stats_path.read_text())
    assert invocation.exit_code == 0
    assert invocation.session.protocol_issues == []
    # Every fault really happened, and each was retried by our policy (the SDK's retries are off).
    assert faults == expected_faults
    assert stats["requests"] == stats["chunks"] + 3 + 2 + 2
    # Nothing lost, nothing duplicated, in order; opened and closed once each.
    assert custom_payloads(events) == list(range(200))
    assert events[0] == PipesOpenedEvent({})
    assert events[-1] == PipesClosedEvent(None)
    assert len(events) == 202
    assert stats["chunks"] >= 4
    assert reader.last_stats["chunks"] == stats["chunks"]
    assert not any(name.endswith("context.json") for name in blob_names(service, container))


PERMANENT_CHILD = """
writer = PipesAzureBlobStorageMessageWriter(client(), interval=0.05)
try:
    with open_pipes(context_loader=PipesAzureBlobStorageContextLoader(client()), message_writer=writer) as pipes:
        pipes.report_custom_message("lost")
finally:
    save_stats(writer)
"""


def test_no_such_container_fails_fast_on_both_sides(
    azurite: Server, service: BlobServiceClient, container: str, conn_str: str, tmp_path: Path,
    write_script: Callable[..., Path],
) -> None:
    missing = missing_container_name()
    # Orchestrator: the injector cannot upload the context; one request, no retry (the proxy only counts).
    with FaultProxy(azurite.url.removesuffix("/devstoreaccount1")) as proxy:
        counted = make_client(azurite_connection_string(proxy.url + "/devstoreaccount1"))
        with pytest.raises(PipesTransportError) as injector_error:
            with open_pipes_session(None, PipesAzureBlobStorageContextInjector(missing, counted),
                                    PipesAzureBlobStorageMessageReader(container, service, interval=POLL)):
                pass
        assert proxy.requests == 1
    text = str(injector_error.value)
    assert f"bucket {missing!r}" in text and "/context.json" in text and "ContainerNotFound" in text

    # Both sides of one real run: the messages container does not exist. The child's writer fails at close,
    # naming container and key; the reader stops at its first GET and raises when the session ends.
    script = write_script(CHILD_HEADER + PERMANENT_CHILD)
    reader = PipesAzureBlobStorageMessageReader(missing, service, interval=POLL)
    started = time.monotonic()
    with pytest.raises(PipesTransportError) as reader_error:
        with open_pipes_session(None, PipesAzureBlobStorageContextInjector(container, service), reader) as session:
            env = {**os.environ, CONN_ENV: conn_str, **session.get_bootstrap_env_vars()}
            child = subprocess.run([PYTHON, str(script), str(tmp_path / "stats.json")], env=env,
                                   capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    key_prefix = session.message_params["key_prefix"]
    text = str(reader_error.value)
    assert reader.last_stats["requests"] == 1  # the first GET failed for good: no retry, no more polling
    assert "reading messages chunk" in text
    assert f"bucket {missing!r}" in text and f"key '{key_prefix}/1.json'" in text and "ContainerNotFound" in text
    assert child.returncode == 1
    assert "PipesTransportError" in child.stderr
    assert f"bucket {missing!r}" in child.stderr and f"key '{key_prefix}/1.json'" in child.stderr
    assert "ContainerNotFound" in child.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    # No retry: one PUT on the upload thread, one more when close() tries what is left from its own thread.
    assert stats == {"chunks": 0, "requests": 2}
    assert elapsed < 45  # a hang guard only: the request counts above prove no retries
    assert blob_names(service, container) == []  # the context was still cleaned up


def test_no_such_container_external_side_in_process(azurite: Server) -> None:
    missing = missing_container_name()
    with FaultProxy(azurite.url.removesuffix("/devstoreaccount1")) as proxy:  # counts requests, no faults
        counted = make_client(azurite_connection_string(proxy.url + "/devstoreaccount1"))
        with pytest.raises(PipesTransportError) as load_error:
            PipesAzureBlobStorageContextLoader(counted).load_context({"bucket": missing, "key": "ctx/context.json"})
        assert proxy.requests == 1
        assert f"bucket {missing!r}, key 'ctx/context.json'" in str(load_error.value)
        assert "ContainerNotFound" in str(load_error.value)
        writer = PipesAzureBlobStorageMessageWriter(counted, interval=3600)
        channel = writer.open({"bucket": missing, "key_prefix": "p"})
        channel.write_line(dumps_message("opened", {"extras": {}}))
        with pytest.raises(PipesTransportError) as error:
            channel.close()
        assert proxy.requests == 1 + 2  # no retry (see the test above)
    assert "1 message(s) could not be uploaded" in str(error.value)
    assert f"bucket {missing!r}, key 'p/1.json'" in str(error.value)


def test_store_semantics_and_error_classification(service: BlobServiceClient, container: str) -> None:
    """What the store retries and what it does not, from errors the SDK really raised."""
    from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError

    store = AzureBlobStore(service, container)
    store.put("k/1.json", b"first")
    store.put("k/1.json", b"first")  # a retry after a lost response overwrites: no conflict error
    assert store.get("k/1.json") == b"first"
    store.delete("k/1.json")
    assert store.get("k/1.json") is None
    assert store.get("nothing/here.json") is None  # BlobNotFound is "not there yet"
    store.delete("nothing/here.json")  # a missing blob is not an error
    missing = AzureBlobStore(service, missing_container_name())
    with pytest.raises(ResourceNotFoundError) as not_found:
        missing.get("k")  # ContainerNotFound is not "missing": it raises
    assert not store.is_transient(not_found.value)
    with pytest.raises(ResourceNotFoundError):
        missing.delete("k")
    closed_port = make_client(azurite_connection_string("http://127.0.0.1:9/devstoreaccount1"))
    with pytest.raises(ServiceRequestError) as refused:
        AzureBlobStore(closed_port, container).get("k")
    assert store.is_transient(refused.value)
    with pytest.raises(HttpResponseError) as bad_request:
        service.create_container("x")  # a name Azure rejects (3-63 characters): a 400, permanent
    assert bad_request.value.status_code == 400
    assert not store.is_transient(bad_request.value)
    assert store.is_transient(ConnectionResetError()) and store.is_transient(TimeoutError())


def test_default_client_lazy_import_and_missing_extra(
    azurite: Server, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Importing the Azure modules does not import the SDK.
    probe = ("import sys, pipes_ext, pipes_ext.azure, pipes_core, pipes_core.azure; "
             "print(sorted(m for m in sys.modules if m == 'azure' or m.startswith('azure.')))")
    assert subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"
    monkeypatch.delenv(CONN_ENV, raising=False)
    with pytest.raises(PipesUsageError, match=CONN_ENV):
        PipesAzureBlobStorageMessageWriter()
    with FaultProxy(azurite.url.removesuffix("/devstoreaccount1")) as proxy:
        monkeypatch.setenv(CONN_ENV, azurite_connection_string(proxy.url + "/devstoreaccount1"))
        store = AzureBlobStore(default_azure_client(), container)
        store.put("k", b"v")
        proxy.fail_next(1, 503)
        with pytest.raises(HttpResponseError) as error:
            store.get("k")
        assert error.value.status_code == 503
        assert proxy.requests == 2  # the default client does not retry by itself: RetryPolicy does
    monkeypatch.setitem(sys.modules, "azure.storage.blob", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"azure-storage-blob.*pip install 'azure-storage-blob' "
                                          r"\(it is the 'azure' extra of pipes-ext and pipes-sdk\)"):
        PipesAzureBlobStorageContextLoader()


# ---------------------------------------------------------------------------------------------------- reader


def test_missing_chunk_is_reported_and_reading_continues(service: BlobServiceClient, container: str) -> None:
    events: list[PipesEvent] = []
    reader = PipesAzureBlobStorageMessageReader(container, service, interval=POLL, missing_chunk_grace=0.5)
    store = AzureBlobStore(service, container)
    with open_pipes_session(None, PipesAzureBlobStorageContextInjector(container, service), reader,
                            on_event=events.append) as session:
        prefix = session.message_params["key_prefix"]

        def put(index: int, method: str, params: dict[str, Any]) -> None:
            store.put(chunk_key(prefix, index), dumps_message(method, params).encode())

        put(1, "opened", {"extras": {}})
        put(2, "report_custom_message", {"payload": "a"})
        put(4, "report_custom_message", {"payload": "b"})  # 3 never comes
        # The gap is reported just before the chunk after it is handled: wait for both, not only the issue.
        wait_until(lambda: session.issue_count == 1 and len(custom_payloads(events)) == 2, timeout=60)
        assert custom_payloads(events) == ["a", "b"]
        put(5, "report_custom_message", {"payload": "c"})
        put(6, "closed", {})
        wait_until(lambda: session.closed, timeout=60)  # still inside the session: read live, not at the end
    issue = session.protocol_issues[0]
    assert f"azure://{container}/{prefix}/3.json" in issue.source
    assert "never appeared" in issue.reason
    assert custom_payloads(events) == ["a", "b", "c"]
    assert session.issue_count == 1


# ---------------------------------------------------------------------------------------------------- writer


def test_writer_uploads_by_size_between_intervals(service: BlobServiceClient, container: str) -> None:
    max_bytes = 4096
    writer = PipesAzureBlobStorageMessageWriter(service, interval=3600, max_chunk_bytes=max_bytes)
    channel = writer.open({"bucket": container, "key_prefix": "size"})
    lines = [dumps_message("report_custom_message", {"payload": f"{i:04d}" + "x" * 250}) for i in range(60)]
    big = dumps_message("report_custom_message", {"payload": "y" * 3 * max_bytes})
    try:
        for line in lines:
            channel.write_line(line)
        # interval=3600: whatever is uploaded before close() was uploaded because of its size.
        wait_until(lambda: writer.channel is not None and writer.channel.chunks_uploaded >= 3, timeout=60)
        before_close = stored_chunks(service, container, "size")
        assert len(before_close) >= 3
        assert all(len(data) <= max_bytes for data in before_close.values())
        channel.write_line(big)
    finally:
        channel.close()
    chunks = stored_chunks(service, container, "size")
    assert list(chunks) == list(range(1, len(chunks) + 1))
    assert [line.decode() for data in chunks.values() for line in data.split(b"\n")] == [*lines, big]
    assert chunks[len(chunks)] == big.encode()  # larger than max_chunk_bytes: alone in its chunk
    assert all(len(data) <= max_bytes for index, data in chunks.items() if index < len(chunks))
    # Full chunks: each would have overflowed with the next line.
    total = sum(len(line) + 1 for line in lines)
    assert len(chunks) - 1 <= total // (max_bytes - 300) + 1


ATEXIT_CHILD = """
# Never closed: the writer's atexit hook uploads what is buffered (interval=3600: nothing is uploaded before).
writer = PipesAzureBlobStorageMessageWriter(client(), interval=3600)
pipes = open_pipes(context_loader=PipesAzureBlobStorageContextLoader(client()), message_writer=writer)
for i in range(50):
    pipes.report_custom_message(i)
"""


def test_atexit_flush_when_never_closed(
    service: BlobServiceClient, container: str, conn_str: str, tmp_path: Path, write_script: Callable[..., Path]
) -> None:
    invocation, events, _ = run_child(write_script, tmp_path, ATEXIT_CHILD, container=container, service=service,
                                      conn=conn_str)
    assert invocation.exit_code == 0
    assert invocation.missing_closed
    assert isinstance(events[0], PipesOpenedEvent)
    assert custom_payloads(events) == list(range(50))
    assert len(events) == 51
    chunks = stored_chunks(service, container, invocation.session.message_params["key_prefix"])
    assert list(chunks) == [1]  # everything in one chunk, at exit


# ---------------------------------------------------------------------------------------------------- interop

DAGSTER_PIPES_CHILD = """
import os

from azure.storage.blob import BlobServiceClient
from dagster_pipes import (
    PipesAzureBlobStorageContextLoader,
    PipesAzureBlobStorageMessageWriter,
    open_dagster_pipes,
)

client = BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"], retry_total=0)
with open_dagster_pipes(
    context_loader=PipesAzureBlobStorageContextLoader(client),
    message_writer=PipesAzureBlobStorageMessageWriter(client, interval=0),
) as context:
    context.log.info("hello from dagster_pipes")
    context.report_asset_materialization(metadata={"rows": 3}, data_version="v1")
    context.report_asset_check("chk", passed=True, metadata={"ok": True})
    for i in range(100):
        context.report_custom_message(i)
    context.report_custom_message({"extras": context.extras, "asset_key": context.asset_key})
"""


@pytest.mark.interop
def test_dagster_pipes_child_read_by_our_reader(
    service: BlobServiceClient, container: str, conn_str: str, tmp_path: Path, write_script: Callable[..., Path]
) -> None:
    extras = {"k": "v", "n": [1, 2]}
    invocation, events, _ = run_child(
        write_script, tmp_path, DAGSTER_PIPES_CHILD, container=container, service=service, conn=conn_str,
        header="", context=PipesRunContext(asset_keys=["azure_asset"]), extras=extras,
    )
    session = invocation.session
    assert invocation.exit_code == 0
    assert session.protocol_issues == []
    assert session.closed and session.exception is None
    assert session.get_logs() == [PipesLogEvent("INFO", "hello from dagster_pipes")]
    assert invocation.get_results() == [
        MaterializeResult("azure_asset", {"rows": MetadataValue("int", 3)}, "v1"),
        AssetCheckResult("azure_asset", "chk", True, "ERROR", {"ok": MetadataValue("bool", True)}),
    ]
    assert custom_payloads(events) == [*range(100), {"extras": extras, "asset_key": "azure_asset"}]
    assert blob_names(service, container)  # the chunks
    assert not any(name.endswith("context.json") for name in blob_names(service, container))


OUR_CHILD_FOR_DAGSTER = """
writer = PipesAzureBlobStorageMessageWriter(client(), interval=0.2)
with open_pipes(context_loader=PipesAzureBlobStorageContextLoader(client()), message_writer=writer) as pipes:
    pipes.log.info("hello from pipes_ext")
    pipes.report_custom_message({"extras": pipes.extras, "keys": pipes.asset_keys})
    time.sleep(0.3)
    pipes.report_asset_materialization(metadata={"rows": 7, "label": "seven"}, data_version="dv-7")
save_stats(writer)
"""


@pytest.mark.interop
@pytest.mark.filterwarnings(
    "ignore:Function `PipesMessageReader.expected_writer_count` is currently in preview"
    ":dagster_shared.utils.warnings.PreviewWarning"
)
def test_our_child_under_dagsters_azure_reader_and_injector(
    service: BlobServiceClient, container: str, conn_str: str, tmp_path: Path, write_script: Callable[..., Path]
) -> None:
    from dagster_azure.pipes import PipesAzureBlobStorageContextInjector as injector_cls
    from dagster_azure.pipes import PipesAzureBlobStorageMessageReader as reader_cls

    script = write_script(CHILD_HEADER + OUR_CHILD_FOR_DAGSTER)
    stats_path = tmp_path / "stats.json"
    custom: list[Any] = []

    # context is left unannotated: with postponed annotations Dagster sees a string, not AssetExecutionContext.
    @dg.asset(name="azure_asset")
    def azure_asset(context):  # type: ignore[no-untyped-def]
        invocation = dg.PipesSubprocessClient(
            context_injector=injector_cls(container=container, client=service),
            message_reader=reader_cls(interval=0, container=container, client=service),
        ).run(context=context, command=[PYTHON, str(script), str(stats_path)], extras={"from": "dagster"},
              env={CONN_ENV: conn_str})
        custom.extend(invocation.get_custom_messages())
        return invocation.get_materialize_result()

    result = dg.materialize([azure_asset], raise_on_error=True)
    assert result.success
    materializations = result.get_asset_materialization_events()
    assert len(materializations) == 1
    materialization = materializations[0].materialization
    assert materialization.asset_key == dg.AssetKey("azure_asset")
    assert materialization.metadata["rows"] == dg.MetadataValue.int(7)
    assert materialization.metadata["label"] == dg.MetadataValue.text("seven")
    assert materialization.tags is not None
    assert materialization.tags.get("dagster/data_version") == "dv-7"
    assert custom == [{"extras": {"from": "dagster"}, "keys": ["azure_asset"]}]
    stats = json.loads(stats_path.read_text())
    assert stats["chunks"] >= 2
    assert not any(name.endswith("context.json") for name in blob_names(service, container))
