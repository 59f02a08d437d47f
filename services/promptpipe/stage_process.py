"""One stage process: built from its config (`build`), then served (`serve`): the gRPC server with health
and reflection, /metrics, the gateway's HTTP API, graceful drain.

This is the entry point the container images run (`promptpipe-stage`) and the one `promptpipe up` starts
locally, so both paths are the same code. A process runs its own stage and the stages fused into it
(`spec.fuse`), each behind its own runtime (queue, deadline cap, metrics), called in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from promptpipe import event_loop
from promptpipe.contract import health as health_services
from promptpipe.contract import topology
from promptpipe.contract.runtime_config import RuntimeConfig, load_runtime_config
from promptpipe.contract.spec import GenerationDefaults, StageName, StageSpec
from promptpipe.contract.tracing import service_name
from promptpipe.gateway.front_door import FrontDoor
from promptpipe.gateway.grpc_api import GatewayServicer
from promptpipe.gateway.http_api import OpenAIGateway
from promptpipe.gateway.quota_store import SharedTenancy
from promptpipe.rpc import MAX_CONNECTION_AGE_MS
from promptpipe.runtime import logs
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.calls import NextStage, StageClient
from promptpipe.runtime.identity import NoToken, TokenSource, process_identity
from promptpipe.runtime.inprocess import InProcessStage
from promptpipe.runtime.liveness import Liveness, stuck_after
from promptpipe.runtime.metrics import (
    BackendMetrics,
    Failovers,
    GatewayMetrics,
    NextStageCalls,
    callers_refused,
    serving_gauge,
)
from promptpipe.runtime.quotas import LocalTenancy, Tenancy
from promptpipe.runtime.settings import StageSettings
from promptpipe.runtime.stage import (
    WATCHDOG_SLACK_SECONDS,
    EnrichingHandler,
    StageRuntime,
    StageServicer,
    StreamingHandler,
)
from promptpipe.runtime.tls import ServerCertificate
from promptpipe.runtime.tracing import setup_tracing
from promptpipe.v1 import gateway_pb2, gateway_pb2_grpc, stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

Handler = EnrichingHandler | StreamingHandler


async def _nothing() -> None:
    return None


@dataclass
class StageProcess:
    """What one stage process serves, built from its config by `build`."""

    # The stage its Stage service serves (post's, when post is fused into the inference process) and its
    # handler; the gateway serves none (its Stage service answers Stats only).
    served: StageRuntime
    handler: Handler | None
    # What the process's calls hold (every stage's slots, the model), to tell when it is stuck.
    liveness: Liveness
    start: Callable[[], Awaitable[None]] = _nothing
    close: Callable[[], Awaitable[None]] = _nothing
    # Whether the stage can serve now (every backend circuit open: no).
    healthy: Callable[[], bool] = lambda: True
    gateway: GatewayServicer | None = None
    http: OpenAIGateway | None = None

    def can_serve(self) -> bool:
        """Healthy and not stuck: what the stage's health says while it runs."""
        return self.healthy() and self.liveness.stuck() is None


