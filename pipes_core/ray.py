"""``PipesRayJobClient``: run a command as a Ray job (Ray Jobs API) in a Pipes session.

Needs the ``ray`` extra (``pip install 'pipes-sdk[ray]'``, which brings ``ray[default]``); ``ray`` is imported
only when a client first talks to a cluster.

How a run goes:

* the command becomes the job's entrypoint (a list is shell-quoted, a string is used as is). The bootstrap
  params go into ``runtime_env["env_vars"]`` (merged over the user's own), or with ``bootstrap="cli"`` are
  appended to the entrypoint as ``--dagster-pipes-context ... --dagster-pipes-messages ...``. The rest of
  ``runtime_env`` and the entrypoint resources (``entrypoint_num_cpus`` ...) are passed through;
* the job gets a submission id (``pipes-<12 hex digits>`` unless the run names one); it is logged when the job
  is submitted (logger ``pipes_core``), and it is in ``invocation.description`` and every error ("the Ray job
  pipes-... at http://...");
* messages come by default over the job's log stream (``{"stdio": "stdout"}``: the external process prints
  them on its stdout, which Ray writes to the job's log together with its stderr and Ray's own lines). The
  :class:`PipesStdioMessageReader` hands every line that is not a message on as output, so Ray's lines and the
  job's output are forwarded (to this process's stdout) and never taken for messages. Any other message reader
  (a blob store, a shared file) can be passed instead; the log is then only forwarded;
* completion comes from the job status. ``SUCCEEDED`` is exit code 0; ``FAILED`` raises with the driver's exit
  code and Ray's own message for the job (e.g. a runtime_env that could not be set up); ``STOPPED`` by someone
  else raises as a killed job;
* timeout, Ctrl-C (with ``forward_termination``) or SIGTERM: ``stop_job`` (Ray sends the driver SIGTERM, then
  SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S``, 3 s by default), wait until the job is terminal, drain the log,
  raise as :class:`pipes_core.PipesSubprocessClient` does.

The end of the log, without a fixed wait: Ray's log stream (``tail_job_logs``) closes only some seconds after
the job ends. Once the job status is terminal, the job's log file is complete, so the client stops the stream
and fetches the log once (``get_job_logs``), handing on only what the stream had not delivered yet: nothing is
lost or repeated and the run ends as soon as the job does. (The cost: a job's whole log is transferred a second
time at its end; the stream, which delivers at most 10 lines per read, is often behind for a busy job anyway.)
The same fetch covers a stream that breaks mid-job.

Owner labels: every job carries :func:`pipes_core.launch.process.launch_labels` (the orchestrator's host, pid and
start time; for a durable run the launch name) in its ``metadata``, over the user's own ``job_metadata``, so that
:meth:`PipesRayJobClient.sweep_orphans` can stop the keyless jobs of an orchestrator of this host that is gone.

Durable runs (``launch_key=``, README "Durable runs", docs/launchers/durable.md): the job's submission id is the
key's launch name (``pipes-<32 hex>``), so a later orchestrator finds it (:meth:`PipesRayJobClient.find_launch`);
Ray refuses a second submission with that id, and a launch refused so is attached to the job that has it. A Ray
job is independent of its submitter (its supervisor actor is detached), so it outlives the orchestrator. The
handle is the Jobs API address and the submission id; :meth:`PipesRayJobClient.attach` rebuilds the job from it
(the log is read again from its start: the output is forwarded again after a restart). An ended job stays in the
cluster's job list, as every Ray job does. A durable job also carries the identity of its run's claim
(:data:`CLAIM_LABEL`: the run directory's lock file, made anew for each claim of the key), so that a job left by
an earlier run with the same key (forgotten with ``pipes runs forget``, or a store that was wiped) is not taken
for this run's: :meth:`PipesRayJobClient.find_launch` deletes it when it has ended (``delete_job``; its driver log
file stays on the head, and the new job's log continues it), or refuses to launch while it runs. A job that is
gone when re-attached (deleted, or the head restarted without persistence) ends the run with the outcome
recorded in the handle, else as killed with an unknown outcome. The messages travel in the run directory's file:
the job must be able to write that path (a local head, or a filesystem shared at the same path).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from pipes_core.channels.injectors import PipesContextInjector
from pipes_core.channels.readers import PipesMessageReader
from pipes_core.channels.stdio import PipesStdioMessageReader
from pipes_core.launch.async_client import PipesAsyncClient, same_arguments_as
from pipes_core.launch.client import (
    BOOTSTRAP_ENV,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesExitStatus,
    PipesLaunchedProcess,
    PipesLaunchRequest,
    client_logger,
    signal_name,
)
from pipes_core.launch.durable import ConcludedProcess, recorded_end
from pipes_core.launch.local import command_name
from pipes_core.launch.options import RunOptions, Unpack, check_run_options, common_options, run_signature
from pipes_core.launch.process import DurableLaunch, launch_labels, orphan_owner
from pipes_core.protocol.errors import PipesEngineErrorKind, PipesExecutionError
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._errors import PipesTransportError, PipesUsageError, install_hint

__all__ = [
    "PipesRayJobClient",
    "PipesAsyncRayJobClient",
    "RayRunOptions",
    "PipesRayJob",
    "RAY_EXTRA",
    "RAY_STATUS_POLL_SECONDS",
    "RAY_LOG_DRAIN_SECONDS",
    "RAY_STATUS_FAILURE_SECONDS",
    "RAY_SUBMIT_RETRY_SECONDS",
    "RAY_STALE_JOB_SETTLE_SECONDS",
]

# What to install when ray is missing.
RAY_EXTRA = "pipes-sdk[ray]"
# How often the job status is asked for while the job runs: one small HTTP request to the dashboard each time;
# this is also the most a run can outlast its job.
RAY_STATUS_POLL_SECONDS = 0.1
# Once the job has ended, how long the default stdio reader waits for the log to be complete (one fetch of the
# job's log; a bound for a slow cluster, not a wait: the drain returns as soon as the log is in).
RAY_LOG_DRAIN_SECONDS = 60.0
# How long the job status may stay unreadable (the dashboard restarting, the network failing) before the run
# gives up on the cluster.
RAY_STATUS_FAILURE_SECONDS = 30.0
# How much of Ray's own message for a failed job goes into the error (Ray already caps it at 20,000 chars).
RAY_MESSAGE_CHARS = 2000
# A cluster that has just started may answer the Jobs API before its job agent is up ("No available agent to
# submit job, please try again later"): the submission is retried for this long, as Ray asks.
RAY_SUBMIT_RETRY_SECONDS = 60.0
_NO_AGENT = "No available agent"
# Deleting an ended job to reuse its submission id is safe only once the head has finished with it: its supervisor
# actor exits after the end, and the head's monitor of the job notices that within a second
# (JobManager.JOB_MONITOR_LOOP_PERIOD_S). Deleted before, the job's record is written again by them (a new
# submission is then refused as a duplicate), or the new job is marked FAILED ("Job supervisor actor died"); on
# the test machine both happened up to 1 s after the end, never from 2 s on. A job that ended less than this long
# ago (by its end_time) is given the rest of this time before it is deleted.
RAY_STALE_JOB_SETTLE_SECONDS = 6.0
# What Ray says when a submission id is taken (a job with it exists, running or ended) ...
_ALREADY_EXISTS = "already exists"
# ... and when no job has the id asked for (HTTP 404).
_NO_SUCH_JOB = "does not exist"
# The handle of a durable job (PipesRayJob.handle): the Jobs API address it was submitted to, its submission id.
HANDLE_ADDRESS = "address"
HANDLE_SUBMISSION_ID = "submission_id"
HANDLE_DESCRIPTION = "description"
# The job metadata naming the claim of the key a durable job was launched for (module doc): the run directory's
# lock file's inode and change time (ns), fixed from its creation (nothing writes it).
CLAIM_LABEL = "io.pipes-sdk.claim"
# The prefix of the submission ids the client makes up.
SUBMISSION_ID_PREFIX = "pipes-"

_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _import_job_submission() -> Any:
    try:
        from ray import job_submission
    except ImportError as exc:
        raise PipesUsageError(
            f"PipesRayJobClient needs the Ray Jobs SDK: {install_hint('ray[default]', 'ray', 'pipes-sdk')}; {exc}"
        ) from exc
    return job_submission


def _normalise_address(address: str) -> str:
    """The Jobs API is HTTP(S): ``host:port`` means ``http://host:port`` (Ray would take a bare ``host:port`` for
    the GCS address and wait ~40 s for it); ``ray://`` is the Ray Client, not the Jobs API."""
    address = address.strip().rstrip("/")
    if not address:
        raise PipesUsageError("the Ray address is empty")
    if address.startswith("ray://"):
        raise PipesUsageError(
            f"{address!r} is a Ray Client address; PipesRayJobClient needs the Jobs API (dashboard) address, "
            "e.g. http://127.0.0.1:8265"
        )
    if "://" not in address:
        address = "http://" + address
    return address


