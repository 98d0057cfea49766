"""Durable runs (README "Durable runs"): a run with a ``launch_key`` survives its orchestrator.

One :class:`DurableRun` per run with a key, made by :meth:`pipes_core.PipesClient.begin_run` and used by both
drivers (sync and asyncio) at three points: the channels (:meth:`DurableRun.channels`), the launch
(:meth:`DurableRun.launcher`) and the conclusion (:meth:`DurableRun.conclude`). What to do first is decided by
:func:`pipes_core.launch.lifecycle.durable_step` from what the store holds for the key:

* launch: claim the key (one transaction: of racing processes one creates the run), sweep the engine's orphans
  (:meth:`pipes_core.PipesClient.sweep_orphans`), then launch with the key's run directory (``runs/<digest of the
  key>`` beside the store's file) holding its ``lock`` file locked; then record the handle. A launch whose handle
  was never recorded (its orchestrator died in between) is found before launching again, never made twice: a
  local supervisor inherits the lock and leaves a ``pid`` file; a remote launch is named by the key
  (:attr:`DurableLaunch.name`: a container's name, a Ray submission id, a Slurm job name) and found by that name
  (:meth:`pipes_core.PipesClient.find_launch`);
* attach / drain: rebuild the launched process from the handle (:meth:`pipes_core.PipesClient.attach`), replay the
  recorded messages through the fresh handler (without ``on_event``), read on from the recorded offset;
* replay: a concluded run: the recorded messages and exit status, judged again; nothing launched or read.

Delivery: each message line is recorded with its position (its index in the channel) and the reader's offset
after it, in one transaction per read block, after the handler (and so ``on_event``) saw it: ``on_event`` sees
every message at least once across restarts; the invocation holds each exactly once, in order.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from pipes_core.channels.injectors import PipesContextInjector, PipesEnvContextInjector
from pipes_core.channels.readers import (
    PipesFileMessageReader,
    _FileFollower,
    _FileFollowThread,
)
from pipes_core.launch.lifecycle import (
    DURABLE_ATTACH,
    DURABLE_DRAIN,
    DURABLE_FIND,
    DURABLE_LAUNCH,
    DURABLE_REPLAY,
    DURABLE_WAIT,
    PipesExitStatus,
    durable_step,
)
from pipes_core.launch.process import DurableLaunch, PipesLaunchedProcess, PipesLaunchRequest
from pipes_core.launch.run_store import PipesRunRecord, PipesRunStore
from pipes_core.launch.supervisor import LOCK_FILE, MESSAGES_FILE
from pipes_core.protocol.errors import PipesEngineErrorKind
from pipes_core.protocol.handler import LINE_JSON_WHITESPACE, PipesMessageHandler
from pipes_ext._errors import PipesUsageError

if TYPE_CHECKING:
    from pipes_core.launch.options import RunOptions

__all__ = ["DurableRun", "DurableLaunch", "DurableClient", "run_directory", "runs_directory", "open_store", "lock",
           "status_to_json", "status_from_json", "handle_with_end", "recorded_end", "RUNS_DIR_NAME",
           "HANDLE_WAIT_SECONDS"]

logger = logging.getLogger("pipes_core")

# The run directories live here, beside the store's file.
RUNS_DIR_NAME: Final = "runs"
# How long a run waits for another live orchestrator to record the handle of the launch it is making, and for a
# supervisor just forked to write its pid file: a launch takes milliseconds (a local fork) to seconds (an engine).
HANDLE_WAIT_SECONDS: Final = 30.0
# How often such a wait looks again: the other side is another process, with no event to wait on.
HANDLE_POLL_SECONDS: Final = 0.02
# The outcome's fields (a JSON object in the store).
OUTCOME_EXIT_CODE: Final = "exit_code"
OUTCOME_KILLED: Final = "killed"
OUTCOME_DESCRIPTION: Final = "description"
OUTCOME_KIND: Final = "kind"
OUTCOME_ERROR: Final = "error"
OUTCOME_MESSAGE: Final = "message"
# The handle's field holding how the job ended (added when the end is seen).
HANDLE_EXIT: Final = "exit"
# The position's field: the byte offset of the messages file after the last recorded message.
POSITION_OFFSET: Final = "offset"


def open_store(store: PipesRunStore | str | os.PathLike[str] | None) -> PipesRunStore:
    """The run's store: the one given, a file's path, or (None) the state directory's."""
    if isinstance(store, PipesRunStore):
        return store
    if store is None:
        return PipesRunStore.in_state_dir()
    return PipesRunStore(store)


