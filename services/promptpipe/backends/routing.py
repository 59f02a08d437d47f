"""Which backend replica serves a call: pure policy, no I/O.

`prefix` (consistent hashing with bounded loads): a call's key (its session, or the part of its prompt
that every later turn repeats) hashes onto a ring of the replicas; its home is the first replica after
the key, so it finds the prefix that replica has cached. Replicas come and go moving only their own
keys. A home holding `load_bound` x the mean calls in flight passes the call to the next
replica on the ring (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads"), so
one hot conversation cannot pile up on one replica. `least-loaded` and `round-robin` ignore the cache.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence

from promptpipe.contract.spec import RoutingPolicy, RoutingSpec

# Without a session id or a first user message to find, the key is this many leading characters.
LEADING_CHARS = 1024
VNODES = 160


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, endpoints: Sequence[str], vnodes: int = VNODES) -> None:
        if not endpoints:
            raise ValueError("a hash ring needs at least one endpoint")
        unique = list(dict.fromkeys(endpoints))
        points = sorted((_hash(f"{ep}#{i}"), ep) for ep in unique for i in range(vnodes))
        self._keys = [p for p, _ in points]
        self._endpoints = [ep for _, ep in points]
        self.size = len(unique)

    def preference(self, key: str) -> Iterator[str]:
        """Endpoints in the order this key should try them; first is its home."""
        seen: set[str] = set()
        start = bisect.bisect(self._keys, _hash(key))
        n = len(self._keys)
        for i in range(n):
            ep = self._endpoints[(start + i) % n]
            if ep not in seen:
                seen.add(ep)
                yield ep
                if len(seen) == self.size:
                    return

    def home(self, key: str) -> str:
        return next(self.preference(key))


def routing_key(session_id: str, prompt: str, first_user_message: str) -> str:
    """The session when the caller names one. Otherwise the prompt up to the end of the conversation's first
    user message: the system prompt, few-shot examples and opening turn, which every later turn of the same
    conversation repeats word for word (and a new conversation does not)."""
    if session_id:
        return "session:" + session_id
    end = prompt.find(first_user_message) if first_user_message else -1
    leading = prompt[: end + len(first_user_message)] if end >= 0 else prompt[:LEADING_CHARS]
    return "prompt:" + hashlib.blake2b(leading.encode(), digest_size=16).hexdigest()


class Reason(str, enum.Enum):
    """Why a call went to the replica it went to (a metric label)."""

    HOME = "home"  # its key's own replica
    OVERFLOW = "overflow"  # the home was over its bounded load
    CIRCUIT = "circuit"  # the home's circuit was open
    BALANCED = "balanced"  # least-loaded or round-robin: no home


class Router:
    """The replicas, the calls each holds, and the order a call should try them in."""

    def __init__(self, spec: RoutingSpec, replicas: Sequence[str]) -> None:
        self._spec = spec
        self._in_flight: dict[str, int] = {}
        self._turn = itertools.count()
        self.replicas: tuple[str, ...] = ()
        self.set_replicas(replicas)

    def set_replicas(self, replicas: Sequence[str]) -> None:
        """A new set of replicas; the calls those staying hold are still counted."""
        unique = tuple(dict.fromkeys(replicas))
        self._ring = HashRing(unique)
        self._in_flight = {r: self._in_flight.get(r, 0) for r in unique}
        self.replicas = unique

    def in_flight(self, replica: str) -> int:
        return self._in_flight.get(replica, 0)

    def capacity(self, replicas: int) -> int:
        """The most calls one replica may hold before the next call passes it by: `load_bound` x the mean
        load once this call is counted, rounded down, but never under the mean rounded up (so some replica
        always has room). Rounding the bound itself up, as the paper does, would let a replica hold twice
        the mean while calls are few, and calls are few on a model server."""
        mean = (sum(self._in_flight.values()) + 1) / max(1, replicas)
        return max(math.ceil(mean), math.floor(self._spec.load_bound * mean + 1e-9))

    def order(self, key: str, allowed: Callable[[str], bool]) -> tuple[list[str], Reason]:
        """The replicas whose circuit allows a call, best first, and why the first is first."""
        policy = self._spec.policy
        if policy is RoutingPolicy.ROUND_ROBIN:
            open_ = [r for r in self.replicas if allowed(r)]
            if not open_:
                return [], Reason.BALANCED
            start = next(self._turn) % len(open_)
            return open_[start:] + open_[:start], Reason.BALANCED
        if policy is RoutingPolicy.LEAST_LOADED:
            open_ = [r for r in self.replicas if allowed(r)]
            start = next(self._turn)  # ties go round, not always to the first replica
            n = len(open_)
            ranked = sorted(range(n), key=lambda i: (self._in_flight[open_[i]], (i - start) % n))
            return [open_[i] for i in ranked], Reason.BALANCED
        ring = list(self._ring.preference(key))
        open_ = [r for r in ring if allowed(r)]
        if not open_:
            return [], Reason.HOME
        cap = self.capacity(len(open_))
        pick = next((r for r in open_ if self._in_flight[r] < cap), open_[0])
        if pick == ring[0]:
            reason = Reason.HOME
        elif not allowed(ring[0]):
            reason = Reason.CIRCUIT
        else:
            reason = Reason.OVERFLOW
        return [pick, *(r for r in open_ if r != pick)], reason

    def started(self, replica: str) -> None:
        if replica in self._in_flight:
            self._in_flight[replica] += 1

    def finished(self, replica: str) -> None:
        # A replica that left while the call ran is no longer counted.
        if self._in_flight.get(replica, 0) > 0:
            self._in_flight[replica] -= 1