def _no_such_job(exc: BaseException) -> bool:
    """Ray answered that no job has the id asked for (a RuntimeError carrying its 404)."""
    return _NO_SUCH_JOB in str(exc)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _first_line(text: str) -> str:
    """The first line of Ray's message, without the log excerpt it appends (the output tail has the log)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(", last available logs", 1)[0]


def _submit(client: Any, **kwargs: Any) -> Any:
    """``submit_job``, retried while the cluster says its job agent is not up yet (see RAY_SUBMIT_RETRY_SECONDS)."""
    deadline = time.monotonic() + RAY_SUBMIT_RETRY_SECONDS
    pause = threading.Event()
    delay = 0.2
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:
            if _NO_AGENT not in str(exc) or time.monotonic() + delay > deadline:
                raise
            client_logger.info("[pipes] the Ray cluster's job agent is not up yet; submitting again in %.1f s", delay)
        pause.wait(delay)  # the cluster asked to try again later: nothing to wait on but time
        delay = min(delay * 2, 5.0)


class _RayLogStream:
    """The job's log as an iterable of byte chunks, for the stdio reader's thread (see the module doc).

    Iterating runs a private event loop in the calling thread that drives ``tail_job_logs``; :meth:`job_ended`
    (from the thread that saw the terminal status) stops the stream at once, then the rest of the log is fetched
    and yielded. :meth:`close` (any thread) abandons it: the loop is closed by the iterating thread, nothing is
    left running.
    """

    def __init__(self, client: Any, submission_id: str) -> None:
        self._client = client
        self._submission_id = submission_id
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._abandoned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future[Any] | None = None
        self.stream_error: BaseException | None = None
        self.chars_streamed = 0
        self.chars_fetched = 0

    def job_ended(self) -> None:
        self._stop_stream()
        self._ended.set()

    def close(self) -> None:
        with self._lock:
            self._abandoned = True
        self._stop_stream()
        self._ended.set()

    def _stop_stream(self) -> None:
        with self._lock:
            if self._task is not None and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._task.cancel)

    def __iter__(self) -> Iterator[bytes]:
        delivered = 0
        for text in self._stream():
            delivered += len(text)
            yield text.encode("utf-8")
        self.chars_streamed = delivered
        self._ended.wait()
        with self._lock:
            if self._abandoned:
                return
        rest = self._fetch_rest(delivered)
        self.chars_fetched = len(rest)
        if rest:
            yield rest.encode("utf-8")

    def _fetch_rest(self, delivered: int) -> str:
        try:
            logs: str = self._client.get_job_logs(self._submission_id)
        except Exception as exc:
            raise PipesTransportError(
                f"fetching the end of the log of the Ray job {self._submission_id} failed: {exc}"
            ) from exc
        return logs[delivered:]

    def _stream(self) -> Iterator[str]:
        loop = asyncio.new_event_loop()
        agen = None
        try:
            agen = self._client.tail_job_logs(self._submission_id)
            while True:
                with self._lock:
                    if self._ended.is_set() or self._abandoned:
                        return
                    task = loop.create_task(agen.__anext__())
                    self._loop, self._task = loop, task
                try:
                    chunk = loop.run_until_complete(task)
                except (StopAsyncIteration, asyncio.CancelledError):
                    return
                finally:
                    with self._lock:
                        self._task = None
                if chunk:
                    yield chunk
        except Exception as exc:  # the stream broke: the fetch at the end recovers what it missed
            self.stream_error = exc
            client_logger.warning("[pipes] the log stream of the Ray job %s broke (%s: %s); the rest of its log "
                                  "is fetched when it ends", self._submission_id, type(exc).__name__, exc)
        finally:
            with self._lock:
                self._loop = self._task = None
            try:
                if agen is not None:
                    loop.run_until_complete(agen.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            except Exception:  # closing a broken connection: nothing more to read from it
                pass
            finally:
                loop.close()


def _entrypoint_name(entrypoint: str) -> str:
    """The script an entrypoint runs, for messages (``python etl.py --x`` -> ``etl.py``); a shell line that does
    not split is named as is."""
    try:
        argv = shlex.split(entrypoint)
    except ValueError:
        return entrypoint
    return command_name(argv) if argv else entrypoint


class PipesRayJob(PipesLaunchedProcess):
    """One submitted Ray job, as the lifecycle drives it (passed to ``on_launched``).

    Attributes:
        submission_id: the job's submission id.
        address: the Jobs API address it was submitted to.
        client: the ``JobSubmissionClient`` used.
    """

    poll_interval_seconds = RAY_STATUS_POLL_SECONDS
    one_log = True  # Ray writes the driver's stdout and stderr, and its own lines, to one log

    def __init__(self, client: Any, address: str, submission_id: str, log: _RayLogStream, log_stream: str,
                 entrypoint: str = "", *, description: str | None = None) -> None:
        self.client = client
        self.address = address
        self.submission_id = submission_id
        self.description = description or _job_description(submission_id, address, entrypoint)
        self._log = log
        if log_stream == "stderr":
            self.stderr = log
        else:
            self.stdout = log
        self._status: str | None = None
        self._unreadable_since: float | None = None
        self._stop_requested = False

    def handle(self) -> dict[str, Any]:
        """The address and the submission id (README "Durable runs"): enough for a default client to attach."""
        return {HANDLE_ADDRESS: self.address, HANDLE_SUBMISSION_ID: self.submission_id,
                HANDLE_DESCRIPTION: self.description}

    def poll(self) -> bool:
        if self._status in _TERMINAL:
            return True
        try:
            status = _status_name(self.client.get_job_status(self.submission_id))
        except Exception as exc:
            now = time.monotonic()
            if self._unreadable_since is None:
                self._unreadable_since = now
            if now - self._unreadable_since > RAY_STATUS_FAILURE_SECONDS:
                raise PipesTransportError(
                    f"the status of {self.description} could not be read for {RAY_STATUS_FAILURE_SECONDS:.0f} s: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            return False
        self._unreadable_since = None
        self._status = status
        if status in _TERMINAL:
            self._log.job_ended()
            return True
        return False

    def exit_status(self) -> PipesExitStatus:
        info = self.client.get_job_info(self.submission_id)
        status = _status_name(info.status)
        code = getattr(info, "driver_exit_code", None)
        message = (getattr(info, "message", None) or "").strip()
        error_type = getattr(info, "error_type", None)
        if status == "SUCCEEDED":
            return PipesExitStatus(0 if code is None else code)
        if status == "STOPPED":
            who = "by this client" if self._stop_requested else "from outside (stop_job)"
            return PipesExitStatus(code, killed=True, description=f"was stopped {who} (Ray job state STOPPED)",
                                   kind=PipesEngineErrorKind.CANCELLED)
        if code is not None and code < 0:
            return PipesExitStatus(code, killed=True, description=f"was killed by {signal_name(-code)}",
                                   kind=PipesEngineErrorKind.KILLED)
        kind = f" ({_status_name(error_type)})" if error_type else ""
        if code is not None:  # the driver ran: its output, in the error's output tail, says the rest
            said = _first_line(message)
        else:  # the driver never ran (e.g. the runtime_env could not be set up): Ray's message is all there is
            said = message if len(message) <= RAY_MESSAGE_CHARS else (
                message[: RAY_MESSAGE_CHARS // 4] + "\n[...]\n" + message[-RAY_MESSAGE_CHARS * 3 // 4 :])
        description = f"ended in Ray job state {status}{kind}" + (f": {said}" if said else "")
        return PipesExitStatus(code, description=description)

    def _stop(self) -> None:
        self._stop_requested = True
        try:
            self.client.stop_job(self.submission_id)
        except Exception as exc:  # already gone, or the cluster is unreachable: the wait that follows says
            client_logger.warning("[pipes] stopping %s failed: %s", self.description, exc)

    def interrupt(self) -> None:
        if self._status not in _TERMINAL:
            self._stop()

    def terminate(self) -> None:
        if self._status not in _TERMINAL:
            self._stop()

    def kill(self) -> None:
        if self._status not in _TERMINAL:
            self._stop()

    def close(self) -> None:
        self._log.close()  # an ended job stays in the cluster's job list, as every Ray job does (module doc)


def _claim(durable: DurableLaunch) -> str | None:
    """The identity of the claim ``durable`` was made for (:data:`CLAIM_LABEL`; None: its lock is not at hand)."""
    if durable.lock_fd < 0:
        return None
    stat = os.fstat(durable.lock_fd)
    return f"{stat.st_ino}.{stat.st_ctime_ns}"


def _job_description(submission_id: str, address: str, entrypoint: str) -> str:
    running = f" running {_entrypoint_name(entrypoint)!r}" if entrypoint.strip() else ""
    return f"the Ray job {submission_id} at {address}{running}"


def _gone_job(handle: Mapping[str, Any], address: str) -> PipesLaunchedProcess:
    """A durable job that the cluster no longer has (deleted, or the head restarted without persistence): ended,
    with the outcome its run recorded in the handle when it saw the end, else killed with an unknown outcome."""
    submission_id = str(handle[HANDLE_SUBMISSION_ID])
    description = str(handle.get(HANDLE_DESCRIPTION) or _job_description(submission_id, address, ""))
    status = recorded_end(handle) or PipesExitStatus(
        None, killed=True, kind=PipesEngineErrorKind.QUERY_FAILED,
        description=f"is gone from the Ray cluster at {address} (deleted, or the cluster restarted) before its end "
                    "was seen: how it ended is unknown")
    return ConcludedProcess(status, description)


class RayRunOptions(RunOptions, total=False):
    """The options of :meth:`PipesRayJobClient.run` (and its asyncio twin's): its own, then the
    :class:`~pipes_core.RunOptions` (``stderr`` excepted: the job has one log, which goes to ``stdout``).

    Keys:
        command: the entrypoint (required): a shell string, or a list (shell-quoted).
        runtime_env: merged over the client's ``runtime_env``.
        submission_id: the job's id (default ``pipes-<12 hex digits>``).
        entrypoint_num_cpus / entrypoint_num_gpus / entrypoint_memory / entrypoint_resources: reserved for the
            entrypoint, as in ``JobSubmissionClient.submit_job``.
        job_metadata: Ray's own job metadata (strings); the owner labels go over it (module doc).
        submit_options: any other ``submit_job`` keyword argument, passed as is.
    """

    command: str | Sequence[str]
    runtime_env: Mapping[str, Any] | None
    submission_id: str | None
    entrypoint_num_cpus: float | None
    entrypoint_num_gpus: float | None
    entrypoint_memory: int | None
    entrypoint_resources: Mapping[str, float] | None
    job_metadata: Mapping[str, str] | None
    submit_options: Mapping[str, Any] | None


class PipesRayJobClient(PipesClient):
    """Runs a command as a Ray job through the Ray Jobs API (see the module doc).

    Args:
        address: the Jobs API (dashboard) address, e.g. ``http://127.0.0.1:8265`` (``host:port`` means
            ``http://host:port``); None lets Ray find it (``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``).
        client: a ``ray.job_submission.JobSubmissionClient`` to use instead (``address`` is then ignored).
        runtime_env: the default ``runtime_env`` of every job (a run's own is merged over it, key by key).
        context_injector: default: the context inline in an env var (``PipesEnvContextInjector``).
        message_reader: default: messages on the job's log (:class:`PipesStdioMessageReader`).
        bootstrap: ``"env"`` (``runtime_env["env_vars"]``) or ``"cli"`` (appended to the entrypoint).
        forward_termination / forward_stdio / termination_timeout_seconds / strict: as for every
            :class:`pipes_core.PipesClient`.

    Nothing talks to the cluster before the first run.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        client: Any = None,
        runtime_env: Mapping[str, Any] | None = None,
        context_injector: PipesContextInjector | None = None,
        message_reader: PipesMessageReader | None = None,
        forward_termination: bool = True,
        forward_stdio: bool = True,
        termination_timeout_seconds: float = 20,
        strict: bool = True,
        bootstrap: str = BOOTSTRAP_ENV,
    ) -> None:
        super().__init__(
            context_injector=context_injector, message_reader=message_reader,
            forward_termination=forward_termination, forward_stdio=forward_stdio,
            termination_timeout_seconds=termination_timeout_seconds, strict=strict, bootstrap=bootstrap,
        )
        if runtime_env is not None and not isinstance(runtime_env, Mapping):
            raise PipesUsageError(f"runtime_env must be a mapping, got {type(runtime_env).__name__}")
        self.address = None if address is None else _normalise_address(address)
        self.runtime_env = dict(runtime_env or {})
        self._client = client
        self._client_given = client is not None
        self._client_lock = threading.Lock()
        self._handle_clients: dict[str, Any] = {}  # attach: a client per handle's address (no address of our own)

    def default_message_reader(self) -> PipesMessageReader:
        """Messages on the job's log stream; the drain waits for the fetch of the log's end (see module doc)."""
        return PipesStdioMessageReader(drain_timeout_seconds=RAY_LOG_DRAIN_SECONDS)

    def get_job_client(self) -> Any:
        """The ``JobSubmissionClient`` (made on first use; raises :class:`PipesExecutionError` naming the address
        when the cluster cannot be reached)."""
        with self._client_lock:
            if self._client is None:
                self._client = _make_job_client(self.address)
            return self._client

    def _client_address(self, client: Any) -> str:
        return str(getattr(client, "_address", None) or self.address or "the Ray cluster")

    # ------------------------------------------------------------------ durable runs (module doc)

    def _handle_client(self, address: str | None) -> Any:
        """The job client for a handle: this client's own, unless it has no address of its own (a default client,
        as ``pipes runs stop`` makes) and the handle has one."""
        if self._client_given or self.address is not None or not address:
            return self.get_job_client()
        address = _normalise_address(address)
        with self._client_lock:
            if address not in self._handle_clients:
                self._handle_clients[address] = _make_job_client(address)
            return self._handle_clients[address]

    def attach(self, handle: dict[str, Any], request: PipesLaunchRequest | None = None) -> PipesLaunchedProcess:
        """The Ray job of a durable run, rebuilt from its handle (address and submission id; module doc); the
        re-attaching run's ``request`` is not needed (the job's status and log say all)."""
        submission_id = str(handle[HANDLE_SUBMISSION_ID])
        client = self._handle_client(handle.get(HANDLE_ADDRESS))
        address = self._client_address(client)
        try:
            client.get_job_info(submission_id)
        except Exception as exc:
            if _no_such_job(exc):
                return _gone_job(handle, address)
            # unreachable now: the job's status polls say so (and give up after RAY_STATUS_FAILURE_SECONDS)
            client_logger.warning("[pipes] the Ray job %s at %s cannot be looked at now: %s", submission_id, address,
                                  exc)
        return PipesRayJob(client, address, submission_id, _RayLogStream(client, submission_id), "stdout",
                           description=str(handle.get(HANDLE_DESCRIPTION) or "") or None)

    def find_launch(self, durable: DurableLaunch) -> dict[str, Any] | None:
        """The handle of the job named ``durable.name`` (running or ended) when the cluster has it, else None. A
        job of that name launched for an earlier claim of the key (module doc) is deleted when it has ended (then
        None), and refused while it runs."""
        client = self.get_job_client()
        address = self._client_address(client)
        try:
            info = client.get_job_info(durable.name)
        except Exception as exc:
            if _no_such_job(exc):
                return None
            raise PipesExecutionError(
                f"cannot look for the Ray job {durable.name} (launch key {durable.launch_key!r}) at {address}: "
                f"{type(exc).__name__}: {exc}; retry once the cluster answers", kind=PipesEngineErrorKind.UNREACHABLE,
            ) from exc
        claim, found_claim = _claim(durable), (getattr(info, "metadata", None) or {}).get(CLAIM_LABEL)
        if claim is not None and found_claim is not None and found_claim != claim:
            self._free_stale_name(client, address, durable, info)
            return None
        entrypoint = str(getattr(info, "entrypoint", "") or "")
        return {HANDLE_ADDRESS: address, HANDLE_SUBMISSION_ID: durable.name,
                HANDLE_DESCRIPTION: _job_description(durable.name, address, entrypoint)}

    @staticmethod
    def _free_stale_name(client: Any, address: str, durable: DurableLaunch, info: Any) -> None:
        """A job of the key's name left by an earlier run with the key: deleted when it has ended and the head has
        finished with it (:data:`RAY_STALE_JOB_SETTLE_SECONDS`)."""
        name = durable.name
        status = _status_name(info.status)
        if status not in _TERMINAL:
            raise PipesUsageError(
                f"the Ray job {name} at {address} was launched by an earlier run with launch_key "
                f"{durable.launch_key!r} (one forgotten, or of another store) and still runs ({status}): stop it "
                f"(`ray job stop {name}`) and run again")
        ended = getattr(info, "end_time", None)  # ms, by the head's clock (a skewed clock shortens this wait)
        settle = 0.0 if ended is None else ended / 1000 + RAY_STALE_JOB_SETTLE_SECONDS - time.time()
        if settle > 0:
            threading.Event().wait(min(settle, RAY_STALE_JOB_SETTLE_SECONDS))  # the head's own work: no event
        try:
            client.delete_job(name)
        except Exception as exc:
            if not _no_such_job(exc):
                raise PipesExecutionError(
                    f"the ended Ray job {name} at {address}, left by an earlier run with launch_key "
                    f"{durable.launch_key!r}, could not be deleted to free its name: {type(exc).__name__}: {exc}; "
                    f"delete it (`ray job delete {name}`) and run again", kind=PipesEngineErrorKind.REFUSED,
                ) from exc
        client_logger.info("[pipes] deleted the ended Ray job %s at %s, left by an earlier run with launch_key %r, "
                           "to launch under its name again", name, address, durable.launch_key)

    def sweep_orphans(self) -> list[str]:
        """Stop (``stop_job``) the jobs not ended yet whose owner labels name an orchestrator of this host that is
        gone and that had no launch key (:func:`pipes_core.launch.process.orphan_owner`); a line each."""
        client = self.get_job_client()
        address = self._client_address(client)
        said: list[str] = []
        for job in client.list_jobs():
            submission_id = getattr(job, "submission_id", None)
            if submission_id is None or _status_name(job.status) in _TERMINAL:
                continue  # a driver's own job (ray.init) is not ours: it has no submission id
            owner = orphan_owner(getattr(job, "metadata", None) or {})
            if owner is None:
                continue
            try:
                client.stop_job(submission_id)
            except Exception as exc:  # ended meanwhile, or the cluster failed: the next sweep sees it again
                client_logger.warning("[pipes] stopping the orphaned Ray job %s at %s failed: %s", submission_id,
                                      address, exc)
                continue
            said.append(f"stopped the Ray job {submission_id} at {address} launched by process {owner.pid} on host "
                        f"{owner.host}, which is gone")
        return said

    @run_signature(RayRunOptions, required=("command",))
    def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
            **options: Unpack[RayRunOptions]) -> PipesClientCompletedInvocation:
        """Submit ``command`` as a Ray job in a Pipes session and wait for it.

        Args:
            command: the entrypoint: a shell string, or a list (shell-quoted).
            runtime_env: merged over the client's ``runtime_env``; its ``env_vars`` are merged too, and the
                bootstrap env vars go over both.
            submission_id: the job's id (default ``pipes-<12 hex digits>``).
            entrypoint_num_cpus / entrypoint_num_gpus / entrypoint_memory / entrypoint_resources: reserved for
                the entrypoint, as in ``JobSubmissionClient.submit_job``.
            job_metadata: Ray's own job metadata (strings).
            submit_options: any other ``submit_job`` keyword argument, passed as is.
            stdout: where the job's log (its output and Ray's lines) goes instead of this process's stdout;
                ``stderr=`` is refused (the job has one log).
            timeout_seconds / strict / on_event / retain_messages / metadata / on_launched: as for every
                :class:`pipes_core.PipesClient`; ``on_launched`` gets the :class:`PipesRayJob`.
            logger: receives this run's ``log`` messages and protocol issues instead of ``pipes_core.external``
                (a :class:`logging.Logger` or :class:`logging.LoggerAdapter`, e.g. an orchestrator's per-task
                logger), each record carrying ``pipes_run_id`` and ``pipes_command`` (the entrypoint) as
                ``extra`` fields.
            external_stream_handler: receives the text the process sends with ``log_external_stream`` as
                ``(stream, text)``.
            fail_on_check_error / raise_on_event_error / on_message: as for every client (see
                :meth:`pipes_core.PipesClient.run_launcher`).

        Raises:
            PipesExecutionError: the cluster cannot be reached (naming the address), the job was rejected (a bad
                runtime_env: Ray's reason), failed (driver exit code and Ray's message), was stopped from outside,
                never opened the channel or broke the protocol. :class:`PipesTimeoutError` and
                :class:`PipesInterruptedError` after ``stop_job``. ``.invocation`` holds what was received.
            PipesUsageError: a bad argument, or ray is not installed (naming the extra).
        """
        launch, command, common = self.launcher(options, where="PipesRayJobClient.run")
        return self.run_launcher(launch, context=context, extras=extras, command=command, **common)

    def launcher(self, options: RayRunOptions, *, where: str
                 ) -> tuple[Callable[[PipesLaunchRequest], PipesLaunchedProcess], str, RunOptions]:
        """Check the run's own options; the launch function (shared by the asyncio twin), the command (for
        ``pipes_command``) and the shared options (``stderr`` is ``stdout``: the job has one log)."""
        check_run_options(options, RayRunOptions, where, required=("command",))
        if options.get("stderr") is not None:
            raise PipesUsageError("a Ray job has one log (its output and Ray's lines): pass stdout= for where it "
                                  "goes, not stderr=")
        command = options["command"]
        submission_id = options.get("submission_id")
        job_metadata = options.get("job_metadata")
        entrypoint_resources = options.get("entrypoint_resources")
        entrypoint = command if isinstance(command, str) else shlex.join(command)
        if not entrypoint.strip():
            raise PipesUsageError("command is empty")
        env = self._runtime_env(options.get("runtime_env"))
        if submission_id is not None and not (isinstance(submission_id, str) and submission_id.strip()):
            raise PipesUsageError(f"submission_id must be a non-empty string, got {submission_id!r}")
        if submission_id is not None and options.get("launch_key") is not None:
            raise PipesUsageError("submission_id cannot be given with launch_key: the job of a durable run is named "
                                  "by its key (pipes-<32 hex>); leave submission_id out")
        submit: dict[str, Any] = dict(options.get("submit_options") or {})
        resources = None if entrypoint_resources is None else dict(entrypoint_resources)
        for key, value in (("entrypoint_num_cpus", options.get("entrypoint_num_cpus")),
                           ("entrypoint_num_gpus", options.get("entrypoint_num_gpus")),
                           ("entrypoint_memory", options.get("entrypoint_memory")), ("entrypoint_resources", resources),
                           ("metadata", None if job_metadata is None else dict(job_metadata))):
            if value is not None:
                submit[key] = value
        clashing = {"entrypoint", "runtime_env", "submission_id", "job_id"} & set(submit)
        if clashing:
            raise PipesUsageError(f"submit_options cannot set {', '.join(sorted(clashing))}: use the run's arguments")
        metadata = submit.pop("metadata", None) or {}
        if not isinstance(metadata, Mapping):
            raise PipesUsageError(f"job_metadata must be a mapping of strings, got {type(metadata).__name__}")
        client = self.get_job_client()
        address = self._client_address(client)
        made_up_id = submission_id or f"{SUBMISSION_ID_PREFIX}{uuid.uuid4().hex[:12]}"

        def launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
            durable = request.durable
            job_id = made_up_id if durable is None else durable.name
            job_env = dict(env)
            env_vars = {**dict(job_env.get("env_vars") or {}), **request.bootstrap_env}
            if env_vars:
                job_env["env_vars"] = env_vars
            full_entrypoint = entrypoint
            if request.bootstrap_args:
                full_entrypoint += " " + shlex.join(request.bootstrap_args)
            try:
                submitted = _submit(client, entrypoint=full_entrypoint, runtime_env=job_env or None,
                                    submission_id=job_id, metadata=self._labels(metadata, request), **submit)
            except Exception as exc:
                if durable is not None and _ALREADY_EXISTS in str(exc):  # launched under the key meanwhile
                    client_logger.info("[pipes] the Ray job %s at %s was submitted under the same launch key by "
                                       "another orchestrator: attaching to it", job_id, address)
                    return PipesRayJob(client, address, job_id, _RayLogStream(client, job_id), "stdout", entrypoint)
                raise PipesExecutionError(
                    f"the Ray cluster at {address} rejected the job {job_id}: {type(exc).__name__}: {exc}",
                    exit_code=None, kind=PipesEngineErrorKind.REFUSED,
                ) from exc
            client_logger.info("[pipes] submitted the Ray job %s to %s", submitted, address)
            reader = request.session.message_reader
            log_stream = reader.stream if isinstance(reader, PipesStdioMessageReader) else "stdout"
            return PipesRayJob(client, address, str(submitted), _RayLogStream(client, str(submitted)), log_stream,
                               entrypoint)

        common = common_options(options)
        common["stderr"] = common.get("stdout")
        return launch, entrypoint, common

    @staticmethod
    def _labels(metadata: Mapping[str, Any], request: PipesLaunchRequest) -> dict[str, Any]:
        """The job's metadata: the user's, then the owner labels (and a durable job's claim: module doc)."""
        labels = {**metadata, **launch_labels(request.owner, request.durable)}
        claim = None if request.durable is None else _claim(request.durable)
        if claim is not None:
            labels[CLAIM_LABEL] = claim
        return labels

    def _runtime_env(self, runtime_env: Mapping[str, Any] | None) -> dict[str, Any]:
        if runtime_env is not None and not isinstance(runtime_env, Mapping):
            raise PipesUsageError(f"runtime_env must be a mapping, got {type(runtime_env).__name__}")
        merged = {**self.runtime_env, **dict(runtime_env or {})}
        env_vars: dict[str, Any] = {}
        for source in (self.runtime_env, runtime_env or {}):
            given = source.get("env_vars")
            if given is None:
                continue
            if not isinstance(given, Mapping):
                raise PipesUsageError(f"runtime_env['env_vars'] must be a mapping, got {type(given).__name__}")
            env_vars.update(given)
        bad = sorted(k for k, v in env_vars.items() if not isinstance(k, str) or not isinstance(v, str))
        if bad:
            raise PipesUsageError(f"runtime_env['env_vars'] must map strings to strings; not so for: {bad}")
        if env_vars:
            merged["env_vars"] = env_vars
        return merged


