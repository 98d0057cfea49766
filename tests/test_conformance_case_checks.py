"""Conformance suite, round two: literals the protocol fixes are checked in every message, an undeclared
``log_external_stream`` fails only its own case, failed runs show why in the text report, and the community mode
drives harnesses written for the community ``dagster-pipes-tests`` suite (ours for pipes_ext and dagster-pipes,
and a deliberately broken one), with pipes_core as the orchestrator.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conformance._capabilities import CapabilitiesError
from conformance._community import TESTS, load_pipes_toml, plan_community
from tests.support.helpers import PYTHON
from tests.support.helpers import REPO_ROOT as REPO

HARNESSES = REPO / "conformance" / "harnesses"
EXT_HARNESS = [PYTHON, str(HARNESSES / "pipes_ext_harness.py")]
COMMUNITY_HARNESS = str(HARNESSES / "community_harness.py")
COMMUNITY_TOML = str(HARNESSES / "community_pipes.toml")


def suite_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    for name in ("PYTHONUNBUFFERED", "PIPES_CONFORMANCE_BLOB_STORE", "PIPES_CONFIG_PATH"):
        env.pop(name, None)
    return env


def run_suite(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "conformance", *args], cwd=cwd, env={**suite_env(), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout, check=False)


def write_caps(tmp_path: Path, features: list[str]) -> str:
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"context_channels": ["env"], "message_channels": ["file"], "features": features}),
                    encoding="utf-8")
    return str(path)


def patched_harness(tmp_path: Path, patch: str) -> list[str]:
    """The pipes_ext harness with ``patch`` applied to pipes_ext first (one deliberate deviation)."""
    script = tmp_path / "deviating_harness.py"
    script.write_text("\n".join([
        "import runpy, sys",
        "import pipes_ext._protocol as protocol",
        "import pipes_ext._context as context_module",
        textwrap.dedent(patch).strip(),
        f"sys.argv = [{str(HARNESSES / 'pipes_ext_harness.py')!r}]",
        "runpy.run_path(sys.argv[0], run_name='__main__')",
    ]) + "\n", encoding="utf-8")
    return [PYTHON, str(script)]


CHANNEL_SKIPS = ("bootstrap ", "context channel ", "message channel ")


def by_case(report: dict[str, Any]) -> dict[str, Counter[str]]:
    """Statuses per case, leaving out the runs on channels the capabilities file does not declare."""
    counts: dict[str, Counter[str]] = {}
    for r in report["results"]:
        if r["status"] == "skip" and r["reason"].startswith(CHANNEL_SKIPS):
            continue
        counts.setdefault(r["case"], Counter())[r["status"]] += 1
    return counts


# ---------------------------------------------------------------------------------------------- literals


def test_a_harness_sending_another_protocol_version_fails_every_case(tmp_path: Path) -> None:
    harness = patched_harness(tmp_path, """
        protocol._LINE_PREFIX = protocol._LINE_PREFIX.replace('"0.1"', '"0.2"')
        protocol._CUSTOM_MESSAGE_PREFIX = protocol._CUSTOM_MESSAGE_PREFIX.replace('"0.1"', '"0.2"')
    """)
    proc = run_suite("run", "--json", "--capabilities", write_caps(tmp_path, []), "--case", "opened_closed",
                     "--case", "every_method", "--case", "custom_payloads", "--", *harness)
    report = json.loads(proc.stdout)
    ran = [r for r in report["results"] if r["status"] != "skip"]
    assert ran and all(r["status"] == "fail" for r in ran), ran
    assert all("'0.2'" in r["reason"] for r in ran), [r["reason"] for r in ran]
    assert proc.returncode == 1


def test_a_harness_sending_lower_case_level_names_fails_the_cases_that_log(tmp_path: Path) -> None:
    harness = patched_harness(tmp_path, """
        real = context_module._level_name
        context_module._level_name = lambda levelno, levelname: real(levelno, levelname).lower()
    """)
    proc = run_suite("run", "--json", "--capabilities", write_caps(tmp_path, []), "--case", "log_levels",
                     "--case", "custom_payloads", "--", *harness)
    report = json.loads(proc.stdout)
    failed = [r for r in report["results"] if r["status"] == "fail"]
    assert [r["case"] for r in failed] == ["log_levels"]
    assert "wire literal (5 in all): message 1 (log) has level 'debug'" in failed[0]["reason"], failed[0]["reason"]
    assert by_case(report)["custom_payloads"] == Counter({"pass": 1})


# ---------------------------------------------------------------------------------------------- external_stream


def test_a_harness_without_external_stream_fails_only_that_case(tmp_path: Path) -> None:
    # As the TypeScript implementation: log_external_stream does not exist, so the harness dies on a stream step.
    harness = patched_harness(tmp_path, """
        def missing(self, *args, **kwargs):
            raise AttributeError("log_external_stream is not implemented")
        context_module.PipesContext.log_external_stream = missing
    """)
    cases = ["--case", "every_method", "--case", "external_stream", "--case", "non_ascii"]
    declared = run_suite("run", "--json", "--capabilities", write_caps(tmp_path, ["external_stream"]), *cases,
                         "--", *harness)
    undeclared = run_suite("run", "--json", "--capabilities", write_caps(tmp_path, []), *cases, "--", *harness)
    # Declaring a feature it lacks fails all three; not declaring it skips only the case about it.
    assert by_case(json.loads(declared.stdout)) == {c: Counter({"fail": 1}) for c in
                                                    ("every_method", "external_stream", "non_ascii")}
    report = json.loads(undeclared.stdout)
    # (every combination of the case is skipped for the feature, the undeclared channels included)
    assert by_case(report) == {"every_method": Counter({"pass": 1}), "external_stream": Counter({"skip": 5}),
                               "non_ascii": Counter({"pass": 1})}
    assert {r["reason"] for r in report["results"] if r["case"] == "external_stream"} == {
        "feature external_stream not declared"}
    assert undeclared.returncode == 0


# ---------------------------------------------------------------------------------------------- text report


def test_the_text_report_says_why_a_failed_run_failed(tmp_path: Path) -> None:
    crash = [PYTHON, "-c", "import sys; sys.stderr.write('first\\nImportError: no module named pipes\\n'); sys.exit(3)"]
    proc = run_suite("run", "--capabilities", write_caps(tmp_path, []), "--case", "custom_payloads", "--", *crash)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if " FAIL " in line)
    assert "the harness never sent opened" in lines[row]
    assert lines[row + 1].strip() == "exit code 3; stderr: first / ImportError: no module named pipes"


# ---------------------------------------------------------------------------------------------- community mode


def test_pipes_toml_defaults_flags_and_errors(tmp_path: Path) -> None:
    defaults = load_pipes_toml(None, environ={})
    assert defaults.enabled("messages.log") and not defaults.enabled("general.error_reporting")
    assert not defaults.enabled("message_channel.s3")
    path = tmp_path / "impl" / "pipes.toml"
    path.parent.mkdir()
    path.write_text('[general]\nerror_reporting = true\n[messages]\nlog = false\nfuture_thing = true\n'
                    '[extra]\nx = 1\n', encoding="utf-8")
    toml = load_pipes_toml(None, environ={"PIPES_CONFIG_PATH": str(path)})
    assert toml.name == "impl" and toml.enabled("general.error_reporting") and not toml.enabled("messages.log")
    assert toml.ignored == ("messages.future_thing", "extra")
    runs = plan_community(toml)
    assert len(runs) == 30 + 10 + 1 + 1 + 9 + 4 + 8
    skips = Counter(r.skip for r in runs if r.skip)
    assert skips == {"message_channel.s3 is not enabled in pipes.toml": 20,  # 5 extras x 4 combinations with S3
                     "messages.log is not enabled in pipes.toml": 1}
    path.write_text("[messages]\nlog = 'yes'\n", encoding="utf-8")
    with pytest.raises(CapabilitiesError, match=r"messages\.log must be true or false"):
        load_pipes_toml(path)
    path.write_text("[messages\n", encoding="utf-8")
    with pytest.raises(CapabilitiesError, match="not valid TOML"):
        load_pipes_toml(path)


def community(library: str, *extra: str, harness: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = harness or [PYTHON, COMMUNITY_HARNESS, "--library", library]
    return run_suite("community", "--json", "--pipes-toml", COMMUNITY_TOML, *extra, "--", *command)


@pytest.mark.parametrize("library", ["pipes_ext", "dagster_pipes"])
def test_community_harness_passes_every_test_of_the_contract(library: str) -> None:
    proc = community(library)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["summary"] == {"passed": 63, "failed": 0, "skipped": 0}
    counts = by_case(report)
    assert {name: sum(c.values()) for name, c in counts.items()} == {
        "test_components": 30, "test_extras": 10, "test_error_reporting": 1, "test_message_log": 1,
        "test_message_report_custom_message": 9, "test_message_report_asset_materialization": 4,
        "test_message_report_asset_check": 8}
    assert [c["name"] for c in report["cases"]] == [t.name for t in TESTS]
    assert any("judged differently from the community suite" in note for note in report["notes"])


BROKEN_COMMUNITY = """
import sys
sys.path.insert(0, {harnesses!r})
import pipes_ext
import community_harness

