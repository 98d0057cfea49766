"""A private Docker daemon and a locally built image, for the Docker tests and ``benchmarks/docker.py``.

Nothing here touches the machine's Docker set-up or network, and several test runs may use it at once:

* :class:`DockerDaemon` starts Debian's ``dockerd`` on a private socket with everything (data, exec state,
  pid file, config, trust key) under its own temp dir, with ``--bridge=none --iptables=false
  --ip6tables=false`` (no network changes), waits for the ``API listen on`` line it logs (then one ``/_ping``),
  and stops it by its own pid, and whatever it started (containerd, shims) by theirs.
* :func:`build_images` builds the base image without a registry: busybox-static plus the Python running this
  code (its binary, the shared libraries ``ldd`` lists, its standard library), at the same paths as here,
  imported with ``docker import``; then a ``docker build`` FROM it adds ``pipes_ext`` and ``dagster_pipes``
  (from this environment's site-packages). The base tarball is cached under ``.ci/cache/`` (keyed by what went
  into it), but a missing or unreadable cache only costs the time to rebuild it.

:func:`unavailable_reason` says why Docker cannot run here (the tests skip with it; ``.ci/test`` installs
``docker.io`` and ``busybox-static``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.engine_skips import EngineSkips
from tests.support.helpers import REPO_ROOT

CACHE_DIR = REPO_ROOT / ".ci" / "cache"
# Bump when the base image's recipe changes (it is part of the cache key).
BASE_RECIPE_VERSION = "2"
BASE_IMAGE = "pipes-test-base:latest"
TEST_IMAGE = "pipes-test:latest"
# Where the test image keeps pipes_ext and dagster_pipes (on PYTHONPATH).
IMAGE_CODE_DIR = "/opt/pipes"
# dockerd is usually up in 0.3-1 s; a busy 2-CPU machine may take much longer.
DAEMON_START_SECONDS = 120.0
# How long dockerd gets to stop its containers and containerd after SIGTERM before SIGKILL.
DAEMON_STOP_SECONDS = 30.0
# The line dockerd logs once its API serves (then one /_ping confirms it).
_LISTENING = "API listen on "
# Stdlib parts the containers never use: left out of the image (about half its size).
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip",
                "lib2to3", "pydoc_data"}


class DockerUnavailable(RuntimeError):
    """Docker cannot run here; the message says why."""


def unavailable_reason() -> str | None:
    """Why a private Docker daemon cannot run here, or None when it can."""
    if sys.platform != "linux":
        return f"Docker tests need Linux (this is {sys.platform})"
    if shutil.which("dockerd") is None:
        return "dockerd is not installed (bash .ci/test installs Debian's docker.io as root)"
    if os.geteuid() != 0:
        return "dockerd needs root (CI runs as root)"
    if _busybox() is None:
        return "busybox is not installed (bash .ci/test installs busybox-static)"
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker Python SDK is not installed (pip install -e '.[dev]')"
    return None


def _busybox() -> str | None:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("busybox")


# ---------------------------------------------------------------------------------------------- the daemon


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), deepest last."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                text = Path(f"/proc/{parent}/task/{task}/children").read_text()
            except OSError:
                continue
            for child in text.split():
                found.append(int(child))
                todo.append(int(child))
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): tells a live process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root) + "/"
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
    return sorted(points, key=len, reverse=True)


class DockerDaemon:
    """A private ``dockerd``: its own socket, data and exec dirs under one temp dir; stopped by pid."""

    def __init__(self, root: Path, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.root = root
        self.process = process
        self.log_path = log_path
        self.socket = root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self._client: Any = None
        self._log_thread: threading.Thread | None = None

    @classmethod
    def start(cls, timeout: float = DAEMON_START_SECONDS) -> DockerDaemon:
        # A short path: a unix socket path must stay under 108 bytes.
        root = Path(tempfile.mkdtemp(prefix="pipes-dockerd-", dir="/tmp"))
        config = root / "daemon.json"
        # The trust key would otherwise go to /etc/docker/key.json, shared by every daemon on the machine.
        config.write_text(json.dumps({"deprecated-key-path": str(root / "key.json")}))
        log_path = root / "dockerd.log"
        cmd = [
            shutil.which("dockerd") or "dockerd",
            "--host", f"unix://{root / 'docker.sock'}",
            "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"),
            "--pidfile", str(root / "dockerd.pid"),
            "--config-file", str(config),
            "--bridge=none", "--iptables=false", "--ip6tables=false",
            "--shutdown-timeout", "2",
        ]
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        daemon = cls(root, process, log_path)
        listening = threading.Event()
        daemon._log_thread = threading.Thread(target=daemon._copy_log, args=(listening,), daemon=True,
                                              name="dockerd-log")
        daemon._log_thread.start()
        try:
            if not listening.wait(timeout) or process.poll() is not None:
                ended = process.poll()
                what = "did not listen" if ended is None else f"exited with {ended}"
                raise DockerUnavailable(
                    f"dockerd {what} within {timeout:.0f} s; its log ends with:\n{daemon.log_tail()}")
            daemon.client().ping()
        except BaseException:
            daemon.stop()
            raise
        return daemon

    def _copy_log(self, listening: threading.Event) -> None:
        assert self.process.stderr is not None
        with open(self.log_path, "ab") as log:
            for line in self.process.stderr:
                log.write(line)
                log.flush()
                if _LISTENING.encode() in line:
                    listening.set()
        listening.set()  # it exited: start() looks at the exit status

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def client(self) -> Any:
        """A docker SDK client for this daemon (one per daemon, made on first use)."""
        if self._client is None:
            import docker

            self._client = docker.DockerClient(base_url=self.host, version="auto", timeout=120)
        return self._client

    def env(self) -> dict[str, str]:
        """The environment for a docker client (SDK or CLI) to reach this daemon."""
        return {"DOCKER_HOST": self.host}

    def stop(self) -> None:
        """Stop dockerd by its pid (SIGTERM, then SIGKILL), then what it started, then remove its dir."""
        if self._client is not None:
            try:
                for container in self._client.containers.list(all=True):
                    container.remove(force=True)
            except Exception:
                pass
            self._client.close()
            self._client = None
        family = [(pid, _start_time(pid)) for pid in _children(self.process.pid)]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DAEMON_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_thread is not None:
            self._log_thread.join(DAEMON_STOP_SECONDS)
        if self.process.stderr is not None:
            self.process.stderr.close()
        # containerd and its shims, if dockerd left them (it stops them itself on a clean shutdown)
        for pid, started in family:
            if started is not None and _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for point in _mounts_under(self.root):
            subprocess.run(["umount", "-l", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if not _mounts_under(self.root):
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the images


@dataclass(frozen=True)
class BasePython:
    """The Python to put in the image: the one running this code (not the venv: its base installation)."""

    executable: Path
    stdlib: Path
    version: str

    @classmethod
    def current(cls) -> BasePython:
        executable = Path(os.path.realpath(sys.executable))
        stdlib = Path(os.path.realpath(os.path.dirname(os.__file__)))
        return cls(executable, stdlib, f"{sys.version_info.major}.{sys.version_info.minor}")


def _ldd(paths: list[str]) -> set[str]:
    """The shared libraries (and the loader) the given ELF files need, as ``ldd`` lists them."""
    found: set[str] = set()
    for start in range(0, len(paths), 200):
        proc = subprocess.run(["ldd", *paths[start:start + 200]], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                found.add(match.group(1))
    return found


_BaseInputs = tuple[BasePython, str, list[str], list[Path]]


def _base_inputs() -> _BaseInputs:
    python = BasePython.current()
    busybox = _busybox()
    if busybox is None:
        raise DockerUnavailable("busybox is not installed (bash .ci/test installs busybox-static)")
    dynload = python.stdlib / "lib-dynload"
    extensions = sorted(str(p) for p in dynload.glob("*.so")) if dynload.is_dir() else []
    libraries = sorted(_ldd([str(python.executable), busybox, *extensions]))
    stdlib_files = sorted(_stdlib_files(python.stdlib))
    return python, busybox, libraries, stdlib_files


def _stdlib_files(stdlib: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(stdlib):
        here = Path(dirpath)
        if here == stdlib:
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("config-")]
        for name in filenames:
            # Plain .pyc files keep start-up fast; the optimised variants are never used.
            if name.endswith((".opt-1.pyc", ".opt-2.pyc")):
                continue
            yield here / name


def _cache_key(python: BasePython, busybox: str, libraries: list[str], stdlib_files: list[Path]) -> str:
    digest = hashlib.sha256(BASE_RECIPE_VERSION.encode())
    for path in [str(python.executable), busybox, *libraries]:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    digest.update(f"{python.stdlib}\0{len(stdlib_files)}\n".encode())
    for path in stdlib_files[:: max(1, len(stdlib_files) // 200)]:  # a sample: the stdlib changes as a whole
        digest.update(f"{path}\0{path.stat().st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _add_dirs(tar: tarfile.TarFile, path: str, seen: set[str]) -> None:
    parts = Path(path).parts[1:-1]
    for depth in range(1, len(parts) + 1):
        name = "/".join(parts[:depth])
        if name in seen:
            continue
        seen.add(name)
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)


def _add_file(tar: tarfile.TarFile, source: str | Path, target: str, seen: set[str], mode: int | None = None) -> None:
    """``source``'s content (symlinks followed) at ``target`` in the image."""
    if target.lstrip("/") in seen:
        return
    _add_dirs(tar, target, seen)
    st = os.stat(source)
    info = tarfile.TarInfo(target.lstrip("/"))
    info.size = st.st_size
    info.mode = mode if mode is not None else (st.st_mode & 0o7777)
    info.mtime = int(st.st_mtime)
    with open(source, "rb") as data:
        tar.addfile(info, data)
    seen.add(target.lstrip("/"))