class _Parts:
    """The parts of one stage process: the handlers of the stages it runs and the calls between them."""

    def __init__(
        self,
        stage: StageName,
        config: RuntimeConfig,
        runtime: StageRuntime,
        registry: CollectorRegistry,
        client_interceptors: Sequence[Any],
        tokens: TokenSource,
    ) -> None:
        self.stage = stage
        self.tokens = tokens
        self.config = config
        self.spec = config.pipeline.spec
        self.name = config.pipeline.metadata.name
        self.runtime = runtime
        self.registry = registry
        self.client_interceptors = client_interceptors
        self.next_calls = NextStageCalls(registry, self.name, stage.value)
        self.failovers = Failovers(registry, self.name)
        self.in_process: list[InProcessStage] = []  # in the order they must start
        self.liveness = Liveness(registry, self.name)
        self.liveness.watch(stage.value, "slot", runtime.queue.held_for, stuck_after(runtime.spec))
        self.healthy: Callable[[], bool] = lambda: True

    def next_stage(self, to: StageName) -> NextStage:
        """How this process calls `to`: in-process when `to` runs here, else over gRPC."""
        if topology.host_of(self.spec, to) is self.stage:
            return self.local(to)
        retry = self.spec.stages.get(self.stage).retries
        calls = self.next_calls.to(to.value)
        name = f"the {to.value} stage"
        return StageClient(
            self.config.endpoints[to],
            retry,
            self.client_interceptors,
            calls,
            name,
            self.tokens,
            failover=self.spec.failover,
            failovers=self.failovers,
            stage=to.value,
        )

    def local(self, stage: StageName) -> InProcessStage:
        """`stage`, run in this process behind its own runtime."""
        runtime = self.runtime
        if stage is not self.stage:
            runtime = StageRuntime.create(
                stage.value, self.spec.stages.get(stage), self.registry, self.name, self.spec.auth
            )
            self.liveness.watch(stage.value, "slot", runtime.queue.held_for, stuck_after(runtime.spec))
        local = InProcessStage(runtime, self.handler(stage))
        self.in_process.append(local)
        return local

    async def start_in_process(self) -> None:
        for local in self.in_process:
            await local.start()

    # Imports are local: a process loads only the libraries its own stages run (bm25s, jinja2, llama.cpp, ...).
    def handler(self, stage: StageName) -> Handler:
        spec = self.spec
        if stage is StageName.RAG:
            from promptpipe.stages.rag import RagHandler

            corpus = self.config.resolve(spec.rag.corpus.path) if spec.rag.corpus.path else None
            return RagHandler(spec.rag, corpus)
        if stage is StageName.ASSEMBLE:
            from promptpipe.stages.assemble import AssembleHandler

            return AssembleHandler(spec.template, spec.model, spec.generation.max_new_tokens)
        if stage is StageName.POST:
            from promptpipe.stages.post import PostHandler

            return PostHandler(spec.post, self.next_stage(StageName.INFERENCE))
        return self.inference()

    def inference(self) -> StreamingHandler:
        from promptpipe.backends import build_backend
        from promptpipe.backends.discovery import EndpointSliceWatch
        from promptpipe.backends.remote import RemoteBackend
        from promptpipe.stages.inference import InferenceHandler

        spec = self.spec
        metrics = BackendMetrics(self.registry, self.name, spec.model.backend.value, self.failovers)
        backend = build_backend(spec.model, spec.stages.get(self.stage).retries, metrics, spec.failover)
        inference = InferenceHandler(backend, metrics, spec.generation, spec.template.max_prompt_tokens, spec.batching)
        self.healthy = inference.healthy
        limit = stuck_after(spec.stages.get(StageName.INFERENCE))
        self.liveness.watch(StageName.INFERENCE.value, "model", backend.held_for, limit)
        if self.config.backend_pods is not None and isinstance(backend, RemoteBackend):
            return _WatchingPods(inference, EndpointSliceWatch(self.config.backend_pods, backend.set_replicas))
        return inference


def build(
    stage: StageName,
    config: RuntimeConfig,
    runtime: StageRuntime,
    registry: CollectorRegistry,
    client_interceptors: Sequence[Any] = (),
    keys: KeyRing | None = None,
    tokens: TokenSource | None = None,
    quota_store_url: str | None = None,
) -> StageProcess:
    """The process of `stage`: its handler (or the gateway), with the stages fused into it built in; its calls
    to other processes carry `tokens` (its identity); the gateway keeps its tenants' buckets in the store at
    `quota_store_url`, which its replicas share, or in this process without one."""
    parts = _Parts(stage, config, runtime, registry, client_interceptors, tokens or NoToken())
    spec, name = parts.spec, parts.name
    if stage is StageName.STREAM:
        keys = keys or KeyRing()
        gateway = GatewayServicer(
            runtime,
            spec.generation,
            parts.next_stage(StageName.RAG),
            parts.next_stage(StageName.ASSEMBLE),
            parts.next_stage(StageName.POST),
            GatewayMetrics(registry, name, spec.slo),
            keys,
            _tenancy(config, registry, runtime, quota_store_url),
        )
        http = OpenAIGateway(gateway, runtime, name, spec.model, keys, spec.http)
        return StageProcess(
            runtime, None, parts.liveness, parts.start_in_process, gateway.close, parts.healthy, gateway, http
        )
    if topology.called_as(spec, stage) is stage:
        own = parts.handler(stage)
        return StageProcess(runtime, own, parts.liveness, own.start, own.close, parts.healthy)
    # post in the inference process: its Stage service serves post, which calls inference in-process
    post = parts.local(StageName.POST)
    return StageProcess(post.runtime, post.handler, parts.liveness, parts.start_in_process, post.close, parts.healthy)


def _tenancy(config: RuntimeConfig, registry: CollectorRegistry, runtime: StageRuntime, url: str | None) -> Tenancy:
    pipeline = config.pipeline
    auth, name = pipeline.spec.auth, pipeline.metadata.name
    if url is None:
        if auth.quota_store is not None:
            log.warning("auth.quotaStore is set but no store URL was given: each gateway process keeps its own buckets")
        return LocalTenancy.create(auth, registry, name, runtime.queue)
    key = f"{pipeline.metadata.namespace}/{name}"
    return SharedTenancy.create(url, key, auth, registry, name, runtime.queue)


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


SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Clients move to new replicas when their connection ends; the calls on it finish first.
    ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
)
# The fewest concurrent streams a connection may open: the HTTP/2 spec's recommended minimum.
MIN_CONCURRENT_STREAMS = 100


