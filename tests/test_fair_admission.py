"""Fair admission across tenants (flows), driven directly: who gets a freed slot, and who is shed."""

from __future__ import annotations

import asyncio

import pytest

from promptpipe.contract.spec import ShedPolicy
from promptpipe.runtime.admission import AdmissionQueue, Flow
from promptpipe.runtime.errors import Shed

A, B, C = Flow("a"), Flow("b"), Flow("c")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Slots:
    """Calls that hold their slot until told to finish, in the order they were admitted."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue = queue
        self.admitted: list[str] = []
        self.shed: dict[str, Shed] = {}
        self._done: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def arrive(self, name: str, flow: Flow) -> None:
        self._done[name] = asyncio.Event()
        self.tasks.append(asyncio.create_task(self._call(name, flow)))
        await settle()

    async def _call(self, name: str, flow: Flow) -> None:
        try:
            async with self.queue.slot(5.0, flow):
                self.admitted.append(name)
                await self._done[name].wait()
        except Shed as exc:
            self.shed[name] = exc

    async def finish(self, name: str) -> None:
        self._done[name].set()
        await settle()

    async def finish_all_in_turn(self) -> None:
        """Finish the running calls one at a time, each letting the next waiter in."""
        while len(self._finished()) < len(self.admitted):
            await self.finish(next(n for n in self.admitted if not self._done[n].is_set()))
        await asyncio.gather(*self.tasks)

    def _finished(self) -> list[str]:
        return [n for n in self.admitted if self._done[n].is_set()]


async def test_a_freed_slot_alternates_between_tenants_not_in_arrival_order() -> None:
    s = Slots(AdmissionQueue(capacity=10, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=1.0))
    for name in ("a0", "a1", "a2", "a3", "a4"):
        await s.arrive(name, A)
    await s.finish("a0")  # a is a busy tenant now, taking turns
    await s.arrive("b1", B)
    await s.arrive("b2", B)
    await s.finish_all_in_turn()
    # b1 arrived behind three of a's and waited for one slot only; then they take turns.
    assert s.admitted == ["a0", "a1", "b1", "a2", "b2", "a3", "a4"]


async def test_weights_share_the_slots_in_proportion() -> None:
    s = Slots(AdmissionQueue(capacity=20, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=1.0))
    await s.arrive("x", C)
    heavy, light = Flow("heavy", weight=3), Flow("light", weight=1)
    for i in range(6):
        await s.arrive(f"h{i}", heavy)
    for i in range(3):
        await s.arrive(f"l{i}", light)
    await s.finish_all_in_turn()
    assert s.admitted == ["x", "h0", "h1", "h2", "l0", "h3", "h4", "h5", "l1", "l2"]


async def test_a_higher_priority_waiter_goes_first_whenever_it_arrived() -> None:
    s = Slots(AdmissionQueue(capacity=10, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=1.0))
    await s.arrive("run", A)
    await s.arrive("low", Flow("batch", priority=-1))
    await s.arrive("normal", B)
    await s.arrive("high", Flow("urgent", priority=1))
    await s.finish_all_in_turn()
    assert s.admitted == ["run", "high", "normal", "low"]


async def test_a_full_queue_sheds_the_flooding_tenants_newest_to_let_another_tenant_wait() -> None:
    q = AdmissionQueue(capacity=3, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=0.5)
    s = Slots(q)
    for name in ("a0", "a1", "a2", "a3"):
        await s.arrive(name, A)
    assert q.depth == 3 and q.waiting("a") == 3
    await s.arrive("b1", B)
    assert s.shed["a3"].reason == "dropped" and "a tenant with fewer waiting" in s.shed["a3"].message
    assert q.waiting("a") == 2 and q.waiting("b") == 1 and q.depth == 3
    # The flooding tenant's own newcomer is refused: reject-new, within its own share.
    await s.arrive("a4", A)
    assert s.shed["a4"].reason == "rejected" and q.counters.rejected == 1 and q.counters.dropped == 1
    await s.finish_all_in_turn()
    assert s.admitted == ["a0", "a1", "b1", "a2"]
    assert q.depth == 0 and q.in_flight == 0


async def test_drop_oldest_evicts_the_flooding_tenants_oldest() -> None:
    q = AdmissionQueue(capacity=2, concurrency=1, policy=ShedPolicy.DROP_OLDEST, retry_after=0.5)
    s = Slots(q)
    for name in ("a0", "a1", "a2"):
        await s.arrive(name, A)
    await s.arrive("b1", B)
    assert set(s.shed) == {"a1"} and s.shed["a1"].reason == "dropped"
    await s.arrive("b2", B)  # b now holds as many as a: its own oldest makes room
    assert set(s.shed) == {"a1", "b1"}
    await s.finish_all_in_turn()
    assert s.admitted == ["a0", "a2", "b2"]


async def test_a_higher_priority_newcomer_displaces_a_lower_class_even_with_fewer_waiting() -> None:
    q = AdmissionQueue(capacity=2, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=0.5)
    s = Slots(q)
    urgent = Flow("urgent", priority=1)
    await s.arrive("run", A)
    await s.arrive("u1", urgent)
    await s.arrive("a1", A)
    await s.arrive("u2", urgent)
    assert set(s.shed) == {"a1"}
    # Nothing below it left: a normal newcomer is refused, not the urgent tenant's waiters.
    await s.arrive("b1", B)
    assert set(s.shed) == {"a1", "b1"} and s.shed["b1"].reason == "rejected"
    await s.finish_all_in_turn()
    assert s.admitted == ["run", "u1", "u2"]


async def test_a_waiter_that_gives_up_leaves_its_tenants_queue_and_the_count() -> None:
    q = AdmissionQueue(capacity=4, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=0.5)
    s = Slots(q)
    await s.arrive("a0", A)
    await s.arrive("b1", B)
    waiter = asyncio.create_task(q.slot(5.0, A).__aenter__())
    await settle()
    assert q.waiting("a") == 1 and q.depth == 2
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert q.waiting("a") == 0 and q.depth == 1
    await s.finish_all_in_turn()
    assert s.admitted == ["a0", "b1"] and q.in_flight == 0 and q.depth == 0


async def test_with_one_tenant_it_is_the_fifo_queue() -> None:
    s = Slots(AdmissionQueue(capacity=10, concurrency=2, policy=ShedPolicy.REJECT_NEW, retry_after=1.0))
    for i in range(7):
        await s.arrive(f"c{i}", A)
    await s.finish_all_in_turn()
    assert s.admitted == [f"c{i}" for i in range(7)]


async def test_refusal_tells_what_admission_would_do_and_changes_nothing() -> None:
    q = AdmissionQueue(capacity=2, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=0.5, stage="stream")
    s = Slots(q)
    assert q.refusal(A) is None, "a free slot"
    for name in ("a0", "a1", "a2"):
        await s.arrive(name, A)  # a0 runs; a1 and a2 fill the queue
    before = (q.depth, q.in_flight, q.counters.rejected, q.counters.dropped)
    refused = q.refusal(A)
    assert refused is not None and str(refused) == "stage stream: queue full (2 waiting, 1 running)"
    assert refused.retry_after == 0.5
    assert q.refusal(B) is None, "a light tenant would take the heavy one's newest place"
    assert (q.depth, q.in_flight, q.counters.rejected, q.counters.dropped) == before
    await s.arrive("b0", B)
    assert "b0" not in s.shed and "dropped" in str(s.shed["a2"]), "admission did what refusal said"
    await s.finish_all_in_turn()
    drop = AdmissionQueue(capacity=1, concurrency=1, policy=ShedPolicy.DROP_OLDEST, retry_after=0.5)
    d = Slots(drop)
    for name in ("a0", "a1"):
        await d.arrive(name, A)
    assert drop.refusal(A) is None, "drop-oldest: its own oldest makes room"
    await d.finish_all_in_turn()
