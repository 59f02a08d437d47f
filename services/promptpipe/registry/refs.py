"""Model references (`NAME`, `NAME:VERSION`, `NAME@ALIAS`): parsing only, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$"
VERSION_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._+-]{0,62}[A-Za-z0-9])?$"
ALIAS_PATTERN = r"^[a-z]([a-z0-9-]{0,62}[a-z0-9])?$"


class RefError(ValueError):
    pass


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version:
            return f"{self.name}:{self.version}"
        if self.alias:
            return f"{self.name}@{self.alias}"
        return self.name


def check(kind: str, value: str, pattern: str) -> str:
    if not re.match(pattern, value):
        raise RefError(f"invalid {kind} {value!r}: must match {pattern}")
    return value


def parse_ref(text: str) -> ModelRef:
    """`smollm2`, `smollm2:v3` or `smollm2@prod`."""
    if "@" in text:
        name, alias = text.split("@", 1)
        return ModelRef(check("model name", name, NAME_PATTERN), alias=check("alias", alias, ALIAS_PATTERN))
    if ":" in text:
        name, version = text.split(":", 1)
        return ModelRef(check("model name", name, NAME_PATTERN), version=check("version", version, VERSION_PATTERN))
    return ModelRef(check("model name", text, NAME_PATTERN))


def next_version(existing: list[str]) -> str:
    """`v<N+1>` after the highest `v<N>` already published (other spellings are ignored)."""
    numbers = [int(v[1:]) for v in existing if re.fullmatch(r"v[0-9]{1,9}", v)]
    return f"v{max(numbers, default=0) + 1}"
