"""``python -m conformance community``: drive a harness written for the community ``dagster-pipes-tests`` suite,
unchanged, with ``pipes_core`` as the orchestrator instead of Dagster.

That suite (``dagster-io/community-integrations``, ``libraries/pipes/tests/dagster-pipes-tests``) is a pytest
plugin whose orchestrator is Dagster itself; the Java, TypeScript, Rust and Elixir implementations ship a harness for
it. The harness contract, which this module speaks:

* the harness command (that suite's ``BASE_ARGS``) gets ``--test-name NAME`` (the test function's name, which the
  harness switches on) and, depending on the test, ``--job-name NAME``, ``--extras FILE`` (JSON: the extras it must
  find in its context), ``--custom-payload FILE`` (JSON ``{"payload": X}``: report X as a custom message),
  ``--report-asset-materialization FILE`` (JSON ``{"dataVersion"?, "assetKey"?}``), ``--report-asset-check FILE``
  (JSON ``{"checkName", "passed", "severity", "assetKey"?}``), and ``--context-loader s3`` / ``--message-writer s3``
  when the context or the messages go through S3;
* it bootstraps from ``DAGSTER_PIPES_CONTEXT`` / ``DAGSTER_PIPES_MESSAGES`` and, for S3, builds its client from the
  standard AWS variables (``AWS_ENDPOINT_URL`` points at a local moto server);
* its capabilities are in ``pipes.toml`` (``[general] error_reporting``; ``[messages] log, report_custom_message,
  report_asset_materialization, report_asset_check, log_external_stream``; ``[message_channel] s3, databricks``);
  a capability it does not declare skips the tests that need it.

The tests and their parameters are that suite's (30 ``test_components`` runs, 10 ``test_extras``, 9 custom payloads,
4 materializations, 8 checks, error reporting, log levels), judged as pipes_core sees the messages. Where that suite
expects something the protocol does not say, this mode follows the protocol and the README says so (see
``DEVIATIONS``).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipes_core import (
    AssetCheckResult,
    MaterializeResult,
    PipesClosedEvent,
    PipesContextInjector,
    PipesCustomMessageEvent,
    PipesEnvContextInjector,
    PipesEvent,
    PipesExecutionError,
    PipesLogEvent,
    PipesMessageReader,
    PipesOpenedEvent,
    PipesProtocolIssue,
    PipesRunContext,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    PipesTimeoutError,
)

from ._capabilities import CapabilitiesError, load_toml
from ._compare import first_difference, short
from ._runner import READER_INTERVAL, Combo, Result, last_output_lines
from ._servers import BlobServer, start_store, unavailable_reason

__all__ = [
    "PIPES_CONFIG_ENV_VAR",
    "DATA_DIR",
    "DEVIATIONS",
    "CommunityTest",
    "CommunityRun",
    "PipesToml",
    "TESTS",
    "load_pipes_toml",
    "plan_community",
    "community_skip_note",
    "COMMUNITY_SKIPS_COMPONENTS",
    "run_community",
]

# Where that suite looks for the capabilities file when none is named (as it does).
PIPES_CONFIG_ENV_VAR = "PIPES_CONFIG_PATH"
DATA_DIR = Path(__file__).resolve().parent / "community"
ASSET = "my_asset"
CHECK = "my_check"
JOB_NAME = "__ephemeral_asset_job__"  # the job name Dagster gives a materialize() call
HELLO = "Hello from external process!"
ERROR_MESSAGE = "Very bad error has happened!"
LOG_TEXTS = {"DEBUG": "Debug message", "INFO": "Info message", "WARNING": "Warning message",
             "ERROR": "Error message", "CRITICAL": "Critical message"}

# Where the community suite's expectations go beyond (or against) the protocol, and what this mode does instead.
DEVIATIONS = (
    "test_error_reporting: that suite requires closed.exception.message == 'Very bad error has happened!', but "
    "Python implementations (dagster-pipes included) send the formatted 'RuntimeError: Very bad error has "
    "happened!\\n', as the protocol allows; this mode accepts the bare message or '<name>: <message>'.",
    "test_message_report_asset_check: that suite checks only `passed` of results[0]; this mode also checks the "
    "check name, the asset, the severity and the metadata.",
)


# ------------------------------------------------------------------------------------------------ pipes.toml

_SECTIONS: dict[str, dict[str, bool]] = {
    "general": {"error_reporting": False},
    "messages": {"log": True, "report_custom_message": True, "report_asset_materialization": True,
                 "report_asset_check": True, "log_external_stream": False},
    "message_channel": {"s3": False, "databricks": False},
}


@dataclass(frozen=True)
class PipesToml:
    """The community suite's capabilities file; every flag by its dotted name, e.g. ``messages.log``."""

    name: str = "harness"
    flags: dict[str, bool] = field(
        default_factory=lambda: {f"{s}.{k}": v for s, keys in _SECTIONS.items() for k, v in keys.items()})
    ignored: tuple[str, ...] = ()

    def enabled(self, flag: str) -> bool:
        return self.flags[flag]

    def summary_text(self) -> str:
        on = [flag for flag, value in self.flags.items() if value]
        return f"pipes.toml: {', '.join(on) or 'nothing enabled'}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "flags": dict(self.flags), "ignored": list(self.ignored)}


