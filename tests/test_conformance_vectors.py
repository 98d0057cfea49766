"""The orchestrator-side conformance vectors (conformance/vectors/): every file listed and well-formed, every
vector met by pipes_core / pipes_ext, the checker able to fail, and the reference's behaviour as recorded."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conformance._vectors import (
    DECODE_ERRORS,
    EVENT_NAMES,
    ISSUE_REASONS,
    KINDS,
    SECTIONS,
    VECTORS_DIR,
    Vector,
    VectorFormatError,
    check_vector,
    json_equal,
    load_file,
    load_index,
    load_vectors,
    stream_bytes,
)
from pipes_ext._protocol import METADATA_TYPES

VECTORS = load_vectors()


def by_section(kind: str, section: str) -> list[Vector]:
    return [v for v in VECTORS if v.kind == kind and v.section == section]


def ids(vectors: list[Vector]) -> list[str]:
    return [v.id for v in vectors]


# ----------------------------------------------------------------------------------------------------------
# The files
# ----------------------------------------------------------------------------------------------------------


def test_index_lists_every_vector_file_and_nothing_else() -> None:
    listed = load_index()
    on_disk = {p.name for p in VECTORS_DIR.glob("*.json")} - {"index.json"}
    assert set(listed.values()) == on_disk
    assert set(listed) == set(KINDS)
    assert {p.name for p in VECTORS_DIR.iterdir()} == on_disk | {"index.json", "README.md"}
    for kind, name in listed.items():
        doc = json.loads((VECTORS_DIR / name).read_text(encoding="utf-8"))
        assert doc["kind"] == kind
        assert isinstance(doc["description"], str) and doc["description"]


def test_every_section_has_vectors_and_ids_are_unique() -> None:
    counts = Counter((v.kind, v.section) for v in VECTORS)
    assert set(counts) == {(kind, section) for kind, sections in SECTIONS.items() for section in sections}
    assert len({v.id for v in VECTORS}) == len(VECTORS)
    assert len(VECTORS) >= 190


def test_the_readme_documents_every_file_section_and_class() -> None:
    readme = (VECTORS_DIR / "README.md").read_text(encoding="utf-8")
    for name in load_index().values():
        assert f"`{name}`" in readme
    for word in [*(s for sections in SECTIONS.values() for s in sections), *DECODE_ERRORS, *ISSUE_REASONS,
                 *EVENT_NAMES]:
        assert f"`{word}`" in readme, word


def test_metadata_vectors_cover_all_17_types_both_ways() -> None:
    doc = json.loads((VECTORS_DIR / "metadata.json").read_text(encoding="utf-8"))
    assert tuple(doc["types"]) == METADATA_TYPES
    assert len(METADATA_TYPES) == 17
    entries = [v.data for v in by_section("metadata", "entries")]
    valid_types = {e["entry"]["type"] for e in entries if e["valid"]}
    invalid_types = {e["entry"].get("type") for e in entries if not e["valid"] and isinstance(e["entry"], dict)}
    assert valid_types == set(METADATA_TYPES)
    assert set(METADATA_TYPES) - {"__infer__"} <= invalid_types
    assert {e["resolved"]["type"] for e in entries if e["valid"]} == set(METADATA_TYPES) - {"__infer__"}


def test_stream_vectors_cover_every_event_issue_reason_and_decode_error() -> None:
    streams = [v.data for v in by_section("messages", "streams")]
    assert {e["event"] for s in streams for e in s["expected"]["events"]} == set(EVENT_NAMES)
    assert {i["reason"] for s in streams for i in s["expected"]["issues"]} == set(ISSUE_REASONS)
    assert {v.data["error"] for v in by_section("bootstrap", "decode_invalid")} == set(DECODE_ERRORS)
    assert any(not s["final_newline"] for s in streams)
    assert any(isinstance(line, dict) for s in streams for line in s["lines"])


def test_stream_bytes_follow_final_newline() -> None:
    stream = {"lines": ["a", {"base64": "/w=="}, "c"], "final_newline": True}
    assert stream_bytes(stream) == b"a\n\xff\nc\n"
    assert stream_bytes({**stream, "final_newline": False}) == b"a\n\xff\nc"


def test_json_equal_tells_number_kinds_apart() -> None:
    assert json_equal({"a": [1, 2.5, None]}, {"a": [1, 2.5, None]})
    assert not json_equal(1, 1.0)
    assert not json_equal(1, True)
    assert not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal([1], [1, 1])


def _copy_vectors(tmp_path: Path) -> Path:
    target = tmp_path / "vectors"
    shutil.copytree(VECTORS_DIR, target)
    return target


def _rewrite(path: Path, change: Any) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    change(doc)
    path.write_text(json.dumps(doc), encoding="utf-8")


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("index.json", lambda d: d["files"].pop(), "kinds missing"),
        ("index.json", lambda d: d["files"].append({"kind": "metadata", "file": "metadata.json"}), "repeated"),
        ("index.json", lambda d: d.update(format_version=2), "format_version"),
        ("asset_keys.json", lambda d: d["pairs"].append(d["pairs"][0]), "repeats the name"),
        ("bootstrap.json", lambda d: d["decode_invalid"][0].update(error="bad_base64"), '"error" must be one of'),
        ("metadata.json", lambda d: d["entries"][0].pop("resolved"), '"resolved" must be'),
        ("messages.json", lambda d: d["streams"][0]["expected"]["issues"].append({"line": 1, "reason": "odd"}),
         '"issues" must be'),
        ("messages.json", lambda d: d["streams"][0]["expected"]["events"].append(
            {"line": 1, "event": "opened", "extras": {}}), "at most one event"),
        ("messages.json", lambda d: d["streams"][1]["expected"]["events"].reverse(), "line order"),
        ("context_data.json", lambda d: d.update(kind="messages"), '"kind" must be'),
        ("context_data.json", lambda d: d.update(valid=[]), "non-empty list"),
    ],
)
def test_loader_rejects_malformed_vector_files(tmp_path: Path, file: str, change: Any, message: str) -> None:
    directory = _copy_vectors(tmp_path)
    _rewrite(directory / file, change)
    with pytest.raises(VectorFormatError, match=message):
        load_vectors(directory)


def test_loader_reads_a_copy_unchanged(tmp_path: Path) -> None:
    assert load_vectors(_copy_vectors(tmp_path)) == VECTORS
    assert load_file("messages") == by_section("messages", "streams")


# ----------------------------------------------------------------------------------------------------------
# This SDK against every vector
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=ids(VECTORS))
def test_vector(vector: Vector) -> None:
    assert check_vector(vector) == []


def _corrupt(vector: Vector) -> Vector:
    """The same vector with a wrong expectation that a working checker must notice."""
    d = copy.deepcopy(vector.data)
    if vector.kind == "bootstrap":
        if vector.section == "encode":
            d["encoded"] = d["encoded"][:-4] + ("AAA=" if not d["encoded"].endswith("AAA=") else "BBB=")
        elif vector.section == "decode_valid":
            d["value"] = {**d["value"], "extra": 1}
        else:
            d["error"] = DECODE_ERRORS[(DECODE_ERRORS.index(d["error"]) + 1) % len(DECODE_ERRORS)]
    elif vector.kind == "asset_keys":
        d["path"] = [*d["path"], "x"]
    elif vector.kind == "metadata":
        d["valid"] = not d["valid"]
        d["resolved"] = {"type": "text", "value": None}
    elif vector.kind == "context_data":
        if vector.section == "build":
            d["document"]["run_id"] += "-other"
        elif vector.section == "valid":
            d["expected"]["is_asset_step"] = not d["expected"]["is_asset_step"]
        else:
            d["key"] = "no_such_key"
    else:
        expected = d["expected"]
        if expected["issues"]:
            expected["issues"][0]["reason"] = "bad_params" if expected["issues"][0]["reason"] != "bad_params" \
                else "not_json"
        else:
            expected["events"].pop()
    return Vector(vector.kind, vector.section, vector.name, d)


@pytest.mark.parametrize("vector", VECTORS, ids=ids(VECTORS))
def test_checker_notices_a_wrong_expectation(vector: Vector) -> None:
    assert check_vector(_corrupt(vector)) != []


# ----------------------------------------------------------------------------------------------------------
# What the vectors record about the reference (the real dagster / dagster-pipes packages)
# ----------------------------------------------------------------------------------------------------------

BOOTSTRAP = [v for v in VECTORS if v.kind == "bootstrap"]
METADATA = by_section("metadata", "entries")


@pytest.mark.interop
@pytest.mark.parametrize("vector", BOOTSTRAP, ids=ids(BOOTSTRAP))
def test_bootstrap_vector_against_dagster_pipes(vector: Vector) -> None:
    dagster_pipes = pytest.importorskip("dagster_pipes")
    d = vector.data
    if vector.section == "encode":
        assert dagster_pipes.encode_param(d["value"]) == d["encoded"]
        assert dagster_pipes.decode_param(d["encoded"]) == d["value"]
    elif vector.section == "decode_valid":
        assert dagster_pipes.decode_param(d["input"]) == d["value"]
    else:
        try:
            dagster_pipes.decode_param(d["input"])
            accepted = True
        except Exception:
            accepted = False
        assert accepted == d["reference_accepts"]


@pytest.mark.interop
@pytest.mark.parametrize("vector", METADATA, ids=ids(METADATA))
def test_metadata_vector_against_dagster(vector: Vector) -> None:
    pytest.importorskip("dagster")
    from dagster._core.definitions.metadata.external_metadata import metadata_map_from_external

    try:
        metadata_map_from_external({"m": vector.data["entry"]})
        accepted = True
    except Exception:
        accepted = False
    assert accepted == vector.data["reference_accepts"]


@pytest.mark.interop
def test_asset_key_and_selection_order_vectors_against_dagster() -> None:
    dagster = pytest.importorskip("dagster")
    dagster_pipes = pytest.importorskip("dagster_pipes")
    for v in by_section("asset_keys", "pairs"):
        assert dagster.AssetKey(v.data["path"]).to_escaped_user_string() == v.data["escaped"]
    for v in [*by_section("asset_keys", "pairs"), *by_section("asset_keys", "parse_only")]:
        assert dagster.AssetKey.from_escaped_user_string(v.data["escaped"]).path == v.data["path"]
        assert dagster_pipes.to_asset_key_path(v.data["escaped"]) == v.data["path"]
    built = [v for v in by_section("context_data", "build") if v.data["step"]["asset_key_paths"] is not None]
    assert len(built) >= 4
    for v in built:
        keys = sorted({dagster.AssetKey(p) for p in v.data["step"]["asset_key_paths"]})
        assert [k.to_escaped_user_string() for k in keys] == v.data["document"]["asset_keys"]
