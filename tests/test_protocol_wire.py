"""Table-driven tests of the pure protocol module, cross-checked against the real Dagster packages, plus the
orchestrator's file reader fed one byte stream whole, byte by byte, and with a trailing partial line."""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import math
import os
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import pytest

from pipes_core import (
    AssetCheckResult,
    MaterializeResult,
    MetadataValue,
    PipesClosedEvent,
    PipesCustomMessageEvent,
    PipesEnvContextInjector,
    PipesEvent,
    PipesExternalStreamEvent,
    PipesFileMessageReader,
    PipesLogEvent,
    PipesOpenedEvent,
    PipesProtocolIssue,
    PipesRunContext,
    open_pipes_session,
)
from pipes_ext._errors import PipesProtocolError, PipesUsageError
from pipes_ext._protocol import (
    CONTEXT_DATA_KEYS,
    EXCEPTION_KEYS,
    MAX_EXCEPTION_CHAIN_DEPTH,
    METADATA_TYPES,
    METHODS,
    decode_param,
    dumps_message,
    empty_context_data,
    encode_param,
    escape_asset_key,
    make_message,
    normalize_metadata,
    parse_asset_key,
    parse_message_line,
    serialize_exception,
    validate_context_data,
    validate_exception,
    validate_message,
)

REFERENCE_PATH_PARAM = "eJyrVipILMlQslJQ0i/JLdCvUKoFADYYBa8="

# ----------------------------------------------------------------------------------------------------------
# encode_param / decode_param
# ----------------------------------------------------------------------------------------------------------

PARAM_VALUES: list[Any] = [
    {"path": "/tmp/x"},
    {},
    {"path": "/tmp/x", "include_stdio_in_messages": True},
    {"data": {"asset_keys": ["a/b\\/c"], "run_id": "r", "extras": {"n": [1, 2.5, None, True]}}},
    {"unicode": "héllo wörld ✓ 漢字 😀", "ключ": "значение"},
    {"nested": {"a": {"b": {"c": {"d": [[], [{}], [[1]]]}}}}},
    {"escapes": "quote\" backslash\\ newline\n tab\t nul\u0000 del\u007f"},
    {"numbers": [0, -1, 2**63, 1e-300, 1.5e300, -0.0]},
    {"big": "x" * 100_000},
]


def test_encode_param_is_byte_exact_against_the_reference_example() -> None:
    assert encode_param({"path": "/tmp/x"}) == REFERENCE_PATH_PARAM


def test_decode_param_reads_the_reference_example() -> None:
    assert decode_param(REFERENCE_PATH_PARAM) == {"path": "/tmp/x"}
    assert decode_param(REFERENCE_PATH_PARAM.encode("ascii")) == {"path": "/tmp/x"}


@pytest.mark.parametrize("value", PARAM_VALUES, ids=range(len(PARAM_VALUES)))
def test_encode_param_is_base64_zlib_json_with_python_defaults(value: Any) -> None:
    encoded = encode_param(value)
    assert encoded.isascii()
    raw = zlib.decompress(base64.b64decode(encoded, validate=True))
    assert raw == json.dumps(value).encode("ascii")  # default separators, ensure_ascii


@pytest.mark.parametrize("value", PARAM_VALUES, ids=range(len(PARAM_VALUES)))
def test_decode_param_round_trips(value: Any) -> None:
    assert decode_param(encode_param(value)) == value


@pytest.mark.interop
@pytest.mark.parametrize("value", PARAM_VALUES, ids=range(len(PARAM_VALUES)))
def test_codec_matches_dagster_pipes(value: Any) -> None:
    dagster_pipes = pytest.importorskip("dagster_pipes")
    assert encode_param(value) == dagster_pipes.encode_param(value)
    assert dagster_pipes.decode_param(encode_param(value)) == value
    assert decode_param(dagster_pipes.encode_param(value)) == value


def test_decode_param_accepts_surrounding_whitespace() -> None:
    assert decode_param("  " + REFERENCE_PATH_PARAM + "\n") == {"path": "/tmp/x"}


def test_decode_param_nan_and_infinity_round_trip() -> None:
    decoded = decode_param(encode_param({"nan": math.nan, "inf": math.inf}))
    assert math.isnan(decoded["nan"])
    assert decoded["inf"] == math.inf


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


def _url_safe_param() -> str:
    # The first small object whose standard encoding uses "+" or "/", re-encoded with the URL-safe alphabet.
    value = next(v for v in ({"i": i} for i in range(1000)) if set(encode_param(v)) & {"+", "/"})
    return base64.urlsafe_b64encode(base64.b64decode(encode_param(value))).decode("ascii")


DECODE_FAILURES = [
    ("not base64", "not base64 at all!", "not valid base64"),
    ("url-safe alphabet", _url_safe_param(), "not valid base64"),
    ("unpadded", REFERENCE_PATH_PARAM.rstrip("="), "base64"),
    ("gzip container", _b64(gzip.compress(b'{"a": 1}')), "not zlib"),
    ("raw deflate", _b64(_raw_deflate(b'{"a": 1}')), "not zlib"),
    ("truncated zlib", _b64(zlib.compress(b'{"a": 1}')[:-3]), "truncated"),
    ("not JSON", _b64(zlib.compress(b"{nope")), "not UTF-8 JSON"),
    ("not UTF-8", _b64(zlib.compress(b'{"a": "\xff\xfe"}')), "not UTF-8 JSON"),
    ("JSON list", encode_param([1, 2]), "must be a JSON object, got a list"),
    ("JSON string", encode_param("s"), "must be a JSON object, got a string"),
    ("JSON null", encode_param(None), "must be a JSON object, got null"),
    ("JSON number", encode_param(3), "must be a JSON object, got a number"),
]


