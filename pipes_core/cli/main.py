"""The ``pipes`` command line: wrap any command in a Pipes session.

    pipes --version
    pipes run [--asset KEY]... [--partition KEY] [--extras JSON | --extras-file PATH]
              [--context-injector env|file|tempfile|s3|gcs|azure] [--message-reader file|tempfile|stdio|s3|gcs|azure]
              [--bucket NAME | --container NAME] [--prefix PREFIX] [--bootstrap env|cli]
              [--slurm [--sbatch-arg ARG]... [--shared-dir DIR] [--slurm-conf PATH]]
              [--docker IMAGE [--docker-arg ARG]...]
              [--ray ADDRESS [--runtime-env JSON|@FILE]]
              [--json] [--no-strict] [--fail-on-check-error] [--timeout S]
              [--max-line-bytes N] -- COMMAND [ARG]...

Human mode prints each event as it arrives (colour on a terminal, plain when piped) and a summary. ``--json``
prints one JSON object per event on stdout (the child's own stdout is sent to stderr so it cannot mix in),
strict JSON only (non-finite floats become the strings "NaN", "Infinity", "-Infinity"). Every JSON object
carries ``time`` (when the orchestrator handled it: ISO 8601, UTC, milliseconds) and ``run_id``, so the lines of
concurrent runs can be told apart and ordered; ``opened`` also carries ``context``, the context document that
was injected (asset keys, partition, run id, job name, the ``--extras`` given, ...), while its ``extras`` stays
what the process itself sent in ``opened`` (usually nothing). In human mode every
string taken from the child's messages has its control characters escaped and its continuation lines indented,
so a child cannot drive the terminal or forge a line of ours; its own stdout/stderr pass through raw. A
traceback the child reports is shown once: by its headline when the child printed it on its stderr too, in full
after the summary otherwise. A child that opened the channel but never sent ``closed`` is a warning in the summary
(and in ``--json``'s summary object, ``warnings``). Every hint that came from the library names the flag to use
(see :mod:`pipes_core.cli.words`); a mistyped flag gets a "did you mean".

``--context-path`` / ``--messages-path`` alone imply ``--context-injector file`` / ``--message-reader file``
(with another injector or reader named, they are an error). The session creates those files itself and refuses
an existing path or a missing directory before launching anything (see :mod:`pipes_core.channels.files`).

Exit codes: the child's exit code (128 + N when killed by signal N); 1 when the child exited 0 but the
session failed (remote exception, never opened, protocol issues in strict mode, a failed ERROR check with
``--fail-on-check-error``); 124 on ``--timeout``; 130 on Ctrl-C; 2 for a bad invocation.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import IO, Any, NoReturn, TypeVar

from pipes_core.channels.injectors import PipesContextInjector, PipesEnvContextInjector
from pipes_core.channels.readers import PipesMessageReader
from pipes_core.channels.registry import (
    BLOB_CHANNELS,
    CONTEXT_CHANNELS,
    MESSAGE_CHANNELS,
    PipesChannelOptions,
    make_context_injector,
    make_message_reader,
)
from pipes_core.cli.runs import add_run_arguments, add_runs_parser, durable_options, runs_main
from pipes_core.cli.words import in_cli_words
from pipes_core.launch.client import BOOTSTRAPS, FACT_MISSING_CLOSED, LOG_FACT, PipesClient, client_logger
from pipes_core.launch.session import PipesSession
from pipes_core.launch.subprocess import PipesClientCompletedInvocation, PipesSubprocessClient
from pipes_core.observe.trace_file import TraceFileWriter
from pipes_core.protocol.errors import (
    PipesError,
    PipesExecutionError,
    PipesInterruptedError,
    PipesTimeoutError,
    PipesUsageError,
)
from pipes_core.protocol.failures import escape_controls, shows_traceback
from pipes_core.protocol.handler import DEFAULT_LOGGER_NAME
from pipes_core.protocol.json_events import event_to_json
from pipes_core.protocol.lines import DEFAULT_MAX_LINE_BYTES
from pipes_core.protocol.results import (
    AssetCheckResult,
    MaterializeResult,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEvent,
    PipesExternalStreamEvent,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesProtocolIssue,
)
from pipes_core.protocol.run_context import PipesRunContext
from pipes_ext._protocol import (
    MAX_DECODED_PARAM_BYTES,
    PIPES_PROTOCOL_VERSION,
    SEVERITY_ERROR,
    escape_asset_key,
    parse_asset_key,
)

__all__ = ["main", "event_to_json"]

EXIT_USAGE = 2
EXIT_SESSION_FAILED = 1
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

_T = TypeVar("_T")

DISTRIBUTION = "pipes-sdk"  # the package whose version ``pipes --version`` prints


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message + _did_you_mean(self, message))


_UNRECOGNIZED = "unrecognized arguments: "
# How alike a mistyped flag and a known one must be to suggest it (difflib's ratio; its own default).
_SUGGEST_CUTOFF = 0.6


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag of ``parser`` and of its subcommands."""
    flags: list[str] = []
    for action in parser._actions:
        flags.extend(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags.extend(_option_strings(sub))
    return flags


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (did you mean --asset?)`` for argparse's "unrecognized arguments: --asest"; "" without a close flag."""
    if not message.startswith(_UNRECOGNIZED):
        return ""
    known = sorted(set(_option_strings(parser)))
    guesses = []
    for word in message[len(_UNRECOGNIZED):].split():
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            close = difflib.get_close_matches(flag, known, n=1, cutoff=_SUGGEST_CUTOFF)
            if close:
                guesses.append((flag, close[0]))
    if not guesses:
        return ""
    if len(guesses) == 1:
        return f" (did you mean {guesses[0][1]}?)"
    return " (did you mean " + ", ".join(f"{right} for {wrong}" for wrong, right in guesses) + "?)"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipes", description="Run a command as a Pipes external process.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="subcommand")
    run = sub.add_parser("run", help="run COMMAND in a Pipes session and report what it sends")
    run.add_argument("--asset", action="append", default=[], metavar="KEY",
                     help="selected asset key, escaped form (a/b\\/c); repeatable")
    run.add_argument("--partition", metavar="KEY", help="the partition key targeted")
    extras = run.add_mutually_exclusive_group()
    extras.add_argument("--extras", metavar="JSON", help="extras as a JSON object")
    extras.add_argument("--extras-file", metavar="PATH", help="extras from a JSON file")
    run.add_argument("--run-id", help="run id (default: a new UUID)")
    run.add_argument("--job-name", help="job name sent in the context")
    run.add_argument("--context-injector", choices=list(CONTEXT_CHANNELS),
                     help="default tempfile (env with --slurm; file with --context-path); s3, gcs, azure: an "
                          "object in --bucket (Azure: --container)")
    run.add_argument("--context-path", help="context file to create (implies --context-injector file)")
    run.add_argument("--message-reader", choices=list(MESSAGE_CHANNELS),
                     help="default tempfile (with --slurm: a file under --shared-dir; file with --messages-path); "
                          "stdio: messages as lines on the command's stdout, its other lines passed through; "
                          "s3, gcs, azure: chunks in --bucket (Azure: --container)")
    run.add_argument("--messages-path", help="messages file to create (implies --message-reader file)")
    blob = run.add_argument_group(
        "Blob stores", "for --context-injector / --message-reader s3, gcs, azure; the client is the SDK's default "
        "(S3: the AWS_* variables, AWS_ENDPOINT_URL for another endpoint; GCS: application default credentials, "
        "STORAGE_EMULATOR_HOST for the emulator; Azure: AZURE_STORAGE_CONNECTION_STRING)")
    blob.add_argument("--bucket", metavar="NAME", help="the S3 or GCS bucket")
    blob.add_argument("--container", metavar="NAME", help="the Azure Blob Storage container")
    blob.add_argument("--prefix", metavar="PREFIX", help="put the objects under this key prefix (e.g. runs/)")
    run.add_argument("--bootstrap", choices=list(BOOTSTRAPS), default="env",
                     help="cli: append --dagster-pipes-context/--dagster-pipes-messages to the command instead of "
                          "setting the env vars")
    run.add_argument("--include-stdio", action="store_true",
                     help="ask the process to forward its stdout/stderr as messages")
    run.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    run.add_argument("--no-strict", action="store_true",
                     help="a command that never opens the channel or breaks the protocol is not an error")
    run.add_argument("--fail-on-check-error", action="store_true",
                     help="exit non-zero when a check of severity ERROR fails")
    run.add_argument("--timeout", metavar="S", help="terminate the command after S seconds (positive, finite)")
    run.add_argument("--trace", metavar="FILE",
                     help="write the run to FILE as a Chrome trace-event JSON file (open it in Perfetto or "
                          "chrome://tracing): the lifecycle phases, each message, each protocol issue")
    slurm = run.add_argument_group("Slurm", "run the command as a Slurm batch job (sbatch)")
    slurm.add_argument("--slurm", action="store_true", help="submit COMMAND with sbatch and follow the job")
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                       help="an sbatch option, passed through; repeatable (--sbatch-arg=--partition=debug)")
    slurm.add_argument("--shared-dir", metavar="DIR",
                       help="a directory the compute nodes share with this machine, for the messages and output "
                            "files (default: a local temp dir, which works only when the job runs here)")
    slurm.add_argument("--slurm-conf", metavar="PATH", help="SLURM_CONF for the Slurm commands")
    docker = run.add_argument_group("Docker", "run the command in a container of IMAGE (the daemon of DOCKER_HOST)")
    docker.add_argument("--docker", metavar="IMAGE", help="run COMMAND in a new container of IMAGE")
    docker.add_argument("--docker-arg", action="append", default=[], metavar="ARG",
                        help="a docker run flag, e.g. --docker-arg=--network=none --docker-arg=-v=/d:/d:ro "
                             "(repeatable; see pipes_core.docker.DOCKER_RUN_FLAGS)")
    ray = run.add_argument_group("Ray", "run the command as a Ray job (the Jobs API of a Ray cluster)")
    ray.add_argument("--ray", metavar="ADDRESS",
                     help="submit COMMAND as a Ray job to this Jobs API (dashboard) address, e.g. "
                          "http://127.0.0.1:8265; messages over the job's log unless --message-reader is given")
    ray.add_argument("--runtime-env", metavar="JSON|@FILE",
                     help="the job's Ray runtime_env as a JSON object, or @FILE to read it from FILE, e.g. "
                          "'{\"working_dir\": \".\", \"excludes\": [\".venv\"], \"pip\": [\"requests\"], "
                          "\"env_vars\": {\"A\": \"1\"}}'; the job runs in the working_dir's copy on the cluster")
    run.add_argument("--max-line-bytes", type=_positive_int, metavar="N", default=DEFAULT_MAX_LINE_BYTES,
                     help="skip and report message lines longer than N bytes (default 64 MiB)")
    add_run_arguments(run)
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG]...")
    add_runs_parser(sub)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _check_asset_key(key: str) -> str:
    parts = parse_asset_key(key)
    if not parts or any(part == "" for part in parts) or escape_asset_key(parts) != key:
        raise _UsageError(f"invalid asset key {key!r}: use non-empty components joined by '/', e.g. a/b\\/c")
    return key


