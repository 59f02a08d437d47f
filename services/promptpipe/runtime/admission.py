"""Bounded, fair admission: at most `concurrency` requests work, at most `capacity` wait.

A request either gets a slot at once, waits for one, or is shed. Waiting requests belong to flows (the
gateway's tenants; every other stage has one flow). A freed slot goes to the highest priority class with
waiters, and within a class by deficit round robin over the flows, each served in proportion to its
weight: a flow that floods the queue waits behind its own calls, not in front of the others'.

When the queue is full, a newcomer whose flow holds fewer waiters than the largest flow of its class (or
whose class outranks a waiting one) takes the place of that flow's newest waiter (`reject-new`) or oldest
(`drop-oldest`); otherwise `reject-new` refuses the newcomer and `drop-oldest` evicts the newcomer's own
flow's longest waiter. With one flow this is the plain FIFO queue and its two shed policies. Waiting is
bounded by the caller's deadline, and a cancelled waiter leaves the queue, so nothing waits forever and
nothing is dropped without an error.

With a wait cap (`queue.maxWaitMilliseconds`), a newcomer whose expected wait is over it is refused at once
(the calls that would be served before it, by the rules above, times the recent time a slot is held, over
the concurrency), and a waiter is ended when it has waited that long: a queue then holds only calls that
can still use their place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass

from promptpipe.contract.spec import QueueSpec, ShedPolicy
from promptpipe.runtime.errors import DeadlineExceeded, Shed


@dataclass
class AdmissionCounters:
    rejected: int = 0
    dropped: int = 0
    completed: int = 0


@dataclass(frozen=True)
class Flow:
    """Whose call this is, for fair admission: its name (a tenant), share and priority (higher first)."""

    name: str = ""
    weight: int = 1
    priority: int = 0


ONE_FLOW = Flow()
# A refusal's reason (Shed.reason, the shed metric's label) when it is the wait cap's.
WAIT_CAP = "wait_cap"
# How much the latest slot's time moves the recent one: about the last ten count.
SLOT_TIME_WEIGHT = 0.2


class Holds:
    """When each thing a call holds was taken: how long the longest-held one has been held. A call's slot
    is never held longer than its deadline and the watchdog allow; one that is has a stuck holder."""

    def __init__(self) -> None:
        self._since: dict[int, float] = {}  # insertion order: the first is the oldest
        self._ids = itertools.count()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        hold = next(self._ids)
        self._since[hold] = time.monotonic()
        try:
            yield
        finally:
            del self._since[hold]

    def longest(self) -> float:
        """Seconds the longest-held one has been held (0: none is)."""
        for since in self._since.values():
            return time.monotonic() - since
        return 0.0


class _FlowQueue:
    __slots__ = ("deficit", "flow", "waiters")

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.deficit = 0


class _PriorityClass:
    """The waiting flows of one priority, served by deficit round robin (every call costs one slot).

    As in FQ-CoDel, a flow that starts waiting is served before the flows already taking turns, for one
    turn: a tenant that sends a call now and then waits for one slot, not for a round of the busy ones.
    """

    def __init__(self) -> None:
        self.fresh: dict[str, _FlowQueue] = {}  # flows that just started waiting, in arrival order
        self.turns: dict[str, _FlowQueue] = {}  # the rest, in round-robin order: the head is served next

    def __bool__(self) -> bool:
        return bool(self.fresh or self.turns)

    def get(self, name: str) -> _FlowQueue | None:
        return self.fresh.get(name) or self.turns.get(name)

    def add(self, flow: Flow) -> _FlowQueue:
        fq = self.fresh[flow.name] = _FlowQueue(flow)
        return fq

    def remove(self, name: str) -> None:
        if self.fresh.pop(name, None) is None:
            self.turns.pop(name, None)

    def all(self) -> list[_FlowQueue]:
        return [*self.fresh.values(), *self.turns.values()]

    def pop(self) -> asyncio.Future[None]:
        """The next waiter (there is one: an emptied flow is removed); never a settled one, as whoever
        settles a waiter takes it out of its flow first."""
        queue = self.fresh or self.turns
        name, fq = next(iter(queue.items()))
        if fq.deficit < 1:
            fq.deficit += fq.flow.weight
        fut = fq.waiters.popleft()
        fq.deficit -= 1
        if not fq.waiters:
            del queue[name]  # an emptied flow keeps no credit, as DRR says
        elif fq.deficit < 1:
            del queue[name]
            self.turns[name] = fq  # its turn is over: to the back
        return fut


class AdmissionQueue:
    def __init__(
        self,
        capacity: int,
        concurrency: int,
        policy: ShedPolicy,
        retry_after: float,
        stage: str = "",
        max_wait: float = 0.0,
    ) -> None:
        # A refusal names its stage: it reaches the client through every stage before it, unchanged.
        self._prefix = f"stage {stage}: " if stage else ""
        self.capacity = capacity
        self.concurrency = concurrency
        self.policy = policy
        self.retry_after = retry_after
        self.max_wait = max_wait  # seconds; 0: no cap
        self.in_flight = 0
        self.counters = AdmissionCounters()
        self._depth = 0
        self._classes: dict[int, _PriorityClass] = {}  # highest priority first
        self._holds = Holds()
        self._slot_seconds: float | None = None  # recent time a slot is held (EWMA); None: none held yet

    @property
    def depth(self) -> int:
        return self._depth

    @classmethod
    def of(cls, spec: QueueSpec, stage: str) -> AdmissionQueue:
        """The queue `spec` declares for `stage` (whose name its refusals carry)."""
        return cls(
            spec.capacity,
            spec.concurrency,
            spec.shed_policy,
            spec.retry_after_seconds,
            stage,
            spec.max_wait_milliseconds / 1000,
        )

    def held_for(self) -> float:
        """Seconds the longest-held work slot has been held (0: none is)."""
        return self._holds.longest()

    def snapshot(self) -> dict[str, int]:
        return {"depth": self.depth, "in_flight": self.in_flight, **asdict(self.counters)}

    def waiting(self, flow: str) -> int:
        for cls in self._classes.values():
            fq = cls.get(flow)
            if fq is not None:
                return len(fq.waiters)
        return 0

    @contextlib.asynccontextmanager
    async def slot(self, timeout: float | None, flow: Flow = ONE_FLOW) -> AsyncIterator[float]:
        """Hold a work slot for the body; yields the seconds spent waiting for it."""
        waited = await self._acquire(timeout, flow)
        taken = time.perf_counter()
        try:
            with self._holds.held():
                yield waited
        finally:
            held = time.perf_counter() - taken
            recent = self._slot_seconds
            self._slot_seconds = held if recent is None else recent + SLOT_TIME_WEIGHT * (held - recent)
            self.counters.completed += 1
            self._release()

    def expected_wait(self, flow: Flow = ONE_FLOW) -> float | None:
        """Seconds a newcomer of `flow` would wait for a slot now, or None before any slot was held."""
        if self._slot_seconds is None:
            return None
        if self.in_flight < self.concurrency and not self._depth:
            return 0.0
        return (self._ahead(flow) + 1) * self._slot_seconds / self.concurrency

    def _ahead(self, flow: Flow) -> int:
        """About how many waiting calls would be served before a newcomer of `flow`: every waiter of a higher
        priority, and in its own class its flow's waiters and each other flow's turns until the newcomer's
        (deficit round robin, in proportion to the weights); a flow not waiting yet waits only for the other
        flows that just started."""
        ahead = 0
        for priority, cls in self._classes.items():
            if priority > flow.priority:
                ahead += sum(len(fq.waiters) for fq in cls.all())
            elif priority == flow.priority:
                mine = cls.get(flow.name)
                rounds = len(mine.waiters) + 1 if mine is not None else 1
                others = cls.all() if mine is not None else list(cls.fresh.values())
                for fq in others:
                    turns = math.ceil(rounds * fq.flow.weight / flow.weight)
                    ahead += len(fq.waiters) if fq is mine else min(len(fq.waiters), turns)
        return ahead

    def refusal(self, flow: Flow = ONE_FLOW) -> Shed | None:
        """What a newcomer of `flow` would be refused with now (nothing changes), or None if it would get a
        slot, a place, or another's place: what a caller can ask before it reads a request at all."""
        if self.in_flight < self.concurrency and not self._depth:
            return None
        expected = self.expected_wait(flow)
        if self.max_wait and expected is not None and expected > self.max_wait:
            return Shed(
                f"{self._prefix}expected wait {expected * 1000:.0f} ms is over queue.maxWaitMilliseconds"
                f" {self.max_wait * 1000:.0f}",
                max(self.retry_after, expected - self.max_wait),
                WAIT_CAP,
            )
        if self._depth < self.capacity or self._heaviest_below(flow) is not None:
            return None
        own = self._classes.get(flow.priority)
        if self.policy is ShedPolicy.DROP_OLDEST and own is not None and own.get(flow.name) is not None:
            return None  # it takes its own flow's oldest place
        return Shed(f"{self._prefix}queue full ({self.capacity} waiting, {self.concurrency} running)", self.retry_after)

    async def _acquire(self, timeout: float | None, flow: Flow) -> float:
        if self.in_flight < self.concurrency and not self._depth:
            self.in_flight += 1
            return 0.0
        refused = self.refusal(flow)
        if refused is not None:
            self.counters.rejected += 1
            raise refused
        if self._depth >= self.capacity:
            self._make_room(flow)
        start = time.perf_counter()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fq = self._flow_queue(flow)
        fq.waiters.append(fut)
        self._depth += 1
        capped = bool(self.max_wait) and (timeout is None or self.max_wait < timeout)
        try:
            # Not wait_for: on Python 3.11 it swallows a cancel that arrives with the slot.
            async with asyncio.timeout(self.max_wait if capped else timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            self._abandon(fut, fq)
            if capped:
                self.counters.dropped += 1
                raise Shed(
                    f"{self._prefix}waited {self.max_wait * 1000:.0f} ms, queue.maxWaitMilliseconds",
                    self.retry_after,
                    WAIT_CAP,
                ) from None
            raise DeadlineExceeded("deadline passed while queued") from None
        except asyncio.CancelledError:
            self._abandon(fut, fq)
            raise
        return time.perf_counter() - start

    def _flow_queue(self, flow: Flow) -> _FlowQueue:
        cls = self._classes.get(flow.priority)
        if cls is None:
            cls = self._classes[flow.priority] = _PriorityClass()
            self._classes = dict(sorted(self._classes.items(), reverse=True))
        return cls.get(flow.name) or cls.add(flow)

    def _make_room(self, newcomer: Flow) -> None:
        """Make room for `newcomer` in the full queue (`refusal` said there is a place it may take)."""
        victim = self._heaviest_below(newcomer)
        if victim is not None:
            fut = victim.waiters.pop() if self.policy is ShedPolicy.REJECT_NEW else victim.waiters.popleft()
            self._evict(fut, victim, "dropped from a full queue for a call of a tenant with fewer waiting")
            return
        own = self._classes.get(newcomer.priority)
        mine = own.get(newcomer.name) if own is not None else None
        if mine is None:  # cannot be: `refusal` found it a place (drop-oldest, its own flow waiting)
            raise RuntimeError("a full queue with no place for a call it admitted")
        self._evict(mine.waiters.popleft(), mine, "dropped from a full queue (drop-oldest) for a newer request")

    def _heaviest_below(self, newcomer: Flow) -> _FlowQueue | None:
        """The flow that yields its place to `newcomer`: of the lowest priority class below or at the
        newcomer's, the one with the most waiters, if that is more than the newcomer's flow holds."""
        for priority in sorted(self._classes):
            if priority > newcomer.priority:
                return None
            cls = self._classes[priority]
            if not cls:
                continue
            heaviest = max(cls.all(), key=lambda fq: len(fq.waiters))
            if priority < newcomer.priority:
                return heaviest
            mine = cls.get(newcomer.name)
            if heaviest is not mine and len(heaviest.waiters) > (len(mine.waiters) if mine else 0):
                return heaviest
            return None
        return None

    def _evict(self, fut: asyncio.Future[None], fq: _FlowQueue, why: str) -> None:
        self._depth -= 1
        if not fq.waiters:
            self._classes[fq.flow.priority].remove(fq.flow.name)
        self.counters.dropped += 1
        fut.set_exception(Shed(self._prefix + why, self.retry_after, "dropped"))

    def _abandon(self, fut: asyncio.Future[None], fq: _FlowQueue) -> None:
        """A waiter gave up; if a slot was handed to it meanwhile, pass it on."""
        if fut in fq.waiters:
            fq.waiters.remove(fut)
            self._depth -= 1
            if not fq.waiters:
                self._classes[fq.flow.priority].remove(fq.flow.name)
        elif fut.done() and not fut.cancelled() and fut.exception() is None:
            self._release()
        elif fut.done() and not fut.cancelled():
            fut.exception()  # retrieved, so asyncio does not log it

    def _release(self) -> None:
        for cls in self._classes.values():
            if cls:
                self._depth -= 1
                cls.pop().set_result(None)  # the slot passes on; in_flight is unchanged
                return
        self.in_flight -= 1
