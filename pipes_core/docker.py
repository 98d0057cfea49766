"""``PipesDockerClient``: run the external process in a Docker container (extra ``pipes-sdk[docker]``).

The lifecycle (session, output, timeout, termination, drain, verdict) is the launchers' shared one
(:class:`~pipes_core.PipesClient`); this module creates, starts, watches, signals and removes one container.

Defaults, and why:

* **bootstrap by env vars** (``DAGSTER_PIPES_CONTEXT`` / ``DAGSTER_PIPES_MESSAGES`` in the container's
  environment): nothing has to be shared with the container. ``bootstrap="cli"`` appends the arguments to the
  command instead (to the image's ``CMD`` when no command is given).
* **messages over the container's stdout**, read live from the daemon's attach stream by
  :class:`~pipes_core.PipesStdioMessageReader` (attached before the container starts, so nothing is missed);
  lines that are not messages are the container's output, forwarded to this process's stdout, and its stderr
  to this process's stderr. The stream gives back-pressure: a container that floods its output waits for us,
  and our memory stays bounded (message lines are capped by the reader's ``max_line_bytes``).
* **file channels bind-mounted**: a context injector or message reader that uses a file (e.g.
  :class:`~pipes_core.PipesTempFileMessageReader`) gets that file bind-mounted at the same path in the
  container (``mount_channel_files``; the context read-only); this needs the daemon on this machine.
  Blob-store channels need only that the container can reach the store.
* **``init=True``**: a small init process (``docker run --init``) is the container's PID 1 and passes signals
  on, so SIGTERM stops a program that installs no handler (PID 1 ignores it otherwise).
* **no pull**: an image missing from the daemon is an error naming it, unless ``pull=True``.
* **the container is removed** after the run (and after its output was drained) unless ``keep_container``.

Termination (``timeout_seconds``, Ctrl-C with ``forward_termination``, SIGTERM to this process): the container
gets SIGINT, then after ``termination_timeout_seconds`` SIGTERM, then SIGKILL (``docker kill -s``); its output
is drained, then it is removed, and the error is raised as :class:`~pipes_core.PipesSubprocessClient` does.

Durable runs (``launch_key=``, README "Durable runs"): the container is named by the key
(:attr:`~pipes_core.launch.process.DurableLaunch.name`, ``pipes-`` and 32 hex digits), labelled with it, and
outlives its orchestrator (it is removed only once a run has seen it end); a create refused because the name is
taken (409) means another orchestrator made it: that one is attached to, never a second one. Its handle holds the
container's id and name, the image and the daemon's URL; a later orchestrator re-attaches on that daemon (its
output from the container's logs, from the start; its end from ``wait`` and ``inspect``). The messages file in the
run directory is bind-mounted at the same path (``mount_channel_files``): the daemon must run on this machine.
Every container carries its orchestrator's owner labels (:func:`~pipes_core.launch.process.launch_labels`), so
that :meth:`PipesDockerClient.sweep_orphans` can stop what an orchestrator that died left running without a key.

Errors name the cause: the daemon cannot be reached (saying which ``DOCKER_HOST`` or socket), the image is
missing, the container cannot be created or started (the daemon's message), it exited non-zero, it was killed
(an OOM kill is said as such), it never opened the channel (the shared lifecycle's rules).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from pipes_core.channels.injectors import PipesContextInjector
from pipes_core.channels.readers import PipesMessageReader
from pipes_core.launch.async_client import PipesAsyncClient, same_arguments_as
from pipes_core.launch.client import (
    BOOTSTRAP_ENV,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesExitStatus,
    PipesLaunchedProcess,
    PipesLaunchRequest,
    signal_name,
)
from pipes_core.launch.durable import ConcludedProcess, recorded_end
from pipes_core.launch.local import command_name
from pipes_core.launch.options import RunOptions, Unpack, check_run_options, common_options, run_signature
from pipes_core.launch.process import LAUNCH_LABEL, OWNER_HOST_LABEL, DurableLaunch, launch_labels, orphan_owner
from pipes_core.protocol.errors import PipesEngineErrorKind, PipesExecutionError, PipesUsageError
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._errors import install_hint
from pipes_ext._protocol import CONTEXT_RUN_ID, PARAM_PATH

__all__ = [
    "PipesDockerClient",
    "PipesAsyncDockerClient",
    "DockerRunOptions",
    "PipesDockerContainer",
    "describe_docker_host",
    "DEFAULT_DOCKER_HOST",
    "RUN_ID_LABEL",
    "KEEP_LABEL",
    "DOCKER_RUN_FLAGS",
    "run_options_from_docker_args",
]

# Where the Docker SDK (and CLI) look when DOCKER_HOST is not set.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# Every container we start carries the run id under this label (to find leftovers of a crashed orchestrator).
RUN_ID_LABEL = "io.pipes-sdk.run-id"
# A container launched with keep_container carries this label: sweep_orphans stops it when its owner is gone but
# leaves it (and, once ended, never removes it): it was asked to stay.
KEEP_LABEL: Final = "io.pipes-sdk.keep"
# The handle of a launched container (PipesDockerContainer.handle, PipesDockerClient.attach): its id and name, the
# image, the daemon's URL (unix:///path or http(s)://host:port; None when it cannot be said, e.g. over ssh), its
# description, and whether it is kept after its end.
HANDLE_CONTAINER: Final = "container"
HANDLE_NAME: Final = "name"
HANDLE_IMAGE: Final = "image"
HANDLE_DOCKER_HOST: Final = "docker_host"
HANDLE_DESCRIPTION: Final = "description"
HANDLE_KEEP: Final = "keep_container"
# A container's states (inspect's State.Status) after which it never runs again by itself, and before its start.
_ENDED_STATES: Final = frozenset({"exited", "dead"})
_CREATED_STATE: Final = "created"
# The daemon's answer to a create whose name is taken, and to a signal sent to a container not running.
_CONFLICT: Final = 409
_NOT_FOUND: Final = 404
# containers.create arguments the client sets itself: passing them in container_kwargs is a usage error.
_OWN_KWARGS = frozenset({"image", "command", "detach", "stdout", "stderr", "stream", "remove", "auto_remove",
                         "tty", "stdin_open"})
# Exit statuses above this are 128 + the number of the signal that ended the process (shell and Docker
# convention).
_SIGNAL_BASE = 128
# A size in bytes as docker run takes it (-m 512m) and the SDK parses it: a number and an optional unit (b, k, m
# or g, the last three optionally followed by b), in any case.
_SIZE = re.compile(r"\d+(\.\d+)?([kmg]b?|b)?", re.IGNORECASE)
# docker run --memory-swap=-1: unlimited swap.
_UNLIMITED_SWAP = "-1"


def _import_docker() -> Any:
    try:
        import docker
    except ImportError as exc:
        raise PipesUsageError(
            f"PipesDockerClient needs the Docker SDK for Python: {install_hint('docker', 'docker', 'pipes-sdk')}; "
            f"{exc}"
        ) from exc
    return docker


def _check_size(value: object, what: str) -> None:
    """Refuse a memory size the daemon would refuse (after the run started, worded as a daemon error)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:  # 0: no limit, as docker run says
        return
    if isinstance(value, str) and _SIZE.fullmatch(value):
        return
    raise PipesUsageError(f"{what} must be a size in bytes with an optional unit b, k, m or g (e.g. 512m, 2g), got "
                          f"{value!r}")


