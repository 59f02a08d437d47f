"""The admission broker: workers' queues borrow the stage's one queue over a Unix socket (real sockets,
one process: each BrokeredQueue stands for a worker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from promptpipe.contract.spec import QueueSpec, ShedPolicy
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.broker import AdmissionBroker, BrokeredQueue
from promptpipe.runtime.errors import DeadlineExceeded, Shed, Unavailable

SPEC = QueueSpec(capacity=2, concurrency=2, shed_policy=ShedPolicy.REJECT_NEW, retry_after_seconds=0.25)


class Stage:
    def __init__(self, broker: AdmissionBroker, path: str) -> None:
        self.broker = broker
        self.path = path
        self.workers: list[BrokeredQueue] = []

    async def worker(self) -> BrokeredQueue:
        queue = BrokeredQueue(SPEC)
        await queue.connect(self.path)
        self.workers.append(queue)
        return queue


@pytest.fixture
async def stage(tmp_path: Path) -> AsyncIterator[Stage]:
    queue = AdmissionQueue(SPEC.capacity, SPEC.concurrency, SPEC.shed_policy, SPEC.retry_after_seconds)
    broker = AdmissionBroker(queue)
    path = str(tmp_path / "admission.sock")
    await broker.start(path)
    s = Stage(broker, path)
    yield s
    for w in s.workers:
        await w.close()
    await broker.close()


async def hold(queue: BrokeredQueue, release: asyncio.Event, log: list[str], name: str) -> None:
    async with queue.slot(5.0):
        log.append(name)
        await release.wait()


async def until(check: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_the_limits_hold_for_the_stage_across_workers(stage: Stage) -> None:
    one, two = await stage.worker(), await stage.worker()
    release = asyncio.Event()
    log: list[str] = []
    # Two run and two wait, whichever worker they came in on; the fifth is refused at once.
    tasks = [asyncio.create_task(hold(w, release, log, n)) for w, n in zip((one, two, one, two), "abcd", strict=True)]
    await until(lambda: stage.broker.queue.depth == 2)
    assert len(log) == 2 and stage.broker.queue.in_flight == 2
    with pytest.raises(Shed) as refused:
        async with two.slot(5.0):
            pass
    assert refused.value.retry_after == 0.25 and refused.value.reason == "rejected"
    stats = await one.stats()
    assert stats["depth"] == 2 and stats["in_flight"] == 2 and stats["rejected"] == 1
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(log) == ["a", "b", "c", "d"]
    await until(lambda: stage.broker.queue.in_flight == 0)
    assert (await two.stats())["completed"] == 4


async def test_a_wait_is_bounded_by_the_deadline(stage: Stage) -> None:
    worker = await stage.worker()
    release = asyncio.Event()
    running = [asyncio.create_task(hold(worker, release, [], n)) for n in "ab"]
    await until(lambda: stage.broker.queue.in_flight == 2)
    with pytest.raises(DeadlineExceeded):
        async with worker.slot(0.05):
            pass
    assert stage.broker.queue.depth == 0
    release.set()
    await asyncio.gather(*running)


async def test_a_worker_that_gives_up_leaves_the_queue_and_one_that_dies_frees_its_slots(stage: Stage) -> None:
    one, two = await stage.worker(), await stage.worker()
    release = asyncio.Event()
    running = [asyncio.create_task(hold(one, release, [], n)) for n in "ab"]
    await until(lambda: stage.broker.queue.in_flight == 2)
    waiting = asyncio.create_task(hold(two, release, [], "c"))
    await until(lambda: stage.broker.queue.depth == 1)
    waiting.cancel()  # the call's client left while it waited
    await until(lambda: stage.broker.queue.depth == 0)

    await one.close()  # the worker holding both slots dies
    await until(lambda: stage.broker.queue.in_flight == 0)
    log: list[str] = []
    release.set()
    await hold(two, release, log, "d")
    assert log == ["d"], "the dead worker's slots went back to the stage"
    await asyncio.gather(*running)


async def test_with_the_broker_gone_a_call_is_refused_unavailable_not_left_waiting(stage: Stage) -> None:
    worker = await stage.worker()
    release = asyncio.Event()
    running = [asyncio.create_task(hold(worker, release, [], n)) for n in "ab"]
    await until(lambda: stage.broker.queue.in_flight == 2)
    waiting = asyncio.create_task(hold(worker, release, [], "c"))
    await until(lambda: stage.broker.queue.depth == 1)
    await stage.broker.close()  # the supervisor went away
    with pytest.raises(Unavailable):
        async with asyncio.timeout(5):
            await waiting
    with pytest.raises(Unavailable):
        async with worker.slot(5.0):
            pass
    release.set()
    await asyncio.gather(*running, return_exceptions=True)