@pytest.mark.parametrize(
    ("value", "expected"), [c[1:] for c in DECODE_FAILURES], ids=[c[0] for c in DECODE_FAILURES]
)
def test_decode_param_rejects_with_the_failing_step(value: str, expected: str) -> None:
    with pytest.raises(PipesProtocolError, match=expected):
        decode_param(value)


@pytest.mark.parametrize("size", [1, 100, 4096, 70_000])
def test_decode_param_cap_is_exact(size: int) -> None:
    value = {"k": "y" * size}
    n = len(json.dumps(value).encode())
    assert decode_param(encode_param(value), max_bytes=n) == value
    with pytest.raises(PipesProtocolError, match=f"more than {n - 1} bytes"):
        decode_param(encode_param(value), max_bytes=n - 1)


# ----------------------------------------------------------------------------------------------------------
# Asset keys
# ----------------------------------------------------------------------------------------------------------

# (components, escaped form)
ASSET_KEY_ROUND_TRIPS = [
    (["a"], "a"),
    (["a", "b"], "a/b"),
    (["a", "b/c"], "a/b\\/c"),
    (["a\\b"], "a\\\\b"),
    (["a\\", "b"], "a\\\\/b"),
    (["\\/"], "\\\\\\/"),
    (["/"], "\\/"),
    (["", "a"], "/a"),
    (["", "", "a"], "//a"),
    (["a", "", "b"], "a//b"),
    (["资产", "😀/x"], "资产/😀\\/x"),
    (["sp ace", "dot.ted"], "sp ace/dot.ted"),
]

# escaped form -> components, for inputs that do not round trip (reference parsing rules)
ASSET_KEY_PARSES = [
    ("a/", ["a"]),  # trailing empty component dropped
    ("a//", ["a", ""]),  # only the last one
    ("/", [""]),  # leading empty kept
    ("", []),
    ("\\a\\b", ["ab"]),  # \X is a literal X
    ("a\\", ["a"]),  # dangling escape at the end
    ("\\", []),
    ("a/\\", ["a"]),
]


@pytest.mark.parametrize(("path", "escaped"), ASSET_KEY_ROUND_TRIPS)
def test_asset_key_escape_and_parse(path: list[str], escaped: str) -> None:
    assert escape_asset_key(path) == escaped
    assert parse_asset_key(escaped) == path


@pytest.mark.parametrize(("escaped", "path"), ASSET_KEY_PARSES)
def test_asset_key_parse_edge_cases(escaped: str, path: list[str]) -> None:
    assert parse_asset_key(escaped) == path


@pytest.mark.interop
@pytest.mark.parametrize(("path", "escaped"), ASSET_KEY_ROUND_TRIPS)
def test_asset_key_escaping_matches_dagster(path: list[str], escaped: str) -> None:
    from dagster import AssetKey

    assert AssetKey(path).to_escaped_user_string() == escaped
    assert AssetKey.from_escaped_user_string(escaped).path == path


@pytest.mark.interop
def test_asset_key_parsing_matches_dagster_pipes_exhaustively() -> None:
    dagster_pipes = pytest.importorskip("dagster_pipes")
    to_asset_key_path = getattr(dagster_pipes, "to_asset_key_path", None)
    if to_asset_key_path is None:
        pytest.skip("dagster_pipes has no to_asset_key_path")
    strings = ["".join(t) for n in range(7) for t in itertools.product("a/\\", repeat=n)]
    strings += [escaped for _, escaped in ASSET_KEY_ROUND_TRIPS]
    strings += [escaped for escaped, _ in ASSET_KEY_PARSES]
    mismatches = [(s, parse_asset_key(s), to_asset_key_path(s)) for s in strings
                  if parse_asset_key(s) != to_asset_key_path(s)]
    assert mismatches == []


def test_asset_key_escape_parse_round_trips_exhaustively() -> None:
    # Every non-empty-last-component path over a tricky alphabet survives escape -> parse.
    for n in range(1, 4):
        for parts in itertools.product(["a", "/", "\\", "", "\\/", "//"], repeat=n):
            path = list(parts)
            if path[-1] == "":
                continue  # a trailing empty component is dropped by design (reference rule)
            assert parse_asset_key(escape_asset_key(path)) == path, path


# ----------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------

COLUMN = {
    "name": "a",
    "type": "int",
    "description": "the a column",
    "tags": {"pii": "no"},
    "constraints": {"nullable": False, "unique": True, "other": ["> 0"]},
}
TABLE = {
    "records": [{"a": 1, "b": "x", "c": None, "d": 1.5, "e": True}],
    "schema": [COLUMN, {"name": "b", "type": "str"}],
}
LINEAGE = {
    "deps_by_column": {
        "a": [{"asset_key": "up", "column_name": "x"}, {"asset_key": ["up", "stream"], "column_name": "y"}],
        "b": [],
    }
}

