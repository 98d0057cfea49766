"""Benchmark 6: 10,000 messages through each local blob-store server, ours vs the reference.

Both sides run against the same local server (moto, gcp-storage-emulator, Azurite), with a counting proxy
(``tests/support/faultproxy.py``, no faults) in front of it, so the HTTP requests of writer and reader together are
counted the same way for both. Chunks are the message objects the run left in its bucket. The reference is
``dagster_pipes``' writer in the child and ``dagster_aws`` / ``dagster_gcp`` / ``dagster_azure``'s reader in a
Dagster op; both writers and both readers use the same 1 s interval.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import textwrap
import time
import uuid
from typing import Any

from conformance._servers import AZURITE_ACCOUNT, AZURITE_KEY, BlobServer, start_store, unavailable_reason
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import PYTHON

INTERVAL = 1.0

CLIENT_CODE = {
    "s3": "import boto3\nclient = boto3.client('s3')\n",
    "gcs": "from google.cloud import storage\nfrom google.auth.credentials import AnonymousCredentials\n"
           "client = storage.Client(project='bench', credentials=AnonymousCredentials())\n",
    "azure": "import os\nfrom azure.storage.blob import BlobServiceClient\n"
             "client = BlobServiceClient.from_connection_string(os.environ['AZURE_STORAGE_CONNECTION_STRING'])\n",
}
OURS_WRITER = {"s3": "pipes_ext.s3.PipesS3MessageWriter", "gcs": "pipes_ext.gcs.PipesGCSMessageWriter",
               "azure": "pipes_ext.azure.PipesAzureBlobStorageMessageWriter"}
REF_WRITER = {"s3": "dagster_pipes.PipesS3MessageWriter", "gcs": "dagster_pipes.PipesGCSMessageWriter",
              "azure": "dagster_pipes.PipesAzureBlobStorageMessageWriter"}

CHILD = """
import importlib, sys
{client}
module, name = sys.argv[2].rsplit(".", 1)
writer = getattr(importlib.import_module(module), name)(client, interval={interval})
if sys.argv[1] == "ours":
    from pipes_ext import open_pipes
else:
    from dagster_pipes import open_dagster_pipes as open_pipes
with open_pipes(message_writer=writer) as pipes:
    for i in range(int(sys.argv[3])):
        pipes.report_custom_message({{"seq": i}})
