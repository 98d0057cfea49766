"""The Pipes wire protocol, version "0.1": names, codecs, builders and validators.

This module is pure: standard library only, no I/O, no global state. Both sides use it: ``pipes_ext``
builds and validates what it sends with it, ``pipes_core`` imports it (never copies it) to encode bootstrap
params and to validate what it reads. Every string that travels on the wire is a named constant here.

Strategy for validation: builders used by the external side raise :class:`PipesUsageError` (the caller
passed something the protocol cannot carry); parsers used by the orchestrator raise
:class:`PipesProtocolError` (the peer sent something the protocol does not allow). Unknown *extra* keys in
params and context data are tolerated, so a newer peer can add fields without breaking an older one.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib

from ._errors import PipesProtocolError, PipesProtocolErrorKind, PipesUsageError

_Kind = PipesProtocolErrorKind

# `typing` is not imported at run time: it costs start-up time and every annotation here is a string.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, Final

__all__ = [
    # versions and envelope
    "PIPES_PROTOCOL_VERSION",
    # JSON documents
    "MAX_JSON_DEPTH",
    "JSON_WHITESPACE",
    "json_too_deep",
    "check_json_depth",
    "loads_json_document",
    "PIPES_PROTOCOL_VERSION_FIELD",
    "MESSAGE_METHOD_FIELD",
    "MESSAGE_PARAMS_FIELD",
    # bootstrap
    "DAGSTER_PIPES_CONTEXT_ENV_VAR",
    "DAGSTER_PIPES_MESSAGES_ENV_VAR",
    "DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT",
    "DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT",
    "MAX_DECODED_PARAM_BYTES",
    "encode_param",
    "decode_param",
    # channel params
    "PARAM_PATH",
    "PARAM_DATA",
    "PARAM_STDIO",
    "PARAM_BUFFERED_STDIO",
    "PARAM_INCLUDE_STDIO_IN_MESSAGES",
    "include_stdio_param",
    "PARAM_BUCKET",
    "PARAM_KEY",
    "PARAM_KEY_PREFIX",
    "STREAM_STDOUT",
    "STREAM_STDERR",
    "STREAMS",
    # methods
    "METHOD_OPENED",
    "METHOD_CLOSED",
    "METHOD_LOG",
    "METHOD_REPORT_ASSET_MATERIALIZATION",
    "METHOD_REPORT_ASSET_CHECK",
    "METHOD_REPORT_CUSTOM_MESSAGE",
    "METHOD_LOG_EXTERNAL_STREAM",
    "METHODS",
    "PARAM_PAYLOAD",
    "PARAM_EXTRAS",
    "PARAM_EXCEPTION",
    "PARAM_MESSAGE",
    "PARAM_LEVEL",
    "PARAM_ASSET_KEY",
    "PARAM_DATA_VERSION",
    "PARAM_METADATA",
    "PARAM_CHECK_NAME",
    "PARAM_PASSED",
    "PARAM_SEVERITY",
    "PARAM_STREAM",
    "PARAM_TEXT",
    "DEFAULT_LOG_LEVEL",
    "SEVERITY_WARN",
    "SEVERITY_ERROR",
    "SEVERITIES",
    "LOG_LEVELS",
    "normalize_log_level",
    # context data
    "CONTEXT_ASSET_KEYS",
    "CONTEXT_CODE_VERSION_BY_ASSET_KEY",
    "CONTEXT_PROVENANCE_BY_ASSET_KEY",
    "CONTEXT_PARTITION_KEY",
    "CONTEXT_PARTITION_KEY_RANGE",
    "CONTEXT_PARTITION_TIME_WINDOW",
    "CONTEXT_RUN_ID",
    "CONTEXT_JOB_NAME",
    "CONTEXT_RETRY_NUMBER",
    "CONTEXT_EXTRAS",
    "CONTEXT_DATA_KEYS",
    "RANGE_START",
    "RANGE_END",
    "empty_context_data",
    "validate_context_data",
    # asset keys
    "ESCAPE_CHARACTER",
    "ASSET_KEY_SEPARATOR",
    "escape_asset_key",
    "parse_asset_key",
    # metadata
    "METADATA_TYPES",
    "METADATA_TYPE_INFER",
    "metadata_problem",
    "normalize_metadata",
    "infer_metadata_type",
    # exceptions
    "EXCEPTION_KEYS",
    "serialize_exception",
    "validate_exception",
    "salvage_exception",
    # messages
    "make_message",
    "dumps_message",
    "dumps_custom_message",
    "parse_message_line",
    "load_message_line",
    "MessageParamSpec",
    "MethodSpec",
    "METHOD_SPECS",
    "validate_message",
]

# --------------------------------------------------------------------------------------------------------------
# Envelope
# --------------------------------------------------------------------------------------------------------------

PIPES_PROTOCOL_VERSION = "0.1"
PIPES_PROTOCOL_VERSION_FIELD = "__dagster_pipes_version"
MESSAGE_METHOD_FIELD = "method"
MESSAGE_PARAMS_FIELD = "params"

# --------------------------------------------------------------------------------------------------------------
# JSON documents: every message line, bootstrap value and context file is one JSON document.
# --------------------------------------------------------------------------------------------------------------

# How deep a JSON document may nest (the outermost object or list is level 1), on both sides: the external side
# refuses to send deeper (PipesUsageError), the orchestrator reports a deeper line as a TOO_DEEP issue and reads
# on, and a deeper bootstrap value or context file is a PipesProtocolError. 128 is far deeper than anything the
# protocol itself nests (a table metadata entry inside a message is 10 levels) or than real payloads, and far
# below the ~1,000 levels at which Python's json module raises RecursionError (it shares the interpreter's
# recursion limit with the caller's own stack, so the margin matters on the external side, called from user
# code). It is also serde_json's default limit, so what we accept a Rust peer accepts too.
MAX_JSON_DEPTH = 128


def json_too_deep(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``value`` (decoded JSON: dicts, lists, scalars) nests more than ``limit`` levels deep.

    Iterative (a hostile document cannot exhaust the stack) and stops at the first level past the limit.
    """
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            children = container.values() if isinstance(container, dict) else container
            below.extend(child for child in children if isinstance(child, (dict, list)))
        level = below
    return False