# (type, raw value given, raw value expected on the wire)
VALID_METADATA: list[tuple[str, Any, Any]] = [
    ("__infer__", "s", "s"),
    ("__infer__", 3, 3),
    ("__infer__", 2.5, 2.5),
    ("__infer__", True, True),
    ("__infer__", None, None),
    ("__infer__", [1, "a"], [1, "a"]),
    ("__infer__", {"k": [1]}, {"k": [1]}),
    ("text", "hello ✓", "hello ✓"),
    ("url", "https://example.com", "https://example.com"),
    ("path", "/data/file.csv", "/data/file.csv"),
    ("notebook", "/nb/analysis.ipynb", "/nb/analysis.ipynb"),
    ("md", "# title", "# title"),
    ("json", {"a": [1, {"b": None}]}, {"a": [1, {"b": None}]}),
    ("json", [1, 2], [1, 2]),
    ("float", 1.5, 1.5),
    ("float", 2, 2.0),  # widened: the reference orchestrator checks for a float
    ("int", 7, 7),
    ("int", -(2**40), -(2**40)),
    ("bool", False, False),
    ("dagster_run", "0f7d0a1c-run", "0f7d0a1c-run"),
    ("asset", "a/b", "a/b"),
    ("null", None, None),
    ("timestamp", 1_700_000_000.25, 1_700_000_000.25),
    ("timestamp", 1_700_000_000, 1_700_000_000.0),
    ("table", TABLE, TABLE),
    ("table", {"records": [], "schema": []}, {"records": [], "schema": []}),
    ("table_schema", {"columns": [COLUMN]}, {"columns": [COLUMN]}),
    ("table_schema", {"columns": [{"name": "a", "type": "str", "constraints": None}]},
     {"columns": [{"name": "a", "type": "str", "constraints": None}]}),
    ("table_column_lineage", LINEAGE, LINEAGE),
]

INVALID_METADATA: list[tuple[str, Any, str]] = [
    ("__infer__", object(), "JSON value"),
    ("__infer__", {1, 2}, "JSON value"),
    ("__infer__", b"bytes", "JSON value"),
    ("text", 1, "must be a string"),
    ("url", None, "must be a string"),
    ("path", ["p"], "must be a string"),
    ("notebook", 1.0, "must be a string"),
    ("md", True, "must be a string"),
    ("json", "s", "object or a list"),
    ("json", 3, "object or a list"),
    ("float", "1.5", "must be a number"),
    ("float", True, "must be a number"),
    ("float", None, "must be a number"),
    ("int", 1.0, "must be an integer"),
    ("int", True, "must be an integer"),
    ("int", "1", "must be an integer"),
    ("bool", 1, "must be a boolean"),
    ("bool", "true", "must be a boolean"),
    ("dagster_run", 5, "must be a string"),
    ("asset", ["a", "b"], "must be a string"),
    ("null", 0, "must be null"),
    ("null", "", "must be null"),
    ("timestamp", "2024-01-01", "must be a number"),
    ("timestamp", False, "must be a number"),
    ("table", [], "records"),
    ("table", {"records": "x", "schema": []}, "records"),
    ("table", {"records": [1], "schema": []}, "record"),
    ("table", {"records": [], "schema": "x"}, "schema"),
    ("table", {"records": []}, "schema"),
    ("table", {"records": [], "schema": [{"type": "int"}]}, "name"),
    ("table", {"records": [], "schema": [{"name": "a"}]}, "type"),
    ("table", {"records": [{"a": [1]}], "schema": [{"name": "a", "type": "int"}]}, "value"),
    ("table", {"records": [{"a": {"x": 1}}], "schema": [{"name": "a", "type": "int"}]}, "value"),
    ("table_schema", {"schema": []}, "columns"),
    ("table_schema", {"columns": "a"}, "columns"),
    ("table_schema", {"columns": [{"name": 1, "type": "int"}]}, "name"),
    ("table_schema", {"columns": [{"name": "a", "type": 5}]}, "type"),
    ("table_schema", {"columns": [{"name": "a", "type": "int", "description": 1}]}, "description"),
    ("table_schema", {"columns": [{"name": "a", "type": "int", "tags": {"k": 1}}]}, "tags"),
    ("table_schema", {"columns": [{"name": "a", "type": "int", "constraints": {"bogus": True}}]},
     "constraints"),
    ("table_schema", {"columns": [{"name": "a", "type": "int", "constraints": {"nullable": 1}}]}, "nullable"),
    ("table_schema", {"columns": [{"name": "a", "type": "int", "constraints": {"other": "x"}}]}, "other"),
    ("table_column_lineage", {"deps_by_column": []}, "deps_by_column"),
    ("table_column_lineage", {"deps_by_column": {"c": {}}}, "list"),
    ("table_column_lineage", {"deps_by_column": {"c": [{"asset_key": "u"}]}}, "column_name"),
    ("table_column_lineage", {"deps_by_column": {"c": [{"asset_key": 1, "column_name": "x"}]}}, "asset_key"),
    ("table_column_lineage", {"deps_by_column": {"c": [{"asset_key": [1], "column_name": "x"}]}},
     "asset_key"),
    ("table_column_lineage", {"deps_by_column": {"c": [{"asset_key": "u", "column_name": "x", "z": 1}]}},
     "keys"),
]


def test_metadata_tables_cover_all_17_types() -> None:
    assert len(METADATA_TYPES) == 17
    assert {t for t, _, _ in VALID_METADATA} == set(METADATA_TYPES)
    assert {t for t, _, _ in INVALID_METADATA} == set(METADATA_TYPES)


@pytest.mark.parametrize(("metadata_type", "raw", "wire"), VALID_METADATA)
def test_normalize_metadata_accepts_typed_entries(metadata_type: str, raw: Any, wire: Any) -> None:
    out = normalize_metadata({"label": {"raw_value": raw, "type": metadata_type}})
    assert out == {"label": {"raw_value": wire, "type": metadata_type}}
    assert type(out["label"]["raw_value"]) is type(wire)
    # What the external side accepts, the orchestrator's validator accepts too.
    validate_message(make_message("report_asset_materialization", {"asset_key": "a", "metadata": out}))


