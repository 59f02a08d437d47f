"""Per-tenant quotas on a running gateway, with the real clients: 429 on HTTP (the openai SDK's
RateLimitError, honouring Retry-After), RESOURCE_EXHAUSTED with a QuotaFailure on gRPC; other tenants
unaffected; the refusals counted per tenant."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from promptpipe.client import GenerationError, PipelineClient
from promptpipe.contract.spec import StageName
from tests.support.pipelines import RunningPipeline, synthetic_pipeline, tenant_keys

pytestmark = pytest.mark.processes

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def tenants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return tenant_keys(tmp_path, monkeypatch, "small", "thrifty", "big")


def quota_pipeline() -> dict[str, object]:
    return synthetic_pipeline(
        auth={
            "defaultQuota": {"requestsPerMinute": 2},
            "tenants": [
                {"name": "thrifty", "tokensPerMinute": 30},
                {"name": "big", "requestsPerMinute": 1000},
            ],
        }
    )


async def grpc_call(p: RunningPipeline, key: str) -> str:
    async with PipelineClient(p.gateway, key) as client:
        return "".join([r.chunk.text async for r in client.generate("hello there", timeout=10)])


def test_a_tenant_over_its_requests_per_minute_gets_429_from_the_openai_sdk_and_others_go_on(
    start_pipeline, tenants: dict[str, str]
) -> None:
    p = start_pipeline(quota_pipeline())
    small = openai.OpenAI(base_url=p.openai_base_url, api_key=tenants["small"], max_retries=0)
    for _ in range(2):
        assert small.chat.completions.create(model="synthetic", messages=HELLO).choices[0].message.content  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as err:
        small.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
    assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
    assert err.value.type == "requests" and "requests per minute used up (2)" in err.value.message
    # One token refills in 30 s: the header says so, in whole seconds and in milliseconds.
    assert 28 <= int(err.value.response.headers["Retry-After"]) <= 30
    assert 28_000 <= int(err.value.response.headers["retry-after-ms"]) <= 30_000
    big = openai.OpenAI(base_url=p.openai_base_url, api_key=tenants["big"], max_retries=0)
    for _ in range(5):
        assert big.chat.completions.create(model="synthetic", messages=HELLO).choices[0].message.content  # type: ignore[arg-type]
    # The refusal took no place in the queue: only the admitted calls waited for a slot.
    assert p.metric(StageName.STREAM, "promptpipe_stage_queue_wait_seconds_count") == 7
    calls = "promptpipe_gateway_tenant_calls_total"
    assert p.metric(StageName.STREAM, calls, tenant="small", outcome="admitted") == 2
    assert p.metric(StageName.STREAM, calls, tenant="small", outcome="over_requests_quota") == 1
    assert p.metric(StageName.STREAM, calls, tenant="big", outcome="admitted") == 5


def test_on_grpc_the_same_refusal_is_resource_exhausted_naming_the_quota_with_its_retry_hint(
    start_pipeline, tenants: dict[str, str]
) -> None:
    p = start_pipeline(quota_pipeline())
    for _ in range(2):
        assert asyncio.run(grpc_call(p, tenants["small"]))
    with pytest.raises(GenerationError) as err:
        asyncio.run(grpc_call(p, tenants["small"]))
    assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.quota == "tenant:small requests per minute"
    assert err.value.retry_after is not None and 28 <= err.value.retry_after <= 30


def test_tokens_per_minute_are_charged_what_a_call_used_and_refuse_the_next_call(
    start_pipeline, tenants: dict[str, str]
) -> None:
    p = start_pipeline(quota_pipeline())
    thrifty = openai.OpenAI(base_url=p.openai_base_url, api_key=tenants["thrifty"], max_retries=0)
    first = thrifty.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
    assert first.usage is not None and first.usage.total_tokens > 30  # the call may overdraw the bucket once
    with pytest.raises(openai.RateLimitError) as err:
        thrifty.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
    assert err.value.type == "tokens"
    charged = p.metric(StageName.STREAM, "promptpipe_gateway_tenant_tokens_total", tenant="thrifty")
    assert charged == first.usage.total_tokens


def test_the_openai_sdk_retries_a_429_after_the_retry_after_it_was_given(
    start_pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tenant_keys(tmp_path, monkeypatch, "fast")["fast"]
    # 120 a minute: after the first two, one more every half second.
    p = start_pipeline(synthetic_pipeline(auth={"defaultQuota": {"requestsPerMinute": 120}}))
    attempts: list[tuple[int, str | None]] = []

    def count(response: Any) -> None:
        attempts.append((response.status_code, response.headers.get("retry-after-ms")))

    client = openai.OpenAI(
        base_url=p.openai_base_url,
        api_key=key,
        max_retries=3,
        http_client=openai.DefaultHttpxClient(event_hooks={"response": [count]}),
    )
    once = client.with_options(max_retries=0)
    for _ in range(1000):  # drain the bucket
        try:
            once.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
        except openai.RateLimitError:
            break
    else:
        pytest.fail("the bucket never ran dry")
    attempts.clear()
    started = time.monotonic()
    assert client.chat.completions.create(model="synthetic", messages=HELLO).choices[0].message.content  # type: ignore[arg-type]
    waited = time.monotonic() - started
    assert [code for code, _ in attempts] in ([429, 200], [429, 429, 200]), attempts
    told = int(attempts[0][1] or 0) / 1000
    assert 0 < told <= 0.5
    assert waited >= told * 0.9, (waited, told)  # it waited as told, not its own (shorter) backoff


async def leave_after_the_first_chunk(p: RunningPipeline, key: str, prompt: str) -> str:
    """A streamed call its client closes as soon as the first chunk arrives."""
    async with PipelineClient(p.gateway, key) as client:
        async for response in client.generate(prompt, timeout=30):
            if response.HasField("chunk"):
                return str(response.chunk.text)
    raise AssertionError("no chunk came")


def test_a_client_that_leaves_after_the_first_chunk_pays_for_its_prompt(start_pipeline, tenants) -> None:
    doc = synthetic_pipeline(
        model={"synthetic": {"tokensPerSecond": 20}},
        generation={"maxNewTokens": 200},
        template={"maxPromptTokens": 4096},
        auth={"tenants": [{"name": "thrifty", "tokensPerMinute": 2000}]},
    )
    p = start_pipeline(doc)
    prompt = "tell me more " * 600  # about 1,950 tokens by the synthetic backend's count (4 characters a token)
    assert asyncio.run(leave_after_the_first_chunk(p, tenants["thrifty"], prompt))
    charged = p.metric(StageName.STREAM, "promptpipe_gateway_tenant_tokens_total", tenant="thrifty")
    assert 1900 < charged < 2000, "the prompt was billed, and the chunk sent, not the answer never sent"
    # The bucket held 2,000 and the call left it about 50: admitted while not empty, the next call overdraws it,
    # and the one after is refused, though neither client waited for an answer.
    asyncio.run(leave_after_the_first_chunk(p, tenants["thrifty"], prompt))
    with pytest.raises(GenerationError) as err:
        asyncio.run(leave_after_the_first_chunk(p, tenants["thrifty"], prompt))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_call_the_full_gateway_would_refuse_is_refused_at_the_edge_and_not_charged(
    start_pipeline, tenants: dict[str, str]
) -> None:
    # One work slot and no queue at the gateway; "small" may make 2 calls a minute.
    p = start_pipeline(
        synthetic_pipeline(
            model={"synthetic": {"tokensPerSecond": 20}},
            generation={"maxNewTokens": 20},
            auth={"defaultQuota": {"requestsPerMinute": 2}},
            stages={"stream": {"queue": {"capacity": 0, "concurrency": 1}}},
        )
    )
    started = asyncio.Event()

    async def call() -> str:
        async with PipelineClient(p.gateway, tenants["small"]) as client:
            text = ""
            async for r in client.generate("hello there", timeout=30):
                text += r.chunk.text
                started.set()
            return text

    running = asyncio.create_task(call())  # the first of small's two: it holds the only slot for ~1 s
    await asyncio.wait_for(started.wait(), 10)
    for _ in range(5):
        with pytest.raises(GenerationError) as refused:
            await call()
        assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.quota is None
        assert "stage stream: queue full" in refused.value.message and refused.value.retry_after
    assert not running.done(), "refused at once, not after the running call"
    assert await running
    # Refused before the quota was charged: small's second call of the minute is still its own.
    assert await call()
    assert p.metric(StageName.STREAM, "promptpipe_stage_shed_total", reason="rejected") == 5
