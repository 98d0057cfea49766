"""Context loaders: turn the context params into the context-data document.

Params ``{"path": str}`` name a JSON file; ``{"data": object}`` inline the document (``path`` wins when both
are given, as in the reference). Blob-store loaders live in their own modules.
"""

from __future__ import annotations

import json

from ._errors import PipesProtocolError, PipesTransportError
from ._protocol import PARAM_DATA, PARAM_PATH, validate_context_data

# `typing` is not imported at run time: it costs start-up time and every annotation here is a string.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = ["PipesContextLoader", "PipesDefaultContextLoader", "PipesDirectContextLoader"]


class PipesContextLoader:
    """Base class: ``load_context(params)`` returns the validated context data."""

    def load_context(self, params: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (none by default)."""

    def __enter__(self) -> PipesContextLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PipesDefaultContextLoader(PipesContextLoader):
    """Loads the context from a local JSON file (``path``) or from inline ``data``."""

    def load_context(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if PARAM_PATH in params:
            path = params[PARAM_PATH]
            if not isinstance(path, str):
                raise PipesProtocolError(f'context params "{PARAM_PATH}" must be a string')
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise PipesTransportError(f"cannot read the context file {path!r}: {exc}") from exc
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise PipesProtocolError(f"context file {path!r} is not JSON: {exc}") from exc
            return validate_context_data(data)
        if PARAM_DATA in params:
            return validate_context_data(params[PARAM_DATA])
        raise PipesProtocolError(
            f'context params have neither "{PARAM_PATH}" nor "{PARAM_DATA}" (got keys: {sorted(params)})'
        )


class PipesDirectContextLoader(PipesContextLoader):
    """Ignores the params and returns the given context data: a test double for scripts and tests."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def load_context(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return validate_context_data(dict(self._data))