@pytest.mark.interop
@pytest.mark.parametrize(("metadata_type", "raw", "wire"), VALID_METADATA)
def test_normalized_metadata_is_accepted_by_the_dagster_orchestrator(
    metadata_type: str, raw: Any, wire: Any
) -> None:
    external_metadata = pytest.importorskip("dagster._core.definitions.metadata.external_metadata")
    out = normalize_metadata({"label": {"raw_value": raw, "type": metadata_type}})
    assert out is not None
    # Through the wire (JSON) and into Dagster's own conversion: must not raise.
    converted = external_metadata.metadata_map_from_external(json.loads(json.dumps(out)))
    assert set(converted) == {"label"}


@pytest.mark.parametrize(("metadata_type", "raw", "reason"), INVALID_METADATA)
def test_normalize_metadata_rejects_wrong_shapes(metadata_type: str, raw: Any, reason: str) -> None:
    with pytest.raises(PipesUsageError, match=r'metadata entry "label"') as info:
        normalize_metadata({"label": {"raw_value": raw, "type": metadata_type}})
    assert reason in str(info.value)


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


@pytest.mark.parametrize(("metadata_type", "raw", "reason"), [c for c in INVALID_METADATA if _is_json(c[1])])
def test_orchestrator_validator_rejects_wrong_shapes(metadata_type: str, raw: Any, reason: str) -> None:
    message = make_message(
        "report_asset_materialization",
        {
            "asset_key": "a",
            "data_version": None,
            "metadata": {"label": {"raw_value": raw, "type": metadata_type}},
        },
    )
    with pytest.raises(PipesProtocolError, match='report_asset_materialization: metadata entry "label"'):
        validate_message(message)


PLAIN_VALUES: list[tuple[Any, str]] = [
    ("text", "text"),
    (1, "int"),
    (1.5, "float"),
    (False, "bool"),
    (None, "null"),
    ([1, 2], "json"),
    ({"not": "typed"}, "json"),
]


@pytest.mark.parametrize(("value", "inferred"), PLAIN_VALUES)
def test_plain_metadata_values_are_wrapped_as_infer(value: Any, inferred: str) -> None:
    out = normalize_metadata({"k": value})
    assert out == {"k": {"raw_value": value, "type": "__infer__"}}
    assert MetadataValue.from_wire(out["k"]) == MetadataValue(inferred, value)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"k": {"raw_value": 1, "type": "color"}}, "unknown metadata type 'color'"),
        ({"k": {"raw_value": 1}}, 'exactly the keys "raw_value" and "type"'),
        ({"k": {"type": "int"}}, 'exactly the keys "raw_value" and "type"'),
        ({"k": {"raw_value": 1, "type": "int", "extra": 2}}, 'exactly the keys "raw_value" and "type"'),
        ({1: "v"}, "labels must be strings"),
    ],
)
def test_normalize_metadata_rejects_bad_entries(metadata: Any, reason: str) -> None:
    with pytest.raises(PipesUsageError, match=reason):
        normalize_metadata(metadata)


@pytest.mark.parametrize("empty", [None, {}])
def test_empty_metadata_is_sent_as_null(empty: Any) -> None:
    assert normalize_metadata(empty) is None


# ----------------------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------------------

EXC = {
    "message": "ValueError: boom\n",
    "stack": ['  File "x.py", line 1, in <module>\n'],
    "name": "ValueError",
    "cause": None,
    "context": None,
}
CHAINED_EXC = {**EXC, "cause": EXC, "context": EXC}
RAM = "report_asset_materialization"
RAC = "report_asset_check"
CHECK = {"asset_key": "a", "check_name": "c", "passed": True}

# (method, params as sent, params after validation)
VALID_MESSAGES: list[tuple[str, Any, dict[str, Any]]] = [
    ("opened", {"extras": {"k": "v"}}, {"extras": {"k": "v"}}),
    ("opened", {}, {"extras": {}}),
    ("opened", None, {"extras": {}}),
    ("closed", {}, {}),
    ("closed", {"exception": EXC}, {"exception": EXC}),
    ("closed", {"exception": CHAINED_EXC}, {"exception": CHAINED_EXC}),
    ("log", {"message": "hi", "level": "INFO"}, {"message": "hi", "level": "INFO"}),
    ("log", {"message": "hi"}, {"message": "hi"}),
    ("log", {"message": "hi", "level": "warn"}, {"message": "hi", "level": "warn"}),
    ("log", {"message": "hi", "level": "FATAL"}, {"message": "hi", "level": "FATAL"}),
    ("report_asset_materialization", {"asset_key": "a/b", "data_version": "v1", "metadata": None},
     {"asset_key": "a/b", "data_version": "v1", "metadata": None}),
    (RAM, {"asset_key": "a"}, {"asset_key": "a", "data_version": None, "metadata": None}),
    ("report_asset_materialization", {"asset_key": "a", "data_version": None,
                                      "metadata": {"m": {"raw_value": 1, "type": "int"}}},
     {"asset_key": "a", "data_version": None, "metadata": {"m": {"raw_value": 1, "type": "int"}}}),
    (RAC, {**CHECK, "metadata": None, "severity": "WARN"}, {**CHECK, "metadata": None, "severity": "WARN"}),
    ("report_asset_check", {"asset_key": "a", "check_name": "c", "passed": False},
     {"asset_key": "a", "check_name": "c", "passed": False, "metadata": None, "severity": "ERROR"}),
    ("report_custom_message", {"payload": None}, {"payload": None}),
    ("report_custom_message", {"payload": [1, {"x": "y"}]}, {"payload": [1, {"x": "y"}]}),
    ("log_external_stream", {"stream": "stdout", "text": "t", "extras": {}},
     {"stream": "stdout", "text": "t", "extras": {}}),
    ("log_external_stream", {"stream": "stderr", "text": ""}, {"stream": "stderr", "text": "", "extras": {}}),
]


