"""The first difference between two JSON values, as a short human-readable sentence with a JSON path.

JSON has one number type, so numbers compare by value (``3`` equals ``3.0``, as a JavaScript peer would send
it), but a boolean is never a number. Long strings are not printed whole: the difference names the first
differing character.
"""

from __future__ import annotations

from typing import Any

__all__ = ["first_difference", "short"]

_SHORT = 80


def short(value: Any, limit: int = _SHORT) -> str:
    """``repr``-like text of a JSON value, cut to ``limit`` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return text[: limit - 3] + "..." + size


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _string_difference(path: str, expected: str, actual: str) -> str:
    if len(expected) <= 40 and len(actual) <= 40:
        return f"{path}: expected {expected!r}, got {actual!r}"
    limit = min(len(expected), len(actual))
    index = next((i for i in range(limit) if expected[i] != actual[i]), limit)
    if index == limit and len(expected) != len(actual):
        return (f"{path}: expected a string of {len(expected)} characters, got {len(actual)} "
                f"(same first {limit}); expected {short(expected)}, got {short(actual)}")
    start = max(0, index - 10)
    return (f"{path}: strings differ at character {index}: expected ...{short(expected[start:index + 30])}, "
            f"got ...{short(actual[start:index + 30])}")


def first_difference(expected: Any, actual: Any, path: str = "$") -> str | None:
    """None when ``actual`` equals ``expected`` (JSON semantics), else where and how they first differ."""
    kind_e, kind_a = _kind(expected), _kind(actual)
    if kind_e != kind_a:
        return f"{path}: expected {kind_e} {short(expected)}, got {kind_a} {short(actual)}"
    if kind_e == "object":
        missing = [k for k in expected if k not in actual]
        if missing:
            return f"{path}: missing key {missing[0]!r} (expected {short(expected[missing[0]])})"
        extra = [k for k in actual if k not in expected]
        if extra:
            return f"{path}: unexpected key {extra[0]!r} (value {short(actual[extra[0]])})"
        for key in expected:
            found = first_difference(expected[key], actual[key], f"{path}.{key}" if key.isidentifier() else
                                     f"{path}[{key!r}]")
            if found:
                return found
        return None
    if kind_e == "array":
        for index, (e, a) in enumerate(zip(expected, actual, strict=False)):
            found = first_difference(e, a, f"{path}[{index}]")
            if found:
                return found
        if len(expected) != len(actual):
            if len(actual) > len(expected):
                return (f"{path}: expected {len(expected)} items, got {len(actual)}; first extra: "
                        f"{short(actual[len(expected)])}")
            return (f"{path}: expected {len(expected)} items, got {len(actual)}; first missing: "
                    f"{short(expected[len(actual)])}")
        return None
    if kind_e == "string":
        return None if expected == actual else _string_difference(path, expected, actual)
    if expected != actual:
        return f"{path}: expected {short(expected)}, got {short(actual)}"
    return None
