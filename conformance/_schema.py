"""The protocol as JSON Schema (draft 2020-12), generated from ``pipes_ext._protocol``'s tables.

One source: the methods, their params, which are required and which may be null come from ``METHOD_SPECS``; the
metadata types, severities, streams and level names from their constants; the context document's keys from
``CONTEXT_DATA_KEYS``. What a param's value may be is read off the validator the table names for it
(:data:`_VALIDATOR_SCHEMAS`): a param with a validator this module does not know stops the generation, so a new
row in the table cannot be left out of the schema.

Files (see :func:`build_schemas`): ``context.schema.json`` (the context document), ``message.schema.json`` (the
envelope, each method's params checked by method) and ``params/<method>.schema.json`` (one method's params).

The suite checks every message it receives against ``message.schema.json`` with :func:`validate`, a small
validator of the keywords these files use (type, enum, const, properties, required, additionalProperties, items,
anyOf, allOf, if/then, local ``$ref``), so that the suite needs no package beyond the standard library. The tests
check the files with the ``jsonschema`` package and that both validators agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipes_ext import _protocol as p

__all__ = ["SCHEMA_DIALECT", "build_schemas", "message_schema", "context_schema", "params_schema", "validate",
           "message_problem", "write_schemas", "DEFAULT_OUT"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_ID_BASE = f"urn:pipes:protocol:{p.PIPES_PROTOCOL_VERSION}:"
DEFAULT_OUT = f"pipes-schema-{p.PIPES_PROTOCOL_VERSION}"

_STRING = {"type": "string"}
_NULL = {"type": "null"}
_LEVEL_NAMES = sorted({name for name in (p.normalize_log_level(level) for level in p.LOG_LEVELS) if name},
                      key=lambda name: p.LOG_LEVELS[name])


def _nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"anyOf": [_NULL, dict(schema)]}


def _string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": _STRING}


def _column() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name", "type"],
        "properties": {
            "name": _STRING,
            "type": _STRING,
            "description": {"type": ["string", "null"]},
            "tags": _nullable(_string_map()),
            "constraints": {
                "type": ["object", "null"],
                "additionalProperties": False,
                "properties": {"nullable": {"type": "boolean"}, "unique": {"type": "boolean"},
                               "other": _nullable({"type": "array", "items": _STRING})},
            },
        },
    }


def _metadata_raw_values() -> dict[str, dict[str, Any]]:
    """What ``raw_value`` may be for each metadata type (``metadata_problem``'s rules)."""
    column = {"$ref": "#/$defs/table_column"}
    scalar = {"type": ["string", "number", "boolean", "null"]}
    by_type: dict[str, dict[str, Any]] = {name: _STRING for name in p._STRING_METADATA_TYPES}
    by_type.update({
        p.METADATA_TYPE_INFER: {},
        "json": {"type": ["object", "array"]},
        "float": {"type": "number"},
        "timestamp": {"type": "number"},
        "int": {"type": "integer"},
        "bool": {"type": "boolean"},
        "null": _NULL,
        "table": {"type": "object", "required": ["records", "schema"],
                  "properties": {"records": {"type": "array", "items": {"type": "object",
                                                                         "additionalProperties": scalar}},
                                 "schema": {"type": "array", "items": column}}},
        "table_schema": {"type": "object", "required": ["columns"],
                         "properties": {"columns": {"type": "array", "items": column}}},
        "table_column_lineage": {
            "type": "object", "required": ["deps_by_column"],
            "properties": {"deps_by_column": {"type": "object", "additionalProperties": {
                "type": "array", "items": {
                    "type": "object", "required": ["asset_key", "column_name"], "additionalProperties": False,
                    "properties": {"asset_key": {"anyOf": [_STRING, {"type": "array", "items": _STRING}]},
                                   "column_name": _STRING}}}}}},
    })
    missing = set(p.METADATA_TYPES) ^ set(by_type)
    if missing:
        raise RuntimeError(f"metadata types without a raw_value schema, or not in METADATA_TYPES: {sorted(missing)}")
    return {name: by_type[name] for name in p.METADATA_TYPES}


def _metadata_entry() -> dict[str, Any]:
    return {
        "type": "object",
        "required": [p.METADATA_RAW_VALUE, p.METADATA_TYPE],
        "properties": {p.METADATA_TYPE: {"enum": list(p.METADATA_TYPES)}},
        "allOf": [{"if": {"properties": {p.METADATA_TYPE: {"const": name}}},
                   "then": {"properties": {p.METADATA_RAW_VALUE: raw}}}
                  for name, raw in _metadata_raw_values().items() if raw],
    }


def _exception() -> dict[str, Any]:
    link = _nullable({"$ref": "#/$defs/exception"})
    return {
        "type": "object",
        "required": ["message", "stack"],
        "properties": {"message": _STRING, "stack": {"type": "array", "items": _STRING},
                       "name": {"type": ["string", "null"]}, "cause": link, "context": link},
    }


_DEFS: dict[str, Callable[[], dict[str, Any]]] = {
    "metadata_entry": _metadata_entry,
    "table_column": _column,
    "exception": _exception,
}

# The value schema of each validator METHOD_SPECS uses (is_valid, then check).
_VALIDATOR_SCHEMAS: dict[Callable[..., Any], dict[str, Any]] = {
    p._is_str: _STRING,
    p._is_opt_str: {"type": ["string", "null"]},
    p._is_dict: {"type": "object"},
    p._is_opt_dict: {"type": ["object", "null"]},
    p._is_bool: {"type": "boolean"},
    p._is_stream: {"enum": list(p.STREAMS)},
    p._check_level: {"enum": _LEVEL_NAMES},
    p._check_severity: {"enum": list(p.SEVERITIES)},
    p._check_exception: _nullable({"$ref": "#/$defs/exception"}),
    p._check_wire_metadata: {"additionalProperties": {"$ref": "#/$defs/metadata_entry"}},
}


def _param_schema(spec: p.MessageParamSpec) -> dict[str, Any]:
    parts = []
    for validator in (spec.is_valid, spec.check):
        if validator is None:
            continue
        if validator not in _VALIDATOR_SCHEMAS:
            raise RuntimeError(f"param {spec.name!r}: no schema for its validator {validator.__name__}; add it to "
                               "conformance/_schema.py's _VALIDATOR_SCHEMAS")
        parts.append(_VALIDATOR_SCHEMAS[validator])
    schema: dict[str, Any] = {}
    for part in parts:
        schema.update(part)
    if spec.expected:
        schema["description"] = spec.expected
    if spec.null_is_absent and schema:
        schema = _nullable(schema)
    return schema


def _params_body(spec: p.MethodSpec) -> dict[str, Any]:
    required = [param.name for param in spec.params if param.required]
    return {
        # null params are read as {}: allowed when no param is required
        "type": "object" if required else ["object", "null"],
        "required": required,
        "properties": {param.name: _param_schema(param) for param in spec.params},
    }


def _used_defs(schema: Any) -> set[str]:
    text = json.dumps(schema)
    found = {name for name in _DEFS if f'"#/$defs/{name}"' in text}
    if "metadata_entry" in found:
        found.add("table_column")
    return found


def _document(name: str, title: str, body: dict[str, Any]) -> dict[str, Any]:
    schema = {"$schema": SCHEMA_DIALECT, "$id": _ID_BASE + name, "title": title, **body}
    defs = _used_defs(body)
    if defs:
        schema["$defs"] = {d: _DEFS[d]() for d in sorted(defs)}
    return schema


def params_schema(method: str) -> dict[str, Any]:
    """The schema of one method's params."""
    return _document(f"params:{method}", f"Pipes {p.PIPES_PROTOCOL_VERSION}: params of {method}",
                     _params_body(p.METHOD_SPECS[method]))


def message_schema() -> dict[str, Any]:
    """The schema of one message: the envelope, and each method's params by method."""
    checks = []
    for method, spec in p.METHOD_SPECS.items():
        then: dict[str, Any] = {"properties": {p.MESSAGE_PARAMS_FIELD: _params_body(spec)}}
        if any(param.required for param in spec.params):
            then["required"] = [p.MESSAGE_PARAMS_FIELD]
        checks.append({"if": {"properties": {p.MESSAGE_METHOD_FIELD: {"const": method}}}, "then": then})
    body = {
        "type": "object",
        "required": [p.PIPES_PROTOCOL_VERSION_FIELD, p.MESSAGE_METHOD_FIELD],
        "properties": {
            p.PIPES_PROTOCOL_VERSION_FIELD: {"const": p.PIPES_PROTOCOL_VERSION},
            p.MESSAGE_METHOD_FIELD: {"enum": list(p.METHODS)},
            p.MESSAGE_PARAMS_FIELD: {"type": ["object", "null"]},
        },
        "allOf": checks,
    }
    return _document("message", f"Pipes {p.PIPES_PROTOCOL_VERSION}: a message (one JSON line)", body)


def _context_keys() -> dict[str, dict[str, Any]]:
    key_range = _nullable({"type": "object", "required": [p.RANGE_START, p.RANGE_END],
                           "properties": {p.RANGE_START: _STRING, p.RANGE_END: _STRING}})
    keys = {
        p.CONTEXT_ASSET_KEYS: _nullable({"type": "array", "items": _STRING}),
        p.CONTEXT_CODE_VERSION_BY_ASSET_KEY: _nullable({"type": "object",
                                                        "additionalProperties": {"type": ["string", "null"]}}),
        p.CONTEXT_PROVENANCE_BY_ASSET_KEY: _nullable({"type": "object",
                                                      "additionalProperties": {"type": ["object", "null"]}}),
        p.CONTEXT_PARTITION_KEY: {"type": ["string", "null"]},
        p.CONTEXT_PARTITION_KEY_RANGE: key_range,
        p.CONTEXT_PARTITION_TIME_WINDOW: key_range,
        p.CONTEXT_RUN_ID: _STRING,
        p.CONTEXT_JOB_NAME: {"type": ["string", "null"]},
        p.CONTEXT_RETRY_NUMBER: {"type": "integer"},
        p.CONTEXT_EXTRAS: {"type": "object"},
    }
    if set(keys) != set(p.CONTEXT_DATA_KEYS):
        raise RuntimeError("conformance/_schema.py's context keys differ from CONTEXT_DATA_KEYS")
    return {key: keys[key] for key in p.CONTEXT_DATA_KEYS}


def context_schema() -> dict[str, Any]:
    """The schema of the context document (every key present, as an orchestrator sends it)."""
    body = {"type": "object", "required": list(p.CONTEXT_DATA_KEYS), "properties": _context_keys()}
    return _document("context", f"Pipes {p.PIPES_PROTOCOL_VERSION}: the context document", body)


def build_schemas() -> dict[str, dict[str, Any]]:
    """Every schema file, by its path relative to the output directory."""
    files = {"context.schema.json": context_schema(), "message.schema.json": message_schema()}
    for method in p.METHODS:
        files[f"params/{method}.schema.json"] = params_schema(method)
    return files


def schema_text(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(out: Path) -> list[Path]:
    """Write :func:`build_schemas` under ``out`` (created); returns the paths written."""
    written = []
    for name, schema in build_schemas().items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(schema_text(schema), encoding="utf-8")
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ validation

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _type_name(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](value):
            return name
    return type(value).__name__


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:60] + "..."


def validate(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
             where: str = "") -> str | None:
    """The first way ``instance`` breaks ``schema`` (``"<path>: <why>"``), or None when it conforms."""
    root = schema if root is None else root
    path = where or "(the document)"
    ref = schema.get("$ref")
    if ref is not None:
        target: Any = root
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        problem = validate(instance, target, root, where)
        if problem:
            return problem
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES[k](instance) for k in kinds):
            return f"{path}: expected {' or '.join(kinds)}, got {_type_name(instance)}"
    if "const" in schema and not _equal(instance, schema["const"]):
        return f"{path}: expected {_short(schema['const'])}, got {_short(instance)}"
    if "enum" in schema and not any(_equal(instance, v) for v in schema["enum"]):
        return f"{path}: {_short(instance)} is not one of {', '.join(_short(v) for v in schema['enum'])}"
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            if key not in instance:
                return f"{path}: missing {key!r}"
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            sub = properties.get(key)
            if sub is None:
                if extra is False:
                    return f"{path}: unexpected key {key!r}"
                if extra is True:
                    continue
                sub = extra
            problem = validate(value, sub, root, f"{where}.{key}" if where else key)
            if problem:
                return problem
    if isinstance(instance, list) and "items" in schema:
        for index, item in enumerate(instance):
            problem = validate(item, schema["items"], root, f"{where}[{index}]")
            if problem:
                return problem
    if "anyOf" in schema:
        problems = [validate(instance, sub, root, where) for sub in schema["anyOf"]]
        if all(problems):
            return min(problems, key=lambda text: len(text or ""))  # the closest alternative's reason
    for sub in schema.get("allOf", ()):
        problem = validate(instance, sub, root, where)
        if problem:
            return problem
    if "if" in schema and validate(instance, schema["if"], root, where) is None and "then" in schema:
        return validate(instance, schema["then"], root, where)
    return None


def _equal(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


_MESSAGE_SCHEMA: dict[str, Any] | None = None


def message_problem(message: Any) -> str | None:
    """Why ``message`` (one decoded message line) breaks ``message.schema.json``, or None."""
    global _MESSAGE_SCHEMA
    if _MESSAGE_SCHEMA is None:
        _MESSAGE_SCHEMA = message_schema()
    return validate(message, _MESSAGE_SCHEMA)
