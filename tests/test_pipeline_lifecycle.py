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


async def test_a_call_waits_for_a_next_stage_that_is_down_and_goes_through_once_it_is_up(start_pipeline) -> None:
    p = start_pipeline(synthetic_pipeline(generation={"maxNewTokens": 12}))
    assemble = p.pid(StageName.ASSEMBLE)
    os.kill(assemble, signal.SIGKILL)
    await wait_until_async(lambda: not alive(assemble), what="assemble to be gone")
    open_before = p.metric(StageName.STREAM, "promptpipe_stage_next_call_seconds_total", to="assemble")

    started = time.monotonic()
    call = asyncio.create_task(collect(p.gateway, "wake", timeout=30.0))
    await asyncio.sleep(2.0)
    assert not call.done(), f"the call ended while assemble was down: {call.result()}"
    # The gateway counts the waiting call as open to assemble: what assemble scales on, and is woken by.
    waited = p.metric(StageName.STREAM, "promptpipe_stage_next_call_seconds_total", to="assemble") - open_before
    assert waited >= 1.5, waited
    back = p.relaunch(StageName.ASSEMBLE)
    try:
        out = await asyncio.wait_for(call, 30)
        assert out.error is None, out.error
        assert out.summary is not None and out.summary.usage.completion_tokens == 12
        assert time.monotonic() - started >= 2.0
    finally:
        back.terminate()
        back.wait(10)


async def test_a_call_to_a_next_stage_that_never_comes_up_ends_at_its_deadline(start_pipeline) -> None:
    p = start_pipeline(synthetic_pipeline())
    assemble = p.pid(StageName.ASSEMBLE)
    os.kill(assemble, signal.SIGKILL)
    await wait_until_async(lambda: not alive(assemble), what="assemble to be gone")
    started = time.monotonic()
    out = await collect(p.gateway, "nobody", timeout=3.0)
    elapsed = time.monotonic() - started
    assert out.error is not None and out.error.code is grpc.StatusCode.DEADLINE_EXCEEDED, out.error
    assert 2.5 <= elapsed < 3.0 + 2.0, elapsed


async def test_a_stage_lost_mid_stream_is_named_to_the_client_without_the_transports_details(start_pipeline) -> None:
    p = start_pipeline(
        synthetic_pipeline(model={"synthetic": {"tokensPerSecond": 20}}, generation={"maxNewTokens": 100})
    )
    streaming = Outcome()
    call = asyncio.create_task(collect(p.gateway, "cut", streaming, timeout=20))
    await asyncio.wait_for(streaming.first_chunk.wait(), 10)
    os.kill(p.pid(StageName.INFERENCE), signal.SIGKILL)

    out = await asyncio.wait_for(call, 20)

    assert out.error is not None and out.error.code is grpc.StatusCode.UNAVAILABLE
    # grpc's own words would be "Stream removed (Socket closed)", or name an address. post tried to carry the
    # call on (spec.failover) and found no other inference pod.
    assert out.error.message == "the inference stage went away mid-stream; not carried on: no other pod of it answered"
    assert 0 < out.chunks < 100


@pytest.mark.parametrize(("drain", "cut"), [(None, False), (1.0, True)])
async def test_a_stage_stopped_mid_stream_drains_for_its_timeout_unless_told_shorter(
    start_pipeline, drain: float | None, cut: bool
) -> None:
    post = {"timeoutSeconds": 15} if drain is None else {"timeoutSeconds": 15, "drainGraceSeconds": drain}
    p = start_pipeline(
        synthetic_pipeline(
            model={"synthetic": {"tokensPerSecond": 10}}, generation={"maxNewTokens": 40}, stages={"post": post}
        )
    )
    streaming = Outcome()
    call = asyncio.create_task(collect(p.gateway, "long", streaming, timeout=30))
    await asyncio.wait_for(streaming.first_chunk.wait(), 10)
    post_pid = p.pid(StageName.POST)
    os.kill(post_pid, signal.SIGTERM)  # as a rolling restart does to the old pod

    out = await asyncio.wait_for(call, 30)

    if cut:  # told to drain for a second only: the 4-second stream is cut, explicitly
        assert out.error is not None and out.error.code is grpc.StatusCode.UNAVAILABLE, out.error
        assert out.chunks > 0 and out.summary is None
    else:
        assert out.error is None, out.error
        assert out.summary is not None and out.summary.usage.completion_tokens == 40
    await wait_until_async(lambda: not alive(post_pid), timeout=10, what="post to exit once drained")


async def test_the_gateway_tells_deadlines_its_callers_chose_from_its_own_timeout(start_pipeline) -> None:
    p = start_pipeline(
        synthetic_pipeline(
            model={"synthetic": {"tokensPerSecond": 10}},
            generation={"maxNewTokens": 40},
            stages={"stream": {"timeoutSeconds": 2}},
        )
    )
    for _ in range(3):  # the callers' own 1-second deadlines
        await collect(p.gateway, "hurry", timeout=1.0)
    late = await collect(p.gateway, "slow", timeout=30.0)  # outlives the gateway's 2-second timeout
    assert late.error is not None and late.error.code is grpc.StatusCode.DEADLINE_EXCEEDED

    deadlines = p.metric(StageName.STREAM, "promptpipe_stage_duration_seconds_count", code="DEADLINE_EXCEEDED")
    callers = p.metric(StageName.STREAM, "promptpipe_stage_caller_deadline_exceeded_total")
    try:
        cancelled = p.metric(StageName.STREAM, "promptpipe_stage_duration_seconds_count", code="CANCELLED")
    except KeyError:  # no call was: the series is made at its first
        cancelled = 0.0
    # A caller's deadline ends its call at the gateway as DEADLINE_EXCEEDED (the calls downstream carry
    # it) or CANCELLED (grpc ended it first): either way it is the caller's, never the gateway's failure.
    assert deadlines - callers == 1, (deadlines, callers)
    assert callers + cancelled == 3


async def test_a_call_that_completes_is_counted_ok_by_every_stage_never_cancelled(start_pipeline) -> None:
    # The caller closes a stream the moment its final event arrives; the stage's OK status follows it, and a
    # close that cancelled the call then would have the stage count it CANCELLED.
    p = start_pipeline(synthetic_pipeline())
    for batch in range(5):
        outcomes = await asyncio.gather(*(collect(p.gateway, f"call {batch}.{i}") for i in range(8)))
        assert all(o.error is None and o.summary is not None for o in outcomes), [o.error for o in outcomes]

    def counted(stage: StageName, code: str) -> float:
        try:
            return p.metric(stage, "promptpipe_stage_duration_seconds_count", stage=stage.value, code=code)
        except KeyError:  # CANCELLED's series appears with its first call
            return 0.0

    for stage in (StageName.RAG, StageName.ASSEMBLE, StageName.POST, StageName.INFERENCE):
        # Counted as each stage's handler ends, a moment after its last event reached its caller.
        await wait_until_async(lambda s=stage: counted(s, "OK") + counted(s, "CANCELLED") == 40, what=f"{stage} calls")
        assert (counted(stage, "OK"), counted(stage, "CANCELLED")) == (40, 0), stage
