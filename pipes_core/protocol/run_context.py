"""What is being run: the orchestrator's description of a step, turned into the context-data document."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipes_ext._errors import PipesUsageError
from pipes_ext._protocol import (
    CONTEXT_ASSET_KEYS,
    CONTEXT_CODE_VERSION_BY_ASSET_KEY,
    CONTEXT_EXTRAS,
    CONTEXT_JOB_NAME,
    CONTEXT_PARTITION_KEY,
    CONTEXT_PARTITION_KEY_RANGE,
    CONTEXT_PARTITION_TIME_WINDOW,
    CONTEXT_PROVENANCE_BY_ASSET_KEY,
    CONTEXT_RETRY_NUMBER,
    CONTEXT_RUN_ID,
    RANGE_END,
    RANGE_START,
    escape_asset_key,
    parse_asset_key,
)

__all__ = ["PipesRunContext", "AssetKeyLike", "normalize_asset_key"]

# An asset key as the user may give it: the escaped string form ("a/b\/c") or the list of components.
AssetKeyLike = str | Sequence[str]


def normalize_asset_key(key: AssetKeyLike) -> str:
    """The escaped string form of an asset key given as a string or a list of components."""
    if isinstance(key, str):
        if not key:
            raise PipesUsageError("an asset key cannot be empty")
        return key
    parts = list(key)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise PipesUsageError(f"an asset key path must be a non-empty list of non-empty strings, got {key!r}")
    return escape_asset_key(parts)


def _window_bound(value: str | datetime) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _range(start: str, end: str) -> dict[str, str]:
    return {RANGE_START: start, RANGE_END: end}


def _new_run_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class PipesRunContext:
    """The step an external process is launched for.

    Args:
        asset_keys: the selected assets (escaped strings or component lists); None for a step with no assets.
        code_version_by_asset_key: code version per selected asset (missing ones are sent as null).
        provenance_by_asset_key: provenance per selected asset, ``{"code_version", "input_data_versions",
            "is_user_provided"}`` or None.
        partition_key: the single partition targeted; also sent as a one-key range, as the reference does.
        partition_key_range: ``(start, end)`` of the partitions targeted.
        partition_time_window: ``(start, end)`` as datetimes or ISO-8601 strings.
        run_id: defaults to a new UUID.
        job_name, retry_number: as the orchestrator knows them.
    """

    asset_keys: Sequence[AssetKeyLike] | None = None
    code_version_by_asset_key: Mapping[str, str | None] | None = None
    provenance_by_asset_key: Mapping[str, Mapping[str, Any] | None] | None = None
    partition_key: str | None = None
    partition_key_range: tuple[str, str] | None = None
    partition_time_window: tuple[str | datetime, str | datetime] | None = None
    run_id: str = field(default_factory=_new_run_id)
    job_name: str | None = None
    retry_number: int = 0

    def selected_asset_keys(self) -> list[str] | None:
        """The escaped asset keys in scope, or None for a step with no assets. Sorted as the reference sorts its
        ``AssetKey``s: by their components, not by the escaped strings (``a/b`` before ``a-b``)."""
        if self.asset_keys is None:
            return None
        if isinstance(self.asset_keys, str):
            raise PipesUsageError("asset_keys must be a list of asset keys, not a single string")
        return sorted({normalize_asset_key(k) for k in self.asset_keys}, key=parse_asset_key)

    def to_context_data(self, extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The context-data document sent to the external process: all ten keys present."""
        keys = self.selected_asset_keys()
        code_versions: dict[str, str | None] | None = None
        provenance: dict[str, Any] | None = None
        if keys is not None:
            given_cv = {normalize_asset_key(k): v for k, v in (self.code_version_by_asset_key or {}).items()}
            given_pv = {normalize_asset_key(k): v for k, v in (self.provenance_by_asset_key or {}).items()}
            unknown = (set(given_cv) | set(given_pv)) - set(keys)
            if unknown:
                raise PipesUsageError(f"code versions or provenance given for assets not selected: {sorted(unknown)}")
            code_versions = {k: given_cv.get(k) for k in keys}
            provenance = {k: (dict(v) if v is not None else None) for k, v in ((k, given_pv.get(k)) for k in keys)}
        elif self.code_version_by_asset_key or self.provenance_by_asset_key:
            raise PipesUsageError("code versions or provenance need asset_keys")
        key_range = self.partition_key_range
        if key_range is None and self.partition_key is not None:
            key_range = (self.partition_key, self.partition_key)
        window = self.partition_time_window
        if not isinstance(self.retry_number, int) or self.retry_number < 0:
            raise PipesUsageError("retry_number must be a non-negative integer")
        return {
            CONTEXT_ASSET_KEYS: keys,
            CONTEXT_CODE_VERSION_BY_ASSET_KEY: code_versions,
            CONTEXT_PROVENANCE_BY_ASSET_KEY: provenance,
            CONTEXT_PARTITION_KEY: self.partition_key,
            CONTEXT_PARTITION_KEY_RANGE: None if key_range is None else _range(key_range[0], key_range[1]),
            CONTEXT_PARTITION_TIME_WINDOW: None
            if window is None
            else _range(_window_bound(window[0]), _window_bound(window[1])),
            CONTEXT_RUN_ID: self.run_id,
            CONTEXT_JOB_NAME: self.job_name,
            CONTEXT_RETRY_NUMBER: self.retry_number,
            CONTEXT_EXTRAS: dict(extras or {}),
        }
