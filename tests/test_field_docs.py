"""``help()`` documents every field: each public dataclass of pipes_core (results, events, statuses, hook types,
the launchers' records) and the invocation has an ``Attributes:`` section naming each of its fields, and nothing
else (so a new field without a line of documentation fails here)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

import pipes_core
from pipes_core import PipesClientCompletedInvocation, PipesExecutionError, PipesSubprocessClient

PUBLIC_MODULES = ["pipes_core", "pipes_core.docker", "pipes_core.ray", "pipes_core.slurm"]
# Inputs document their fields as constructor arguments ("Args:"), not attributes.
SECTION_BY_CLASS = {"PipesRunContext": "Args"}
_ENTRY = re.compile(r"^(\w+(?:\s*[,/]\s*\w+)*)\s*:")


def documented_names(doc: str | None, section: str = "Attributes") -> list[str]:
    """The names a Google-style docstring section documents (``name: ...`` at the section's indentation; ``a, b:``
    and ``a / b:`` document both)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = lines.index(f"{section}:")
    except ValueError:
        return []
    names: list[str] = []
    indent: int | None = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if width == 0:
            break  # the next section or paragraph
        if indent is None:
            indent = width
        if width == indent:
            match = _ENTRY.match(line.strip())
            assert match, f"not an entry of {section}: {line!r}"
            names += [name.strip() for name in re.split("[,/]", match.group(1))]
    return names


def public_dataclasses() -> list[type]:
    found: dict[str, type] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if inspect.isclass(value) and dataclasses.is_dataclass(value):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return sorted(found.values(), key=lambda cls: cls.__name__)


def test_the_results_and_events_are_among_them() -> None:
    names = {cls.__name__ for cls in public_dataclasses()}
    assert {"MaterializeResult", "AssetCheckResult", "MetadataValue", "PipesOpenedEvent", "PipesClosedEvent",
            "PipesLogEvent", "PipesCustomMessageEvent", "PipesExternalStreamEvent", "PipesProtocolIssue",
            "PipesRemoteException", "PipesExitStatus", "PipesLaunchRequest", "SlurmJobInfo"} <= names
    event_types = set(getattr(pipes_core.PipesEvent, "__args__", ()))
    assert event_types and {cls.__name__ for cls in event_types} <= names


@pytest.mark.parametrize("cls", public_dataclasses(), ids=lambda cls: cls.__name__)
def test_every_field_is_documented(cls: type) -> None:
    section = SECTION_BY_CLASS.get(cls.__name__, "Attributes")
    fields = [field.name for field in dataclasses.fields(cls)]
    documented = documented_names(cls.__doc__, section)
    assert documented, f"{cls.__name__} has no {section}: section"
    assert sorted(documented) == sorted(fields), f"{cls.__name__}: documented {documented}, fields {fields}"
    # help() shows it.
    assert all(f"{name}:" in pydoc_text(cls) for name in fields)


def pydoc_text(obj: object) -> str:
    import pydoc

    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


def test_the_invocation_documents_what_it_holds(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text("from pipes_ext import open_pipes\nwith open_pipes():\n    pass\n")
    invocation = PipesSubprocessClient(forward_stdio=False).run(command=[sys.executable, str(script)])
    held = sorted(name for name in vars(invocation) if not name.startswith("_"))
    assert sorted(documented_names(PipesClientCompletedInvocation.__doc__)) == held
    init = [name for name in inspect.signature(PipesClientCompletedInvocation).parameters]
    assert set(init) <= set(held)


def test_the_execution_error_documents_what_it_holds() -> None:
    error = PipesExecutionError("failed")
    held = sorted(name for name in vars(error) if not name.startswith("_"))
    assert sorted(documented_names(PipesExecutionError.__doc__)) == held


def test_the_section_parser_reads_continuations_and_stops_at_the_next_section() -> None:
    doc = """Summary.

    Attributes:
        a: first, which goes on
            over a second line.
        b, c: two at once.
        d / e: two more.

    Raises:
        ValueError: not an attribute.
    """
    assert documented_names(doc) == ["a", "b", "c", "d", "e"]
    assert documented_names("No sections.") == []