def _check_cpus(value: object, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise PipesUsageError(f"{what} must be positive and finite (a number of CPUs, e.g. 1.5), got {value!r}")


def _socket_of(client: Any) -> str | None:
    api = getattr(client, "api", client)
    path = getattr(getattr(api, "_custom_adapter", None), "socket_path", None)
    return path if isinstance(path, str) else None


def _check_socket(path: str | None, where: str) -> None:
    """Fail before connecting when a unix socket is missing (the SDK leaks the socket of a failed connect)."""
    if path and not os.path.exists(path):
        raise PipesExecutionError(f"cannot reach the Docker daemon at {where}: no socket at {path} (is dockerd "
                                  "running, and is DOCKER_HOST right?)", kind=PipesEngineErrorKind.UNREACHABLE)


def _daemon_url(client: Any) -> str | None:
    """The URL of the daemon a client talks to, as ``DOCKER_HOST`` takes it (``unix:///path``, or the client's
    ``http(s)://host:port``); None when it cannot be said (an ssh connection)."""
    socket_path = _socket_of(client)
    if socket_path:
        return f"unix://{socket_path}"
    base_url = getattr(getattr(client, "api", client), "base_url", None)
    return base_url if isinstance(base_url, str) and base_url.startswith(("http://", "https://")) else None


def _daemon_address(url: str) -> tuple[str, str]:
    """What identifies a daemon in its URL: a unix socket's path, else the host and port (``tcp://`` and the
    ``http(s)://`` the SDK turns it into name the same daemon)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("unix", "http+unix"):
        return "unix", os.path.normpath((parsed.netloc or "") + parsed.path)
    return "tcp", parsed.netloc


def _same_daemon(url: str | None, other: str | None) -> bool:
    return url is not None and other is not None and _daemon_address(url) == _daemon_address(other)


def _status_of(exc: BaseException) -> int | None:
    """The HTTP status of a Docker SDK error (None: not an answer of the daemon)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def describe_docker_host(client: Any = None, environ: Mapping[str, str] | None = None) -> str:
    """Which daemon a client talks to, for error messages: its unix socket or URL, and where that came from."""
    environ = os.environ if environ is None else environ
    if client is not None:
        socket_path = _socket_of(client)
        if socket_path:
            return f"unix://{socket_path} (the given client)"
        base_url = getattr(getattr(client, "api", client), "base_url", None)
        return f"{base_url} (the given client)" if base_url else "the given client's daemon"
    host = environ.get("DOCKER_HOST")
    if host:
        return f"{host} (DOCKER_HOST)"
    return f"{DEFAULT_DOCKER_HOST} (the default; DOCKER_HOST is not set)"


class PipesDockerContainer(PipesLaunchedProcess):
    """One started container, as the lifecycle drives it; made by :class:`PipesDockerClient` (launched, or found
    again for a durable run: :meth:`PipesDockerClient.attach`).

    Attributes:
        container: the Docker SDK ``Container``.
        id: the container id.
        name: the container's name (a durable run's is its key's launch name).
        durable: it was launched for a run with a ``launch_key`` (its :data:`LAUNCH_LABEL`): it is removed only
            once it has ended, and outlives this process otherwise.
    """

    def __init__(self, client: Any, container: Any, image: str, *, stdout: Any, stderr: Any, keep: bool,
                 own_client: bool, argv: Sequence[str] | None = None, description: str | None = None,
                 docker_host: str | None = None) -> None:
        self.client = client
        self.container = container
        self.id: str = container.id
        self.name = str(container.name or "")
        self.image = image
        self.durable = bool((container.labels or {}).get(LAUNCH_LABEL))
        if description is None:
            running = f" running {command_name(argv)!r}" if argv else ""  # the script, not its interpreter
            description = f"the container {self.id[:12]} (image {image!r}){running}"
        self.description = description
        self.docker_host = docker_host
        self.stdout = stdout
        self.stderr = stderr
        self._keep = keep
        self._own_client = own_client
        self._ended = threading.Event()
        self._wait_result: dict[str, Any] | None = None
        self._wait_error: BaseException | None = None
        self._signalled = False
        self._waiter = threading.Thread(target=self._wait_for_exit, daemon=True,
                                        name=f"pipes-docker-wait:{self.id[:12]}")

    def handle(self) -> dict[str, Any]:
        """How to find it again (README "Durable runs"): :meth:`PipesDockerClient.attach` takes it."""
        return {HANDLE_CONTAINER: self.id, HANDLE_NAME: self.name, HANDLE_IMAGE: self.image,
                HANDLE_DOCKER_HOST: self.docker_host, HANDLE_DESCRIPTION: self.description, HANDLE_KEEP: self._keep}

    def start_waiting(self) -> None:
        self._waiter.start()

    def waited(self) -> None:
        """Its end, asked now (a container found ended: the daemon answers at once), so that :meth:`poll` says
        it has ended from the start."""
        self._wait_for_exit()

    def _wait_for_exit(self) -> None:
        try:
            self._wait_result = self.client.api.wait(self.id, timeout=None)
        except BaseException as exc:  # the daemon went away: the end is unknown
            self._wait_error = exc
        finally:
            self._ended.set()

    def poll(self) -> bool:
        return self._ended.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self._ended.wait(timeout)

    def exit_status(self) -> PipesExitStatus:
        if self._wait_result is None:
            error = self._wait_error
            return PipesExitStatus(None, description=f"ended without an exit status (waiting on it failed: "
                                                     f"{type(error).__name__}: {error})")
        code = int(self._wait_result.get("StatusCode", -1))
        daemon_error = (self._wait_result.get("Error") or {}).get("Message") or ""
        state: dict[str, Any] = {}
        try:
            state = self.client.api.inspect_container(self.id).get("State", {})
        except Exception:  # removed by someone else: the wait result alone
            pass
        if state.get("OOMKilled"):
            limit = (self.container.attrs.get("HostConfig") or {}).get("Memory") or 0
            within = f" (memory limit {_format_bytes(limit)})" if limit else ""
            return PipesExitStatus(code, killed=True, description=f"was OOM-killed{within}, exit status {code}",
                                   kind=PipesEngineErrorKind.OUT_OF_MEMORY)
        if daemon_error:
            return PipesExitStatus(code, description=f"ended with the daemon reporting: {daemon_error}")
        number = code - _SIGNAL_BASE
        if code > _SIGNAL_BASE and number in _SIGNALS and (self._signalled or number == signal.SIGKILL):
            return PipesExitStatus(-number, killed=True,
                                   description=f"was killed by {signal_name(number)} (exit status {code})",
                                   kind=PipesEngineErrorKind.KILLED)
        return PipesExitStatus(code)

    def _signal(self, sig: str) -> None:
        if self._ended.is_set():
            return
        self._signalled = True
        try:
            self.client.api.kill(self.id, signal=sig)
        except Exception as exc:  # not running any more (409), gone (404): nothing to stop
            if _status_of(exc) not in (_NOT_FOUND, _CONFLICT):
                raise PipesExecutionError(f"sending {sig} to {self.description} failed: {exc}") from exc

    def interrupt(self) -> None:
        self._signal("SIGINT")

    def terminate(self) -> None:
        self._signal("SIGTERM")

    def kill(self) -> None:
        self._signal("SIGKILL")

    def discard(self) -> None:
        """Release a container that could not start: removed even with ``keep_container``."""
        self._keep = False
        self.close()

    def close(self) -> None:
        try:
            for stream in (self.stdout, self.stderr):
                _close_stream(stream)
            # A durable run's container still running is left running (a later run with the key re-attaches).
            if not self._keep and (not self.durable or self._wait_result is not None):
                try:
                    self.client.api.remove_container(self.id, v=True, force=True)
                except Exception as exc:
                    if _status_of(exc) != _NOT_FOUND:
                        raise
        finally:
            if self._own_client:
                self.client.close()


_SIGNALS = {int(s) for s in signal.Signals}


def _close_stream(stream: Any) -> None:
    """Close an attach stream and the HTTP response under it (closing only the stream's socket would leave the
    response's file object holding the descriptor until garbage collection)."""
    for target in (stream, getattr(stream, "_response", None)):
        close = getattr(target, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass


def _format_bytes(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


class DockerRunOptions(RunOptions, total=False):
    """The options of :meth:`PipesDockerClient.run` (and its asyncio twin's): its own, then the
    :class:`~pipes_core.RunOptions`.

    Keys:
        image: the image to run (required).
        command: a list, or a string split with :func:`shlex.split`; default the image's own.
        env: environment added to the client's for this run.
        volumes / mounts: as ``containers.run`` takes them.
        network: ``network_mode`` (e.g. ``"none"``).
        working_dir / user / name: the container's (no ``name`` with ``launch_key``: the key names it).
        mem_limit: bytes or ``"512m"``.
        cpus: e.g. ``1.5``.
        container_kwargs: any other ``containers.create`` argument.
        pull / keep_container: override the client's.
    """

    image: str
    command: str | Sequence[str] | None
    env: Mapping[str, str] | None
    volumes: Mapping[str, Any] | Sequence[str] | None
    mounts: Sequence[Any] | None
    network: str | None
    working_dir: str | None
    user: str | int | None
    mem_limit: int | str | None
    cpus: float | None
    name: str | None
    container_kwargs: Mapping[str, Any] | None
    pull: bool | None
    keep_container: bool | None


class PipesDockerClient(PipesClient):
    """Runs the external process in a Docker container (see the module doc for defaults and errors).

    Args:
        client: a ``docker.DockerClient`` to use (the caller keeps it open); default: one made per run from
            the environment (``DOCKER_HOST`` etc., as ``docker.from_env()``), closed after the run.
        env: environment variables set in every container (a run's ``env`` adds to them).
        context_injector: default :class:`~pipes_core.PipesEnvContextInjector`.
        message_reader: default :class:`~pipes_core.PipesStdioMessageReader` on the container's stdout.
        forward_termination: on Ctrl-C, stop the container (escalating) before re-raising.
        forward_stdio: forward the container's output to this process's stdout/stderr; with False only the
            last bytes are kept, for error messages.
        termination_timeout_seconds: how long the container gets after SIGINT before SIGTERM.
        strict: raise when the process never opens the channel or breaks the protocol.
        bootstrap: ``"env"`` (default) or ``"cli"``.
        pull: pull an image the daemon does not have (default: that is an error).
        keep_container: leave the stopped container behind (default: removed after the run).
        init: run an init process as PID 1 that passes signals on (``docker run --init``).
        mount_channel_files: bind-mount the directories of file-based channels at the same path.
        container_kwargs: further ``containers.create`` arguments for every run (a run's add to them).
    """

    def __init__(
        self,
        *,
        client: Any = None,
        env: Mapping[str, str] | None = None,
        context_injector: PipesContextInjector | None = None,
        message_reader: PipesMessageReader | None = None,
        forward_termination: bool = True,
        forward_stdio: bool = True,
        termination_timeout_seconds: float = 20,
        strict: bool = True,
        bootstrap: str = BOOTSTRAP_ENV,
        pull: bool = False,
        keep_container: bool = False,
        init: bool = True,
        mount_channel_files: bool = True,
        container_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            context_injector=context_injector,
            message_reader=message_reader,
            forward_termination=forward_termination,
            forward_stdio=forward_stdio,
            termination_timeout_seconds=termination_timeout_seconds,
            strict=strict,
            bootstrap=bootstrap,
        )
        self.client = client
        self.env = dict(env or {})
        self.pull = pull
        self.keep_container = keep_container
        self.init = init
        self.mount_channel_files = mount_channel_files
        self.container_kwargs = _check_container_kwargs(container_kwargs)

    @run_signature(DockerRunOptions, required=("image",))
    def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
            **options: Unpack[DockerRunOptions]) -> PipesClientCompletedInvocation:
        """Run ``image`` (with ``command``: a list, or a string split with :func:`shlex.split`; default the
        image's own) as a Pipes external process in a new container, and return what it reported.

        Container options: ``volumes`` and ``mounts`` as ``containers.run`` takes them, ``network``
        (``network_mode``, e.g. ``"none"``), ``working_dir``, ``user``, ``mem_limit`` (bytes or ``"512m"``),
        ``cpus`` (e.g. ``1.5``), ``name``, and any other ``containers.create`` argument in ``container_kwargs``.

        ``logger`` (a :class:`logging.Logger` or :class:`logging.LoggerAdapter`, e.g. an orchestrator's per-task
        logger) receives this run's ``log`` messages and protocol issues instead of ``pipes_core.external``, each
        record carrying ``pipes_run_id`` and ``pipes_command`` (the command, or the image's name when it runs its
        own) as ``extra`` fields; ``external_stream_handler`` receives the text the process sends with
        ``log_external_stream`` as ``(stream, text)``; ``fail_on_check_error``, ``raise_on_event_error`` and
        ``on_message``: as for every client (see :meth:`pipes_core.PipesClient.run_launcher`).

        Raises:
            PipesExecutionError: the daemon cannot be reached, the image is missing, the container could not
                start, failed, was killed or OOM-killed, never opened the channel or broke the protocol;
                ``.invocation`` holds what was received.
            PipesTimeoutError: the run exceeded ``timeout_seconds``.
            PipesTransportError: the message channel failed.
            KeyboardInterrupt: re-raised after the container was stopped and the channel drained.
        """
        launch, command, common = self.launcher(options, where="PipesDockerClient.run")
        return self.run_launcher(launch, context=context, extras=extras, command=command, **common)

    def launcher(self, options: DockerRunOptions, *, where: str
                 ) -> tuple[Callable[[PipesLaunchRequest], PipesLaunchedProcess], str | list[str], RunOptions]:
        """Check the run's own options; the launch function (shared by the asyncio twin), the command (for
        ``pipes_command``) and the shared options."""
        check_run_options(options, DockerRunOptions, where, required=("image",))
        image = options["image"]
        command = options.get("command")
        cpus = options.get("cpus")
        mounts = options.get("mounts")
        env = options.get("env")
        pull = options.get("pull")
        keep_container = options.get("keep_container")
        if not isinstance(image, str) or not image:
            raise PipesUsageError(f"image must be a non-empty string, got {image!r}")
        if options.get("launch_key") is not None and (options.get("name") is not None
                                                      or "name" in (options.get("container_kwargs") or {})):
            raise PipesUsageError("name= cannot be given with launch_key=: a durable run's container is named by its "
                                  "key (pipes- and a digest of it); leave name out")
        argv: list[str] | None = None
        if command is not None:
            argv = shlex.split(command) if isinstance(command, str) else [str(part) for part in command]
            if not argv:
                raise PipesUsageError("command is empty (pass None to run the image's own command)")
        if cpus is not None:
            _check_cpus(cpus, "cpus")
        mem_limit = options.get("mem_limit")
        if mem_limit is not None:
            _check_size(mem_limit, "mem_limit")
        _import_docker()  # a missing SDK is said before anything starts
        create: dict[str, Any] = {**self.container_kwargs,
                                  **_check_container_kwargs(options.get("container_kwargs"))}
        for key, value in (("volumes", options.get("volumes")),
                           ("mounts", list(mounts) if mounts is not None else None),
                           ("network_mode", options.get("network")), ("working_dir", options.get("working_dir")),
                           ("user", options.get("user")), ("mem_limit", mem_limit),
                           ("name", options.get("name"))):
            if value is not None:
                create[key] = value
        if cpus is not None:
            create["nano_cpus"] = int(cpus * 1e9)
        create.setdefault("init", self.init)
        environment = {**self.env, **dict(create.pop("environment", None) or {}), **(env or {})}
        do_pull = self.pull if pull is None else pull
        keep = self.keep_container if keep_container is None else keep_container

        def launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
            return self._launch(request, image, argv, environment, create, do_pull, keep)

        return launch, image if argv is None else argv, common_options(options)

    # ------------------------------------------------------------------ launching

    def _docker_client(self, daemon: str | None = None) -> tuple[Any, bool]:
        """The client for this run, and whether it is ours (to close after the run). ``daemon``: the URL of the
        daemon to talk to (a durable run's handle's), when it is not the one the client is configured for."""
        docker = _import_docker()
        if self.client is not None and (daemon is None or _same_daemon(_daemon_url(self.client), daemon)):
            _check_socket(_socket_of(self.client), describe_docker_host(self.client))
            return self.client, False
        kwargs = docker.utils.kwargs_from_env()
        where = describe_docker_host()
        if daemon is not None and not _same_daemon(kwargs.get("base_url") or DEFAULT_DOCKER_HOST, daemon):
            # The environment's TLS settings are kept for a TCP daemon (the run's record holds only the URL).
            kwargs = {"base_url": daemon, **({} if daemon.startswith("unix://") or "tls" not in kwargs
                                             else {"tls": kwargs["tls"]})}
            where = f"{daemon} (where the run was launched)"
        host = kwargs.get("base_url") or DEFAULT_DOCKER_HOST
        if host.startswith("unix://"):
            _check_socket(host[len("unix://"):], where)
        # The API version is asked here, not in a client's constructor, so a failure leaves no client open.
        probe = docker.APIClient(version=docker.constants.MINIMUM_DOCKER_API_VERSION, **kwargs)
        try:
            server = str(probe.version(api_version=False).get("ApiVersion") or "")
        except (docker.errors.DockerException, OSError) as exc:
            raise PipesExecutionError(f"cannot reach the Docker daemon at {where}: {exc}",
                                      kind=PipesEngineErrorKind.UNREACHABLE) from exc
        finally:
            probe.close()
        ours = docker.constants.DEFAULT_DOCKER_API_VERSION
        version = server if server and docker.utils.version_lt(server, ours) else ours
        return docker.DockerClient(version=version, **kwargs), True

    def _launch(self, request: PipesLaunchRequest, image: str, argv: list[str] | None, environment: dict[str, str],
                options: dict[str, Any], pull: bool, keep: bool) -> PipesDockerContainer:
        docker = _import_docker()
        client, own_client = self._docker_client()
        where = describe_docker_host(None if own_client else client)
        create = dict(options)
        create["environment"] = {**environment, **request.bootstrap_env}
        durable = request.durable
        create["labels"] = {RUN_ID_LABEL: str(request.session.context_data.get(CONTEXT_RUN_ID, "")),
                            **dict(create.get("labels") or {}), **launch_labels(request.owner, durable),
                            **({KEEP_LABEL: "true"} if keep else {})}
        if durable is not None:  # findable by the key (never auto-removed: close() removes it once it has ended)
            create["name"] = durable.name
        if self.mount_channel_files:
            create["volumes"] = _with_channel_mounts(create.get("volumes"), request)
        container: Any = None
        launched: PipesDockerContainer | None = None
        try:
            try:
                container = self._create(client, docker, image, argv, request, create, pull, where)
            except _NameTaken:  # another orchestrator created the key's container: that one is the launch
                assert durable is not None
                return self._found(client, own_client, durable.name, where)
            # Attached before the start, as `docker run` does, so no output is missed; one stream each, so the
            # stdout carrying the messages and the stderr are read apart.
            out = client.api.attach(container.id, stdout=True, stderr=False, stream=True, logs=False)
            err = client.api.attach(container.id, stdout=False, stderr=True, stream=True, logs=False)
            launched = PipesDockerContainer(client, container, image, stdout=out, stderr=err, keep=keep,
                                            own_client=own_client, argv=argv, docker_host=_daemon_url(client))
            try:
                client.api.start(container.id)
            except docker.errors.APIError as exc:
                raise PipesExecutionError(
                    f"cannot start a container of image {image!r} on {where}: {_explain(exc)}",
                    kind=PipesEngineErrorKind.REFUSED) from exc
            launched.start_waiting()
            return launched
        except BaseException:
            if launched is not None:
                launched.discard()  # it never ran: removed whatever keep_container says; closes our client
            else:
                if container is not None:
                    try:
                        client.api.remove_container(container.id, force=True)
                    except Exception:
                        pass
                if own_client:
                    client.close()
            raise

    def _create(self, client: Any, docker: Any, image: str, argv: list[str] | None, request: PipesLaunchRequest,
                create: dict[str, Any], pull: bool, where: str) -> Any:
        for attempt in (1, 2):
            try:
                command = argv
                if request.bootstrap_args:
                    if command is None:
                        command = list(client.images.get(image).attrs.get("Config", {}).get("Cmd") or [])
                    command = command + request.bootstrap_args
                return client.containers.create(image, command, detach=True, **create)
            except docker.errors.ImageNotFound as exc:
                if not pull or attempt == 2:
                    advice = "" if pull else "; no pull was attempted (pass pull=True, or build or load it first)"
                    raise PipesExecutionError(
                        f"the image {image!r} is not on the Docker daemon at {where}{advice}",
                        kind=PipesEngineErrorKind.IMAGE_MISSING) from exc
                try:
                    client.images.pull(image)
                except docker.errors.DockerException as pull_error:
                    raise PipesExecutionError(
                        f"pulling the image {image!r} on {where} failed: {_explain(pull_error)}",
                        kind=PipesEngineErrorKind.IMAGE_MISSING) from pull_error
            except TypeError as exc:  # an argument containers.create does not know
                raise PipesUsageError(f"container options: {exc}") from exc
            except docker.errors.APIError as exc:
                if request.durable is not None and _status_of(exc) == _CONFLICT:
                    raise _NameTaken(request.durable.name) from exc
                raise PipesExecutionError(
                    f"cannot create a container of image {image!r} on {where}: {_explain(exc)}",
                    kind=PipesEngineErrorKind.REFUSED) from exc
            except (docker.errors.DockerException, OSError) as exc:  # connection refused, socket missing...
                raise PipesExecutionError(f"cannot reach the Docker daemon at {where}: {exc}",
                                          kind=PipesEngineErrorKind.UNREACHABLE) from exc
        raise AssertionError("unreachable")  # pragma: no cover


    # ------------------------------------------------------------------ durable runs

    def attach(self, handle: dict[str, Any], request: PipesLaunchRequest | None = None) -> PipesLaunchedProcess:
        """The container of a durable run, found again from its handle (:meth:`PipesDockerContainer.handle`) on
        the daemon it was launched on (README "Durable runs"): running or ended; its output from its logs, from
        the start. A container removed after its end was recorded is that recorded end (no output)."""
        docker = _import_docker()
        daemon = handle.get(HANDLE_DOCKER_HOST)
        client, own_client = self._docker_client(daemon if isinstance(daemon, str) else None)
        where = describe_docker_host(None if own_client else client) if daemon is None else str(daemon)
        try:
            return self._found(client, own_client, str(handle[HANDLE_CONTAINER]), where,
                               description=handle.get(HANDLE_DESCRIPTION), keep=handle.get(HANDLE_KEEP))
        except docker.errors.NotFound as exc:
            if own_client:
                client.close()
            described = str(handle.get(HANDLE_DESCRIPTION) or f"the container {handle[HANDLE_CONTAINER]}")
            ended = recorded_end(handle)
            if ended is not None:  # removed after its end was seen (and recorded): that end
                return ConcludedProcess(ended, described)
            raise PipesExecutionError(
                f"{described} is gone from the Docker daemon at {where} before anybody saw it end: how it ended is "
                "unknown; forget the run (`pipes runs forget KEY`) and run it again") from exc
        except BaseException:
            if own_client:
                client.close()
            raise

    def find_launch(self, durable: DurableLaunch) -> dict[str, Any] | None:
        """The handle of the container named by the key (running or ended), else None."""
        docker = _import_docker()
        client, own_client = self._docker_client()
        try:
            try:
                container = client.containers.get(durable.name)
            except docker.errors.NotFound:
                return None
            _check_ours(container, durable.name, describe_docker_host(None if own_client else client))
            image = str((container.attrs.get("Config") or {}).get("Image") or "")
            return {HANDLE_CONTAINER: container.id, HANDLE_NAME: durable.name, HANDLE_IMAGE: image,
                    HANDLE_DOCKER_HOST: _daemon_url(client),
                    HANDLE_DESCRIPTION: f"the container {container.id[:12]} (image {image!r})",
                    HANDLE_KEEP: KEEP_LABEL in (container.labels or {})}
        finally:
            if own_client:
                client.close()

    def sweep_orphans(self) -> list[str]:
        """Stop and remove the containers (running or not) launched without a launch key by an orchestrator of
        this host that is gone (their owner labels); one line said per container. A container launched with
        ``keep_container`` is stopped but kept."""
        docker = _import_docker()
        client, own_client = self._docker_client()
        said: list[str] = []
        try:
            for container in client.containers.list(all=True, filters={"label": OWNER_HOST_LABEL}):
                labels = container.labels or {}
                owner = orphan_owner(labels)
                if owner is None:
                    continue
                ended = container.status in _ENDED_STATES
                kept = KEEP_LABEL in labels
                if ended and kept:
                    continue
                image = (container.attrs.get("Config") or {}).get("Image")
                try:
                    if kept:
                        client.api.kill(container.id)
                    else:
                        client.api.remove_container(container.id, v=True, force=True)
                except docker.errors.APIError as exc:
                    if _status_of(exc) in (_NOT_FOUND, _CONFLICT):  # gone or ended meanwhile (another sweep)
                        continue
                    raise
                done = ("removed the ended" if ended else "stopped and kept the" if kept
                        else "stopped and removed the")
                said.append(f"{done} container {container.id[:12]} (image {image!r}) launched by process "
                            f"{owner.pid} on host {owner.host}, which is gone")
        finally:
            if own_client:
                client.close()
        return said

    def _found(self, client: Any, own_client: bool, reference: str, where: str, *, description: Any = None,
               keep: Any = None) -> PipesDockerContainer:
        """A durable run's container (by id or name) as a launched process: a container created but never
        started (its orchestrator died in between) is started; its output is read from its logs; one found
        ended says so from the start. Raises ``docker.errors.NotFound`` when there is none."""
        container = client.containers.get(reference)
        _check_ours(container, container.name, where)
        state = str((container.attrs.get("State") or {}).get("Status") or "")
        if state == _CREATED_STATE:
            client.api.start(container.id)
        image = str((container.attrs.get("Config") or {}).get("Image") or "")
        out = client.api.logs(container.id, stdout=True, stderr=False, stream=True, follow=True)
        err = client.api.logs(container.id, stdout=False, stderr=True, stream=True, follow=True)
        found = PipesDockerContainer(
            client, container, image, stdout=out, stderr=err,
            keep=bool(keep) if keep is not None else KEEP_LABEL in (container.labels or {}),
            own_client=own_client, description=None if description is None else str(description),
            docker_host=_daemon_url(client))
        if state in _ENDED_STATES:
            found.waited()
        else:
            found.start_waiting()
        return found


class _NameTaken(Exception):
    """A durable run's container could not be created: its name is taken (another orchestrator created it)."""


def _check_ours(container: Any, name: str, where: str) -> None:
    """A container found by a durable run's name must carry that name as its launch label."""
    if (container.labels or {}).get(LAUNCH_LABEL) != name.lstrip("/"):
        raise PipesExecutionError(
            f"the container {name!r} on the Docker daemon at {where} was not launched for this run (it has no "
            f"{LAUNCH_LABEL}={name} label): remove or rename it, then run again", kind=PipesEngineErrorKind.REFUSED)


def _explain(exc: Any) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation) if explanation else str(exc)


def _check_container_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(kwargs or {})
    clash = sorted(set(options) & _OWN_KWARGS)
    if clash:
        raise PipesUsageError(
            f"container_kwargs may not set {', '.join(clash)}: PipesDockerClient sets them itself (use image=, "
            "command=, keep_container=; output is always attached without a TTY)")
    return options


def _with_channel_mounts(volumes: Any, request: PipesLaunchRequest) -> Any:
    """``volumes`` plus a same-path bind mount of each file channel (context read-only): the file itself when it
    exists (the session creates both before the launch), else its directory; a durable run's messages file, its
    run directory (writable: the file stays reachable however it is rewritten)."""
    wanted: dict[str, str] = {}
    session = request.session
    durable = request.durable
    for params, mode in ((session.message_reader_params, "rw"), (session.context_injector_params, "ro")):
        path = params.get(PARAM_PATH) if isinstance(params, Mapping) else None
        if isinstance(path, str) and path:
            path = os.path.abspath(path)
            in_run_directory = durable is not None and os.path.dirname(path) == os.path.abspath(durable.directory)
            source = path if os.path.isfile(path) and not in_run_directory else os.path.dirname(path)
            if wanted.get(source) != "rw":
                wanted[source] = mode
    if not wanted:
        return volumes
    if volumes is None:
        volumes = {}
    if isinstance(volumes, Mapping):
        merged = dict(volumes)
        for directory, mode in wanted.items():
            merged.setdefault(directory, {"bind": directory, "mode": mode})
        return merged
    listed = list(volumes)
    taken = {str(entry).split(":")[0] for entry in listed}
    return listed + [f"{d}:{d}:{m}" for d, m in wanted.items() if d not in taken]




# ---------------------------------------------------------------------------------------------- docker run flags

# The `docker run` flags `pipes run --docker-arg` understands, and the run() option each becomes.
DOCKER_RUN_FLAGS = ("--network", "-v/--volume", "-e/--env", "-w/--workdir", "-u/--user", "-m/--memory",
                    "--memory-swap", "--cpus", "--name", "--label", "--pids-limit", "--read-only", "--entrypoint",
                    "--init", "--pull", "--rm")


class _FlagParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise PipesUsageError(f"--docker-arg: {message} (understood: {', '.join(DOCKER_RUN_FLAGS)})")


def _flag_parser() -> _FlagParser:
    parser = _FlagParser(prog="docker run", add_help=False, allow_abbrev=False)
    parser.add_argument("--network")
    parser.add_argument("-v", "--volume", action="append", default=[])
    parser.add_argument("-e", "--env", action="append", default=[])
    parser.add_argument("-w", "--workdir")
    parser.add_argument("-u", "--user")
    parser.add_argument("-m", "--memory")
    parser.add_argument("--memory-swap")
    parser.add_argument("--cpus", type=float)
    parser.add_argument("--name")
    parser.add_argument("--label", action="append", default=[])
    parser.add_argument("--pids-limit", type=int)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--entrypoint")
    parser.add_argument("--init", choices=["true", "false"], nargs="?", const="true")
    parser.add_argument("--pull", choices=["missing", "always", "never"])
    parser.add_argument("--rm", choices=["true", "false"], nargs="?", const="true")
    return parser


def run_options_from_docker_args(args: Sequence[str]) -> dict[str, Any]:
    """``PipesDockerClient.run`` options from ``docker run`` flags (``["--network=none", "-v", "/a:/b:ro"]``).

    Only the flags in :data:`DOCKER_RUN_FLAGS` are understood; ``--pull always`` is taken as ``missing`` (an
    image already on the daemon is used), ``--rm=false`` keeps the container, ``--init=false`` runs without
    an init process.

    Raises:
        PipesUsageError: an unknown flag or a bad value, naming it.
    """
    flags, rest = _flag_parser().parse_known_args(list(args))
    if rest:
        raise PipesUsageError(f"--docker-arg: unsupported docker run argument(s) {' '.join(rest)!r} "
                              f"(understood: {', '.join(DOCKER_RUN_FLAGS)})")
    options: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    if flags.network is not None:
        options["network"] = flags.network
    if flags.volume:
        for volume in flags.volume:
            if volume.count(":") not in (1, 2) or not all(volume.split(":")[:2]):
                raise PipesUsageError(f"--docker-arg: -v {volume!r} is not SOURCE:TARGET[:MODE]")
        options["volumes"] = list(flags.volume)
    if flags.env:
        env: dict[str, str] = {}
        for item in flags.env:
            name, sep, value = item.partition("=")
            if not name:
                raise PipesUsageError(f"--docker-arg: -e {item!r} has no name")
            env[name] = value if sep else os.environ.get(name, "")
        options["env"] = env
    # Values the daemon would refuse are refused here, naming the flag, before it is contacted.
    if flags.memory is not None:
        _check_size(flags.memory, "--docker-arg=--memory")
    if flags.memory_swap is not None and flags.memory_swap != _UNLIMITED_SWAP:
        _check_size(flags.memory_swap, "--docker-arg=--memory-swap")
    if flags.cpus is not None:
        _check_cpus(flags.cpus, "--docker-arg=--cpus")
    if flags.pids_limit is not None and flags.pids_limit < -1:
        raise PipesUsageError(f"--docker-arg=--pids-limit must be -1 (unlimited) or more, got {flags.pids_limit}")
    for flag, option in (("workdir", "working_dir"), ("user", "user"), ("memory", "mem_limit"), ("cpus", "cpus"),
                         ("name", "name")):
        value = getattr(flags, flag)
        if value is not None:
            options[option] = value
    if flags.memory_swap is not None:
        kwargs["memswap_limit"] = flags.memory_swap
    if flags.label:
        kwargs["labels"] = dict(label.partition("=")[::2] for label in flags.label)
    if flags.pids_limit is not None:
        kwargs["pids_limit"] = flags.pids_limit
    if flags.read_only:
        kwargs["read_only"] = True
    if flags.entrypoint is not None:
        kwargs["entrypoint"] = flags.entrypoint
    if flags.init is not None:
        kwargs["init"] = flags.init == "true"
    if flags.pull is not None:
        options["pull"] = flags.pull != "never"
    if flags.rm is not None:
        options["keep_container"] = flags.rm == "false"
    if kwargs:
        options["container_kwargs"] = kwargs
    return options


class PipesAsyncDockerClient(PipesAsyncClient[PipesDockerClient]):
    """The asyncio twin of :class:`PipesDockerClient`: the same arguments, the same options of :meth:`run`
    (:class:`DockerRunOptions`), the same errors and invocation; ``await client.run(image=...)``. The Docker SDK
    blocks, so creating, polling, stopping and removing the container run on the client's own bounded executor;
    its log streams are read by a thread each. Cancelling the task stops the container (as Ctrl-C does for the
    sync client), drains the channel, and re-raises with ``.invocation``."""

    @same_arguments_as(PipesDockerClient.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(PipesDockerClient(*args, **kwargs))

    @run_signature(DockerRunOptions, required=("image",))
    async def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
                  **options: Unpack[DockerRunOptions]) -> PipesClientCompletedInvocation:
        """Run ``image`` in a new container on the running loop; see :meth:`PipesDockerClient.run`."""
        launch, command, common = self.config.launcher(options, where="PipesAsyncDockerClient.run")
        return await self.run_launcher(launch, context=context, extras=extras, command=command, **common)