def load_pipes_toml(path: str | Path | None, environ: dict[str, str] | None = None) -> PipesToml:
    """Read ``pipes.toml``: the named file, else ``$PIPES_CONFIG_PATH``, else ``./pipes.toml``, else the defaults.

    Keys this mode does not know are ignored (the report lists them); a known key that is not a boolean is an error.
    """
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get(PIPES_CONFIG_ENV_VAR) or ("pipes.toml" if Path("pipes.toml").is_file() else None)
    if path is None:
        return PipesToml()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CapabilitiesError(f"cannot read {str(path)!r}: {exc}") from exc
    data = load_toml(path, text)
    if not isinstance(data, dict):  # pragma: no cover - tomllib always returns a table
        raise CapabilitiesError(f"{path}: expected a TOML table")
    flags = PipesToml().flags
    ignored: list[str] = []
    for section, values in data.items():
        if section not in _SECTIONS or not isinstance(values, dict):
            ignored.append(section)
            continue
        for key, value in values.items():
            flag = f"{section}.{key}"
            if key not in _SECTIONS[section]:
                ignored.append(flag)
            elif not isinstance(value, bool):
                raise CapabilitiesError(f"{path}: {flag} must be true or false, got {value!r}")
            else:
                flags[flag] = value
    return PipesToml(path.parent.resolve().name or "harness", flags, tuple(ignored))


# ------------------------------------------------------------------------------------------------ the tests


@dataclass(frozen=True)
class CommunityTest:
    """One test function of the community suite (a table of the report)."""

    name: str
    description: str
    requires: tuple[str, ...] = ()
    scope: str = "community"


@dataclass
class Seen:
    """What one run produced, as the judges read it."""

    events: list[PipesEvent]
    exit_code: int | None
    output: str

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def closed(self) -> PipesClosedEvent | None:
        closed = self.of(PipesClosedEvent)
        return closed[0] if closed else None


Judge = Callable[[Seen], "str | None"]


@dataclass(frozen=True)
class CommunityRun:
    test: CommunityTest
    combo: Combo  # bootstrap "env"; context env/tempfile/s3; messages default/s3
    variant: str
    files: tuple[tuple[str, Any], ...]  # (flag, JSON written to a file whose path follows the flag)
    extras: dict[str, Any] | None
    judge: Judge
    succeeds: bool = True
    skip: str | None = None
    # Why the community suite itself would skip this run for the same pipes.toml (this mode runs it, marked).
    community_skips: str | None = None


# What the community suite does that this mode does not: with `[message_channel] s3 = false` it skips every
# test_components run, those over env/tempfile context and default messages too (its skip is on the test, not on
# the S3 parameters). This mode runs those that do not use S3 and marks them with this text.
COMMUNITY_SKIPS_COMPONENTS = ("the community suite would skip this run: with message_channel.s3 = false it skips "
                              "every test_components run, including those that do not use S3")


def _load(name: str) -> Any:
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


def _extras_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = _load("cases/metadata.json")
    cases[4]["corge"] = None  # the file says "null" (a string); that suite turns it into a real null, so do we
    return cases


def _static_metadata() -> dict[str, Any]:
    data: dict[str, Any] = _load("static/metadata.json")
    return data


def _metadata_json(metadata: dict[str, Any]) -> dict[str, Any]:
    return {label: {"type": value.type, "raw_value": value.value} for label, value in metadata.items()}


