"""The conformance cases: what the harness is told to do, and what the orchestrator must then see.

Each case has a *scope*, the channel axes it runs over (the others are fixed to a default; see ``_runner.plan``):

* ``full``: every bootstrap mode x context channel x message channel;
* ``context``: every bootstrap mode x context channel (messages over the default channel);
* ``messages``: every message channel (env bootstrap, env context).

What is seen is a list of messages in arrival order, each a JSON object with ``method`` and the fields
``pipes_core`` decoded (metadata with ``__infer__`` resolved). ``body`` is what must arrive between
``opened`` and ``closed`` (or after ``opened`` for a case that never closes), exactly and in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipes_core import MetadataValue
from pipes_ext._protocol import escape_asset_key

from ._compare import first_difference

__all__ = ["CASES", "Case", "ExceptionSpec", "Seen", "SCOPES", "case_by_name"]

SCOPES = ("full", "context", "messages")

Message = dict[str, Any]


@dataclass(frozen=True)
class ExceptionSpec:
    """The exception ``closed`` must carry: its message contains ``message``; its cause's and context's
    messages contain ``cause`` / ``context`` (None: that link must be null)."""

    message: str
    cause: str | None = None
    context: str | None = None


@dataclass
class Seen:
    """What one run produced, for a case's own ``check``."""

    messages: list[Message]
    body: list[Message]
    context_data: dict[str, Any]
    returncode: int | None
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    scope: str
    steps: tuple[Mapping[str, Any], ...]
    # Expected messages between opened and closed; a function of the context data sent, or None (``check`` only).
    body: Callable[[dict[str, Any]], list[Message]] | None
    run_context: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Seen], str | None] | None = None
    exit_code: int | None = 0  # None: any non-zero code
    closed: bool = True
    exception: ExceptionSpec | None = None
    requires: tuple[str, ...] = ()
    capture: bool = False  # ask for include_stdio_in_messages
    # False: log_external_stream messages may also arrive after closed (a case about the streams, not the order)
    streams_before_closed: bool = True
    skip_messages: Mapping[str, str] = field(default_factory=dict)  # message channel -> why not run there


# ------------------------------------------------------------------------------------------------ fixtures

RUN_ID = "5b3c1f0e-8a7d-4e2b-9c61-0d2f4a6b8e10"
KEY_A = "orders"
KEY_B = escape_asset_key(["raw", "users/2024"])  # raw/users\/2024
KEY_C = escape_asset_key(["back\\slash"])  # back\\slash
KEY_U = escape_asset_key(["\u00fcn\u00efc\u00f8d\u00e9", "\u952e/\u503c"])
ASSETS = {"asset_keys": [KEY_A, KEY_B, KEY_C], "run_id": RUN_ID}

TABLE_COLUMNS = [
    {"name": "id", "type": "int"},
    {
        "name": "name",
        "type": "string",
        "description": "who",
        "tags": {"pii": "yes"},
        "constraints": {"nullable": False, "unique": True, "other": ["trimmed"]},
    },
]
# One entry per wire metadata type (all 17: the 16 concrete ones and __infer__ with each inferable value).
ALL_METADATA: dict[str, dict[str, Any]] = {
    "infer_text": {"raw_value": "plain", "type": "__infer__"},
    "infer_int": {"raw_value": 12, "type": "__infer__"},
    "infer_float": {"raw_value": 2.5, "type": "__infer__"},
    "infer_bool": {"raw_value": True, "type": "__infer__"},
    "infer_null": {"raw_value": None, "type": "__infer__"},
    "infer_json": {"raw_value": {"k": [1, 2]}, "type": "__infer__"},
    "text": {"raw_value": "hello", "type": "text"},
    "url": {"raw_value": "https://example.com/a?b=1&c=%20", "type": "url"},
    "path": {"raw_value": "/data/out/part-0.parquet", "type": "path"},
    "notebook": {"raw_value": "/notebooks/report.ipynb", "type": "notebook"},
    "md": {"raw_value": "# Title\n\n* item `code`", "type": "md"},
    "json_object": {"raw_value": {"nested": {"list": [1, None, "x"]}, "empty": {}}, "type": "json"},
    "json_array": {"raw_value": [1, {"x": [2]}], "type": "json"},
    "float": {"raw_value": 3.25, "type": "float"},
    "float_whole": {"raw_value": 3, "type": "float"},
    "int": {"raw_value": -9007199254740991, "type": "int"},
    "bool": {"raw_value": False, "type": "bool"},
    "dagster_run": {"raw_value": RUN_ID, "type": "dagster_run"},
    "asset": {"raw_value": "upstream/asset", "type": "asset"},
    "null": {"raw_value": None, "type": "null"},
    "timestamp": {"raw_value": 1700000000.5, "type": "timestamp"},
    "table": {
        "raw_value": {"records": [{"id": 1, "name": "a"}, {"id": 2, "name": None}], "schema": TABLE_COLUMNS},
        "type": "table",
    },
    "table_schema": {"raw_value": {"columns": TABLE_COLUMNS}, "type": "table_schema"},
    "table_column_lineage": {
        "raw_value": {"deps_by_column": {"id": [{"asset_key": "upstream", "column_name": "uid"}],
                                         "name": [{"asset_key": "other/up", "column_name": "n"}]}},
        "type": "table_column_lineage",
    },
}
JSON_PAYLOADS: list[Any] = [
    None,
    True,
    False,
    0,
    -15,
    9007199254740991,
    1.5,
    -2.5e-08,
    "",
    "text with \"quotes\", \\backslashes\\ and\nnew lines\ttabs",
    [],
    [1, "two", None, [3.5, [False]]],
    {},
    {"nested": {"list": [1, 2], "null": None, "bool": True, "deep": {"deeper": {"deepest": []}}}},
]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
NON_ASCII = "h\u00e9llo \u2713 \U0001f680 \u4e2d\u6587 \u05e2\u05d1\u05e8\u05d9\u05ea a\u0301 \u2028|\t|\u0000|"
BIG_SIZE = 10 * 1024 * 1024  # 10 MiB (> 10 MB)
MANY = 10_000
CRASH_CODE = 17


