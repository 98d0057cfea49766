"""One validation per parameter, one error vocabulary: every ``PipesProtocolError`` raised carries a kind; Docker,
Ray, Slurm and the local process say why they failed with one set of engine kinds (``PipesEngineErrorKind``),
exposed on the error as ``kind``; ``max_line_bytes`` is checked once, by every reader alike (the Slurm one too),
and lines are cut once."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from pipes_core import (
    PipesEngineErrorKind,
    PipesExecutionError,
    PipesFileMessageReader,
    PipesStdioMessageReader,
    PipesSubprocessClient,
    PipesTempFileMessageReader,
    PipesTimeoutError,
    PipesUsageError,
)
from pipes_core.protocol.handler import PipesMessageHandler
from pipes_core.slurm import (
    SLURM_ERROR_QUERY,
    SLURM_ERROR_REFUSED,
    SLURM_ERROR_SBATCH_MISSING,
    SLURM_ERROR_UNREACHABLE,
    PipesSlurmClient,
    PipesSlurmMessageReader,
    SlurmCommands,
    SlurmJobInfo,
    slurm_exit_status,
)
from tests.conftest import REPO_ROOT
from tests.support.helpers import PYTHON

Kind = PipesEngineErrorKind


def _protocol_error_raises_without_kind() -> list[str]:
    found = []
    for package in ("pipes_core", "pipes_ext", "conformance"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                        "PipesProtocolError" and len(node.args) < 2 and not any(k.arg == "kind" for k in node.keywords):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    return found


def test_every_protocol_error_raised_carries_a_kind() -> None:
    assert _protocol_error_raises_without_kind() == []


def test_the_slurm_error_kinds_are_the_engines_shared_ones() -> None:
    assert (SLURM_ERROR_SBATCH_MISSING, SLURM_ERROR_UNREACHABLE, SLURM_ERROR_REFUSED, SLURM_ERROR_QUERY) == (
        Kind.TOOL_MISSING, Kind.UNREACHABLE, Kind.REFUSED, Kind.QUERY_FAILED)
    assert Kind.OUT_OF_MEMORY == "out_of_memory" and str(Kind.NODE_FAIL) == "node_fail"  # stable strings


@pytest.mark.parametrize(("state", "kind"), [
    ("CANCELLED", Kind.CANCELLED), ("TIMEOUT", Kind.TIMEOUT), ("OUT_OF_MEMORY", Kind.OUT_OF_MEMORY),
    ("NODE_FAIL", Kind.NODE_FAIL), ("BOOT_FAIL", Kind.NODE_FAIL), ("PREEMPTED", Kind.CANCELLED),
    ("DEADLINE", Kind.TIMEOUT),
])
def test_each_slurm_failure_state_has_its_kind(state: str, kind: Kind) -> None:
    assert slurm_exit_status(SlurmJobInfo("12", state)).kind is kind


def test_a_slurm_job_killed_by_a_signal_and_one_that_failed() -> None:
    assert slurm_exit_status(SlurmJobInfo("12", "FAILED", exit_code=0, signal=9)).kind is Kind.KILLED
    assert slurm_exit_status(SlurmJobInfo("12", "FAILED", exit_code=3)).kind is None  # a plain failure


def test_a_missing_sbatch_is_said_with_its_kind(tmp_path: Path) -> None:
    client = PipesSlurmClient(commands=SlurmCommands(sbatch=str(tmp_path / "no-sbatch")), shared_dir=str(tmp_path))
    with pytest.raises(PipesExecutionError) as caught:
        client.run(command=["true"])
    assert caught.value.kind is Kind.TOOL_MISSING


def test_an_unreachable_docker_daemon_is_said_with_its_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("docker")
    from pipes_core.docker import PipesDockerClient

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    with pytest.raises(PipesExecutionError, match="cannot reach the Docker daemon") as caught:
        PipesDockerClient().run(image="busybox", command=["true"])
    assert caught.value.kind is Kind.UNREACHABLE


def test_a_local_process_killed_or_timed_out_has_the_same_kinds(tmp_path: Path) -> None:
    with pytest.raises(PipesExecutionError) as killed:
        PipesSubprocessClient(forward_stdio=False).run(
            command=[PYTHON, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], strict=False)
    assert killed.value.kind is Kind.KILLED
    with pytest.raises(PipesTimeoutError) as late:
        PipesSubprocessClient(forward_stdio=False, termination_timeout_seconds=1).run(
            command=[PYTHON, "-c", "import time; time.sleep(600)"], timeout_seconds=0.5, strict=False)
    assert late.value.kind is Kind.TIMEOUT
    with pytest.raises(PipesExecutionError) as failed:
        PipesSubprocessClient(forward_stdio=False).run(command=[PYTHON, "-c", "raise SystemExit(3)"], strict=False)
    assert failed.value.kind is None  # it simply failed: nothing the engine has to say


# ---------------------------------------------------------------------------------------------- max_line_bytes


@pytest.mark.parametrize("make", [
    lambda bad: PipesFileMessageReader("/tmp/x", max_line_bytes=bad),
    lambda bad: PipesTempFileMessageReader(max_line_bytes=bad),
    lambda bad: PipesStdioMessageReader(max_line_bytes=bad),
    lambda bad: PipesSlurmMessageReader(None, max_line_bytes=bad),  # it was skipped on the Slurm path
], ids=["file", "tempfile", "stdio", "slurm"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_every_reader_refuses_a_bad_max_line_bytes_alike(make: object, bad: object) -> None:
    with pytest.raises(PipesUsageError, match="max_line_bytes must be a positive integer"):
        make(bad)  # type: ignore[operator]


def test_the_handler_no_longer_cuts_lines_the_splitter_did() -> None:
    assert "max_line_bytes" not in inspect.signature(PipesMessageHandler.handle_lines).parameters
