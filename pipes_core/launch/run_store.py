"""``PipesRunStore``: what a durable run records, so that an orchestrator restarted after a crash can find its
runs again (SQLite from the standard library; one file that several orchestrator processes on a host share).

Strategy:

* One row per launch key in ``runs``: the launcher and its handle (JSON: a pid with the process's start time, a
  container id, a Ray submission id, a Slurm job id), the channel's params and the reader's position (JSON: a
  file offset, the next blob chunk, log lines consumed), the state, the outcome once concluded (JSON), and the
  owner (host, pid and the pid's start time, so that a reused pid is never taken for a live owner).
* The messages a run delivered, in ``message_blocks``, one row per block of messages recorded together (as one
  read of the channel delivered them): the position of its first message in the channel (from 0), how many, and
  the lines exactly as received, joined by newlines (a message line holds none). One row per block rather than
  per message keeps recording within the cost budget of a fast channel (about 0.4 µs a message). Replaying
  them through a fresh handler rebuilds the invocation, so a restarted orchestrator returns every result once
  and in order without a second encoding of events.
* Claiming a key is one ``BEGIN IMMEDIATE`` transaction: of two processes racing on a key, exactly one creates
  the run; the other finds it. WAL mode lets readers work while one process writes; a writer waits up to
  :data:`DEFAULT_BUSY_TIMEOUT_SECONDS` for another before giving up with :class:`PipesRunStoreError`.
* The schema is versioned with ``PRAGMA user_version``: an empty file is created at :data:`SCHEMA_VERSION`, an
  older one is migrated step by step in one transaction when first opened (version 1 kept a row per message),
  a newer one is refused, naming the file.
* ``synchronous = NORMAL`` (in WAL mode): a commit survives the crash of any process (what durable runs are
  about); only a power loss may lose the last commits before a checkpoint.

Nothing here launches or reads anything: the launchers and the lifecycle decide what to record and when.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pipes_ext._errors import PipesTransportError

__all__ = [
    "PipesRunStore",
    "PipesRunRecord",
    "PipesRunOwner",
    "PipesRunStoreError",
    "RUN_STATES",
    "RUN_LAUNCHING",
    "RUN_RUNNING",
    "RUN_ENDED",
    "RUN_CONCLUDED",
    "SCHEMA_VERSION",
    "STATE_DIR_ENV_VAR",
    "DEFAULT_BUSY_TIMEOUT_SECONDS",
    "default_state_dir",
    "process_start_time",
]

# The schema this code writes. Bump it with a migration step in _MIGRATIONS when a table changes.
SCHEMA_VERSION: Final = 2
# How long a writer waits for another process's write transaction before the store is "locked": long enough
# for any single record (they are small), short enough that a stuck process is reported rather than waited on.
DEFAULT_BUSY_TIMEOUT_SECONDS: Final = 10.0
# How long a process opening a new store waits before trying again to put it in WAL mode while another does.
WAL_RETRY_SECONDS: Final = 0.01
# Where the command line keeps its store unless told otherwise (``--state-dir``).
STATE_DIR_ENV_VAR: Final = "PIPES_STATE_DIR"
# The store's file name inside a state directory.
STORE_FILE_NAME: Final = "runs.sqlite3"

# A run's states, in the order a run goes through them.
RUN_LAUNCHING: Final = "launching"  # claimed; the launch may or may not have happened (the handle is not known)
RUN_RUNNING: Final = "running"  # launched, its handle recorded
RUN_ENDED: Final = "ended"  # the job ended; what it sent may not all be drained yet
RUN_CONCLUDED: Final = "concluded"  # drained and judged: the outcome is final
RUN_STATES: Final = (RUN_LAUNCHING, RUN_RUNNING, RUN_ENDED, RUN_CONCLUDED)

# The messages table of schema version 2 (a later change of it is a migration of its own).
_MESSAGE_BLOCKS_TABLE = """
CREATE TABLE message_blocks (
    launch_key TEXT NOT NULL REFERENCES runs(launch_key) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    count INTEGER NOT NULL,
    lines TEXT NOT NULL,
    PRIMARY KEY (launch_key, position)
);
"""
_SCHEMA = """
CREATE TABLE runs (
    launch_key TEXT PRIMARY KEY,
    launcher TEXT NOT NULL,
    state TEXT NOT NULL,
    handle TEXT,
    channel TEXT,
    position TEXT,
    outcome TEXT,
    owner_host TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_started REAL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
""" + _MESSAGE_BLOCKS_TABLE
# Schema migrations, by the version they start from: each brings a store one version up.
_MIGRATIONS: dict[int, str] = {
    # 1 -> 2: a row per block of messages instead of a row per message (each old message its own block).
    1: _MESSAGE_BLOCKS_TABLE + """
INSERT INTO message_blocks (launch_key, position, count, lines) SELECT launch_key, position, 1, line FROM messages;
DROP TABLE messages
""",
}


# The position's field holding the index of the message after those it follows (see record_messages).
POSITION_NEXT: Final = "next"


class PipesRunStoreError(PipesTransportError):
    """The run store cannot be used: the file is not a SQLite database or is damaged (``kind`` "corrupt"),
    another process holds it locked past the busy timeout ("locked"), it was written by a newer version of this
    library ("newer_schema"), or it cannot be opened at all ("unreadable").

    Attributes:
        path: the store's file.
        kind: one of the strings above.
    """

    def __init__(self, message: str, *, path: str, kind: str) -> None:
        super().__init__(message)
        self.path = path
        self.kind = kind


def default_state_dir() -> Path:
    """``$PIPES_STATE_DIR``, else ``$XDG_STATE_HOME/pipes``, else ``~/.local/state/pipes`` (the user's state
    directory by the XDG convention)."""
    explicit = os.environ.get(STATE_DIR_ENV_VAR)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "pipes"


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc/PID/stat`` field 22), or None when
    there is no such process (or no /proc). Together with the pid it names one process: a pid reused later has a
    different start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses: split after it.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return float(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class PipesRunOwner:
    """The orchestrator process that owns a run.

    Attributes:
        host: its host name.
        pid: its process id.
        started: its start time (see :func:`process_start_time`), or None where it cannot be known.
    """

    host: str
    pid: int
    started: float | None

    @classmethod
    def current(cls) -> PipesRunOwner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start_time(pid))

    def is_alive(self) -> bool | None:
        """True/False for an owner on this host; None for one on another host (it cannot be checked here)."""
        if self.host != socket.gethostname():
            return None
        started = process_start_time(self.pid)
        if started is None:
            return False
        return self.started is None or started == self.started


@dataclass(frozen=True)
class PipesRunRecord:
    """One run as the store holds it.

    Attributes:
        launch_key: the key the run was launched under.
        launcher: the launcher's name ("subprocess", "docker", "ray", "slurm").
        state: one of :data:`RUN_STATES`.
        handle: how the launcher finds the job again (a JSON object), or None before it is recorded.
        channel: the channel's params (a JSON object), or None.
        position: the reader's position (a JSON object), or None.
        outcome: the conclusion (a JSON object) once the state is "concluded", else None.
        owner: the orchestrator process that owns the run.
        created: when the run was claimed (seconds since the epoch).
        updated: when it last changed.
        messages: how many messages it has delivered.
    """

    launch_key: str
    launcher: str
    state: str
    handle: dict[str, Any] | None
    channel: dict[str, Any] | None
    position: dict[str, Any] | None
    outcome: dict[str, Any] | None
    owner: PipesRunOwner
    created: float
    updated: float
    messages: int = field(default=0)


def _json_or_none(value: str | None) -> dict[str, Any] | None:
    return None if value is None else dict(json.loads(value))


def _dump(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


_COLUMNS = ("launch_key, launcher, state, handle, channel, position, outcome, owner_host, owner_pid, owner_started, "
            "created, updated, (SELECT COALESCE(MAX(b.position + b.count), 0) FROM message_blocks b "
            "WHERE b.launch_key = runs.launch_key)")


def _record(row: Sequence[Any]) -> PipesRunRecord:
    return PipesRunRecord(
        launch_key=row[0], launcher=row[1], state=row[2], handle=_json_or_none(row[3]),
        channel=_json_or_none(row[4]), position=_json_or_none(row[5]), outcome=_json_or_none(row[6]),
        owner=PipesRunOwner(row[7], int(row[8]), row[9]), created=float(row[10]), updated=float(row[11]),
        messages=int(row[12]),
    )


class PipesRunStore:
    """The runs of one state directory or file (see the module doc).

    ``PipesRunStore(path)`` names the file (created on first use, with its directory); nothing is opened until
    the first call. One instance may be used from several threads (calls are serialised); several processes may
    share the file. Use it as a context manager, or call :meth:`close`.

    Args:
        path: the SQLite file.
        busy_timeout_seconds: how long a write waits for another process's (see
            :data:`DEFAULT_BUSY_TIMEOUT_SECONDS`).
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS) -> None:
        self.path = os.fspath(path)
        self.busy_timeout_seconds = busy_timeout_seconds
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str] | None = None) -> PipesRunStore:
        """The store of a state directory (default: :func:`default_state_dir`)."""
        return cls((default_state_dir() if state_dir is None else Path(state_dir)) / STORE_FILE_NAME)

    def __repr__(self) -> str:
        return f"PipesRunStore({self.path!r})"

    # -------------------------------------------------------------------------------------------- plumbing

    def _error(self, exc: sqlite3.Error) -> PipesRunStoreError:
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
            return PipesRunStoreError(
                f"run store {self.path} is locked by another process for more than {self.busy_timeout_seconds:g} s "
                f"({text}); retry, or raise busy_timeout_seconds", path=self.path, kind="locked")
        if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
            return PipesRunStoreError(
                f"run store {self.path} is not a usable SQLite database ({text}); move it aside to start a new one "
                "(its runs are then forgotten)", path=self.path, kind="corrupt")
        return PipesRunStoreError(f"run store {self.path} cannot be used: {text}", path=self.path,
                                  kind="unreadable")

    def _open(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipesRunStoreError(f"run store {self.path}: cannot create its directory: {exc}",
                                     path=self.path, kind="unreadable") from exc
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE where a decision is made).
            connection = sqlite3.connect(self.path, timeout=self.busy_timeout_seconds, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            connection.execute("PRAGMA synchronous = NORMAL")  # see the module doc
            mode = self._wal(connection)
            if str(mode).lower() != "wal":  # pragma: no cover - a file system without shared memory
                raise sqlite3.OperationalError(f"cannot use WAL mode here (journal mode {mode})")
            self._migrate(connection)
        except sqlite3.Error as exc:
            connection.close()
            raise self._error(exc) from exc
        except PipesRunStoreError:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _wal(self, connection: sqlite3.Connection) -> str:
        """Put the file in WAL mode (once per file: the mode is kept in it). Processes opening a new file at once
        race for it, and SQLite answers "locked" at once rather than waiting: try again until the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout_seconds
        pause = threading.Event()
        while True:
            try:
                mode = str(connection.execute("PRAGMA journal_mode").fetchone()[0])
                if mode.lower() == "wal":
                    return mode
                return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                pause.wait(WAL_RETRY_SECONDS)

    def _migrate(self, connection: sqlite3.Connection) -> None:
        if int(connection.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
            return  # the usual case: no write lock needed to open a store (readers never wait)
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise PipesRunStoreError(
                    f"run store {self.path} has schema version {version}, newer than this library's "
                    f"({SCHEMA_VERSION}): use the newer library, or another store", path=self.path,
                    kind="newer_schema")
            if version == 0:
                tables = connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise PipesRunStoreError(
                        f"run store {self.path} is a SQLite database of something else (no schema version); "
                        "name another file", path=self.path, kind="corrupt")
                for statement in _SCHEMA.split(";"):  # executescript would commit our transaction first
                    if statement.strip():
                        connection.execute(statement)
            else:
                while version < SCHEMA_VERSION:
                    for statement in _MIGRATIONS[version].split(";"):
                        if statement.strip():
                            connection.execute(statement)
                    version += 1
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            connection = self._open()
            try:
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield connection
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> PipesRunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- records

    def claim(self, launch_key: str, launcher: str, *, owner: PipesRunOwner | None = None,
              channel: dict[str, Any] | None = None) -> tuple[PipesRunRecord, bool]:
        """The run of ``launch_key``, creating it (state "launching", owned by ``owner``, default this process)
        when there is none: ``(record, created)``. Of several processes claiming one key at once, exactly one
        gets ``created=True``."""
        owner = owner or PipesRunOwner.current()
        now = time.time()
        with self._transaction(write=True) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE launch_key = ?", (launch_key,)).fetchone()
            if row is not None:
                return _record(row), False
            db.execute("INSERT INTO runs (launch_key, launcher, state, channel, owner_host, owner_pid, owner_started, "
                       "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (launch_key, launcher, RUN_LAUNCHING, _dump(channel), owner.host, owner.pid, owner.started,
                        now, now))
            row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE launch_key = ?", (launch_key,)).fetchone()
            return _record(row), True

    def take_over(self, launch_key: str, *, owner: PipesRunOwner | None = None) -> PipesRunRecord:
        """Make ``owner`` (default this process) the run's owner, as an orchestrator does when it re-attaches."""
        owner = owner or PipesRunOwner.current()
        return self._update(launch_key, owner_host=owner.host, owner_pid=owner.pid, owner_started=owner.started)

    def record_handle(self, launch_key: str, handle: dict[str, Any]) -> PipesRunRecord:
        """The job is launched: how to find it again (state "running")."""
        return self._update(launch_key, handle=_dump(handle), state=RUN_RUNNING)

    def record_ended(self, launch_key: str, handle: dict[str, Any] | None = None) -> PipesRunRecord:
        """The job has ended; draining what it sent may still be under way (state "ended"). ``handle``: the
        handle with how the job ended added, so that the verdict needs nothing from the engine any more."""
        if handle is None:
            return self._update(launch_key, state=RUN_ENDED)
        return self._update(launch_key, state=RUN_ENDED, handle=_dump(handle))

    def record_messages(self, launch_key: str, first_position: int, lines: Sequence[str],
                        position: dict[str, Any] | None = None) -> PipesRunRecord:
        """Messages ``first_position``, ``first_position + 1``... of the run, as received, with the reader's
        position after them, in one transaction. A message already recorded at a position is kept as it was
        (a re-read after a restart delivers it again): recording is idempotent by position. The lines are kept as
        one block (a message line holds no newline)."""
        with self._transaction(write=True) as db:
            if lines:
                # Two watchers of one run record the same channel: a longer block at a position wins (same lines).
                db.execute("INSERT INTO message_blocks (launch_key, position, count, lines) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (launch_key, position) DO UPDATE SET count = excluded.count, "
                           "lines = excluded.lines WHERE excluded.count > message_blocks.count",
                           (launch_key, first_position, len(lines), "\n".join(lines)))
            if position is not None:
                # The position is kept with the index after the messages it follows; one behind what is recorded
                # (a second watcher of the run, reading behind the first) is not written: the position never goes
                # back, so a later re-attach reads on after every recorded message, not from within them.
                following = first_position + len(lines)
                row = db.execute("SELECT position FROM runs WHERE launch_key = ?", (launch_key,)).fetchone()
                current = (_json_or_none(row[0]) if row is not None else None) or {}
                if int(current.get(POSITION_NEXT, 0)) <= following:
                    db.execute("UPDATE runs SET position = ?, updated = ? WHERE launch_key = ?",
                               (_dump({**position, POSITION_NEXT: following}), time.time(), launch_key))
            return self._get_in(db, launch_key)

    def conclude(self, launch_key: str, outcome: dict[str, Any]) -> PipesRunRecord:
        """The run's final outcome (state "concluded"): a later run with the key returns it without launching."""
        return self._update(launch_key, outcome=_dump(outcome), state=RUN_CONCLUDED)

    def _update(self, launch_key: str, **columns: Any) -> PipesRunRecord:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        with self._transaction(write=True) as db:
            cursor = db.execute(f"UPDATE runs SET {assignments}, updated = ? WHERE launch_key = ?",
                                (*columns.values(), time.time(), launch_key))
            if cursor.rowcount == 0:
                raise KeyError(launch_key)
            return self._get_in(db, launch_key)

    @staticmethod
    def _get_in(db: sqlite3.Connection, launch_key: str) -> PipesRunRecord:
        row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE launch_key = ?", (launch_key,)).fetchone()
        if row is None:
            raise KeyError(launch_key)
        return _record(row)

    # ----------------------------------------------------------------------------------------------- queries

    def get(self, launch_key: str) -> PipesRunRecord | None:
        """The run of ``launch_key``, or None."""
        with self._transaction(write=False) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE launch_key = ?", (launch_key,)).fetchone()
        return None if row is None else _record(row)

    def runs(self) -> list[PipesRunRecord]:
        """Every run, oldest first."""
        with self._transaction(write=False) as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM runs ORDER BY created, launch_key").fetchall()
        return [_record(row) for row in rows]

    def messages(self, launch_key: str, *, after: int = -1) -> list[tuple[int, str]]:
        """The run's recorded messages after position ``after``, in order: ``(position, line)``."""
        with self._transaction(write=False) as db:
            return self._messages_in(db, launch_key, after)

    def snapshot(self, launch_key: str) -> tuple[PipesRunRecord | None, list[tuple[int, str]]]:
        """The run (None: no such run) and its recorded messages, read together: its position is the one after
        exactly these messages, even while another orchestrator records more."""
        with self._transaction(write=False) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE launch_key = ?", (launch_key,)).fetchone()
            return None if row is None else _record(row), self._messages_in(db, launch_key, -1)

    @staticmethod
    def _messages_in(db: sqlite3.Connection, launch_key: str, after: int) -> list[tuple[int, str]]:
        rows = db.execute("SELECT position, count, lines FROM message_blocks WHERE launch_key = ? AND "
                          "position + count - 1 > ? ORDER BY position", (launch_key, after)).fetchall()
        messages: list[tuple[int, str]] = []
        last = after  # blocks may overlap (two watchers recorded the same messages): the first recorded wins
        for first, _, lines in rows:
            for position, line in enumerate(str(lines).split("\n"), start=int(first)):
                if position > last:
                    messages.append((position, line))
                    last = position
        return messages

    def forget(self, launch_key: str) -> bool:
        """Remove the run and its messages; False when there was none."""
        with self._transaction(write=True) as db:
            return db.execute("DELETE FROM runs WHERE launch_key = ?", (launch_key,)).rowcount > 0