def _add_symlink(tar: tarfile.TarFile, target: str, points_to: str, seen: set[str]) -> None:
    if target.lstrip("/") in seen:
        return
    _add_dirs(tar, target, seen)
    info = tarfile.TarInfo(target.lstrip("/"))
    info.type = tarfile.SYMTYPE
    info.linkname = points_to
    tar.addfile(info)
    seen.add(target.lstrip("/"))


def _add_text(tar: tarfile.TarFile, target: str, text: str, seen: set[str]) -> None:
    _add_dirs(tar, target, seen)
    data = text.encode()
    info = tarfile.TarInfo(target.lstrip("/"))
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    seen.add(target.lstrip("/"))


def write_base_tarball(path: Path, inputs: _BaseInputs | None = None) -> None:
    """The base image's root filesystem: busybox (with its applets on /bin), this Python at its own paths
    (plus ``/usr/local/bin/python3``), the libraries they need, a minimal /etc, /tmp."""
    python, busybox, libraries, stdlib_files = inputs or _base_inputs()
    seen: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, mode in (("tmp", 0o1777), ("root", 0o755), ("etc", 0o755), ("bin", 0o755), ("proc", 0o755),
                           ("sys", 0o755), ("dev", 0o755), ("home", 0o755), ("work", 0o777)):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)
            seen.add(name)
        _add_file(tar, busybox, "/bin/busybox", seen)
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                _add_symlink(tar, f"/bin/{applet}", "busybox", seen)
        for library in libraries:
            _add_file(tar, library, library, seen)
        _add_file(tar, python.executable, str(python.executable), seen)
        for link in (f"/usr/local/bin/python{python.version}", "/usr/local/bin/python3", "/usr/local/bin/python"):
            _add_symlink(tar, link, str(python.executable), seen)
        for file in stdlib_files:
            _add_file(tar, file, str(file), seen)
        _add_dirs(tar, str(python.stdlib / "site-packages" / "x"), seen)
        _add_text(tar, "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:"
                  "/bin/false\npipes:x:1000:1000:pipes:/home:/bin/sh\n", seen)
        _add_text(tar, "/etc/group", "root:x:0:\nnogroup:x:65534:\npipes:x:1000:\n", seen)
        library_dirs = sorted({os.path.dirname(lib) for lib in libraries})
        _add_text(tar, "/etc/ld.so.conf", "".join(f"{d}\n" for d in library_dirs), seen)


