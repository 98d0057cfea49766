"""``python -m benchmarks [--quick] [--json FILE] [--only NAME ...] [--repeat N]``: ours vs the reference.

Each benchmark runs ours and the reference (``dagster`` + ``dagster-pipes``) alternately, several repetitions,
on the same machine in the same run, and prints median, min and max and the ratio ours/reference. Absolute
times on shared machines are noisy; the ratios are what to read. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from . import cases
from ._report import print_header, print_report, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (keeps it working)")
    parser.add_argument("--json", metavar="FILE", help="write all figures as JSON")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks")
    parser.add_argument("--repeat", type=int, help="repetitions per side (default 5, quick 1)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)
    selected: list[tuple[str, Callable[..., dict[str, Any]]]] = [
        (name, fn) for name, fn in cases.ALL if not args.only or name in args.only
    ]
    report = print_header("Pipes benchmarks: ours vs reference", quick=args.quick, repeat=repeat)
    for name, fn in selected:
        result = fn(quick=args.quick, repeat=repeat)
        report["results"][name] = result
        print_report(name, result)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
