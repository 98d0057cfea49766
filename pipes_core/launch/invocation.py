"""The record of a completed run: :class:`PipesClientCompletedInvocation`, what every launcher's ``run`` returns
(results, logs, the exit status, the last output). Its own module, below the drivers that make it and the run
observers that are told it (:mod:`pipes_core.observe.observer`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipes_core.launch.lifecycle import PipesExitStatus
from pipes_core.launch.session import PipesSession
from pipes_core.protocol.results import AssetCheckResult, MaterializeResult, PipesExecutionResult, PipesLogEvent
from pipes_ext._errors import PipesUsageError
from pipes_ext._protocol import STREAM_STDERR

__all__ = ["PipesClientCompletedInvocation", "OUTPUT_TAIL_BYTES"]

# Output that is not forwarded is read continuously (so the process never blocks on a full pipe) and only
# this many trailing bytes per stream are kept, for the error message.
OUTPUT_TAIL_BYTES = 64 * 1024


class PipesClientCompletedInvocation:
    """What a run produced: the session's results plus how the process ended.

    Attributes:
        session: the :class:`PipesSession` (results, messages, issues, opened/closed); after pickling, a detached
            snapshot answering the same read methods.
        exit_code: the exit code (an ``int``; negative -N: killed by signal N), or None (never started, left
            running, unknown).
        exit_status: the full :class:`PipesExitStatus`, or None when the process never started.
        duration_seconds: from the session's opening to the verdict, in seconds (a ``float``).
        output_tail: the last output the lifecycle read (a ``str``, UTF-8 decoded with replacement; at most
            :data:`OUTPUT_TAIL_BYTES` per stream, stdout then stderr), when it read any; "" otherwise.
        metadata: the run's ``metadata=``, merged into every result by :meth:`get_results` (a ``dict``).
        description: the process's description, the subject of messages about it (a ``str``: "the external
            process 'etl.py'", "the container 3f2a... (image x)").
        last_output_line: the last non-blank line the process wrote to stderr (trailing whitespace removed), when
            the lifecycle read its stderr (``forward_stdio=False``, a ``stderr=`` that is not a real file, or a
            launcher streaming its logs), or the last line of its one log when the launcher has one log for both
            streams (a Ray job); "" otherwise. Failure messages quote it when the process reported no exception.
        last_output_line_source: where ``last_output_line`` was taken from: ``"stderr"``, or ``"log"`` (one log
            carrying both streams).
    """

    def __init__(
        self,
        session: PipesSession,
        *,
        exit_code: int | None,
        duration_seconds: float,
        output_tail: str = "",
        metadata: Mapping[str, Any] | None = None,
        exit_status: PipesExitStatus | None = None,
        description: str = "the external process",
        last_output_line: str = "",
        last_output_line_source: str = STREAM_STDERR,
    ) -> None:
        self.session = session
        self.exit_code = exit_code
        self.exit_status = exit_status
        self.duration_seconds = duration_seconds
        self.output_tail = output_tail
        self.metadata = dict(metadata or {})
        self.description = description
        self.last_output_line = last_output_line
        self.last_output_line_source = last_output_line_source

    @property
    def missing_closed(self) -> bool:
        """The process opened the channel but never sent ``closed``: buffered messages may be missing."""
        return self.session.opened and not self.session.closed

    def get_results(self, implicit_materializations: bool = True) -> list[PipesExecutionResult]:
        """Every result of the run (implicit materializations included unless turned off), with the run's
        ``metadata``; complete and repeatable, whatever was streamed from the session before."""
        return self.session.get_all_results(
            implicit_materializations=implicit_materializations, metadata=self.metadata
        )

    def get_materialize_result(
        self, implicit_materializations: bool = True, *, implicit_materialization: bool | None = None
    ) -> MaterializeResult:
        """The single materialization of the run.

        ``implicit_materialization=`` is Dagster's spelling of the same switch, accepted so code written for
        Dagster's invocation runs unchanged.

        Raises:
            PipesUsageError: when the run has zero or several materializations, or the two spellings disagree.
        """
        if implicit_materialization is not None:
            if not implicit_materializations and implicit_materialization:
                raise PipesUsageError("implicit_materializations=False and implicit_materialization=True disagree")
            implicit_materializations = implicit_materialization
        results = self.get_results(implicit_materializations=implicit_materializations)
        materializations = [r for r in results if isinstance(r, MaterializeResult)]
        if len(materializations) != 1:
            raise PipesUsageError(f"expected exactly one materialization, got {len(materializations)}")
        return materializations[0]

    def get_asset_check_results(self) -> list[AssetCheckResult]:
        return [r for r in self.get_results(implicit_materializations=False) if isinstance(r, AssetCheckResult)]

    def get_asset_check_result(self) -> AssetCheckResult:
        """The single check result of the run (and no materialization).

        Raises:
            PipesUsageError: when the run has zero or several checks, or materializations too.
        """
        results = self.get_results(implicit_materializations=False)
        checks = [r for r in results if isinstance(r, AssetCheckResult)]
        if len(checks) != 1 or len(results) != 1:
            raise PipesUsageError(
                f"expected exactly one check result and nothing else, got {len(checks)} checks among "
                f"{len(results)} results"
            )
        return checks[0]

    def get_custom_messages(self) -> list[Any]:
        return self.session.get_custom_messages()

    def get_logs(self) -> list[PipesLogEvent]:
        """The process's ``log`` messages, in arrival order (as ``pipes run`` prints them)."""
        return self.session.get_logs()


# ---------------------------------------------------------------------------------------------- output
