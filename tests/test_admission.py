"""The bounded admission queue, driven directly."""

from __future__ import annotations

import asyncio

import pytest

from promptpipe.contract.spec import ShedPolicy
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.errors import DeadlineExceeded, Shed


async def hold(
    queue: AdmissionQueue, release: asyncio.Event, log: list[str], name: str, timeout: float | None = 5.0
) -> None:
    async with queue.slot(timeout):
        log.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_runs_up_to_concurrency_then_queues_in_order() -> None:
    q = AdmissionQueue(capacity=2, concurrency=2, policy=ShedPolicy.REJECT_NEW, retry_after=1.0)
    release = asyncio.Event()
    log: list[str] = []
    tasks = [asyncio.create_task(hold(q, release, log, n)) for n in "abcd"]
    await settle()
    assert log == ["a", "b"] and q.in_flight == 2 and q.depth == 2
    release.set()
    await asyncio.gather(*tasks)
    assert log == ["a", "b", "c", "d"]
    assert q.in_flight == 0 and q.depth == 0 and q.counters.completed == 4


async def test_reject_new_refuses_at_once_when_full() -> None:
    q = AdmissionQueue(capacity=1, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=0.5)
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(q, release, [], n)) for n in "ab"]
    await settle()
    with pytest.raises(Shed) as info:
        async with q.slot(5.0):
            pass
    assert info.value.retry_after == 0.5 and info.value.reason == "rejected"
    assert q.counters.rejected == 1
    release.set()
    await asyncio.gather(*tasks)


async def test_drop_oldest_fails_the_longest_waiter_and_admits_the_newcomer() -> None:
    q = AdmissionQueue(capacity=2, concurrency=1, policy=ShedPolicy.DROP_OLDEST, retry_after=0.5)
    release = asyncio.Event()
    log: list[str] = []
    running = asyncio.create_task(hold(q, release, log, "run"))
    await settle()
    oldest = asyncio.create_task(hold(q, release, log, "old"))
    middle = asyncio.create_task(hold(q, release, log, "mid"))
    await settle()
    newest = asyncio.create_task(hold(q, release, log, "new"))
    await settle()
    with pytest.raises(Shed) as info:
        await oldest
    assert info.value.reason == "dropped"
    release.set()
    await asyncio.gather(running, middle, newest)
    assert log == ["run", "mid", "new"]
    assert q.counters.dropped == 1


async def test_waiting_is_bounded_by_the_deadline() -> None:
    q = AdmissionQueue(capacity=4, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=0.5)
    release = asyncio.Event()
    running = asyncio.create_task(hold(q, release, [], "a"))
    await settle()
    with pytest.raises(DeadlineExceeded):
        async with q.slot(0.05):
            pass
    assert q.depth == 0, "a timed-out waiter leaves the queue"
    release.set()
    await running
    assert q.in_flight == 0


async def test_cancelled_waiter_leaves_and_its_slot_goes_to_the_next() -> None:
    q = AdmissionQueue(capacity=4, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=0.5)
    release = asyncio.Event()
    log: list[str] = []
    running = asyncio.create_task(hold(q, release, log, "a"))
    await settle()
    cancelled = asyncio.create_task(hold(q, release, log, "b"))
    waiting = asyncio.create_task(hold(q, release, log, "c"))
    await settle()
    cancelled.cancel()
    await settle()
    assert q.depth == 1
    release.set()
    await asyncio.gather(running, waiting)
    assert log == ["a", "c"] and q.in_flight == 0


async def test_slot_handed_to_a_waiter_that_was_cancelled_meanwhile_is_not_lost() -> None:
    q = AdmissionQueue(capacity=4, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=0.5)
    release = asyncio.Event()
    log: list[str] = []
    running = asyncio.create_task(hold(q, release, log, "a"))
    await settle()
    b = asyncio.create_task(hold(q, release, log, "b"))
    c = asyncio.create_task(hold(q, release, log, "c"))
    await settle()
    release.set()
    await running  # hands the slot to b ...
    b.cancel()  # ... which is cancelled before it runs
    await asyncio.gather(b, c, return_exceptions=True)
    # The cancel is honoured (asyncio.wait_for on Python 3.11 would swallow it and run b for nobody).
    assert b.cancelled() and log == ["a", "c"]
    assert q.in_flight == 0 and q.depth == 0
