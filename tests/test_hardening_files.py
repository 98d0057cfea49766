"""Issue 9, the files/process/command-line half: files the user names, the external side's context file and
messages file, a forked child leaving the ``with`` block, and every bad ``pipes run`` invocation.

Each test says what happens for one bad input: the clear error, and that nothing was touched or lost.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    PipesEnvContextInjector,
    PipesFileContextInjector,
    PipesFileMessageReader,
    PipesRunContext,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesUsageError,
    open_pipes_session,
)
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_ext import PipesMappingParamsLoader, open_pipes
from pipes_ext._context_loaders import PipesDefaultContextLoader, read_context_file
from pipes_ext._errors import PipesProtocolError, PipesTransportError
from pipes_ext._protocol import MAX_DECODED_PARAM_BYTES, encode_param
from tests.conftest import REPO_ROOT, cli_json_events
from tests.support.helpers import PYTHON

PIPES = [PYTHON, "-m", "pipes_core"]
VICTIM_TEXT = "precious: must never be overwritten\n"


# ---------------------------------------------------------------------------------------------------------
# Orchestrator side: paths the user names are created by the session, never reused
# ---------------------------------------------------------------------------------------------------------


def _plant(kind: str, path: Path, tmp_path: Path) -> None:
    """Put a ``kind`` of thing at ``path``."""
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT, encoding="utf-8")
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "does-not-exist-yet")
    elif kind == "regular-0666":
        path.write_text(VICTIM_TEXT, encoding="utf-8")
        os.chmod(path, 0o666)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:  # pragma: no cover
        raise AssertionError(kind)


PLANTED = ["symlink", "dangling-symlink", "regular-0666", "fifo", "directory", "socket"]
EXPECTED_KIND = {"symlink": "a symbolic link", "dangling-symlink": "a symbolic link",
                 "regular-0666": "a regular file", "fifo": "a FIFO", "directory": "a directory",
                 "socket": "a socket"}


def _snapshot(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_ino, st.st_size


@pytest.mark.parametrize("kind", PLANTED)
@pytest.mark.parametrize("role", ["context", "messages"])
def test_an_existing_path_is_refused_before_launch_and_left_untouched(tmp_path: Path, kind: str, role: str) -> None:
    path = tmp_path / f"planted-{role}"
    _plant(kind, path, tmp_path)
    before = _snapshot(path)
    injector = PipesFileContextInjector(path) if role == "context" else PipesTempFileContextInjector()
    reader = PipesFileMessageReader(path) if role == "messages" else PipesTempFileMessageReader()
    client, marker = PipesSubprocessClient(context_injector=injector, message_reader=reader), tmp_path / "launched"
    with pytest.raises(PipesUsageError) as info:
        client.run(command=[PYTHON, "-c", f"open({str(marker)!r}, 'w').close()"])
    message = str(info.value)
    assert "\n" not in message
    assert f"the {role} file {str(path)!r} already exists and is {EXPECTED_KIND[kind]}" in message
    assert not marker.exists()  # refused before the process was launched
    assert _snapshot(path) == before  # neither removed, truncated nor replaced
    assert (tmp_path / "victim.txt").read_text(encoding="utf-8") == VICTIM_TEXT
    if kind == "regular-0666":
        assert path.read_text(encoding="utf-8") == VICTIM_TEXT
    if kind == "dangling-symlink":
        assert not (tmp_path / "does-not-exist-yet").exists()  # the link's target was not created


@pytest.mark.parametrize("role", ["context", "messages"])
def test_a_running_executable_as_the_path_is_refused_and_not_deleted(tmp_path: Path, role: str) -> None:
    # The ETXTBSY case: formerly the reader failed to open it, then deleted it on exit.
    exe = tmp_path / "busy-sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", exe)
    busy = subprocess.Popen([str(exe), "60"])
    try:
        injector = PipesFileContextInjector(exe) if role == "context" else PipesEnvContextInjector()
        reader = PipesFileMessageReader(exe) if role == "messages" else PipesTempFileMessageReader()
        with pytest.raises(PipesUsageError, match="already exists and is a regular file"):
            with open_pipes_session(None, injector, reader):
                raise AssertionError("the session must not start")  # pragma: no cover
        assert exe.exists() and os.access(exe, os.X_OK)
        assert busy.poll() is None
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("role", ["context", "messages"])
def test_missing_or_non_directory_parent_is_refused(tmp_path: Path, role: str) -> None:
    file_parent = tmp_path / "plain"
    file_parent.write_text("x", encoding="utf-8")
    for path, expected in ((tmp_path / "nodir" / "f", "does not exist"),
                           (file_parent / "f", "is not a directory")):
        injector = PipesFileContextInjector(path) if role == "context" else PipesEnvContextInjector()
        reader = PipesFileMessageReader(path) if role == "messages" else PipesTempFileMessageReader()
        with pytest.raises(PipesUsageError, match=expected):
            with open_pipes_session(None, injector, reader):
                raise AssertionError("the session must not start")  # pragma: no cover
    assert not (tmp_path / "nodir").exists()
    assert file_parent.read_text(encoding="utf-8") == "x"


def test_created_files_are_0600_whatever_the_umask_and_removed_after(tmp_path: Path) -> None:
    context_path, messages_path = tmp_path / "ctx", tmp_path / "msgs"
    previous = os.umask(0)
    try:
        with open_pipes_session(None, PipesFileContextInjector(context_path),
                                PipesFileMessageReader(messages_path)):
            assert stat.S_IMODE(os.stat(context_path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(messages_path).st_mode) == 0o600
            assert json.loads(context_path.read_text(encoding="utf-8"))["extras"] == {}
    finally:
        os.umask(previous)
    assert not context_path.exists() and not messages_path.exists()


def test_a_file_put_in_place_of_ours_is_not_deleted(tmp_path: Path) -> None:
    context_path, messages_path = tmp_path / "ctx", tmp_path / "msgs"
    with open_pipes_session(None, PipesFileContextInjector(context_path), PipesFileMessageReader(messages_path)):
        for path in (context_path, messages_path):
            path.rename(path.with_suffix(".moved"))
            path.write_text(VICTIM_TEXT, encoding="utf-8")  # someone else's file now has the name
    assert context_path.read_text(encoding="utf-8") == VICTIM_TEXT
    assert messages_path.read_text(encoding="utf-8") == VICTIM_TEXT


# ---------------------------------------------------------------------------------------------------------
# External side: the context file is a regular file under the bootstrap cap; the messages file is regular
# ---------------------------------------------------------------------------------------------------------


def _load_context(path: str) -> dict[str, object]:
    return PipesDefaultContextLoader().load_context({"path": path})


def test_context_file_dev_zero_is_refused_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(PipesTransportError, match=r"'/dev/zero' is not a regular file \(it is a character device\)"):
        _load_context("/dev/zero")
    assert time.monotonic() - started < 5  # no read at all: a generous bound that only catches a hang


def test_context_file_directory_and_fifo_are_refused_without_hanging(tmp_path: Path) -> None:
    with pytest.raises(PipesTransportError, match=r"is not a regular file \(it is a directory\)"):
        _load_context(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # In a child process, so that a regression (a blocking open) fails on the timeout instead of hanging pytest.
    code = (
        "from pipes_ext._context_loaders import PipesDefaultContextLoader\n"
        "from pipes_ext._errors import PipesTransportError\n"
        "try:\n"
        f"    PipesDefaultContextLoader().load_context({{'path': {str(fifo)!r}}})\n"
        "except PipesTransportError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert "is not a regular file (it is a FIFO)" in proc.stdout, proc.stderr


def test_context_file_over_the_bootstrap_cap_is_refused_before_reading(tmp_path: Path) -> None:
    sparse = tmp_path / "huge.json"
    with open(sparse, "wb") as f:
        f.truncate(MAX_DECODED_PARAM_BYTES + 1)  # sparse: nothing is really written or read
    with pytest.raises(PipesProtocolError, match="over the 67108864-byte bootstrap limit"):
        _load_context(str(sparse))
    small = tmp_path / "small.json"
    small.write_text('{"a": "' + "x" * 100 + '"}', encoding="utf-8")
    with pytest.raises(PipesProtocolError, match="over the 50-byte bootstrap limit"):
        read_context_file(str(small), max_bytes=50)
    assert read_context_file(str(small), max_bytes=200).startswith('{"a": "x')


def test_context_file_not_utf8_or_too_deep_is_a_protocol_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b'{"\xff": 1}')
    with pytest.raises(PipesProtocolError, match="is not UTF-8"):
        _load_context(str(bad))
    deep = tmp_path / "deep"
    deep.write_text("[" * 60_000, encoding="utf-8")
    with pytest.raises(PipesProtocolError, match="context file"):
        _load_context(str(deep))


def _ext_params(messages: dict[str, object]) -> PipesMappingParamsLoader:
    from pipes_ext._protocol import empty_context_data

    return PipesMappingParamsLoader({
        "DAGSTER_PIPES_CONTEXT": encode_param({"data": empty_context_data("r")}),
        "DAGSTER_PIPES_MESSAGES": encode_param(messages),
    })


def test_messages_file_must_be_a_regular_file_on_the_external_side(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PipesTransportError, match=r"it is a FIFO \(no reader\)"):
        open_pipes(params_loader=_ext_params({"path": str(fifo)}))
    with pytest.raises(PipesTransportError, match="it is a directory"):
        open_pipes(params_loader=_ext_params({"path": str(tmp_path)}))
    victim = tmp_path / "victim"
    victim.write_text(VICTIM_TEXT, encoding="utf-8")
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(PipesTransportError, match="symbolic link; refusing to follow it"):
        open_pipes(params_loader=_ext_params({"path": str(link)}))
    assert victim.read_text(encoding="utf-8") == VICTIM_TEXT
    with pytest.raises(PipesTransportError, match="not a regular file"):
        open_pipes(params_loader=_ext_params({"path": "/dev/null"}))


# ---------------------------------------------------------------------------------------------------------
# A forked child leaving the with block does not close its parent's session
# ---------------------------------------------------------------------------------------------------------

FORK_CHILD = """
import os
from pipes_ext import open_pipes

