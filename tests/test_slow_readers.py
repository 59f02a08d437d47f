"""Clients that stop reading: they cannot hold the gateway's work slots past the call's timeout."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from promptpipe.contract.spec import StageName
from promptpipe.runtime.stage import WATCHDOG_SLACK_SECONDS
from promptpipe.v1 import gateway_pb2
from promptpipe.waiting import wait_until_async
from tests.support.calls import collect, stats
from tests.support.h2client import STALLED_WINDOW, StalledGrpcClient
from tests.support.pipelines import synthetic_pipeline

pytestmark = pytest.mark.processes

TIMEOUT_SECONDS = 2.0
GENERATE = "/promptpipe.v1.Gateway/Generate"
FLOOD = synthetic_pipeline(
    generation={"maxNewTokens": 4096},
    stages={"stream": {"timeoutSeconds": TIMEOUT_SECONDS, "queue": {"capacity": 0, "concurrency": 2}}},
)


async def test_clients_that_never_read_lose_their_slots_at_the_timeout(start_pipeline) -> None:
    p = start_pipeline(FLOOD)
    gateway = p.target(StageName.STREAM)
    internal = p.stats_target(StageName.STREAM)
    host, port = gateway.rsplit(":", 1)
    async with StalledGrpcClient(host, int(port)) as client:
        # 64 calls on one connection, no deadline, never read past the first kilobyte each.
        calls = [await client.call(GENERATE, gateway_pb2.GenerateRequest(prompt="flood")) for _ in range(64)]
        opened = time.monotonic()
        await wait_until_async(
            lambda: _in_flight_is(internal, 2),
            what="the calls that never read to hold both slots",
        )
        await asyncio.sleep(0.5)
        admitted = [c for c in calls if c.data_bytes]
        assert len(admitted) == 2 and all(c.data_bytes <= STALLED_WINDOW and not c.ended.is_set() for c in admitted)

        # The slots really are held: a polite client is refused.
        refused = await collect(p.gateway, "polite", max_new_tokens=4)
        assert refused.error is not None and refused.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED

        # Within the timeout (plus the watchdog's slack) the slots are free again, the stalled calls
        # still unread.
        freed = TIMEOUT_SECONDS + WATCHDOG_SLACK_SECONDS
        await wait_until_async(lambda: _in_flight_is(internal, 0), timeout=freed + 5, what="the slots to be freed")
        assert time.monotonic() - opened < freed + 3
        served = await collect(p.gateway, "polite", max_new_tokens=4)
        assert served.error is None and served.summary is not None, served.error
        assert not any(c.ended.is_set() for c in admitted)

        # Read after all, every call ends with an explicit status: the admitted ones after what was
        # buffered for them, DEADLINE_EXCEEDED; the others were refused at once.
        await client.read_all()
        await asyncio.wait_for(asyncio.gather(*(c.ended.wait() for c in calls)), 30)
    assert [c.status for c in admitted] == [grpc.StatusCode.DEADLINE_EXCEEDED.value[0]] * 2
    assert all(c.data_bytes > STALLED_WINDOW for c in admitted)
    refused_status = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert all(c.status == refused_status for c in calls if c not in admitted)
    assert p.metric(StageName.STREAM, "promptpipe_stage_duration_seconds_count", code="DEADLINE_EXCEEDED") == 2


async def _in_flight_is(target: str, n: int) -> bool:
    return (await stats(target)).in_flight == n