def runs_directory(store: PipesRunStore) -> Path:
    """Where the store's run directories are: beside its file."""
    return Path(store.path).resolve().parent / RUNS_DIR_NAME


def run_directory(store: PipesRunStore, launch_key: str) -> Path:
    """Where a run's files are: beside the store, named by a digest of the key (any string is a valid key)."""
    digest = hashlib.sha256(launch_key.encode("utf-8")).hexdigest()[:32]
    return runs_directory(store) / digest


class DurableClient(Protocol):
    """What a durable run asks of its launcher's client (:class:`pipes_core.PipesClient` has all of it)."""

    def attach(self, handle: dict[str, Any], request: PipesLaunchRequest | None = None) -> PipesLaunchedProcess: ...

    def find_launch(self, durable: DurableLaunch) -> dict[str, Any] | None: ...

    def sweep_orphans(self) -> list[str]: ...


def status_to_json(status: PipesExitStatus) -> dict[str, Any]:
    return {OUTCOME_EXIT_CODE: status.exit_code, OUTCOME_KILLED: status.killed,
            OUTCOME_DESCRIPTION: status.description, OUTCOME_KIND: None if status.kind is None else status.kind.value}


def handle_with_end(handle: Mapping[str, Any], status: PipesExitStatus) -> dict[str, Any]:
    """A run's handle with how its work ended (:data:`HANDLE_EXIT`): recorded when a run sees the end, so that
    a later run needs nothing from the engine to judge it (the engine may have forgotten the work by then)."""
    return {**handle, HANDLE_EXIT: status_to_json(status)}


def recorded_end(handle: Mapping[str, Any]) -> PipesExitStatus | None:
    """How the work of ``handle`` ended, when a run saw it end and recorded it (:func:`handle_with_end`)."""
    data = handle.get(HANDLE_EXIT)
    return status_from_json(dict(data)) if isinstance(data, Mapping) else None


def status_from_json(data: dict[str, Any]) -> PipesExitStatus:
    kind = data.get(OUTCOME_KIND)
    return PipesExitStatus(data.get(OUTCOME_EXIT_CODE), killed=bool(data.get(OUTCOME_KILLED)),
                           description=str(data.get(OUTCOME_DESCRIPTION) or ""),
                           kind=None if kind is None else PipesEngineErrorKind(kind))


