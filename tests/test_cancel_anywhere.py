"""Cancellation at any point leaves nothing held (issue 32).

A whole pipeline runs in this process (every stage fused into the gateway: each keeps its own handler,
admission queue and metrics), on each backend in turn. One call is cancelled at its first await that
waits, then in a fresh run at its second, and so on through every await the call reaches: once (the
client left), and again at every later await (a second cancel landing while the call cleans up after the
first: its deadline, then the watchdog). After each, everything a call takes must be back to idle (every
stage's work slots and queue, the tenant's place in the gateway's queue, the backend's calls in flight
and generations, the embedded model) and the next call is served.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from promptpipe.backends.base import Backend, GenerationRequest
from promptpipe.backends.tgi import TgiBackend
from promptpipe.contract.apikeys import hash_key
from promptpipe.contract.runtime_config import RuntimeConfig
from promptpipe.contract.spec import (
    CircuitBreakerSpec,
    PromptPipeline,
    RemoteBackendSpec,
    RetrySpec,
    StageName,
)
from promptpipe.gateway.access_log import AccessLog
from promptpipe.gateway.grpc_api import GatewayServicer
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.errors import StageError
from promptpipe.runtime.metrics import BackendMetrics
from promptpipe.runtime.stage import StageRuntime
from promptpipe.stage_process import StageProcess, build
from promptpipe.v1 import common_pb2, gateway_pb2
from promptpipe.waiting import wait_until_async
from tests.support.cancelling import run_cancelled_at, suspensions
from tests.support.pipelines import openai_server, synthetic_pipeline, tgi_server

CORPUS = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "corpus"
KEY = "pp-test-key-of-alice"
STAGES = ("stream", "rag", "assemble", "post", "inference")


def pipeline(model: dict[str, Any]) -> dict[str, Any]:
    """Every stage in the gateway's process, a corpus to retrieve from, a stop sequence and redaction in
    post, an API key with quotas (the tenant's flow in the gateway's queue)."""
    return synthetic_pipeline(
        "cancel",
        model=model,
        fuse=["rag", "assemble", "post", "inference"],
        rag={"enabled": True, "corpus": {"path": str(CORPUS)}, "topK": 1},
        generation={"maxNewTokens": 4, "temperature": 0.0},
        post={"stopSequences": ["<|im_end|>"], "redact": {"email": True}},
        auth={"defaultQuota": {"requestsPerMinute": 100_000, "tokensPerMinute": 10_000_000}},
        stages={"stream": {"timeoutSeconds": 30}, "inference": {"timeoutSeconds": 30}},
    )


@dataclass
class Fused:
    """A pipeline in this process, called as the gateway's transports call it."""

    built: StageProcess
    runtime: StageRuntime
    registry: CollectorRegistry
    backend: str

    @property
    def gateway(self) -> GatewayServicer:
        assert self.built.gateway is not None
        return self.built.gateway

    async def call(self) -> gateway_pb2.GenerateSummary:
        """One call: key and quota, admission, then rag -> assemble -> post -> inference (the OpenAI HTTP
        API's path, with its watchdog); the summary."""
        received = time.perf_counter()
        tenant, flow = await self.gateway.caller(f"Bearer {KEY}")
        request = gateway_pb2.GenerateRequest(
            prompt="What does the inference stage do?",
            parameters=common_pb2.GenerationParameters(max_new_tokens=3, temperature=0.0),
        )
        deadline, callers = self.runtime.deadline_within(30)
        async with self.runtime.admit(deadline, callers, lambda: None, flow) as call:
            access = AccessLog("http", "req")
            access.tenant = tenant
            answer = self.gateway.answer(request, call, received, access)
            async with contextlib.aclosing(answer):
                async for response in answer:
                    if response.HasField("summary"):
                        summary: gateway_pb2.GenerateSummary = response.summary
                        return summary
        raise AssertionError("the answer ended without its summary")

    async def idle(self, when: str) -> None:
        """Wait until nothing is held (a decode thread gives the model back within a token of its call's end)."""
        try:
            await wait_until_async(lambda: not self.held(), "everything held to be given back", timeout=15)
        except TimeoutError:
            raise AssertionError(f"still held {when}: {self.held()}") from None

    def held(self) -> dict[str, float]:
        """Everything a call may hold, as the process's metrics show it; what is still held is nonzero."""
        value = self.registry.get_sample_value
        held: dict[str, float] = {}
        for stage in STAGES:
            labels = {"pipeline": "cancel", "stage": stage}
            held[f"{stage} slots"] = value("promptpipe_stage_in_flight", labels) or 0.0
            held[f"{stage} queue"] = value("promptpipe_stage_queue_depth", labels) or 0.0
            held[f"{stage} held"] = value("promptpipe_stage_held_seconds", {**labels, "held": "slot"}) or 0.0
        held["alice queued"] = (
            value("promptpipe_gateway_tenant_queue_depth", {"pipeline": "cancel", "tenant": "alice"}) or 0.0
        )
        backend = {"pipeline": "cancel", "backend": self.backend}
        held["generations"] = value("promptpipe_backend_active_generations", backend) or 0.0
        labels = {"pipeline": "cancel", "stage": "inference", "held": "model"}
        held["model"] = value("promptpipe_stage_held_seconds", labels) or 0.0
        for metric in self.registry.collect():
            if metric.name == "promptpipe_backend_replica_in_flight":
                for sample in metric.samples:
                    held[f"replica {sample.labels['replica']}"] = sample.value
        return {what: v for what, v in held.items() if v}


