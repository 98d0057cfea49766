"""The library's words, in the command line's: one table.

The library is called from Python, so its messages name parameters (``pass strict=False``); ``pipes run`` is
called with flags, so every message it prints that came from the library goes through :func:`in_cli_words` and
names what the user can type instead (``pass --no-strict``). A message the library words anew needs its entry
here; tests/test_cli_usability.py reaches each entry through a real ``pipes run``.
"""

from __future__ import annotations

import re

__all__ = ["CLI_WORDS", "in_cli_words"]

# (what the library says, what the command line says instead): regular expressions and their replacements.
CLI_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"pass strict=False"), "pass --no-strict"),
    (re.compile(r"\(fail_on_check_error\)"), "(--fail-on-check-error)"),
    (re.compile(r"longer than max_line_bytes=(\d+)"), r"longer than --max-line-bytes \1"),
    (re.compile(r"pass pull=True"), "pass --docker-arg=--pull=always"),
    (re.compile(r"install Slurm's client commands or give their paths in SlurmCommands"),
     "install Slurm's client commands (sbatch, squeue, scontrol, scancel) on PATH"),
    (re.compile(r"Without shared_dir\b"), "Without --shared-dir"),
    (re.compile(r"pass a directory the nodes share"), "pass --shared-dir DIR, a directory the nodes share"),
    (re.compile(r"pass client= \(a BlobServiceClient\) or set the connection string"),
     "set it to your storage account's (or Azurite's) connection string"),
    # Raised in the external process when it reports for an asset and none was selected.
    (re.compile(r"this step has no assets? in scope(?: \(it is not an asset step\))?"),
     r"\g<0> (pipes run: select one with --asset KEY)"),
)


def in_cli_words(text: str) -> str:
    """``text`` with every hint that names a Python parameter naming the ``pipes run`` flag instead."""
    for pattern, replacement in CLI_WORDS:
        text = pattern.sub(replacement, text)
    return text