def _line_too_deep(text: str | bytes, value: object, limit: int) -> bool:
    """Depth check of ``value`` encoded as ``text``, at no cost for short or flat text: ``text`` can only nest
    past ``limit`` if it holds more than ``limit`` opening brackets (brackets inside strings only loosen this)."""
    if isinstance(text, str):
        if len(text) <= limit or text.count("{") + text.count("[") <= limit:
            return False
    elif len(text) <= limit or text.count(b"{") + text.count(b"[") <= limit:
        return False
    return json_too_deep(value, limit)


def loads_json_document(text: str | bytes, what: str, *, not_json: str = "is not JSON") -> Any:
    """Parse one whole JSON document named ``what`` (e.g. ``"context file '/tmp/c.json'"``).

    Raises:
        PipesProtocolError: ``NOT_JSON`` (``"<what> <not_json>: <why>"``) or ``TOO_DEEP`` (nested deeper than
            :data:`MAX_JSON_DEPTH`), naming ``what``.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        too_deep = True
    except ValueError as exc:  # includes UnicodeDecodeError for bytes
        raise PipesProtocolError(f"{what} {not_json}: {exc}", _Kind.NOT_JSON) from exc
    else:
        too_deep = _line_too_deep(text, value, MAX_JSON_DEPTH)
    if too_deep:
        raise PipesProtocolError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels (MAX_JSON_DEPTH)",
                                 _Kind.TOO_DEEP)
    return value


def check_json_depth(value: object, what: str, *, max_bytes: int | None = None) -> None:
    """Refuse to send ``value`` when it nests deeper than :data:`MAX_JSON_DEPTH` or, with ``max_bytes``, when its
    JSON text (as ``json.dumps`` writes it: ASCII, so one byte a character) is longer than that, raising
    :class:`PipesUsageError` naming ``what``: the peer would refuse it. A value json cannot serialise is left to
    the code that serialises it."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return
    except RecursionError:
        text = ""
    if not text or _line_too_deep(text, value, MAX_JSON_DEPTH):
        raise PipesUsageError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels (MAX_JSON_DEPTH)")
    if max_bytes is not None and len(text) > max_bytes:
        raise PipesUsageError(
            f"{what} is {len(text)} bytes as JSON, over the {max_bytes}-byte limit of the external side "
            "(MAX_DECODED_PARAM_BYTES), which would refuse it; pass large data another way (e.g. a path or URL in "
            "extras)")


def _too_deep_usage(method: str) -> str:
    return (f"{method}: params are nested too deep: a message may nest at most {MAX_JSON_DEPTH} levels "
            "(MAX_JSON_DEPTH), its envelope included; nothing was sent")


def _too_deep_line() -> str:
    return f"message line is nested deeper than {MAX_JSON_DEPTH} levels (MAX_JSON_DEPTH)"


# JSON's whitespace; str.strip() with no argument also strips \x0b \x0c \x1c-\x1f \x85 \xa0 \u2028 \u3000 ...,
# which JSON does not allow. Readers skip lines made of JSON whitespace only, and report the others.
JSON_WHITESPACE = " \t\n\r"


def _not_json_line(line: str, exc: ValueError) -> str:
    if line.strip(JSON_WHITESPACE) and not line.strip():
        return (f"message line holds only whitespace that JSON does not allow ({_short_repr(line)}); "
                "it is not blank, so it is reported rather than skipped")
    return f"message line is not JSON: {exc}"


def _short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages (a hostile value can be megabytes)."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------

DAGSTER_PIPES_CONTEXT_ENV_VAR = "DAGSTER_PIPES_CONTEXT"
DAGSTER_PIPES_MESSAGES_ENV_VAR = "DAGSTER_PIPES_MESSAGES"
# The reference derives the flags from the env-var names: "--" + lowercase + "_" -> "-".
DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT = "--dagster-pipes-context"
DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT = "--dagster-pipes-messages"

# A bootstrap value is tiny (an env var holds at most 128 KiB on Linux), but zlib expands up to ~1000:1, so a
# hostile 128 KiB value could inflate to ~130 MB. 64 MiB leaves room for a large inlined context while keeping
# a zlib bomb from exhausting memory: decompression stops at the cap.
MAX_DECODED_PARAM_BYTES = 64 * 1024 * 1024


def encode_param(param: Any) -> str:
    """Encode a bootstrap param: base64(zlib(json)).

    JSON with Python's default separators and ``ensure_ascii``, zlib (RFC 1950) at the default level, the
    standard base64 alphabet with ``=`` padding: byte for byte what the reference writes.
    """
    try:
        text = json.dumps(param)
    except RecursionError:
        text = ""
    if not text or _line_too_deep(text, param, MAX_JSON_DEPTH):
        raise PipesUsageError(f"bootstrap param is nested deeper than {MAX_JSON_DEPTH} levels (MAX_JSON_DEPTH)")
    return base64.b64encode(zlib.compress(text.encode("utf-8"))).decode("ascii")


def decode_param(value: str | bytes, *, max_bytes: int = MAX_DECODED_PARAM_BYTES) -> dict[str, Any]:
    """Decode a bootstrap param written by :func:`encode_param` into a JSON object.

    Raises:
        PipesProtocolError: naming the step that failed: not base64, not zlib, over ``max_bytes`` once
            decompressed, not UTF-8 JSON, or JSON that is not an object.
    """
    raw = value.encode("ascii", "replace") if isinstance(value, str) else value
    raw = raw.strip()
    try:
        compressed = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PipesProtocolError(
            f"bootstrap param is not valid base64 (standard alphabet, padded): {exc}", _Kind.NOT_BASE64
        ) from exc
    decompressor = zlib.decompressobj()
    try:
        data = decompressor.decompress(compressed, max_bytes)
        if decompressor.unconsumed_tail:
            raise PipesProtocolError(
                f"bootstrap param decompresses to more than {max_bytes} bytes; refusing to inflate it further",
                _Kind.TOO_LARGE,
            )
        data += decompressor.flush()
    except zlib.error as exc:
        raise PipesProtocolError(
            f"bootstrap param is not zlib data (base64(zlib(json)) expected): {exc}", _Kind.NOT_ZLIB
        ) from exc
    if not decompressor.eof:
        raise PipesProtocolError("bootstrap param is truncated zlib data (base64(zlib(json)) expected)", _Kind.NOT_ZLIB)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipesProtocolError(f"bootstrap param is not UTF-8 JSON: {exc}", _Kind.NOT_JSON) from exc
    decoded = loads_json_document(text, "bootstrap param", not_json="is not UTF-8 JSON")
    if not isinstance(decoded, dict):
        raise PipesProtocolError(
            f"bootstrap param must be a JSON object, got {_json_type_name(decoded)}", _Kind.NOT_OBJECT
        )
    return decoded