real_open = pipes_ext.open_dagster_pipes
test = sys.argv[sys.argv.index("--test-name") + 1]


class Broken:
    # One deviation per test, each of the kind the community contract exists to catch.
    def __init__(self, context):
        self._context = context

    def __getattr__(self, name):
        return getattr(self._context, name)

    def __enter__(self):
        self._context.__enter__()
        return self

    def __exit__(self, *exc_info):
        if test == "test_error_reporting" and exc_info[0] is not None:
            self._context.__exit__(None, None, None)  # swallows the error: closed without it, exit 0
            return True
        return self._context.__exit__(*exc_info)

    def report_custom_message(self, payload):
        if payload == "Hello from external process!":
            payload = "Hello from external process"
        elif isinstance(payload, str):
            payload = [payload]
        self._context.report_custom_message(payload)

    def report_asset_materialization(self, metadata=None, data_version=None, asset_key=None):
        self._context.report_asset_materialization(metadata=metadata, asset_key=asset_key)

    def report_asset_check(self, check_name, passed, severity="ERROR", metadata=None, asset_key=None):
        self._context.report_asset_check(check_name, passed, severity="ERROR", metadata=metadata, asset_key=asset_key)

    @property
    def log(self):
        real = self._context.log

        class Log:
            def __getattr__(self, name):
                return (lambda message: None) if name == "critical" else getattr(real, name)

        return Log()


