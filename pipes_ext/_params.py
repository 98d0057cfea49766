"""Params loaders: where the bootstrap params come from (environment, command line, any mapping).

A loader answers three questions: is this process launched by a Pipes orchestrator (the context param is
present), what are the context params, what are the messages params. Values are base64(zlib(json)) and are
decoded with :func:`pipes_ext._protocol.decode_param`; a missing or undecodable value raises
:class:`PipesProtocolError` naming where it was looked for.
"""

from __future__ import annotations

import os
import sys

from ._errors import PipesProtocolError
from ._errors import PipesProtocolErrorKind as _Kind
from ._protocol import (
    DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    decode_param,
)

# `typing` is not imported at run time: it costs start-up time and every annotation here is a string.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

__all__ = [
    "PipesParamsLoader",
    "PipesMappingParamsLoader",
    "PipesEnvVarParamsLoader",
    "PipesCliArgsParamsLoader",
]


class PipesParamsLoader:
    """Base class: finds the encoded context and messages params."""

    def get_raw(self, name: str) -> str | None:
        """Return the encoded value for ``name`` (an env-var style name), or None when absent."""
        raise NotImplementedError

    def describe(self, name: str) -> str:
        """Where ``name`` is looked for, for error messages."""
        return name

    def is_pipes_process(self) -> bool:
        """True when the context param is present, i.e. a Pipes orchestrator launched this process."""
        return self.get_raw(DAGSTER_PIPES_CONTEXT_ENV_VAR) is not None

    # Name used by the ``dagster-pipes`` package.
    def is_dagster_pipes_process(self) -> bool:
        return self.is_pipes_process()

    def _load(self, name: str) -> dict[str, Any]:
        raw = self.get_raw(name)
        if raw is None:
            raise PipesProtocolError(f"{self.describe(name)} is not set; this process was not bootstrapped by Pipes",
                                     _Kind.MISSING_PARAM)
        try:
            return decode_param(raw)
        except PipesProtocolError as exc:
            raise PipesProtocolError(f"{self.describe(name)}: {exc}", exc.kind) from exc

    def load_context_params(self) -> dict[str, Any]:
        return self._load(DAGSTER_PIPES_CONTEXT_ENV_VAR)

    def load_messages_params(self) -> dict[str, Any]:
        return self._load(DAGSTER_PIPES_MESSAGES_ENV_VAR)

    def close(self) -> None:
        """Release resources (none by default)."""

    def __enter__(self) -> PipesParamsLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PipesMappingParamsLoader(PipesParamsLoader):
    """Reads ``DAGSTER_PIPES_CONTEXT`` / ``DAGSTER_PIPES_MESSAGES`` from a mapping (e.g. a serverless event)."""

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        self._mapping = mapping

    def get_raw(self, name: str) -> str | None:
        value = self._mapping.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise PipesProtocolError(f"{self.describe(name)} must be a string, got {type(value).__name__}",
                                     _Kind.BAD_BOOTSTRAP)
        return value

    def describe(self, name: str) -> str:
        return f'mapping key "{name}"'


class PipesEnvVarParamsLoader(PipesMappingParamsLoader):
    """Reads the bootstrap params from environment variables (the default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(os.environ if environ is None else environ)

    def describe(self, name: str) -> str:
        return f"environment variable {name}"


_CLI_FLAG_BY_NAME = {
    DAGSTER_PIPES_CONTEXT_ENV_VAR: DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    DAGSTER_PIPES_MESSAGES_ENV_VAR: DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT,
}


class PipesCliArgsParamsLoader(PipesParamsLoader):
    """Reads ``--dagster-pipes-context`` / ``--dagster-pipes-messages`` from the command line.

    Both ``--flag value`` and ``--flag=value`` are accepted; other arguments are ignored. ``argv`` defaults to
    ``sys.argv`` as it is when the params are loaded.
    """

    def __init__(self, argv: Sequence[str] | None = None) -> None:
        self._argv = argv

    def get_raw(self, name: str) -> str | None:
        flag = _CLI_FLAG_BY_NAME[name]
        argv = list(sys.argv[1:] if self._argv is None else self._argv)
        prefix = flag + "="
        for index, arg in enumerate(argv):
            if arg == flag:
                if index + 1 >= len(argv):
                    raise PipesProtocolError(f"command-line argument {flag} has no value", _Kind.MISSING_PARAM)
                return argv[index + 1]
            if arg.startswith(prefix):
                return arg[len(prefix) :]
        return None

    def describe(self, name: str) -> str:
        return f"command-line argument {_CLI_FLAG_BY_NAME[name]}"
