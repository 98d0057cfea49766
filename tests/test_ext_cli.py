"""``pipes-ext`` (pipes_ext/_cli.py): programs with no SDK (a bash script, a Node program, a C program) report
materializations, checks, logs and custom messages through ``pipes-ext exec``, under pipes_core's and Dagster's own
``PipesSubprocessClient``; failures, signals, bad lines and bad subcommand input; and the bash conformance harness
built on it passes the suite for everything it declares (every channel, against the suite's local servers).

No ``from __future__ import annotations`` here: Dagster inspects the asset function's annotations at runtime."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import tomllib

from pipes_core import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesExecutionError,
    PipesRunContext,
    PipesStdioMessageReader,
    PipesSubprocessClient,
)
from pipes_ext._cli import MAX_LINE_BYTES, MAX_REPORTED_ISSUES
from pipes_ext._protocol import encode_param
from tests.support.helpers import PYTHON
from tests.support.helpers import REPO_ROOT as REPO

NODE = shutil.which("node")
GCC = shutil.which("gcc")
JQ = shutil.which("jq")
PIPES_EXT = [PYTHON, "-m", "pipes_ext"]


@pytest.fixture
def shell_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``pipes-ext`` on PATH for the children (the console script of an installed distribution, here a shim to
    this checkout's module)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "pipes-ext"
    shim.write_text(f'#!/bin/sh\nexec "{PYTHON}" -m pipes_ext "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return bin_dir


def test_the_console_script_is_the_pipes_ext_distribution_s() -> None:
    project = tomllib.loads((REPO / "pipes_ext" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "pipes-ext" and project["scripts"] == {"pipes-ext": "pipes_ext._cli:main"}
    root = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "pipes-ext" not in root["scripts"]


def test_the_command_uses_only_the_standard_library() -> None:
    import ast

    for name in ("_cli.py", "__main__.py"):
        tree = ast.parse((REPO / "pipes_ext" / name).read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
        assert imported - {"__future__"} <= sys.stdlib_module_names, (name, imported - sys.stdlib_module_names)


# ---------------------------------------------------------------------------------------------- three programs

BASH = r"""set -euo pipefail
pipes-ext log "hello from $LANG_NAME"
pipes-ext materialize --data-version v1 --metadata rows:int=42 --metadata lang="$LANG_NAME"
pipes-ext check positive --passed --metadata rows:int=42
pipes-ext message "{\"lang\": \"$LANG_NAME\", \"extra\": $(pipes-ext extra batch)}"
"""

NODE_PROGRAM = r"""
const fs = require('fs');
const fd = Number(process.env.PIPES_MESSAGES_FD);
const context = JSON.parse(fs.readFileSync(process.env.PIPES_CONTEXT_FILE, 'utf8'));
const send = (method, params) => fs.writeSync(fd, JSON.stringify({ method, params }) + '\n');
const lang = process.env.LANG_NAME;
send('log', { message: `hello from ${lang}`, level: 'INFO' });
send('report_asset_materialization', { asset_key: context.asset_keys[0], data_version: 'v1',
  metadata: { rows: { raw_value: 42, type: 'int' }, lang } });
send('report_asset_check', { asset_key: context.asset_keys[0], check_name: 'positive', passed: true,
  metadata: { rows: { raw_value: 42, type: 'int' } } });
send('report_custom_message', { payload: { lang, extra: context.extras.batch } });
"""

C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    const char *fd = getenv("PIPES_MESSAGES_FD");
    FILE *out = fd ? fdopen(atoi(fd), "w") : NULL;
    if (out == NULL) { fprintf(stderr, "not under pipes-ext exec\n"); return 2; }
    fprintf(out, "{\"method\": \"log\", \"params\": {\"message\": \"hello from C\"}}\n");
    fprintf(out, "{\"method\": \"report_asset_materialization\", \"params\": {\"data_version\": \"v1\", "
                 "\"metadata\": {\"rows\": {\"raw_value\": 42, \"type\": \"int\"}, \"lang\": \"C\"}}}\n");
    fprintf(out, "{\"method\": \"report_asset_check\", \"params\": {\"check_name\": \"positive\", "
                 "\"passed\": true, \"metadata\": {\"rows\": {\"raw_value\": 42, \"type\": \"int\"}}}}\n");
    fprintf(out, "{\"method\": \"report_custom_message\", \"params\": {\"payload\": "
                 "{\"lang\": \"C\", \"extra\": {\"n\": 3}}}}\n");
    return fclose(out) == 0 ? 0 : 1;
}
"""


