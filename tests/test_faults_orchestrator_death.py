"""Fault injection: the orchestrator itself dies (SIGKILL, nothing runs after it) in the middle of a run (issue
20, item 2). Whatever the channel and whichever way the run was started (the sync client, the asyncio client,
``pipes run``), its local child's whole process group ends within a few seconds and no file holding the context
or the messages is left on disk: the orphan guard of :mod:`pipes_core.launch.subprocess` does it.

Each case runs under a small reaper (a child subreaper that reaps every descendant and exits when none is left),
so "the group is gone" means reaped, not a zombie: the reaper exiting on its own is the proof that the
orchestrator, the child, the grandchild and the guard have all ended.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipes_core import (
    PipesFileContextInjector,
    PipesLogEvent,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
)
from tests.conftest import REPO_ROOT

# Generous bounds for a loaded CI machine: the guard itself acts within ORPHAN_TERM_GRACE_SECONDS of the death.
READY_SECONDS = 60
GONE_SECONDS = 60

# Makes itself a child subreaper, starts the orchestrator (argv), prints "orchestrator PID", then reaps every
# descendant that ends ("reaped PID") and exits once none is left.
REAPER = """
import ctypes, os, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed")
orchestrator = subprocess.Popen(sys.argv[1:])
print("orchestrator", orchestrator.pid, flush=True)
while True:
    try:
        pid, _ = os.wait()
    except ChildProcessError:
        break
    print("reaped", pid, flush=True)
"""

# Opens the channel (so it has read its context), starts a grandchild in its process group, says where it is
# and blocks for ever.
CHILD = """
import json, os, subprocess, sys, threading
from pipes_ext import open_pipes
pipes = open_pipes()
pipes.log.info("running")
grandchild = subprocess.Popen(["sleep", "600"])
print("READY " + json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "grandchild": grandchild.pid}), flush=True)
threading.Event().wait()
"""

SYNC = """
import sys
from pipes_core import PipesSubprocessClient
from pipes_core.channels.registry import PipesChannelOptions, make_context_injector, make_message_reader
context, messages, path_dir, child = sys.argv[1:5]
options = PipesChannelOptions(path=f"{path_dir}/context.json")
injector = make_context_injector(context, options)
reader = make_message_reader(messages, PipesChannelOptions(path=f"{path_dir}/messages.jsonl"))
PipesSubprocessClient(context_injector=injector, message_reader=reader).run(command=[sys.executable, child])
"""

ASYNC = """
import asyncio, sys
from pipes_core import PipesAsyncSubprocessClient
from pipes_core.channels.registry import PipesChannelOptions, make_context_injector, make_message_reader
context, messages, path_dir, child = sys.argv[1:5]
injector = make_context_injector(context, PipesChannelOptions(path=f"{path_dir}/context.json"))
reader = make_message_reader(messages, PipesChannelOptions(path=f"{path_dir}/messages.jsonl"))
client = PipesAsyncSubprocessClient(context_injector=injector, message_reader=reader)
asyncio.run(client.run(command=[sys.executable, child]))
"""

# (context channel, message channel): the four channels of the issue.
CHANNELS = [("tempfile", "tempfile"), ("file", "file"), ("tempfile", "stdio"), ("env", "tempfile")]


def _orchestrator(mode: str, context: str, messages: str, path_dir: Path, child: Path, tmp_path: Path) -> list[str]:
    if mode == "cli":
        paths = []
        if context == "file":
            paths += ["--context-path", str(path_dir / "context.json")]
        if messages == "file":
            paths += ["--messages-path", str(path_dir / "messages.jsonl")]
        return [sys.executable, "-m", "pipes_core", "run", "--context-injector", context, "--message-reader",
                messages, *paths, "--", sys.executable, str(child)]
    script = tmp_path / f"orchestrator_{mode}.py"
    script.write_text(SYNC if mode == "sync" else ASYNC, encoding="utf-8")
    return [sys.executable, str(script), context, messages, str(path_dir), str(child)]


def _lines(stream: object) -> queue.Queue[str]:
    """The lines of ``stream``, read on a thread (so that the test can wait for one with a deadline)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str], prefix: str) -> str:
    while True:
        line = lines.get(timeout=READY_SECONDS)
        assert line, f"the output ended before a line starting with {prefix!r}"
        if line.startswith(prefix):
            return line[len(prefix):].strip()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("mode", ["sync", "async", "cli"])
