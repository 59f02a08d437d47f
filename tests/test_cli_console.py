"""The CLI's tables, piped into a script or a log, are printed whole: not cut to 80 columns."""

from __future__ import annotations

import pytest
from rich.table import Table

from promptpipe.cli.console import print_table

COLUMNS = ("stage", "health", "grpc", "metrics", "queue", "running", "rejected", "dropped", "done")


def test_a_piped_table_is_printed_at_the_width_it_needs(capsys: pytest.CaptureFixture[str]) -> None:
    table = Table()
    for name in COLUMNS:
        table.add_column(name, no_wrap=True)
    table.add_row("inference+post", "NOT_SERVING", *(str(10_000 + i) for i in range(8)))
    print_table(table)
    printed = capsys.readouterr().out
    assert "…" not in printed
    assert all(name in printed for name in COLUMNS) and "inference+post" in printed and "NOT_SERVING" in printed
    assert max(len(line) for line in printed.splitlines()) > 80