def program(lang: str, tmp_path: Path) -> list[str]:
    """The command running ``lang``'s program (skipped when its tool is missing)."""
    if lang == "bash":
        script = tmp_path / "report.sh"
        script.write_text(BASH, encoding="utf-8")
        return ["bash", str(script)]
    if lang == "node":
        if NODE is None:
            pytest.skip("node is not installed")
        script = tmp_path / "report.js"
        script.write_text(NODE_PROGRAM, encoding="utf-8")
        return [NODE, str(script)]
    if GCC is None:
        pytest.skip("gcc is not installed")
    source = tmp_path / "report.c"
    source.write_text(C_PROGRAM, encoding="utf-8")
    binary = tmp_path / "report"
    subprocess.run([GCC, "-O1", "-Wall", "-Werror", "-o", str(binary), str(source)], check=True, timeout=120)
    return [str(binary)]


LANGS = {"bash": "bash", "node": "node", "c": "C"}
EXTRAS = {"batch": {"n": 3}}


@pytest.mark.parametrize("lang", list(LANGS))
def test_a_program_reports_through_exec_under_pipes_core(lang: str, tmp_path: Path, shell_path: Path) -> None:
    command = program(lang, tmp_path)
    invocation = PipesSubprocessClient(env={"LANG_NAME": LANGS[lang]}).run(
        context=PipesRunContext(asset_keys=["orders"]), command=[*PIPES_EXT, "exec", "--", *command],
        extras=EXTRAS)
    assert invocation.exit_code == 0 and not invocation.missing_closed
    rows = {"rows": MetadataValue("int", 42)}
    assert invocation.get_results(implicit_materializations=False) == [
        MaterializeResult("orders", {**rows, "lang": MetadataValue("text", LANGS[lang])}, "v1"),
        AssetCheckResult("orders", "positive", True, "ERROR", rows),
    ]
    assert [(log.level, log.message) for log in invocation.get_logs()] == [("INFO", f"hello from {LANGS[lang]}")]
    assert invocation.get_custom_messages() == [{"lang": LANGS[lang], "extra": {"n": 3}}]


@pytest.mark.interop
@pytest.mark.filterwarnings("ignore:Function `PipesMessageReader.expected_writer_count` is currently in preview"
                            ":dagster_shared.utils.warnings.PreviewWarning")
@pytest.mark.parametrize("lang", list(LANGS))
def test_a_program_reports_through_exec_under_dagster(lang: str, tmp_path: Path, shell_path: Path) -> None:
    command = program(lang, tmp_path)
    custom: list[Any] = []

    @dg.asset(name="orders", check_specs=[dg.AssetCheckSpec("positive", asset="orders")])
    def orders(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient):  # type: ignore[no-untyped-def]
        invocation = pipes.run(context=context, command=[*PIPES_EXT, "exec", "--", *command], extras=EXTRAS,
                               env={"LANG_NAME": LANGS[lang]})
        custom.extend(invocation.get_custom_messages())
        return invocation.get_results()

    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([orders], resources={"pipes": dg.PipesSubprocessClient()}, instance=instance)
        assert result.success
        [materialization] = result.asset_materializations_for_node("orders")
        assert materialization.metadata["rows"] == dg.MetadataValue.int(42)
        assert materialization.metadata["lang"] == dg.MetadataValue.text(LANGS[lang])
        assert materialization.tags is not None and materialization.tags["dagster/data_version"] == "v1"
        [evaluation] = result.get_asset_check_evaluations()
        assert (evaluation.check_name, evaluation.passed) == ("positive", True)
        assert evaluation.metadata["rows"] == dg.MetadataValue.int(42)
        logs = [(e.level, e.user_message) for e in instance.all_logs(result.run_id)
                if e.dagster_event is None and not e.user_message.startswith("[pipes]")]
        assert logs == [(20, f"hello from {LANGS[lang]}")]
    assert custom == [{"lang": LANGS[lang], "extra": {"n": 3}}]


