"""``PipesRunStore`` (pipes_core/launch/run_store.py): the records of durable runs, in a real SQLite file shared by
real processes; a damaged, foreign, newer or locked store is an error naming the file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipes_core.launch.run_store import (
    RUN_CONCLUDED,
    RUN_ENDED,
    RUN_LAUNCHING,
    RUN_RUNNING,
    SCHEMA_VERSION,
    STORE_FILE_NAME,
    PipesRunOwner,
    PipesRunStore,
    PipesRunStoreError,
    default_state_dir,
    process_start_time,
)
from tests.support.helpers import REPO_ROOT


def test_a_run_goes_through_its_states_and_keeps_what_it_recorded(tmp_path: Path) -> None:
    with PipesRunStore(tmp_path / "state" / "runs.sqlite3") as store:
        record, created = store.claim("nightly-2026-12-07", "subprocess", channel={"path": "/tmp/m"})
        assert created and record.state == RUN_LAUNCHING and record.handle is None
        assert record.owner == PipesRunOwner.current() and record.owner.is_alive() is True
        again, created_again = store.claim("nightly-2026-12-07", "docker")
        assert not created_again and again.launcher == "subprocess"  # the first claim's run, unchanged
        assert store.record_handle("nightly-2026-12-07", {"pid": 4242, "started": 17.0}).state == RUN_RUNNING
        store.record_messages("nightly-2026-12-07", 0, ['{"m": 0}', '{"m": 1}'], position={"offset": 20})
        # re-read after a restart: positions 1 and 2 arrive, 1 again; the first recording of 1 is kept
        record = store.record_messages("nightly-2026-12-07", 1, ['{"m": "1 again"}', '{"m": 2}'],
                                       position={"offset": 30})
        assert record.messages == 3 and record.position == {"offset": 30, "next": 3}
        assert store.messages("nightly-2026-12-07") == [(0, '{"m": 0}'), (1, '{"m": 1}'), (2, '{"m": 2}')]
        assert store.messages("nightly-2026-12-07", after=1) == [(2, '{"m": 2}')]
        assert store.record_ended("nightly-2026-12-07").state == RUN_ENDED
        record = store.conclude("nightly-2026-12-07", {"exit_code": 0, "error": None})
        assert record.state == RUN_CONCLUDED and record.outcome == {"exit_code": 0, "error": None}
        assert record.channel == {"path": "/tmp/m"} and record.handle == {"pid": 4242, "started": 17.0}
    with PipesRunStore(tmp_path / "state" / "runs.sqlite3") as reopened:  # another orchestrator, later
        (only,) = reopened.runs()
        assert only == record
        assert reopened.forget("nightly-2026-12-07") and not reopened.forget("nightly-2026-12-07")
        assert reopened.get("nightly-2026-12-07") is None and reopened.messages("nightly-2026-12-07") == []


def test_the_position_never_goes_back_when_a_second_watcher_records_behind_the_first(tmp_path: Path) -> None:
    with PipesRunStore(tmp_path / "runs.sqlite3") as store:
        store.claim("k", "subprocess")
        store.record_handle("k", {"pid": 1})
        ahead = [f'{{"m": {i}}}' for i in range(10)]
        assert store.record_messages("k", 0, ahead, position={"offset": 100}).position == {"offset": 100, "next": 10}
        # a watcher that re-attached earlier records what it read, behind: the messages are kept as they were, and
        # the position stays after all ten (a re-attach reading from offset 50 would read messages 5-9 again)
        record = store.record_messages("k", 0, ahead[:5], position={"offset": 50})
        assert record.position == {"offset": 100, "next": 10} and record.messages == 10
        # level with it or ahead, it moves on
        assert store.record_messages("k", 10, ['{"m": 10}'], position={"offset": 110}).position == {
            "offset": 110, "next": 11}


def test_updating_a_run_that_does_not_exist_is_a_key_error(tmp_path: Path) -> None:
    with PipesRunStore(tmp_path / "runs.sqlite3") as store, pytest.raises(KeyError):
        store.record_handle("nobody", {"pid": 1})


_CLAIM = textwrap.dedent("""
    import json, sys
    from pipes_core.launch.run_store import PipesRunStore
    store = PipesRunStore(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin, once every process is ready: all claim at once
    with store:
        record, created = store.claim("shared-key", "subprocess")
    print(json.dumps({"created": created, "owner": record.owner.pid}))
""")


def test_processes_racing_on_one_key_create_it_once(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    children = [subprocess.Popen([sys.executable, "-c", _CLAIM, str(path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
                for _ in range(6)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
        outputs = []
        for child in children:
            assert child.stdout is not None
            outputs.append(child.stdout.read())
            child.wait(timeout=60)
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, 9)
                child.wait()
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
    results = [json.loads(output) for output in outputs]
    assert all(child.returncode == 0 for child in children)
    assert sum(result["created"] for result in results) == 1
    creator = next(result["owner"] for result in results if result["created"])
    assert {result["owner"] for result in results} == {creator}  # every process sees the one run
    with PipesRunStore(path) as store:
        assert [record.launch_key for record in store.runs()] == ["shared-key"]


def test_a_file_that_is_not_a_database_is_named_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    path.write_bytes(b"this is not SQLite\n" * 100)
    with pytest.raises(PipesRunStoreError) as error, PipesRunStore(path) as store:
        store.runs()
    assert error.value.kind == "corrupt" and error.value.path == str(path)
    assert str(path) in str(error.value) and "move it aside" in str(error.value)
    assert path.read_bytes() == b"this is not SQLite\n" * 100  # left as it was


def test_another_programs_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE orders (id INTEGER)")
    with pytest.raises(PipesRunStoreError) as error, PipesRunStore(path) as store:
        store.claim("k", "subprocess")
    assert error.value.kind == "corrupt" and "something else" in str(error.value)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("orders",)]


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    with PipesRunStore(path) as store:
        store.claim("k", "subprocess")
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(PipesRunStoreError) as error, PipesRunStore(path) as store:
        store.get("k")
    assert error.value.kind == "newer_schema"
    assert f"schema version {SCHEMA_VERSION + 1}" in str(error.value) and str(path) in str(error.value)


# Version 1 of the schema, as a store written by the first release holds it (a row per message).
_SCHEMA_V1 = """
CREATE TABLE runs (launch_key TEXT PRIMARY KEY, launcher TEXT NOT NULL, state TEXT NOT NULL, handle TEXT,
    channel TEXT, position TEXT, outcome TEXT, owner_host TEXT NOT NULL, owner_pid INTEGER NOT NULL,
    owner_started REAL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE messages (launch_key TEXT NOT NULL REFERENCES runs(launch_key) ON DELETE CASCADE,
    position INTEGER NOT NULL, line TEXT NOT NULL, PRIMARY KEY (launch_key, position));
INSERT INTO runs VALUES ('old', 'subprocess', 'running', '{"pid": 1}', NULL, '{"offset": 30}', NULL, 'h', 1, NULL,
    1.0, 2.0);
INSERT INTO messages VALUES ('old', 0, '{"m": 0}'), ('old', 1, '{"m": 1}'), ('old', 2, '{"m": 2}');
PRAGMA user_version = 1;
"""


def test_a_store_of_schema_version_1_is_migrated_keeping_its_runs_and_messages(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA_V1)
    with PipesRunStore(path) as store:
        record = store.get("old")
        assert record is not None and record.messages == 3 and record.position == {"offset": 30}
        assert store.messages("old") == [(0, '{"m": 0}'), (1, '{"m": 1}'), (2, '{"m": 2}')]
        assert store.record_messages("old", 3, ['{"m": 3}']).messages == 4
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"runs", "message_blocks"}


_HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.read()  # holds the write lock until the test closes our stdin
""")


def test_a_store_locked_by_another_process_past_the_busy_timeout_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    with PipesRunStore(path) as store:
        store.claim("k", "subprocess")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with PipesRunStore(path, busy_timeout_seconds=0.2) as store:
            assert store.get("k") is not None  # readers are not blocked (WAL)
            with pytest.raises(PipesRunStoreError) as error:
                store.record_handle("k", {"pid": 1})
        assert error.value.kind == "locked" and "busy_timeout_seconds" in str(error.value)
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, 9)
        holder.wait()
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()
    with PipesRunStore(path) as store:  # the holder's transaction died with it; the store is whole
        assert store.record_handle("k", {"pid": 1}).state == RUN_RUNNING


def test_an_owner_is_one_process_not_one_pid(tmp_path: Path) -> None:
    me = PipesRunOwner.current()
    assert me.is_alive() is True and me.started == process_start_time(os.getpid())
    assert PipesRunOwner(me.host, me.pid, (me.started or 0) + 1).is_alive() is False  # a reused pid
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert process_start_time(ended.pid) is None
    assert PipesRunOwner(me.host, ended.pid, 1.0).is_alive() is False
    assert PipesRunOwner("another-host.invalid", me.pid, me.started).is_alive() is None


def test_the_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPES_STATE_DIR", str(tmp_path / "explicit"))
    assert default_state_dir() == tmp_path / "explicit"
    assert PipesRunStore.in_state_dir().path == str(tmp_path / "explicit" / STORE_FILE_NAME)
    monkeypatch.delenv("PIPES_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "pipes"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "pipes"
    store = PipesRunStore.in_state_dir(tmp_path / "given")
    assert not (tmp_path / "given").exists()  # nothing is created before the first call
    with store:
        store.claim("k", "subprocess")
    assert (tmp_path / "given" / STORE_FILE_NAME).is_file()
