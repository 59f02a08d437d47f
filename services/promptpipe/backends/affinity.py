"""Session affinity: a consistent-hash ring over backend endpoints.

A session keeps its endpoint (and so its KV/prefix cache) while endpoints come and
go; only the sessions of a removed endpoint move.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, endpoints: Sequence[str], vnodes: int = 160) -> None:
        if not endpoints:
            raise ValueError("a hash ring needs at least one endpoint")
        points = sorted((_hash(f"{ep}#{i}"), ep) for ep in dict.fromkeys(endpoints) for i in range(vnodes))
        self._keys = [p for p, _ in points]
        self._endpoints = [ep for _, ep in points]
        self.size = len(dict.fromkeys(endpoints))

    def preference(self, session: str) -> Iterator[str]:
        """Endpoints in the order this session should try them; first is its home."""
        seen: set[str] = set()
        start = bisect.bisect(self._keys, _hash(session))
        n = len(self._keys)
        for i in range(n):
            ep = self._endpoints[(start + i) % n]
            if ep not in seen:
                seen.add(ep)
                yield ep
                if len(seen) == self.size:
                    return

    def home(self, session: str) -> str:
        return next(self.preference(session))
