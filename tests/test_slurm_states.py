"""Slurm job states and how they map to a run's verdict.

TIMEOUT_TEXT was printed by the real ``scontrol show job`` of Slurm 22.05 on the one-node cluster of
tests/support/engines_slurm.py (a TIMEOUT takes a 75 s job there, too slow for the suite; trimmed, and its paths given
spaces); the other states are written in the same format (OUT_OF_MEMORY needs a cgroup memory limit that the
shared machine's set-up cannot give). COMPLETED, FAILED, CANCELLED and NODE_FAIL also run for real in
tests/test_slurm_client.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from pipes_core import PipesRunContext, PipesTempFileContextInjector, open_pipes_session
from pipes_core.slurm import (
    SLURM_ERROR_QUERY,
    PipesSlurmError,
    SlurmCommands,
    SlurmJobInfo,
    _merge_export,
    _option_names,
    _script_option_names,
    _SlurmJob,
    parse_sacct_line,
    parse_scontrol_job,
    slurm_exit_status,
)
from tests.support.engines_slurm import SlurmCluster

TIMEOUT_TEXT = """JobId=15 JobName=wrap
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   JobState=TIMEOUT Reason=TimeLimit Dependency=(null)
   Requeue=0 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15
   RunTime=00:01:15 TimeLimit=00:01:00 TimeMin=N/A
   NodeList=vm
   Command=(null)
   WorkDir=/tmp/a dir with spaces
   StdErr=/tmp/a dir with spaces/to.out
   StdIn=/dev/null
   StdOut=/tmp/a dir with spaces/to.out
   Power=