with open_pipes() as pipes:
    pipes.report_custom_message("parent before fork")
    pid = os.fork()
    if pid == 0:
        try:
            with pipes:  # the child leaves the block (and, below, exits): no closed on the parent's behalf
                pipes.report_custom_message("from the forked child")
            pipes.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    pipes.report_custom_message("parent after the child left")
"""


def test_a_forked_child_leaving_the_block_sends_no_closed(write_script: Callable[..., Path]) -> None:
    script = write_script(FORK_CHILD)
    invocation = PipesSubprocessClient().run(command=[PYTHON, str(script)])
    session = invocation.session
    assert session.handler.closed_count == 1
    assert session.protocol_issues == []
    assert session.get_custom_messages() == ["parent before fork", "from the forked child",
                                             "parent after the child left"]


# ---------------------------------------------------------------------------------------------------------
# pipes run: each bad invocation is one clear line and exit 2; --json is strict; the terminal is safe
# ---------------------------------------------------------------------------------------------------------


def run_pipes(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PIPES, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def _bad_invocations(tmp: Path) -> list[tuple[list[str], str]]:
    deep = tmp / "deep.json"
    deep.write_text("[" * 60_000, encoding="utf-8")
    bad = tmp / "bad.json"
    bad.write_text("{nope", encoding="utf-8")
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    existing = tmp / "existing"
    existing.write_text("keep", encoding="utf-8")
    return [
        (["--extras", "[" * 60_000], "--extras is nested too deeply"),
        (["--extras", '{"a":' * 25_000], "--extras is nested too deeply"),
        (["--extras-file", str(deep)], f"--extras-file {deep} is nested too deeply"),
        (["--extras-file", str(bad)], f"--extras-file {bad} is not valid JSON"),
        (["--extras-file", str(tmp / "missing.json")], f"cannot read --extras-file {tmp / 'missing.json'}"),
        (["--context-path", str(tmp / "nodir" / "ctx")], "does not exist"),
        (["--messages-path", str(tmp / "nodir" / "msgs")], "does not exist"),
        (["--context-path", str(tmp)], "already exists and is a directory"),
        (["--messages-path", str(tmp)], "already exists and is a directory"),
        (["--messages-path", str(fifo)], "already exists and is a FIFO"),
        (["--context-path", str(fifo)], "already exists and is a FIFO"),
        (["--messages-path", str(existing)], "already exists and is a regular file"),
        (["--context-injector", "env", "--context-path", str(tmp / "c")],
         "--context-path is for --context-injector file, not env"),
        (["--context-injector", "tempfile", "--context-path", str(tmp / "c")],
         "--context-path is for --context-injector file, not tempfile"),
        (["--message-reader", "tempfile", "--messages-path", str(tmp / "m")],
         "--messages-path is for --message-reader file, not tempfile"),
        (["--message-reader", "file"], "needs --messages-path"),
        (["--timeout", "nan"], "--timeout must be positive and finite (seconds), got 'nan'"),
        (["--timeout", "inf"], "got 'inf'"),
        (["--timeout=-inf"], "got '-inf'"),
        (["--timeout", "0"], "got '0'"),
        (["--timeout", "-3"], "got '-3'"),
        (["--timeout", "soon"], "got 'soon'"),
    ]


def test_bad_invocations_are_one_line_exit_2_and_launch_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "launched"
    for args, expected in _bad_invocations(tmp_path):
        proc = run_pipes("run", *args, "--", PYTHON, "-c", f"open({str(marker)!r}, 'w').close()")
        assert proc.returncode == 2, (args[:3], proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (args[:3], proc.stderr[-2000:])
        assert lines[0].startswith("pipes: error:") and expected in lines[0], (args[:3], lines[0][:300])
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert not marker.exists(), args[:3]
    assert (tmp_path / "existing").read_text(encoding="utf-8") == "keep"
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)


def test_a_path_alone_implies_the_file_channel(write_script: Callable[..., Path], tmp_path: Path) -> None:
    script = write_script(
        """
        import os
        from pipes_ext import open_pipes
        # before opening: the context file is removed once the channel is open (it has been read by then)
        listing = sorted(os.listdir(os.environ["WATCH_DIR"]))
        with open_pipes() as pipes:
            pipes.report_custom_message(listing)
        """
    )
    watch = tmp_path / "watch"
    watch.mkdir()
    proc = subprocess.run(
        [*PIPES, "run", "--json", "--context-path", str(watch / "ctx"), "--messages-path", str(watch / "msgs"),
         "--", PYTHON, str(script)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env={**os.environ, "WATCH_DIR": str(watch)},
    )
    assert proc.returncode == 0, proc.stderr
    events = cli_json_events(proc.stdout)
    assert {"event": "custom_message", "payload": ["ctx", "msgs"]} in events
    assert os.listdir(watch) == []


def test_env_context_too_large_for_the_environment_suggests_the_file_injector(tmp_path: Path) -> None:
    extras = tmp_path / "big.json"
    # Incompressible text: base64(zlib(...)) of the context stays far above Linux's 128 KiB per env string.
    extras.write_text(json.dumps({"blob": os.urandom(400_000).hex()}), encoding="utf-8")
    proc = run_pipes("run", "--context-injector", "env", "--extras-file", str(extras), "--", "true")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "the context is too large for an environment variable" in lines[0]
    assert "--context-injector tempfile or file" in lines[0]
    # The same extras through the default tempfile injector run fine.
    assert run_pipes("run", "--no-strict", "--extras-file", str(extras), "--", "true").returncode == 0


NON_FINITE_CHILD = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.report_asset_materialization(metadata={"x": float("nan"), "y": {"raw_value": float("-inf"), "type": "float"}})
    pipes.report_custom_message({"a": float("inf"), "b": [float("nan"), 1.5]})
"""


