"""How every benchmark reports: the machine, the header, one block of metrics per benchmark, the JSON file.

A benchmark returns ``{"description", "metrics": [{"name", "unit", "ours", "reference", "limit"}], "notes"}``
with raw samples per side; :func:`print_report` prints median, min and max per side and the ratios, and adds
them to each metric (``<side>_summary``, ``ratio_ours_over_reference``, ``ours_over_limit``) for the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from typing import Any

SIDES = ("ours", "reference", "limit")


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count() or 1}


def benchmark_parser(prog: str, description: str | None, *, repeated: str, default_repeat: int,
                     quick: str = "small sizes, one repetition") -> argparse.ArgumentParser:
    """A parser with the options every side-by-side benchmark takes: ``--quick``, ``--repeat``, ``--json``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--repeat", type=int, help=f"repetitions of {repeated} (default {default_repeat}, quick 1)")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.set_defaults(default_repeat=default_repeat)
    return parser


def repetitions(args: argparse.Namespace) -> int:
    """``--repeat``, else 1 with ``--quick``, else the parser's ``default_repeat``."""
    return int(args.repeat or (1 if args.quick else args.default_repeat))


def print_header(title: str, *, quick: bool, repeat: int) -> dict[str, Any]:
    """Print the run's header and return the report to fill: ``{"machine", "quick", "repeat", "results"}``."""
    machine = machine_info()
    print(f"# {title} ({'quick' if quick else 'full'}, {repeat} repetitions)")
    print(f"# machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}")
    return {"machine": machine, "quick": quick, "repeat": repeat, "results": {}}


def summarise(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def fmt(value: float, unit: str) -> str:
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


def print_report(name: str, result: dict[str, Any], *, name_width: int = 28) -> None:
    """Print one benchmark's block (``## name: description``, a line per metric, its notes) and add the
    summaries and ratios to its metrics."""
    print(f"\n## {name}: {result['description']}")
    for metric in result["metrics"]:
        unit = metric["unit"]
        line = f"  {metric['name']:<{name_width}}"
        for side in SIDES:
            if metric.get(side):
                s = summarise(metric[side])
                metric[f"{side}_summary"] = s
                line += f" {side}: {fmt(s['median'], unit)} [{fmt(s['min'], unit)} .. {fmt(s['max'], unit)}]"
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


def write_json(path: str | None, report: Any) -> None:
    """Write ``report`` to ``path`` (``--json``), when given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
