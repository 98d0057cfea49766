"""Context loaders: turn the context params into the context-data document.

Params ``{"path": str}`` name a JSON file (a regular file of at most the bootstrap cap,
:data:`~pipes_ext._protocol.MAX_DECODED_PARAM_BYTES`; a FIFO, device or directory is refused at once);
``{"data": object}`` inline the document (``path`` wins when both are given, as in the reference).
Blob-store loaders live in their own modules.
"""

from __future__ import annotations

import os
import stat

from ._errors import PipesProtocolError, PipesTransportError
from ._errors import PipesProtocolErrorKind as _Kind
from ._protocol import MAX_DECODED_PARAM_BYTES, PARAM_DATA, PARAM_PATH, loads_json_document, validate_context_data

# `typing` is not imported at run time: it costs start-up time and every annotation here is a string.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = ["PipesContextLoader", "PipesDefaultContextLoader", "PipesDirectContextLoader", "read_context_file"]


def read_context_file(path: str, max_bytes: int = MAX_DECODED_PARAM_BYTES) -> str:
    """The text of a local context file, at most ``max_bytes`` (the bootstrap cap, the same as for an inline
    context).

    The file is opened non-blocking (a FIFO does not hang the open) and anything that is not a regular file
    (FIFO, device such as ``/dev/zero``, directory, socket) is refused before a byte is read.

    Raises:
        PipesTransportError: the file cannot be opened or read, or is not a regular file.
        PipesProtocolError: the file is larger than ``max_bytes`` or is not UTF-8.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PipesTransportError(f"cannot read the context file {path!r}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PipesTransportError(
                f"the context file {path!r} is not a regular file (it is {_kind(st.st_mode)}); refusing to read it"
            )
        if st.st_size > max_bytes:
            raise PipesProtocolError(
                f"the context file {path!r} is {st.st_size} bytes, over the {max_bytes}-byte bootstrap limit",
                _Kind.TOO_LARGE
            )
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while True:  # read to the end, but never past the cap (a file may grow, or lie about its size)
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise PipesProtocolError(
                    f"the context file {path!r} is over the {max_bytes}-byte bootstrap limit", _Kind.TOO_LARGE
                )
    except OSError as exc:
        raise PipesTransportError(f"cannot read the context file {path!r}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipesProtocolError(f"the context file {path!r} is not UTF-8: {exc}", _Kind.NOT_JSON) from exc


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


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
                raise PipesProtocolError(f'context params "{PARAM_PATH}" must be a string', _Kind.BAD_CONTEXT)
            text = read_context_file(path)
            return validate_context_data(loads_json_document(text, f"context file {path!r}"))
        if PARAM_DATA in params:
            return validate_context_data(params[PARAM_DATA])
        raise PipesProtocolError(
            f'context params have neither "{PARAM_PATH}" nor "{PARAM_DATA}" (got keys: {sorted(params)})',
            _Kind.BAD_CONTEXT
        )


class PipesDirectContextLoader(PipesContextLoader):
    """Ignores the params and returns the given context data: a test double for scripts and tests."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def load_context(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return validate_context_data(dict(self._data))
