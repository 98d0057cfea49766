"""Conformance harness for the ``dagster-pipes`` package (see conformance/README.md, "The harness contract").

    python -m conformance run --capabilities conformance/harnesses/dagster_pipes.json -- \
        python conformance/harnesses/dagster_pipes_harness.py

dagster-pipes has no accessor for the whole context data, so ``echo_context`` rebuilds it from the public
properties (a property that raises because its value is undefined stands for null).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import dagster_pipes
from dagster_pipes import (
    DagsterPipesError,
    PipesCliArgsParamsLoader,
    PipesContext,
    PipesContextLoader,
    PipesEnvVarParamsLoader,
    PipesMessageWriter,
    PipesParamsLoader,
    open_dagster_pipes,
)

# Upload blob-store chunks as often as the package allows: the suite's runs are short.
BLOB_INTERVAL = 0.1
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
          "CRITICAL": logging.CRITICAL}
CONTEXT_KEYS = ("asset_keys", "code_version_by_asset_key", "provenance_by_asset_key", "partition_key",
                "partition_key_range", "partition_time_window", "run_id", "job_name", "retry_number", "extras")


class Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def params_loader() -> PipesParamsLoader:
    if any(arg.startswith("--dagster-pipes-context") for arg in sys.argv[1:]):
        return PipesCliArgsParamsLoader()  # type: ignore[no-untyped-call]
    return PipesEnvVarParamsLoader()  # type: ignore[no-untyped-call]


def blob_classes(store: str | None) -> tuple[Any, Any, Any]:
    """The context loader and message writer classes of the store named by PIPES_CONFORMANCE_BLOB_STORE, and a
    client built from the store's standard environment."""
    if store == "s3":
        import boto3

        return dagster_pipes.PipesS3ContextLoader, dagster_pipes.PipesS3MessageWriter, boto3.client("s3")
    if store == "gcs":
        from google.cloud import storage

        client = storage.Client()  # anonymous, on STORAGE_EMULATOR_HOST
        return dagster_pipes.PipesGCSContextLoader, dagster_pipes.PipesGCSMessageWriter, client
    if store == "azure":
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"])
        return (dagster_pipes.PipesAzureBlobStorageContextLoader, dagster_pipes.PipesAzureBlobStorageMessageWriter,
                client)
    raise SystemExit(f"blob-store params, but PIPES_CONFORMANCE_BLOB_STORE is {store!r}")


def blob_channels(loader: PipesParamsLoader) -> tuple[PipesContextLoader | None, PipesMessageWriter[Any] | None]:
    """A blob-store context loader / message writer when the params name a bucket; None for the defaults."""
    on_blob_context = "bucket" in loader.load_context_params()
    on_blob_messages = "bucket" in loader.load_messages_params()
    if not (on_blob_context or on_blob_messages):
        return None, None
    context_loader, message_writer, client = blob_classes(os.environ.get("PIPES_CONFORMANCE_BLOB_STORE"))
    return (context_loader(client) if on_blob_context else None,
            message_writer(client, interval=BLOB_INTERVAL) if on_blob_messages else None)


def context_data(pipes: PipesContext) -> dict[str, Any]:
    def get(name: str) -> Any:
        try:
            return getattr(pipes, name)
        except DagsterPipesError:
            return None

    return {key: get(key) for key in CONTEXT_KEYS}


def do_raise(step: dict[str, Any]) -> None:
    if step.get("context") is not None:
        try:
            raise RuntimeError(step["context"])
        except RuntimeError:
            raise RuntimeError(step["message"])  # noqa: B904 - the implicit context is the point
    if step.get("cause") is not None:
        raise RuntimeError(step["message"]) from RuntimeError(step["cause"])
    raise RuntimeError(step["message"])


def run_step(pipes: PipesContext, step: dict[str, Any]) -> None:
    op = step["op"]
    if op == "echo_context":
        pipes.report_custom_message({"context": context_data(pipes)})
    elif op == "log":
        pipes.log.log(LEVELS[step["level"]], step["message"])
    elif op == "materialize":
        pipes.report_asset_materialization(step["metadata"], step["data_version"], step["asset_key"])
    elif op == "check":
        pipes.report_asset_check(step["check_name"], step["passed"], step["severity"], step["metadata"],
                                 step["asset_key"])
    elif op == "custom":
        pipes.report_custom_message(step["payload"])
    elif op == "custom_many":
        for i in range(step["count"]):
            pipes.report_custom_message({"seq": i})
    elif op == "custom_big":
        pipes.report_custom_message({"size": step["size"], "data": step["char"] * step["size"]})
    elif op == "stream":
        pipes.log_external_stream(step["stream"], step["text"])
    elif op == "print":
        stream = sys.stdout if step["stream"] == "stdout" else sys.stderr
        stream.write(step["text"])
        stream.flush()
    elif op == "raise":
        do_raise(step)
    elif op == "exit":
        raise Exit(step["code"])
    elif op == "crash":
        os._exit(17)
    else:
        raise ValueError(f"unknown step op {op!r}")


def main() -> int:
    loader = params_loader()
    context_loader, message_writer = blob_channels(loader)
    with open_dagster_pipes(context_loader=context_loader, message_writer=message_writer,
                            params_loader=loader) as pipes:
        try:
            for step in pipes.get_extra("conformance")["steps"]:
                run_step(pipes, step)
        except Exit as request:
            pipes.close()
            return request.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