def lock(path: Path, *, wait: bool) -> int | None:
    """The lock file's descriptor, locked (None: another process holds it and ``wait`` is False)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class DurableRun:
    """The durable side of one run with a launch key (module doc)."""

    def __init__(self, client: DurableClient, options: RunOptions) -> None:
        key = options.get("launch_key")
        assert key is not None
        if not isinstance(key, str) or not key:
            raise PipesUsageError(f"launch_key must be a non-empty string, got {key!r}")
        self.client = client
        self.launch_key = key
        given = options.get("store")
        self.store = open_store(given)
        self._own_store = not isinstance(given, PipesRunStore)  # opened here from a path: closed here
        self.directory = run_directory(self.store, key)
        self.launcher_name = type(client).__name__
        try:
            self.step, self.record = self._decide()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """After the run: close the store when this run opened it (from a path, or the state directory's)."""
        if self._own_store:
            self.store.close()

    # ------------------------------------------------------------------ the first step

    def _decide(self) -> tuple[str, PipesRunRecord]:
        record, created = self.store.claim(self.launch_key, self.launcher_name)
        deadline = time.monotonic() + HANDLE_WAIT_SECONDS
        pause = threading.Event()
        while True:
            step = durable_step(record.state, created=created, owner_alive=record.owner.is_alive())
            if step != DURABLE_WAIT:
                return step, record
            if time.monotonic() > deadline:
                owner = record.owner
                raise PipesUsageError(
                    f"the run with launch_key {self.launch_key!r} is being launched by process {owner.pid} on "
                    f"{owner.host}, which has not recorded its launch after {HANDLE_WAIT_SECONDS:.0f} s; retry "
                    "later, or stop that process")
            pause.wait(HANDLE_POLL_SECONDS)
            fresh = self.store.get(self.launch_key)
            if fresh is None:  # forgotten meanwhile: claim it anew
                record, created = self.store.claim(self.launch_key, self.launcher_name)
            else:
                record, created = fresh, False

    # ------------------------------------------------------------------ the channels

    def channels(self) -> tuple[PipesContextInjector, PipesFileMessageReader]:
        """The context inline in the environment (nothing to clean up after a crash) and the messages file in
        the run directory, read from the recorded position."""
        return PipesEnvContextInjector(), DurableMessageReader(self)

    # ------------------------------------------------------------------ the launch

    def launcher(self, launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess]
                 ) -> Callable[[PipesLaunchRequest], PipesLaunchedProcess]:
        """``launch`` made durable: launched once per key, else re-attached or replayed."""

        def durable_launch(request: PipesLaunchRequest) -> PipesLaunchedProcess:
            if self.step in (DURABLE_LAUNCH, DURABLE_FIND):
                self.sweep_orphans()
            return _Watched(self, self._launch_or_attach(launch, request))

        return durable_launch

    def sweep_orphans(self) -> None:
        """Before launching: stop what an orchestrator of this host that is gone launched without a key on the
        same engine (README "Durable runs", "Nothing orphaned"); each said on the ``pipes_core`` logger."""
        try:
            said = self.client.sweep_orphans()
        except Exception as exc:  # the run goes on: the sweep is a courtesy, the launch is what was asked
            logger.warning("[pipes] looking for orphaned launches of %s failed: %s", self.launcher_name, exc)
            return
        for line in said:
            logger.warning("[pipes] %s", line)

    def _launch_or_attach(self, launch: Callable[[PipesLaunchRequest], PipesLaunchedProcess],
                          request: PipesLaunchRequest) -> PipesLaunchedProcess:
        step = self.step
        if step == DURABLE_REPLAY:
            assert self.record.outcome is not None
            described = (self.record.handle or {}).get("description") or f"the concluded run {self.launch_key!r}"
            return ConcludedProcess(status_from_json(self.record.outcome), str(described))
        if step in (DURABLE_ATTACH, DURABLE_DRAIN):
            self.record = self.store.take_over(self.launch_key)  # with the latest handle (how it ended, if seen)
            assert self.record.handle is not None
            return self.client.attach(self.record.handle, request)
        if step == DURABLE_FIND:
            self.store.take_over(self.launch_key)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = lock(self.directory / LOCK_FILE, wait=False)
        if lock_fd is None:  # the launch happened: what it launched holds the lock (a local supervisor)
            return self._attach_found(request)
        durable = DurableLaunch(self.launch_key, self.directory, lock_fd)
        try:
            found = self.client.find_launch(durable)  # made before, its handle never recorded
        except BaseException:
            os.close(lock_fd)
            raise
        if found is not None:
            os.close(lock_fd)
            self.record = self.store.record_handle(self.launch_key, found)
            return self.client.attach(found, request)
        try:
            process = launch(replace(request, durable=durable))
        except BaseException:
            self.store.forget(self.launch_key)  # nothing runs under the key: a retry launches
            raise
        finally:
            os.close(lock_fd)  # the launched supervisor holds its own copy
        handle = process.handle()
        self.record = self.store.record_handle(self.launch_key, handle)
        return process

    def _attach_found(self, request: PipesLaunchRequest) -> PipesLaunchedProcess:
        """A launch made under the key whose handle was never recorded, still holding the run's lock: its handle
        as the launcher finds it (a supervisor just forked may not have said who it is yet: waited for)."""
        deadline = time.monotonic() + HANDLE_WAIT_SECONDS
        pause = threading.Event()
        durable = DurableLaunch(self.launch_key, self.directory, -1)
        while (handle := self.client.find_launch(durable)) is None:
            if time.monotonic() > deadline:
                raise PipesUsageError(
                    f"the run with launch_key {self.launch_key!r} was launched (its lock in {self.directory} is "
                    f"held) but cannot be found; stop what runs there, then `pipes runs forget {self.launch_key}`")
            pause.wait(HANDLE_POLL_SECONDS)
        self.record = self.store.record_handle(self.launch_key, handle)
        return self.client.attach(handle, request)

    # ------------------------------------------------------------------ the end

    def ended(self, process: PipesLaunchedProcess) -> None:
        """The job has ended: how, recorded with its handle (the verdict needs nothing from the engine then)."""
        if self.step == DURABLE_REPLAY:
            return
        handle = handle_with_end(self.record.handle or {}, process.exit_status())
        self.record = self.store.record_ended(self.launch_key, handle)

    def conclude(self, status: PipesExitStatus | None, error: BaseException | None) -> None:
        """Record the outcome (the run is judged: a later run with the key returns it), then remove the run's
        files. Not for a run left running (no status, not killed): a later run re-attaches to it."""
        if status is None or (status.exit_code is None and not status.killed):
            return
        if self.step != DURABLE_REPLAY:
            outcome = status_to_json(status)
            outcome[OUTCOME_ERROR] = None if error is None else type(error).__name__
            outcome[OUTCOME_MESSAGE] = "" if error is None else str(error).split("\n", 1)[0]
            self.store.conclude(self.launch_key, outcome)
        shutil.rmtree(self.directory, ignore_errors=True)


