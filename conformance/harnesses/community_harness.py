"""A harness of the community ``dagster-pipes-tests`` shape, for ``pipes_ext`` or ``dagster-pipes``.

It takes that suite's flags (``--test-name``, ``--job-name``, ``--extras``, ``--custom-payload``,
``--report-asset-materialization``, ``--report-asset-check``, ``--context-loader s3``, ``--message-writer s3``) and
uses only names both libraries have, so the same file runs on either (``--library``)::

    python -m conformance community --pipes-toml conformance/harnesses/community_pipes.toml -- \
        python conformance/harnesses/community_harness.py --library pipes_ext
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

STATIC_METADATA = Path(__file__).resolve().parent.parent / "community" / "static" / "metadata.json"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", choices=("pipes_ext", "dagster_pipes"), default="pipes_ext")
    parser.add_argument("--test-name", required=True)
    parser.add_argument("--job-name")
    parser.add_argument("--extras")
    parser.add_argument("--custom-payload")
    parser.add_argument("--report-asset-materialization")
    parser.add_argument("--report-asset-check")
    parser.add_argument("--context-loader", choices=("default", "s3"), default="default")
    parser.add_argument("--message-writer", choices=("default", "s3"), default="default")
    return parser.parse_args(argv)


def _read(path: str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def main(argv: list[str]) -> None:
    args = _parse(argv)
    pipes: Any = importlib.import_module(args.library)
    kwargs: dict[str, Any] = {}
    if "s3" in (args.context_loader, args.message_writer):
        import boto3

        client = boto3.client("s3")  # endpoint, region and keys from the standard AWS variables
        if args.context_loader == "s3":
            kwargs["context_loader"] = pipes.PipesS3ContextLoader(client=client)
        if args.message_writer == "s3":
            kwargs["message_writer"] = pipes.PipesS3MessageWriter(client=client, interval=0.1)
    with pipes.open_dagster_pipes(**kwargs) as context:
        if args.extras is not None:
            expected = _read(args.extras)
            if context.extras != expected:
                raise AssertionError(f"extras: expected {expected!r}, got {context.extras!r}")
        if args.job_name is not None and context.job_name != args.job_name:
            raise AssertionError(f"job name: expected {args.job_name!r}, got {context.job_name!r}")
        test = args.test_name
        if test == "test_components":
            context.report_custom_message("Hello from external process!")
        elif test == "test_error_reporting":
            raise RuntimeError("Very bad error has happened!")
        elif test == "test_message_log":
            context.log.debug("Debug message")
            context.log.info("Info message")
            context.log.warning("Warning message")
            context.log.error("Error message")
            context.log.critical("Critical message")
        elif test == "test_message_report_custom_message":
            context.report_custom_message(_read(args.custom_payload)["payload"])
        elif test == "test_message_report_asset_materialization":
            spec = _read(args.report_asset_materialization)
            context.report_asset_materialization(metadata=_read(str(STATIC_METADATA)),
                                                 data_version=spec.get("dataVersion"),
                                                 asset_key=spec.get("assetKey"))
        elif test == "test_message_report_asset_check":
            spec = _read(args.report_asset_check)
            context.report_asset_check(check_name=spec["checkName"], passed=spec["passed"],
                                       severity=spec["severity"], metadata=_read(str(STATIC_METADATA)),
                                       asset_key=spec.get("assetKey"))


if __name__ == "__main__":
    main(sys.argv[1:])