pipes_ext.open_dagster_pipes = lambda **kwargs: Broken(real_open(**kwargs))
community_harness.main(sys.argv[1:])
"""


def test_a_broken_community_harness_fails_where_it_deviates(tmp_path: Path) -> None:
    script = tmp_path / "broken_community_harness.py"
    script.write_text(textwrap.dedent(BROKEN_COMMUNITY.format(harnesses=str(HARNESSES))), encoding="utf-8")
    proc = community("pipes_ext", harness=[PYTHON, str(script), "--library", "pipes_ext"])
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    failed: dict[str, list[str]] = {}
    for r in report["results"]:
        if r["status"] == "fail":
            failed.setdefault(r["case"], []).append(r["reason"])
    assert {name: len(reasons) for name, reasons in failed.items()} == {
        "test_components": 30, "test_error_reporting": 1, "test_message_log": 1,
        "test_message_report_custom_message": 1, "test_message_report_asset_materialization": 2,
        "test_message_report_asset_check": 4}
    assert failed["test_components"][0].startswith(
        "expected exactly one custom message 'Hello from external process!'; got ['Hello from external process']")
    assert failed["test_error_reporting"] == ["the run succeeded; expected it to fail (non-zero exit code)"]
    assert failed["test_message_log"][0].startswith("log message(s) missing: CRITICAL 'Critical message'")
    assert failed["test_message_report_custom_message"] == [
        "custom_messages[-1]: expected string 'foo', got array ['foo']"]
    assert set(failed["test_message_report_asset_materialization"]) == {"data_version is None; expected 'alpha'"}
    assert set(failed["test_message_report_asset_check"]) == {"check.severity is 'ERROR'; expected 'WARN'"}
    assert report["summary"] == {"passed": 63 - 39, "failed": 39, "skipped": 0}


def test_community_usage_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "pipes.toml"
    bad.write_text("[general]\nerror_reporting = 1\n", encoding="utf-8")
    proc = run_suite("community", "--pipes-toml", str(bad), "--", PYTHON, COMMUNITY_HARNESS)
    assert proc.returncode == 2 and "general.error_reporting must be true or false" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_suite("community", "--test", "no_such_test", "--", PYTHON, COMMUNITY_HARNESS)
    assert proc.returncode == 2 and "no test matches no_such_test" in proc.stderr
    proc = run_suite("community", "--timeout", "nan", "--", PYTHON, COMMUNITY_HARNESS)
    assert proc.returncode == 2 and "--timeout must be a positive number" in proc.stderr