def _load_extras(args: argparse.Namespace) -> dict[str, Any]:
    if args.extras is None and args.extras_file is None:
        return {}
    if args.extras is not None:
        return _json_object("--extras", args.extras, "extras")
    where = f"--extras-file {args.extras_file}"
    return _json_object(where, _read_json_file(where, args.extras_file), "extras")


def _load_runtime_env(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--runtime-env JSON`` or ``--runtime-env @FILE``: a JSON object, for ``--ray`` only."""
    if args.runtime_env is None:
        return None
    if args.ray is None:
        raise _UsageError("--runtime-env needs --ray ADDRESS")
    text: str = args.runtime_env
    if text.startswith("@"):
        where = f"--runtime-env {text}"
        return _json_object(where, _read_json_file(where, text[1:]), "a runtime_env")
    return _json_object("--runtime-env", text, "a runtime_env")


def _json_object(where: str, text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise _UsageError(f"{where} is nested too deeply to be {what}") from exc
    except ValueError as exc:
        raise _UsageError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _UsageError(f"{where} must be a JSON object")
    return value


def _read_json_file(where: str, path: str) -> str:
    """The text of a JSON file named on the command line, at most the bootstrap cap (so ``/dev/zero`` cannot
    exhaust memory); ``where`` names the flag in errors."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DECODED_PARAM_BYTES + 1)
    except OSError as exc:
        raise _UsageError(f"cannot read {where}: {exc.strerror or exc}") from exc
    if len(data) > MAX_DECODED_PARAM_BYTES:
        raise _UsageError(f"{where} is over the {MAX_DECODED_PARAM_BYTES}-byte limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _UsageError(f"{where} is not UTF-8: {exc}") from exc


def _timeout(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise _UsageError(f"--timeout must be positive and finite (seconds), got {text!r}")
    return value


# Continuation lines of text from the child are indented by this much, so none can pass for a line of ours
# (ours start at column 0).
_CONTINUATION = "    "
def _safe(text: str) -> str:
    """Text from the child, made safe to print on a terminal: controls escaped (so it cannot move the cursor,
    clear the screen or reorder text), continuation lines indented (so it cannot start a line of its own)."""
    return ("\n" + _CONTINUATION).join(escape_controls(line) for line in text.split("\n"))


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name (``"NaN"``, ``"Infinity"``, ``"-Infinity"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _strict_json(value: Any) -> str:
    """Strict JSON (no ``NaN``/``Infinity``, which strict parsers reject): non-finite floats become strings."""
    try:
        try:
            return json.dumps(value, allow_nan=False)
        except ValueError:
            return json.dumps(_finite(value), allow_nan=False)
    except RecursionError:
        return json.dumps("<too deeply nested to print>")


# The summary's rule, and what replaces it where the output's encoding cannot show it.
_RULE = "─"
_ASCII_RULE = "-"
_COLOURS = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}
_LEVEL_COLOURS = {"DEBUG": "dim", "INFO": "blue", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "red"}


def version_text() -> str:
    """``pipes --version``: this package's version, the protocol it speaks and the Python running it."""
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown (not installed)"
    python = ".".join(str(part) for part in sys.version_info[:3])
    return f"pipes {version} (Pipes protocol {PIPES_PROTOCOL_VERSION}, Python {python})"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Printer:
    """Prints events as they arrive and keeps the counts for the summary.

    In JSON mode every object starts with ``event``, ``time`` and ``run_id``; ``opened`` also gets the injected
    ``context`` document.
    """

    def __init__(self, out: IO[str], as_json: bool, colour: bool, run_id: str = "",
                 context: dict[str, Any] | None = None) -> None:
        self.out = out
        # What ``out`` can encode (None: it takes any str, e.g. a StringIO). Human output degrades to it: what it
        # cannot show is escaped (\u2500), so a terminal in ASCII or Latin-1 still gets every line and the summary.
        self.encoding: str | None = getattr(out, "encoding", None)
        self.rule = _RULE if self._encodable(_RULE) == _RULE else _ASCII_RULE
        self.as_json = as_json
        self.colour = colour
        self.run_id = run_id
        self.context = context
        self.lock = threading.Lock()
        self.counts = {"materializations": 0, "checks_passed": 0, "checks_failed": 0, "failed_error_checks": 0,
                       "custom_messages": 0, "logs": 0, "protocol_issues": 0}
        self.assets: list[str] = []
        self.remote: Any = None  # the exception the process reported in closed (a PipesRemoteException)

    def paint(self, text: str, colour: str) -> str:
        return f"\033[{_COLOURS[colour]}m{text}\033[0m" if self.colour else text

    def emit(self, record: dict[str, Any]) -> None:
        stamped = {"event": record["event"], "time": _now(), "run_id": self.run_id, **record}
        text = _strict_json(stamped)
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def line(self, text: str) -> None:
        text = self._encodable(text)
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def _encodable(self, text: str) -> str:
        """``text`` with what ``out``'s encoding cannot write escaped (``\\u2500``, ``\\xe9``)."""
        if self.encoding is None:
            return text
        try:
            text.encode(self.encoding)
        except UnicodeEncodeError:
            return text.encode(self.encoding, "backslashreplace").decode(self.encoding)
        except LookupError:  # an encoding Python does not know: ASCII is safe everywhere
            return text.encode("ascii", "backslashreplace").decode("ascii")
        return text

    def __call__(self, event: PipesEvent) -> None:
        self._count(event)
        if self.as_json:
            record = event_to_json(event)
            if isinstance(event, PipesOpenedEvent) and self.context is not None:
                record["context"] = self.context
            self.emit(record)
            return
        tag = self.paint("[pipes]", "dim")
        describe = EVENT_LINES.get(type(event), _other_line)
        self.line(f"{tag} {describe(self, event)}")

    def traceback(self, output_tail: str) -> None:
        """The traceback reported in ``closed``, in full, unless the process printed it (``output_tail``, its
        last output, holds the printout): shown once either way."""
        if self.as_json or self.remote is None or shows_traceback(output_tail, self.remote):
            return
        text = _safe(self.remote.format().rstrip())
        self.line(f"{self.paint('[pipes]', 'dim')} the traceback it reported:\n{_CONTINUATION}{text}")

    def job_state(self, info: Any) -> None:
        """A Slurm job's state change (a :class:`pipes_core.slurm.SlurmJobInfo`)."""
        if self.as_json:
            self.emit({"event": "slurm_job", "job_id": info.job_id, "state": info.state, "reason": info.reason})
        else:
            self.line(f"{self.paint('[pipes]', 'dim')} slurm job {info.job_id} {info.describe()}")

    def _count(self, event: PipesEvent) -> None:
        c = self.counts
        if isinstance(event, MaterializeResult):
            c["materializations"] += 1
            self.assets.append(event.asset_key)
        elif isinstance(event, AssetCheckResult):
            c["checks_passed" if event.passed else "checks_failed"] += 1
            if not event.passed and event.severity == SEVERITY_ERROR:
                c["failed_error_checks"] += 1
        elif isinstance(event, PipesCustomMessageEvent):
            c["custom_messages"] += 1
        elif isinstance(event, PipesLogEvent):
            c["logs"] += 1
        elif isinstance(event, PipesProtocolIssue):
            c["protocol_issues"] += 1


# ---------------------------------------------------------------------------------------------- event lines
# What the human output prints for each event type, after the ``[pipes]`` tag: one function per type, looked up
# by the event's type. A new event type gets its line here (tests/test_cli.py checks every type has one); until
# then it prints as itself (its class name), never as a protocol issue.


def _opened_line(printer: _Printer, event: PipesOpenedEvent) -> str:
    return "opened"


def _closed_line(printer: _Printer, event: PipesClosedEvent) -> str:
    if event.exception is None:
        return "closed"
    printer.remote = event.exception  # its headline here: the traceback is shown once, see _Printer.traceback()
    text = _safe(in_cli_words(event.exception.message.rstrip()))
    return f"closed with {printer.paint('exception', 'red')}: {text}"


def _log_line(printer: _Printer, event: PipesLogEvent) -> str:
    level = printer.paint(f"{_safe(event.level):<8}", _LEVEL_COLOURS.get(event.level, "blue"))
    return f"{level} {_safe(event.message)}"


def _materialization_line(printer: _Printer, event: MaterializeResult) -> str:
    meta = ", ".join(f"{_safe(k)}={_safe(repr(v.value))}" for k, v in event.metadata.items())
    version = f" data_version={_safe(event.data_version)}" if event.data_version is not None else ""
    return (f"{printer.paint('materialized', 'green')} {_safe(event.asset_key)}{version}"
            + (f" ({meta})" if meta else ""))


def _check_line(printer: _Printer, event: AssetCheckResult) -> str:
    verdict = printer.paint("passed", "green") if event.passed else printer.paint("FAILED", "red")
    return f"check {_safe(event.asset_key)}:{_safe(event.check_name)} {verdict} (severity {_safe(event.severity)})"


def _custom_line(printer: _Printer, event: PipesCustomMessageEvent) -> str:
    return f"message {_safe(_strict_json(event.payload))}"


def _stream_line(printer: _Printer, event: PipesExternalStreamEvent) -> str:
    return f"{_safe(event.stream)}: {_safe(event.text.rstrip())}"


def _issue_line(printer: _Printer, event: PipesProtocolIssue) -> str:
    return f"{printer.paint('protocol issue', 'red')}: {_safe(in_cli_words(str(event)))}"


def _other_line(printer: _Printer, event: Any) -> str:
    return f"{_safe(type(event).__name__)}: {_safe(str(event))}"


EVENT_LINES: dict[type, Callable[[_Printer, Any], str]] = {
    PipesOpenedEvent: _opened_line,
    PipesClosedEvent: _closed_line,
    PipesLogEvent: _log_line,
    MaterializeResult: _materialization_line,
    AssetCheckResult: _check_line,
    PipesCustomMessageEvent: _custom_line,
    PipesExternalStreamEvent: _stream_line,
    PipesProtocolIssue: _issue_line,
}
"""Event type -> its line in the human output (after the ``[pipes]`` tag)."""


def _injector(args: argparse.Namespace) -> PipesContextInjector:
    """``--context-path`` alone implies ``--context-injector file``; with another injector it is an error."""
    kind = args.context_injector or (
        "file" if args.context_path is not None else ("env" if args.slurm else "tempfile"))
    if kind != "file" and args.context_path is not None:
        raise _UsageError(f"--context-path is for --context-injector file, not {kind}")
    if kind == "file" and not args.context_path:
        raise _UsageError("--context-injector file needs --context-path PATH")
    options = PipesChannelOptions(path=args.context_path, **_blob_options(args, "--context-injector", kind))
    return _channel("--context-injector", kind, lambda: make_context_injector(kind, options))


def _check_blob_flags(args: argparse.Namespace) -> None:
    """``--bucket`` / ``--container`` / ``--prefix`` only with a blob channel, the bucket word matching it."""
    kinds = {args.context_injector, args.message_reader} & set(BLOB_CHANNELS)
    for given, flag in ((args.bucket, "--bucket"), (args.container, "--container"), (args.prefix, "--prefix")):
        if given is not None and not kinds:
            raise _UsageError(f"{flag} is for --context-injector or --message-reader {'|'.join(BLOB_CHANNELS)}")
    if args.bucket is not None and args.container is not None:
        raise _UsageError("give --bucket (S3, GCS) or --container (Azure), not both")


def _blob_options(args: argparse.Namespace, flag: str, kind: str) -> dict[str, Any]:
    """The ``bucket`` and ``key_prefix`` of a blob channel from ``--bucket`` / ``--container`` and ``--prefix``."""
    if kind not in BLOB_CHANNELS:
        return {}
    word, other = ("--container", "--bucket") if kind == "azure" else ("--bucket", "--container")
    bucket = args.container if kind == "azure" else args.bucket
    if not bucket:
        given = f" (not {other}: that is for {'s3, gcs' if kind == 'azure' else 'azure'})" if (
            args.container if kind != "azure" else args.bucket) else ""
        raise _UsageError(f"{flag} {kind} needs {word} NAME{given}")
    return {"bucket": bucket, "key_prefix": args.prefix}


def _channel(flag: str, kind: str, make: Callable[[], _T]) -> _T:
    """A channel from the registry; its missing SDK or configuration is a usage error naming the flag."""
    try:
        return make()
    except (ImportError, PipesUsageError) as exc:
        raise _UsageError(f"{flag} {kind}: {in_cli_words(str(exc))}") from exc


def _reader(args: argparse.Namespace) -> PipesMessageReader:
    """``--messages-path`` alone implies ``--message-reader file``; with another reader it is an error."""
    kind = args.message_reader or ("file" if args.messages_path is not None else "tempfile")
    if kind != "file" and args.messages_path is not None:
        raise _UsageError(f"--messages-path is for --message-reader file, not {kind}")
    if kind == "file" and not args.messages_path:
        raise _UsageError("--message-reader file needs --messages-path PATH")
    if kind == "stdio" and args.include_stdio:
        raise _UsageError("--include-stdio does not apply to --message-reader stdio: the command's output already "
                          "comes with the messages, and is passed through")
    if kind == "tempfile" and args.slurm:
        from pipes_core.slurm import PipesSlurmMessageReader

        return PipesSlurmMessageReader(args.shared_dir, include_stdio_in_messages=args.include_stdio,
                                       max_line_bytes=args.max_line_bytes)
    options = PipesChannelOptions(path=args.messages_path, include_stdio_in_messages=args.include_stdio,
                                  max_line_bytes=args.max_line_bytes, **_blob_options(args, "--message-reader", kind))
    return _channel("--message-reader", kind, lambda: make_message_reader(kind, options))


def _client(args: argparse.Namespace) -> tuple[PipesClient, dict[str, Any]]:
    """The client for the run, and the options its ``run`` takes beyond the common ones: the launcher whose flag
    was given (:data:`LAUNCHERS`), the local subprocess when none was."""
    _check_blob_flags(args)
    _load_runtime_env(args)  # checked before any client is made: --runtime-env needs --ray
    chosen = [launcher for launcher in LAUNCHERS.values() if launcher.chosen(args)]
    if len(chosen) > 1:
        raise _UsageError(f"{chosen[0].flag} and {chosen[1].flag} cannot be combined: a run has one launcher")
    for launcher in LAUNCHERS.values():
        if launcher in chosen:
            continue
        for dest, flag in launcher.own_flags:
            if getattr(args, dest):
                raise _UsageError(f"{flag} needs {launcher.usage}")
    make = chosen[0].make if chosen else _subprocess_client
    return make(args, not args.no_strict)


def _subprocess_client(args: argparse.Namespace, strict: bool) -> tuple[PipesClient, dict[str, Any]]:
    """No launcher flag: the command runs as a local subprocess."""
    return PipesSubprocessClient(context_injector=_injector(args), message_reader=_reader(args),
                                 strict=strict, bootstrap=args.bootstrap), {}


def _slurm_client(args: argparse.Namespace, strict: bool) -> tuple[PipesClient, dict[str, Any]]:
    """``--slurm``: a batch job; its channels default to files under ``--shared-dir``."""
    from pipes_core.slurm import PipesSlurmClient, SlurmCommands

    if args.shared_dir is not None and not os.path.isdir(args.shared_dir):
        raise _UsageError(f"--shared-dir {args.shared_dir!r} is not a directory")
    client = PipesSlurmClient(shared_dir=args.shared_dir, sbatch_args=args.sbatch_arg,
                              commands=SlurmCommands(slurm_conf=args.slurm_conf), context_injector=_injector(args),
                              message_reader=_reader(args), strict=strict, bootstrap=args.bootstrap)
    return client, {}


def _docker_client(args: argparse.Namespace, strict: bool) -> tuple[PipesClient, dict[str, Any]]:
    """``--docker IMAGE``: the container client, its channels the client's defaults (env + stdout) unless given."""
    from pipes_core.docker import PipesDockerClient, run_options_from_docker_args

    try:
        options = run_options_from_docker_args(args.docker_arg)
    except PipesUsageError as exc:
        raise _UsageError(str(exc)) from exc
    client = PipesDockerClient(
        context_injector=None if args.context_injector is None else _injector(args),
        message_reader=None if args.message_reader is None else _reader(args), strict=strict,
        bootstrap=args.bootstrap)
    return client, {"image": args.docker, **options}


def _ray_client(args: argparse.Namespace, strict: bool) -> tuple[PipesClient, dict[str, Any]]:
    """``--ray ADDRESS``: the job may run on another node, so its channels are the client's defaults (the context
    in an env var, messages over the job's log) unless given."""
    from pipes_core.ray import PipesRayJobClient

    try:
        client = PipesRayJobClient(
            args.ray, context_injector=None if args.context_injector is None else _injector(args),
            message_reader=None if args.message_reader is None else _reader(args), strict=strict,
            bootstrap=args.bootstrap, runtime_env=_load_runtime_env(args))
    except PipesUsageError as exc:
        raise _UsageError(str(exc)) from exc
    return client, {}


@dataclass(frozen=True)
class Launcher:
    """A launcher the command line offers: the flag that chooses it, how it reads that flag, the flags that only
    it takes (``(argparse dest, flag)``: given without it, they are a usage error) and the factory of its client
    and of the options its ``run`` takes beyond the common ones."""

    flag: str
    usage: str  # the flag as a user writes it, in messages ("--docker IMAGE")
    chosen: Callable[[argparse.Namespace], bool]
    make: Callable[[argparse.Namespace, bool], tuple[PipesClient, dict[str, Any]]]
    own_flags: tuple[tuple[str, str], ...] = ()


LAUNCHERS: dict[str, Launcher] = {
    "docker": Launcher("--docker", "--docker IMAGE", lambda args: args.docker is not None, _docker_client,
                       (("docker_arg", "--docker-arg"),)),
    "ray": Launcher("--ray", "--ray ADDRESS", lambda args: args.ray is not None, _ray_client),
    "slurm": Launcher("--slurm", "--slurm", lambda args: bool(args.slurm), _slurm_client,
                      (("sbatch_arg", "--sbatch-arg"), ("shared_dir", "--shared-dir"), ("slurm_conf", "--slurm-conf"))),
}
"""Launcher name -> how the command line chooses and builds it; without any of their flags a run is a local
subprocess. A new launcher is one entry here (and its flags in the parser)."""


def _run(args: argparse.Namespace, out: IO[str]) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise _UsageError("no command given: pipes run [OPTIONS] -- COMMAND [ARG]...")
    assets = [_check_asset_key(key) for key in args.asset]
    extras = _load_extras(args)
    timeout = _timeout(args.timeout)
    context = PipesRunContext(asset_keys=assets or None, partition_key=args.partition, job_name=args.job_name,
                              **({"run_id": args.run_id} if args.run_id else {}))
    injected: dict[str, Any] | None = None
    if args.json:  # shown on `opened`; the session builds (and checks) the same document for the child
        try:
            injected = context.to_context_data(extras)
        except PipesUsageError as exc:
            raise _UsageError(str(exc)) from exc
    client, options = _client(args)
    trace = None if args.trace is None else _trace_writer(args.trace)
    if trace is not None:
        options["observer"] = trace
    try:
        options.update(durable_options(args))
    except PipesUsageError as exc:
        raise _UsageError(str(exc)) from exc
    colour = not args.json and out.isatty() and os.environ.get("NO_COLOR") is None
    printer = _Printer(out, args.json, colour, run_id=context.run_id, context=injected)
    if args.slurm:
        options["on_job_state"] = printer.job_state
    external = logging.getLogger(DEFAULT_LOGGER_NAME)  # events are printed by us, not by logging
    if not any(isinstance(h, logging.NullHandler) for h in external.handlers):  # once, however many runs
        external.addHandler(logging.NullHandler())
    external.propagate = False
    if _LIBRARY_WARNINGS not in client_logger.handlers:  # once, however many runs
        client_logger.addHandler(_LIBRARY_WARNINGS)
    client_logger.propagate = False
    started = time.monotonic()
    invocation: PipesClientCompletedInvocation | None = None
    session: PipesSession | None = None
    error: str | None = None
    try:
        try:
            options["command"] = command  # every launcher's own option: each run() takes it
            invocation = client.run(context=context, extras=extras, timeout_seconds=timeout, on_event=printer,
                                    retain_messages=False, stdout=sys.stderr if args.json else None, **options)
            code = 0
        except KeyboardInterrupt:
            code, error = EXIT_INTERRUPTED, "interrupted"
        except PipesTimeoutError as exc:
            code, error = EXIT_TIMEOUT, str(exc).splitlines()[0]
        except PipesInterruptedError as exc:
            code, error = 128 + 15, str(exc).splitlines()[0]
        except PipesExecutionError as exc:
            if _argument_list_too_long(exc):
                what = ("the context is too large for an environment variable (DAGSTER_PIPES_CONTEXT); use "
                        "--context-injector tempfile or file"
                        if isinstance(getattr(client, "context_injector", None), PipesEnvContextInjector)
                        else "the environment and arguments are too large for the system")
                raise _UsageError(f"cannot start {command[0]!r}: {what}") from exc
            error = str(exc).splitlines()[0]
            invocation = exc.invocation
            if exc.exit_code is None:
                code = 127  # the command could not be started, as a shell says
            elif exc.exit_code < 0:
                code = 128 - exc.exit_code
            else:
                code = exc.exit_code or EXIT_SESSION_FAILED
        except PipesUsageError as exc:
            raise _UsageError(str(exc)) from exc
        except PipesError as exc:  # e.g. the messages file could not be read to its end: what arrived is counted
            code, error = EXIT_SESSION_FAILED, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            invocation = getattr(exc, "invocation", None)
            session = getattr(exc, "session", None)
    finally:
        if trace is not None:
            trace.close()  # ends the file when the run never started (after a run: already ended)
    if invocation is not None:
        session = invocation.session
    if code == 0 and args.fail_on_check_error and printer.counts["failed_error_checks"]:
        code, error = EXIT_SESSION_FAILED, "a check of severity ERROR failed"
    warnings = []
    if error is None and session is not None and session.opened and not session.closed:  # a failure says more
        warnings.append(MISSING_CLOSED_WARNING)
    summary = {
        "event": "summary",
        "exit_code": code,
        "duration_seconds": round(time.monotonic() - started, 3),
        "opened": bool(session and session.opened),
        "closed": bool(session and session.closed),
        "assets": printer.assets,
        **printer.counts,
        "error": None if error is None else in_cli_words(error),
        "warnings": warnings,
    }
    if args.json:
        printer.emit(summary)
    else:
        printer.traceback(invocation.output_tail if invocation is not None else "")
        _print_summary(printer, summary)
    return code


def _trace_writer(path: str) -> TraceFileWriter:
    try:
        return TraceFileWriter(path)
    except OSError as exc:
        raise _UsageError(f"cannot write the trace file {path!r} ({exc.strerror or exc}): pass --trace a path "
                          "in a writable directory") from exc


MISSING_CLOSED_WARNING = ("the command opened the Pipes channel but never sent closed: messages it buffered may be "
                          "missing (does it leave open_pipes()'s with block, or call close()?)")


class _LibraryWarnings(logging.Handler):
    """The library's warnings (logger ``pipes_core``) on stderr, in the command line's words; a fact the summary
    says (a missing ``closed``) is left to it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, LOG_FACT, None) == FACT_MISSING_CLOSED:
            return
        try:
            sys.stderr.write(_safe(in_cli_words(record.getMessage())) + "\n")
            sys.stderr.flush()
        except Exception:  # a warning that cannot be written must not end the run, nor print a traceback
            pass


_LIBRARY_WARNINGS = _LibraryWarnings()


def _argument_list_too_long(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno == errno.E2BIG


def _print_summary(printer: _Printer, s: dict[str, Any]) -> None:
    ok = s["exit_code"] == 0
    status = printer.paint("succeeded", "green") if ok else printer.paint(f"failed (exit {s['exit_code']})", "red")
    rows = [
        ("status", status),
        ("assets", ", ".join(_safe(key) for key in s["assets"]) or "-"),
        ("checks", f"{s['checks_passed']} passed, {s['checks_failed']} failed"),
        ("messages", f"{s['custom_messages']} custom, {s['logs']} logs, {s['protocol_issues']} protocol issues"),
        ("duration", f"{s['duration_seconds']:.3f} s"),
    ]
    if s["error"]:
        rows.append(("error", _safe(s["error"])))
    rows.extend(("warning", printer.paint(_safe(text), "yellow")) for text in s["warnings"])
    width = max(len(name) for name, _ in rows)
    printer.line(printer.paint(f"{printer.rule * 2} summary {printer.rule * 30}", "bold"))
    for name, value in rows:
        printer.line(f"{name:<{width}}  {value}")


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """Entry point of the ``pipes`` console script; returns the exit code."""
    out = out or sys.stdout
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.version:
            out.write(version_text() + "\n")
            return 0
        if args.subcommand == "runs":
            try:
                return runs_main(args, out)
            except PipesError as exc:  # a usage problem, or a store that cannot be used: said, no traceback
                raise _UsageError(str(exc)) from exc
        if args.subcommand != "run":
            raise _UsageError("usage: pipes run [OPTIONS] -- COMMAND [ARG]...  (or pipes --version)")
        return _run(args, out)
    except _UsageError as exc:
        sys.stderr.write(f"pipes: error: {_safe(in_cli_words(str(exc)))}\n")
        return EXIT_USAGE
    except Exception as exc:  # the command line never prints a traceback
        sys.stderr.write(f"pipes: internal error: {type(exc).__name__}: {_safe(str(exc))}\n")
        return EXIT_SESSION_FAILED