class _Watched(PipesLaunchedProcess):
    """A launched process whose end is recorded in the store when first seen. What it does not define is the
    launched process's own: ``on_launched`` (which gets this) reads the launcher's attributes as without a key (a
    Slurm job's ``job_id``, a Ray job's ``submission_id``, a container's ``name``, a local child's ``pid``)."""

    def __init__(self, durable: DurableRun, process: PipesLaunchedProcess) -> None:
        self._durable = durable
        self._process = process
        self._recorded = False
        self.description = process.description
        self.stdout = process.stdout
        self.stderr = process.stderr
        self.poll_interval_seconds = process.poll_interval_seconds
        self.max_poll_interval_seconds = process.max_poll_interval_seconds
        self.one_log = process.one_log  # type: ignore[misc]  # the process's own

    def __getattr__(self, name: str) -> Any:
        """The launched process's own attributes (a job id for ``on_launched``; ``open_async_streams``, with which
        the asyncio driver follows the output from the loop), as without a key."""
        process = self.__dict__.get("_process")  # (not yet set while the object is being made or copied)
        if process is None:
            raise AttributeError(name)
        return getattr(process, name)

    def handle(self) -> dict[str, Any]:
        return self._process.handle()

    def exit_status(self) -> PipesExitStatus:
        return self._process.exit_status()

    def interrupt(self) -> None:
        self._process.interrupt()

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def close(self) -> None:
        self._process.close()

    def _seen(self, ended: bool) -> bool:
        if ended and not self._recorded:
            self._recorded = True
            self._durable.ended(self._process)
        return ended

    def poll(self) -> bool:
        return self._seen(self._process.poll())

    def wait(self, timeout: float | None) -> bool:
        return self._seen(self._process.wait(timeout))


class ConcludedProcess(PipesLaunchedProcess):
    """A concluded run as a launched process: ended, with its recorded status; no output, nothing to signal."""

    def __init__(self, status: PipesExitStatus, description: str) -> None:
        self.status = status
        self.description = description

    def poll(self) -> bool:
        return True

    def wait(self, timeout: float | None) -> bool:
        return True

    def exit_status(self) -> PipesExitStatus:
        return self.status

    def interrupt(self) -> None:
        pass

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- the channel


