"""The stage broker: workers' queues borrow the stage's one queue, and a gateway's workers its tenants'
quotas, over a Unix socket (real sockets, one process: each link stands for a worker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from promptpipe.contract import metrics as m
from promptpipe.contract.spec import AuthSpec, QueueSpec, ShedPolicy
from promptpipe.runtime.admission import AdmissionQueue, Flow
from promptpipe.runtime.broker import BrokeredQueue, BrokeredTenancy, BrokerLink, StageBroker
from promptpipe.runtime.errors import DeadlineExceeded, QuotaExceeded, Shed, Unavailable
from promptpipe.runtime.quotas import LocalTenancy

SPEC = QueueSpec(capacity=2, concurrency=2, shed_policy=ShedPolicy.REJECT_NEW, retry_after_seconds=0.25)
TOKENS = m.GATEWAY_TENANT_TOKENS.name


class Stage:
    def __init__(self, broker: StageBroker, path: str) -> None:
        self.broker = broker
        self.path = path
        self.links: list[BrokerLink] = []
        self.registry = CollectorRegistry()

    async def link(self) -> BrokerLink:
        link = BrokerLink()
        await link.connect(self.path)
        self.links.append(link)
        return link

    async def worker(self) -> BrokeredQueue:
        return BrokeredQueue(await self.link(), SPEC)


@pytest.fixture
async def stage(tmp_path: Path) -> AsyncIterator[Stage]:
    queue = AdmissionQueue.of(SPEC, "post")
    broker = StageBroker(queue)
    path = str(tmp_path / "admission.sock")
    await broker.start(path)
    s = Stage(broker, path)
    yield s
    for link in s.links:
        await link.close()
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
    # The broker grants two slots, then the grants reach their workers (a round trip later, under load).
    await until(lambda: stage.broker.queue.depth == 2 and len(log) == 2)
    assert stage.broker.queue.in_flight == 2
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

    await stage.links[0].close()  # the worker holding both slots dies
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


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Stage]:
    """A gateway's broker: its queue, and its tenants' quotas and metrics, kept by the supervisor."""
    queue = AdmissionQueue.of(SPEC, "stream")
    registry = CollectorRegistry()
    auth = AuthSpec.model_validate(
        {"tenants": [{"name": "acme", "requestsPerMinute": 3, "weight": 4, "priority": "high"}]}
        | {"defaultQuota": {"tokensPerMinute": 100}}
    )
    tenancy = LocalTenancy.create(auth, registry, "p", queue)
    broker = StageBroker(queue, tenancy, lambda: generate_latest(registry))
    path = str(tmp_path / "gateway.sock")
    await broker.start(path)
    s = Stage(broker, path)
    s.registry = registry
    yield s
    for link in s.links:
        await link.close()
    await broker.close()


async def test_a_tenants_quota_is_one_bucket_across_workers(gateway: Stage) -> None:
    one, two = BrokeredTenancy(await gateway.link()), BrokeredTenancy(await gateway.link())
    # acme may start 3 calls a minute: 3 are charged, whichever worker took them, then each is refused.
    flows = [await w.charge("acme") for w in (one, two, one)]
    assert flows == [Flow("acme", 4, 1)] * 3, "the call's flow is the tenant's, as the supervisor's quotas give it"
    for w in (two, one):
        with pytest.raises(QuotaExceeded) as refused:
            await w.charge("acme")
        assert refused.value.tenant == "acme" and refused.value.limit == "requests"
        assert "requests per minute used up (3)" in refused.value.message and refused.value.retry_after > 0
    exposition = (await gateway.links[1].metrics()).decode()  # what a worker's HTTP /metrics serves
    calls = {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == "promptpipe_gateway_tenant_calls_total" and s.labels["tenant"] == "acme"
    }
    assert calls == {"admitted": 3, "over_requests_quota": 2}, calls


async def test_tokens_a_worker_reports_are_charged_to_the_tenants_one_bucket(gateway: Stage) -> None:
    one, two = BrokeredTenancy(await gateway.link()), BrokeredTenancy(await gateway.link())
    await one.charge("bob")
    one.used("bob", 60)  # a call on one worker used 60 tokens, one on the other 50: the bucket of 100 is spent
    await two.charge("bob")
    two.used("bob", 50)
    await until(lambda: gateway.registry.get_sample_value(TOKENS, {"pipeline": "p", "tenant": "bob"}) == 110)
    with pytest.raises(QuotaExceeded) as refused:
        await one.charge("bob")
    assert refused.value.limit == "tokens"


async def test_a_worker_asking_for_metrics_the_supervisor_cannot_render_gets_the_reason_not_a_wait(
    tmp_path: Path,
) -> None:
    def broken() -> bytes:
        raise OSError("a worker's /metrics did not answer")

    queue = AdmissionQueue.of(SPEC, "stream")
    broker = StageBroker(queue, exposition=broken)
    path = str(tmp_path / "m.sock")
    await broker.start(path)
    link = BrokerLink()
    await link.connect(path)
    try:
        with pytest.raises(Unavailable, match="did not answer"):
            async with asyncio.timeout(5):
                await link.metrics()
    finally:
        await link.close()
        await broker.close()
