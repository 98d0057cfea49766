"""Drop-in compatibility: the names scripts written for ``dagster-pipes`` import exist in ``pipes_ext``, with the
same meaning (constants equal, typed shapes with the same keys, codecs that round-trip both ways), without
slowing the default start-up; and such a script runs unchanged under ``pipes_core`` through a one-line shim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path

import dagster_pipes
import pytest

import pipes_ext
from pipes_core import MaterializeResult, PipesRunContext, PipesSubprocessClient, PipesUsageError

TYPED_SHAPES = [
    "PipesContextData",
    "PipesDataProvenance",
    "PipesPartitionKeyRange",
    "PipesTimeWindow",
    "PipesException",
    "PipesMessage",
    "PipesMetadataValue",
    "PipesOpenedData",
]
BLOB_NAMES = [
    "PipesBlobStoreMessageWriter",
    "PipesS3MessageWriter",
    "PipesS3ContextLoader",
    "PipesGCSMessageWriter",
    "PipesGCSContextLoader",
    "PipesAzureBlobStorageMessageWriter",
    "PipesAzureBlobStorageContextLoader",
]
CONSTANTS = ["PIPES_METADATA_TYPE_INFER", "ESCAPE_CHARACTER", "PIPES_PROTOCOL_VERSION",
             "PIPES_PROTOCOL_VERSION_FIELD", "DAGSTER_PIPES_CONTEXT_ENV_VAR", "DAGSTER_PIPES_MESSAGES_ENV_VAR"]
FUNCTIONS = ["encode_env_var", "decode_env_var", "encode_param", "decode_param", "to_asset_key_path",
             "open_dagster_pipes"]


def _keys(shape: type) -> set[str]:
    """A TypedDict's keys, with the class-syntax name mangling of ``__dagster_pipes_version`` undone."""
    keys = set(shape.__annotations__)
    return {"__dagster_pipes_version" if k.endswith("__dagster_pipes_version") else k for k in keys}


@pytest.mark.parametrize("name", TYPED_SHAPES + BLOB_NAMES + CONSTANTS + FUNCTIONS)
def test_every_name_imports_from_both_packages(name: str) -> None:
    ours = getattr(pipes_ext, name)
    theirs = getattr(dagster_pipes, name)
    assert ours is not None and theirs is not None
    assert name in pipes_ext.__all__
    assert name in dir(pipes_ext)
    assert callable(ours) == callable(theirs)


@pytest.mark.parametrize("name", CONSTANTS)
def test_constants_have_the_same_values(name: str) -> None:
    assert getattr(pipes_ext, name) == getattr(dagster_pipes, name)


@pytest.mark.parametrize("name", TYPED_SHAPES)
def test_typed_shapes_have_the_same_keys(name: str) -> None:
    ours = getattr(pipes_ext, name)
    theirs = getattr(dagster_pipes, name)
    assert typing.is_typeddict(ours)
    assert _keys(ours) == _keys(theirs)


@pytest.mark.parametrize("name", BLOB_NAMES)
def test_blob_names_are_classes_of_the_same_role(name: str) -> None:
    ours = getattr(pipes_ext, name)
    assert isinstance(ours, type)
    base = pipes_ext.PipesMessageWriter if "MessageWriter" in name else pipes_ext.PipesContextLoader
    assert issubclass(ours, base)


VALUES = [{}, {"a": 1}, {"nested": {"list": [1, 2.5, None, True, "é✓"]}}, {"k": "x" * 10_000}]


@pytest.mark.parametrize("value", VALUES)
def test_codecs_round_trip_both_ways(value: dict[str, object]) -> None:
    assert dagster_pipes.decode_env_var(pipes_ext.encode_env_var(value)) == value
    assert pipes_ext.decode_env_var(dagster_pipes.encode_env_var(value)) == value
    assert pipes_ext.decode_param(dagster_pipes.encode_param(value)) == value


@pytest.mark.parametrize("key", ["a", "a/b", "a\\/b/c", "a\\\\/b", "/lead", "trail/", "é/✓", "x\\"])
def test_asset_key_paths_agree(key: str) -> None:
    assert pipes_ext.to_asset_key_path(key) == dagster_pipes.to_asset_key_path(key)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        pipes_ext.NoSuchName  # noqa: B018