def test_json_mode_emits_strict_json_only(write_script: Callable[..., Path]) -> None:
    script = write_script(NON_FINITE_CHILD)
    proc = run_pipes("run", "--json", "--asset", "a", "--", PYTHON, str(script))
    assert proc.returncode == 0, proc.stderr

    def reject(constant: str) -> None:
        raise AssertionError(f"non-strict JSON constant {constant} in --json output")

    events = [json.loads(line, parse_constant=reject) for line in proc.stdout.splitlines()]
    materialization = next(e for e in events if e["event"] == "materialization")
    assert materialization["metadata"] == {"x": {"type": "float", "value": "NaN"},
                                           "y": {"type": "float", "value": "-Infinity"}}
    assert {"event": "custom_message", "payload": {"a": "Infinity", "b": ["NaN", 1.5]}} in [
        {k: v for k, v in e.items() if k not in ("time", "run_id")} for e in events]


HOSTILE_CHILD = r"""
import sys
from pipes_ext import open_pipes
ESC = "\x1b"
with open_pipes() as pipes:
    print("raw child stdout " + ESC + "[1mstays raw" + ESC + "[0m", flush=True)
    pipes.log.info("hello\n── summary ──\nstatus    succeeded\r" + ESC + "]0;pwned\x07" + ESC + "[2J\u202eevil")
    pipes.report_asset_materialization(asset_key="a", metadata={"k" + ESC + "[31m": "v\n" + ESC + "[2J"})
    pipes.report_asset_check("chk" + ESC + "[2J\nstatus    succeeded", passed=True, asset_key="a")
    pipes.report_custom_message({"t": ESC + "[2J"})
    raise RuntimeError("boom\n[pipes] closed\nstatus    succeeded" + ESC + "[2J")
"""


