"""Conformance harness for ``pipes_ext`` (see conformance/README.md, "The harness contract").

    python -m conformance run --capabilities conformance/harnesses/pipes_ext.json -- \
        python conformance/harnesses/pipes_ext_harness.py
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from pipes_ext import (
    PipesCliArgsParamsLoader,
    PipesContext,
    PipesEnvVarParamsLoader,
    PipesMessageWriter,
    PipesParamsLoader,
    open_pipes,
)
from pipes_ext._context_loaders import PipesContextLoader

# Upload blob-store chunks often: the suite's runs are short.
BLOB_INTERVAL = 0.1
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
          "CRITICAL": logging.CRITICAL}


class Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def params_loader() -> PipesParamsLoader:
    if any(arg.startswith("--dagster-pipes-context") for arg in sys.argv[1:]):
        return PipesCliArgsParamsLoader()
    return PipesEnvVarParamsLoader()


def blob_classes(store: str | None) -> tuple[Any, Any]:
    """The context loader and message writer classes of the store named by PIPES_CONFORMANCE_BLOB_STORE."""
    if store == "s3":
        from pipes_ext import s3

        return s3.PipesS3ContextLoader, s3.PipesS3MessageWriter
    if store == "gcs":
        from pipes_ext import gcs

        return gcs.PipesGCSContextLoader, gcs.PipesGCSMessageWriter
    if store == "azure":
        from pipes_ext import azure

        return azure.PipesAzureBlobStorageContextLoader, azure.PipesAzureBlobStorageMessageWriter
    raise SystemExit(f"blob-store params, but PIPES_CONFORMANCE_BLOB_STORE is {store!r}")


def blob_channels(loader: PipesParamsLoader) -> tuple[PipesContextLoader | None, PipesMessageWriter | None]:
    """A blob-store context loader / message writer when the params name a bucket; None for the defaults."""
    on_blob_context = "bucket" in loader.load_context_params()
    on_blob_messages = "bucket" in loader.load_messages_params()
    if not (on_blob_context or on_blob_messages):
        return None, None
    context_loader, message_writer = blob_classes(os.environ.get("PIPES_CONFORMANCE_BLOB_STORE"))
    return (context_loader() if on_blob_context else None,
            message_writer(interval=BLOB_INTERVAL) if on_blob_messages else None)


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
        pipes.report_custom_message({"context": pipes.context_data})
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
    with open_pipes(context_loader=context_loader, message_writer=message_writer, params_loader=loader) as pipes:
        instructions = pipes.get_extra("conformance")
        try:
            for step in instructions["steps"]:
                run_step(pipes, step)
        except Exit as request:
            pipes.close()
            return request.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
