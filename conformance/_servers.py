"""Local blob-store servers for the blob channels: moto (S3), gcp-storage-emulator (GCS), Azurite (Azure).

Each server runs as its own process on 127.0.0.1 on a free port, in its own process group, and is stopped by
its own process id. A store whose client package or server is not installed is *unavailable*: its channels
are skipped, with the reason. (The same approach as the project's ``tests/support/servers.py``, which is not shipped.)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BLOB_STORES", "BlobServer", "unavailable_reason", "start_store", "free_port", "wait_http", "stop_process"]

BLOB_STORES = ("s3", "gcs", "azure")

# Azurite's well-known development account.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# Where this repository's .ci/test installs Azurite with npm (a project-local folder).
_REPO_AZURITE = Path(__file__).resolve().parent.parent / ".ci" / "node" / "node_modules" / "azurite" / "dist" / "src" \
    / "blob" / "main.js"
# Set to Azurite's blob main.js to use another installation.
AZURITE_ENV_VAR = "PIPES_CONFORMANCE_AZURITE"

S3_REGION = "us-east-1"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _azurite_command() -> list[str] | None:
    given = os.environ.get(AZURITE_ENV_VAR)
    main_js = Path(given) if given else _REPO_AZURITE
    node = shutil.which("node")
    if node and main_js.is_file():
        return [node, str(main_js)]
    on_path = shutil.which("azurite-blob")
    return [on_path] if on_path else None


def unavailable_reason(store: str) -> str | None:
    """Why the channels of ``store`` cannot run here, or None when they can."""
    if store == "s3":
        missing = [name for name, module in (("boto3", "boto3"), ("moto[server]", "moto")) if not _installed(module)]
    elif store == "gcs":
        needs = (("google-cloud-storage", "google.cloud.storage"), ("gcp-storage-emulator", "gcp_storage_emulator"))
        missing = [name for name, module in needs if not _installed(module)]
    elif store == "azure":
        missing = [] if _installed("azure.storage.blob") else ["azure-storage-blob"]
        if _azurite_command() is None:
            missing.append(f"Azurite (node + azurite; or set {AZURITE_ENV_VAR} to its blob main.js)")
    else:
        return f"unknown blob store {store!r}"
    if missing:
        return f"{store} server unavailable: {', '.join(missing)} not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"no answer from {url} within {timeout} s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a server by its own process group (SIGTERM, then SIGKILL after 10 s)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class BlobServer:
    """A running local server, with a bucket (container) made for the suite and the harness's environment."""

    store: str
    process: subprocess.Popen[bytes]
    url: str
    bucket: str
    env: dict[str, str]
    client: Any = None

    def make_client(self) -> Any:
        """A client for the orchestrator side (S3 and Azure clients are shared; GCS gets one per session)."""
        if self.store == "gcs":
            return _gcs_client(self.url)
        return self.client

    def stop(self) -> None:
        close = getattr(self.client, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # a client that fails to close must not keep the server running
                pass
        stop_process(self.process)


def _spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _gcs_client(url: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
    return storage.Client(project="conformance", credentials=credentials, client_options={"api_endpoint": url})


def _bucket_name() -> str:
    return f"conformance-{uuid.uuid4().hex[:20]}"


def start_store(store: str) -> BlobServer:
    """Start the server of ``store``, make a bucket (container) on it, and return it."""
    port = free_port()
    bucket = _bucket_name()
    if store == "s3":
        process = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/moto-api/", process)
            import boto3

            client = boto3.session.Session().client(
                "s3", endpoint_url=url, region_name=S3_REGION, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            )
            client.create_bucket(Bucket=bucket)
        except BaseException:
            stop_process(process)
            raise
        env = {"AWS_ENDPOINT_URL": url, "AWS_REGION": S3_REGION, "AWS_DEFAULT_REGION": S3_REGION, **S3_KEYS}
        return BlobServer(store, process, url, bucket, env, client)
    if store == "gcs":
        process = _spawn([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port",
                          str(port), "--in-memory", "-q"])
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/", process)
            _gcs_client(url).create_bucket(bucket)
        except BaseException:
            stop_process(process)
            raise
        return BlobServer(store, process, url, bucket, {"STORAGE_EMULATOR_HOST": url})
    if store == "azure":
        command = _azurite_command()
        if command is None:
            raise RuntimeError(unavailable_reason("azure"))
        process = _spawn([*command, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                          "--skipApiVersionCheck", "--disableTelemetry", "--silent"])
        url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        connection_string = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                             f"BlobEndpoint={url};")
        try:
            wait_http(f"{url}?comp=list", process)
            from azure.storage.blob import BlobServiceClient

            client = BlobServiceClient.from_connection_string(connection_string, retry_total=0)
            client.create_container(bucket)
        except BaseException:
            stop_process(process)
            raise
        return BlobServer(store, process, url, bucket, {"AZURE_STORAGE_CONNECTION_STRING": connection_string}, client)
    raise ValueError(f"unknown blob store {store!r}")
