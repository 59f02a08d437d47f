"""`promptpipe keys`: API keys for a gateway (see promptpipe.contract.apikeys for the file they go in)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from promptpipe.cli.console import err, fail, out
from promptpipe.contract.apikeys import TENANT, hash_key, new_key

keys_app = typer.Typer(help="API keys: make one, hash one.", no_args_is_help=True)


@keys_app.command("new")
def new(
    tenant: Annotated[str, typer.Argument(help="Whose key: calls with it count as this tenant.")],
    key_file: Annotated[
        Path | None,
        typer.Option(help="Write the key here (readable by you alone) and print only the key file's line."),
    ] = None,
) -> None:
    """Print a new key (give it to the tenant) and its line for the key file (the gateway keeps only that)."""
    if not TENANT.match(tenant):
        raise fail(f"{tenant!r}: a tenant is 1-63 lowercase letters, digits, '.', '_' or '-'", 2)
    key = new_key()
    if key_file is None:
        out.print(key, highlight=False)
        err.print("[dim]the key file's line (a tenant may list several while one is rotated out):[/]")
    else:
        try:
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise fail(f"{key_file}: {exc.strerror} (a key file is never overwritten)", 1) from None
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        err.print(f"[dim]the key is in {key_file}; the key file's line:[/]")
    out.print(f"{tenant}: {hash_key(key)}", highlight=False)


@keys_app.command("hash")
def hash_(key: Annotated[str, typer.Argument(help="A key to hash, e.g. one you already hand out.")]) -> None:
    """Print a key's hash, as the key file holds it."""
    out.print(hash_key(key), highlight=False)