def test_valid_message_table_covers_every_method() -> None:
    assert {m for m, _, _ in VALID_MESSAGES} == set(METHODS)
    assert {m for m, _, _ in INVALID_MESSAGES} >= set(METHODS)


@pytest.mark.parametrize(("method", "params", "expected"), VALID_MESSAGES)
def test_validate_message_accepts(method: str, params: Any, expected: dict[str, Any]) -> None:
    out = validate_message(make_message(method, params))
    assert out == {"__dagster_pipes_version": "0.1", "method": method, "params": expected}
    # The same through a JSON line.
    assert parse_message_line(json.dumps(make_message(method, params))) == out


@pytest.mark.parametrize(("method", "params", "expected"), VALID_MESSAGES)
def test_validate_message_tolerates_unknown_extra_keys(
    method: str, params: Any, expected: dict[str, Any]
) -> None:
    extended = {**(params or {}), "added_in_a_later_version": {"x": 1}}
    out = validate_message({**make_message(method, extended), "envelope_extra": True})
    assert out["params"] == {**expected, "added_in_a_later_version": {"x": 1}}
    assert out["method"] == method


# (method, params, fragment of the error)
INVALID_MESSAGES: list[tuple[str, Any, str]] = [
    ("opened", {"extras": [1]}, 'opened: param "extras" must be an object'),
    ("opened", "params", 'opened: "params" must be an object or null'),
    ("closed", {"exception": "boom"}, "closed: exception must be an object"),
    ("closed", {"exception": {**EXC, "message": None}}, 'closed: exception "message" must be a string'),
    ("closed", {"exception": {**EXC, "stack": "x"}}, 'closed: exception "stack" must be a list of strings'),
    ("closed", {"exception": {**EXC, "name": 3}}, 'closed: exception "name" must be null or a string'),
    ("closed", {"exception": {**EXC, "cause": {"message": "m"}}}, 'closed: exception.cause "stack"'),
    ("closed", {"exception": {**EXC, "context": 5}}, "closed: exception.context must be an object"),
    ("log", {}, 'log: missing param "message"'),
    ("log", {"message": 5}, 'log: param "message" must be a string, got a number'),
    ("log", {"message": "m", "level": "Level 25"}, "log: unknown level 'Level 25'"),
    ("log", {"message": "m", "level": 20}, "log: unknown level 20"),
    ("log", {"message": "m", "level": None}, "log: unknown level None"),
    ("report_asset_materialization", {}, 'report_asset_materialization: missing param "asset_key"'),
    ("report_asset_materialization", {"asset_key": ["a"]}, 'param "asset_key" must be a string, got a list'),
    (RAM, {"asset_key": "a", "data_version": 1}, 'param "data_version" must be null or a'),
    (RAM, {"asset_key": "a", "metadata": []}, 'param "metadata" must be null or an object'),
    ("report_asset_materialization", {"asset_key": "a", "metadata": {"m": 1}}, 'metadata entry "m" must be'),
    (RAC, {"check_name": "c", "passed": True}, 'report_asset_check: missing param "asset_key"'),
    (RAC, {"asset_key": "a", "passed": True}, 'report_asset_check: missing param "check_name"'),
    (RAC, {"asset_key": "a", "check_name": "c"}, 'report_asset_check: missing param "passed"'),
    ("report_asset_check", {"asset_key": "a", "check_name": "c", "passed": "yes"},
     'param "passed" must be a boolean, got a string'),
    (RAC, {**CHECK, "passed": 1}, 'param "passed" must be a boolean'),
    (RAC, {**CHECK, "check_name": 1}, 'param "check_name" must be a string'),
    ("report_asset_check", {"asset_key": "a", "check_name": "c", "passed": True, "severity": "FATAL"},
     "report_asset_check: unknown severity 'FATAL'"),
    ("report_asset_check", {"asset_key": "a", "check_name": "c", "passed": True, "severity": "warn"},
     "unknown severity 'warn'"),
    ("report_asset_check", {"asset_key": "a", "check_name": "c", "passed": True, "metadata": "m"},
     'param "metadata" must be null or an object'),
    ("report_custom_message", {}, 'report_custom_message: missing param "payload"'),
    ("report_custom_message", None, 'report_custom_message: missing param "payload"'),
    ("log_external_stream", {"text": "t"}, 'log_external_stream: missing param "stream"'),
    ("log_external_stream", {"stream": "stdin", "text": "t"}, 'param "stream" must be "stdout" or "stderr"'),
    ("log_external_stream", {"stream": "stdout"}, 'log_external_stream: missing param "text"'),
    ("log_external_stream", {"stream": "stdout", "text": 5}, 'param "text" must be a string'),
    ("frobnicate", {}, "unknown message method 'frobnicate'"),
    ("", {}, "unknown message method ''"),
]