def test_lazy_names_stay_off_the_start_up_path() -> None:
    probe = ("import sys, pipes_ext; "
             "print(sorted(m for m in ('typing', 'threading', 'pipes_ext._types', 'pipes_ext._blob', 'pipes_ext.s3') "
             "if m in sys.modules)); "
             "pipes_ext.PipesContextData; pipes_ext.PipesS3MessageWriter; "
             "print(sorted(m for m in ('pipes_ext._types', 'pipes_ext.s3', 'boto3') if m in sys.modules))")
    # Without the suite's coverage measurement (.ci/test), which would import threading and typing itself.
    env = {k: v for k, v in os.environ.items() if k not in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")}
    out = subprocess.run([sys.executable, "-X", "frozen_modules=off", "-c", probe], capture_output=True, text=True,
                         check=True, env=env).stdout.splitlines()
    assert json.loads(out[0].replace("'", '"')) == []
    # Touching the names loads their modules, and still no cloud SDK (it is imported when a client is built).
    assert json.loads(out[1].replace("'", '"')) == ["pipes_ext._types", "pipes_ext.s3"]


def test_context_set_and_is_initialized_without_a_hidden_singleton() -> None:
    from pipes_ext import PipesContext, PipesInMemoryMessageWriter, PipesUsageError
    from pipes_ext._protocol import empty_context_data

    initially = PipesContext.is_initialized()  # another test may have left a context open: compare with this
    first_writer, second_writer = PipesInMemoryMessageWriter(), PipesInMemoryMessageWriter()
    first = PipesContext(empty_context_data("r1"), first_writer.open({}))
    second = PipesContext(empty_context_data("r2"), second_writer.open({}))
    try:
        PipesContext.set(first)  # opens it (sends opened) and makes it current
        assert PipesContext.is_initialized() and PipesContext.get() is first
        second.open()
        assert PipesContext.get() is second
        PipesContext.set(first)
        assert PipesContext.get() is first
        first.close()
        assert PipesContext.get() is second  # a closed context is never returned
        with pytest.raises(PipesUsageError, match="closed"):
            PipesContext.set(first)
    finally:
        first.close()
        second.close()
    assert PipesContext.is_initialized() == initially
    assert [m["method"] for m in first_writer.messages] == ["opened", "closed"]


# A script as dagster-pipes' own users write it, importing the names above; the shim line makes it use pipes_ext.
DAGSTER_STYLE_SCRIPT = '''
import sys
import pipes_ext
sys.modules["dagster_pipes"] = pipes_ext  # the one-line shim

from dagster_pipes import (
    PIPES_METADATA_TYPE_INFER,
    PipesContext,
    PipesContextData,
    PipesMetadataValue,
    PipesS3MessageWriter,
    decode_env_var,
    encode_env_var,
    open_dagster_pipes,
    to_asset_key_path,
)

with open_dagster_pipes() as context:
    assert PipesContext.is_initialized() and PipesContext.get() is context
    window: PipesContextData | None = None  # the typed shapes are usable in annotations
    assert context.asset_keys == ["a/b"]
    value: PipesMetadataValue = {"raw_value": 3, "type": PIPES_METADATA_TYPE_INFER}
    context.report_asset_materialization(metadata={"rows": value}, data_version="v1")
    context.report_custom_message({
        "path": to_asset_key_path(context.asset_key),
        "round_trip": decode_env_var(encode_env_var({"x": [1]})),
        "writer": PipesS3MessageWriter.__name__,
    })
'''


def test_a_dagster_pipes_script_runs_unchanged_through_the_shim(write_script: Callable[..., Path]) -> None:
    script = write_script(DAGSTER_STYLE_SCRIPT)
    invocation = PipesSubprocessClient().run(context=PipesRunContext(asset_keys=["a/b"]),
                                             command=[sys.executable, str(script)])
    [result] = invocation.get_results()
    assert isinstance(result, MaterializeResult)
    assert result.asset_key == "a/b" and result.data_version == "v1"
    assert result.metadata["rows"].value == 3
    assert invocation.get_custom_messages() == [
        {"path": ["a", "b"], "round_trip": {"x": [1]}, "writer": "PipesS3MessageWriter"}]


def test_invocation_speaks_dagsters_keywords(write_script: Callable[..., Path]) -> None:
    script = write_script("""
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_asset_check("fresh", True, asset_key="a")
    """)
    invocation = PipesSubprocessClient().run(context=PipesRunContext(asset_keys=["a"]),
                                             command=[sys.executable, str(script)], metadata={"source": "test"})
    # Dagster's keyword and ours: with it on, the unreported asset gets an implicit materialization...
    implicit = invocation.get_materialize_result(implicit_materialization=True)
    assert implicit.asset_key == "a" and implicit.metadata["source"].value == "test"
    assert invocation.get_materialize_result(implicit_materializations=True) == implicit
    # ...and with it off there is none to return.
    with pytest.raises(PipesUsageError, match="got 0"):
        invocation.get_materialize_result(implicit_materialization=False)
    with pytest.raises(PipesUsageError, match="disagree"):
        invocation.get_materialize_result(False, implicit_materialization=True)
    assert invocation.metadata == {"source": "test"}  # as Dagster's invocation exposes it