def base_tarball(cache_dir: Path = CACHE_DIR, inputs: _BaseInputs | None = None) -> tuple[Path, bool]:
    """The base tarball: from the cache when one was made from the same inputs, else built (and cached when the
    cache dir is writable). Returns the path and whether it came from the cache."""
    python, busybox, libraries, stdlib_files = inputs or _base_inputs()
    key = _cache_key(python, busybox, libraries, stdlib_files)
    cached = cache_dir / f"docker-base-{key}.tar"
    if cached.is_file():
        try:
            with tarfile.open(cached) as tar:  # a truncated file from a killed run fails here
                tar.getmember("bin/busybox")
            return cached, True
        except (OSError, tarfile.TarError, KeyError):
            pass
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=".docker-base-", suffix=".tar", dir=cache_dir)
        os.close(fd)
    except OSError:  # no cache here: build into a temp file every time
        fd, temp_name = tempfile.mkstemp(prefix="pipes-docker-base-", suffix=".tar")
        os.close(fd)
        write_base_tarball(Path(temp_name), (python, busybox, libraries, stdlib_files))
        return Path(temp_name), False
    try:
        write_base_tarball(Path(temp_name), (python, busybox, libraries, stdlib_files))
        os.replace(temp_name, cached)  # atomic: a concurrent run sees the old file or the whole new one
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    for old in cache_dir.glob("docker-base-*.tar"):
        if old != cached:
            old.unlink(missing_ok=True)
    return cached, False


