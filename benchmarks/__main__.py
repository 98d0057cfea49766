"""``python -m benchmarks [--quick] [--json FILE] [--only NAME ...] [--repeat N]``: ours vs the reference.

Each benchmark runs ours and the reference (``dagster`` + ``dagster-pipes``) alternately, several repetitions,
on the same machine in the same run, and prints median, min and max and the ratio ours/reference. Absolute
times on shared machines are noisy; the ratios are what to read. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

from . import cases


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.2f} ms" if value < 1 else f"{value:.3f} s"
    if unit == "msg/s":
        return f"{value:,.0f} msg/s"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "%":
        return f"{value:.2f} %"
    if unit in ("chunks", "requests"):
        return f"{value:,.0f}"
    return f"{value:.4g} {unit}"


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


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
    machine = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": cases.cpu_count()}
    print(f"# Pipes benchmarks: ours vs reference ({'quick' if args.quick else 'full'}, {repeat} repetitions)")
    print(f"# machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}")
    report: dict[str, Any] = {"machine": machine, "quick": args.quick, "repeat": repeat, "results": {}}
    for name, fn in selected:
        result = fn(quick=args.quick, repeat=repeat)
        report["results"][name] = result
        print(f"\n## {name}: {result['description']}")
        for metric in result["metrics"]:
            unit = metric["unit"]
            line = f"  {metric['name']:<28}"
            for side in ("ours", "reference", "limit"):
                if metric.get(side):
                    s = _summary(metric[side])
                    metric[f"{side}_summary"] = s
                    line += (f" {side}: {_fmt(s['median'], unit)} "
                             f"[{_fmt(s['min'], unit)} .. {_fmt(s['max'], unit)}]")
            if metric.get("ours") and metric.get("reference"):
                reference = statistics.median(metric["reference"])
                ratio = statistics.median(metric["ours"]) / reference if reference else None
                metric["ratio_ours_over_reference"] = ratio
                line += f"  ratio ours/ref: {ratio:.2f}" if ratio is not None else "  ratio ours/ref: n/a (ref 0)"
            if metric.get("ours") and metric.get("limit"):
                frac = statistics.median(metric["ours"]) / statistics.median(metric["limit"])
                metric["ours_over_limit"] = frac
                line += f"  ours/limit: {frac:.0%}"
            print(line)
        for note in result.get("notes", []):
            print(f"  note: {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