"""


def _info(text: str) -> SlurmJobInfo:
    from pipes_core.slurm import _info_from_scontrol

    return _info_from_scontrol("15", text)


def _state_text(state: str, reason: str = "None", exit_code: str = "0:0") -> str:
    return f"JobId=15 JobName=wrap\n   JobState={state} Reason={reason} Dependency=(null)\n   ExitCode={exit_code}\n"


def test_scontrol_fields_keep_paths_with_spaces() -> None:
    fields = parse_scontrol_job(TIMEOUT_TEXT)
    assert fields["JobState"] == "TIMEOUT" and fields["ExitCode"] == "0:15" and fields["NodeList"] == "vm"
    assert fields["StdOut"] == "/tmp/a dir with spaces/to.out"
    assert fields["WorkDir"] == "/tmp/a dir with spaces"
    info = _info(TIMEOUT_TEXT)
    assert info.stdout_path == info.stderr_path == "/tmp/a dir with spaces/to.out"
    assert info.ended and not info.pending


@pytest.mark.parametrize(("text", "exit_code", "killed", "words"), [
    (_state_text("COMPLETED"), 0, False, ""),
    (_state_text("FAILED", "NonZeroExitCode", "3:0"), 3, False, "job state FAILED, reason: NonZeroExitCode"),
    (_state_text("FAILED", "JobLaunchFailure", "0:9"), -9, True, "was killed by SIGKILL (job state FAILED"),
    (_state_text("FAILED", "JobLaunchFailure", "0:0"), None, False, "failed without an exit code"),
    (TIMEOUT_TEXT, -15, True, "ran past its Slurm time limit (job state TIMEOUT, reason: TimeLimit"),
    (_state_text("OUT_OF_MEMORY", "OutOfMemory", "0:125"), -125, True, "ran out of memory (job state OUT_OF_MEMORY"),
    (_state_text("NODE_FAIL", "NodeDown", "0:15"), -15, True, "lost its node (node failure) (job state NODE_FAIL"),
    (_state_text("CANCELLED", "None", "0:15"), -15, True, "was cancelled (job state CANCELLED, signal SIGTERM)"),
    (_state_text("CANCELLED", "BeginTime"), None, True, "was cancelled (job state CANCELLED, reason: BeginTime)"),
    (_state_text("PREEMPTED"), None, True, "was preempted"),
    (_state_text("BOOT_FAIL"), None, True, "failed to boot"),
    (_state_text("DEADLINE"), None, True, "missed its deadline"),
    (_state_text("SOMETHING_NEW"), None, True, "ended (job state SOMETHING_NEW)"),
])
def test_each_ended_state_maps_to_an_exit_status(text: str, exit_code: int | None, killed: bool, words: str) -> None:
    status = slurm_exit_status(_info(text))
    assert status.exit_code == exit_code and status.killed == killed
    assert words in status.description


@pytest.mark.parametrize("state", ["PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                                   "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"])
def test_states_of_a_job_that_has_not_ended(state: str) -> None:
    assert not _info(_state_text(state)).ended


def test_state_flags_and_cancelled_by_are_reduced_to_the_base_state() -> None:
    assert _info(_state_text("COMPLETING+")).state == "COMPLETING"
    line = "15|CANCELLED by 0|0:15|None\n15.batch|CANCELLED|0:15|\n"
    info = parse_sacct_line("15", line)
    assert info is not None and info.state == "CANCELLED" and info.signal == 15 and info.source == "sacct"
    assert info.stdout_path is None and info.reason == ""
    assert parse_sacct_line("16", line) is None
    assert parse_sacct_line("15", "") is None
    assert parse_sacct_line("15", "garbage without separators") is None


def test_garbage_from_scontrol_gives_an_unknown_state_not_a_crash() -> None:
    info = _info("not what scontrol prints\n\x00\xff= =x")
    assert info.state == "UNKNOWN" and info.ended  # an unknown state is judged, never waited on forever
    assert slurm_exit_status(info).exit_code is None
    assert _info(_state_text("FAILED", exit_code="x:y")).exit_code is None


def test_our_names_join_a_users_export_and_plain_all_is_the_default() -> None:
    names = ["DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"]
    assert _merge_export(["-p", "debug"], names) == ["-p", "debug", "--export=ALL"]
    assert _merge_export(["--export=NONE"], names) == ["--export=NONE,DAGSTER_PIPES_CONTEXT,DAGSTER_PIPES_MESSAGES"]
    assert _merge_export(["--export", "PATH,HOME"], names) == [
        "--export", "PATH,HOME,DAGSTER_PIPES_CONTEXT,DAGSTER_PIPES_MESSAGES"]


def test_options_are_found_on_the_command_line_and_in_sbatch_lines(tmp_path: Path) -> None:
    assert _option_names(["-o", "x", "--error=y", "--requeue", "plain"]) == {"o", "error", "requeue"}
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#SBATCH --output=a.out  # a comment\n#SBATCH -e b.err\n\n"
                      "echo hi\n#SBATCH --requeue\n")
    assert _script_option_names(str(script)) == {"output", "e"}  # lines after the first command do not count
    assert _script_option_names(str(tmp_path / "missing.sh")) == set()
    script.write_text("#!/bin/sh\n#SBATCH --output='unbalanced\n")
    assert _script_option_names(str(script)) == set()  # an unparsable line is Slurm's to refuse, not ours


def test_a_job_the_cluster_does_not_know_is_a_query_failure_after_the_grace(
        slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # scontrol says "Invalid job id", sacct says accounting is disabled (no slurmdbd here): the first failure is
    # a warning and the query retried; once the grace has passed it is an error naming the job.
    from pipes_core import slurm
    from pipes_core.slurm import PipesSlurmMessageReader

    commands = SlurmCommands(slurm_conf=str(slurm_cluster.conf))
    with open_pipes_session(PipesRunContext(), PipesTempFileContextInjector(), PipesSlurmMessageReader(tmp_path)) as s:
        job = _SlurmJob(commands, "999999", "nothing", session=s, output_paths={"stdout": None, "stderr": None},
                        own_dir=None, poll_min_seconds=0.01, poll_max_seconds=0.01, pending_warning_seconds=None,
                        on_job_state=None)
        with caplog.at_level(logging.WARNING, logger="pipes_core"):
            assert job.query() is None
        assert any("accounting storage is disabled" in r.getMessage() for r in caplog.records)
        monkeypatch.setattr(slurm, "QUERY_FAILURE_GRACE_SECONDS", 0.0)
        with pytest.raises(PipesSlurmError) as caught:
            job.query()
        assert caught.value.kind == SLURM_ERROR_QUERY and caught.value.job_id == "999999"
        assert "scancel 999999" in str(caught.value)
        assert not job.ended_event.is_set()
        job.close()


def _inotify_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count inotify descriptors")
@pytest.mark.parametrize("use_inotify", [False, True])
def test_the_file_reader_sees_another_writer_with_inotify_off(tmp_path: Path, use_inotify: bool) -> None:
    # A writer this process does not wake the reader for (as a job on another host writing to NFS): every
    # message still arrives, in order, by the reader's own polling; with use_inotify=False no watch is made.
    from pipes_core import PipesFileMessageReader

    path = tmp_path / "messages"
    seen: list[object] = []
    before = _inotify_fds()
    got_all = threading.Event()

    def on_event(event: object) -> None:
        seen.append(getattr(event, "payload", None))
        if len(seen) == 500:
            got_all.set()

    with open_pipes_session(PipesRunContext(), PipesTempFileContextInjector(),
                            PipesFileMessageReader(path, use_inotify=use_inotify), on_event=on_event):
        if not use_inotify:  # (with inotify, readers share one inotify descriptor that may already exist)
            assert _inotify_fds() == before
        with open(path, "a", encoding="utf-8") as writer:
            for i in range(500):
                writer.write(json.dumps({"__dagster_pipes_version": "0.1", "method": "report_custom_message",
                                         "params": {"payload": i}}) + "\n")
                writer.flush()
            assert got_all.wait(30)  # arrived while the session runs, not only in the final drain
    assert seen == list(range(500))


def test_a_missing_scontrol_is_a_query_error_at_once(tmp_path: Path) -> None:
    from pipes_core.slurm import PipesSlurmMessageReader

    commands = SlurmCommands(scontrol=str(tmp_path / "no-scontrol"))
    with open_pipes_session(PipesRunContext(), PipesTempFileContextInjector(), PipesSlurmMessageReader(tmp_path)) as s:
        job = _SlurmJob(commands, "7", "nothing", session=s, output_paths={"stdout": None, "stderr": None},
                        own_dir=None, poll_min_seconds=0.01, poll_max_seconds=0.01, pending_warning_seconds=None,
                        on_job_state=None)
        with pytest.raises(PipesSlurmError) as caught:
            job.query()
        job.close()
    assert caught.value.kind == SLURM_ERROR_QUERY and "no-scontrol" in str(caught.value)
    assert "scancel 7" in str(caught.value)
