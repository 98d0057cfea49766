"""The conformance suite (``python -m conformance``) as real processes: the two reference runs (the pipes_ext
harness passes everywhere it declares; the dagster-pipes harness fails exactly on the deviations documented in
conformance/README.md), detection of a harness that never opens, --case, --json, --junit, exit codes, and
deliberately broken harnesses to show that each kind of check can fail. Blob-store channels run against the
local servers the suite starts itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.__main__ import select_cases
from conformance._capabilities import Capabilities, CapabilitiesError, load_capabilities
from conformance._cases import CASES
from conformance._compare import first_difference
from tests.support.helpers import PYTHON
from tests.support.helpers import REPO_ROOT as REPO

HARNESSES = REPO / "conformance" / "harnesses"
README = REPO / "conformance" / "README.md"
EXT_HARNESS = [PYTHON, str(HARNESSES / "pipes_ext_harness.py")]
DAGSTER_HARNESS = [PYTHON, str(HARNESSES / "dagster_pipes_harness.py")]
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$")
# The only reasons a declared combination may be skipped (documented per case).
EXPECTED_SKIPS = ("two blob stores in one run", "blob-store writers buffer", "stdio capture needs")


def suite_env() -> dict[str, str]:
    """The suite's environment: no Pipes bootstrap, and Python's default (buffered) stdout for the harnesses, so
    a missing flush shows as it would in production."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    env.pop("PYTHONUNBUFFERED", None)
    env.pop("PIPES_CONFORMANCE_BLOB_STORE", None)
    return env


def suite_args(*args: str) -> list[str]:
    return [PYTHON, "-m", "conformance", *args]