def wire_metadata(metadata: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """Metadata as pipes_core hands it back: ``__infer__`` resolved, float values as floats."""
    if not metadata:
        return None
    out: dict[str, Any] = {}
    for label, entry in metadata.items():
        value = MetadataValue.from_wire(dict(entry))
        out[label] = {"type": value.type, "raw_value": value.value}
    return out


def _materialization(asset_key: str, metadata: Mapping[str, Mapping[str, Any]] | None,
                     data_version: str | None) -> tuple[Message, Message]:
    step = {"op": "materialize", "asset_key": asset_key, "metadata": metadata, "data_version": data_version}
    seen = {"method": "report_asset_materialization", "asset_key": asset_key, "data_version": data_version,
            "metadata": wire_metadata(metadata) or {}}
    return step, seen


def _check(asset_key: str, name: str, passed: bool, severity: str,
           metadata: Mapping[str, Mapping[str, Any]] | None) -> tuple[Message, Message]:
    step = {"op": "check", "asset_key": asset_key, "check_name": name, "passed": passed, "severity": severity,
            "metadata": metadata}
    seen = {"method": "report_asset_check", "asset_key": asset_key, "check_name": name, "passed": passed,
            "severity": severity, "metadata": wire_metadata(metadata) or {}}
    return step, seen


def _log(level: str, message: str) -> tuple[Message, Message]:
    return {"op": "log", "level": level, "message": message}, {"method": "log", "level": level, "message": message}


def _custom(payload: Any) -> tuple[Message, Message]:
    return {"op": "custom", "payload": payload}, {"method": "report_custom_message", "payload": payload}


def _stream(stream: str, text: str) -> tuple[Message, Message]:
    return ({"op": "stream", "stream": stream, "text": text},
            {"method": "log_external_stream", "stream": stream, "text": text, "extras": {}})


def _pairs(*pairs: tuple[Message, Message]) -> tuple[tuple[Message, ...], list[Message]]:
    return tuple(p[0] for p in pairs), [p[1] for p in pairs]


def _fixed(messages: list[Message]) -> Callable[[dict[str, Any]], list[Message]]:
    return lambda _context: messages


def _echo(context: dict[str, Any]) -> list[Message]:
    return [{"method": "report_custom_message", "payload": {"context": context}}]


def _messages_case(name: str, description: str, *pairs: tuple[Message, Message],
                   run_context: Mapping[str, Any] = ASSETS, **kwargs: Any) -> Case:
    steps, seen = _pairs(*pairs)
    return Case(name, description, "messages", steps, _fixed(seen), run_context=run_context, **kwargs)


def _context_case(name: str, description: str, run_context: Mapping[str, Any], **kwargs: Any) -> Case:
    return Case(name, description, "context", ({"op": "echo_context"},), _echo, run_context=run_context, **kwargs)


# ------------------------------------------------------------------------------------------------ checks


def _joined(seen: Seen, stream: str) -> str:
    return "".join(m["text"] for m in seen.messages if m["method"] == "log_external_stream" and m["stream"] == stream)


CAPTURED_OUT = "captured on stdout \u2713\n"
CAPTURED_ERR = "captured on stderr\n"


def _check_capture(seen: Seen) -> str | None:
    out, err = _joined(seen, "stdout"), _joined(seen, "stderr")
    if CAPTURED_OUT not in out:
        return f"stdout capture: {CAPTURED_OUT!r} not found in the stdout stream messages (got {out[:200]!r})"
    if CAPTURED_ERR not in err:
        return f"stderr capture: {CAPTURED_ERR!r} not found in the stderr stream messages (got {err[:200]!r})"
    return None


def _check_separate(seen: Seen) -> str | None:
    out, err = _joined(seen, "stdout"), _joined(seen, "stderr")
    if CAPTURED_ERR in out:
        return f"streams mixed: the text written to stderr ({CAPTURED_ERR!r}) also arrived as stdout: {out[:200]!r}"
    if CAPTURED_OUT in err:
        return f"streams mixed: the text written to stdout ({CAPTURED_OUT!r}) also arrived as stderr: {err[:200]!r}"
    return _check_capture(seen)


_BLOB_CRASH = ("blob-store writers buffer and upload in the background, so a hard exit loses what is buffered by "
               "design; the crash case runs on the file and stdio channels")

# ------------------------------------------------------------------------------------------------ the cases


# Each case is one entry of the tables below, in the order they run; ``CASES`` is their concatenation.

_every_steps, _every_seen = _pairs(
    _log("INFO", "every method"),
    _materialization(KEY_A, {"rows": {"raw_value": 3, "type": "int"}}, "v1"),
    _check(KEY_A, "non_empty", True, "ERROR", None),
    _custom({"ok": True}),
    _stream("stdout", "external text\n"),
)
_LIFECYCLE_CASES: tuple[Case, ...] = (
    Case("opened_closed", "opened first and closed last with nothing between; exit code 0", "full", (),
         _fixed([]), run_context={"run_id": RUN_ID}),
    Case("every_method", "each of the seven methods once (opened, log, materialization, check, custom message, "
         "external stream, closed), in order", "messages", _every_steps, _fixed(_every_seen), run_context=ASSETS),
)

# name -> (description, run context, extras): the harness echoes the context it received.
_CONTEXT_TABLE: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "context_assets": (
        "multi-asset keys with escaping (/ and \\ inside components, non-ASCII), code versions and provenance",
        {
            "asset_keys": [KEY_A, KEY_B, KEY_C, KEY_U],
            "code_version_by_asset_key": {KEY_A: "cv-1", KEY_B: None, KEY_U: "cv-\u00fc"},
            "provenance_by_asset_key": {
                KEY_A: {"code_version": "cv-0", "input_data_versions": {"up/stream": "dv-1", "x\\/y": "dv-2"},
                        "is_user_provided": True},
                KEY_C: {"code_version": "cv-c", "input_data_versions": {}, "is_user_provided": False},
            },
            "run_id": RUN_ID,
        },
        {},
    ),
    "context_partition_key": (
        "a single partition key (also sent as a one-key range) with its time window, and a job name",
        {
            "asset_keys": [KEY_A],
            "partition_key": "2024-01-15",
            "partition_time_window": ("2024-01-15T00:00:00+00:00", "2024-01-16T00:00:00+00:00"),
            "run_id": RUN_ID,
            "job_name": "daily_job",
        },
        {},
    ),
    "context_partition_range": (
        "a partition key range (no single key) with its time window",
        {
            "asset_keys": [KEY_A, KEY_B],
            "partition_key_range": ("2024-01-01", "2024-01-31"),
            "partition_time_window": ("2024-01-01T00:00:00+00:00", "2024-02-01T00:00:00+00:00"),
            "run_id": RUN_ID,
        },
        {},
    ),
    "context_run": (
        "run id, job name (non-ASCII) and retry number of a step with no assets (asset_keys null)",
        {"run_id": RUN_ID, "job_name": "nightly \u2014 j\u00f6b", "retry_number": 3},
        {},
    ),
    "context_extras": (
        "extras of every JSON type, nested, with non-ASCII keys and values",
        {"run_id": RUN_ID},
        {
            "str": "v",
            "int": 7,
            "big_int": 9007199254740991,
            "float": 0.25,
            "bool": False,
            "null": None,
            "list": [1, "two", None, [3.5]],
            "nested": {"deep": {"deeper": {"deepest": [{}, []]}}},
            "unicode": NON_ASCII,
            "k\u00ebÿ \u2713": "key with non-ASCII",
            "quote\"key": "back\\slash\nnew line",
            "empty_object": {},
            "empty_list": [],
        },
    ),
}
_CONTEXT_CASES = tuple(
    _context_case(name, description, run_context, extras=extras)
    for name, (description, run_context, extras) in _CONTEXT_TABLE.items()
)

