"""The five stages, and how a stage process wires its handler from the config."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from promptpipe.contract.runtime_config import RuntimeConfig
from promptpipe.contract.spec import StageName
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.calls import StageClient
from promptpipe.runtime.metrics import BackendMetrics, GatewayMetrics, NextStageCalls, TenantMetrics
from promptpipe.runtime.stage import EnrichingHandler, StageRuntime, StreamingHandler
from promptpipe.runtime.tls import ServerCertificate


async def _nothing() -> None:
    return None


class HttpApi(Protocol):
    """The gateway's OpenAI-compatible HTTP API, served beside its gRPC one."""

    async def serve(
        self, host: str, port: int, grace: float, serving: Callable[[], bool], tls: ServerCertificate | None
    ) -> int: ...

    async def stop(self) -> None: ...


@dataclass
class BuiltStage:
    handler: EnrichingHandler | StreamingHandler | None
    gateway: Any = None
    http: HttpApi | None = None
    start: Callable[[], Awaitable[None]] = _nothing
    close: Callable[[], Awaitable[None]] = field(default=_nothing)
    # Whether the stage can serve now (health says NOT_SERVING while it cannot).
    healthy: Callable[[], bool] = lambda: True


def build_stage(
    stage: StageName,
    config: RuntimeConfig,
    runtime: StageRuntime,
    registry: CollectorRegistry,
    client_interceptors: Sequence[Any],
    keys: KeyRing | None = None,
) -> BuiltStage:
    spec = config.pipeline.spec
    name = config.pipeline.metadata.name
    retry = spec.stages.get(stage).retries
    next_calls = NextStageCalls(registry, name, stage.value)

    def client(to: StageName) -> StageClient:
        return StageClient(
            config.endpoints[to], retry, client_interceptors, next_calls.to(to.value), f"the {to.value} stage"
        )

    handler: EnrichingHandler | StreamingHandler
    if stage is StageName.STREAM:
        from promptpipe.runtime.quotas import Quotas
        from promptpipe.stages.stream import GatewayServicer

        gateway = GatewayServicer(
            runtime,
            spec.generation,
            client(StageName.RAG),
            client(StageName.ASSEMBLE),
            client(StageName.POST),
            GatewayMetrics(registry, name, spec.slo),
            keys or KeyRing(),
            Quotas(spec.auth),
            TenantMetrics(registry, name, runtime.queue),
        )
        from promptpipe.stages.http_gateway import OpenAIGateway

        http = OpenAIGateway(gateway, runtime, name, spec.model, registry, keys or KeyRing())
        return BuiltStage(handler=None, gateway=gateway, http=http, close=gateway.close)
    if stage is StageName.RAG:
        from promptpipe.stages.rag import RagHandler

        corpus = config.resolve(spec.rag.corpus.path) if spec.rag.corpus.path else None
        handler = RagHandler(spec.rag, corpus)
    elif stage is StageName.ASSEMBLE:
        from promptpipe.stages.assemble import AssembleHandler

        handler = AssembleHandler(spec.template, spec.model, spec.generation.max_new_tokens)
    elif stage is StageName.INFERENCE:
        from promptpipe.backends import build_backend
        from promptpipe.stages.inference import InferenceHandler

        metrics = BackendMetrics(registry, name, spec.model.backend.value)
        backend = build_backend(spec.model, retry, metrics)
        inference = InferenceHandler(backend, metrics)
        built = BuiltStage(handler=inference, start=inference.start, close=inference.close, healthy=inference.healthy)
        if config.backend_pods is not None:
            from promptpipe.backends.discovery import EndpointSliceWatch
            from promptpipe.backends.remote import RemoteBackend

            if isinstance(backend, RemoteBackend):
                pods = EndpointSliceWatch(config.backend_pods, backend.set_replicas)

                async def start() -> None:
                    await inference.start()
                    await pods.start()

                async def close() -> None:
                    await pods.close()
                    await inference.close()

                built.start, built.close = start, close
        return built
    else:
        from promptpipe.stages.post import PostHandler

        handler = PostHandler(spec.post, client(StageName.INFERENCE))
    return BuiltStage(handler=handler, start=handler.start, close=handler.close)
