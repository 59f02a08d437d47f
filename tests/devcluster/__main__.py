"""`python -m tests.devcluster`: the test cluster from a shell (see docs/development.md)."""

from tests.devcluster.cli import app

app()