def _metadata_problem(where: str, metadata: dict[str, Any]) -> str | None:
    return first_difference(_static_metadata(), _metadata_json(metadata), f"{where}.metadata")


def _components(seen: Seen) -> str | None:
    custom = [e.payload for e in seen.of(PipesCustomMessageEvent)]
    if custom != [HELLO]:
        return f"expected exactly one custom message {HELLO!r}; got {short(custom, 160)}"
    return None


def _nothing(seen: Seen) -> str | None:
    return None


def _error_reported(seen: Seen) -> str | None:
    closed = seen.closed
    if closed is None or closed.exception is None:
        return "closed carries no exception"
    exc = closed.exception
    if not exc.name:
        return "closed.exception.name is empty"
    message = exc.message.strip()
    if message not in (ERROR_MESSAGE, f"{exc.name}: {ERROR_MESSAGE}"):
        return f"closed.exception.message is {short(exc.message)}; expected {ERROR_MESSAGE!r}"
    if not exc.stack:
        return "closed.exception.stack is empty"
    return None


def _logs(seen: Seen) -> str | None:
    got = {(e.level, e.message) for e in seen.of(PipesLogEvent)}
    missing = [f"{level} {text!r}" for level, text in LOG_TEXTS.items() if (level, text) not in got]
    if missing:
        return f"log message(s) missing: {', '.join(missing)}; got {short(sorted(got), 200)}"
    return None


def _custom(payload: Any) -> Judge:
    def judge(seen: Seen) -> str | None:
        custom = [e.payload for e in seen.of(PipesCustomMessageEvent)]
        if not custom:
            return "no custom message arrived"
        return first_difference(payload, custom[-1], "custom_messages[-1]")

    return judge


def _materialization(data_version: str | None) -> Judge:
    def judge(seen: Seen) -> str | None:
        found = seen.of(MaterializeResult)
        if len(found) != 1:
            return f"expected one materialization, got {len(found)}"
        result = found[0]
        if result.asset_key != ASSET:
            return f"materialization of {result.asset_key!r}; expected {ASSET!r}"
        if result.data_version != data_version:
            return f"data_version is {result.data_version!r}; expected {data_version!r}"
        return _metadata_problem("materialization", result.metadata)

    return judge


def _check(passed: bool, severity: str) -> Judge:
    def judge(seen: Seen) -> str | None:
        found = seen.of(AssetCheckResult)
        if len(found) != 1:
            return f"expected one asset check, got {len(found)}"
        check = found[0]
        for what, got, expected in (("check_name", check.check_name, CHECK), ("asset_key", check.asset_key, ASSET),
                                    ("passed", check.passed, passed), ("severity", check.severity, severity)):
            if got != expected:
                return f"check.{what} is {got!r}; expected {expected!r}"
        return _metadata_problem("check", check.metadata)

    return judge


TESTS = (
    CommunityTest("test_components", "context and messages over env/tempfile/S3 x default/S3 channels: the extras "
                  "and job name arrive, exactly one custom message 'Hello from external process!'"),
    CommunityTest("test_extras", "extras of growing depth arrive intact (env and tempfile context)"),
    CommunityTest("test_error_reporting", "an error is reported in closed (name, message, stack) and the run fails",
                  ("general.error_reporting",)),
    CommunityTest("test_message_log", "a log message at each level DEBUG..CRITICAL", ("messages.log",)),
    CommunityTest("test_message_report_custom_message", "custom messages of every JSON type",
                  ("messages.report_custom_message",)),
    CommunityTest("test_message_report_asset_materialization", "a materialization with the static metadata, with "
                  "and without data version and asset key", ("messages.report_asset_materialization",)),
    CommunityTest("test_message_report_asset_check", "an asset check with the static metadata, passed or not, at "
                  "both severities, with and without asset key", ("messages.report_asset_check",)),
)
_BY_NAME = {t.name: t for t in TESTS}


def _skip(test: CommunityTest, toml: PipesToml, combo: Combo) -> str | None:
    for flag in test.requires:
        if not toml.enabled(flag):
            return f"{flag} is not enabled in pipes.toml"
    if "s3" in (combo.context, combo.messages):
        if not toml.enabled("message_channel.s3"):
            return "message_channel.s3 is not enabled in pipes.toml"
        return unavailable_reason("s3")
    return None