@pytest.mark.parametrize(("method", "params", "reason"), INVALID_MESSAGES)
def test_validate_message_rejects(method: str, params: Any, reason: str) -> None:
    with pytest.raises(PipesProtocolError) as info:
        validate_message(make_message(method, params))
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([1], "message must be a JSON object, got a list"),
        ("s", "message must be a JSON object, got a string"),
        (None, "message must be a JSON object, got null"),
        (3, "message must be a JSON object, got a number"),
        ({"method": "log", "params": {"message": "m"}}, 'no "__dagster_pipes_version" field'),
        ({"__dagster_pipes_version": "0.1", "params": {}}, '"method" must be a string'),
        ({"__dagster_pipes_version": "0.1", "method": 1, "params": {}}, '"method" must be a string'),
    ],
)
def test_validate_message_rejects_bad_envelopes(obj: Any, reason: str) -> None:
    with pytest.raises(PipesProtocolError, match=reason):
        validate_message(obj)


def test_validate_message_does_not_check_the_version_value() -> None:
    # As the reference: presence of the field marks a message; its value is never compared.
    out = validate_message({"__dagster_pipes_version": "9.9", "method": "closed", "params": {}})
    assert out["method"] == "closed"


@pytest.mark.parametrize("line", ["", "{", "not json", '{"a": 1} trailing', b"\xff\xfe"])
def test_parse_message_line_rejects_non_json(line: str | bytes) -> None:
    with pytest.raises(PipesProtocolError, match="message line is not JSON"):
        parse_message_line(line)


def test_parse_message_line_accepts_bytes_and_raw_utf8() -> None:
    line = json.dumps(make_message("log", {"message": "日本語 😀", "level": "INFO"}), ensure_ascii=False)
    assert parse_message_line(line.encode("utf-8"))["params"]["message"] == "日本語 😀"


class _Unserialisable:
    pass


@pytest.mark.parametrize(("method", "params", "expected"), VALID_MESSAGES)
def test_dumps_message_equals_json_dumps_of_make_message(method: str, params: Any, expected: Any) -> None:
    line = dumps_message(method, params)
    assert line == json.dumps(make_message(method, params))
    assert list(json.loads(line)) == ["__dagster_pipes_version", "method", "params"]


@pytest.mark.parametrize(
    "params",
    [
        {"payload": "ünïcødé 😀 \u2028 \x00"},
        {"payload": {"nan": math.nan, "inf": -math.inf}},
        {"payload": 'quote " backslash \\'},
        {},
    ],
)
def test_dumps_message_is_exact_for_awkward_params(params: Any) -> None:
    expected = json.dumps(make_message("report_custom_message", params))
    assert dumps_message("report_custom_message", params) == expected


@pytest.mark.parametrize("method", ['we"ird', "back\\slash", "ünïcode", "new\nline"])
def test_dumps_message_is_exact_for_any_method_name(method: str) -> None:
    line = dumps_message(method, {})
    assert line == json.dumps(make_message(method, {}))
    assert json.loads(line)["method"] == method


@pytest.mark.parametrize("payload", [_Unserialisable(), {1, 2}, b"bytes", {"k": object()}])
def test_dumps_message_raises_usage_error_for_unserialisable_params(payload: Any) -> None:
    with pytest.raises(PipesUsageError, match="report_custom_message: params are not JSON-serialisable"):
        dumps_message("report_custom_message", {"payload": payload})


def test_dumps_message_raises_usage_error_for_circular_params() -> None:
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(PipesUsageError, match="not JSON-serialisable"):
        dumps_message("report_custom_message", {"payload": circular})


# ----------------------------------------------------------------------------------------------------------
# Exceptions
# ----------------------------------------------------------------------------------------------------------


def _raise_chain(kind: str) -> BaseException:
    try:
        if kind == "cause":
            try:
                raise KeyError("inner")
            except KeyError as inner:
                raise ValueError("outer boom") from inner
        elif kind == "context":
            try:
                raise KeyError("inner")
            except KeyError:
                raise ValueError("outer boom")  # noqa: B904 - the implicit context is what is tested
        elif kind == "from_none":
            try:
                raise KeyError("inner")
            except KeyError:
                raise ValueError("outer boom") from None
        elif kind == "both":
            try:
                raise KeyError("ctx")
            except KeyError:
                raise ValueError("outer boom") from TypeError("explicit cause")
        else:
            raise ValueError("outer boom")
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("kind", "cause", "context"),
    [
        ("plain", None, None),
        ("cause", "KeyError: 'inner'\n", None),  # "from" suppresses the context
        ("context", None, "KeyError: 'inner'\n"),
        ("from_none", None, None),
        ("both", "TypeError: explicit cause\n", None),
    ],
)
def test_serialize_exception_chains(kind: str, cause: str | None, context: str | None) -> None:
    exc = _raise_chain(kind)
    data = serialize_exception(exc)
    assert tuple(data) == EXCEPTION_KEYS
    assert data["message"] == "ValueError: outer boom\n"
    assert data["name"] == "ValueError"
    assert data["stack"] and all(isinstance(line, str) for line in data["stack"])
    assert "_raise_chain" in "".join(data["stack"])
    assert (data["cause"] or {}).get("message") == cause
    assert (data["context"] or {}).get("message") == context
    assert validate_exception(data) is None
    assert json.loads(json.dumps(data)) == data


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["plain", "cause", "context", "from_none", "both"])
def test_serialize_exception_matches_dagster_pipes(kind: str) -> None:
    dagster_pipes = pytest.importorskip("dagster_pipes")
    exc = _raise_chain(kind)
    reference = dict(dagster_pipes._pipes_exc_from_tb(traceback.TracebackException.from_exception(exc)))
    ours = serialize_exception(exc)
    if exc.__suppress_context__ and reference["context"] is not None:
        # Known, deliberate difference: the reference builds TracebackException(compact=False), which keeps a
        # context that "raise ... from" suppressed (unless it is the cause itself); this SDK drops it, as
        # Python's own traceback display and protocol.md section 3.4 do. Everything else is identical.
        assert kind in ("from_none", "both")
        reference["context"] = None
    assert ours == reference