@contextlib.asynccontextmanager
async def fused(model: dict[str, Any]) -> AsyncIterator[Fused]:
    doc = pipeline(model)
    pp = PromptPipeline.model_validate(doc)
    config = RuntimeConfig(pipeline=pp, endpoints={})
    registry = CollectorRegistry()
    runtime = StageRuntime.create("stream", pp.spec.stages.stream, registry, "cancel")
    keys = KeyRing(inline=f"alice: {hash_key(KEY)}")
    built = build(StageName.STREAM, config, runtime, registry, [], keys)
    await built.start()
    try:
        yield Fused(built, runtime, registry, pp.spec.model.backend.value)
    finally:
        await built.close()


async def cancelled_everywhere(p: Fused) -> int:
    """Cancel a call at each of its awaits in turn, once and again; after each, nothing is held and the
    next call is served. The number of awaits walked."""
    points = await suspensions(p.call)
    assert points > 5, "the call really suspends on its way through the stages"
    for again in (False, True):
        for at in range(1, points + 1):
            run = await run_cancelled_at(p.call, at, again=again)
            # Cancelled, or ended with an explicit status (an inner task cancelled: the stream it fed ends
            # early), or not reached (the call had fewer awaits this time): never an error that is no status.
            ended_well = run.cancelled or run.error is None or isinstance(run.error, StageError)
            assert ended_well, f"a cancel at await {at} (again={again}) ended the call with {run.error!r}"
            await p.idle(f"after a cancel at await {at} of {points} (again={again})")
    summary = await p.call()
    assert summary.usage.completion_tokens > 0, "the next call is served"
    assert not p.held()
    return points


async def test_a_call_cancelled_anywhere_on_the_synthetic_backend_leaves_nothing_held() -> None:
    async with fused({"name": "synthetic", "backend": "synthetic", "synthetic": {"tokensPerSecond": 0}}) as p:
        await cancelled_everywhere(p)


@pytest.mark.model
async def test_a_call_cancelled_anywhere_on_the_embedded_model_leaves_nothing_held() -> None:
    async with fused({"name": "smollm2", "backend": "llamacpp"}) as p:
        await cancelled_everywhere(p)


@pytest.mark.processes
async def test_a_call_cancelled_anywhere_on_tgi_leaves_nothing_held() -> None:
    with tgi_server() as url:
        async with fused({"name": "tgi", "backend": "tgi", "tgi": {"endpoints": [url]}}) as p:
            await cancelled_everywhere(p)


@pytest.mark.processes
@pytest.mark.model
async def test_a_call_cancelled_anywhere_on_an_openai_server_leaves_nothing_held() -> None:
    with openai_server() as url:
        async with fused({"name": "smollm2", "backend": "openai", "openai": {"endpoints": [url]}}) as p:
            await cancelled_everywhere(p)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.processes
async def test_a_half_open_circuits_trial_cancelled_anywhere_is_handed_back() -> None:
    """The one trial call a half-open circuit lets through, cancelled at any await: the trial is handed
    back at once (the next call may take it), not held until the breaker presumes it lost."""
    clock = Clock()
    breaker = CircuitBreakerSpec(failure_threshold=1, reset_seconds=10)

    def request(prompt: str) -> GenerationRequest:
        return GenerationRequest(
            prompt=prompt,
            max_new_tokens=3,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            seed=None,
            session_id="",
            deadline=time.monotonic() + 30,
        )

    async def drain(backend: Backend, prompt: str) -> None:
        async with contextlib.aclosing(backend.generate(request(prompt))) as pieces:
            async for _ in pieces:
                pass

    with tgi_server() as url:

        async def half_open() -> TgiBackend:
            spec = RemoteBackendSpec(endpoints=[url])
            retry = RetrySpec(max_attempts=1)
            backend = TgiBackend(
                spec, breaker=breaker, retry=retry, metrics=BackendMetrics(CollectorRegistry(), "t", "tgi"), clock=clock
            )
            with contextlib.suppress(Exception):
                await drain(backend, "fail-after:0")
            assert not backend.available(), "one failure opened the circuit"
            clock.now += breaker.reset_seconds
            assert backend.available(), "a trial is due"
            return backend

        backend = await half_open()
        points = await suspensions(lambda: drain(backend, "hello"))
        for again in (False, True):
            for at in range(1, points + 1):
                backend = await half_open()
                run = await run_cancelled_at(lambda: drain(backend, "hello"), at, again=again)
                assert run.cancelled or run.error is None or isinstance(run.error, StageError), run.error
                assert backend.available(), f"the trial cancelled at await {at} (again={again}) was handed back"
                await drain(backend, "hello")  # the trial, taken by the next call, closes the circuit
                assert backend.available()
