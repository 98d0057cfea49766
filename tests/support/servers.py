"""Start and stop local blob-store servers (moto, gcp-storage-emulator, Azurite) for tests.

Each server runs as its own process on 127.0.0.1 on a free port, in its own process group, and is stopped by
its own process id. The helpers (free ports, readiness, stopping) are the conformance suite's, in
``conformance/_servers.py``; the start-up commands are below.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conformance._servers import AZURITE_ACCOUNT, AZURITE_KEY, free_port, stop_process, wait_http
from tests.support.helpers import REPO_ROOT

# Where .ci/test installs Azurite with npm (a project-local folder, never global).
AZURITE_MAIN = REPO_ROOT / ".ci" / "node" / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"


def start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


stop = stop_process


def bin_path(name: str) -> str:
    """A console script installed next to this interpreter (the test venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process = process
        self.url = url

    def stop(self) -> None:
        stop(self.process)


def start_moto() -> Server:
    port = free_port()
    process = start([bin_path("moto_server"), "-H", "127.0.0.1", "-p", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/moto-api/", process)
    return Server(process, url)


def start_gcs() -> Server:
    port = free_port()
    process = start([bin_path("gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port),
                     "--in-memory", "-q"])
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/", process)
    return Server(process, url)


def start_azurite() -> Server:
    if not AZURITE_MAIN.exists():
        raise RuntimeError(f"Azurite is not installed at {AZURITE_MAIN}; run bash .ci/test (npm install)")
    node = shutil.which("node") or "node"
    port = free_port()
    process = start([node, str(AZURITE_MAIN), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                     "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent"])
    url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    wait_http(f"{url}?comp=list", process)
    return Server(process, url)


def azurite_connection_string(blob_endpoint: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={blob_endpoint};")


@contextmanager
def blob_servers_for_default_clients() -> Iterator[dict[str, dict[str, str]]]:
    """The three local servers (moto, the GCS emulator, Azurite), and for each channel name (``s3``, ``gcs``,
    ``azure``) the environment that points that SDK's default client at its server; stopped on exit."""
    started: list[Server] = []
    try:
        moto = start_moto()
        started.append(moto)
        gcs = start_gcs()
        started.append(gcs)
        azurite = start_azurite()
        started.append(azurite)
        yield {
            "s3": {"AWS_ENDPOINT_URL": moto.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"},
            "gcs": {"STORAGE_EMULATOR_HOST": gcs.url},
            "azure": {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(azurite.url)},
        }
    finally:
        for server in started:
            server.stop()
