"""Interop on a real Ray head: a pipes_ext script under dagster-ray's own PipesRayJobClient inside
``dagster.materialize()``. (A dagster_pipes script under ours is in test_ray_client.py.)

No ``from __future__ import annotations`` here: Dagster inspects the asset function's annotations at runtime.
"""

import gc
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from dagster_ray import PipesRayJobClient

from tests.support.engines_ray import RayHead

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings(
        "ignore:Function `PipesMessageReader.expected_writer_count` is currently in preview"
        ":dagster_shared.utils.warnings.PreviewWarning"
    ),
    # dagster-ray's log reader leaves its asyncio event loop (and the loop's self-pipe sockets) unclosed; ours
    # closes its own (test_ray_client.py runs under the same "error" filter without this).
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def test_a_pipes_ext_script_runs_under_dagster_rays_client(
    ray_head: RayHead, write_script: Callable[..., Path]
) -> None:
    script = write_script(
        """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.log.info("from pipes_ext")
            pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows")})
            pipes.report_custom_message({"done": True})
        """
    )

    @dg.asset(name="ray_interop")
    def ray_interop(context: dg.AssetExecutionContext, ray_client: PipesRayJobClient) -> dg.MaterializeResult:
        return ray_client.run(  # type: ignore[no-any-return]
            context=context, submit_job_params={"entrypoint": f"{sys.executable} {script}"}, extras={"rows": 11}
        ).get_materialize_result()

    try:
        result = dg.materialize([ray_interop], resources={"ray_client": PipesRayJobClient(address=ray_head.address)})
    finally:
        # Finalise dagster-ray's leaked event loop here, under this test's filter: left to a later collection, its
        # ResourceWarning would fail whichever test happened to be running then.
        gc.collect()
    assert result.success
    [materialization] = result.asset_materializations_for_node("ray_interop")
    assert materialization.metadata["rows"].value == 11