def test_serialize_exception_of_an_unraised_exception_has_empty_stack() -> None:
    data = serialize_exception(RuntimeError("never raised"))
    assert data == {"message": "RuntimeError: never raised\n", "stack": [], "name": "RuntimeError",
                    "cause": None, "context": None}


def test_serialize_exception_qualifies_non_builtin_names() -> None:
    data = serialize_exception(_raise_custom())
    assert data["name"] == "CustomError"
    assert data["message"].startswith(f"{__name__}.CustomError: custom")


class CustomError(Exception):
    pass


def _raise_custom() -> BaseException:
    try:
        raise CustomError("custom")
    except CustomError as exc:
        return exc


def test_serialize_exception_cuts_cyclic_chains() -> None:
    first, second = ValueError("first"), KeyError("second")
    first.__context__ = second
    second.__context__ = first
    data = serialize_exception(first)
    depth = 0
    node = data
    while node["context"] is not None:
        node = node["context"]
        depth += 1
    assert depth == MAX_EXCEPTION_CHAIN_DEPTH - 1
    assert validate_exception(data) is None


# ----------------------------------------------------------------------------------------------------------
# Context data
# ----------------------------------------------------------------------------------------------------------

FULL_CONTEXT = {
    "asset_keys": ["a", "b\\/c"],
    "code_version_by_asset_key": {"a": "v1", "b\\/c": None},
    "provenance_by_asset_key": {
        "a": {"code_version": "v0", "input_data_versions": {"up": "dv"}, "is_user_provided": True},
        "b\\/c": None,
    },
    "partition_key": "2024-01-05",
    "partition_key_range": {"start": "2024-01-05", "end": "2024-01-05"},
    "partition_time_window": {"start": "2024-01-05T00:00:00+00:00", "end": "2024-01-06T00:00:00+00:00"},
    "run_id": "r-1",
    "job_name": "__ephemeral_asset_job__",
    "retry_number": 2,
    "extras": {"k": ["v"]},
}

NO_PARTITION = {"partition_key": None, "partition_key_range": None, "partition_time_window": None}

VALID_CONTEXTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("full", FULL_CONTEXT, FULL_CONTEXT),
    ("empty document", {}, empty_context_data()),
    ("op step", {"run_id": "r"}, {**empty_context_data("r")}),
    ("null extras", {"run_id": "r", "extras": None}, empty_context_data("r")),
    ("unknown key kept", {"run_id": "r", "future": 1}, {**empty_context_data("r"), "future": 1}),
    ("ranged run", {**FULL_CONTEXT, **NO_PARTITION}, {**FULL_CONTEXT, **NO_PARTITION}),
]


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in VALID_CONTEXTS], ids=[c[0] for c in VALID_CONTEXTS]
)
def test_validate_context_data_accepts(data: dict[str, Any], expected: dict[str, Any]) -> None:
    out = validate_context_data(json.loads(json.dumps(data)))
    assert out == expected
    assert set(CONTEXT_DATA_KEYS) <= set(out)


INVALID_CONTEXTS: list[tuple[Any, str]] = [
    ([], "context data must be a JSON object, got a list"),
    (None, "context data must be a JSON object, got null"),
    ({"asset_keys": "a"}, '"asset_keys" must be null or a list of strings'),
    ({"asset_keys": ["a", 1]}, '"asset_keys" must be null or a list of strings'),
    ({"code_version_by_asset_key": []}, '"code_version_by_asset_key" must be null or an object'),
    ({"provenance_by_asset_key": "x"}, '"provenance_by_asset_key" must be null or an object'),
    ({"partition_key": 5}, '"partition_key" must be null or a string'),
    ({"partition_key_range": {"start": "a"}}, '"partition_key_range" must be null or'),
    ({"partition_key_range": ["a", "b"]}, '"partition_key_range" must be null or'),
    ({"partition_time_window": {"start": 1, "end": 2}}, '"partition_time_window" must be null or'),
    ({"run_id": None}, '"run_id" must be a string'),
    ({"run_id": 7}, '"run_id" must be a string'),
    ({"job_name": 1}, '"job_name" must be null or a string'),
    ({"retry_number": "1"}, '"retry_number" must be an integer'),
    ({"retry_number": True}, '"retry_number" must be an integer'),
    ({"retry_number": 1.0}, '"retry_number" must be an integer'),
    ({"extras": []}, '"extras" must be an object'),
]


@pytest.mark.parametrize(("data", "reason"), INVALID_CONTEXTS)
def test_validate_context_data_rejects(data: Any, reason: str) -> None:
    with pytest.raises(PipesProtocolError) as info:
        validate_context_data(data)
    assert reason in str(info.value)