# name -> (description, the (step, seen) pairs): messages sent in order over the selected assets.
_MESSAGE_TABLE: dict[str, tuple[str, tuple[tuple[Message, Message], ...]]] = {
    "metadata_types": (
        "a materialization carrying every metadata type (17), with a data version",
        (_materialization(KEY_A, ALL_METADATA, "dv-42"),),
    ),
    "materializations": (
        "materializations of three selected assets by escaped key, with and without metadata and data version",
        (
            _materialization(KEY_A, None, None),
            _materialization(KEY_B, {"n": {"raw_value": 1, "type": "__infer__"}}, "v2"),
            _materialization(KEY_C, {"note": {"raw_value": "c", "type": "text"}}, None),
        ),
    ),
    "checks": (
        "asset checks at both severities (ERROR, WARN), passed and failed, with and without metadata",
        (
            _check(KEY_A, "passes_error", True, "ERROR", None),
            _check(KEY_A, "fails_error", False, "ERROR", {"bad_rows": {"raw_value": 5, "type": "int"}}),
            _check(KEY_B, "passes_warn", True, "WARN", {"ratio": {"raw_value": 0.75, "type": "float"}}),
            _check(KEY_B, "fails_warn", False, "WARN", {"why": {"raw_value": "**late**", "type": "md"}}),
        ),
    ),
    "custom_payloads": (
        "custom messages with payloads of every JSON type (null, booleans, numbers, strings, arrays, objects)",
        tuple(_custom(p) for p in JSON_PAYLOADS),
    ),
    "log_levels": (
        "a log message at every level: DEBUG, INFO, WARNING, ERROR, CRITICAL (one multi-line)",
        tuple(_log(level, f"{level.lower()} message" + ("\nsecond line" if level == "ERROR" else ""))
              for level in LOG_LEVELS),
    ),
}
_MESSAGE_CASES = (
    *(_messages_case(name, description, *pairs) for name, (description, pairs) in _MESSAGE_TABLE.items()),
    _messages_case(
        "external_stream",
        "log_external_stream to stdout and stderr, with and without a final newline",
        _stream("stdout", "to stdout\n"),
        _stream("stderr", "to stderr\n"),
        _stream("stdout", "no final newline"),
        requires=("external_stream",),
    ),
    _messages_case(
        "non_ascii",
        "non-ASCII (accents, CJK, RTL, emoji, combining marks, U+2028, NUL) in keys, labels, names and texts",
        _log("INFO", NON_ASCII),
        _materialization(KEY_U, {"gr\u00f6\u00dfe \u2713": {"raw_value": "\u65e5\u672c\u8a9e", "type": "text"}},
                         "v-\u00e9"),
        _check(KEY_U, "pr\u00fcfung \u2713", True, "WARN", None),
        _custom({"\u043a\u043b\u044e\u0447": "\u0437\u043d\u0430\u0447\u0435\u043d\u0438\u0435", "text": NON_ASCII}),
        _stream("stdout", NON_ASCII + "\n"),
        run_context={"asset_keys": [KEY_U], "run_id": RUN_ID},
    ),
)

