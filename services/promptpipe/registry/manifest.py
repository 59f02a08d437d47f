"""What a model version is made of: every file's relative path, size and SHA-256.

The version's digest is the SHA-256 of the canonical JSON of that list, so two
pushes of the same folder have the same digest and a retried push is recognized.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator

CHUNK = 1 << 20
# Written next to a pulled model; says which version the folder holds.
MARKER = ".promptpipe-model.json"


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, path: str) -> str:
        # The paths come from a database; a pull must never write outside its folder.
        p = PurePosixPath(path)
        if not path or p.is_absolute() or ".." in p.parts or "\\" in path or p.as_posix() != path:
            raise ValueError(f"unsafe file path {path!r}")
        return path


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    files: tuple[FileEntry, ...]

    @property
    def digest(self) -> str:
        canonical = json.dumps(
            [f.model_dump() for f in sorted(self.files, key=lambda f: f.path)], separators=(",", ":"), sort_keys=True
        )
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def scan(folder: Path, progress: Callable[[int], None] | None = None) -> Manifest:
    """Hash every regular file under `folder` (symlinks followed, the marker skipped)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MARKER:
            continue
        files.append(FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path, progress)))
    if not files:
        raise FileNotFoundError(f"{folder} holds no files")
    return Manifest(files=tuple(files))
