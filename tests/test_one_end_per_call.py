"""Every call ends with its final result or an explicit status, at every hop: a stream that just stops
(a backend, or a stage, ending without its final event) is DATA_LOSS, never OK without a summary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from promptpipe.backends.base import GenerationRequest, Outcome, Piece
from promptpipe.backends.synthetic import SyntheticBackend
from promptpipe.client import GenerationError, PipelineClient
from promptpipe.contract.spec import AuthSpec, GenerationDefaults, PostSpec, StageSpec, SyntheticSpec
from promptpipe.gateway.grpc_api import GatewayServicer
from promptpipe.localproc import free_port
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.errors import DataLoss, UpstreamError
from promptpipe.runtime.metrics import BackendMetrics, GatewayMetrics
from promptpipe.runtime.quotas import LocalTenancy
from promptpipe.runtime.stage import Call, StageRuntime
from promptpipe.stages.inference import InferenceHandler
from promptpipe.stages.post import PostHandler
from promptpipe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, stage_pb2


def chunk(text: str) -> stage_pb2.StageEvent:
    return stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text=text, token_count=1))


class CutShortBackend(SyntheticBackend):
    """Two pieces, then the generation just stops: no Outcome."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        yield Piece("a")
        yield Piece("b")


class CutShortStage:
    """The next stage as its caller sees it: an item back, or two chunks and then the end of the stream."""

    async def process(self, item: stage_pb2.WorkItem, deadline: float) -> stage_pb2.WorkItem:
        return item

    async def run(self, item: stage_pb2.WorkItem, deadline: float) -> AsyncGenerator[stage_pb2.StageEvent, None]:
        yield chunk("a")
        yield chunk("b")

    async def close(self) -> None:
        return None


async def drain(events: AsyncIterator[stage_pb2.StageEvent]) -> list[stage_pb2.StageEvent]:
    seen = []
    async for event in events:
        seen.append(event)
    return seen


def call() -> Call:
    return Call(time.monotonic() + 10, 0.0)


async def test_the_inference_stage_turns_a_generation_without_its_result_into_data_loss() -> None:
    metrics = BackendMetrics(CollectorRegistry(), "p", "cut")
    handler = InferenceHandler(CutShortBackend(SyntheticSpec()), metrics, GenerationDefaults(), 1024)
    with pytest.raises(DataLoss, match="without its final result"):
        await drain(handler.run(stage_pb2.WorkItem(prompt="x"), call()))


async def test_post_turns_an_inference_stream_without_its_final_event_into_data_loss() -> None:
    handler = PostHandler(PostSpec(), CutShortStage())  # type: ignore[arg-type]
    with pytest.raises(DataLoss, match="inference stage ended its stream without a final event"):
        await drain(handler.run(stage_pb2.WorkItem(), call()))


class BreaksMidAddress(CutShortStage):
    """Most of an e-mail address, then the call upstream fails."""

    async def run(self, item: stage_pb2.WorkItem, deadline: float) -> AsyncGenerator[stage_pb2.StageEvent, None]:
        yield chunk("Write to jane.doe@")
        yield chunk("examp")
        raise UpstreamError(grpc.StatusCode.UNAVAILABLE, "inference went away")


async def test_post_never_sends_what_it_held_back_mid_match_when_the_stream_breaks() -> None:
    handler = PostHandler(PostSpec(), BreaksMidAddress())  # type: ignore[arg-type]
    sent: list[str] = []
    with pytest.raises(UpstreamError, match="inference went away"):
        async for event in handler.run(stage_pb2.WorkItem(), call()):
            sent.append(event.chunk.text)
    assert "".join(sent) == "Write to [REDACTED]"


class Aborted(Exception):
    pass


class Context:
    """What the gateway uses of grpc.aio's servicer context."""

    def __init__(self) -> None:
        self.aborted_with: grpc.StatusCode | None = None
        self.details = ""

    def code(self) -> grpc.StatusCode | None:
        return self.aborted_with

    def time_remaining(self) -> float:
        return 10.0

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.aborted_with, self.details = code, details
        raise Aborted


async def test_the_gateway_ends_a_post_stream_without_its_final_event_with_data_loss() -> None:
    registry = CollectorRegistry()
    runtime = StageRuntime.create("stream", StageSpec(), registry, "p")
    stage: Any = CutShortStage()
    metrics = GatewayMetrics(registry, "p")
    tenancy = LocalTenancy.create(AuthSpec(), registry, "p", runtime.queue)
    gateway = GatewayServicer(runtime, GenerationDefaults(), stage, stage, stage, metrics, KeyRing(), tenancy)
    context = Context()
    sent = []
    with pytest.raises(Aborted):
        async for response in gateway.Generate(gateway_pb2.GenerateRequest(prompt="x"), context):  # type: ignore[arg-type]
            sent.append(response)
    assert [r.chunk.text for r in sent] == ["ab"] or [r.chunk.text for r in sent] == ["a", "b"]
    assert context.code() is grpc.StatusCode.DATA_LOSS and "without a final event" in context.details


class SummarylessGateway(gateway_pb2_grpc.GatewayServicer):
    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        yield gateway_pb2.GenerateResponse(chunk=common_pb2.TokenChunk(text="a", token_count=1))


@pytest.mark.processes
async def test_the_client_turns_a_gateway_stream_without_a_summary_into_data_loss() -> None:
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(SummarylessGateway(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        texts = []
        async with PipelineClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(GenerationError) as info:
                async for response in client.generate("x", timeout=5):
                    texts.append(response.chunk.text)
        assert texts == ["a"]
        assert info.value.code is grpc.StatusCode.DATA_LOSS
    finally:
        await server.stop(0)


class LingeringGateway(gateway_pb2_grpc.GatewayServicer):
    """Sends its summary, then takes a moment before its handler returns (and its OK status leaves)."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.done = asyncio.Event()

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            yield gateway_pb2.GenerateResponse(summary=gateway_pb2.GenerateSummary(request_id="r"))
            await asyncio.sleep(0.2)
            self.ended.append("completed")
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        finally:
            self.done.set()


@pytest.mark.processes
async def test_the_client_lets_a_call_end_after_its_summary_rather_than_cancel_it() -> None:
    gateway = LingeringGateway()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        async with PipelineClient(f"127.0.0.1:{port}") as client:
            responses = [r async for r in client.generate("x", timeout=5)]
        assert [r.summary.request_id for r in responses] == ["r"]
        async with asyncio.timeout(10):  # however the handler ends, it says so
            await gateway.done.wait()
        # The call ended OK on the gateway's side: the client did not cancel it once it had its summary.
        assert gateway.ended == ["completed"]
    finally:
        await server.stop(0)
