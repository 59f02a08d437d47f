"""The CLI's two consoles and its one way to fail: `raise fail("...", code)`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

# soft_wrap: an error stays one line in a pod's log and termination message, not cut at 80 columns.
err = Console(stderr=True, soft_wrap=True)
out = Console()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr (the message as it is: no markup) and return the exit to raise."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    return typer.Exit(code)
