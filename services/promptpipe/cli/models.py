"""`promptpipe model ...` and `promptpipe registry init`: the model registry from a shell."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from promptpipe.cli.console import err, fail, out, print_table
from promptpipe.registry import errors
from promptpipe.registry.refs import ALIAS_PATTERN, NAME_PATTERN, VERSION_PATTERN, RefError, check, parse_ref
from promptpipe.registry.settings import RegistrySettings
from promptpipe.registry.store import Registry

model_app = typer.Typer(
    help="Publish, inspect, promote and fetch models in the registry (S3 + DynamoDB).", no_args_is_help=True
)
registry_app = typer.Typer(help="Set up the registry's bucket and table.", no_args_is_help=True)


class Output(str, enum.Enum):
    TEXT = "text"
    JSON = "json"


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="text for people, json for scripts.")]


@contextmanager
def _registry() -> Iterator[Registry]:
    try:
        yield Registry(RegistrySettings())
    except RefError as e:
        raise fail(str(e), 2) from None
    except errors.NotFound as e:
        raise fail(str(e), 3) from None
    except errors.Unreachable as e:
        raise fail(str(e), errors.UNREACHABLE_EXIT) from None
    except errors.RegistryError as e:
        raise fail(str(e)) from None


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2))


class _Bar:
    """rich progress on stderr, one bar per phase; silent when stderr is not a terminal."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def phase(self, description: str, total: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)


@contextmanager
def _bar() -> Iterator[_Bar]:
    columns = (
        TextColumn("{task.description:>11}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        yield _Bar(progress)


@registry_app.command("init")
def init(output: OutputOption = Output.TEXT) -> None:
    """Create the S3 bucket and the DynamoDB table (idempotent)."""
    settings = RegistrySettings()
    with _registry() as reg:
        created = reg.init()
    if output is Output.JSON:
        _json({"bucket": settings.bucket, "table": settings.table, "created": created})
        return
    out.print(
        f"registry ready: bucket [bold]{settings.bucket}[/], table [bold]{settings.table}[/]"
        + (f" (created {', '.join(created)})" if created else " (both already existed)")
    )


@model_app.command()
def push(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="NAME[:VERSION]",
            help="Without a version: the next vN (or the version this exact content already is).",
        ),
    ],
    folder: Annotated[Path, typer.Argument(help="The model folder: weights, tokenizer, config.")],
    output: OutputOption = Output.TEXT,
) -> None:
    """Publish a model folder as a new, immutable version. Safe to retry: only missing files are uploaded."""
    with _registry() as reg:
        parsed = parse_ref(ref)
        if parsed.alias:
            raise fail("push takes NAME or NAME:VERSION; set aliases with `promptpipe model promote`", 2)
        if not folder.is_dir():
            raise fail(f"{folder} is not a folder", 2)
        with _bar() as bar:
            result = reg.push(parsed.name, folder, parsed.version, bar)
    r = result.record
    if output is Output.JSON:
        _json(
            {
                **r.as_json(files=False),
                "created": result.created,
                "uploadedBytes": result.uploaded_bytes,
                "skippedBytes": result.skipped_bytes,
            }
        )
        return
    verb = "published" if result.created else "already published, same content:"
    out.print(
        f"{verb} [bold]{r.name}:{r.version}[/] {r.digest}  "
        f"{len(r.manifest.files)} files, {decimal(r.manifest.size)}; uploaded {decimal(result.uploaded_bytes)}, "
        f"{decimal(result.skipped_bytes)} already in the bucket"
    )


@model_app.command("list")
def list_(
    name: Annotated[str | None, typer.Argument(help="A model: list its versions.")] = None,
    output: OutputOption = Output.TEXT,
) -> None:
    """Every model, or one model's versions."""
    with _registry() as reg:
        if name is None:
            models = reg.models()
            if output is Output.JSON:
                return _json([m.as_json() for m in models])
            table = _table("model", "versions", "latest", "aliases")
            for m in models:
                aliases = ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items()))
                table.add_row(m.name, str(len(m.versions)), m.versions[-1] if m.versions else "-", aliases)
            return print_table(table)
        check("model name", name, NAME_PATTERN)
        records = reg.versions(name)
        if not records:
            raise errors.NotFound(f"no model {name!r} in the registry")
    if output is Output.JSON:
        return _json([r.as_json(files=False) for r in records])
    table = _table("version", "digest", "size", "files", "aliases", "created", "by")
    for r in records:
        table.add_row(
            r.version,
            r.digest[:19],
            decimal(r.manifest.size),
            str(len(r.manifest.files)),
            ", ".join(r.aliases),
            r.created_at[:19],
            r.created_by,
        )
    print_table(table)


