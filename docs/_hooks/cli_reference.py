"""MkDocs hook: the command-line reference, generated from the ``pipes`` argument parser at build time.

A page holding the marker ``<!-- pipes-cli-reference -->`` gets, in its place, every subcommand's usage and a
table of its flags (grouped as ``pipes run --help`` groups them), so the reference cannot drift from the parser.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- pipes-cli-reference -->"
# The usage text is wrapped at this width, as in a terminal of this size (argparse reads COLUMNS).
USAGE_COLUMNS = 100


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.dest}`"
    if action.choices is not None and action.option_strings:
        return f"{names} `{'|'.join(str(choice) for choice in action.choices)}`"
    if action.metavar is not None and action.nargs != 0:
        return f"{names} `{action.metavar}`"
    return names


def _table(actions: list[argparse.Action]) -> list[str]:
    rows = ["| flag | what it does |", "|---|---|"]
    for action in actions:
        if isinstance(action, argparse._HelpAction):
            continue
        help_text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in help_text:
            help_text += f" (default: {action.default})"
        rows.append(f"| {_flag(action)} | {_cell(help_text)} |")
    return rows


def reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown of the reference: ``pipes`` and each subcommand."""
    if parser is None:
        from pipes_core.cli.main import _build_parser

        parser = _build_parser()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(USAGE_COLUMNS)
    try:
        parts = ["## pipes", "", "```text", parser.format_usage().strip(), "```", "",
                 parser.description or "", "", *_table(parser._actions[1:2]), ""]
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                continue
            for name, sub in action.choices.items():
                parts += [f"## pipes {name}", "", "```text", sub.format_usage().strip(), "```", ""]
                for group in sub._action_groups:
                    actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
                    if not actions:
                        continue
                    title = group.title or ""
                    parts += [f"### {title[0].upper() + title[1:]}", ""]
                    if group.description:
                        parts += [group.description, ""]
                    parts += [*_table(actions), ""]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
