"""Timestamps as promptpipe writes them everywhere (status, Events, the registry): RFC 3339
in UTC with a `Z`, as Kubernetes writes its own. One formatter, one parser."""

from __future__ import annotations

import datetime as dt
from typing import Literal

Precision = Literal["seconds", "milliseconds", "microseconds"]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(when: dt.datetime | None = None, precision: Precision = "seconds") -> str:
    """`2026-12-01T10:00:00Z` (Kubernetes' own precision for conditions); finer where order matters."""
    return (when or utc_now()).astimezone(dt.UTC).isoformat(timespec=precision).replace("+00:00", "Z")


def parse_time(text: str | None) -> dt.datetime | None:
    """The inverse of `format_time` (any precision); a naive time is taken as local, as Python does."""
    return dt.datetime.fromisoformat(text).astimezone(dt.UTC) if text else None
