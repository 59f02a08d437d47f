"""The CLI's two consoles, its one way to print a table, and its one way to fail: `raise fail("...", code)`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

# soft_wrap: an error stays one line in a pod's log and termination message, not cut at 80 columns.
err = Console(stderr=True, soft_wrap=True)
out = Console()


# Piped (a script, a log), a table is printed at the width it needs, not cut to the 80 columns rich
# assumes without a terminal; this is wide enough for any table the CLI prints.
UNBOUNDED_WIDTH = 1000
_piped = Console(width=UNBOUNDED_WIDTH)


def print_table(table: Table) -> None:
    """A table whole: in a terminal, within its width; piped, at the width it needs."""
    (out if out.is_terminal else _piped).print(table)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr (the message as it is: no markup) and return the exit to raise."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    return typer.Exit(code)