# --------------------------------------------------------------------------------------------------------------
# Channel params
# --------------------------------------------------------------------------------------------------------------

PARAM_PATH = "path"
PARAM_DATA = "data"
PARAM_STDIO = "stdio"
PARAM_BUFFERED_STDIO = "buffered_stdio"
PARAM_INCLUDE_STDIO_IN_MESSAGES = "include_stdio_in_messages"
PARAM_BUCKET = "bucket"
PARAM_KEY = "key"
PARAM_KEY_PREFIX = "key_prefix"

STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"
STREAMS = (STREAM_STDOUT, STREAM_STDERR)


def include_stdio_param(messages_params: Mapping[str, Any]) -> tuple[bool, str | None]:
    """``(whether to capture stdio, what was wrong)`` from the messages params' ``include_stdio_in_messages``.

    Only a JSON boolean turns capture on: absent or null is False; anything else (the string ``"false"``, a
    number) is not taken for its truthiness: capture stays off and the problem is returned for a warning.
    """
    value = messages_params.get(PARAM_INCLUDE_STDIO_IN_MESSAGES)
    if value is None or isinstance(value, bool):
        return bool(value), None
    return False, (f'messages params "{PARAM_INCLUDE_STDIO_IN_MESSAGES}" must be a boolean, got '
                   f"{_json_type_name(value)} ({_short_repr(value)}); stdout/stderr are not captured")


# --------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------

METHOD_OPENED = "opened"
METHOD_CLOSED = "closed"
METHOD_LOG = "log"
METHOD_REPORT_ASSET_MATERIALIZATION = "report_asset_materialization"
METHOD_REPORT_ASSET_CHECK = "report_asset_check"
METHOD_REPORT_CUSTOM_MESSAGE = "report_custom_message"
METHOD_LOG_EXTERNAL_STREAM = "log_external_stream"
METHODS = (
    METHOD_OPENED,
    METHOD_CLOSED,
    METHOD_LOG,
    METHOD_REPORT_ASSET_MATERIALIZATION,
    METHOD_REPORT_ASSET_CHECK,
    METHOD_REPORT_CUSTOM_MESSAGE,
    METHOD_LOG_EXTERNAL_STREAM,
)

_METHOD_SET = frozenset(METHODS)

# The params of the messages (see METHOD_SPECS for which method carries which).
PARAM_PAYLOAD = "payload"
PARAM_EXTRAS = "extras"
PARAM_EXCEPTION = "exception"
PARAM_MESSAGE = "message"
PARAM_LEVEL = "level"
PARAM_ASSET_KEY = "asset_key"
PARAM_DATA_VERSION = "data_version"
PARAM_METADATA = "metadata"
PARAM_CHECK_NAME = "check_name"
PARAM_PASSED = "passed"
PARAM_SEVERITY = "severity"
PARAM_STREAM = "stream"
PARAM_TEXT = "text"
# The level of a log message that names none.
DEFAULT_LOG_LEVEL = "INFO"

SEVERITY_WARN = "WARN"
SEVERITY_ERROR = "ERROR"
SEVERITIES = (SEVERITY_WARN, SEVERITY_ERROR)

# Level names as Python's ``logging`` writes them, mapped to their numeric level. The orchestrator accepts
# them case-insensitively, with the aliases FATAL and WARN, as the reference does.
LOG_LEVELS = {"CRITICAL": 50, "FATAL": 50, "ERROR": 40, "WARNING": 30, "WARN": 30, "INFO": 20, "DEBUG": 10}


def normalize_log_level(level: object) -> str | None:
    """Return the canonical level name for ``level``, or None when it is not a known level name."""
    if not isinstance(level, str):
        return None
    upper = level.upper()
    if upper not in LOG_LEVELS:
        return None
    return {"FATAL": "CRITICAL", "WARN": "WARNING"}.get(upper, upper)


# --------------------------------------------------------------------------------------------------------------
# Context data
# --------------------------------------------------------------------------------------------------------------

# The keys of the context-data document (see ``_types.PipesContextData``, whose field names must match). ``Final``:
# a type checker reads them as literals, so they index that TypedDict.
CONTEXT_ASSET_KEYS: Final = "asset_keys"
CONTEXT_CODE_VERSION_BY_ASSET_KEY: Final = "code_version_by_asset_key"
CONTEXT_PROVENANCE_BY_ASSET_KEY: Final = "provenance_by_asset_key"
CONTEXT_PARTITION_KEY: Final = "partition_key"
CONTEXT_PARTITION_KEY_RANGE: Final = "partition_key_range"
CONTEXT_PARTITION_TIME_WINDOW: Final = "partition_time_window"
CONTEXT_RUN_ID: Final = "run_id"
CONTEXT_JOB_NAME: Final = "job_name"
CONTEXT_RETRY_NUMBER: Final = "retry_number"
CONTEXT_EXTRAS: Final = "extras"
CONTEXT_DATA_KEYS = (
    CONTEXT_ASSET_KEYS,
    CONTEXT_CODE_VERSION_BY_ASSET_KEY,
    CONTEXT_PROVENANCE_BY_ASSET_KEY,
    CONTEXT_PARTITION_KEY,
    CONTEXT_PARTITION_KEY_RANGE,
    CONTEXT_PARTITION_TIME_WINDOW,
    CONTEXT_RUN_ID,
    CONTEXT_JOB_NAME,
    CONTEXT_RETRY_NUMBER,
    CONTEXT_EXTRAS,
)
# The two keys of a partition key range and of a partition time window.
RANGE_START = "start"
RANGE_END = "end"