def run_suite(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(suite_args(*args), cwd=REPO, env=suite_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


class Reference:
    """One reference run (--json and --junit), started in the background when the module's tests start."""

    def __init__(self, tmp: Path, name: str, capabilities: str, harness: list[str]) -> None:
        self.junit_path = tmp / f"{name}.xml"
        self.process = subprocess.Popen(
            suite_args("run", "--json", "--junit", str(self.junit_path), "--capabilities",
                       str(HARNESSES / capabilities), "--", *harness),
            cwd=REPO, env=suite_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._done: tuple[int, str, str] | None = None

    def wait(self) -> tuple[int, dict[str, Any], ET.Element]:
        if self._done is None:
            stdout, stderr = self.process.communicate(timeout=600)
            self._done = (self.process.returncode, stdout, stderr)
        code, stdout, stderr = self._done
        assert stdout, f"no report on stdout; stderr: {stderr[-3000:]}"
        return code, json.loads(stdout), ET.parse(self.junit_path).getroot()


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Reference]]:
    tmp = tmp_path_factory.mktemp("reference")
    # One after the other: on a small machine two suites at once are slower than in turn.
    ext = Reference(tmp, "pipes_ext", "pipes_ext.json", EXT_HARNESS)
    ext.wait()
    dagster = Reference(tmp, "dagster_pipes", "dagster_pipes.json", DAGSTER_HARNESS)
    yield {"pipes_ext": ext, "dagster-pipes": dagster}
    for ref in (ext, dagster):
        if ref.process.poll() is None:
            ref.process.kill()
            ref.process.wait()


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n")
    rest = text[start + len(title) + 2:]
    end = re.search(r"\n#{2,3} ", rest)
    return rest[: end.start()] if end else rest


def table_rows(section: str) -> list[list[str]]:
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def documented_deviations() -> dict[tuple[str, str], str]:
    """(case, bootstrap/context/messages) -> the text the suite must report, from the README's table."""
    found: dict[tuple[str, str], str] = {}
    for case, runs, shows, _why in table_rows(readme_section("### dagster-pipes deviations")):
        for run in runs.split(","):
            found[(case.strip("`"), run.strip().strip("`"))] = shows.strip("`")
    return found


def results_by_status(report: dict[str, Any], status: str) -> list[dict[str, Any]]:
    return [r for r in report["results"] if r["status"] == status]


def label(result: dict[str, Any]) -> str:
    return f"{result['bootstrap']}/{result['context']}/{result['messages']}"


# ---------------------------------------------------------------------------------------------- listing


def test_list_prints_every_case_once_with_its_description() -> None:
    proc = run_suite("list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [c.name for c in CASES]
    for line, case in zip(lines, CASES, strict=True):
        assert line.split(None, 2)[1] == case.scope
        assert line.rstrip().endswith(case.description)
    listed = json.loads(run_suite("list", "--json").stdout)
    assert [c["name"] for c in listed] == [c.name for c in CASES]
    assert len({c.name for c in CASES}) == len(CASES) == 23


def test_readme_case_table_is_the_case_list() -> None:
    rows = table_rows(readme_section("## Cases"))
    assert [(r[0].strip("`"), r[1], r[3]) for r in rows] == [(c.name, c.scope, c.description) for c in CASES]


# ---------------------------------------------------------------------------------------------- reference runs


def test_pipes_ext_passes_every_case_over_every_channel_it_declares(references: dict[str, Reference]) -> None:
    code, report, _ = references["pipes_ext"].wait()
    failed = results_by_status(report, "fail")
    assert failed == [], [f"{r['case']} {label(r)}: {r['reason']}" for r in failed]
    assert code == 0
    passed = results_by_status(report, "pass")
    assert report["summary"] == {"passed": len(passed), "failed": 0,
                                 "skipped": len(results_by_status(report, "skip"))}
    # Nothing was skipped for want of a server or a declaration: only the documented exclusions.
    for skipped in results_by_status(report, "skip"):
        assert skipped["reason"].startswith(EXPECTED_SKIPS), skipped
    # Every case passed somewhere, and every declared value of every axis was used by a passing run.
    assert {r["case"] for r in passed} == {c.name for c in CASES}
    caps = report["harness"]["capabilities"]
    assert {r["bootstrap"] for r in passed} == set(caps["bootstrap"]) == {"env", "cli"}
    assert {r["context"] for r in passed} == set(caps["context_channels"]) == {"env", "file", "s3", "gcs", "azure"}
    assert {r["messages"] for r in passed} == set(caps["message_channels"]) == {
        "file", "stdio", "s3", "gcs", "azure"}
    # Per scope: the full matrix minus mixed stores; the context cases over 2 x 5; the message cases over 5.
    per_case = Counter(r["case"] for r in passed)
    assert per_case["opened_closed"] == 2 * (5 * 5 - 6)
    assert all(per_case[c.name] == 10 for c in CASES if c.scope == "context")
    assert per_case["large_payload"] == per_case["many_messages"] == 5
    assert per_case["crash_before_closed"] == 2 and per_case["stdio_capture"] == 4


def test_dagster_pipes_fails_exactly_on_the_documented_deviations(references: dict[str, Reference]) -> None:
    code, report, _ = references["dagster-pipes"].wait()
    assert code == 1
    counts = report["summary"]
    assert counts["failed"] > 0 and counts["passed"] > counts["failed"]
    assert counts == {"passed": len(results_by_status(report, "pass")),
                      "failed": len(results_by_status(report, "fail")),
                      "skipped": len(results_by_status(report, "skip"))}
    documented = documented_deviations()
    failing = {(r["case"], label(r)): r["reason"] for r in results_by_status(report, "fail")}
    assert set(failing) == set(documented), {"undocumented": sorted(set(failing) - set(documented)),
                                             "not failing": sorted(set(documented) - set(failing))}
    for key, reason in failing.items():
        assert documented[key] in reason, (key, reason)
    for skipped in results_by_status(report, "skip"):
        assert skipped["reason"].startswith(EXPECTED_SKIPS), skipped


def test_readme_reference_table_matches_the_runs(references: dict[str, Reference]) -> None:
    section = readme_section("## Reference runs")
    header = next(line for line in section.splitlines() if line.startswith("| case"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {r[0].strip("`"): r for r in table_rows(section) if r[0].startswith("`")}
    assert list(rows) == [c.name for c in CASES]
    for name in ("pipes_ext", "dagster-pipes"):
        _, report, _ = references[name].wait()
        column = columns.index(name)
        for case in CASES:
            got = Counter(r["status"] for r in report["results"] if r["case"] == case.name)
            assert rows[case.name][column] == f"{got['pass']} / {got['fail']} / {got['skip']}", (name, case.name)


def test_json_and_junit_reports_agree(references: dict[str, Reference]) -> None:
    for ref in references.values():
        _, report, junit = ref.wait()
        suite = junit.find("testsuite")
        assert suite is not None
        for element in (junit, suite):
            assert int(element.get("tests", "-1")) == len(report["results"])
            assert int(element.get("failures", "-1")) == report["summary"]["failed"]
            assert int(element.get("skipped", "-1")) == report["summary"]["skipped"]
        cases = suite.findall("testcase")
        assert len(cases) == len(report["results"])
        for element, result in zip(cases, report["results"], strict=True):
            assert element.get("classname") == f"conformance.{result['case']}"
            assert element.get("name") == label(result)
            failure, skipped = element.find("failure"), element.find("skipped")
            if result["status"] == "fail":
                assert failure is not None and failure.get("message") == result["reason"] and skipped is None
            elif result["status"] == "skip":
                assert skipped is not None and skipped.get("message") == result["reason"] and failure is None
            else:
                assert failure is None and skipped is None
        assert [c["name"] for c in report["cases"]] == [c.name for c in CASES]


# ---------------------------------------------------------------------------------------------- never opens


def test_a_harness_that_never_opens_fails_every_run_and_says_so(tmp_path: Path) -> None:
    junit = tmp_path / "never.xml"
    proc = run_suite("run", "--json", "--junit", str(junit), "--", PYTHON, "-c", "pass")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    ran = [r for r in report["results"] if r["status"] != "skip"]
    assert ran and all(r["status"] == "fail" for r in ran)
    assert all(r["reason"] == "the harness never sent opened: no message arrived (exit code 0)" for r in ran), ran
    assert report["summary"] == {"passed": 0, "failed": len(ran), "skipped": len(report["results"]) - len(ran)}
    # Default capabilities: env bootstrap, env and file context, file messages; features-only cases skipped.
    assert {label(r) for r in ran} == {"env/env/file", "env/file/file"}
    assert {r["case"] for r in report["results"] if r["status"] == "skip" and "feature" in r["reason"]} == {
        c.name for c in CASES if c.requires}
    root = ET.parse(junit).getroot()
    assert int(root.get("failures", "-1")) == len(ran)


def test_a_harness_that_dies_before_opening_is_reported_with_its_exit_code_and_stderr() -> None:
    script = "import sys; sys.stderr.write('harness: cannot start\\n'); sys.exit(5)"
    proc = run_suite("run", "--case", "opened_closed", "--", PYTHON, "-c", script)
    assert proc.returncode == 1
    assert ("the harness never sent opened: no message arrived (exit code 5; last stderr line: "
            "'harness: cannot start')") in proc.stdout
    assert proc.stdout.splitlines()[-1] == "0 passed, 2 failed, 48 skipped"


def test_a_hanging_harness_is_killed_at_the_timeout() -> None:
    proc = run_suite("run", "--timeout", "1", "--case", "opened_closed", "--json", "--", PYTHON, "-c",
                     "import time; time.sleep(60)", timeout=60)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    ran = [r for r in report["results"] if r["status"] != "skip"]
    assert len(ran) == 2 and all(r["reason"].startswith("the harness did not exit within 1 s (killed)") for r in ran)
    assert all(r["duration"] < 15 for r in ran)


# ---------------------------------------------------------------------------------------------- options


def test_case_patterns_select_cases() -> None:
    report = json.loads(run_suite("run", "--json", "--case", "context_*", "--case", "log_lev", "--",
                                  *EXT_HARNESS).stdout)
    expected = [c.name for c in CASES if c.name.startswith("context_")] + ["log_levels"]
    assert [c["name"] for c in report["cases"]] == [c.name for c in CASES if c.name in expected]
    assert {r["case"] for r in report["results"]} == set(expected)
    assert report["summary"]["failed"] == 0 and report["summary"]["passed"] == 2 * 5 + 1
    nothing = run_suite("run", "--case", "no_such_case", "--", *EXT_HARNESS)
    assert nothing.returncode == 2 and "no case matches no_such_case" in nothing.stderr


def test_text_report_is_a_table_per_case_and_ends_with_the_summary() -> None:
    proc = run_suite("run", "--case", "every_method", "--case", "error_cause", "--capabilities",
                     str(HARNESSES / "pipes_ext.json"), "--", *EXT_HARNESS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("every_method", "error_cause"):
        case = next(c for c in CASES if c.name == name)
        header = next(i for i, line in enumerate(lines) if line.startswith(f"{name} [messages]: "))
        assert case.description in lines[header]
        assert lines[header + 1].split() == ["bootstrap", "context", "messages", "result", "time", "detail"]
        rows = [line.split() for line in lines[header + 2: header + 7]]
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("env", "env", m, "pass") for m in
                                                           ("file", "stdio", "s3", "gcs", "azure")]
    assert SUMMARY.match(lines[-1]) and lines[-1] == "10 passed, 0 failed, 0 skipped"


def test_a_store_without_its_server_is_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPES_CONFORMANCE_AZURITE", "/nonexistent/azurite/main.js")
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                              if not (Path(p) / "azurite-blob").exists()))
    proc = run_suite("run", "--json", "--case", "every_method", "--capabilities", str(HARNESSES / "pipes_ext.json"),
                     "--", *EXT_HARNESS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    status = {r["messages"]: (r["status"], r["reason"]) for r in report["results"]}
    assert status["azure"] == ("skip", "azure server unavailable: Azurite (node + azurite; or set "
                                       "PIPES_CONFORMANCE_AZURITE to its blob main.js) not installed")
    assert {m for m, (st, _) in status.items() if st == "pass"} == {"file", "stdio", "s3", "gcs"}
    assert report["summary"] == {"passed": 4, "failed": 0, "skipped": 1}


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "caps.json"
    bad.write_text('{"message_channels": ["carrier-pigeon"]}', encoding="utf-8")
    proc = run_suite("run", "--capabilities", str(bad), "--", *EXT_HARNESS)
    assert proc.returncode == 2 and "unknown value(s) ['carrier-pigeon']" in proc.stderr
    proc = run_suite("run", "--case", "opened_closed")
    assert proc.returncode == 2 and "no harness command" in proc.stderr
    proc = run_suite("run", "--", str(tmp_path / "no-such-harness"))
    assert proc.returncode == 2 and "harness command not found" in proc.stderr
    assert run_suite("frobnicate").returncode == 2


def test_capabilities_files() -> None:
    assert load_capabilities(None) == Capabilities("harness", ("env",), ("env", "file"), ("file",), ())
    ext = load_capabilities(HARNESSES / "pipes_ext.json")
    assert ext.context_channels == ("env", "file", "s3", "gcs", "azure") and "stdio_capture" in ext.features
    # Kept in the suite's order, duplicates dropped.
    assert Capabilities.from_mapping({"message_channels": ["s3", "file", "s3"]}).message_channels == ("file", "s3")
    bad: Any
    for bad in ({"bootstrap": []}, {"colour": "blue"}, {"features": "stdio_capture"}, {"name": ""}, []):
        with pytest.raises(CapabilitiesError):
            Capabilities.from_mapping(bad)


def test_toml_capabilities(tmp_path: Path) -> None:
    path = tmp_path / "caps.toml"
    path.write_text('name = "toml-sdk"\nbootstrap = ["cli"]\nmessage_channels = ["stdio"]\n', encoding="utf-8")
    if sys.version_info < (3, 11):
        with pytest.raises(CapabilitiesError, match=r"Python 3\.11"):
            load_capabilities(path)
        return
    caps = load_capabilities(path)
    assert (caps.name, caps.bootstrap, caps.message_channels) == ("toml-sdk", ("cli",), ("stdio",))


def test_first_difference() -> None:
    assert first_difference({"a": [1, 2.0]}, {"a": [1.0, 2]}) is None  # JSON numbers: by value
    assert first_difference(True, 1) == "$: expected boolean True, got number 1"
    assert first_difference({"a": 1}, {"a": 1, "b": 2}) == "$: unexpected key 'b' (value 2)"
    assert first_difference([1, 2], [1]) == "$: expected 2 items, got 1; first missing: 2"
    assert first_difference(["WARNING"], ["INFO"]) == "$[0]: expected 'WARNING', got 'INFO'"
    found = first_difference({"s": "x" * 1000 + "y"}, {"s": "x" * 1000 + "z"})
    assert found is not None and found.startswith("$.s: strings differ at character 1000")
    assert len(found) < 200


# ---------------------------------------------------------------------------------------------- broken harnesses

# Each mutation makes the pipes_ext harness wrong in one way, for one case; the suite must fail that case with
# the reason given (and pass the cases not mutated).
BROKEN = """
import os, sys
sys.path.insert(0, {harnesses!r})
import pipes_ext_harness as harness

original = harness.run_step


def run_step(pipes, step):
    case = pipes.get_extra("conformance")["case"]
    op = step["op"]
    if case == "many_messages" and op == "custom_many":
        for i in range(step["count"]):
            if i != 5000:
                pipes.report_custom_message({{"seq": i}})
        return
    if case == "context_run" and op == "echo_context":
        data = pipes.context_data
        data["retry_number"] += 1
        pipes.report_custom_message({{"context": data}})
        return
    if case == "crash_before_closed" and op == "crash":
        pipes.close()
    if case == "error_cause" and op == "raise":
        raise RuntimeError(step["message"])
    if case == "log_levels" and op == "log" and step["level"] == "WARNING":
        step = dict(step, level="INFO")
    if case == "exit_nonzero" and op == "exit":
        step = dict(step, code=0)
    if case == "stdio_capture" and op == "print" and step["stream"] == "stderr":
        return
    if case == "metadata_types" and op == "materialize":
        step = dict(step, metadata={{k: v for k, v in step["metadata"].items() if k != "url"}})
    return original(pipes, step)


harness.run_step = run_step
if "{case}" == "opened_closed":
    import pipes_ext

    real_open = pipes_ext.open_pipes

    def open_pipes(**kwargs):
        pipes = real_open(**kwargs)
        if pipes.get_extra("conformance")["case"] == "opened_closed":
            pipes.report_custom_message("unasked")
        return pipes

    harness.open_pipes = open_pipes
sys.exit(harness.main())
"""

MUTATIONS = {
    "many_messages": "messages[5000].payload.seq: expected 5000, got 5001",
    "context_run": "messages[0].payload.context.retry_number: expected 3, got 4",
    "crash_before_closed": "closed arrived, but the harness was told to stop without closing",
    "error_cause": "closed.exception.cause is null; expected an exception with message containing 'root cause'",
    "log_levels": "messages[2].level: expected 'WARNING', got 'INFO'",
    "exit_nonzero": "expected exit code 3; got exit code 0",
    "stdio_capture": "stderr capture: 'captured on stderr\\n' not found in the stderr stream messages",
    "metadata_types": "messages[0].metadata: missing key 'url'",
    "opened_closed": "messages: expected 0 items, got 1; first extra: {'method': 'report_custom_message'",
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_a_broken_harness_fails_with_the_first_difference(case: str, tmp_path: Path) -> None:
    script = tmp_path / "broken_harness.py"
    script.write_text(textwrap.dedent(BROKEN.format(harnesses=str(HARNESSES), case=case)), encoding="utf-8")
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"context_channels": ["env"], "message_channels": ["file"],
                                "features": ["stdio_capture", "error_reporting"]}), encoding="utf-8")
    proc = run_suite("run", "--json", "--capabilities", str(caps), "--case", case, "--case", "every_method",
                     "--", PYTHON, str(script))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    failed = results_by_status(report, "fail")
    assert len(failed) == 1 and failed[0]["case"] == case, failed
    assert MUTATIONS[case] in failed[0]["reason"], failed[0]["reason"]
    # The other cases the patterns select (e.g. stdio_capture_separate for "stdio_capture") pass.
    others = {c.name for c in select_cases([case, "every_method"])} - {case}
    assert {r["case"] for r in results_by_status(report, "pass")} == others and "every_method" in others
