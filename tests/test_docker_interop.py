"""Interop in containers, both ways, on the private Docker daemon: a ``dagster_pipes`` script under our
``PipesDockerClient``, and a ``pipes_ext`` script under Dagster's own ``PipesDockerClient`` (package
``dagster-docker``) inside ``dagster.materialize()``.

No ``from __future__ import annotations`` here: Dagster inspects the asset function's annotations at runtime.
"""

import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest
from dagster_docker import PipesDockerClient as DagsterPipesDockerClient

from pipes_core import PipesRunContext
from pipes_core.docker import PipesDockerClient
from tests.support.engines_docker import DockerEngine

pytestmark = [
    pytest.mark.docker,
    pytest.mark.interop,
    pytest.mark.filterwarnings(
        "ignore:Function `PipesMessageReader.expected_writer_count` is currently in preview"
        ":dagster_shared.utils.warnings.PreviewWarning"
    ),
]

DAGSTER_PIPES_CHILD = """
    import sys
    from dagster_pipes import open_dagster_pipes
    with open_dagster_pipes() as pipes:
        print("plain output", flush=True)
        pipes.log.info("hello from dagster_pipes in a container")
        pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows")}, data_version="v1")
        pipes.report_asset_check("positive", passed=True)
        pipes.report_custom_message({"partition": pipes.partition_key})
"""

PIPES_EXT_CHILD = """
    from pipes_ext import open_pipes
    with open_pipes() as pipes:
        pipes.log.warning("hello from pipes_ext in a container")
        pipes.report_asset_materialization(metadata={"rows": pipes.get_extra("rows"), "where": "docker"},
                                           data_version="v7")
        pipes.report_asset_check("positive", passed=pipes.get_extra("rows") > 0)
        pipes.report_custom_message({"asset": pipes.asset_key})
"""


def test_a_dagster_pipes_script_in_a_container_under_our_client(docker_engine: DockerEngine) -> None:
    output = bytearray()
    invocation = PipesDockerClient(client=docker_engine.client).run(
        context=PipesRunContext(asset_keys=["a"], partition_key="p1"),
        image=docker_engine.images.test,
        command=["python3", "-c", textwrap.dedent(DAGSTER_PIPES_CHILD)],
        extras={"rows": 5},
        network="none",
        stdout=output.extend,
    )
    session = invocation.session
    assert session.opened and session.closed and not session.protocol_issues
    assert [log.message for log in session.get_logs()] == ["hello from dagster_pipes in a container"]
    assert invocation.get_custom_messages() == [{"partition": "p1"}]
    materialization = invocation.get_materialize_result()
    assert materialization.metadata["rows"].value == 5  # type: ignore[union-attr]
    assert materialization.data_version == "v1"
    assert invocation.get_asset_check_results()[0].passed
    assert bytes(output) == b"plain output\n"


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


def test_a_pipes_ext_script_in_a_container_under_dagsters_client(
    docker_engine: DockerEngine, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)  # Dagster's client uses docker.from_env()
    label = f"pipes-interop-{uuid.uuid4().hex[:12]}"
    stash: dict[str, Any] = {}

    @dg.asset(check_specs=[dg.AssetCheckSpec("positive", asset="in_docker")])
    def in_docker(context: dg.AssetExecutionContext, docker_pipes: DagsterPipesDockerClient):
        invocation = docker_pipes.run(
            context=context,
            image=docker_engine.images.test,
            command=["python3", "-c", textwrap.dedent(PIPES_EXT_CHILD)],
            extras={"rows": 4},
            container_kwargs={"network_mode": "none", "labels": {"test": label}},
        )
        stash["custom"] = invocation.get_custom_messages()
        yield from invocation.get_results()

    try:
        result = dg.materialize([in_docker], resources={"docker_pipes": DagsterPipesDockerClient()},
                                instance=instance)
    finally:
        # Dagster's client stops its container but does not remove it.
        for container in docker_engine.client.containers.list(all=True, filters={"label": f"test={label}"}):
            container.remove(force=True)
    assert result.success
    (materialization,) = result.asset_materializations_for_node("in_docker")
    assert materialization.metadata["rows"] == dg.MetadataValue.int(4)
    assert materialization.metadata["where"] == dg.MetadataValue.text("docker")
    assert materialization.tags is not None and materialization.tags["dagster/data_version"] == "v7"
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "positive" and evaluation.passed
    assert list(stash["custom"]) == [{"asset": "in_docker"}]
    messages = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.dagster_event is None]
    assert "hello from pipes_ext in a container" in messages