def server_options(spec: StageSpec) -> list[tuple[str, Any]]:
    """SERVER_OPTIONS, plus the bounds that follow from the stage's limits.

    An aged connection is closed for good once no call on it can still be within its timeout (a call
    past it is one whose client stopped reading; the watchdog already freed its slot). One connection
    may not open more streams than the stage can admit, and never fewer than MIN_CONCURRENT_STREAMS:
    more would only be refused, but a lower limit would hold them queued in the client, unseen.
    The port is not shared (no SO_REUSEPORT): a second process started on it fails rather than taking half
    its calls.
    """
    grace_seconds = spec.timeout_seconds + WATCHDOG_SLACK_SECONDS + CONNECTION_GRACE_MARGIN_SECONDS
    streams = max(MIN_CONCURRENT_STREAMS, spec.queue.capacity + spec.queue.concurrency)
    return [
        *SERVER_OPTIONS,
        ("grpc.max_connection_age_grace_ms", int(grace_seconds * 1000)),
        ("grpc.max_concurrent_streams", streams),
        ("grpc.so_reuseport", 0),
    ]


def public_options(spec: StageSpec, generation: GenerationDefaults) -> list[tuple[str, Any]]:
    """The gateway's public server: server_options, with a request message no larger than the longest prompt
    it takes (every character UTF-8's longest, plus room for the rest of the request), which grpc refuses
    RESOURCE_EXHAUSTED from its length prefix, before reading it."""
    limit = 4 * generation.max_prompt_characters + PUBLIC_REQUEST_MARGIN_BYTES
    options = [o for o in server_options(spec) if o[0] != "grpc.max_receive_message_length"]
    return [*options, ("grpc.max_receive_message_length", limit)]


# A request's parameters, metadata, session id and framing, beside its prompt (metadata alone: 32 of ~1 KiB).
PUBLIC_REQUEST_MARGIN_BYTES = 64 * 1024
# Time for a call's status to leave after its watchdog fired, before its connection is closed.
CONNECTION_GRACE_MARGIN_SECONDS = 5.0


async def serve(settings: StageSettings, config: RuntimeConfig) -> None:
    stage = settings.stage
    pipeline = config.pipeline
    spec = pipeline.spec.stages.get(stage)
    # The gateway is where calls enter: it decides which are traced, whatever a client's traceparent says.
    server_interceptors, client_interceptors = setup_tracing(
        settings.otel_exporter,
        service_name(pipeline.metadata.name, stage.value),
        pipeline.spec.tracing,
        edge=stage is StageName.STREAM,
    )
    registry = CollectorRegistry()
    stop = asyncio.Event()
    runtime = StageRuntime.create(stage.value, spec, registry, pipeline.metadata.name, pipeline.spec.auth)
    keys = _keys(settings)
    if keys is not None:
        (log.warning if keys.open or keys.closed else log.info)("%s", keys.describe())
    refused = callers_refused(registry, pipeline.metadata.name, stage.value)
    identity = process_identity(config.identity, pipeline.spec, stage, settings.identity_token_file, refused)
    store = settings.quota_store_url.get_secret_value() if settings.quota_store_url is not None else None
    built = build(stage, config, runtime, registry, client_interceptors, keys, identity.tokens, store)
    served = built.served  # post's, when post is fused into this inference process
    servicer = StageServicer(served, built.handler)
    serving_gauge(registry, pipeline.metadata.name, stage.value, lambda: servicer.serving and built.can_serve())

    public = stage is StageName.STREAM  # the gateway: its port faces the clients
    # Before anything else, from a call's metadata alone (a stranger's call gets no span and its request is
    # never read): at the gateway its API key and whether the queue would refuse it now; behind the gateway,
    # whether its token names a process of the pipeline that may call this one.
    checks = [FrontDoor(keys, runtime)] if keys is not None else list(identity.interceptors)
    interceptors = [*checks, *server_interceptors]
    options = public_options(served.spec, pipeline.spec.generation) if public else server_options(served.spec)
    server = grpc.aio.server(options=options, interceptors=interceptors or None)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    certificate = _certificate(settings)
    address = f"{settings.host}:{settings.port}"
    if certificate is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, certificate.grpc_credentials())
    stage_service = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name
    internal: grpc.aio.Server | None = None
    stage_port = port
    if built.gateway is not None:
        # The public port serves the Gateway only: the internal Stage service (and no handler behind it)
        # is on a port of its own, which the gateway's Service does not expose.
        gateway_pb2_grpc.add_GatewayServicer_to_server(built.gateway, server)  # type: ignore[no-untyped-call]
        services = [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]
        internal = grpc.aio.server(options=server_options(served.spec), interceptors=identity.interceptors or None)
        stage_pb2_grpc.add_StageServicer_to_server(servicer, internal)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, internal)
        stage_port = internal.add_insecure_port(f"{settings.host}:{settings.stage_port}")
    else:
        stage_pb2_grpc.add_StageServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        services = [stage_service]
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    servers = [server] if internal is None else [server, internal]
    health_names = (health_services.OVERALL, *services, *([stage_service] if internal is not None else []))

    metrics_httpd, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    metrics_port = metrics_httpd.server_port
    http_port = 0
    if built.http is not None and settings.http_port is not None:
        http_port = await built.http.serve(
            settings.host,
            settings.http_port,
            runtime.spec.drain_grace(),
            lambda: servicer.serving and built.can_serve(),
            certificate,
        )

    # Not serving until the stage has loaded what it needs (model, index).
    for name in (*health_names, health_services.LIVENESS):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    for each in servers:
        await each.start()
    await built.start()
    settings.report_ports(port, metrics_port, http_port, stage_port)
    for name in (*health_names, health_services.LIVENESS):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    servicer.serving = True
    log.info(
        "stage %s of pipeline %s serving on %s:%d (metrics :%d%s)",
        stage.value,
        pipeline.metadata.name,
        settings.host,
        port,
        metrics_port,
        (f", OpenAI-compatible HTTP :{http_port}" if http_port else "")
        + (f", internal Stage service :{stage_port}" if stage_port != port else ""),
    )

    watch = asyncio.create_task(_follow_health(built, health_servicer, health_names))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watch.cancel()

    grace = served.spec.drain_grace()
    log.info(
        "draining stage %s: %d in flight, %d queued, grace %.1fs",
        stage.value,
        served.queue.in_flight,
        served.queue.depth,
        grace,
    )
    servicer.serving = False
    await health_servicer.enter_graceful_shutdown()
    try:
        # New calls are refused at once; calls in progress may finish within the grace.
        stopping = [each.stop(grace) for each in servers]
        await asyncio.gather(*stopping, *([built.http.stop()] if built.http is not None else []))
    finally:
        await built.close()
        metrics_httpd.shutdown()
    log.info("stage %s stopped", stage.value)