@model_app.command()
def show(
    ref: Annotated[str, typer.Argument(metavar="NAME[:VERSION|@ALIAS]", help="Bare NAME: the newest version.")],
    output: OutputOption = Output.TEXT,
) -> None:
    """One version: digest, aliases, and every file with its hash."""
    with _registry() as reg:
        r = reg.resolve(parse_ref(ref))
    if output is Output.JSON:
        return _json(r.as_json())
    out.print(
        f"[bold]{r.name}:{r.version}[/]  {r.digest}\n"
        f"created {r.created_at} by {r.created_by}; aliases: {', '.join(r.aliases) or '-'}; "
        f"{len(r.manifest.files)} files, {decimal(r.manifest.size)}"
    )
    table = _table("file", "size", "sha256")
    for f in r.manifest.files:
        table.add_row(f.path, decimal(f.size), f.sha256)
    print_table(table)


@model_app.command()
def pull(
    ref: Annotated[str, typer.Argument(metavar="NAME[:VERSION|@ALIAS]")],
    dest: Annotated[Path, typer.Argument(help="Folder to create; it appears complete or not at all.")],
    digest: Annotated[
        str | None,
        typer.Option(help="Pull only this content (sha256:...): what was resolved earlier, if the record changed."),
    ] = None,
    output: OutputOption = Output.TEXT,
) -> None:
    """Download a version and verify every file's SHA-256, and the file list against the version's digest; a
    mismatch is an error and leaves nothing behind."""
    with _registry() as reg, _bar() as bar:
        r, downloaded = reg.pull(parse_ref(ref), dest, bar, digest=digest)
    if output is Output.JSON:
        return _json({**r.as_json(files=False), "path": str(dest), "downloaded": downloaded})
    what = "pulled" if downloaded else "already present and verified:"
    out.print(f"{what} [bold]{r.name}:{r.version}[/] ({r.digest}) into {dest}")


@model_app.command()
def promote(
    name: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Argument()],
    alias: Annotated[str, typer.Argument(help="prod, canary, or any name.")],
    output: OutputOption = Output.TEXT,
) -> None:
    """Point ALIAS at VERSION. Pipelines following the alias roll out the new version."""
    with _registry() as reg:
        check("model name", name, NAME_PATTERN)
        check("version", version, VERSION_PATTERN)
        check("alias", alias, ALIAS_PATTERN)
        previous = reg.promote(name, version, alias)
    if output is Output.JSON:
        return _json({"name": name, "alias": alias, "version": version, "previous": previous})
    out.print(f"{name}@{alias} → [bold]{version}[/]" + (f" (was {previous})" if previous else ""))


@model_app.command()
def rollback(
    name: Annotated[str, typer.Argument()],
    alias: Annotated[str, typer.Argument()],
    output: OutputOption = Output.TEXT,
) -> None:
    """Point ALIAS back at the version its last promotion replaced."""
    with _registry() as reg:
        check("model name", name, NAME_PATTERN)
        check("alias", alias, ALIAS_PATTERN)
        was, now = reg.rollback_alias(name, alias)
    if output is Output.JSON:
        return _json({"name": name, "alias": alias, "version": now, "previous": was})
    out.print(f"{name}@{alias} → [bold]{now}[/] (was {was})")


@model_app.command()
def history(name: Annotated[str, typer.Argument()], output: OutputOption = Output.TEXT) -> None:
    """Every push and promotion of a model, oldest first."""
    with _registry() as reg:
        check("model name", name, NAME_PATTERN)
        entries = reg.history(name)
    if output is Output.JSON:
        return _json([e.as_json() for e in entries])
    table = _table("when", "what", "version", "alias", "previous", "by")
    for e in entries:
        table.add_row(e.at[:19], e.action, e.version, e.alias, e.previous, e.actor)
    print_table(table)


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in columns:
        table.add_column(col, overflow="fold")  # hashes and paths wrap on a narrow terminal, never cut
    return table
