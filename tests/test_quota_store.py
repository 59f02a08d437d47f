"""A tenant's quota held across the gateway's replicas: the buckets in Debian's redis-server (real, with a
password), shared by several gateways; and what each does while the store is gone or hung, failing open
(this pod's own buckets) or closed (UNAVAILABLE), as `auth.quotaStore.onUnreachable` says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from prometheus_client import CollectorRegistry

from promptpipe.client import GenerationError, PipelineClient
from promptpipe.contract.spec import AuthSpec, ShedPolicy, StageName
from promptpipe.gateway.quota_store import FLUSH_SECONDS, RETRY_SECONDS, QuotaStoreUnreachable, SharedTenancy
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.errors import QuotaExceeded
from tests.support.pipelines import synthetic_pipeline, tenant_keys
from tests.support.redis_store import RedisServer

HELLO = [{"role": "user", "content": "hello there"}]
Gateways = Callable[..., AbstractAsyncContextManager[list[SharedTenancy]]]


def auth(**store: Any) -> AuthSpec:
    return AuthSpec.model_validate(
        {
            "tenants": [
                {"name": "alice", "requestsPerMinute": 10},
                {"name": "bob", "tokensPerMinute": 100},
                {"name": "carol", "requestsPerMinute": 3},
            ],
            "quotaStore": store,
        }
    )


@pytest.fixture
def gateways(quota_store: RedisServer) -> Gateways:
    """`n` gateways' tenancies on the one store, as `n` replicas of one pipeline's gateway keep them."""

    @asynccontextmanager
    async def make(
        n: int, url: str | None = None, pipeline: str = "ns/p", **store: Any
    ) -> AsyncIterator[list[SharedTenancy]]:
        spec = auth(**store)
        queue = AdmissionQueue(8, 1, ShedPolicy.REJECT_NEW, 1.0)
        made = [
            SharedTenancy.create(url or quota_store.url, pipeline, spec, CollectorRegistry(), "p", queue)
            for _ in range(n)
        ]
        try:
            yield made
        finally:
            for each in made:
                await each.close()

    return make


async def admitted(tenancy: SharedTenancy, tenant: str) -> bool:
    try:
        await tenancy.charge(tenant)
    except QuotaExceeded:
        return False
    return True


@pytest.mark.redis
async def test_three_gateways_on_one_store_admit_a_tenant_its_quota_once_not_three_times(gateways: Gateways) -> None:
    async with gateways(3) as pods:
        outcomes = [await admitted(pods[i % 3], "alice") for i in range(30)]
    # Each pod alone would admit 10 (its own bucket): 30. Shared: 10 (a sixth of one refills a second).
    assert sum(outcomes) == 10 and all(outcomes[:10]) and not any(outcomes[10:])


@pytest.mark.redis
async def test_the_refusal_names_the_bucket_and_when_it_refills_on_the_stores_clock(gateways: Gateways) -> None:
    async with gateways(2) as (one, two):
        for _ in range(3):
            await one.charge("carol")
        with pytest.raises(QuotaExceeded) as err:
            await two.charge("carol")
    # 3 a minute: one refills in 20 s.
    assert err.value.limit == "requests" and err.value.tenant == "carol"
    assert 19 <= err.value.retry_after <= 20
    assert "requests per minute used up (3)" in err.value.message


@pytest.mark.redis
async def test_tokens_one_gateway_streams_are_charged_to_the_tenant_at_every_gateway(gateways: Gateways) -> None:
    async with gateways(2) as (one, two):
        await one.charge("bob")
        one.used("bob", 120)  # a call on `one` streamed past bob's 100 a minute
        # Sent within FLUSH_SECONDS, without another call of bob's on `one`.
        await asyncio.sleep(FLUSH_SECONDS * 2)
        with pytest.raises(QuotaExceeded) as err:
            await two.charge("bob")
    assert err.value.limit == "tokens"
    # 21 tokens short (100 - 120 plus what refilled meanwhile, about 1): about 12 s at 100 a minute.
    assert 10 <= err.value.retry_after <= 13


@pytest.mark.redis
async def test_tokens_used_go_with_the_tenants_next_call_before_any_flush(gateways: Gateways) -> None:
    async with gateways(1) as (one,):
        await one.charge("bob")
        one.used("bob", 150)
        with pytest.raises(QuotaExceeded):
            await one.charge("bob")  # at once: the 150 went with this call's script run


@pytest.mark.redis
async def test_two_pipelines_on_one_store_keep_their_buckets_apart(gateways: Gateways) -> None:
    async with gateways(1, pipeline="ns/a") as (a,), gateways(1, pipeline="ns/b") as (b,):
        for _ in range(3):
            await a.charge("carol")
        assert not await admitted(a, "carol")
        assert await admitted(b, "carol")  # another pipeline's carol


@pytest.mark.redis
async def test_store_gone_fails_open_to_this_pods_own_buckets_and_shares_again_when_back(
    gateways: Gateways, quota_store: RedisServer
) -> None:
    async with gateways(2, onUnreachable="open", timeoutMilliseconds=100) as (one, two):
        await one.charge("carol")  # 1 of 3 used, in the store and in `one`'s own bucket
        quota_store.stop()
        started = time.monotonic()
        # `one` falls back to its own bucket, which has seen its call: 2 more; `two`'s own is full: 3.
        assert [await admitted(one, "carol") for _ in range(3)] == [True, True, False]
        assert [await admitted(two, "carol") for _ in range(4)] == [True, True, True, False]
        # Never waiting on a dead store: one timeout at most, then not asked again for RETRY_SECONDS.
        assert time.monotonic() - started < 5
        quota_store.start()
        await asyncio.sleep(RETRY_SECONDS)
        # The store is empty again (it kept nothing on disk): the shared bucket starts full.
        assert [await admitted(one, "carol") for _ in range(4)] == [True, True, True, False]
        assert not await admitted(two, "carol")


@pytest.mark.redis
async def test_store_hung_fails_closed_with_unavailable_within_the_timeout(
    gateways: Gateways, quota_store: RedisServer
) -> None:
    async with gateways(1, onUnreachable="closed", timeoutMilliseconds=200) as (one,):
        await one.charge("alice")
        quota_store.hang()
        try:
            started = time.monotonic()
            with pytest.raises(QuotaStoreUnreachable) as err:
                await one.charge("alice")
            waited = time.monotonic() - started
            with pytest.raises(QuotaStoreUnreachable):
                await one.charge("alice")  # not asked again: refused at once
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
            assert "quota store is unreachable" in err.value.message
            # About the timeout, not a hang (a hung store answers nothing, ever).
            assert waited < 3
            # A tenant without a quota needs no store.
            await one.charge("dave")
        finally:
            quota_store.resume()


@pytest.mark.redis
async def test_a_wrong_password_counts_as_unreachable_not_as_admitted(
    gateways: Gateways, quota_store: RedisServer
) -> None:
    wrong = quota_store.url.replace(quota_store.password, "not-the-password")
    async with gateways(1, url=wrong, onUnreachable="closed") as (one,):
        with pytest.raises(QuotaStoreUnreachable):
            await one.charge("alice")


@pytest.mark.redis
async def test_tokens_used_while_the_store_is_gone_are_sent_once_it_is_back(
    gateways: Gateways, quota_store: RedisServer
) -> None:
    async with gateways(2, onUnreachable="open", timeoutMilliseconds=100) as (one, two):
        await one.charge("bob")
        quota_store.stop()
        one.used("bob", 150)
        await asyncio.sleep(FLUSH_SECONDS * 2)  # the flush fails; the 150 are kept
        quota_store.start()
        await asyncio.sleep(RETRY_SECONDS)
        await one.flush()
        with pytest.raises(QuotaExceeded):
            await two.charge("bob")


# Three real gateway processes of one local pipeline, on one store, called over gRPC.


@pytest.fixture
def alice_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return tenant_keys(tmp_path, monkeypatch, "alice")["alice"]


async def outcome(address: str, key: str) -> str:
    try:
        async with PipelineClient(address, key) as client:
            async for _ in client.generate("hello there", timeout=10):
                pass
    except GenerationError as exc:
        return exc.code.name
    return "OK"


@pytest.mark.redis
def test_three_gateway_processes_give_a_tenant_its_requests_per_minute_once(
    start_pipeline, alice_key: str, quota_store: RedisServer, tmp_path: Path
) -> None:
    doc = synthetic_pipeline(auth={"tenants": [{"name": "alice", "requestsPerMinute": 6}], "quotaStore": {}})
    p = start_pipeline(doc)
    env = {"PROMPTPIPE_QUOTA_STORE_URL": quota_store.url}
    # `promptpipe up`'s own gateway has no store URL (its own buckets): the three here all do.
    with p.more_gateways(3, tmp_path, **env) as served:

        async def calls() -> list[str]:
            return [await outcome(served[i % 3][0], alice_key) for i in range(18)]

        got = asyncio.run(calls())
    # Each process alone admits 6 (18 in all); on the store, 6, and a tenth of one refills a second.
    assert got.count("OK") in (6, 7), got
    assert set(got) == {"OK", "RESOURCE_EXHAUSTED"}
    assert got[:6] == ["OK"] * 6


@pytest.mark.redis
def test_the_gateway_process_fails_closed_over_grpc_and_http_alike(
    start_pipeline, alice_key: str, quota_store: RedisServer, tmp_path: Path
) -> None:
    doc = synthetic_pipeline(
        auth={"tenants": [{"name": "alice", "requestsPerMinute": 60}], "quotaStore": {"onUnreachable": "closed"}}
    )
    p = start_pipeline(doc)
    with p.more_gateways(1, tmp_path, PROMPTPIPE_QUOTA_STORE_URL=quota_store.url) as [(address, base_url)]:
        sdk = openai.OpenAI(base_url=base_url, api_key=alice_key, max_retries=0)
        assert asyncio.run(outcome(address, alice_key)) == "OK"
        assert sdk.chat.completions.create(model="synthetic", messages=HELLO).choices[0].message.content  # type: ignore[arg-type]
        quota_store.stop()
        assert asyncio.run(outcome(address, alice_key)) == "UNAVAILABLE"
        with pytest.raises(openai.InternalServerError) as err:
            sdk.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
        assert err.value.status_code == 503 and "quota store is unreachable" in err.value.message
        assert p.metric(StageName.STREAM, "promptpipe_stage_queue_depth") == 0
        quota_store.start()
        time.sleep(RETRY_SECONDS)
        assert asyncio.run(outcome(address, alice_key)) == "OK"


@pytest.mark.redis
def test_promptpipe_up_gives_the_store_url_to_its_gateway_and_to_no_other_stage(
    start_pipeline, alice_key: str, quota_store: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMPTPIPE_QUOTA_STORE_URL", quota_store.url)
    doc = synthetic_pipeline(auth={"tenants": [{"name": "alice", "requestsPerMinute": 2}], "quotaStore": {}})
    p = start_pipeline(doc)
    got = [asyncio.run(outcome(p.gateway, alice_key)) for _ in range(3)]
    assert got == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    assert p.metric(StageName.STREAM, "promptpipe_gateway_quota_store_up") == 1
    # The buckets are in the store: alice's, under this pipeline's key.
    client = quota_store.client()
    try:
        assert client.keys("promptpipe:quota:{default/t}:alice") == [b"promptpipe:quota:{default/t}:alice"]
    finally:
        client.close()
    for stage in (StageName.RAG, StageName.ASSEMBLE, StageName.INFERENCE, StageName.POST):
        environ = Path(f"/proc/{p.pid(stage)}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"PROMPTPIPE_QUOTA_STORE_URL=") for v in environ), stage
