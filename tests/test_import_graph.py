"""The import graph of ``pipes_core`` has no cycle: the layers (protocol, channels, launch, command line) depend
one way. Every import counts, at module level, inside a function or under ``TYPE_CHECKING`` (an import moved
into a function to dodge a cycle is still a cycle); only a package ``__init__``'s lazy ``__getattr__`` loader does
not (loading on first use is what it is for)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pipes_core

PACKAGE = "pipes_core"
PACKAGE_DIR = Path(pipes_core.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imports(tree: ast.Module, is_package: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, except those inside a package ``__init__``'s module-level ``__getattr__``."""
    skipped = {
        id(node) for top in tree.body
        if is_package and isinstance(top, ast.FunctionDef) and top.name == "__getattr__"
        for node in ast.walk(top)
    }
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
            yield node


def edges(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8")), is_package):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:  # `from package import module` imports the module
            found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found & known


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: edges(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


# Cycles known and not untangled yet (none now). Each would be named here, so that any other cycle fails the test,
# and the test fails too once one of these is gone (remove it then).
KNOWN_CYCLES: list[set[str]] = []


def test_pipes_core_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "pipes_core.docker" in graph  # the walk found the package
    found = [set(cycle) for cycle in cycles(graph)]
    unknown = [sorted(cycle) for cycle in found if cycle not in KNOWN_CYCLES]
    assert unknown == [], "import cycles (each list is one strongly connected set of modules)"
    gone = [sorted(cycle) for cycle in KNOWN_CYCLES if cycle not in found]
    assert gone == [], "these cycles are gone: remove them from KNOWN_CYCLES"


def test_the_cycle_finder_finds_cycles() -> None:
    # the finder itself, on a small graph: a cycle through a function-level import is found like any other
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d"]]


def test_function_level_and_type_checking_imports_count(tmp_path: Path) -> None:
    # the edges of one module's source: a function-level import and a TYPE_CHECKING one are edges, a package
    # __init__'s __getattr__ loader is not
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n    from .c import C\n"
        "def f():\n    from .d import D\n"
        "def __getattr__(name):\n    from . import e\n"
    )
    known = {"p", "p.a", "p.b", "p.c", "p.d", "p.e"}
    (tmp_path / "__init__.py").write_text(source)
    (tmp_path / "a.py").write_text(source)
    assert edges("p", tmp_path / "__init__.py", known) == {"p.b", "p.c", "p.d"}
    assert edges("p.a", tmp_path / "a.py", known) == {"p.b", "p.c", "p.d", "p.e"}
