"""Bounded admission: at most `concurrency` requests work, at most `capacity` wait.

A request either gets a slot at once, waits in a FIFO queue for one, or is shed:
`reject-new` refuses the newcomer, `drop-oldest` evicts the longest waiter to make
room. Waiting is bounded by the caller's deadline, and a cancelled waiter leaves
the queue, so nothing waits forever and nothing is dropped without an error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from promptpipe.contract.spec import ShedPolicy
from promptpipe.runtime.errors import DeadlineExceeded, Shed


@dataclass
class AdmissionCounters:
    rejected: int = 0
    dropped: int = 0
    completed: int = 0


class AdmissionQueue:
    def __init__(self, capacity: int, concurrency: int, policy: ShedPolicy, retry_after: float) -> None:
        self.capacity = capacity
        self.concurrency = concurrency
        self.policy = policy
        self.retry_after = retry_after
        self.in_flight = 0
        self.counters = AdmissionCounters()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def depth(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, timeout: float | None) -> AsyncIterator[float]:
        """Hold a work slot for the body; yields the seconds spent waiting for it."""
        waited = await self._acquire(timeout)
        try:
            yield waited
        finally:
            self.counters.completed += 1
            self._release()

    async def _acquire(self, timeout: float | None) -> float:
        if self.in_flight < self.concurrency and not self._waiters:
            self.in_flight += 1
            return 0.0
        if len(self._waiters) >= self.capacity:
            self._shed_for_newcomer()
        start = time.perf_counter()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self._abandon(fut)
            raise DeadlineExceeded("deadline passed while queued") from None
        except asyncio.CancelledError:
            self._abandon(fut)
            raise
        return time.perf_counter() - start

    def _shed_for_newcomer(self) -> None:
        if self.policy is ShedPolicy.DROP_OLDEST and self._waiters:
            oldest = self._waiters.popleft()
            self.counters.dropped += 1
            oldest.set_exception(
                Shed("dropped from a full queue (drop-oldest) for a newer request", self.retry_after, "dropped")
            )
            return
        self.counters.rejected += 1
        raise Shed(f"queue full ({self.capacity} waiting, {self.concurrency} running)", self.retry_after)

    def _abandon(self, fut: asyncio.Future[None]) -> None:
        """A waiter gave up; if a slot was handed to it meanwhile, pass it on."""
        if fut in self._waiters:
            self._waiters.remove(fut)
        elif fut.done() and not fut.cancelled() and fut.exception() is None:
            self._release()
        elif fut.done() and not fut.cancelled():
            fut.exception()  # retrieved, so asyncio does not log it

    def _release(self) -> None:
        while self._waiters:
            nxt = self._waiters.popleft()
            if not nxt.done():
                nxt.set_result(None)  # the slot passes on; in_flight is unchanged
                return
        self.in_flight -= 1
