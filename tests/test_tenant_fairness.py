"""A tenant flooding the gateway at 10x its capacity does not starve a tenant calling at 10% of it: every
one of B's calls is admitted, and B's time to first token stays within 2x of what it is alone."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from promptpipe.contract.apikeys import hash_key, new_key
from promptpipe.contract.spec import StageName
from tests.support.fairness import CAPACITY_PER_SECOND, fairness_pipeline, first_token_seconds, start_flood

pytestmark = pytest.mark.processes


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def test_a_flooding_tenant_cannot_starve_a_light_one(
    start_pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = new_key(), new_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"flood: {hash_key(a)}\nlight: {hash_key(b)}\n")
    monkeypatch.setenv("PROMPTPIPE_API_KEYS_FILE", str(keys))
    p = start_pipeline(fairness_pipeline())
    every = 1 / (0.1 * CAPACITY_PER_SECOND)  # B at 10% of capacity

    alone, errors = asyncio.run(first_token_seconds(p.gateway, b, 8, every))
    assert not errors and len(alone) == 8

    flood = start_flood(p.gateway, a, 10 * CAPACITY_PER_SECOND, seconds=10)
    loaded, errors = asyncio.run(_after_a_second(p.gateway, b, every))
    outcomes = flood.outcomes()

    # The flood was one: most of A's calls were refused at once, and the queue was full all along.
    assert outcomes.get("RESOURCE_EXHAUSTED", 0) > 2 * outcomes.get("OK", 0), outcomes
    assert not errors, errors  # every one of B's calls admitted
    assert p99(loaded) <= 2 * p99(alone), (loaded, alone)
    calls = "promptpipe_gateway_tenant_calls_total"
    assert p.metric(StageName.STREAM, calls, tenant="light", outcome="admitted") == 20
    assert p.metric(StageName.STREAM, "promptpipe_stage_shed_total", reason="dropped") >= 1  # A's, for B


async def _after_a_second(target: str, key: str, every: float) -> tuple[list[float], list[str]]:
    await asyncio.sleep(2.0)  # the flood's process starts and fills the queue first
    return await first_token_seconds(target, key, 12, every)