def empty_context_data(run_id: str = "") -> dict[str, Any]:
    """Context data with every key present and nothing selected (used outside an orchestrated run)."""
    return {
        CONTEXT_ASSET_KEYS: None,
        CONTEXT_CODE_VERSION_BY_ASSET_KEY: None,
        CONTEXT_PROVENANCE_BY_ASSET_KEY: None,
        CONTEXT_PARTITION_KEY: None,
        CONTEXT_PARTITION_KEY_RANGE: None,
        CONTEXT_PARTITION_TIME_WINDOW: None,
        CONTEXT_RUN_ID: run_id,
        CONTEXT_JOB_NAME: None,
        CONTEXT_RETRY_NUMBER: 0,
        CONTEXT_EXTRAS: {},
    }


def _check_optional_range(data: Mapping[str, Any], key: str) -> None:
    value = data.get(key)
    if value is None:
        return
    if not (isinstance(value, dict) and isinstance(value.get(RANGE_START), str)
            and isinstance(value.get(RANGE_END), str)):
        raise PipesProtocolError(
            f'context data "{key}" must be null or {{"{RANGE_START}": str, "{RANGE_END}": str}}', _Kind.BAD_CONTEXT
        )


def _check_optional_string(data: Mapping[str, Any], key: str) -> None:
    if data[key] is not None and not isinstance(data[key], str):
        raise PipesProtocolError(f'context data "{key}" must be null or a string', _Kind.BAD_CONTEXT)


def validate_context_data(data: object) -> dict[str, Any]:
    """Check a context-data document and return it with every key present.

    Missing nullable keys are filled with their empty value (a lenient reading of older or foreign
    orchestrators); keys of the wrong type raise :class:`PipesProtocolError` naming the key.
    """
    if not isinstance(data, dict):
        raise PipesProtocolError(f"context data must be a JSON object, got {_json_type_name(data)}", _Kind.BAD_CONTEXT)
    out = empty_context_data()
    out.update(data)
    asset_keys = out[CONTEXT_ASSET_KEYS]
    if asset_keys is not None and not (
        isinstance(asset_keys, list) and all(isinstance(k, str) for k in asset_keys)
    ):
        raise PipesProtocolError(f'context data "{CONTEXT_ASSET_KEYS}" must be null or a list of strings',
                                 _Kind.BAD_CONTEXT)
    for key in (CONTEXT_CODE_VERSION_BY_ASSET_KEY, CONTEXT_PROVENANCE_BY_ASSET_KEY):
        if out[key] is not None and not isinstance(out[key], dict):
            raise PipesProtocolError(f'context data "{key}" must be null or an object', _Kind.BAD_CONTEXT)
    _check_optional_string(out, CONTEXT_PARTITION_KEY)
    _check_optional_range(out, CONTEXT_PARTITION_KEY_RANGE)
    _check_optional_range(out, CONTEXT_PARTITION_TIME_WINDOW)
    if not isinstance(out[CONTEXT_RUN_ID], str):
        raise PipesProtocolError(f'context data "{CONTEXT_RUN_ID}" must be a string', _Kind.BAD_CONTEXT)
    _check_optional_string(out, CONTEXT_JOB_NAME)
    retry = out[CONTEXT_RETRY_NUMBER]
    if not isinstance(retry, int) or isinstance(retry, bool):
        raise PipesProtocolError(f'context data "{CONTEXT_RETRY_NUMBER}" must be an integer', _Kind.BAD_CONTEXT)
    if out[CONTEXT_EXTRAS] is None:
        out[CONTEXT_EXTRAS] = {}
    if not isinstance(out[CONTEXT_EXTRAS], dict):
        raise PipesProtocolError(f'context data "{CONTEXT_EXTRAS}" must be an object', _Kind.BAD_CONTEXT)
    return out


# --------------------------------------------------------------------------------------------------------------
# Asset keys: components joined by "/", with "\" -> "\\" and "/" -> "\/" inside a component.
# --------------------------------------------------------------------------------------------------------------


ESCAPE_CHARACTER = "\\"
ASSET_KEY_SEPARATOR = "/"


def escape_asset_key(path: Sequence[str]) -> str:
    """Join asset-key components into the escaped user string, e.g. ``["a", "b/c"]`` -> ``a/b\\/c``."""
    return ASSET_KEY_SEPARATOR.join(
        part.replace(ESCAPE_CHARACTER, ESCAPE_CHARACTER * 2).replace(ASSET_KEY_SEPARATOR,
                                                                     ESCAPE_CHARACTER + ASSET_KEY_SEPARATOR)
        for part in path
    )


