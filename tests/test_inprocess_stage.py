"""A fused stage's in-process call (runtime/inprocess.py): what its caller gets is what a gRPC call to it
would give, its slot is held for the call and freed when the caller leaves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from promptpipe.contract.spec import QueueSpec, StageSpec
from promptpipe.runtime.errors import ORIGIN_TRAILER, UpstreamError, from_a_stage
from promptpipe.runtime.inprocess import InProcessStage
from promptpipe.runtime.stage import Call, StageRuntime
from promptpipe.v1 import common_pb2, stage_pb2


class Tokens:
    """A streaming handler: `n` tokens, then its final event; or it fails after the first token."""

    def __init__(self, n: int, fail: bool = False) -> None:
        self.n = n
        self.fail = fail
        self.closed = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, item: stage_pb2.WorkItem, call: Call) -> AsyncIterator[stage_pb2.StageEvent]:
        try:
            for _ in range(self.n):
                yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text="x", token_count=1))
                await asyncio.sleep(0)
                if self.fail:
                    raise KeyError("a bug")
            yield stage_pb2.StageEvent(final=stage_pb2.StageFinal(finish_reason=common_pb2.FINISH_REASON_LENGTH))
        finally:
            self.closed += 1


def stage(handler: Tokens, concurrency: int = 1, capacity: int = 0) -> InProcessStage:
    spec = StageSpec(queue=QueueSpec(concurrency=concurrency, capacity=capacity, retry_after_seconds=0.25))
    return InProcessStage(StageRuntime.create("post", spec, CollectorRegistry(), "p"), handler)


def deadline() -> float:
    return time.monotonic() + 10


async def test_the_events_come_with_the_stages_timing_on_the_final_one_and_the_slot_is_freed() -> None:
    local = stage(Tokens(3))
    events = [e async for e in local.run(stage_pb2.WorkItem(), deadline())]
    assert [e.HasField("chunk") for e in events] == [True, True, True, False]
    (timing,) = events[-1].final.timings
    assert timing.stage == "post" and timing.work_seconds > 0
    assert local.runtime.queue.in_flight == 0


async def test_a_full_stage_refuses_as_its_grpc_status_would_naming_itself_with_its_retry_hint() -> None:
    handler = Tokens(1000)
    local = stage(handler)
    running = local.run(stage_pb2.WorkItem(), deadline())
    await anext(running)  # holds the only slot

    with pytest.raises(UpstreamError) as refused:
        await anext(local.run(stage_pb2.WorkItem(), deadline()))

    err = refused.value
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and err.retry_after == 0.25
    assert err.message == "stage post: queue full (0 waiting, 1 running)"
    assert from_a_stage(err.trailers) and (ORIGIN_TRAILER, "post") in err.trailers
    details = dict(err.trailers)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.nanos == 250_000_000
    # The caller leaving closes the handler's stream and frees the slot.
    await running.aclose()
    assert handler.closed == 1 and local.runtime.queue.in_flight == 0


async def test_an_unexpected_error_reaches_the_caller_as_internal_without_its_words() -> None:
    local = stage(Tokens(5, fail=True))
    with pytest.raises(UpstreamError) as failed:
        async for _ in local.run(stage_pb2.WorkItem(), deadline()):
            pass
    assert failed.value.code is grpc.StatusCode.INTERNAL
    assert failed.value.message == "internal error in stage post"
    assert local.runtime.queue.in_flight == 0
