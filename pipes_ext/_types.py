"""TypedDicts describing the JSON documents of the protocol (for type checkers and readers of the code).

Kept apart from ``_protocol`` so the runtime path of the external side does not import ``typing`` machinery
it does not use. The envelope key ``__dagster_pipes_version`` is not an identifier that survives class syntax
(it would be name-mangled), so :data:`PipesMessage` uses the functional form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

__all__ = [
    "PipesMessage",
    "PipesException",
    "PipesMetadataValue",
    "PipesDataProvenance",
    "PipesPartitionKeyRange",
    "PipesTimeWindow",
    "PipesContextData",
    "PipesOpenedData",
    "PipesContextParams",
    "PipesMessagesParams",
    "PipesParams",
    "PipesExtras",
    "PipesMethod",
    "PipesSeverity",
    "PipesStream",
]

PipesMethod = Literal[
    "opened",
    "closed",
    "log",
    "report_asset_materialization",
    "report_asset_check",
    "report_custom_message",
    "log_external_stream",
]
PipesSeverity = Literal["WARN", "ERROR"]
PipesStream = Literal["stdout", "stderr"]

PipesMessage = TypedDict(
    "PipesMessage",
    {"__dagster_pipes_version": str, "method": str, "params": dict[str, Any] | None},
)


class PipesException(TypedDict):
    message: str
    stack: list[str]
    name: str | None
    cause: PipesException | None
    context: PipesException | None


class PipesMetadataValue(TypedDict):
    raw_value: Any
    type: str


class PipesDataProvenance(TypedDict):
    code_version: str
    input_data_versions: dict[str, str]
    is_user_provided: bool


class PipesPartitionKeyRange(TypedDict):
    start: str
    end: str


class PipesTimeWindow(TypedDict):
    start: str
    end: str


class PipesContextData(TypedDict):
    asset_keys: list[str] | None
    code_version_by_asset_key: dict[str, str | None] | None
    provenance_by_asset_key: dict[str, PipesDataProvenance | None] | None
    partition_key: str | None
    partition_key_range: PipesPartitionKeyRange | None
    partition_time_window: PipesTimeWindow | None
    run_id: str
    job_name: str | None
    retry_number: int
    extras: dict[str, Any]


class PipesOpenedData(TypedDict):
    extras: dict[str, Any]


# Params are free-form objects; these name the common shapes.
PipesContextParams = dict[str, Any]
PipesMessagesParams = dict[str, Any]
# The names the orchestrator API documents: the params an injector or reader yields (either of the two above,
# read-only), and the extras a caller passes to the external process (any JSON object).
PipesParams = Mapping[str, Any]
PipesExtras = Mapping[str, Any]