_exit_steps, _exit_seen = _pairs(_custom({"before": "exit"}), _log("INFO", "exiting with 3"))
_crash_steps, _crash_seen = _pairs(_custom({"before": "crash"}), _log("WARNING", "about to crash"))
_VOLUME_AND_EXIT_CASES: tuple[Case, ...] = (
    Case(
        "large_payload",
        f"one custom message of {BIG_SIZE} characters (10 MiB) arrives whole",
        "messages",
        ({"op": "custom_big", "size": BIG_SIZE, "char": "x"},),
        _fixed([{"method": "report_custom_message", "payload": {"size": BIG_SIZE, "data": "x" * BIG_SIZE}}]),
        run_context={"run_id": RUN_ID},
    ),
    Case(
        "many_messages",
        f"{MANY} custom messages arrive, all of them, in order",
        "messages",
        ({"op": "custom_many", "count": MANY},),
        _fixed([{"method": "report_custom_message", "payload": {"seq": i}} for i in range(MANY)]),
        run_context={"run_id": RUN_ID},
    ),
    Case(
        "exit_nonzero",
        "messages, closed, then exit code 3: the messages arrive and the exit code is 3",
        "messages",
        (*_exit_steps, {"op": "exit", "code": 3}),
        _fixed(_exit_seen),
        run_context={"run_id": RUN_ID},
        exit_code=3,
    ),
    Case(
        "crash_before_closed",
        f"messages, then a crash (exit {CRASH_CODE}) without closed: the messages already written still arrive",
        "messages",
        (*_crash_steps, {"op": "crash"}),
        _fixed(_crash_seen),
        run_context={"run_id": RUN_ID},
        exit_code=CRASH_CODE,
        closed=False,
        skip_messages={"s3": _BLOB_CRASH, "gcs": _BLOB_CRASH, "azure": _BLOB_CRASH},
    ),
)

