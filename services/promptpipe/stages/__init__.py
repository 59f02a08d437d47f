"""The five stages, and how a stage process wires its handler from the config."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest

from promptpipe.contract.runtime_config import RuntimeConfig
from promptpipe.contract.spec import StageName
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.broker import BrokeredTenancy, BrokerLink
from promptpipe.runtime.calls import NextStage, StageClient
from promptpipe.runtime.inprocess import InProcessStage
from promptpipe.runtime.liveness import Liveness, stuck_after
from promptpipe.runtime.metrics import BackendMetrics, GatewayMetrics, NextStageCalls
from promptpipe.runtime.stage import EnrichingHandler, StageRuntime, StreamingHandler
from promptpipe.runtime.tls import ServerCertificate


async def _nothing() -> None:
    return None


class HttpApi(Protocol):
    """The gateway's OpenAI-compatible HTTP API, served beside its gRPC one."""

    async def serve(
        self,
        host: str,
        port: int,
        grace: float,
        serving: Callable[[], bool],
        tls: ServerCertificate | None,
        shared_port: bool,
    ) -> int: ...

    async def stop(self) -> None: ...


@dataclass
class BuiltStage:
    handler: EnrichingHandler | StreamingHandler | None
    # What the process's calls hold (every stage's slots, the model), to tell when it is stuck.
    liveness: Liveness
    gateway: Any = None
    http: HttpApi | None = None
    start: Callable[[], Awaitable[None]] = _nothing
    close: Callable[[], Awaitable[None]] = field(default=_nothing)
    # Whether the stage can serve now (health says NOT_SERVING while it cannot).
    healthy: Callable[[], bool] = lambda: True
    # The stage the process's Stage service serves, when not its own: post, fused into inference.
    served: StageRuntime | None = None

    def can_serve(self) -> bool:
        """Healthy and not stuck: what the stage's health says while it runs."""
        return self.healthy() and self.liveness.stuck() is None


def build_stage(
    stage: StageName,
    config: RuntimeConfig,
    runtime: StageRuntime,
    registry: CollectorRegistry,
    client_interceptors: Sequence[Any],
    keys: KeyRing | None = None,
    supervisor: BrokerLink | None = None,
) -> BuiltStage:
    """The process of `stage`: its handler (or the gateway), with the stages fused into it (`spec.fuse`)
    built in, each behind its own runtime, called in-process. A worker process (`supervisor`) keeps the
    gateway's tenants and serves the stage's metrics through its supervisor."""
    spec = config.pipeline.spec
    name = config.pipeline.metadata.name
    retry = spec.stages.get(stage).retries
    next_calls = NextStageCalls(registry, name, stage.value)
    in_process: list[InProcessStage] = []  # in the order they must start
    built = BuiltStage(handler=None, liveness=Liveness(registry, name))
    built.liveness.watch(stage.value, "slot", runtime.queue.held_for, stuck_after(runtime.spec))

    def in_this_process(of: StageName) -> InProcessStage:
        own = runtime if of is stage else StageRuntime.create(of.value, spec.stages.get(of), registry, name)
        if own is not runtime:
            built.liveness.watch(of.value, "slot", own.queue.held_for, stuck_after(own.spec))
        local = InProcessStage(own, handler(of))
        in_process.append(local)
        return local

    def client(to: StageName) -> NextStage:
        if spec.host_of(to) is stage:
            return in_this_process(to)
        return StageClient(
            config.endpoints[to],
            retry,
            client_interceptors,
            next_calls.to(to.value),
            f"the {to.value} stage",
            spec.workers_of(to),
        )

    def handler(of: StageName) -> EnrichingHandler | StreamingHandler:
        if of is StageName.RAG:
            from promptpipe.stages.rag import RagHandler

            corpus = config.resolve(spec.rag.corpus.path) if spec.rag.corpus.path else None
            return RagHandler(spec.rag, corpus)
        if of is StageName.ASSEMBLE:
            from promptpipe.stages.assemble import AssembleHandler

            return AssembleHandler(spec.template, spec.model, spec.generation.max_new_tokens)
        if of is StageName.POST:
            from promptpipe.stages.post import PostHandler

            return PostHandler(spec.post, client(StageName.INFERENCE))
        return inference_handler()

    def inference_handler() -> StreamingHandler:
        from promptpipe.backends import build_backend
        from promptpipe.stages.inference import InferenceHandler

        metrics = BackendMetrics(registry, name, spec.model.backend.value)
        backend = build_backend(spec.model, retry, metrics)
        inference = InferenceHandler(backend, metrics)
        built.healthy = inference.healthy
        limit = stuck_after(spec.stages.get(StageName.INFERENCE))
        built.liveness.watch(StageName.INFERENCE.value, "model", backend.held_for, limit)
        if config.backend_pods is not None:
            from promptpipe.backends.discovery import EndpointSliceWatch
            from promptpipe.backends.remote import RemoteBackend

            if isinstance(backend, RemoteBackend):
                return _WatchingPods(inference, EndpointSliceWatch(config.backend_pods, backend.set_replicas))
        return inference

    async def start_in_process() -> None:
        for local in in_process:
            await local.start()

    if stage is StageName.STREAM:
        from promptpipe.runtime.quotas import LocalTenancy, Tenancy
        from promptpipe.stages.http_gateway import OpenAIGateway
        from promptpipe.stages.stream import GatewayServicer

        tenancy: Tenancy
        if supervisor is None:
            tenancy = LocalTenancy.create(spec.auth, registry, name, _own_queue(runtime))
            exposition = _exposition_of(registry)
        else:
            tenancy, exposition = BrokeredTenancy(supervisor), supervisor.metrics
        gateway = GatewayServicer(
            runtime,
            spec.generation,
            client(StageName.RAG),
            client(StageName.ASSEMBLE),
            client(StageName.POST),
            GatewayMetrics(registry, name, spec.slo),
            keys or KeyRing(),
            tenancy,
        )
        built.gateway = gateway
        built.http = OpenAIGateway(gateway, runtime, name, spec.model, exposition, keys or KeyRing())
        built.start, built.close = start_in_process, gateway.close
        return built
    if spec.called_as(stage) is stage:
        own = handler(stage)
        built.handler, built.start, built.close = own, own.start, own.close
        return built
    # post in the inference process: its Stage service serves post, which calls inference in-process
    post = in_this_process(StageName.POST)
    built.handler, built.served = post.handler, post.runtime
    built.start, built.close = start_in_process, post.close
    return built


class _WatchingPods:
    """The inference handler of a backend whose replicas are the pods behind a Service, followed as they
    come and go (EndpointSlices), from start to close."""

    def __init__(self, inference: StreamingHandler, pods: Any) -> None:
        self._inference = inference
        self._pods = pods
        self.run = inference.run

    async def start(self) -> None:
        await self._inference.start()
        await self._pods.start()

    async def close(self) -> None:
        await self._pods.close()
        await self._inference.close()


def _own_queue(runtime: StageRuntime) -> AdmissionQueue:
    """The admission queue of a gateway that runs as one process (a worker's is its supervisor's)."""
    if not isinstance(runtime.queue, AdmissionQueue):
        raise TypeError("a gateway worker keeps its tenants through its supervisor")
    return runtime.queue


def _exposition_of(registry: CollectorRegistry) -> Callable[[], Awaitable[bytes]]:
    async def exposition() -> bytes:
        return generate_latest(registry)

    return exposition
