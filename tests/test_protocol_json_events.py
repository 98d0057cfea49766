"""``event_to_json``: the one encoder of events, in its three forms (the command line's ``--json``, the full
decoded form of the orchestrator test vectors, and the wire form the conformance suite compares)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from pipes_core import PipesEvent, PipesMessageHandler, event_to_json
from pipes_core.protocol.json_events import EVENT_NAMES
from pipes_ext._protocol import METHODS, dumps_message


def _events() -> list[PipesEvent]:
    events: list[PipesEvent] = []
    handler = PipesMessageHandler({"asset_keys": ["a/b\\/c", "x"], "run_id": "r"}, on_event=events.append,
                                  logger=logging.getLogger("test.event_json"),
                                  external_stream_handler=lambda stream, text: None)
    remote = {"message": "ValueError: outer\n", "stack": ["  line 1\n"], "name": "ValueError",
              "cause": {"message": "KeyError: 'inner'\n", "stack": [], "name": "KeyError", "cause": None,
                        "context": None},
              "context": None}
    for line in [
        dumps_message("opened", {"extras": {"e": 1}}),
        dumps_message("log", {"message": "m", "level": "WARNING"}),
        dumps_message("report_asset_materialization", {
            "asset_key": "a/b\\/c", "data_version": "v",
            "metadata": {"n": {"raw_value": 1, "type": "__infer__"}, "f": {"raw_value": 3, "type": "float"}}}),
        dumps_message("report_asset_check", {"asset_key": "x", "check_name": "c", "passed": False, "severity": "WARN",
                                             "metadata": {"t": {"raw_value": "s", "type": "text"}}}),
        dumps_message("report_custom_message", {"payload": [1, {"a": None}]}),
        dumps_message("log_external_stream", {"stream": "stderr", "text": "t\n", "extras": {"q": 2}}),
        "garbage",
        dumps_message("closed", {"exception": remote}),
    ]:
        handler.handle_line(line)
    return events


EVENTS = _events()
METADATA = {"n": {"type": "int", "value": 1}, "f": {"type": "float", "value": 3.0}}
WIRE_METADATA = {"n": {"type": "int", "raw_value": 1}, "f": {"type": "float", "raw_value": 3.0}}

CLI = [
    {"event": "opened", "extras": {"e": 1}},
    {"event": "log", "level": "WARNING", "message": "m"},
    {"event": "materialization", "asset_key": "a/b\\/c", "data_version": "v", "metadata": METADATA},
    {"event": "check", "asset_key": "x", "check_name": "c", "passed": False, "severity": "WARN",
     "metadata": {"t": {"type": "text", "value": "s"}}},
    {"event": "custom_message", "payload": [1, {"a": None}]},
    {"event": "external_stream", "stream": "stderr", "text": "t\n"},
    None,  # the issue: its reason is JSON's own message
    None,  # closed: the formatted text is checked below
]
FULL_CAUSE = {"name": "KeyError", "message": "KeyError: 'inner'\n", "stack": [], "cause": None, "context": None}
FULL = [
    {"event": "opened", "extras": {"e": 1}},
    {"event": "log", "level": "WARNING", "message": "m"},
    {"event": "materialization", "asset_key": "a/b\\/c", "asset_key_path": ["a", "b/c"], "metadata": METADATA,
     "data_version": "v"},
    {"event": "check", "asset_key": "x", "asset_key_path": ["x"], "check_name": "c", "passed": False,
     "severity": "WARN", "metadata": {"t": {"type": "text", "value": "s"}}},
    {"event": "custom_message", "payload": [1, {"a": None}]},
    {"event": "external_stream", "stream": "stderr", "text": "t\n", "extras": {"q": 2}},
    None,
    {"event": "closed", "exception": {"name": "ValueError", "message": "ValueError: outer\n", "stack": ["  line 1\n"],
                                      "cause": FULL_CAUSE, "context": None}},
]
WIRE = [
    {"method": "opened", "extras": {"e": 1}},
    {"method": "log", "level": "WARNING", "message": "m"},
    {"method": "report_asset_materialization", "asset_key": "a/b\\/c", "data_version": "v",
     "metadata": WIRE_METADATA},
    {"method": "report_asset_check", "asset_key": "x", "check_name": "c", "passed": False, "severity": "WARN",
     "metadata": {"t": {"type": "text", "raw_value": "s"}}},
    {"method": "report_custom_message", "payload": [1, {"a": None}]},
    {"method": "log_external_stream", "stream": "stderr", "text": "t\n", "extras": {"q": 2}},
    None,
    {"method": "closed", "exception": {"name": "ValueError", "message": "ValueError: outer\n",
                                       "cause": {"name": "KeyError", "message": "KeyError: 'inner'\n", "cause": None,
                                                 "context": None},
                                       "context": None}},
]


@pytest.mark.parametrize(("form", "expected"), [("cli", CLI), ("full", FULL), ("wire", WIRE)])
def test_each_form_of_each_event(form: Any, expected: list[dict[str, Any] | None]) -> None:
    assert len(EVENTS) == len(expected)
    for event, want in zip(EVENTS, expected, strict=True):
        got = event_to_json(event, form)
        json.dumps(got)  # JSON as it is
        if want is not None:
            assert got == want
            assert list(got) == list(want)  # the key order too: the printed text stays the same


def test_closed_and_issue_in_the_cli_form() -> None:
    closed = event_to_json(EVENTS[-1])
    assert list(closed) == ["event", "exception"]
    exception = closed["exception"]
    assert list(exception) == ["name", "message", "stack", "text"]
    assert exception["text"].startswith("KeyError: 'inner'")  # oldest first, as Python prints a chain
    assert "direct cause" in exception["text"]
    issue = event_to_json(EVENTS[6])
    assert issue["event"] == "protocol_issue" and issue["raw"] == "garbage" and "not JSON" in issue["reason"]
    assert event_to_json(EVENTS[6], "wire") == {"method": "protocol_issue", "reason": str(EVENTS[6])}


def test_every_method_has_an_event_name_and_non_events_are_refused() -> None:
    assert {method for _, method in EVENT_NAMES.values()} - {"protocol_issue"} == set(METHODS)
    with pytest.raises(TypeError, match="not a Pipes event"):
        event_to_json({"method": "opened"})  # type: ignore[arg-type]


def test_the_vectors_name_the_same_events_as_the_encoder() -> None:
    from conformance._vectors import EVENT_NAMES as VECTOR_EVENT_NAMES

    assert list(VECTOR_EVENT_NAMES) == [name for name, _ in EVENT_NAMES.values() if name != "protocol_issue"]
