"""Orchestrator-side test vectors: load ``conformance/vectors/*.json`` and check ``pipes_core`` / ``pipes_ext``
against them.

The JSON files are the product (their format is in ``conformance/vectors/README.md``); this module is their
Python reader. :func:`load_vectors` validates every file's shape and returns one :class:`Vector` per case;
:func:`check_vector` runs this SDK on one vector and returns the differences (an empty list when it conforms).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipes_core import PipesProtocolIssue
    from pipes_ext import PipesProtocolError

from pipes_ext._protocol import METADATA_TYPES

__all__ = [
    "VECTORS_DIR",
    "FORMAT_VERSION",
    "KINDS",
    "SECTIONS",
    "DECODE_ERRORS",
    "ISSUE_REASONS",
    "EVENT_NAMES",
    "Vector",
    "VectorFormatError",
    "load_index",
    "load_file",
    "load_vectors",
    "stream_bytes",
    "json_equal",
    "check_vector",
    "iter_failures",
    "run_stream",
    "event_json",
    "decode_error_class",
    "issue_reason_class",
]

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"

# kind -> the sections of its file that hold lists of vectors.
SECTIONS: dict[str, tuple[str, ...]] = {
    "bootstrap": ("encode", "decode_valid", "decode_invalid"),
    "asset_keys": ("pairs", "parse_only"),
    "metadata": ("entries",),
    "context_data": ("build", "valid", "invalid"),
    "messages": ("streams",),
}
KINDS = tuple(SECTIONS)
DECODE_ERRORS = ("not_base64", "not_zlib", "not_json", "not_object", "too_large")
ISSUE_REASONS = (
    "truncated",
    "not_json",
    "not_object",
    "no_version",
    "bad_method",
    "unknown_method",
    "bad_params",
    "bad_metadata",
    "unselected_asset",
    "duplicate_materialization",
    "too_deep",
    "bad_version",
    "bad_exception",
    "after_closed",
    "second_opened",
)
EVENT_NAMES = ("opened", "closed", "log", "materialization", "check", "custom_message", "external_stream")


class VectorFormatError(Exception):
    """A vector file does not have the documented shape."""


@dataclass(frozen=True)
class Vector:
    """One test vector: ``data`` is its JSON object as written in the file."""

    kind: str
    section: str
    name: str
    data: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.kind}.{self.section}:{self.name}"


# --------------------------------------------------------------------------------------------------------------
# Loading and shape validation
# --------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VectorFormatError(f"{path.name}: cannot read JSON: {exc}") from exc


def load_index(directory: Path = VECTORS_DIR) -> dict[str, str]:
    """``{kind: file name}`` from ``index.json``, checked: every kind listed once, files that exist."""
    index = _read_json(directory / INDEX_FILE)
    if not isinstance(index, dict) or index.get("format") != "pipes-conformance-vectors":
        raise VectorFormatError(f'{INDEX_FILE}: "format" must be "pipes-conformance-vectors"')
    if index.get("format_version") != FORMAT_VERSION or index.get("protocol_version") != "0.1":
        raise VectorFormatError(f"{INDEX_FILE}: format_version {FORMAT_VERSION} and protocol_version 0.1 expected")
    files: dict[str, str] = {}
    for entry in index.get("files") or []:
        kind, name = entry.get("kind"), entry.get("file")
        if kind not in SECTIONS or not isinstance(name, str) or kind in files:
            raise VectorFormatError(f"{INDEX_FILE}: bad or repeated entry {entry!r}")
        if not (directory / name).is_file():
            raise VectorFormatError(f"{INDEX_FILE}: {name} does not exist")
        files[kind] = name
    if set(files) != set(SECTIONS):
        raise VectorFormatError(f"{INDEX_FILE}: kinds missing: {sorted(set(SECTIONS) - set(files))}")
    return files


def _need(where: str, data: Mapping[str, Any], key: str, check: Callable[[Any], bool], what: str) -> None:
    if key not in data or not check(data[key]):
        raise VectorFormatError(f'{where}: "{key}" must be {what}')


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_path(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(p, str) for p in v)


def _is_opt_keys(v: Any) -> bool:
    return v is None or _is_path(v)


def _is_line(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, dict) and set(v) == {"base64"} and isinstance(v["base64"], str))


def _anything(v: Any) -> bool:
    return True


def _check_event(where: str, event: Any) -> None:
    if not isinstance(event, dict) or event.get("event") not in EVENT_NAMES:
        raise VectorFormatError(f'{where}: "event" must be one of {", ".join(EVENT_NAMES)}')
    _need(where, event, "line", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a line number")


def _check_shape(kind: str, section: str, where: str, data: dict[str, Any]) -> None:
    need = _need
    if kind == "bootstrap":
        if section == "encode":
            need(where, data, "value", _anything, "present")
            need(where, data, "json", _is_str, "a string")
            need(where, data, "encoded", _is_str, "a string")
        elif section == "decode_valid":
            need(where, data, "input", _is_str, "a string")
            need(where, data, "value", _is_dict, "an object")
        else:
            need(where, data, "input", _is_str, "a string")
            need(where, data, "error", lambda v: v in DECODE_ERRORS, f"one of {', '.join(DECODE_ERRORS)}")
            need(where, data, "reference_accepts", _is_bool, "a boolean")
            if data["error"] == "too_large":
                need(where, data, "max_decoded_bytes", lambda v: isinstance(v, int) and v > 0, "a positive integer")
    elif kind == "asset_keys":
        need(where, data, "path", _is_path, "a list of strings")
        need(where, data, "escaped", _is_str, "a string")
    elif kind == "metadata":
        need(where, data, "entry", _anything, "present")
        need(where, data, "valid", _is_bool, "a boolean")
        need(where, data, "reference_accepts", _is_bool, "a boolean")
        if data["valid"]:
            need(where, data, "resolved", lambda v: isinstance(v, dict) and v.get("type") in METADATA_TYPES
                 and "value" in v, "{type, value}")
    elif kind == "context_data":
        need(where, data, "document", _anything, "present")
        if section == "build":
            need(where, data, "step", _is_dict, "an object")
            need(where, data["step"], "asset_key_paths", lambda v: v is None or (
                isinstance(v, list) and all(_is_path(p) for p in v)), "null or a list of component lists")
            need(where, data, "extras", _is_dict, "an object")
        elif section == "valid":
            need(where, data, "expected", _is_dict, "an object")
            need(where, data["expected"], "asset_key_paths", lambda v: v is None or (
                isinstance(v, list) and all(_is_path(p) for p in v)), "null or a list of component lists")
            need(where, data["expected"], "is_asset_step", _is_bool, "a boolean")
            need(where, data["expected"], "is_partition_step", _is_bool, "a boolean")
        else:
            need(where, data, "key", lambda v: v is None or isinstance(v, str), "null or a string")
    else:  # messages
        need(where, data, "selected_asset_keys", _is_opt_keys, "null or a list of strings")
        need(where, data, "lines", lambda v: isinstance(v, list) and all(_is_line(x) for x in v),
             'a list of strings or {"base64": str}')
        need(where, data, "final_newline", _is_bool, "a boolean")
        need(where, data, "expected", _is_dict, "an object")
        expected = data["expected"]
        need(where, expected, "events", lambda v: isinstance(v, list), "a list")
        need(where, expected, "issues", lambda v: isinstance(v, list) and all(
            isinstance(i, dict) and i.get("reason") in ISSUE_REASONS and isinstance(i.get("line"), int)
            for i in v), f"a list of {{line, reason}} with reason one of {', '.join(ISSUE_REASONS)}")
        need(where, expected, "implicit_materializations", _is_path, "a list of strings")
        for event in expected["events"]:
            _check_event(where, event)
        event_lines = [e["line"] for e in expected["events"]]
        issue_lines = [i["line"] for i in expected["issues"]]
        numbers = event_lines + issue_lines
        if (len(event_lines) != len(set(event_lines)) or len(issue_lines) != len(set(issue_lines))
                or any(n > len(data["lines"]) for n in numbers)):
            raise VectorFormatError(f"{where}: each line yields at most one event and one issue (an issue on a line "
                                    "with an event: the message was still handled), within the stream")
        lines = [e["line"] for e in expected["events"]]
        if lines != sorted(lines):
            raise VectorFormatError(f"{where}: events must be in line order")


def load_file(kind: str, directory: Path = VECTORS_DIR) -> list[Vector]:
    """The vectors of one kind, shape-checked, in file order."""
    name = load_index(directory)[kind]
    doc = _read_json(directory / name)
    if not isinstance(doc, dict) or doc.get("kind") != kind or doc.get("format_version") != FORMAT_VERSION:
        raise VectorFormatError(f'{name}: "kind" must be {kind!r} and "format_version" {FORMAT_VERSION}')
    vectors: list[Vector] = []
    for section in SECTIONS[kind]:
        items = doc.get(section)
        if not isinstance(items, list) or not items:
            raise VectorFormatError(f'{name}: "{section}" must be a non-empty list')
        seen: set[str] = set()
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                raise VectorFormatError(f'{name}: every item of "{section}" needs a "name"')
            if item["name"] in seen:
                raise VectorFormatError(f'{name}: "{section}" repeats the name {item["name"]!r}')
            seen.add(item["name"])
            _check_shape(kind, section, f"{name} {section}/{item['name']}", item)
            vectors.append(Vector(kind, section, item["name"], item))
    return vectors


def load_vectors(directory: Path = VECTORS_DIR) -> list[Vector]:
    """Every vector of every kind listed in the index."""
    return [v for kind in KINDS for v in load_file(kind, directory)]


def stream_bytes(stream: Mapping[str, Any]) -> bytes:
    """The bytes of a message stream: its lines, UTF-8 (or base64-given raw bytes), each ended by a newline but
    the last when ``final_newline`` is false."""
    parts = [base64.b64decode(x["base64"]) if isinstance(x, dict) else x.encode("utf-8") for x in stream["lines"]]
    data = b"\n".join(parts)
    return data + b"\n" if stream["final_newline"] else data


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values that also tells booleans, integers and floats apart (``1 != 1.0 != True``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _diff(what: str, got: Any, want: Any) -> list[str]:
    return [] if json_equal(got, want) else [f"{what}: got {got!r}, expected {want!r}"]


# --------------------------------------------------------------------------------------------------------------
# Checking this SDK against the vectors
# --------------------------------------------------------------------------------------------------------------


def decode_error_class(error: PipesProtocolError) -> str:
    """The vector error class of a ``decode_param`` error: its kind (never its wording)."""
    return str(error.kind.value)


def issue_reason_class(issue: PipesProtocolIssue) -> str:
    """The vector reason class of a ``PipesProtocolIssue``: its kind (never its wording)."""
    return str(issue.kind.value)


def _check_bootstrap(v: Vector) -> list[str]:
    from pipes_ext._errors import PipesProtocolError
    from pipes_ext._protocol import decode_param, encode_param

    d = v.data
    if v.section == "encode":
        out = _diff("json text", json.dumps(d["value"]), d["json"])
        out += _diff("encode_param", encode_param(d["value"]), d["encoded"])
        try:
            out += _diff("inflated encoded text", zlib.decompress(base64.b64decode(d["encoded"])).decode(), d["json"])
            out += _diff("decode_param", decode_param(d["encoded"]), d["value"])
        except (ValueError, zlib.error, PipesProtocolError) as exc:
            out.append(f"the expected encoded string does not decode: {exc}")
        return out
    if v.section == "decode_valid":
        return _diff("decode_param", decode_param(d["input"]), d["value"])
    try:
        value = decode_param(d["input"], **({"max_bytes": d["max_decoded_bytes"]} if "max_decoded_bytes" in d else {}))
    except PipesProtocolError as exc:
        return _diff("error class", decode_error_class(exc), d["error"])
    return [f"decode_param accepted it as {value!r}; expected error {d['error']}"]


def _check_asset_key(v: Vector) -> list[str]:
    from pipes_ext._protocol import escape_asset_key, parse_asset_key

    d = v.data
    out = _diff("parse_asset_key", parse_asset_key(d["escaped"]), d["path"])
    if v.section == "pairs":
        out += _diff("escape_asset_key", escape_asset_key(d["path"]), d["escaped"])
    return out


def _events_of(lines: list[str], selected: list[str] | None) -> tuple[list[Any], list[Any]]:
    """Feed whole lines to a handler; return (events, issues) as pipes_core objects."""
    from pipes_core import PipesMessageHandler, PipesProtocolIssue

    events: list[Any] = []
    handler = PipesMessageHandler(
        {"asset_keys": selected}, on_event=events.append, logger=_quiet_logger(), external_stream_handler=_drop
    )
    for line in lines:
        handler.handle_line(line)
    return [e for e in events if not isinstance(e, PipesProtocolIssue)], list(handler.issues)


def _check_metadata(v: Vector) -> list[str]:
    d = v.data
    out: list[str] = []
    for method, params in (
        ("report_asset_materialization", {"asset_key": "a", "data_version": None, "metadata": {"m": d["entry"]}}),
        ("report_asset_check", {"asset_key": "a", "check_name": "c", "passed": True, "severity": "ERROR",
                                "metadata": {"m": d["entry"]}}),
    ):
        line = json.dumps({"__dagster_pipes_version": "0.1", "method": method, "params": params})
        events, issues = _events_of([line], None)
        if d["valid"]:
            if issues or len(events) != 1:
                out.append(f"{method}: rejected: {[str(i) for i in issues]}")
                continue
            value = events[0].metadata["m"]
            out += _diff(f"{method}: resolved", {"type": value.type, "value": value.value}, d["resolved"])
        elif events or [issue_reason_class(i) for i in issues] != ["bad_metadata"]:
            out.append(f"{method}: expected one bad_metadata issue, got events {events} and issues "
                       f"{[str(i) for i in issues]}")
    return out


def _check_context(v: Vector) -> list[str]:
    from pipes_core import PipesRunContext
    from pipes_ext._context import PipesContext
    from pipes_ext._context_loaders import PipesDefaultContextLoader
    from pipes_ext._errors import PipesProtocolError
    from pipes_ext._protocol import parse_asset_key
    from pipes_ext._writers import PipesInMemoryMessageWriterChannel

    d = v.data
    if v.section == "build":
        step = d["step"]
        window = step.get("partition_time_window")
        key_range = step.get("partition_key_range")
        context = PipesRunContext(
            asset_keys=step["asset_key_paths"],
            code_version_by_asset_key=step.get("code_version_by_asset_key"),
            provenance_by_asset_key=step.get("provenance_by_asset_key"),
            partition_key=step.get("partition_key"),
            partition_key_range=None if key_range is None else (key_range[0], key_range[1]),
            partition_time_window=None if window is None else (window[0], window[1]),
            run_id=step["run_id"],
            job_name=step.get("job_name"),
            retry_number=step.get("retry_number", 0),
        )
        built = context.to_context_data(d["extras"])
        return _diff("document", built, d["document"]) + _diff("key order", list(built), list(d["document"]))
    loader = PipesDefaultContextLoader()
    if v.section == "invalid":
        try:
            loaded = loader.load_context({"data": d["document"]})
        except PipesProtocolError as exc:
            needle = "must be a JSON object" if d["key"] is None else f'"{d["key"]}"'
            return [] if needle in str(exc) else [f"the error does not name {needle}: {exc}"]
        return [f"accepted: {loaded!r}"]
    loaded = loader.load_context({"data": json.loads(json.dumps(d["document"]))})
    out = _diff("loaded document", loaded, d["document"])
    pipes = PipesContext(loaded, PipesInMemoryMessageWriterChannel())
    want = d["expected"]
    out += _diff("is_asset_step", pipes.is_asset_step, want["is_asset_step"])
    out += _diff("is_partition_step", pipes.is_partition_step, want["is_partition_step"])
    paths = [parse_asset_key(k) for k in pipes.asset_keys] if pipes.is_asset_step else None
    return out + _diff("asset key paths", paths, want["asset_key_paths"])


def _quiet_logger() -> logging.Logger:
    logger = logging.getLogger("conformance.vectors")
    logger.propagate = False
    logger.addHandler(logging.NullHandler())
    return logger


def _drop(stream: str, text: str) -> None:
    return None


def event_json(event: Any) -> dict[str, Any]:
    """A ``pipes_core`` event in the vectors' event form (without ``line``): ``event_to_json``'s full form."""
    from pipes_core import PipesProtocolIssue, event_to_json

    if isinstance(event, PipesProtocolIssue):
        raise TypeError(f"not an event: {event!r}")
    return event_to_json(event, "full")


@dataclass(frozen=True)
class StreamOutcome:
    """What ``pipes_core`` derived from one message stream, in the vectors' terms."""

    events: list[dict[str, Any]]
    issues: list[dict[str, Any]]
    implicit_materializations: list[str]
    issue_count: int


