"""A stuck stage says so (issue 32): a call that holds a work slot or the model longer than any call may
makes the stage report NOT_SERVING, on its liveness service too, with a metric and a log line saying why."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from promptpipe import stage_process
from promptpipe.backends.base import GenerationRequest, Outcome
from promptpipe.backends.llamacpp import LlamaCppBackend
from promptpipe.contract.spec import LlamaCppSpec, QueueSpec, StageSpec
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.liveness import Liveness, stuck_after
from promptpipe.runtime.metrics import BackendMetrics
from promptpipe.runtime.stage import StageRuntime
from promptpipe.stage_process import StageProcess
from promptpipe.v1 import common_pb2


class Held:
    """A `held_for` the test sets."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def test_the_stuck_limit_is_the_longest_a_call_may_live_plus_a_margin() -> None:
    assert stuck_after(StageSpec(timeout_seconds=60)) == 60 + 1 + 60  # deadline, watchdog slack, margin
    assert stuck_after(StageSpec(timeout_seconds=2)) == 2 + 1 + 5  # the margin is at least 5 s


def test_liveness_names_what_is_held_past_its_limit_in_a_metric_and_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    liveness = Liveness(registry, "p")
    slot, model = Held(), Held()
    liveness.watch("inference", "slot", slot, 10)
    liveness.watch("inference", "model", model, 10)
    stuck = {"pipeline": "p", "stage": "inference"}

    model.seconds = 9.5
    assert liveness.stuck() is None
    assert registry.get_sample_value("promptpipe_stage_stuck", stuck) == 0
    assert registry.get_sample_value("promptpipe_stage_held_seconds", {**stuck, "held": "model"}) == 9.5

    model.seconds = 31
    with caplog.at_level(logging.ERROR, logger="promptpipe.runtime.liveness"):
        held = liveness.stuck()
    assert held is not None and held.what == "model"
    assert "stage inference is stuck: the model held by one call for 31s" in caplog.text
    assert registry.get_sample_value("promptpipe_stage_stuck", stuck) == 1

    model.seconds = 0
    assert liveness.stuck() is None
    assert registry.get_sample_value("promptpipe_stage_stuck", stuck) == 0


async def test_a_work_slot_held_counts_how_long_and_frees_at_zero() -> None:
    queue = AdmissionQueue.of(QueueSpec(concurrency=2, capacity=2), "post")
    assert queue.held_for() == 0
    async with queue.slot(5):
        await asyncio.sleep(0.05)
        async with queue.slot(5):
            assert queue.held_for() >= 0.05, "the longest-held slot, not the newest"
    assert queue.held_for() == 0


@pytest.mark.model
async def test_a_decode_thread_that_never_returns_keeps_the_model_held_and_the_stage_is_stuck() -> None:
    """llama.cpp stuck in a native call: the call ends at its deadline, the model stays taken by the thread
    (the next call cannot have it), and the stage is stuck once that outlasts the limit."""
    registry = CollectorRegistry()
    backend = LlamaCppBackend(LlamaCppSpec(), BackendMetrics(registry, "p", "llamacpp"))
    await backend.start()
    release = threading.Event()

    def never_returns(*args: object) -> Outcome:
        release.wait(60)
        return Outcome(common_pb2.FINISH_REASON_LENGTH, 0)

    backend._decode = never_returns  # type: ignore[method-assign]
    liveness = Liveness(registry, "p")
    liveness.watch("inference", "model", backend.held_for, 0.5)

    def request() -> GenerationRequest:
        return GenerationRequest("hi", 4, 0.0, 1.0, 0, None, "", time.monotonic() + 0.3)

    try:
        with pytest.raises(Exception, match="deadline passed during generation"):
            async for _ in backend.generate(request()):
                pass
        await asyncio.sleep(0.6)
        held = liveness.stuck()
        assert held is not None and held.what == "model" and held.seconds > 0.5
        with pytest.raises(Exception, match="deadline passed waiting for the model"):
            async for _ in backend.generate(request()):
                pass
    finally:
        release.set()
    for _ in range(100):
        if backend.held_for() == 0:
            break
        await asyncio.sleep(0.05)
    assert backend.held_for() == 0 and liveness.stuck() is None, "given back when the thread ends"
    await backend.close()


@contextlib.asynccontextmanager
async def health_server(built: StageProcess) -> AsyncIterator[health_pb2_grpc.HealthStub]:
    grpc_server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    for name in ("", "promptpipe.v1.Stage", "liveness"):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    following = asyncio.create_task(stage_process._follow_health(built, servicer, ("", "promptpipe.v1.Stage")))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
    finally:
        following.cancel()
        await grpc_server.stop(0)


async def status(stub: health_pb2_grpc.HealthStub, service: str) -> str:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def eventually(stub: health_pb2_grpc.HealthStub, service: str, want: str) -> None:
    for _ in range(60):
        if await status(stub, service) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health of {service!r} never became {want}")


@pytest.mark.processes
async def test_a_stuck_stage_is_not_serving_and_fails_liveness_and_an_open_circuit_only_readiness() -> None:
    circuit_closed = True
    registry = CollectorRegistry()
    runtime = StageRuntime.create("inference", StageSpec(), registry, "p")
    built = StageProcess(runtime, None, Liveness(registry, "p"), healthy=lambda: circuit_closed)
    model = Held()
    built.liveness.watch("inference", "model", model, 10)
    async with health_server(built) as stub:
        model.seconds = 11
        await eventually(stub, "", "NOT_SERVING")
        await eventually(stub, "liveness", "NOT_SERVING")
        assert await status(stub, "promptpipe.v1.Stage") == "NOT_SERVING"

        model.seconds = 0
        await eventually(stub, "", "SERVING")
        await eventually(stub, "liveness", "SERVING")

        circuit_closed = False  # every backend circuit open: out of the Service, but not restarted
        await eventually(stub, "", "NOT_SERVING")
        assert await status(stub, "liveness") == "SERVING"
