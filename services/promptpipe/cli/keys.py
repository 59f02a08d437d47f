"""`promptpipe keys`: API keys for a gateway (see promptpipe.contract.apikeys for the file they go in)."""

from __future__ import annotations

from typing import Annotated

import typer

from promptpipe.cli.console import err, fail, out
from promptpipe.contract.apikeys import TENANT, hash_key, new_key

keys_app = typer.Typer(help="API keys: make one, hash one.", no_args_is_help=True)


@keys_app.command("new")
def new(tenant: Annotated[str, typer.Argument(help="Whose key: calls with it count as this tenant.")]) -> None:
    """Print a new key (give it to the tenant) and its line for the key file (the gateway keeps only that)."""
    if not TENANT.match(tenant):
        raise fail(f"{tenant!r}: a tenant is 1-63 lowercase letters, digits, '.', '_' or '-'", 2)
    key = new_key()
    out.print(key, highlight=False)
    err.print("[dim]the key file's line (a tenant may list several while one is rotated out):[/]")
    out.print(f"{tenant}: {hash_key(key)}", highlight=False)


@keys_app.command("hash")
def hash_(key: Annotated[str, typer.Argument(help="A key to hash, e.g. one you already hand out.")]) -> None:
    """Print a key's hash, as the key file holds it."""
    out.print(hash_key(key), highlight=False)
