"""One stage process: gRPC server with health and reflection, /metrics, graceful drain.

This is the entry point the container images run (`promptpipe-stage`) and the one
`promptpipe up` starts locally, so both paths are the same code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from promptpipe.contract import health as health_services
from promptpipe.contract.runtime_config import RuntimeConfig, load_runtime_config
from promptpipe.contract.spec import StageName, StageSpec
from promptpipe.contract.tracing import service_name
from promptpipe.rpc import MAX_CONNECTION_AGE_MS
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.broker import BrokeredQueue, BrokerLink
from promptpipe.runtime.metrics import serving_gauge
from promptpipe.runtime.settings import StageSettings
from promptpipe.runtime.stage import WATCHDOG_SLACK_SECONDS, StageRuntime, StageServicer
from promptpipe.runtime.tls import ServerCertificate
from promptpipe.runtime.tracing import setup_tracing
from promptpipe.runtime.workers import supervise
from promptpipe.stages import BuiltStage, build_stage
from promptpipe.v1 import gateway_pb2, gateway_pb2_grpc, stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

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


def server_options(spec: StageSpec, shared_port: bool = False) -> list[tuple[str, Any]]:
    """SERVER_OPTIONS, plus the bounds that follow from the stage's limits.

    An aged connection is closed for good once no call on it can still be within its timeout (a call
    past it is one whose client stopped reading; the watchdog already freed its slot). One connection
    may not open more streams than the stage can admit, and never fewer than MIN_CONCURRENT_STREAMS:
    more would only be refused, but a lower limit would hold them queued in the client, unseen.
    A stage's worker processes share their port (`shared_port`, SO_REUSEPORT); a lone process does not, so a
    second one started on its port fails rather than taking half its calls.
    """
    grace_seconds = spec.timeout_seconds + WATCHDOG_SLACK_SECONDS + CONNECTION_GRACE_MARGIN_SECONDS
    streams = max(MIN_CONCURRENT_STREAMS, spec.queue.capacity + spec.queue.concurrency)
    return [
        *SERVER_OPTIONS,
        ("grpc.max_connection_age_grace_ms", int(grace_seconds * 1000)),
        ("grpc.max_concurrent_streams", streams),
        ("grpc.so_reuseport", 1 if shared_port else 0),
    ]


# Time for a call's status to leave after its watchdog fired, before its connection is closed.
CONNECTION_GRACE_MARGIN_SECONDS = 5.0


async def serve(settings: StageSettings, config: RuntimeConfig) -> None:
    stage = settings.stage
    pipeline = config.pipeline
    spec = pipeline.spec.stages.get(stage)
    worker = settings.worker_of is not None
    workers = pipeline.spec.workers_of(stage)
    if workers > 1 and not worker:
        await supervise(settings, config, workers)
        return
    server_interceptors, client_interceptors = setup_tracing(
        settings.otel_exporter, service_name(pipeline.metadata.name, stage.value), pipeline.spec.tracing
    )
    registry = CollectorRegistry()
    stop = asyncio.Event()
    supervisor: BrokerLink | None = None
    if settings.worker_of is not None:
        supervisor = BrokerLink()
        await supervisor.connect(str(settings.worker_of), lost=stop.set)  # no supervisor: drain and go
    shared = BrokeredQueue(supervisor, spec.queue) if supervisor is not None else None
    runtime = StageRuntime.create(stage.value, spec, registry, pipeline.metadata.name, shared)
    keys = _keys(settings)
    if keys is not None:
        (log.warning if keys.open or keys.closed else log.info)("%s", keys.describe())
    built = build_stage(stage, config, runtime, registry, client_interceptors, keys, supervisor)
    served = built.served or runtime  # post's, when post is fused into this inference process
    servicer = StageServicer(served, built.handler)
    serving_gauge(registry, pipeline.metadata.name, stage.value, lambda: servicer.serving and built.can_serve())

    server = grpc.aio.server(options=server_options(served.spec, worker), interceptors=server_interceptors or None)
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
        internal = grpc.aio.server(options=server_options(served.spec, worker))
        stage_pb2_grpc.add_StageServicer_to_server(servicer, internal)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, internal)
        stage_port = internal.add_insecure_port(f"{settings.host}:{settings.stage_port}")
    else:
        stage_pb2_grpc.add_StageServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        services = [stage_service]
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    servers = [server] if internal is None else [server, internal]
    health_names = (health_services.OVERALL, *services, *([stage_service] if internal is not None else []))

    # A worker's metrics are for its supervisor only, which serves the stage's on the pod's metrics port.
    metrics_host = "127.0.0.1" if worker else settings.host
    metrics_httpd, _ = start_http_server(settings.metrics_port, addr=metrics_host, registry=registry)
    metrics_port = metrics_httpd.server_port
    http_port = 0
    if built.http is not None and settings.http_port is not None:
        http_port = await built.http.serve(
            settings.host,
            settings.http_port,
            runtime.spec.drain_grace(),
            lambda: servicer.serving and built.can_serve(),
            certificate,
            worker,
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
        if supervisor is not None:
            await supervisor.close()
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


async def _follow_health(built: BuiltStage, servicer: health.aio.HealthServicer, services: Sequence[str]) -> None:
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
    built = build_stage(settings.stage, config, runtime, CollectorRegistry(), [], _keys(settings))
    await built.close()
    return {
        "settings": settings.model_dump(mode="json"),
        "pipeline": pipeline.metadata.name,
        "backend": pipeline.spec.model.backend.value,
    }


def main() -> None:
    settings = StageSettings(_cli_parse_args=True)  # type: ignore[call-arg]
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_runtime_config(settings.config)
    if settings.check:
        print(json.dumps(asyncio.run(check(settings, config))))
        return
    asyncio.run(serve(settings, config))


if __name__ == "__main__":
    main()