def parse_asset_key(escaped: str) -> list[str]:
    """Split an escaped asset-key string into components (the inverse of :func:`escape_asset_key`).

    As in the reference: an unescaped ``/`` splits, ``\\X`` is a literal ``X``, a trailing empty component is
    dropped and a leading one kept.
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(escaped)
    for char in chars:
        if char == ESCAPE_CHARACTER:
            escaped_char = next(chars, None)
            if escaped_char is not None:  # a dangling "\" at the end adds nothing, as in the reference
                current.append(escaped_char)
        elif char == ASSET_KEY_SEPARATOR:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if current:
        parts.append("".join(current))
    return parts


# --------------------------------------------------------------------------------------------------------------
# Metadata: each entry on the wire is {"raw_value": <JSON>, "type": <one of METADATA_TYPES>}.
# --------------------------------------------------------------------------------------------------------------

METADATA_TYPE_INFER = "__infer__"
METADATA_TYPES = (
    METADATA_TYPE_INFER,
    "text",
    "url",
    "path",
    "notebook",
    "md",
    "json",
    "float",
    "int",
    "bool",
    "dagster_run",
    "asset",
    "null",
    "timestamp",
    "table",
    "table_schema",
    "table_column_lineage",
)
METADATA_RAW_VALUE = "raw_value"
METADATA_TYPE = "type"
# float(n) raises OverflowError for an int at or past 2**1024 (a float's range); such a float/timestamp entry
# is refused like any other bad value.
_FLOAT_INT_BOUND = 2**1024
_STRING_METADATA_TYPES = frozenset({"text", "url", "path", "notebook", "md", "dagster_run", "asset"})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Dagster's orchestrator builds TableColumn / TableColumnConstraints / TableRecord / TableColumnDep from these
# shapes and raises (killing its reader) on a missing "schema" or column "type", on unknown constraint or
# dependency keys, and on non-scalar table cells; they are rejected here instead.
_COLUMN_CONSTRAINT_KEYS = frozenset({"nullable", "unique", "other"})
_LINEAGE_DEP_KEYS = frozenset({"asset_key", "column_name"})


def _column_problem(column: object) -> str | None:
    if not isinstance(column, dict) or not isinstance(column.get("name"), str):
        return 'each column must be an object with a string "name"'
    name = column["name"]
    if not isinstance(column.get("type"), str):
        return f'column {name!r}: "type" must be a string'
    if column.get("description") is not None and not isinstance(column["description"], str):
        return f'column {name!r}: "description" must be null or a string'
    tags = column.get("tags")
    if tags is not None and not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
        return f'column {name!r}: "tags" must be null or an object of strings'
    constraints = column.get("constraints")
    if constraints:
        if not isinstance(constraints, dict) or not set(constraints) <= _COLUMN_CONSTRAINT_KEYS:
            return f'column {name!r}: "constraints" must be an object with keys among nullable, unique, other'
        for flag in ("nullable", "unique"):
            if flag in constraints and not isinstance(constraints[flag], bool):
                return f'column {name!r}: constraint "{flag}" must be a boolean'
        other = constraints.get("other")
        if other is not None and not (isinstance(other, list) and all(isinstance(o, str) for o in other)):
            return f'column {name!r}: constraint "other" must be null or a list of strings'
    return None


def _table_schema_problem(value: object) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("columns"), list):
        return 'must be {"columns": [column, ...]}'
    for column in value["columns"]:
        problem = _column_problem(column)
        if problem:
            return problem
    return None


def _table_problem(value: object) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("records"), list):
        return 'must be {"records": [object, ...], "schema": [column, ...]}'
    for record in value["records"]:
        if not isinstance(record, dict):
            return "each record must be an object"
        for cell in record.values():
            if cell is not None and not isinstance(cell, (str, int, float, bool)):
                got = _json_type_name(cell)
                return f"a record value must be a string, number, boolean or null, got {got}"
    schema = value.get("schema")
    if not isinstance(schema, list):
        return '"schema" must be a list of columns'
    for column in schema:
        problem = _column_problem(column)
        if problem:
            return problem
    return None


def _lineage_problem(value: object) -> str | None:
    deps = value.get("deps_by_column") if isinstance(value, dict) else None
    if not isinstance(deps, dict):
        return 'must be {"deps_by_column": {column: [{"asset_key": ..., "column_name": str}]}}'
    for column_deps in deps.values():
        if not isinstance(column_deps, list):
            return "each column's dependencies must be a list"
        for dep in column_deps:
            if not isinstance(dep, dict) or not isinstance(dep.get("column_name"), str):
                return 'each dependency must be an object with a string "column_name"'
            if set(dep) != _LINEAGE_DEP_KEYS:
                keys = sorted(dep)
                return f'a dependency must have exactly the keys "asset_key" and "column_name", got {keys}'
            key = dep.get("asset_key")
            if not (isinstance(key, str) or (isinstance(key, list) and all(isinstance(p, str) for p in key))):
                return 'a dependency "asset_key" must be a string or a list of strings'
    return None


def metadata_problem(metadata_type: object, raw_value: object) -> str | None:
    """Return why ``raw_value`` cannot be metadata of ``metadata_type``, or None when it can."""
    if metadata_type not in METADATA_TYPES:
        return f"unknown metadata type {metadata_type!r} (expected one of {', '.join(METADATA_TYPES)})"
    if metadata_type in _STRING_METADATA_TYPES:
        ok = isinstance(raw_value, str)
        expected = "a string"
    elif metadata_type == "json":
        ok = isinstance(raw_value, (dict, list))
        expected = "an object or a list"
    elif metadata_type in ("float", "timestamp"):
        ok = _is_number(raw_value)
        expected = "a number"
        if ok and isinstance(raw_value, int) and not -_FLOAT_INT_BOUND < raw_value < _FLOAT_INT_BOUND:
            return (f"{metadata_type} metadata must be a number a float can hold, got an integer of "
                    f"{raw_value.bit_length()} bits (at most 1024)")
    elif metadata_type == "int":
        ok = isinstance(raw_value, int) and not isinstance(raw_value, bool)
        expected = "an integer"
    elif metadata_type == "bool":
        ok = isinstance(raw_value, bool)
        expected = "a boolean"
    elif metadata_type == "null":
        ok = raw_value is None
        expected = "null"
    elif metadata_type == "table":
        return _table_problem(raw_value)
    elif metadata_type == "table_schema":
        return _table_schema_problem(raw_value)
    elif metadata_type == "table_column_lineage":
        return _lineage_problem(raw_value)
    else:  # __infer__
        ok = raw_value is None or isinstance(raw_value, (str, int, float, bool, list, dict))
        expected = "a JSON value"
    if ok:
        return None
    return f"{metadata_type} metadata must be {expected}, got {_json_type_name(raw_value)}"


def infer_metadata_type(raw_value: object) -> str:
    """The concrete type an ``__infer__`` value stands for (str->text, bool, int, float, list/dict->json)."""
    if raw_value is None:
        return "null"
    if isinstance(raw_value, bool):
        return "bool"
    if isinstance(raw_value, int):
        return "int"
    if isinstance(raw_value, float):
        return "float"
    if isinstance(raw_value, str):
        return "text"
    return "json"


def normalize_metadata(metadata: Mapping[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """Turn user metadata into its wire form, validating every entry.

    A plain value becomes ``{"raw_value": v, "type": "__infer__"}``; an explicit ``{"raw_value", "type"}`` dict
    is checked against its type (an ``int`` given for ``float`` is widened to ``float``, which the reference
    orchestrator requires). Empty metadata is sent as ``None``.

    Raises:
        PipesUsageError: naming the entry, for an unknown type, a value of the wrong shape, or a dict that is
            neither a plain JSON value wrapper nor exactly ``{"raw_value", "type"}``.
    """
    if not metadata:
        return None
    if not isinstance(metadata, dict):
        metadata = dict(metadata)
    out: dict[str, dict[str, Any]] = {}
    for label, value in metadata.items():
        if not isinstance(label, str):
            raise PipesUsageError(f"metadata labels must be strings, got {label!r}")
        if isinstance(value, dict) and set(value) == {METADATA_RAW_VALUE, METADATA_TYPE}:
            metadata_type = value[METADATA_TYPE]
            raw_value = value[METADATA_RAW_VALUE]
            if (metadata_type in ("float", "timestamp") and isinstance(raw_value, int)
                    and not isinstance(raw_value, bool) and -_FLOAT_INT_BOUND < raw_value < _FLOAT_INT_BOUND):
                raw_value = float(raw_value)  # past a float's range it stays an int, refused just below
        elif isinstance(value, dict) and (METADATA_RAW_VALUE in value or METADATA_TYPE in value):
            raise PipesUsageError(
                f'metadata entry "{label}": a typed entry must have exactly the keys "raw_value" and "type", '
                f"got {sorted(value)}"
            )
        else:
            metadata_type = METADATA_TYPE_INFER
            raw_value = value
        problem = metadata_problem(metadata_type, raw_value)
        if problem:
            raise PipesUsageError(f'metadata entry "{label}": {problem}')
        out[label] = {METADATA_RAW_VALUE: raw_value, METADATA_TYPE: metadata_type}
    return out


# --------------------------------------------------------------------------------------------------------------
# Exceptions: {"message", "stack", "name", "cause", "context"}, cause/context nest the same shape.
# --------------------------------------------------------------------------------------------------------------

EXCEPTION_KEYS = ("message", "stack", "name", "cause", "context")
# Cause/context chains can be cyclic or absurdly deep; past this depth the chain is cut.
MAX_EXCEPTION_CHAIN_DEPTH = 32


def serialize_exception(exc: BaseException, _depth: int = 0) -> dict[str, Any]:
    """Describe ``exc`` (with its cause and context chain) in the wire's exception shape."""
    import traceback  # only on the error path: keeps start-up lean

    name = type(exc).__name__
    stack = traceback.format_tb(exc.__traceback__) if exc.__traceback__ else []
    message = "".join(traceback.format_exception_only(type(exc), exc))
    deeper = _depth + 1 < MAX_EXCEPTION_CHAIN_DEPTH
    cause = exc.__cause__
    context = None if exc.__suppress_context__ else exc.__context__
    return {
        "message": message,
        "stack": stack,
        "name": name,
        "cause": serialize_exception(cause, _depth + 1) if cause is not None and deeper else None,
        "context": serialize_exception(context, _depth + 1) if context is not None and deeper else None,
    }


