"""The public surface: each package's ``__all__`` is exactly its public names, and each public module's
``__all__`` holds every public class and function it defines and nothing it does not define. A name added
without being exported, or exported without existing, fails here."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

PACKAGES = ("pipes_core", "pipes_ext")


def _public_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path) if not m.name.startswith("_")]
    return sorted(names)


def _package_public_names(module: types.ModuleType) -> set[str]:
    """What ``from package import *`` should give: every public attribute (those loaded on first use included,
    as ``dir()`` lists them) that is not a submodule (imported submodules become attributes of their package)
    or ``from __future__ import annotations``'s marker."""
    return {
        name for name in dir(module)
        if not name.startswith("_") and name != "annotations"
        and not isinstance(getattr(module, name), types.ModuleType)
    }


def _defined_public_names(path: Path) -> tuple[set[str], set[str]]:
    """The public names a module defines at top level, not those it imports: (classes and functions,
    assigned names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    definitions: set[str] = set()
    assigned: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            definitions.add(node.name)
        elif isinstance(node, ast.Assign):
            assigned |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            assigned.add(node.target.id)
    return {n for n in definitions if not n.startswith("_")}, {n for n in assigned if not n.startswith("_")}


@pytest.mark.parametrize("package", PACKAGES)
def test_package_all_is_exactly_its_public_names(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), "a name is listed twice in __all__"
    assert set(exported) == _package_public_names(module)


def test_public_modules_are_found() -> None:
    # the blob backends at least; a module added later joins the test below by itself
    assert {"pipes_core.s3", "pipes_core.gcs", "pipes_core.azure", "pipes_ext.s3", "pipes_ext.gcs",
            "pipes_ext.azure"} <= set(_public_modules())


@pytest.mark.parametrize("name", _public_modules())
def test_public_module_all_is_exactly_what_it_defines(name: str) -> None:
    module = importlib.import_module(name)  # the SDKs are imported lazily, so this needs no extra
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), "a name is listed twice in __all__"
    assert module.__file__ is not None
    definitions, assigned = _defined_public_names(Path(module.__file__))
    # Every public class and function is exported; every export is defined here (a module's named defaults
    # may stay unexported: they are documented where they are used).
    assert definitions <= set(exported), f"public but not in __all__: {sorted(definitions - set(exported))}"
    undefined = set(exported) - definitions - assigned
    assert not undefined, f"exported but not defined here: {sorted(undefined)}"
    for exported_name in exported:
        assert hasattr(module, exported_name), exported_name
