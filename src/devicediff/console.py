"""Terminal helpers shared by the commands (nothing here imports the CLI)."""

from __future__ import annotations

import sys


def wide_console(*, stderr: bool = False):
    """A rich Console whose tables stay readable when the stream is a file or a pipe (CI logs)."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(width=160, stderr=stderr)


def note(text: str) -> None:
    """A one-line note on stderr (not an error)."""
    print(f"devicediff: note: {text}", file=sys.stderr)
