"""``python -m conformance``: run the Pipes conformance suite against a harness, or list its cases.

    python -m conformance run [--capabilities FILE] [--case PATTERN] [--json] [--junit FILE] -- COMMAND [ARG]...
    python -m conformance list [--json]
    python -m conformance community [--pipes-toml FILE] [--test PATTERN] [--json] [--junit FILE] -- COMMAND [ARG]...
    python -m conformance schema [--out DIR]

Exit codes: 0 when nothing failed, 1 when a run failed, 2 for a usage error (bad capabilities file, no case
matching ``--case``, no command).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._capabilities import CapabilitiesError, load_capabilities
from ._cases import CASES, Case
from ._community import DEVIATIONS, TESTS, community_skip_note, load_pipes_toml, plan_community, run_community
from ._report import CaseInfo, HarnessInfo, json_report, json_text, junit_report, summary, text_report
from ._runner import DEFAULT_TIMEOUT, Result, plan, run_plan
from ._schema import DEFAULT_OUT, write_schemas

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conformance",
                                     description="The Pipes protocol 0.1 conformance suite (orchestrator: pipes_core).")
    sub = parser.add_subparsers(dest="command_name", required=True)
    run = sub.add_parser("run", help="run the cases against a harness: run [OPTIONS] -- COMMAND [ARG]...",
                         usage="python -m conformance run [OPTIONS] -- COMMAND [ARG]...",
                         description="Run every case against the harness COMMAND [ARG]... (after --), over every "
                                     "channel combination its capabilities declare.")
    run.add_argument("--capabilities", metavar="FILE",
                     help="the harness's capabilities (JSON, or TOML on Python 3.11+); default: env bootstrap, env "
                          "and file context, file messages, no features")
    run.add_argument("--case", metavar="PATTERN", action="append", default=[],
                     help="run only the cases whose name matches (a glob; without wildcards, a substring); repeatable")
    run.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    run.add_argument("--junit", metavar="FILE", help="also write the report as JUnit XML to FILE")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                     help=f"kill a harness run after this long (default {DEFAULT_TIMEOUT:g})")
    run.add_argument("--jobs", type=int, default=_default_jobs(), metavar="N",
                     help="harness runs at a time (default %(default)s)")
    run.add_argument("--progress", action="store_true", help="print one line per finished run to stderr")
    run.add_argument("harness", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    community = sub.add_parser(
        "community", help="run a harness written for the community dagster-pipes-tests suite, unchanged, with "
                          "pipes_core as the orchestrator: community [OPTIONS] -- COMMAND [ARG]...",
        usage="python -m conformance community [OPTIONS] -- COMMAND [ARG]...",
        description="Run a harness written for the community dagster-pipes-tests suite; COMMAND [ARG]... (after --) "
                    "is that suite's BASE_ARGS.")
    community.add_argument("--pipes-toml", metavar="FILE",
                           help="the harness's pipes.toml (default: $PIPES_CONFIG_PATH, else ./pipes.toml, else that "
                                "suite's defaults)")
    community.add_argument("--test", metavar="PATTERN", action="append", default=[],
                           help="run only the tests whose name matches (a glob; without wildcards, a substring)")
    community.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    community.add_argument("--junit", metavar="FILE", help="also write the report as JUnit XML to FILE")
    community.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                           help=f"kill a harness run after this long (default {DEFAULT_TIMEOUT:g})")
    community.add_argument("--jobs", type=int, default=_default_jobs(), metavar="N",
                           help="harness runs at a time (default %(default)s)")
    community.add_argument("--progress", action="store_true", help="print one line per finished run to stderr")
    community.add_argument("harness", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    listing = sub.add_parser("list", help="the cases, one line each")
    listing.add_argument("--json", action="store_true", help="as JSON")
    schema = sub.add_parser("schema", help="write the protocol's JSON Schemas (draft 2020-12) to a directory")
    schema.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help="where to write them (default %(default)s)")
    return parser


# Overrides the default of --jobs (the project's own tests set it: their harnesses mostly wait on each other).
JOBS_ENV_VAR = "PIPES_CONFORMANCE_JOBS"


def _default_jobs() -> int:
    # One run per CPU: a harness's start-up (an interpreter, a runtime) is CPU work, and on a shared machine more
    # runs than CPUs make every run slower and the timeouts tighter. --jobs raises it for harnesses that mostly wait.
    given = os.environ.get(JOBS_ENV_VAR, "")
    return int(given) if given.isdigit() and int(given) > 0 else os.cpu_count() or 1


def _matches(name: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        glob = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
        if fnmatch.fnmatchcase(name, glob):
            return True
    return False


def select_cases(patterns: Sequence[str]) -> list[Case]:
    if not patterns:
        return list(CASES)
    return [case for case in CASES if _matches(case.name, patterns)]


def _list(as_json: bool) -> int:
    if as_json:
        print(json.dumps([{"name": c.name, "scope": c.scope, "requires": list(c.requires),
                           "description": c.description} for c in CASES], indent=2))
        return EXIT_OK
    width = max(len(c.name) for c in CASES)
    for case in CASES:
        print(f"{case.name:<{width}}  {case.scope:<8}  {case.description}")
    return EXIT_OK


def _schema(out: Path) -> int:
    try:
        written = write_schemas(out)
    except OSError as exc:
        return _usage(f"cannot write the schemas to {str(out)!r}: {exc.strerror or exc}; pass another --out DIR")
    for path in written:
        print(path)
    return EXIT_OK


def _usage(message: str) -> int:
    print(f"python -m conformance: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args_list:
        cut = args_list.index("--")
        args_list, command = args_list[:cut], args_list[cut + 1:]
    args = _parser().parse_args(args_list)
    if args.command_name == "list":
        return _list(args.json)
    if args.command_name == "schema":
        return _schema(Path(args.out))
    command = command or list(args.harness)
    if not command:
        return _usage(f"no harness command; usage: python -m conformance {args.command_name} [OPTIONS] -- "
                      "COMMAND [ARG]...")
    if os.sep not in command[0] and shutil.which(command[0]) is None:
        return _usage(f"harness command not found: {command[0]!r}")
    if os.sep in command[0] and not Path(command[0]).exists():
        return _usage(f"harness command not found: {command[0]!r}")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        return _usage("--timeout must be a positive number of seconds")
    caps: HarnessInfo
    notes: list[str] = []
    try:
        if args.command_name == "community":
            caps = toml = load_pipes_toml(args.pipes_toml)
            cases: Sequence[CaseInfo] = [t for t in TESTS if not args.test or _matches(t.name, args.test)]
            if not cases:
                return _usage(f"no test matches {', '.join(args.test)}")
            runs = [r for r in plan_community(toml) if r.test in cases]
            notes = [f"pipes.toml key(s) ignored: {', '.join(toml.ignored)}"] if toml.ignored else []
            notes += [f"judged differently from the community suite: {d}" for d in DEVIATIONS]
            skipped_there = community_skip_note(runs)
            notes += [skipped_there] if skipped_there else []
        else:
            caps = capabilities = load_capabilities(args.capabilities)
            cases = select_cases(args.case)
            if not cases:
                return _usage(f"no case matches {', '.join(args.case)} (see: python -m conformance list)")
    except CapabilitiesError as exc:
        return _usage(str(exc))

    def progress(result: Result) -> None:
        variant = f"[{result.variant}]" if result.variant else ""
        print(f"{result.status:<4} {result.case} {result.combo.label}{variant} {result.reason}"[:300],
              file=sys.stderr, flush=True)

    # Reasons quote what arrived (any Unicode): never fail on a narrow stdout encoding.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    started = time.monotonic()
    on_result = progress if args.progress else None
    try:
        if args.command_name == "community":
            _quiet_orchestrator_logs()
            results = run_community(runs, command, timeout=args.timeout, jobs=args.jobs, progress=on_result)
        else:
            results = run_plan(plan(cases, capabilities), command, timeout=args.timeout,  # type: ignore[arg-type]
                               jobs=args.jobs, progress=on_result)
    except KeyboardInterrupt:
        print("python -m conformance: interrupted", file=sys.stderr)
        return 130
    duration = time.monotonic() - started
    if args.json:
        sys.stdout.write(json_text(json_report(cases, results, caps, command, duration, notes)))
    else:
        sys.stdout.write(text_report(cases, results, caps, command, duration, notes))
    if args.junit:
        try:
            Path(args.junit).write_bytes(junit_report(cases, results, caps, duration))
        except OSError as exc:
            print(f"python -m conformance: cannot write {args.junit}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_FAILED if summary(results)["failed"] else EXIT_OK


def _quiet_orchestrator_logs() -> None:
    """The harness's log messages are results to judge, not console output: without this, Python's last-resort
    handler would print their WARNING and above to our stderr. Added once, to this program's own loggers."""
    logger = logging.getLogger("pipes_core")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


if __name__ == "__main__":
    sys.exit(main())
