"""The per-run options, declared once: every client's ``run`` (sync and async) takes them.

:class:`RunOptions` names each option, its type and what it does; a launcher's own options extend it (a
:class:`typing.TypedDict` subclass: ``SubprocessRunOptions``, ``DockerRunOptions``...). ``run`` methods take
them as ``**options: Unpack[...]``, so a type checker checks every keyword, and :func:`run_signature` gives the
method a signature listing each one, so ``help()`` and :func:`inspect.signature` show them too.

Adding a per-run option: one line in :class:`RunOptions` (and in :data:`RUN_OPTION_DEFAULTS` when its default
is not None), plus the code that uses it (:meth:`pipes_core.PipesClient.run_launcher` or the async driver).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, cast

from pipes_core.channels.stdio import PipesOutputTarget

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # Python 3.10: only type checkers read the annotations (``from __future__ import annotations``)
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from pipes_core.launch.process import PipesLaunchedProcess
    from pipes_core.launch.run_store import PipesRunStore
    from pipes_core.observe.observer import RunObserver
    from pipes_core.protocol.results import PipesEvent

__all__ = ["RunOptions", "RUN_OPTION_DEFAULTS", "RUN_OPTION_NAMES", "Unpack", "check_run_options", "run_signature",
           "common_options"]


class RunOptions(TypedDict, total=False):
    """The options of one run that every client takes (sync and async), each optional.

    Keys:
        timeout_seconds: stop the process after this long (None: no limit); raises :class:`PipesTimeoutError`.
        strict: overrides the client's ``strict`` for this run.
        on_event: called with each event as it arrives (on a reader thread, or on the loop in an async run).
        retain_messages: False streams events through ``on_event`` only (flat memory).
        metadata: merged into every result.
        stdout / stderr: where the process's forwarded output goes instead of this process's own streams (a
            ``write(bytes)`` callable or a file object).
        on_launched: called with the launched process right after it started (e.g. to stop it from elsewhere).
        logger: where this run's ``log`` messages and protocol issues go (a :class:`logging.Logger` or
            :class:`logging.LoggerAdapter`; default ``pipes_core.external``), every record carrying
            ``pipes_run_id`` and ``pipes_command``; the client's own warnings about the run go there too.
        external_stream_handler: receives the text the process sends with ``log_external_stream`` as
            ``(stream, text)``, instead of this process's stdout/stderr.
        on_message: called with every raw message (a ``dict``) before it is handled.
        fail_on_check_error: a failed check of severity ERROR fails the run (``pipes run --fail-on-check-error``).
        raise_on_event_error: an exception raised by ``on_event`` fails the run, chained (default); False only
            logs it.
        observer: a :class:`~pipes_core.RunObserver` told the run's phases, messages, events and outcome (e.g. a
            :class:`~pipes_core.TraceFileWriter`, as ``pipes run --trace``); OpenTelemetry spans and metrics need
            no option (see the README, Observability).
        launch_key: makes the run durable (README "Durable runs"): a run with this key in ``store`` is re-attached
            (live), drained (ended unwatched) or returned as recorded (concluded) instead of launched again.
        store: the :class:`~pipes_core.PipesRunStore` (or its file's path) of durable runs; default the one in
            ``$PIPES_STATE_DIR`` (else the user's state directory). Only with ``launch_key``.
    """

    timeout_seconds: float | None
    strict: bool | None
    on_event: Callable[[PipesEvent], None] | None
    retain_messages: bool
    metadata: Mapping[str, Any] | None
    stdout: PipesOutputTarget | None
    stderr: PipesOutputTarget | None
    on_launched: Callable[[PipesLaunchedProcess], None] | None
    logger: logging.Logger | logging.LoggerAdapter[Any] | None
    external_stream_handler: Callable[[str, str], None] | None
    on_message: Callable[[dict[str, Any]], None] | None
    fail_on_check_error: bool
    raise_on_event_error: bool
    observer: RunObserver | None
    launch_key: str | None
    store: PipesRunStore | str | os.PathLike[str] | None


# The defaults that are not None (an absent option means None otherwise).
RUN_OPTION_DEFAULTS: Mapping[str, Any] = {
    "retain_messages": True,
    "fail_on_check_error": False,
    "raise_on_event_error": True,
}
RUN_OPTION_NAMES = frozenset(RunOptions.__annotations__)

_Function = TypeVar("_Function", bound=Callable[..., Any])


def option_names(options_type: type[Any]) -> list[str]:
    """Every key of ``options_type`` (a ``RunOptions`` subclass), its own first, then the shared ones."""
    names = list(options_type.__annotations__)
    return [name for name in names if name not in RUN_OPTION_NAMES] + [n for n in names if n in RUN_OPTION_NAMES]


def check_run_options(options: Mapping[str, Any], options_type: type[Any], where: str,
                      required: tuple[str, ...] = ()) -> None:
    """Raise :class:`TypeError` (as Python does for a keyword argument) for an unknown or missing option."""
    unknown = sorted(set(options) - set(options_type.__annotations__))
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    missing = [name for name in required if name not in options]
    if missing:
        raise TypeError(f"{where}() missing required keyword argument: {missing[0]!r}")


def common_options(options: Mapping[str, Any]) -> RunOptions:
    """The shared options among ``options`` (a launcher's own ones left out)."""
    return cast(RunOptions, {name: value for name, value in options.items() if name in RUN_OPTION_NAMES})


def run_signature(options_type: type[Any], defaults: Mapping[str, Any] | None = None,
                  required: tuple[str, ...] = ()) -> Callable[[_Function], _Function]:
    """Give a ``run(self, *, context=None, extras=None, **options)`` the signature that lists every option of
    ``options_type`` as a keyword-only parameter (``required`` ones without a default; the others with theirs
    from ``defaults``, :data:`RUN_OPTION_DEFAULTS` or None), for ``help()`` and :func:`inspect.signature`."""
    all_defaults = {**RUN_OPTION_DEFAULTS, **(defaults or {})}
    hints = options_type.__annotations__

    def decorate(function: _Function) -> _Function:
        own = inspect.signature(function)
        parameters = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        for name in option_names(options_type):
            annotation = hints[name]
            if isinstance(annotation, str) is False:  # a ForwardRef or a type: show it as written
                annotation = getattr(annotation, "__forward_arg__", annotation)
            parameters.append(inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                default=inspect.Parameter.empty if name in required else all_defaults.get(name)))
        function.__signature__ = own.replace(parameters=parameters)  # type: ignore[attr-defined]
        return function

    return decorate