def validate_exception(value: object, where: str = "exception") -> str | None:
    """Return why ``value`` is not a wire exception (recursively), or None when it is one."""
    if not isinstance(value, dict):
        return f"{where} must be an object, got {_json_type_name(value)}"
    if not isinstance(value.get("message"), str):
        return f'{where} "message" must be a string'
    stack = value.get("stack")
    if not (isinstance(stack, list) and all(isinstance(line, str) for line in stack)):
        return f'{where} "stack" must be a list of strings'
    if value.get("name") is not None and not isinstance(value.get("name"), str):
        return f'{where} "name" must be null or a string'
    for link in ("cause", "context"):
        if value.get(link) is not None:
            problem = validate_exception(value[link], f"{where}.{link}")
            if problem:
                return problem
    return None


def salvage_exception(value: object, where: str = "exception") -> tuple[dict[str, Any] | None, list[str]]:
    """Keep the valid parts of a malformed wire exception: ``(exception or None, what was wrong)``.

    A string stands for the message; a missing or non-string message becomes ``""``; a stack that is not a list
    keeps nothing and one with non-strings keeps its strings; a non-string name becomes null; a cause or context
    that is not an object is dropped. Each repair is named in the returned problems (empty when ``value`` was
    valid). Anything else than an object or a string gives None.
    """
    if isinstance(value, str):
        return ({"message": value, "stack": [], "name": None, "cause": None, "context": None},
                [f"{where} must be an object, got a string (kept as its message)"])
    if not isinstance(value, dict):
        return None, [f"{where} must be an object, got {_json_type_name(value)} (dropped)"]
    problems: list[str] = []
    message = value.get("message")
    if not isinstance(message, str):
        problems.append(f'{where} "message" must be a string, got {_json_type_name(message)}')
        message = "" if message is None else _short_repr(message)
    stack = value.get("stack")
    if isinstance(stack, list):
        kept = [line for line in stack if isinstance(line, str)]
        if len(kept) != len(stack):
            problems.append(f'{where} "stack" must be a list of strings ({len(stack) - len(kept)} other items dropped)')
    else:
        kept = []
        problems.append(f'{where} "stack" must be a list of strings, got {_json_type_name(stack)}')
    name = value.get("name")
    if name is not None and not isinstance(name, str):
        problems.append(f'{where} "name" must be null or a string, got {_json_type_name(name)}')
        name = None
    out: dict[str, Any] = {"message": message, "stack": kept, "name": name, "cause": None, "context": None}
    for link in ("cause", "context"):
        linked = value.get(link)
        if linked is None:
            continue
        if isinstance(linked, dict):
            out[link], more = salvage_exception(linked, f"{where}.{link}")
            problems += more
        else:
            problems.append(f"{where}.{link} must be null or an object, got {_json_type_name(linked)} (dropped)")
    return out, problems


# --------------------------------------------------------------------------------------------------------------
# Messages: {"__dagster_pipes_version": "0.1", "method": str, "params": object | null}, one JSON line each.
# --------------------------------------------------------------------------------------------------------------