def _site_package(name: str) -> Path:
    module = __import__(name)
    return Path(module.__file__).resolve().parent


def _context_tar(dockerfile: str, packages: dict[str, Path]) -> io.BytesIO:
    """A build context: the Dockerfile and each package's ``.py`` files (and ``py.typed``)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, source in packages.items():
            for file in sorted(source.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts and file.suffix in (".py", ".typed", ".json"):
                    tar.add(str(file), arcname=f"{name}/{file.relative_to(source)}", recursive=False)
    buffer.seek(0)
    return buffer


@dataclass
class DockerImages:
    base: str
    test: str
    python: str  # the command that runs Python in the images
    base_from_cache: bool
    seconds_base_tarball: float
    seconds_import: float
    seconds_build: float


def build_images(daemon: DockerDaemon) -> DockerImages:
    """Import the base image into ``daemon`` and build the test image from it (see module doc)."""
    client = daemon.client()
    started = time.monotonic()
    inputs = _base_inputs()
    tarball, from_cache = base_tarball(inputs=inputs)
    after_tarball = time.monotonic()
    try:
        repository, tag = BASE_IMAGE.split(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    finally:
        if not tarball.is_relative_to(CACHE_DIR):
            tarball.unlink(missing_ok=True)
    after_import = time.monotonic()
    library_dirs = sorted({os.path.dirname(lib) for lib in inputs[2]})
    dockerfile = "\n".join([
        f"FROM {BASE_IMAGE}",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"ENV LD_LIBRARY_PATH={':'.join(library_dirs)}",
        f"ENV PYTHONPATH={IMAGE_CODE_DIR}",
        f"COPY pipes_ext {IMAGE_CODE_DIR}/pipes_ext",
        f"COPY dagster_pipes {IMAGE_CODE_DIR}/dagster_pipes",
        f"RUN python3 -m compileall -q {IMAGE_CODE_DIR}",
        "WORKDIR /work",
        "",
    ])
    context = _context_tar(dockerfile, {"pipes_ext": REPO_ROOT / "pipes_ext",
                                        "dagster_pipes": _site_package("dagster_pipes")})
    client.images.build(fileobj=context, custom_context=True, tag=TEST_IMAGE, rm=True, forcerm=True,
                        network_mode="none", pull=False)
    done = time.monotonic()
    return DockerImages(BASE_IMAGE, TEST_IMAGE, "python3", from_cache, after_tarball - started,
                        after_import - after_tarball, done - after_import)


def socket_path(host: str) -> str:
    """``/x/docker.sock`` for ``unix:///x/docker.sock``."""
    return urllib.parse.urlparse(host).path


# ---------------------------------------------------------------------------------------------- the fixture

SKIPS = EngineSkips("Docker")


@dataclass
class DockerEngine:
    """What the Docker tests get: a running private daemon, its client, and the built images."""

    daemon: DockerDaemon
    images: DockerImages

    @property
    def client(self) -> Any:
        return self.daemon.client()

    @property
    def host(self) -> str:
        return self.daemon.host


def start_engine() -> DockerEngine:
    """Start a private daemon and build the images in it (the caller stops ``engine.daemon``).

    Raises:
        DockerUnavailable: Docker cannot run here (the reason is the message).
    """
    reason = unavailable_reason()
    if reason is not None:
        raise DockerUnavailable(reason)
    daemon = DockerDaemon.start()
    try:
        images = build_images(daemon)
    except BaseException:
        daemon.stop()
        raise
    return DockerEngine(daemon, images)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A private dockerd with the test image built; Docker tests skip (loudly) when Docker cannot run here."""
    SKIPS.skip_if_known()
    try:
        engine = start_engine()
    except DockerUnavailable as exc:
        SKIPS.skip(f"Docker unavailable: {exc}")
    try:
        yield engine
    finally:
        engine.daemon.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly when the Docker tests could not run."""
    SKIPS.report(terminalreporter)
