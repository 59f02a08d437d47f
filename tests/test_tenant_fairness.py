"""A tenant flooding the gateway at 10x its capacity does not starve a tenant calling at 10% of it: every
one of B's calls is admitted, none refused, taking the places of A's waiting calls. How long B
waits, alone and during the flood, is the benchmark's to measure (`python -m bench.fairness`): a ratio of
latencies on a handful of calls is no assertion."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from promptpipe.contract.spec import StageName
from promptpipe.waiting import wait_until_async
from tests.support.calls import stats
from tests.support.fairness import (
    CALL_SECONDS,
    CAPACITY_PER_SECOND,
    WAITING,
    fairness_pipeline,
    first_token_seconds,
    start_flood,
)
from tests.support.pipelines import tenant_keys

pytestmark = pytest.mark.processes

B_CALLS = 12


@pytest.fixture
def tenants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """The keys of tenant A (`flood`) and tenant B (`light`)."""
    keys = tenant_keys(tmp_path, monkeypatch, "flood", "light")
    return keys["flood"], keys["light"]


def test_a_flooding_tenant_cannot_starve_a_light_one(start_pipeline, tenants: tuple[str, str]) -> None:
    a, b = tenants
    p = start_pipeline(fairness_pipeline())
    every = 1 / (0.1 * CAPACITY_PER_SECOND)  # B at 10% of capacity

    flood = start_flood(p.gateway, a, 10 * CAPACITY_PER_SECOND, seconds=10)
    errors = asyncio.run(_once_the_queue_is_full(p.stats_target(StageName.STREAM), p.gateway, b, every))
    outcomes = flood.outcomes()

    # The flood was one: most of A's calls were refused at once.
    assert outcomes.get("RESOURCE_EXHAUSTED", 0) > 2 * outcomes.get("OK", 0), outcomes
    assert not errors, errors  # every one of B's calls admitted and answered, none refused
    calls = "promptpipe_gateway_tenant_calls_total"
    assert p.metric(StageName.STREAM, calls, tenant="light", outcome="admitted") == B_CALLS
    # B's calls found the queue full of A's and took the places of A's waiters, which were dropped for them
    # (A's own newcomers are refused, never dropped, under reject-new): B went ahead of A's queue.
    assert p.metric(StageName.STREAM, "promptpipe_stage_shed_total", reason="dropped") >= 1


async def _once_the_queue_is_full(stats_target: str, target: str, key: str, every: float) -> list[str]:
    async def full() -> bool:
        return (await stats(stats_target)).queue_depth >= WAITING

    await wait_until_async(full, "the flood to fill the gateway's queue", timeout=30, every=0.05)
    _, errors = await first_token_seconds(target, key, B_CALLS, every)
    return errors


# Behind the gateway: the gateway admits many calls at once, and inference (one call at a time, 4 waiting) is
# where the flood queues.
INFERENCE_WAITING = 4


def test_a_flooding_tenant_cannot_get_a_light_ones_calls_shed_behind_the_gateway(
    start_pipeline, tenants: tuple[str, str]
) -> None:
    a, b = tenants
    doc = fairness_pipeline()
    doc["spec"]["stages"] = {
        "stream": {"queue": {"concurrency": 64, "capacity": 64}},
        "inference": {"queue": {"concurrency": 1, "capacity": INFERENCE_WAITING}},
    }
    p = start_pipeline(doc)
    inference_per_second = 1 / CALL_SECONDS

    flood = start_flood(p.gateway, a, 10 * inference_per_second, seconds=10)
    errors = asyncio.run(_once_inference_is_full(p.stats_target(StageName.INFERENCE), p.gateway, b))
    outcomes = flood.outcomes()

    assert outcomes.get("RESOURCE_EXHAUSTED", 0) > outcomes.get("OK", 0), outcomes  # the flood was one
    assert not errors, errors  # every one of B's calls answered, none shed at inference
    # B's calls found inference's queue full of A's and took the places of A's waiters there.
    assert p.metric(StageName.INFERENCE, "promptpipe_stage_shed_total", reason="dropped") >= 1


async def _once_inference_is_full(stats_target: str, target: str, key: str) -> list[str]:
    async def full() -> bool:
        return (await stats(stats_target)).queue_depth >= INFERENCE_WAITING

    await wait_until_async(full, "the flood to fill inference's queue", timeout=30, every=0.05)
    _, errors = await first_token_seconds(target, key, 8, every=0.5)
    return errors
