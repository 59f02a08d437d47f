"""The public API as any gRPC client sees it: statuses, health, reflection, metrics."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from promptpipe.contract.spec import StageName
from promptpipe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, stage_pb2, stage_pb2_grpc
from tests.support.calls import collect
from tests.support.pipelines import synthetic_pipeline

pytestmark = pytest.mark.processes

BAD_REQUESTS = [
    (gateway_pb2.GenerateRequest(), "prompt: either prompt or messages is required"),
    (
        gateway_pb2.GenerateRequest(prompt="hi", parameters=common_pb2.GenerationParameters(temperature=9)),
        "parameters.temperature: must be between 0 and 2",
    ),
    (
        gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="bot", content="x")]),
        "messages[0].role: must be one of user, assistant, not 'bot'",
    ),
    (
        gateway_pb2.GenerateRequest(prompt="hi", parameters=common_pb2.GenerationParameters(max_new_tokens=99999)),
        "parameters.max_new_tokens: must be at most 4096",
    ),
]


@pytest.fixture
def pipeline(start_pipeline):  # type: ignore[no-untyped-def]
    return start_pipeline(synthetic_pipeline(post={"stopSequences": ["STOP"]}))


async def test_bad_requests_get_invalid_argument_naming_the_field(pipeline) -> None:
    async with grpc.aio.insecure_channel(pipeline.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for request, message in BAD_REQUESTS:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Generate(request, timeout=10):
                    pass
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == message


async def test_stream_is_chunks_then_one_summary_with_every_stage_timed(pipeline) -> None:
    async with grpc.aio.insecure_channel(pipeline.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        responses = [r async for r in stub.Generate(gateway_pb2.GenerateRequest(prompt="hi"), timeout=10)]
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds[-1] == "summary" and set(kinds[:-1]) == {"chunk"}
    summary = responses[-1].summary
    assert "".join(r.chunk.text for r in responses[:-1]) == " tok" * 16
    assert summary.usage.completion_tokens == 16 and summary.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [t.stage for t in summary.timings] == ["rag", "assemble", "inference", "post", "stream"]
    assert 0 < summary.time_to_first_token_seconds <= summary.total_seconds


async def test_stop_sequence_from_the_request_ends_generation(pipeline) -> None:
    # The synthetic backend streams " tok" 16 times; this first matches at offset 3.
    out = await collect(pipeline.gateway, "hi", stop=["k tok"])
    assert out.text == " to"
    assert out.summary is not None and out.summary.finish_reason == common_pb2.FINISH_REASON_STOP


def test_health_reports_serving_for_every_stage_and_service(pipeline) -> None:
    for stage in StageName:
        with grpc.insecure_channel(pipeline.stats_target(stage)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "promptpipe.v1.Stage"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(pipeline.gateway) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="promptpipe.v1.Gateway"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_gateway_api_to_unconfigured_clients(pipeline) -> None:
    with grpc.insecure_channel(pipeline.gateway) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert set(db.get_services()) == {
            "promptpipe.v1.Gateway",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("promptpipe.v1.Gateway").FindMethodByName("Generate")
        assert method.server_streaming and method.input_type.full_name == "promptpipe.v1.GenerateRequest"


def test_the_public_port_serves_no_internal_stage_service_and_the_internal_port_does(pipeline) -> None:
    """The back door closed: nothing reaching the gateway's public port can call Stage/Run or read Stats."""
    assert pipeline.stats_target(StageName.STREAM) != pipeline.gateway
    with grpc.insecure_channel(pipeline.gateway) as channel:
        stage = stage_pb2_grpc.StageStub(channel)
        for call, request in ((stage.Stats, stage_pb2.StatsRequest()), (stage.Process, stage_pb2.WorkItem())):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5)
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(pipeline.stats_target(StageName.STREAM)) as channel:
        stats = stage_pb2_grpc.StageStub(channel).Stats(stage_pb2.StatsRequest(), timeout=5)
        assert stats.stage == "stream" and stats.serving


async def test_metrics_carry_the_documented_names(pipeline) -> None:
    await collect(pipeline.gateway, "hi")
    gateway = pipeline.metrics(StageName.STREAM)
    for name in (
        "promptpipe_gateway_time_to_first_token_seconds_bucket",
        "promptpipe_gateway_time_per_output_token_seconds_bucket",
        "promptpipe_gateway_output_tokens_total",
        "promptpipe_stage_queue_depth",
    ):
        assert name in gateway, name
    assert pipeline.metric(StageName.STREAM, "promptpipe_gateway_output_tokens_total") == 16
    for stage in StageName:
        text = pipeline.metrics(stage)
        for name in (
            "promptpipe_stage_queue_depth",
            "promptpipe_stage_queue_capacity",
            "promptpipe_stage_in_flight",
            "promptpipe_stage_queue_wait_seconds_bucket",
            "promptpipe_stage_duration_seconds_bucket",
            "promptpipe_stage_shed_total",
        ):
            assert f"{name}{{" in text and f'stage="{stage.value}"' in text, (stage, name)
    assert pipeline.metric(StageName.RAG, "promptpipe_stage_duration_seconds_count", code="OK") == 1
