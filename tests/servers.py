"""Start and stop local blob-store servers (moto, gcp-storage-emulator, Azurite) for tests.

Each server runs as its own process on 127.0.0.1 on a free port, in its own process group, and is stopped by
its own process id. See ../shared/reference/emulators.md for the commands.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Where .ci/test installs Azurite with npm (a project-local folder, never global).
AZURITE_MAIN = REPO_ROOT / ".ci" / "node" / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until ``url`` answers with any HTTP status; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"no answer from {url} within {timeout} s")


def start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server by its own process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