def make_message(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The message envelope, keys in the reference's order."""
    return {
        PIPES_PROTOCOL_VERSION_FIELD: PIPES_PROTOCOL_VERSION,
        MESSAGE_METHOD_FIELD: method,
        MESSAGE_PARAMS_FIELD: params,
    }


_LINE_PREFIX = '{"' + PIPES_PROTOCOL_VERSION_FIELD + '": "' + PIPES_PROTOCOL_VERSION + '", "method": '
_METHOD_JSON = {method: json.dumps(method) for method in METHODS}


def dumps_message(method: str, params: Mapping[str, Any] | None) -> str:
    """Serialise one message to its JSON line (no newline), exactly as ``json.dumps(make_message(...))``.

    Raises:
        PipesUsageError: when something in ``params`` is not JSON-serialisable (nothing is sent).
    """
    try:
        # The method is JSON-encoded too: a name with a quote, backslash or non-ASCII character stays exact.
        method_json = _METHOD_JSON.get(method) or json.dumps(method)
        line = _LINE_PREFIX + method_json + ', "params": ' + json.dumps(params) + "}"
    except (TypeError, ValueError) as exc:
        raise PipesUsageError(f"{method}: params are not JSON-serialisable: {exc}") from exc
    except RecursionError:
        line = ""
    if not line or _line_too_deep(line, params, MAX_JSON_DEPTH - 1):
        raise PipesUsageError(_too_deep_usage(method))
    return line


_encode = json.JSONEncoder().encode  # the same defaults as json.dumps, without its per-call checks
_CUSTOM_MESSAGE_PREFIX = _LINE_PREFIX + _METHOD_JSON[METHOD_REPORT_CUSTOM_MESSAGE] + ', "params": {"payload": '


def dumps_custom_message(payload: Any) -> str:
    """``dumps_message("report_custom_message", {"payload": payload})``, on the high-volume path.

    Raises:
        PipesUsageError: when ``payload`` is not JSON-serialisable (nothing is sent).
    """
    try:
        line = _CUSTOM_MESSAGE_PREFIX + _encode(payload) + "}}"
    except (TypeError, ValueError) as exc:
        raise PipesUsageError(f"report_custom_message: params are not JSON-serialisable: {exc}") from exc
    except RecursionError:
        line = ""
    if not line or _line_too_deep(line, payload, MAX_JSON_DEPTH - 2):
        raise PipesUsageError(_too_deep_usage(METHOD_REPORT_CUSTOM_MESSAGE))
    return line


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def parse_message_line(line: str | bytes) -> dict[str, Any]:
    """Parse one message line and validate it; see :func:`load_message_line` and :func:`validate_message`.

    Raises:
        PipesProtocolError: for a line that is not JSON, is nested too deep, is not an object, or is not a
            valid message; its ``kind`` says which.
    """
    return validate_message(load_message_line(line))


def load_message_line(line: str | bytes) -> Any:
    """Parse one message line as JSON (any value), without validating it as a message.

    Raises:
        PipesProtocolError: ``NOT_JSON`` for a line that is not UTF-8 JSON, ``TOO_DEEP`` for one nested deeper
            than :data:`MAX_JSON_DEPTH`.
    """
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PipesProtocolError(f"message line is not JSON (not valid UTF-8): {exc}", _Kind.NOT_JSON) from exc
    # Fast path: the scanner alone, as json.loads would call it, without its per-call set-up. Anything it
    # does not consume whole (surrounding whitespace, extra data, an error) takes the full json.loads path,
    # which also gives JSON's own error message.
    try:
        obj, end = _scan_once(line, 0)
    except (StopIteration, ValueError):
        end = -1
    except RecursionError:
        raise PipesProtocolError(_too_deep_line(), _Kind.TOO_DEEP) from None
    if end != len(line):
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise PipesProtocolError(_not_json_line(line, exc), _Kind.NOT_JSON) from exc
        except RecursionError:
            raise PipesProtocolError(_too_deep_line(), _Kind.TOO_DEEP) from None
    # Depth check without cost on the fast path: a line can only be deeper than the limit if it holds more
    # opening brackets than the limit (brackets inside strings only make this bound looser).
    if len(line) > MAX_JSON_DEPTH and line.count("{") + line.count("[") > MAX_JSON_DEPTH and json_too_deep(obj):
        raise PipesProtocolError(_too_deep_line(), _Kind.TOO_DEEP)
    return obj


_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in JSONDecoder.__init__


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_opt_str(v: object) -> bool:
    return v is None or isinstance(v, str)


def _is_opt_dict(v: object) -> bool:
    return v is None or isinstance(v, dict)


def _is_dict(v: object) -> bool:
    return isinstance(v, dict)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_stream(v: object) -> bool:
    return v in STREAMS


def _check_wire_metadata(method: str, metadata: dict[str, Any] | None) -> None:
    for label, entry in (metadata or {}).items():
        if not isinstance(entry, dict) or METADATA_TYPE not in entry or METADATA_RAW_VALUE not in entry:
            raise PipesProtocolError(
                f'{method}: metadata entry "{label}" must be {{"raw_value", "type"}}', _Kind.BAD_METADATA
            )
        problem = metadata_problem(entry[METADATA_TYPE], entry[METADATA_RAW_VALUE])
        if problem:
            raise PipesProtocolError(f'{method}: metadata entry "{label}": {problem}', _Kind.BAD_METADATA)


def _check_level(method: str, level: object) -> None:
    if normalize_log_level(level) is None:
        raise PipesProtocolError(
            f"{method}: unknown level {_short_repr(level)} (expected one of {', '.join(LOG_LEVELS)})", _Kind.BAD_PARAMS
        )


def _check_severity(method: str, severity: object) -> None:
    if severity not in SEVERITIES:
        raise PipesProtocolError(
            f"{method}: unknown severity {_short_repr(severity)} (expected {' or '.join(SEVERITIES)})",
            _Kind.BAD_PARAMS,
        )


def _check_exception(method: str, exception: object) -> None:
    if exception is not None:
        problem = validate_exception(exception)
        if problem:
            # The kind lets a reader salvage the valid parts (see salvage_exception) instead of dropping the
            # remote error with the message.
            raise PipesProtocolError(f"{method}: {problem}", _Kind.BAD_EXCEPTION)


_REQUIRED = object()  # MessageParamSpec.default of a param that must be present
_ABSENT = object()


class MessageParamSpec:
    """One param of a message method, as the orchestrator validates it.

    Args:
        name: the param's key.
        expected: what its value must be, in words ("a string"); None: any JSON value.
        is_valid: the type test behind ``expected`` (None: any value).
        default: required when not given (absent is an error); else a factory of the value an absent param
            gets, or None (an absent param stays absent).
        null_is_absent: a null value counts as absent (it gets the default).
        check: a further check ``check(method, value)`` raising :class:`PipesProtocolError` (metadata entries,
            level and severity names, the exception's shape).
    """

    __slots__ = ("check", "default", "expected", "is_valid", "name", "null_is_absent")

    def __init__(self, name: str, expected: str | None = None, is_valid: Callable[[object], bool] | None = None,
                 *, default: object = _REQUIRED, null_is_absent: bool = False,
                 check: Callable[[str, Any], None] | None = None) -> None:
        self.name = name
        self.expected = expected
        self.is_valid = is_valid
        self.default = default
        self.null_is_absent = null_is_absent
        self.check = check

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


class MethodSpec:
    """A message method and its params, in the order they are validated."""

    __slots__ = ("_plain", "_rows", "name", "params")

    def __init__(self, name: str, *params: MessageParamSpec) -> None:
        self.name = name
        self.params = params
        # The same, unpacked once for validate_message's loop; and, when every param is required and of any
        # value (the high-volume custom message), just their names: a membership test each.
        self._rows = tuple((p.name, p.default, p.null_is_absent, p.is_valid, p.check, p.expected) for p in params)
        plain = all(p.required and p.is_valid is None and p.check is None for p in params)
        self._plain = tuple(p.name for p in params) if plain else None


def _none() -> None:
    return None


def _error_severity() -> str:
    return SEVERITY_ERROR


# The one table of what each method carries: validation is driven by it. A new method is its constant in
# METHODS and its row here; the orchestrator then dispatches it (pipes_core.protocol.handler) and encodes its event
# (pipes_core.protocol.json_events); tests check that the three tables name the same methods.
METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        # the high-volume method first
        MethodSpec(METHOD_REPORT_CUSTOM_MESSAGE, MessageParamSpec(PARAM_PAYLOAD)),
        MethodSpec(
            METHOD_OPENED,
            MessageParamSpec(PARAM_EXTRAS, "an object", _is_dict, default=dict, null_is_absent=True),
        ),
        MethodSpec(METHOD_CLOSED, MessageParamSpec(PARAM_EXCEPTION, default=None, check=_check_exception)),
        MethodSpec(
            METHOD_LOG,
            MessageParamSpec(PARAM_MESSAGE, "a string", _is_str),
            MessageParamSpec(PARAM_LEVEL, default=None, check=_check_level),  # absent: DEFAULT_LOG_LEVEL
        ),
        MethodSpec(
            METHOD_REPORT_ASSET_MATERIALIZATION,
            MessageParamSpec(PARAM_ASSET_KEY, "a string", _is_str),
            MessageParamSpec(PARAM_DATA_VERSION, "null or a string", _is_opt_str, default=_none),
            MessageParamSpec(PARAM_METADATA, "null or an object", _is_opt_dict, default=_none,
                             check=_check_wire_metadata),
        ),
        MethodSpec(
            METHOD_REPORT_ASSET_CHECK,
            MessageParamSpec(PARAM_ASSET_KEY, "a string", _is_str),
            MessageParamSpec(PARAM_CHECK_NAME, "a string", _is_str),
            MessageParamSpec(PARAM_PASSED, "a boolean", _is_bool),
            MessageParamSpec(PARAM_SEVERITY, default=_error_severity, check=_check_severity),
            MessageParamSpec(PARAM_METADATA, "null or an object", _is_opt_dict, default=_none,
                             check=_check_wire_metadata),
        ),
        MethodSpec(
            METHOD_LOG_EXTERNAL_STREAM,
            MessageParamSpec(PARAM_STREAM, '"stdout" or "stderr"', _is_stream),
            MessageParamSpec(PARAM_TEXT, "a string", _is_str),
            MessageParamSpec(PARAM_EXTRAS, default=dict, null_is_absent=True),
        ),
    )
}


