"""The capabilities file: which bootstrap modes, channels and features a harness has."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BOOTSTRAP_MODES",
    "CONTEXT_CHANNELS",
    "MESSAGE_CHANNELS",
    "FEATURES",
    "Capabilities",
    "CapabilitiesError",
    "load_capabilities",
    "load_toml",
]

# Every value the suite knows, in report order.
BOOTSTRAP_MODES = ("env", "cli")
CONTEXT_CHANNELS = ("env", "file", "s3", "gcs", "azure")
MESSAGE_CHANNELS = ("file", "stdio", "s3", "gcs", "azure")
FEATURES = ("external_stream", "stdio_capture", "error_reporting", "error_context")

_KNOWN = {
    "bootstrap": BOOTSTRAP_MODES,
    "context_channels": CONTEXT_CHANNELS,
    "message_channels": MESSAGE_CHANNELS,
    "features": FEATURES,
}


class CapabilitiesError(ValueError):
    """A capabilities file that cannot be read or says something the suite does not know."""


@dataclass(frozen=True)
class Capabilities:
    name: str = "harness"
    bootstrap: tuple[str, ...] = ("env",)
    context_channels: tuple[str, ...] = ("env", "file")
    message_channels: tuple[str, ...] = ("file",)
    features: tuple[str, ...] = field(default=())

    def summary_text(self) -> str:
        return (f"bootstrap: {', '.join(self.bootstrap)}; context: {', '.join(self.context_channels)}; "
                f"messages: {', '.join(self.message_channels)}; features: {', '.join(self.features) or '-'}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bootstrap": list(self.bootstrap),
            "context_channels": list(self.context_channels),
            "message_channels": list(self.message_channels),
            "features": list(self.features),
        }

    @classmethod
    def from_mapping(cls, data: Any, where: str = "capabilities") -> Capabilities:
        if not isinstance(data, dict):
            raise CapabilitiesError(f"{where}: expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"name", *_KNOWN})
        if unknown:
            raise CapabilitiesError(f"{where}: unknown key(s) {unknown} (known: name, {', '.join(_KNOWN)})")
        defaults = cls()
        values: dict[str, Any] = {}
        name = data.get("name", defaults.name)
        if not isinstance(name, str) or not name:
            raise CapabilitiesError(f'{where}: "name" must be a non-empty string')
        values["name"] = name
        for key, known in _KNOWN.items():
            if key not in data:
                continue
            given = data[key]
            if not isinstance(given, list) or not all(isinstance(v, str) for v in given):
                raise CapabilitiesError(f'{where}: "{key}" must be a list of strings')
            bad = [v for v in given if v not in known]
            if bad:
                raise CapabilitiesError(f'{where}: "{key}": unknown value(s) {bad} (known: {", ".join(known)})')
            # Kept in the suite's order, without duplicates.
            values[key] = tuple(v for v in known if v in given)
        if "bootstrap" in values and not values["bootstrap"]:
            raise CapabilitiesError(f'{where}: "bootstrap" cannot be empty')
        for key in ("context_channels", "message_channels"):
            if key in values and not values[key]:
                raise CapabilitiesError(f'{where}: "{key}" cannot be empty')
        return cls(**values)


def load_toml(path: Path, text: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CapabilitiesError(f"{path}: not valid TOML: {exc}") from exc
    raise CapabilitiesError(f"{path}: TOML files need Python 3.11+ (tomllib); use JSON")


def load_capabilities(path: str | Path | None) -> Capabilities:
    """Read a capabilities file (JSON; TOML on Python 3.11+ when it ends in ``.toml``); defaults when None."""
    if path is None:
        return Capabilities()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CapabilitiesError(f"cannot read the capabilities file {str(path)!r}: {exc}") from exc
    if path.suffix == ".toml":
        data: Any = load_toml(path, text)
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CapabilitiesError(f"{path}: not valid JSON: {exc}") from exc
    return Capabilities.from_mapping(data, str(path))