def plan_community(toml: PipesToml) -> list[CommunityRun]:
    """Every run of the community contract, in that suite's order, the undeclared ones marked as skipped."""
    runs: list[CommunityRun] = []

    def add(name: str, variant: str, *, context: str = "env", messages: str = "default",
            files: Sequence[tuple[str, Any]] = (), extras: dict[str, Any] | None = None, judge: Judge = _nothing,
            succeeds: bool = True) -> None:
        test = _BY_NAME[name]
        combo = Combo("env", context, messages)
        skip = _skip(test, toml, combo)
        community_skips = (COMMUNITY_SKIPS_COMPONENTS if name == "test_components" and skip is None
                           and not toml.enabled("message_channel.s3") else None)
        runs.append(CommunityRun(test, combo, variant, tuple(files), extras, judge, succeeds, skip, community_skips))

    extras_cases = _extras_cases()
    for index, extras in enumerate(extras_cases):
        for context in ("env", "tempfile", "s3"):
            for messages in ("default", "s3"):
                add("test_components", f"extras{index}", context=context, messages=messages,
                    files=[("--extras", extras)], extras=extras, judge=_components)
    for index, extras in enumerate(extras_cases):
        for context in ("env", "tempfile"):
            add("test_extras", f"extras{index}", context=context, files=[("--extras", extras)], extras=extras)
    add("test_error_reporting", "-", judge=_error_reported, succeeds=False)
    add("test_message_log", "-", judge=_logs)
    for index, payload in enumerate(_load("cases/custom_payload.json")):
        add("test_message_report_custom_message", f"payload{index}",
            files=[("--custom-payload", {"payload": payload})], judge=_custom(payload))
    for data_version in (None, "alpha"):
        for asset_key in (None, ASSET):
            spec: dict[str, Any] = {}
            if data_version is not None:
                spec["dataVersion"] = data_version
            if asset_key is not None:
                spec["assetKey"] = asset_key
            add("test_message_report_asset_materialization", f"data_version={data_version},asset_key={asset_key}",
                files=[("--report-asset-materialization", spec)], judge=_materialization(data_version))
    for passed in (True, False):
        for severity in ("WARN", "ERROR"):
            for asset_key in (None, ASSET):
                check_spec: dict[str, Any] = {"passed": passed, "severity": severity, "checkName": CHECK}
                if asset_key is not None:
                    check_spec["assetKey"] = asset_key
                add("test_message_report_asset_check", f"passed={passed},severity={severity},asset_key={asset_key}",
                    files=[("--report-asset-check", check_spec)], judge=_check(passed, severity))
    return runs


# ------------------------------------------------------------------------------------------------ one run


def _channels(run: CommunityRun, server: BlobServer | None) -> tuple[PipesContextInjector, PipesMessageReader]:
    injector: PipesContextInjector
    reader: PipesMessageReader
    if run.combo.context == "s3":
        from pipes_core.s3 import PipesS3ContextInjector

        assert server is not None
        injector = PipesS3ContextInjector(server.bucket, server.make_client())
    elif run.combo.context == "tempfile":
        injector = PipesTempFileContextInjector()
    else:
        injector = PipesEnvContextInjector()
    if run.combo.messages == "s3":
        from pipes_core.s3 import PipesS3MessageReader

        assert server is not None
        reader = PipesS3MessageReader(server.bucket, server.make_client(), interval=READER_INTERVAL)
    else:
        reader = PipesTempFileMessageReader()
    return injector, reader


def _exit_text(seen: Seen) -> str:
    last = last_output_lines(seen.output, 1, 200)
    return f"exit code {seen.exit_code}" + (f"; last output line: {last}" if last else "")


def judge_run(run: CommunityRun, seen: Seen) -> str | None:
    """None when the run meets the contract, else the first difference."""
    if not seen.of(PipesOpenedEvent):
        return f"the harness never sent opened ({_exit_text(seen)})"
    issues = seen.of(PipesProtocolIssue)
    if issues:
        return f"protocol issue ({len(issues)} in all): {issues[0]}"
    closed = seen.closed
    if run.succeeds:
        if seen.exit_code != 0:
            return f"the run failed: {_exit_text(seen)}"
        if closed is None:
            return "closed never arrived"
        if closed.exception is not None:
            return f"closed carries an exception: {short(closed.exception.message, 160)}"
    elif seen.exit_code == 0:
        return "the run succeeded; expected it to fail (non-zero exit code)"
    return run.judge(seen)


