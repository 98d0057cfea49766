"""The report: a text table per case (one row per channel combination), JSON, and JUnit XML."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any, Protocol

from pipes_ext._protocol import PIPES_PROTOCOL_VERSION

from ._runner import Result

__all__ = ["environment_notes", "summary", "summary_line", "text_report", "json_report", "junit_report"]

_STATUS = {"pass": "pass", "fail": "FAIL", "skip": "skip"}
# Characters XML 1.0 cannot carry (a harness's stderr may hold any byte).
_NOT_XML = re.compile(r"[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class CaseInfo(Protocol):
    """What a report needs of a case: a suite case, or a test of the community contract."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def scope(self) -> str: ...
    @property
    def requires(self) -> tuple[str, ...]: ...


class HarnessInfo(Protocol):
    """What a report needs of the harness's declared capabilities (a capabilities file, or a pipes.toml)."""

    @property
    def name(self) -> str: ...
    def summary_text(self) -> str: ...
    def to_json(self) -> dict[str, Any]: ...


def _xml_safe(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else
                        f"\\u{ord(m.group()):04x}", text)


def environment_notes(environ: dict[str, str] | None = None) -> list[str]:
    """What in the environment the harness inherits can change the results."""
    env = os.environ if environ is None else environ
    notes = []
    if env.get("PYTHONUNBUFFERED"):
        notes.append("PYTHONUNBUFFERED is set and harnesses inherit it: a Python harness's stdout is then unbuffered, "
                     "which hides a missing flush on the stdio channel")
    return notes


def summary(results: Sequence[Result]) -> dict[str, int]:
    return {
        "passed": sum(r.status == "pass" for r in results),
        "failed": sum(r.status == "fail" for r in results),
        "skipped": sum(r.status == "skip" for r in results),
    }


def summary_line(results: Sequence[Result]) -> str:
    counts = summary(results)
    return f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"


def _failure_details(result: Result) -> str:
    """Why a failed run failed, beyond the first difference: the harness's exit code and its last stderr lines."""
    exit_text = "no exit code (it did not run)" if result.returncode is None else f"exit code {result.returncode}"
    tail = result.stderr_tail.strip()
    return f"{exit_text}; stderr: {tail}" if tail else f"{exit_text}; stderr: (empty)"


def text_report(cases: Sequence[CaseInfo], results: Sequence[Result], caps: HarnessInfo, command: Sequence[str],
                duration: float, notes: Sequence[str] = ()) -> str:
    lines = [
        f"Pipes conformance (protocol {PIPES_PROTOCOL_VERSION}): {caps.name}: {' '.join(command)}",
        f"  {caps.summary_text()}",
        *(f"  note: {note}" for note in [*notes, *environment_notes()]),
        "",
    ]
    by_case: dict[str, list[Result]] = {}
    for result in results:
        by_case.setdefault(result.case, []).append(result)
    for case in cases:
        rows = by_case.get(case.name, [])
        counts = summary(rows)
        width = max(len(r.variant) for r in rows) if any(r.variant for r in rows) else 0
        width = max(width, len("variant")) if width else 0
        variant_head = f"{'variant':<{width + 2}}" if width else ""
        lines.append(f"{case.name} [{case.scope}]: {case.description}  "
                     f"({counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped)")
        lines.append(f"  {'bootstrap':<10}{'context':<9}{'messages':<9}{variant_head}{'result':<7}{'time':>7}  detail")
        for r in rows:
            time_text = f"{r.duration:.2f}s" if r.status != "skip" else ""
            variant = f"{r.variant:<{width + 2}}" if width else ""
            lines.append(f"  {r.combo.bootstrap:<10}{r.combo.context:<9}{r.combo.messages:<9}{variant}"
                         f"{_STATUS[r.status]:<7}{time_text:>7}  {r.reason}".rstrip())
            if r.status == "fail":
                lines.append(f"{'':<12}{_failure_details(r)}")
        lines.append("")
    lines.append(f"{len(cases)} case(s), {sum(r.status != 'skip' for r in results)} run(s) in {duration:.1f} s")
    lines.append(summary_line(results))
    return "\n".join(lines) + "\n"


def json_report(cases: Sequence[CaseInfo], results: Sequence[Result], caps: HarnessInfo, command: Sequence[str],
                duration: float, notes: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "suite": "pipes-conformance",
        "protocol": PIPES_PROTOCOL_VERSION,
        "harness": {"name": caps.name, "command": list(command), "capabilities": caps.to_json()},
        "cases": [{"name": c.name, "description": c.description, "scope": c.scope,
                   "requires": list(c.requires)} for c in cases],
        "results": [
            {
                "case": r.case,
                "bootstrap": r.combo.bootstrap,
                "context": r.combo.context,
                "messages": r.combo.messages,
                **({"variant": r.variant} if r.variant else {}),
                "status": r.status,
                "reason": r.reason,
                "duration": round(r.duration, 3),
                "exit_code": r.returncode,
                "stderr_tail": r.stderr_tail,
            }
            for r in results
        ],
        "summary": summary(results),
        "duration": round(duration, 3),
        "notes": [*notes, *environment_notes()],
    }


def json_text(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"  # ASCII: safe on any stdout encoding


def junit_report(cases: Sequence[CaseInfo], results: Sequence[Result], caps: HarnessInfo, duration: float) -> bytes:
    counts = summary(results)
    attrs = {"tests": str(len(results)), "failures": str(counts["failed"]), "errors": "0",
             "skipped": str(counts["skipped"]), "time": f"{duration:.3f}"}
    root = ET.Element("testsuites", {"name": "pipes-conformance", **attrs})
    suite = ET.SubElement(root, "testsuite", {"name": caps.name, **attrs})
    descriptions = {c.name: c.description for c in cases}
    for r in results:
        name = f"{r.combo.label}[{r.variant}]" if r.variant else r.combo.label
        case = ET.SubElement(suite, "testcase", {"classname": f"conformance.{r.case}", "name": name,
                                                 "time": f"{r.duration:.3f}"})
        if r.status == "fail":
            failure = ET.SubElement(case, "failure", {"message": _xml_safe(r.reason), "type": "ConformanceFailure"})
            failure.text = _xml_safe(f"{descriptions.get(r.case, '')}\n{r.reason}\nstderr: {r.stderr_tail}")
        elif r.status == "skip":
            ET.SubElement(case, "skipped", {"message": _xml_safe(r.reason)})
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"