def test_context_data_keys_are_named_once_and_match_the_typed_dicts() -> None:
    import pipes_ext._protocol as protocol
    from pipes_ext._types import PipesContextData, PipesPartitionKeyRange, PipesTimeWindow

    # The TypedDict's field names are necessarily literals: they must be the named keys, in the same order.
    assert tuple(PipesContextData.__annotations__) == CONTEXT_DATA_KEYS
    assert len(set(CONTEXT_DATA_KEYS)) == len(CONTEXT_DATA_KEYS)
    named = {value for name, value in vars(protocol).items()
             if name.startswith("CONTEXT_") and name != "CONTEXT_DATA_KEYS"}
    assert named == set(CONTEXT_DATA_KEYS)
    assert set(empty_context_data()) == set(CONTEXT_DATA_KEYS)
    for range_type in (PipesPartitionKeyRange, PipesTimeWindow):
        assert tuple(range_type.__annotations__) == (protocol.RANGE_START, protocol.RANGE_END)


@pytest.mark.interop
def test_validate_context_data_accepts_what_dagster_pipes_types_declare() -> None:
    dagster_pipes = pytest.importorskip("dagster_pipes")
    assert set(dagster_pipes.PipesContextData.__annotations__) == set(CONTEXT_DATA_KEYS)


# ----------------------------------------------------------------------------------------------------------
# The orchestrator's file reader: one byte stream, delivered three ways
# ----------------------------------------------------------------------------------------------------------


def _line(method: str, params: Any, *, ascii_only: bool = True) -> bytes:
    return (json.dumps(make_message(method, params), ensure_ascii=ascii_only) + "\n").encode("utf-8")


STREAM_LINES = [
    _line("opened", {"extras": {}}),
    # raw multi-byte UTF-8, split across writes in the byte-by-byte run
    _line("log", {"message": "héllo 日本 😀", "level": "WARNING"}, ascii_only=False),
    _line("report_asset_materialization", {"asset_key": "a/b\\/c", "data_version": "v1",
                                           "metadata": {"rows": {"raw_value": 3, "type": "int"}}}),
    b"\n",  # blank lines are skipped
    _line("report_asset_check", {"asset_key": "a/b\\/c", "check_name": "positive", "passed": True,
                                 "metadata": None, "severity": "WARN"}),
    _line("report_custom_message", {"payload": {"nested": ["x" * 3000, "😀"]}}, ascii_only=False),
    b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": 1}}\r\n',
    _line("log_external_stream", {"stream": "stdout", "text": "out\n", "extras": {}}),
    _line("closed", {}),
]
STREAM = b"".join(STREAM_LINES)
PARTIAL = b'{"__dagster_pipes_version": "0.1", "method": "log", "params": {"message": "cut off \xe6\x97'

EXPECTED_EVENTS: list[PipesEvent] = [
    PipesOpenedEvent({}),
    PipesLogEvent("WARNING", "héllo 日本 😀"),
    MaterializeResult("a/b\\/c", {"rows": MetadataValue("int", 3)}, "v1"),
    AssetCheckResult("a/b\\/c", "positive", True, "WARN", {}),
    PipesCustomMessageEvent({"nested": ["x" * 3000, "😀"]}),
    PipesCustomMessageEvent(1),
    PipesExternalStreamEvent("stdout", "out\n", {}),
    PipesClosedEvent(None),
]


class _Collector:
    def __init__(self) -> None:
        self.events: list[PipesEvent] = []
        self.streams: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def on_event(self, event: PipesEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def on_stream(self, stream: str, text: str) -> None:
        self.streams.append((stream, text))

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= count, timeout), (count, self.events)


def _run_stream(path: Path, mode: str) -> tuple[_Collector, list[PipesProtocolIssue]]:
    collector = _Collector()
    reader = PipesFileMessageReader(path)
    context = PipesRunContext(asset_keys=[["a", "b/c"]])
    with open_pipes_session(context, PipesEnvContextInjector(), reader, on_event=collector.on_event,
                            external_stream_handler=collector.on_stream) as session:
        assert session.message_params["path"] == str(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if mode == "whole":
                os.write(fd, STREAM)
            elif mode == "byte_by_byte":
                delivered = 0
                for line in STREAM_LINES:
                    for index in range(len(line)):
                        os.write(fd, line[index : index + 1])
                        if index == len(line) // 2:
                            # Half a line is on disk: the reader must wait for its end, not parse it.
                            time.sleep(0.02)
                            assert len(collector.events) == delivered, collector.events
                    if line.strip():
                        delivered += 1
                        collector.wait_for(delivered)  # delivered while the session is still open
            elif mode == "partial_last_line":
                os.write(fd, STREAM + PARTIAL)
                collector.wait_for(len(EXPECTED_EVENTS))
                time.sleep(0.05)
                assert len(collector.events) == len(EXPECTED_EVENTS)  # the partial line waits
            else:  # pragma: no cover
                raise AssertionError(mode)
        finally:
            os.close(fd)
    assert not path.exists()  # cleaned up
    return collector, session.protocol_issues


@pytest.mark.parametrize("mode", ["whole", "byte_by_byte", "partial_last_line"])
def test_file_reader_delivers_the_same_messages_however_the_bytes_arrive(tmp_path: Path, mode: str) -> None:
    collector, issues = _run_stream(tmp_path / "messages", mode)
    if mode == "partial_last_line":
        assert collector.events[:-1] == EXPECTED_EVENTS
        assert len(issues) == 1
        issue = collector.events[-1]
        assert issue == issues[0]
        assert isinstance(issue, PipesProtocolIssue)
        assert "truncated final line" in issue.reason
        assert issue.raw == PARTIAL.decode("utf-8", "replace")
        assert issue.source == str(tmp_path / "messages")
    else:
        assert collector.events == EXPECTED_EVENTS
        assert issues == []
    assert collector.streams == [("stdout", "out\n")]
