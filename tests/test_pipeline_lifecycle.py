"""Deadlines, cancellation and graceful drain, across real stage processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from promptpipe.cli.localrun import health_status
from promptpipe.contract.spec import StageName
from promptpipe.localproc import alive
from promptpipe.waiting import wait_until_async
from tests.support.calls import Outcome, collect
from tests.support.pipelines import synthetic_pipeline, tgi_server, tgi_stats

pytestmark = pytest.mark.processes


async def test_deadline_ends_the_call_and_stops_the_backend(start_pipeline) -> None:
    p = start_pipeline(
        synthetic_pipeline(model={"synthetic": {"tokensPerSecond": 20}}, generation={"maxNewTokens": 200})
    )
    started = time.monotonic()
    out = await collect(p.gateway, "slow", timeout=0.8)

    assert out.error is not None and out.error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert out.chunks > 0, "tokens streamed before the deadline reach the client"
    assert time.monotonic() - started < 0.8 + 2.0, "the call ends at its deadline, not after the generation"
    await wait_until_async(
        lambda: p.metric(StageName.INFERENCE, "promptpipe_backend_active_generations") == 0,
        what="the generation to stop",
    )
    assert p.metric(StageName.INFERENCE, "promptpipe_backend_generations_cancelled_total") == 1
    generated = p.metric(StageName.INFERENCE, "promptpipe_backend_generated_tokens_total")
    await asyncio.sleep(0.3)
    assert p.metric(StageName.INFERENCE, "promptpipe_backend_generated_tokens_total") == generated < 200


async def test_client_cancel_stops_generation_at_the_backend(start_pipeline) -> None:
    with tgi_server() as url:
        p = start_pipeline(
            synthetic_pipeline(model={"backend": "tgi", "tgi": {"endpoints": [url]}}, generation={"maxNewTokens": 500})
        )
        out = Outcome()
        call = asyncio.create_task(collect(p.gateway, "slow:20 please", out))
        await wait_until_async(lambda: out.chunks >= 3, what="three chunks")
        call.cancel()

        # The TGI-protocol server itself sees its stream cut off, long before 500 tokens.
        await wait_until_async(lambda: tgi_stats(url)["aborted"] == 1, what="the backend to see the disconnect")
        stats = tgi_stats(url)
        assert stats["finished"] == 0 and stats["active"] == 0
        assert 3 <= stats["aborted_after_tokens"][0] < 100
        assert p.metric(StageName.INFERENCE, "promptpipe_backend_generations_cancelled_total") == 1


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(start_pipeline) -> None:
    p = start_pipeline(
        synthetic_pipeline(
            model={"synthetic": {"tokensPerSecond": 20}},
            generation={"maxNewTokens": 30},
            stages={"stream": {"drainGraceSeconds": 10}},
        )
    )
    outs = [Outcome() for _ in range(4)]
    calls = [asyncio.create_task(collect(p.gateway, f"q{i}", o)) for i, o in enumerate(outs)]
    await asyncio.wait_for(asyncio.gather(*(o.first_chunk.wait() for o in outs)), 10)

    gateway_pid = p.pid(StageName.STREAM)
    os.kill(gateway_pid, signal.SIGTERM)
    # Draining: health says NOT_SERVING, then the server takes no new calls at all.
    await wait_until_async(lambda: health_status(p.gateway, 1.0) != "SERVING", "the gateway to stop serving")
    late = await collect(p.gateway, "late", timeout=5.0)

    assert late.error is not None and late.error.code is grpc.StatusCode.UNAVAILABLE
    for done in await asyncio.gather(*calls):
        assert done.error is None, done.error
        assert done.summary is not None and done.summary.usage.completion_tokens == 30
    await wait_until_async(lambda: not alive(gateway_pid), timeout=10, what="the gateway to exit")