def test_human_mode_escapes_the_childs_strings_and_indents_continuations(
    write_script: Callable[..., Path],
) -> None:
    script = write_script(HOSTILE_CHILD)
    proc = run_pipes("run", "--asset", "a", "--", PYTHON, str(script))
    assert proc.returncode == 1
    ours = [line for line in proc.stdout.splitlines() if not line.startswith("raw child stdout")]
    text = "\n".join(ours)
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\u202eevil" in text
    # No line of the child's can pass for one of ours: only our own summary rows start at column 0.
    assert [line for line in ours if line.startswith("status")] == ["status    failed (exit 1)"]
    assert not any(line.startswith("── summary") for line in ours[:-7])
    assert "[pipes] closed" not in ours  # the forged one is indented; ours says "closed with exception"
    assert "    ── summary ──" in ours and "    [pipes] closed" in ours
    assert any(line.startswith("[pipes] check a:chk\\x1b[2J") for line in ours)
    # The child's own stdout passes through untouched.
    assert "raw child stdout \x1b[1mstays raw\x1b[0m" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# A failed session keeps what it received
# ---------------------------------------------------------------------------------------------------------


class _BreaksAtTheEnd(PipesTempFileMessageReader):
    """A real file reader whose channel then fails (as a blob store going away at the final drain would)."""

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        with super().read_messages(handler) as params:
            yield params
        raise PipesTransportError("the channel broke during the final drain")


def test_a_failed_session_error_carries_what_was_received() -> None:
    with pytest.raises(PipesTransportError, match="broke during the final drain") as info:
        with open_pipes_session(PipesRunContext(asset_keys=["a"]), PipesTempFileContextInjector(),
                                _BreaksAtTheEnd()) as session:
            pipes = open_pipes(params_loader=PipesMappingParamsLoader(session.get_bootstrap_env_vars()))
            with pipes:
                pipes.report_asset_materialization(metadata={"rows": 3})
                pipes.report_custom_message("kept")
    carried = info.value.session  # type: ignore[attr-defined]
    assert carried is session
    assert carried.opened and carried.closed
    assert [r.asset_key for r in carried.get_reported_results()] == ["a"]
    assert carried.get_custom_messages() == ["kept"]