def validate_message(obj: object) -> dict[str, Any]:
    """Check a decoded message against :data:`METHOD_SPECS` and return it with ``params`` normalised to a dict.

    Required params must be present with the right type; optional ones get their default; extra keys are kept
    and tolerated (forward compatibility). Raises :class:`PipesProtocolError` naming the method and the param.
    """
    if not isinstance(obj, dict):
        raise PipesProtocolError(f"message must be a JSON object, got {_json_type_name(obj)}", _Kind.NOT_OBJECT)
    if PIPES_PROTOCOL_VERSION_FIELD not in obj:
        raise PipesProtocolError(
            f'message has no "{PIPES_PROTOCOL_VERSION_FIELD}" field; not a Pipes message', _Kind.NO_VERSION
        )
    method = obj.get(MESSAGE_METHOD_FIELD)
    if not isinstance(method, str):
        raise PipesProtocolError(f'message "{MESSAGE_METHOD_FIELD}" must be a string', _Kind.BAD_METHOD)
    spec = METHOD_SPECS.get(method)
    if spec is None:
        raise PipesProtocolError(
            f"unknown message method {_short_repr(method)} (known: {', '.join(METHODS)})", _Kind.UNKNOWN_METHOD
        )
    params = obj.get(MESSAGE_PARAMS_FIELD)
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        raise PipesProtocolError(f'{method}: "params" must be an object or null', _Kind.BAD_PARAMS)
    plain = spec._plain
    if plain is not None:
        for name in plain:
            if name not in params:
                raise PipesProtocolError(f'{method}: missing param "{name}"', _Kind.BAD_PARAMS)
        obj[MESSAGE_PARAMS_FIELD] = params
        return obj
    for name, default, null_is_absent, is_valid, check, expected in spec._rows:
        value = params.get(name, _ABSENT)
        if value is _ABSENT or (value is None and null_is_absent):
            if default is _REQUIRED:
                detail = f" ({expected})" if expected else ""
                raise PipesProtocolError(f'{method}: missing param "{name}"{detail}', _Kind.BAD_PARAMS)
            if default is None:
                continue
            value = params[name] = default()  # type: ignore[operator]  # a factory here
        if is_valid is not None and not is_valid(value):
            raise PipesProtocolError(
                f'{method}: param "{name}" must be {expected}, got {_json_type_name(value)}', _Kind.BAD_PARAMS
            )
        if check is not None:
            try:
                check(method, value)
            except PipesProtocolError:
                obj[MESSAGE_PARAMS_FIELD] = params  # the normalised params, for a reader that salvages them
                raise
    obj[MESSAGE_PARAMS_FIELD] = params
    return obj