def run_stream(stream: Mapping[str, Any]) -> StreamOutcome:
    """Write the stream's bytes to a messages file read by ``pipes_core``'s real file reader in a session whose
    selection is the stream's, and report what it derived. Each non-blank line (blank: JSON whitespace only)
    yields exactly one event or issue, in order, which gives every event its line number; an issue whose message
    was still handled (``handled``) is followed by that line's event."""
    from pipes_core import PipesEnvContextInjector, PipesFileMessageReader, PipesRunContext, open_pipes_session
    from pipes_core import PipesProtocolIssue as Issue

    data = stream_bytes(stream)
    numbered = [i for i, line in enumerate(data.split(b"\n"), start=1) if line.strip(b" \t\r")]
    seen: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="pipes-vectors-") as tmp:
        path = os.path.join(tmp, "messages")
        context = PipesRunContext(asset_keys=stream["selected_asset_keys"], run_id="vectors")
        reader = PipesFileMessageReader(path)
        with open_pipes_session(context, PipesEnvContextInjector(), reader, on_event=seen.append,
                                logger=_quiet_logger(), external_stream_handler=_drop) as session:
            with open(path, "ab") as f:
                f.write(data)
    events: list[dict[str, Any]] = []
    issues: list[dict[str, Any]] = []
    lines = iter(numbered)
    line = 0
    next_is_same_line = False
    for event in seen:
        if not next_is_same_line:
            line = next(lines, -1)
            if line < 0:
                raise AssertionError(f"{len(numbered)} non-blank lines gave more events and issues: {seen!r}")
        if isinstance(event, Issue):
            issues.append({"line": line, "reason": issue_reason_class(event)})
            next_is_same_line = event.handled
        else:
            events.append({"line": line, **event_json(event)})
            next_is_same_line = False
    if next(lines, -1) >= 0 or next_is_same_line:
        raise AssertionError(f"{len(numbered)} non-blank lines gave fewer events and issues: {seen!r}")
    implicit = [r.asset_key for r in session.get_results() if getattr(r, "implicit", False)]
    return StreamOutcome(events, issues, implicit, session.issue_count)


