"""Context injectors: how the context data reaches the external process.

An injector's :meth:`PipesContextInjector.inject_context` is a context manager: on entry it makes the
context available and yields the context params the external side needs to find it; on exit it cleans up.
An injector holds no per-session state, so one instance can serve many sessions in turn.

A local file holding the context (it carries the extras, which may hold secrets) lives no longer than the
external process needs it: :meth:`PipesContextInjector.discard_context` removes it once the process has opened the
channel (it has read its context by then), and :meth:`PipesContextInjector.session_paths` names it to the orphan
guard of a local process, which removes it if the orchestrator dies first (see :mod:`pipes_core.launch.subprocess`).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pipes_core.channels.files import CreatedFile, SessionPath, create_private_file, remove_temp_dir
from pipes_ext._errors import PipesTransportError, PipesUsageError
from pipes_ext._protocol import PARAM_DATA, PARAM_PATH

__all__ = [
    "PipesContextInjector",
    "PipesEnvContextInjector",
    "PipesFileContextInjector",
    "PipesTempFileContextInjector",
    "CONTEXT_FILE_NAME",
]

# The file name the reference uses inside its temp dir.
CONTEXT_FILE_NAME = "context"


class PipesContextInjector:
    """Base class for context injectors."""

    @contextmanager
    def inject_context(self, context_data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError
        yield {}  # pragma: no cover

    def describe(self) -> str:
        """A short name for messages, e.g. ``tempfile context``."""
        return type(self).__name__

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        """The local paths that hold the context of the session whose context params are ``params``, for the
        orphan guard to remove if the orchestrator dies (none by default)."""
        return []

    def discard_context(self, params: Mapping[str, Any]) -> None:
        """The process has opened the channel, so it has read its context: remove the local copy (nothing by
        default). Called on the reader's thread (or the loop); must not raise."""

    def no_messages_debug_text(self) -> str:
        """What to check when the external process never opened the channel."""
        return f"The context was injected with {self.describe()}."

    def close(self) -> None:
        """Release resources (none by default)."""

    def __enter__(self) -> PipesContextInjector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PipesEnvContextInjector(PipesContextInjector):
    """Inlines the context data in the context param (``{"data": ...}``), i.e. in the env var itself.

    The env var is capped by the OS (128 KiB per string on Linux, after base64(zlib)); use a file injector for
    large extras.
    """

    @contextmanager
    def inject_context(self, context_data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield {PARAM_DATA: context_data}

    def describe(self) -> str:
        return "the env context injector (context inlined in DAGSTER_PIPES_CONTEXT)"


def _write_private_json(path: str, data: dict[str, Any]) -> CreatedFile:
    """Create ``path`` (see :mod:`pipes_core.channels.files`) and write ``data`` into it as JSON."""
    created = create_private_file(path, "the context file")
    try:
        try:
            text = json.dumps(data)
        except (ValueError, TypeError, RecursionError) as exc:
            raise PipesUsageError(f"the context data cannot be written as JSON: {exc}") from exc
        try:
            with os.fdopen(created.fd, "w", encoding="utf-8", closefd=False) as f:
                f.write(text)
        except OSError as exc:
            raise PipesTransportError(f"cannot write the context file {path!r}: {exc}") from exc
        created.close_fd()
    except BaseException:
        created.remove()
        raise
    return created


class PipesFileContextInjector(PipesContextInjector):
    """Writes the context data as JSON to ``path`` and deletes it after the session.

    The file is created by the session (``O_EXCL | O_NOFOLLOW``, mode 0600): an existing path of any kind, a
    symbolic link included, or a missing directory raises :class:`PipesUsageError` before the process is
    launched, and the path is left untouched. Only the file the session created is deleted.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # The file of the session in progress, for discard_context (one session at a time: the path is fixed,
        # and a second session's creation of it is refused).
        self._created: CreatedFile | None = None
        self._lock = threading.Lock()

    @contextmanager
    def inject_context(self, context_data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        created = _write_private_json(self.path, context_data)
        with self._lock:
            self._created = created
        try:
            yield {PARAM_PATH: self.path}
        finally:
            with self._lock:
                self._created = None
            created.remove()

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        return [SessionPath(self.path)]

    def discard_context(self, params: Mapping[str, Any]) -> None:
        with self._lock:
            created = self._created
        if created is not None:
            created.remove()  # only if the path still names the file created here

    def describe(self) -> str:
        return f"the file context injector ({self.path})"


class PipesTempFileContextInjector(PipesContextInjector):
    """Writes the context data into a fresh private temp dir (0700; file 0600), removed after the session."""

    def __init__(self, dir: str | None = None) -> None:
        self.dir = dir

    @contextmanager
    def inject_context(self, context_data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        tmp = tempfile.mkdtemp(prefix="pipes-context-", dir=self.dir)
        try:
            path = os.path.join(tmp, CONTEXT_FILE_NAME)
            _write_private_json(path, context_data)
            yield {PARAM_PATH: path}
        finally:
            remove_temp_dir(tmp, CONTEXT_FILE_NAME)

    def session_paths(self, params: Mapping[str, Any]) -> list[SessionPath]:
        return [SessionPath(os.path.dirname(params[PARAM_PATH]), tree=True)]

    def discard_context(self, params: Mapping[str, Any]) -> None:
        try:  # inside the session's private dir (0700): nobody else can have put anything at this path
            os.remove(params[PARAM_PATH])
        except OSError:
            pass

    def describe(self) -> str:
        return "the tempfile context injector"