def _make_job_client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (None: Ray finds it), or :class:`PipesExecutionError` naming it."""
    job_submission = _import_job_submission()
    where = address or "the address Ray finds (RAY_API_SERVER_ADDRESS / RAY_ADDRESS)"
    try:
        return job_submission.JobSubmissionClient(address)
    except Exception as exc:
        raise PipesExecutionError(
            f"cannot reach the Ray cluster's Jobs API at {where}: {type(exc).__name__}: {exc}",
            kind=PipesEngineErrorKind.UNREACHABLE,
        ) from exc


class PipesAsyncRayJobClient(PipesAsyncClient[PipesRayJobClient]):
    """The asyncio twin of :class:`PipesRayJobClient`: the same arguments, the same options of :meth:`run`
    (:class:`RayRunOptions`), the same errors and invocation; ``await client.run(command=...)``. The Jobs API
    client blocks, so submitting, polling and stopping the job run on the client's own bounded executor; the job's
    log is read by a thread. Cancelling the task stops the job (as Ctrl-C does for the sync client), drains the
    channel, and re-raises with ``.invocation``."""

    @same_arguments_as(PipesRayJobClient.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(PipesRayJobClient(*args, **kwargs))

    @run_signature(RayRunOptions, required=("command",))
    async def run(self, *, context: PipesRunContext | None = None, extras: Mapping[str, Any] | None = None,
                  **options: Unpack[RayRunOptions]) -> PipesClientCompletedInvocation:
        """Submit ``command`` as a Ray job on the running loop; see :meth:`PipesRayJobClient.run`."""
        # on the executor: the first run makes the Jobs API client, which talks to the cluster
        try:
            launch, command, common = await self._blocking(
                lambda: self.config.launcher(options, where="PipesAsyncRayJobClient.run"))
        except BaseException:
            if not self._runs:
                self.close()  # no run started: no thread kept
            raise
        return await self.run_launcher(launch, context=context, extras=extras, command=command, **common)