@pytest.mark.parametrize(("context", "messages"), CHANNELS, ids=[f"{c}-{m}" for c, m in CHANNELS])
def test_sigkilled_orchestrator_leaves_no_child_and_no_file(tmp_path: Path, mode: str, context: str,
                                                           messages: str) -> None:
    _kill_the_orchestrator_mid_run(tmp_path, mode, context, messages, CHILD)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    # SIGTERM first (a child may clean up), then SIGKILL ORPHAN_TERM_GRACE_SECONDS later.
    stubborn = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + CHILD
    _kill_the_orchestrator_mid_run(tmp_path, "sync", "tempfile", "tempfile", stubborn)


def _kill_the_orchestrator_mid_run(tmp_path: Path, mode: str, context: str, messages: str, child_source: str) -> None:
    temp = tmp_path / "tmp"  # TMPDIR of the orchestrator: where its tempfile channels create their dirs
    temp.mkdir()
    path_dir = tmp_path / "paths"  # the file channels' paths
    path_dir.mkdir()
    child = tmp_path / "child.py"
    child.write_text(child_source, encoding="utf-8")
    reaper = tmp_path / "reaper.py"
    reaper.write_text(REAPER, encoding="utf-8")
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, str(reaper), *_orchestrator(mode, context, messages, path_dir, child,
                                                                       tmp_path)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT, start_new_session=True)
    pgid = 0
    try:
        lines = _lines(proc.stdout)
        orchestrator = int(_next_line(lines, "orchestrator "))
        ready = json.loads(_next_line(lines, "READY "))
        pgid = ready["pgid"]
        assert pgid == ready["pid"] != orchestrator  # the child leads its own group, apart from the orchestrator
        assert _group_exists(pgid)
        held = sorted(p.name for p in [*temp.iterdir(), *path_dir.iterdir()])
        assert held, "the run holds files while it runs"

        os.kill(orchestrator, signal.SIGKILL)

        # The reaper exits only once every descendant has ended: orchestrator, child, grandchild and guard.
        assert proc.wait(timeout=GONE_SECONDS) == 0
        assert not _group_exists(pgid)
        assert list(temp.iterdir()) == []  # no context or messages temp dir
        assert list(path_dir.iterdir()) == []  # no context or messages file
    finally:
        for group in (pgid, proc.pid):
            if group:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=GONE_SECONDS)
        if proc.stdout is not None:
            proc.stdout.close()


OPENS_THEN_LOGS = """
from pipes_ext import open_pipes
with open_pipes() as pipes:
    pipes.log.info("after opened")
"""


@pytest.mark.parametrize("channel", ["tempfile", "file"])
def test_the_context_file_is_removed_once_the_process_has_opened_the_channel(
        tmp_path: Path, write_script: object, channel: str) -> None:
    # The process reads its context before it sends opened: from then on nobody needs the file (it may hold
    # secrets in its extras). Seen from the first event after opened, on the reader's thread.
    child = tmp_path / "child.py"
    child.write_text(OPENS_THEN_LOGS, encoding="utf-8")
    context_dir = tmp_path / "contexts"
    context_dir.mkdir()
    injector = (PipesTempFileContextInjector(dir=str(context_dir)) if channel == "tempfile"
                else PipesFileContextInjector(context_dir / "context.json"))
    seen: list[list[str]] = []

    def on_event(event: object) -> None:
        if isinstance(event, PipesLogEvent):
            seen.append(sorted(str(p.relative_to(context_dir)) for p in context_dir.rglob("*")))

    PipesSubprocessClient(context_injector=injector).run(command=[sys.executable, str(child)],
                                                         extras={"secret": "s3cr3t"}, on_event=on_event)
    if channel == "tempfile":
        assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith("pipes-context-")  # its dir only
    else:
        assert seen == [[]]
    assert list(context_dir.iterdir()) == []  # and the dir at the end of the session


def test_a_durable_client_turns_the_guard_off(tmp_path: Path) -> None:
    # The hook a later "durable run" uses (end_with_orchestrator = False): no guard watches its child.
    class Durable(PipesSubprocessClient):
        end_with_orchestrator = False

    child = tmp_path / "child.py"
    child.write_text(OPENS_THEN_LOGS, encoding="utf-8")
    guarded: list[bool] = []
    for client in (PipesSubprocessClient(), Durable()):
        client.run(command=[sys.executable, str(child)],
                   on_launched=lambda process: guarded.append(process._guard is not None))  # type: ignore[attr-defined]
    assert guarded == [True, False]