def test_every_subcommand_and_both_names_of_the_pipe(tmp_path: Path, shell_path: Path) -> None:
    script = tmp_path / "all.sh"
    script.write_text(r"""set -euo pipefail
pipes-ext log --level warning "warned ✓"
pipes-ext materialize --asset orders --data-version v7 --metadata rows:int=42 --metadata ratio:float=0.5 \
    --metadata ok:bool=true --metadata doc:url=https://x.test/o --metadata 'cfg:json={"a": [1]}' \
    --metadata note=plain --metadata empty:null= --metadata at:timestamp=1700000000.5
pipes-ext check fresh --failed --severity WARN --asset orders
pipes-ext message '[1, "two", null]'
pipes-ext context > "$OUT_DIR/context.json"
pipes-ext extra batch > "$OUT_DIR/extra.json"
echo '{"method": "report_custom_message", "params": {"payload": "by descriptor"}}' >&"$PIPES_MESSAGES_FD"
echo '{"method": "report_asset_materialization", "params": {"asset_key": "customers"}}' >> "$PIPES_MESSAGES_FILE"
printf '{"method": "log_external_stream", "params": {"stream": "stdout", "text": "no newline at the end"}}' \
    >> "$PIPES_MESSAGES_FILE"
""", encoding="utf-8")
    invocation = PipesSubprocessClient(env={"OUT_DIR": str(tmp_path)}).run(
        context=PipesRunContext(asset_keys=["orders", "customers"]), command=[*PIPES_EXT, "exec", "--", "bash",
                                                                             str(script)], extras=EXTRAS)
    assert invocation.exit_code == 0
    assert invocation.get_results(implicit_materializations=False) == [
        MaterializeResult("orders", {
            "rows": MetadataValue("int", 42), "ratio": MetadataValue("float", 0.5), "ok": MetadataValue("bool", True),
            "doc": MetadataValue("url", "https://x.test/o"), "cfg": MetadataValue("json", {"a": [1]}),
            "note": MetadataValue("text", "plain"), "empty": MetadataValue("null", None),
            "at": MetadataValue("timestamp", 1700000000.5)}, "v7"),
        AssetCheckResult("orders", "fresh", False, "WARN", {}),
        MaterializeResult("customers", {}, None),
    ]
    assert [(log.level, log.message) for log in invocation.get_logs()] == [("WARNING", "warned ✓")]
    assert invocation.get_custom_messages() == [[1, "two", None], "by descriptor"]
    context = json.loads((tmp_path / "context.json").read_text(encoding="utf-8"))
    assert context == dict(invocation.session.context_data)
    assert json.loads((tmp_path / "extra.json").read_text(encoding="utf-8")) == {"n": 3}


def test_cli_bootstrap_arguments_are_exec_s_not_the_command_s(tmp_path: Path, shell_path: Path) -> None:
    script = tmp_path / "args.sh"
    script.write_text('pipes-ext message "$(printf \'%s\\n\' "$@" | jq -R . | jq -sc .)"\n', encoding="utf-8")
    if JQ is None:
        pytest.skip("jq is not installed")
    invocation = PipesSubprocessClient(bootstrap="cli").run(
        command=[*PIPES_EXT, "exec", "--", "bash", str(script), "a b", "--c"])
    assert invocation.get_custom_messages() == [["a b", "--c"]]


