"""``python -m benchmarks [--quick] [--json FILE] [--only NAME ...] [--repeat N]``: ours vs the reference.

Each benchmark runs ours and the reference (``dagster`` + ``dagster-pipes``) alternately, several repetitions,
on the same machine in the same run, and prints median, min and max and the ratio ours/reference. Absolute
times on shared machines are noisy; the ratios are what to read. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from . import cases
from ._report import benchmark_parser, print_header, print_report, repetitions, write_json


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks", __doc__, repeated="each side", default_repeat=5,
                              quick="tiny sizes and one repetition (keeps it working)")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks")
    args = parser.parse_args(argv)
    repeat = repetitions(args)
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