def _check_stream(v: Vector) -> list[str]:
    outcome = run_stream(v.data)
    want = v.data["expected"]
    out: list[str] = []
    for i in range(max(len(outcome.events), len(want["events"]))):
        got = outcome.events[i] if i < len(outcome.events) else None
        exp = want["events"][i] if i < len(want["events"]) else None
        out += _diff(f"event {i + 1}", got, exp)
    out += _diff("issues", outcome.issues, want["issues"])
    out += _diff("issue count", outcome.issue_count, len(want["issues"]))
    return out + _diff("implicit materializations", outcome.implicit_materializations,
                       want["implicit_materializations"])


_CHECKERS: dict[str, Callable[[Vector], list[str]]] = {
    "bootstrap": _check_bootstrap,
    "asset_keys": _check_asset_key,
    "metadata": _check_metadata,
    "context_data": _check_context,
    "messages": _check_stream,
}


def check_vector(vector: Vector) -> list[str]:
    """Run ``pipes_core`` / ``pipes_ext`` on one vector; the differences from what it expects (none: conforms).
    An unexpected exception is a difference too."""
    try:
        return _CHECKERS[vector.kind](vector)
    except Exception as exc:
        return [f"{vector.id}: raised {type(exc).__name__}: {exc}"]


def iter_failures(vectors: list[Vector] | None = None) -> Iterator[tuple[Vector, list[str]]]:
    """Every vector this SDK does not conform to, with its differences."""
    for vector in load_vectors() if vectors is None else vectors:
        problems = check_vector(vector)
        if problems:
            yield vector, problems