def test_stdio_channel_keeps_the_command_s_output_apart(tmp_path: Path, shell_path: Path) -> None:
    script = tmp_path / "chatty.sh"
    script.write_text("""printf 'partial '
pipes-ext message '"in the middle"'
printf 'line\\n'
for i in $(seq 200); do echo "output $i"; pipes-ext message "$i" & done; wait
""", encoding="utf-8")
    chunks: list[bytes] = []
    invocation = PipesSubprocessClient(message_reader=PipesStdioMessageReader(output=chunks.append)).run(
        command=[*PIPES_EXT, "exec", "--", "bash", str(script)])
    assert invocation.exit_code == 0
    payloads = invocation.get_custom_messages()
    assert payloads[0] == "in the middle" and sorted(payloads[1:]) == list(range(1, 201))
    text = b"".join(chunks).decode()
    assert "partial line" in text
    assert sorted(line for line in text.splitlines() if line.startswith("output")) == sorted(
        f"output {i}" for i in range(1, 201))


def test_capture_stdio_sends_the_command_s_output_as_messages(tmp_path: Path, shell_path: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    streams: list[tuple[str, str]] = []
    invocation = PipesSubprocessClient().run(
        command=[*PIPES_EXT, "exec", "--capture-stdio", "--", "bash", "-c", "echo to out; echo to err >&2"],
        external_stream_handler=lambda stream, text: streams.append((stream, text)))
    assert invocation.exit_code == 0
    assert ("stdout", "to out\n") in streams and ("stderr", "to err\n") in streams
    out, err = capfd.readouterr()
    assert "to out" in out and "to err" in err


# ---------------------------------------------------------------------------------------------- failures


def test_a_failing_command_is_reported_with_its_status_and_last_stderr_lines(shell_path: Path) -> None:
    command = [*PIPES_EXT, "exec", "--", "bash", "-c",
               'pipes-ext message \'"before"\'; for i in $(seq 30); do echo "err line $i" >&2; done; exit 3']
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient().run(command=command)
    error = info.value
    assert error.exit_code == 3
    remote = error.remote_exception
    assert remote is not None and remote.name == "CommandFailed"
    assert "command 'bash -c " in remote.message and "exited with status 3; last stderr lines:" in remote.message
    assert "err line 30" in remote.message and "err line 21" in remote.message and "err line 20\n" not in remote.message
    assert error.invocation is not None and error.invocation.get_custom_messages() == ["before"]


def test_a_killed_command_is_reported_and_exec_ends_the_same_way(shell_path: Path) -> None:
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient().run(command=[*PIPES_EXT, "exec", "--", "bash", "-c", "echo dying >&2; kill -KILL $$"])
    remote = info.value.remote_exception
    assert remote is not None and "was killed by SIGKILL" in remote.message and "dying" in remote.message
    assert info.value.invocation is not None
    assert info.value.invocation.exit_status is not None
    assert info.value.invocation.exit_status.exit_code == -signal.SIGKILL


def test_a_command_that_cannot_start(shell_path: Path, tmp_path: Path) -> None:
    with pytest.raises(PipesExecutionError) as info:
        PipesSubprocessClient().run(command=[*PIPES_EXT, "exec", "--", str(tmp_path / "no-such-program")])
    assert info.value.exit_code == 127
    remote = info.value.remote_exception
    assert remote is not None and "could not be started: No such file or directory" in remote.message


@pytest.fixture
def manual_session(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """Bootstrap variables for exec run by hand (no orchestrator): inline context, a messages file."""
    messages = tmp_path / "messages.jsonl"
    context = {"data": {"asset_keys": ["a"], "run_id": "r", "extras": {}}}
    yield ({"DAGSTER_PIPES_CONTEXT": encode_param(context),
            "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(messages)})}, messages)


def read_messages(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_signals_reach_the_command_once_and_it_decides(manual_session: tuple[dict[str, str], Path],
                                                       shell_path: Path) -> None:
    bootstrap, messages = manual_session
    # The command counts SIGTERMs (and says so on stdout), and on SIGUSR1 reports the count and exits 0.
    script = ('n=0; trap \'n=$((n+1)); echo "term $n"\' TERM; '
              'trap \'pipes-ext message "{\\"terms\\": $n}"; exit 0\' USR1; '
              'echo ready; while true; do sleep 1 & wait $!; done')
    proc = subprocess.Popen([*PIPES_EXT, "exec", "--", "bash", "-c", script], env={**os.environ, **bootstrap},
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        os.killpg(proc.pid, signal.SIGTERM)  # to exec's whole group: exec forwards it, the command gets it once
        assert proc.stdout.readline() == "term 1\n"
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read() == ""  # no second "term"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    sent = read_messages(messages)
    assert [m["method"] for m in sent] == ["opened", "report_custom_message", "closed"]
    assert sent[1]["params"]["payload"] == {"terms": 1}
    assert sent[2]["params"] == {}


BAD_LINES = [
    ("not json", "message line is not JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"method": "opened", "params": {}}', '"opened" is sent by pipes-ext exec itself'),
    ('{"method": "hello", "params": {}}', '"method" must be one of log, report_asset_materialization'),
    ('{"method": "log", "params": {"message": "m", "colour": "red"}}', "unknown param(s) ['colour']"),
    ('{"method": "log", "params": {"message": "m", "level": "LOUD"}}', 'unknown "level"'),
    ('{"method": "report_asset_materialization", "params": {"asset_key": "elsewhere"}}', "is not in scope"),
    ('{"method": "report_asset_check", "params": {"check_name": "c", "passed": true, '
     '"metadata": {"n": {"raw_value": "x", "type": "int"}}}}', "int metadata must be an integer"),
    ('{"method": "report_asset_check", "params": {"check_name": "c"}}', '"check_name" and "passed" are required'),
    ('{"method": "report_custom_message", "params": {"payload": 1}, "extra": 2}', "unknown key(s) ['extra']"),
    ('{"__dagster_pipes_version": "9", "method": "log", "params": {"message": "m"}}', 'only "0.1" is spoken'),
]


def test_bad_lines_are_reported_issues_and_the_run_goes_on(manual_session: tuple[dict[str, str], Path],
                                                          tmp_path: Path) -> None:
    bootstrap, messages = manual_session
    lines = tmp_path / "lines.txt"
    good = '{"method": "report_asset_materialization", "params": {"metadata": {"n": 1}}}'
    lines.write_text("\n".join([good, *(line for line, _ in BAD_LINES), "", good,
                                '{"method": "report_custom_message", "params": {"payload": "last"}}']) + "\n",
                     encoding="utf-8")
    proc = subprocess.run([*PIPES_EXT, "exec", "--", "bash", "-c", f'cat {lines} >&"$PIPES_MESSAGES_FD"'],
                          env={**os.environ, **bootstrap}, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    sent = read_messages(messages)
    assert [m["method"] for m in sent] == ["opened", "report_asset_materialization", *(["log"] * (len(BAD_LINES) + 1)),
                                           "report_custom_message", "closed"]
    warnings = [m["params"] for m in sent if m["method"] == "log"]
    assert all(w["level"] == "WARNING" for w in warnings)
    for index, (_, reason) in enumerate(BAD_LINES):
        assert warnings[index]["message"].startswith(f"pipes-ext exec: line {index + 2} ignored: "), warnings[index]
        assert reason in warnings[index]["message"], warnings[index]
    assert "already materialized" in warnings[-1]["message"]  # the second good line: asset "a" again
    assert sent[-1]["params"] == {}
    assert proc.stderr.count("pipes-ext exec: line") == len(BAD_LINES) + 1


def test_a_flood_of_bad_lines_is_counted_not_reported_one_by_one(manual_session: tuple[dict[str, str], Path]
                                                                 ) -> None:
    bootstrap, messages = manual_session
    proc = subprocess.run([*PIPES_EXT, "exec", "--", "bash", "-c",
                           'for i in $(seq 500); do echo "junk $i"; done >&"$PIPES_MESSAGES_FD"'],
                          env={**os.environ, **bootstrap}, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0
    warnings = [m["params"]["message"] for m in read_messages(messages) if m["method"] == "log"]
    assert len(warnings) == MAX_REPORTED_ISSUES + 1
    assert "500 lines were ignored in all" in warnings[-1]


def test_a_line_over_the_limit_is_skipped_as_it_streams(manual_session: tuple[dict[str, str], Path]) -> None:
    bootstrap, messages = manual_session
    size = MAX_LINE_BYTES + 1024
    script = (f'{{ head -c {size} /dev/zero | tr "\\0" a; echo; '
              'echo \'{"method": "report_custom_message", "params": {"payload": "after"}}\'; } >&"$PIPES_MESSAGES_FD"')
    proc = subprocess.run([*PIPES_EXT, "exec", "--", "bash", "-c", script], env={**os.environ, **bootstrap},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    sent = read_messages(messages)
    assert [m["method"] for m in sent] == ["opened", "log", "report_custom_message", "closed"]
    assert sent[1]["params"]["message"].startswith(
        f"pipes-ext exec: line 1 ignored: longer than {MAX_LINE_BYTES} bytes (the orchestrator's line limit)")
    assert sent[2]["params"]["payload"] == "after"


def test_outside_a_pipes_run_exec_runs_the_command_and_says_so(shell_path: Path) -> None:
    proc = subprocess.run([*PIPES_EXT, "exec", "--", "bash", "-c", "pipes-ext log hi && echo ran"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout == "ran\n"
    assert "pipes-ext exec: warning: This process was not launched by a Pipes orchestrator" in proc.stderr


# ---------------------------------------------------------------------------------------------- subcommands' bad input


SUBCOMMAND_ERRORS = [
    (["materialize", "--metadata", "rows:int=many"], 2, "'many' is not an integer"),
    (["materialize", "--metadata", "rows:integer=1"], 2, "unknown type 'integer'"),
    (["materialize", "--metadata", "no-equals"], 2, "expected KEY=VALUE or KEY:TYPE=VALUE"),
    (["materialize", "--metadata", "x:float=nan"], 2, "is not a finite number"),
    (["materialize", "--metadata", "x:bool=yes"], 2, "a bool is true or false"),
    (["materialize", "--metadata", "x:json={oops"], 2, "is not JSON"),
    (["materialize", "--metadata", "x=1", "--metadata", "x=2"], 2, "'x' is given twice"),
    (["materialize", "--asset", "elsewhere"], 2, "asset key 'elsewhere' is not in scope"),
    (["check", "c", "--passed", "--asset", "elsewhere"], 2, "is not in scope"),
    (["message", "{not json"], 2, "the message is not JSON"),
    (["log", "--level", "LOUD", "m"], 2, "--level 'LOUD': expected DEBUG"),
    (["extra", "missing"], 2, "no extra 'missing' in this run (extras: batch)"),
    (["sync", "--timeout", "0"], 2, "--timeout must be a positive number"),
]


@pytest.mark.parametrize(("args", "status", "error"), SUBCOMMAND_ERRORS, ids=[" ".join(a) for a, _, _ in
                                                                                SUBCOMMAND_ERRORS])
def test_bad_subcommand_input_is_an_error_and_sends_nothing(args: list[str], status: int, error: str,
                                                            shell_path: Path, tmp_path: Path) -> None:
    script = tmp_path / "bad.sh"
    script.write_text('pipes-ext "$@"; echo "status $?" >&2\npipes-ext message \'"after"\'\n', encoding="utf-8")
    invocation = PipesSubprocessClient().run(context=PipesRunContext(asset_keys=["a"]), extras=EXTRAS,
                                             command=[*PIPES_EXT, "exec", "--", "bash", str(script), *args])
    assert invocation.exit_code == 0
    assert invocation.get_custom_messages() == ["after"]
    assert invocation.get_results(implicit_materializations=False) == [] and invocation.get_logs() == []
    tail = invocation.output_tail or ""
    assert error in tail and f"status {status}" in tail, tail
    assert "Traceback" not in tail


@pytest.mark.parametrize("args", [["log", "m"], ["context"], ["extra", "k"], ["sync"]])
def test_subcommands_outside_exec_say_how_to_run_them(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPES_")}
    proc = subprocess.run([*PIPES_EXT, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "run this inside `pipes-ext exec -- COMMAND`" in proc.stderr and "Traceback" not in proc.stderr


def test_a_bucket_without_its_store_is_refused_before_the_command_runs(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_PIPES_CONTEXT": encode_param({"data": {"run_id": "r"}}),
           "DAGSTER_PIPES_MESSAGES": encode_param({"bucket": "b", "key_prefix": "p"})}
    env.pop("PIPES_EXT_BLOB_STORE", None)
    marker = tmp_path / "ran"
    proc = subprocess.run([*PIPES_EXT, "exec", "--", "touch", str(marker)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1 and not marker.exists()
    assert "the bootstrap names a bucket, but not its store: pass --blob-store s3|gcs|azure" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_exec_without_a_command_is_a_usage_error() -> None:
    proc = subprocess.run([*PIPES_EXT, "exec"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "no command to run; usage: pipes-ext exec" in proc.stderr


def test_help_documents_the_line_format() -> None:
    proc = subprocess.run([*PIPES_EXT, "--help"], capture_output=True, text=True, timeout=60, check=True)
    for text in ("$PIPES_MESSAGES_FD", "$PIPES_MESSAGES_FILE", "$PIPES_CONTEXT_FILE", "report_asset_materialization",
                 "exec", "materialize", "check", "message", "extra", "context", "sync"):
        assert text in proc.stdout


# ---------------------------------------------------------------------------------------------- the bash harness

HARNESSES = REPO / "conformance" / "harnesses"
AZURITE_MAIN = REPO / ".ci" / "node" / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"


@pytest.mark.slow
@pytest.mark.skipif(JQ is None, reason="the bash harness needs jq")
def test_the_bash_harness_passes_the_suite_over_every_channel() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_PIPES_", "PIPES_"))}
    env["PIPES_EXT_COMMAND"] = f"{PYTHON} -m pipes_ext"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    azurite = AZURITE_MAIN if AZURITE_MAIN.exists() else Path("/work/main") / AZURITE_MAIN.relative_to(REPO)
    if azurite.exists():
        env["PIPES_CONFORMANCE_AZURITE"] = str(azurite)
    proc = subprocess.run([PYTHON, "-m", "conformance", "run", "--json", "--capabilities",
                           str(HARNESSES / "pipes_ext_exec.json"), "--", "bash", str(HARNESSES / "pipes_ext_exec.sh")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.stdout, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    failed = [(r["case"], r["bootstrap"], r["context"], r["messages"], r["reason"]) for r in report["results"]
              if r["status"] == "fail"]
    assert failed == [] and proc.returncode == 0
    # Skipped only where every harness is (two stores in one run, the crash on buffered blob channels, capture on
    # the stdio channel) or for the error features it does not declare.
    expected = ("two blob stores in one run", "blob-store writers buffer", "stdio capture needs",
                "feature error_reporting not declared", "feature error_reporting, error_context not declared")
    reasons = {r["reason"] for r in report["results"] if r["status"] == "skip"}
    assert all(reason.startswith(expected) for reason in reasons), reasons
    assert report["summary"] == {"passed": 153, "failed": 0, "skipped": 32}, report["summary"]
    passed = {(r["bootstrap"], r["context"], r["messages"]) for r in report["results"] if r["status"] == "pass"}
    assert {m for _, _, m in passed} == {"file", "stdio", "s3", "gcs", "azure"}
    assert {c for _, c, _ in passed} == {"env", "file", "s3", "gcs", "azure"}
    assert {b for b, _, _ in passed} == {"env", "cli"}