"""


def _env(store: str, proxy_url: str, server: BlobServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    if store == "s3":
        env.update(server.env)
        env["AWS_ENDPOINT_URL"] = proxy_url
    elif store == "gcs":
        env["STORAGE_EMULATOR_HOST"] = proxy_url
    else:
        env["AZURE_STORAGE_CONNECTION_STRING"] = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={proxy_url}/{AZURITE_ACCOUNT};")
    return env


def _client(store: str, env: dict[str, str]) -> Any:
    if store == "s3":
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    if store == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="bench", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": env["STORAGE_EMULATOR_HOST"]})
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"])


def _new_bucket(store: str, client: Any) -> str:
    name = f"bench-{uuid.uuid4().hex[:16]}"
    if store == "s3":
        client.create_bucket(Bucket=name)
    elif store == "gcs":
        client.create_bucket(name)
    else:
        client.create_container(name)
    return name


def _chunk_count(store: str, client: Any, bucket: str) -> int:
    if store == "s3":
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    elif store == "gcs":
        keys = [b.name for b in client.list_blobs(bucket)]
    else:
        keys = [b.name for b in client.get_container_client(bucket).list_blobs()]
    return sum(1 for key in keys if key.endswith(".json") and not key.endswith("context.json"))


def _ours(store: str, client: Any, bucket: str, child: str, env: dict[str, str], n: int) -> int:
    from pipes_core import PipesEnvContextInjector, PipesRunContext, open_pipes_session

    if store == "s3":
        from pipes_core.s3 import PipesS3MessageReader as reader_cls
    elif store == "gcs":
        from pipes_core.gcs import PipesGCSMessageReader as reader_cls  # type: ignore[assignment]
    else:
        from pipes_core.azure import PipesAzureBlobStorageMessageReader as reader_cls  # type: ignore[assignment]
    count = [0]

    def on_event(event: Any) -> None:
        if isinstance(getattr(event, "payload", None), dict):
            count[0] += 1

    with open_pipes_session(PipesRunContext(), PipesEnvContextInjector(), reader_cls(bucket, client, INTERVAL),
                            on_event=on_event, retain_messages=False) as session:
        subprocess.run([PYTHON, child, "ours", OURS_WRITER[store], str(n)],
                       env={**env, **session.get_bootstrap_env_vars()}, check=True)
    return count[0]


def _reference(store: str, client: Any, bucket: str, child: str, env: dict[str, str], n: int) -> int:
    import logging
    import warnings

    from dagster import PipesEnvContextInjector, build_op_context, op, open_pipes_session

    logging.getLogger("dagster").setLevel(logging.ERROR)
    if store == "s3":
        from dagster_aws.pipes import PipesS3MessageReader

        reader: Any = PipesS3MessageReader(bucket=bucket, client=client, interval=INTERVAL)
    elif store == "gcs":
        from dagster_gcp.pipes import PipesGCSMessageReader

        reader = PipesGCSMessageReader(bucket=bucket, client=client, interval=INTERVAL)
    else:
        from dagster_azure.pipes import PipesAzureBlobStorageMessageReader

        reader = PipesAzureBlobStorageMessageReader(container=bucket, client=client, interval=INTERVAL)
    out: dict[str, int] = {}

    @op
    def run(context):  # type: ignore[no-untyped-def]  # dagster rejects an Any annotation
        with open_pipes_session(context=context, context_injector=PipesEnvContextInjector(),
                                message_reader=reader) as session:
            subprocess.run([PYTHON, child, "reference", REF_WRITER[store], str(n)],
                           env={**env, **session.get_bootstrap_env_vars()}, check=True)
        out["count"] = len(session.get_custom_messages())
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(build_op_context())
    return out["count"]


def blob(*, quick: bool, repeat: int) -> dict[str, Any]:
    n = 500 if quick else 10_000
    metrics: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for store in ("s3", "gcs", "azure"):
            reason = unavailable_reason(store)
            if reason:
                notes.append(f"{store}: skipped ({reason})")
                continue
            child = os.path.join(tmp, f"child_{store}.py")
            with open(child, "w", encoding="utf-8") as f:
                f.write(textwrap.dedent(CHILD.format(client=CLIENT_CODE[store], interval=INTERVAL)))
            server = start_store(store)
            root = server.url.rsplit(f"/{AZURITE_ACCOUNT}", 1)[0]
            try:
                with FaultProxy(root) as proxy:
                    env = _env(store, proxy.url, server)
                    client = _client(store, env)
                    samples: dict[str, dict[str, list[float]]] = {
                        side: {"time": [], "chunks": [], "requests": []} for side in ("ours", "reference")}
                    for _ in range(max(1, repeat // 2)):
                        for side, run in (("ours", _ours), ("reference", _reference)):
                            bucket = _new_bucket(store, client)
                            before = proxy.requests
                            started = time.perf_counter()
                            received = run(store, client, bucket, child, env, n)
                            samples[side]["time"].append(time.perf_counter() - started)
                            samples[side]["requests"].append(proxy.requests - before)
                            samples[side]["chunks"].append(_chunk_count(store, client, bucket))
                            if received != n:
                                notes.append(f"{store} {side}: received {received} of {n} messages")
                    for what, unit in (("time", "s"), ("chunks", "chunks"), ("requests", "requests")):
                        metrics.append({"name": f"{store} {what}", "unit": unit, "ours": samples["ours"][what],
                                        "reference": samples["reference"][what]})
            finally:
                server.stop()
    return {
        "description": f"{n:,} messages through each local blob-store server (writer and reader interval "
                       f"{INTERVAL:g} s on both sides); requests = every HTTP request of writer and reader",
        "metrics": metrics,
        "notes": notes,
    }
