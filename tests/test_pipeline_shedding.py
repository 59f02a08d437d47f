"""Bounded queues under real processes: reject-new, drop-oldest, gateway admission."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from promptpipe.contract.spec import StageName
from promptpipe.waiting import wait_until_async
from tests.support.calls import Outcome, collect, queue_depth, stats
from tests.support.pipelines import RunningPipeline, synthetic_pipeline

pytestmark = pytest.mark.processes

# 40 tokens at 40 tokens/s: each call holds the inference slot for about a second.
SLOW = {"model": {"synthetic": {"tokensPerSecond": 40}}, "generation": {"maxNewTokens": 40}}


def one_slot_inference(policy: str) -> dict[str, object]:
    return synthetic_pipeline(
        **SLOW,
        stages={
            "inference": {"queue": {"capacity": 1, "concurrency": 1, "shedPolicy": policy, "retryAfterSeconds": 0.25}}
        },
    )


async def one_running_one_queued(p: RunningPipeline) -> tuple[asyncio.Task[Outcome], asyncio.Task[Outcome], str]:
    """Call a streaming in inference's one slot, call b waiting in its queue; and inference's address."""
    inference = p.target(StageName.INFERENCE)
    running = Outcome()
    a = asyncio.create_task(collect(p.gateway, "a", running))
    await asyncio.wait_for(running.first_chunk.wait(), 10)
    b = asyncio.create_task(collect(p.gateway, "b"))
    await wait_until_async(lambda: queue_depth(inference), what="b to be queued")
    return a, b, inference


async def test_full_queue_rejects_new_call_at_once_with_retry_hint(start_pipeline) -> None:
    p = start_pipeline(one_slot_inference("reject-new"))
    a, b, inference = await one_running_one_queued(p)

    rejected = await collect(p.gateway, "c")

    assert rejected.error is not None and rejected.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "stage inference: queue full" in rejected.error.message
    assert rejected.error.retry_after == pytest.approx(0.25)
    assert rejected.chunks == 0
    assert not a.done(), "the rejection must not wait for the running call"
    first, second = await asyncio.gather(a, b)
    for done in (first, second):
        assert done.error is None and done.summary is not None
        assert done.summary.usage.completion_tokens == 40
    s = await stats(inference)
    assert (s.rejected_total, s.dropped_total) == (1, 0)
    assert p.metric(StageName.INFERENCE, "promptpipe_stage_shed_total", reason="rejected") == 1


async def test_drop_oldest_ends_the_dropped_call_explicitly(start_pipeline) -> None:
    p = start_pipeline(one_slot_inference("drop-oldest"))
    a, oldest, inference = await one_running_one_queued(p)

    newest = asyncio.create_task(collect(p.gateway, "c"))
    dropped = await asyncio.wait_for(oldest, 5)

    assert dropped.error is not None and dropped.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "drop-oldest" in dropped.error.message
    assert dropped.chunks == 0
    assert not a.done()
    for done in await asyncio.gather(a, newest):
        assert done.error is None and done.summary is not None
    s = await stats(inference)
    assert (s.rejected_total, s.dropped_total) == (0, 1)


async def test_gateway_admission_rejects_before_any_stage_is_called(start_pipeline) -> None:
    p = start_pipeline(synthetic_pipeline(**SLOW, stages={"stream": {"queue": {"capacity": 0, "concurrency": 1}}}))
    running = Outcome()
    a = asyncio.create_task(collect(p.gateway, "a", running))
    await asyncio.wait_for(running.first_chunk.wait(), 10)

    rejected = await collect(p.gateway, "b")

    assert rejected.error is not None and rejected.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stats(p.stats_target(StageName.STREAM))).rejected_total == 1
    assert (await stats(p.target(StageName.RAG))).completed_total == 1, "only the admitted call reached rag"
    assert (await a).summary is not None


async def test_every_call_of_a_surge_ends_with_tokens_or_a_status(start_pipeline) -> None:
    p = start_pipeline(
        synthetic_pipeline(
            model={"synthetic": {"tokensPerSecond": 200}},
            generation={"maxNewTokens": 20},
            stages={"inference": {"queue": {"capacity": 4, "concurrency": 2}}},
        )
    )
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(p.gateway, f"q{i}", timeout=20.0) for i in range(40))), 30
    )
    ok = [r for r in results if r.summary is not None]
    shed = [r for r in results if r.error is not None]
    assert len(ok) + len(shed) == 40
    assert ok and shed
    assert all(r.summary.usage.completion_tokens == 20 for r in ok)  # type: ignore[union-attr]
    assert all(r.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED for r in shed)  # type: ignore[union-attr]


async def test_a_call_expected_to_wait_past_the_cap_is_refused_at_once_and_counted(start_pipeline) -> None:
    # One inference slot, about a second a call; waiting is capped at 1.5 s: with a call running, one more
    # may wait (about a second away), a second one would wait about two.
    p = start_pipeline(
        synthetic_pipeline(
            **SLOW,
            stages={"inference": {"queue": {"capacity": 4, "concurrency": 1, "maxWaitMilliseconds": 1500}}},
        )
    )
    first = await collect(p.gateway, "warm")  # the stage learns how long a slot is held
    assert first.error is None
    a, b, _ = await one_running_one_queued(p)

    refused = await collect(p.gateway, "c")

    assert refused.error is not None and refused.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "stage inference: expected wait " in refused.error.message
    assert "over queue.maxWaitMilliseconds 1500" in refused.error.message
    assert refused.error.retry_after is not None and refused.error.retry_after >= 0.5
    assert refused.chunks == 0 and not a.done(), "refused at once, not after waiting"
    for done in await asyncio.gather(a, b):
        assert done.error is None and done.summary is not None
    assert p.metric(StageName.INFERENCE, "promptpipe_stage_shed_total", reason="wait_cap") == 1