HEALTH_EVERY_SECONDS = 1.0


def _keys(settings: StageSettings) -> KeyRing | None:
    """The gateway's API keys; only the gateway checks them (a key file that does not parse fails its start)."""
    if settings.stage is not StageName.STREAM:
        return None
    return KeyRing(settings.api_keys_file, settings.api_keys, required=settings.require_api_keys)


def _certificate(settings: StageSettings) -> ServerCertificate | None:
    """The gateway's TLS certificate, if it has one; only the gateway's public ports serve TLS."""
    if settings.stage is not StageName.STREAM or settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return ServerCertificate(settings.tls_cert_file, settings.tls_key_file)


async def _follow_health(built: StageProcess, servicer: health.aio.HealthServicer, services: Sequence[str]) -> None:
    """NOT_SERVING while the stage cannot serve (every backend circuit open, or stuck), SERVING again once it
    can: the kubelet's readiness probe and the callers' view follow. The liveness service says NOT_SERVING
    only while the stage is stuck: the kubelet's liveness probe restarts it then, and only then."""
    serving = alive = True
    status = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
    while True:
        await asyncio.sleep(HEALTH_EVERY_SECONDS)
        stuck = built.liveness.stuck() is not None
        now = not stuck and built.healthy()
        if now != serving:
            serving = now
            log.warning("stage health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status[now]))
            for name in services:
                await servicer.set(name, status[now])
        if stuck == alive:
            alive = not stuck
            await servicer.set(health_services.LIVENESS, status[alive])


async def check(settings: StageSettings, config: RuntimeConfig) -> dict[str, Any]:
    """What `--check` proves: the config parses and the stage builds, with every library it runs imported."""
    pipeline = config.pipeline
    runtime = StageRuntime.create(
        settings.stage.value, pipeline.spec.stages.get(settings.stage), CollectorRegistry(), pipeline.metadata.name
    )
    identity = process_identity(config.identity, pipeline.spec, settings.stage, settings.identity_token_file)
    built = build(settings.stage, config, runtime, CollectorRegistry(), [], _keys(settings), identity.tokens)
    await built.close()
    return {
        "settings": settings.model_dump(mode="json"),
        "pipeline": pipeline.metadata.name,
        "backend": pipeline.spec.model.backend.value,
    }


def main() -> None:
    settings = StageSettings(_cli_parse_args=True)  # type: ignore[call-arg]
    logs.configure(settings.log_level, settings.log_format, "", settings.stage.value)
    config = load_runtime_config(settings.config)
    logs.configure(settings.log_level, settings.log_format, config.pipeline.metadata.name, settings.stage.value)
    if settings.check:
        print(json.dumps(event_loop.run(check(settings, config))))
        return
    event_loop.run(serve(settings, config))


if __name__ == "__main__":
    main()
