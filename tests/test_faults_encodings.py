"""Fault injection: what ``pipes run`` prints in human mode meets an output that is not UTF-8, or text that no
encoding can write (issue 20, items 6 and 7). Human output degrades (what the output's encoding cannot show is
escaped, ``\\xe9``, ``\\u2603``; the summary's rule becomes ASCII) and the exit code is the run's; a lone surrogate
(``\\ud800``) in a log message, a metadata key or a check name is shown escaped and changes no verdict. ``--json``
is ASCII JSON whatever the locale.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, cli_json_events

CLI_SECONDS = 120

# Non-ASCII text (é, ☃) and lone surrogates where the child's own strings are printed.
CHILD = """
import sys
from pipes_ext import open_pipes
with open_pipes() as p:
    p.log.info("caf\\u00e9 \\u2603 bad:\\ud800")
    p.report_asset_materialization(metadata={"k\\ud800ey": "v\\u00e9"}, asset_key="a")
    p.report_asset_check(check_name="c\\ud800heck", passed=sys.argv[1] == "pass", asset_key="a")
    if sys.argv[2] != "0":
        raise SystemExit(int(sys.argv[2]))
"""

# The output encodings of the issue: ASCII and Latin-1 by PYTHONIOENCODING, the C locale without UTF-8 mode.
ENCODINGS = {
    "ascii": ({"PYTHONIOENCODING": "ascii"}, "ascii"),
    "latin-1": ({"PYTHONIOENCODING": "latin-1"}, "latin-1"),
    "C-locale": ({"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}, "ascii"),
    "utf-8": ({"PYTHONIOENCODING": "utf-8"}, "utf-8"),
}


def _pipes(tmp_path: Path, env: dict[str, str], *args: str, verdict: str = "pass",
           exit_code: int = 0) -> subprocess.CompletedProcess[bytes]:
    child = tmp_path / "child.py"
    child.write_text(CHILD, encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "pipes_core", "run", "--asset", "a", *args, "--", sys.executable,
                           str(child), verdict, str(exit_code)], capture_output=True, timeout=CLI_SECONDS,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_human_output_degrades_to_the_output_encoding_and_exits_as_the_run_did(tmp_path: Path, name: str) -> None:
    env, encoding = ENCODINGS[name]
    proc = _pipes(tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert b"internal error" not in proc.stderr
    out = proc.stdout.decode(encoding)  # every byte is in the output's encoding
    lines = out.splitlines()
    assert lines[0] == "[pipes] opened"
    assert lines[1].startswith("[pipes] INFO     caf")
    if encoding == "utf-8":
        assert lines[1].endswith("caf\u00e9 \u2603 bad:\\ud800")
        assert "\u2500\u2500 summary" in out
    else:
        assert lines[1].endswith(("caf\\xe9 \\u2603 bad:\\ud800", "caf\u00e9 \\u2603 bad:\\ud800"))
        assert "-- summary ---" in out
    assert "[pipes] materialized a (k\\ud800ey=" in out
    assert "[pipes] check a:c\\ud800heck passed" in out
    assert "status    succeeded" in out


@pytest.mark.parametrize("name", ["ascii", "C-locale"])
def test_a_failed_run_keeps_its_exit_code_in_a_narrow_encoding(tmp_path: Path, name: str) -> None:
    env, encoding = ENCODINGS[name]
    proc = _pipes(tmp_path, env, exit_code=3)
    assert proc.returncode == 3, proc.stderr
    out = proc.stdout.decode(encoding)
    assert "status    failed (exit 3)" in out
    assert b"internal error" not in proc.stderr


def test_a_lone_surrogate_changes_no_verdict(tmp_path: Path) -> None:
    # The check named with a surrogate fails: with --fail-on-check-error that fails the run (exit 1), for that
    # reason and not because printing it raised (it used to be "on_event callback raised 3 time(s)").
    env, _ = ENCODINGS["utf-8"]
    proc = _pipes(tmp_path, env, "--fail-on-check-error", verdict="fail")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout.decode("utf-8")
    assert "[pipes] check a:c\\ud800heck FAILED" in out
    assert out.splitlines()[-1] == "error     a check of severity ERROR failed"
    assert "callback" not in out + proc.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("name", ["ascii", "C-locale"])
def test_json_mode_is_ascii_json_whatever_the_locale(tmp_path: Path, name: str) -> None:
    env, _ = ENCODINGS[name]
    proc = _pipes(tmp_path, env, "--json")
    assert proc.returncode == 0, proc.stderr
    events = cli_json_events(proc.stdout.decode("ascii"))
    log = next(e for e in events if e["event"] == "log")
    assert log["message"] == "caf\u00e9 \u2603 bad:\ud800"
    assert json.loads(json.dumps(events[-1]))["exit_code"] == 0
