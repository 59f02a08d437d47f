"""A Kubernetes Event the operator posts on a pipeline: what the pure parts (rollout, status) decide to say."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str  # CamelCase, e.g. RolledBack
    message: str
