"""The conformance suite for other SDKs' authors: the help shows the ``-- COMMAND`` part, ``--jobs`` defaults to
the CPU count, community mode marks (and runs) what the community suite itself would skip, the community notes say
what that suite really does, and the docs page exists and is linked."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conformance.__main__ import _parser
from conformance._community import COMMUNITY_SKIPS_COMPONENTS, DEVIATIONS, PipesToml, plan_community
from tests.support.helpers import PYTHON
from tests.support.helpers import REPO_ROOT as REPO

HARNESSES = REPO / "conformance" / "harnesses"


def suite(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_PIPES_", "PIPES_CONF"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([PYTHON, "-m", "conformance", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.parametrize("command", ["run", "community"])
def test_help_shows_the_command_part(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPES_CONFORMANCE_JOBS", raising=False)
    proc = suite(command, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: python -m conformance {command} [OPTIONS] -- COMMAND [ARG]...")
    assert "COMMAND [ARG]... (after --)" in " ".join(proc.stdout.split())
    assert f"(default {os.cpu_count()})" in " ".join(proc.stdout.split())  # --jobs


def test_jobs_default_to_the_number_of_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPES_CONFORMANCE_JOBS", raising=False)
    for command in ("run", "community"):
        assert _parser().parse_args([command]).jobs == os.cpu_count()
    monkeypatch.setenv("PIPES_CONFORMANCE_JOBS", "8")  # what the project's own tests use
    assert _parser().parse_args(["run"]).jobs == 8


def test_community_plan_marks_what_that_suite_would_skip_when_s3_is_off() -> None:
    flags = {**PipesToml().flags, "message_channel.s3": False}
    runs = plan_community(PipesToml(flags=flags))
    components = [r for r in runs if r.test.name == "test_components"]
    assert len(components) == 30
    on_s3 = [r for r in components if "s3" in (r.combo.context, r.combo.messages)]
    assert len(on_s3) == 20 and all(r.skip == "message_channel.s3 is not enabled in pipes.toml" for r in on_s3)
    assert all(r.community_skips is None for r in on_s3)  # skipped here too: nothing to mark
    run_here = [r for r in components if r not in on_s3]
    assert len(run_here) == 10 and all(r.skip is None and r.community_skips == COMMUNITY_SKIPS_COMPONENTS
                                       for r in run_here)
    assert all(r.community_skips is None for r in runs if r.test.name != "test_components")
    with_s3 = plan_community(PipesToml(flags={**flags, "message_channel.s3": True}))
    assert all(r.community_skips is None for r in with_s3)


@pytest.mark.slow
def test_community_report_runs_and_marks_them(tmp_path: Path) -> None:
    toml = tmp_path / "pipes.toml"
    toml.write_text((HARNESSES / "community_pipes.toml").read_text(encoding="utf-8").replace("s3 = true",
                                                                                               "s3 = false"))
    proc = suite("community", "--json", "--pipes-toml", str(toml), "--test", "test_components", "--", PYTHON,
                 str(HARNESSES / "community_harness.py"), "--library", "pipes_ext")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["summary"] == {"passed": 10, "failed": 0, "skipped": 20}
    passed = [r for r in report["results"] if r["status"] == "pass"]
    assert all(r["reason"] == f"[{COMMUNITY_SKIPS_COMPONENTS}]" for r in passed)
    assert {(r["context"], r["messages"]) for r in passed} == {("env", "default"), ("tempfile", "default")}
    assert (f"10 run(s) that the community suite itself would skip for this pipes.toml were run anyway and are "
            f"marked in their row: {COMMUNITY_SKIPS_COMPONENTS}") in report["notes"]
    text = suite("community", "--pipes-toml", str(toml), "--test", "test_components", "--", PYTHON,
                 str(HARNESSES / "community_harness.py"), "--library", "pipes_ext").stdout
    assert text.count("[the community suite would skip this run") == 10


def test_the_extras_note_is_gone_from_code_and_docs() -> None:
    wrong = "sends no extras"
    assert not [d for d in DEVIATIONS if wrong in d]
    for path in (REPO / "README.md", REPO / "conformance" / "README.md", REPO / "conformance" / "_community.py"):
        assert wrong not in path.read_text(encoding="utf-8"), path


def test_the_sdk_authors_page_exists_and_is_linked() -> None:
    page = (REPO / "docs" / "sdk-authors.md").read_text(encoding="utf-8")
    for topic in ("Write a harness", "capabilities file", "Read the report", "python -m conformance schema",
                  "-- COMMAND [ARG]..."):
        assert topic in page, topic
    # the README's map of the docs and the site's conformance page both lead to it
    assert "(docs/sdk-authors.md)" in (REPO / "README.md").read_text(encoding="utf-8")
    assert "(sdk-authors.md)" in (REPO / "docs" / "conformance.md").read_text(encoding="utf-8")
    # the suite's README is a page of the site (docs/conformance-harness.md includes it): links keep its anchors
    for link in ("conformance-harness.md#the-harness-contract", "conformance-harness.md#community-mode"):
        anchor = link.split("#")[1]
        assert link in page
        headings = [line.lstrip("#").strip().lower().replace(" ", "-")
                    for line in (REPO / "conformance" / "README.md").read_text(encoding="utf-8").splitlines()
                    if line.startswith("#")]
        assert anchor in headings