class _Recorder:
    """Stands for the handler before the file's line splitter: each line goes to the handler, and is kept to be
    recorded once the read block is handled."""

    def __init__(self, handler: PipesMessageHandler) -> None:
        self.handler = handler
        self.lines: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handler, name)

    def handle_lines(self, data: bytes, source: str = "") -> None:
        """As :meth:`PipesMessageHandler.handle_lines`, decoding the block once for both."""
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError:  # the handler goes line by line, so that only the bad line is an issue
            self.handler.handle_lines(data, source)
            self.lines.extend(line for line in data.decode("utf-8", "replace").split("\n")
                              if line.strip(LINE_JSON_WHITESPACE))
            return
        kept = [line for line in lines if line.strip(LINE_JSON_WHITESPACE)]
        handle_line = self.handler.handle_line
        for line in kept:
            handle_line(line, source)
        self.lines.extend(kept)

    def handle_line(self, line: str | bytes, source: str = "") -> None:
        self.handler.handle_line(line, source)  # (counted by the handler: recorded too, blank or not)
        self.lines.append(line.decode("utf-8", "replace") if isinstance(line, bytes) else line)


class _RecordingFollower(_FileFollower):
    """A file follower that records each block's messages, with the offset after them, in the store."""

    def __init__(self, path: str, handler: PipesMessageHandler, fd: int, max_line_bytes: int, *,
                 durable: DurableRun, offset: int, position: int) -> None:
        self.recorder = _Recorder(handler)
        super().__init__(path, self.recorder, fd, max_line_bytes)  # type: ignore[arg-type]  # a handler's stand-in
        self.durable = durable
        self.offset = offset
        self.position = position

    def end(self) -> None:
        super().end()
        self.block_handled()

    def block_handled(self) -> None:
        lines = self.recorder.lines
        if not lines:
            return
        self.recorder.lines = []
        offset = self.offset + self.splitter.bytes_read - self.splitter.pending_bytes
        self.durable.store.record_messages(self.durable.launch_key, self.position, lines, {POSITION_OFFSET: offset})
        self.position += len(lines)


class DurableMessageReader(PipesFileMessageReader):
    """The messages file of a durable run (in its run directory): the recorded messages are replayed through the
    handler first (``on_event`` is not called for them: it saw them before), then the file is read on from the
    recorded offset, each block's messages recorded. A concluded run's file is not read (it is gone)."""

    def __init__(self, durable: DurableRun) -> None:
        super().__init__(durable.directory / MESSAGES_FILE, cleanup_file=False)
        self.durable = durable

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        durable = self.durable
        # The messages and the offset after them read together (the record taken when the run began may be older
        # than the messages: another orchestrator watching the run records on meanwhile).
        record, recorded = durable.store.snapshot(durable.launch_key)
        if record is not None:
            durable.record = record
        if recorded:
            on_event, handler._on_event = handler._on_event, None
            try:
                for _, line in recorded:
                    handler.handle_line(line)
            finally:
                handler._on_event = on_event
        if durable.step == DURABLE_REPLAY:
            yield self.messages_params(self.path)
            return
        offset = int((durable.record.position or {}).get(POSITION_OFFSET, 0))
        durable.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.lseek(fd, offset, os.SEEK_SET)

            def follower(path: str, handler: PipesMessageHandler, fd: int, max_line_bytes: int) -> _FileFollower:
                return _RecordingFollower(path, handler, fd, max_line_bytes, durable=durable, offset=offset,
                                          position=len(recorded))

            thread = _FileFollowThread(self.path, handler, fd=fd, use_inotify=self.use_inotify,
                                       max_line_bytes=self.max_line_bytes, follower=follower)
            thread.start()
        except BaseException:
            os.close(fd)
            raise
        try:
            yield self.messages_params(self.path)
        finally:
            thread.finish()

    def describe(self) -> str:
        return f"the durable run's messages file ({self.path})"