# name -> (description, the raise step's fields, the exception closed must carry, capabilities required).
_ERROR_TABLE: dict[str, tuple[str, Message, ExceptionSpec, tuple[str, ...]]] = {
    "error_reported": (
        "an error raised in the open context is reported in closed (no cause, no context); exit code non-zero",
        {"message": "conformance boom", "cause": None},
        ExceptionSpec("conformance boom"),
        ("error_reporting",),
    ),
    "error_cause": (
        "an error raised from a cause: closed carries both, the cause under \"cause\"",
        {"message": "outer failure", "cause": "root cause"},
        ExceptionSpec("outer failure", cause="root cause"),
        ("error_reporting",),
    ),
    "error_context": (
        "an error raised while handling another: closed carries both, the first under \"context\"",
        {"message": "failure while handling", "cause": None, "context": "first failure"},
        ExceptionSpec("failure while handling", context="first failure"),
        ("error_reporting", "error_context"),
    ),
}
_before_steps, _before_seen = _pairs(_custom({"before": "raise"}))
_ERROR_CASES = tuple(
    Case(name, description, "messages", (*_before_steps, {"op": "raise", **raise_fields}), _fixed(_before_seen),
         run_context={"run_id": RUN_ID}, exit_code=None, exception=exception, requires=requires)
    for name, (description, raise_fields, exception, requires) in _ERROR_TABLE.items()
)

# Stdio capture: text printed to both streams, then a log; checked by a function (streams may interleave).
_capture_steps, _capture_seen = _pairs(_log("INFO", "after printing"))
_PRINTS = ({"op": "print", "stream": "stdout", "text": CAPTURED_OUT},
           {"op": "print", "stream": "stderr", "text": CAPTURED_ERR})
_NOT_ON_STDIO = {"stdio": "stdio capture needs a message channel other than the process's own stdout"}
# name -> (description, check, streams_before_closed)
_CAPTURE_TABLE: dict[str, tuple[str, Callable[[Seen], str | None], bool]] = {
    "stdio_capture": (
        "with include_stdio_in_messages, text printed to stdout and to stderr arrives as log_external_stream "
        "messages, all before closed",
        _check_capture,
        True,
    ),
    "stdio_capture_separate": (
        "with include_stdio_in_messages, stdout text arrives on the stdout stream only and stderr text on the "
        "stderr stream only (their order against closed is stdio_capture's concern)",
        _check_separate,
        False,
    ),
}


def _capture_check(check: Callable[[Seen], str | None]) -> Callable[[Seen], str | None]:
    return lambda seen: check(seen) or _body_without_streams(seen, _capture_seen)


_CAPTURE_CASES = tuple(
    Case(name, description, "messages", (*_PRINTS, *_capture_steps), None, run_context={"run_id": RUN_ID},
         check=_capture_check(check), requires=("stdio_capture",), capture=True, skip_messages=_NOT_ON_STDIO,
         streams_before_closed=streams_before_closed)
    for name, (description, check, streams_before_closed) in _CAPTURE_TABLE.items()
)


def _body_without_streams(seen: Seen, expected: list[Message]) -> str | None:
    others = [m for m in seen.body if m["method"] != "log_external_stream"]
    return first_difference(expected, others, "messages (other than log_external_stream)")


CASES: tuple[Case, ...] = (*_LIFECYCLE_CASES, *_CONTEXT_CASES, *_MESSAGE_CASES, *_VOLUME_AND_EXIT_CASES,
                           *_ERROR_CASES, *_CAPTURE_CASES)


def case_by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(name)