def execute_run(run: CommunityRun, command: Sequence[str], server: BlobServer | None, timeout: float) -> Result:
    started = time.monotonic()
    events: list[PipesEvent] = []
    exit_code: int | None = None
    output = ""
    problem: str | None = None
    with tempfile.TemporaryDirectory(prefix="pipes-community-") as work:
        argv = list(command)
        for index, (flag, content) in enumerate(run.files):
            path = Path(work) / f"{flag.strip('-')}-{index}.json"
            path.write_text(json.dumps(content), encoding="utf-8")
            argv += [flag, str(path)]
        if run.test.name == "test_components":
            argv += ["--job-name", JOB_NAME]
        argv += ["--test-name", run.test.name]
        if run.combo.context == "s3":
            argv += ["--context-loader", "s3"]
        if run.combo.messages == "s3":
            argv += ["--message-writer", "s3"]
        try:
            injector, reader = _channels(run, server)
            client = PipesSubprocessClient(context_injector=injector, message_reader=reader, forward_stdio=False,
                                           strict=False)
            invocation = client.run(context=PipesRunContext(asset_keys=[ASSET], job_name=JOB_NAME), command=argv,
                                    extras=run.extras, env=server.env if server else None, on_event=events.append,
                                    timeout_seconds=timeout)
            exit_code, output = invocation.exit_code, invocation.output_tail
        except PipesTimeoutError as exc:
            exit_code, output = exc.exit_code, exc.output_tail
            problem = f"the harness did not exit within {timeout:g} s (killed)"
        except PipesExecutionError as exc:
            exit_code, output = exc.exit_code, exc.output_tail
            if exc.exit_code is None:
                problem = str(exc)
        except Exception as exc:  # a channel's SDK failed: the run fails, the suite goes on
            problem = f"the context injector or message reader failed: {type(exc).__name__}: {exc}"
    seen = Seen(events, exit_code, output)
    problem = problem or judge_run(run, seen)
    reason = "; ".join(filter(None, [problem, run.community_skips and f"[{run.community_skips}]"]))
    return Result(run.test.name, run.combo, "fail" if problem else "pass", reason,
                  time.monotonic() - started, exit_code, last_output_lines(output), variant=run.variant)


def community_skip_note(runs: Sequence[CommunityRun]) -> str | None:
    """The report's note on the runs the community suite itself would skip for this pipes.toml, or None."""
    marked = [run for run in runs if run.community_skips]
    if not marked:
        return None
    return (f"{len(marked)} run(s) that the community suite itself would skip for this pipes.toml were run anyway "
            f"and are marked in their row: {marked[0].community_skips}")


def run_community(runs: Sequence[CommunityRun], command: Sequence[str], *, timeout: float, jobs: int,
                  progress: Callable[[Result], None] | None = None) -> list[Result]:
    """Run every run not skipped, ``jobs`` at a time, against one local S3 server when one is needed."""
    results: list[Result | None] = [None] * len(runs)
    todo = [i for i, r in enumerate(runs) if r.skip is None]
    for index, run in enumerate(runs):
        if run.skip is not None:
            results[index] = Result(run.test.name, run.combo, "skip", run.skip, variant=run.variant)
    server: BlobServer | None = None
    needs_s3 = any("s3" in (runs[i].combo.context, runs[i].combo.messages) for i in todo)
    try:
        if needs_s3:
            try:
                server = start_store("s3")
            except Exception as exc:
                reason = f"s3 server failed to start: {type(exc).__name__}: {exc}"
                for i in list(todo):
                    if "s3" in (runs[i].combo.context, runs[i].combo.messages):
                        results[i] = Result(runs[i].test.name, runs[i].combo, "skip", reason,
                                            variant=runs[i].variant)
                        todo.remove(i)
        lock = threading.Lock()

        def work(index: int) -> None:
            run = runs[index]
            uses_s3 = "s3" in (run.combo.context, run.combo.messages)
            result = execute_run(run, command, server if uses_s3 else None, timeout)
            with lock:
                results[index] = result
            if progress:
                progress(result)

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for future in [pool.submit(work, i) for i in todo]:
                future.result()
    finally:
        if server is not None:
            server.stop()
    return [r for r in results if r is not None]
