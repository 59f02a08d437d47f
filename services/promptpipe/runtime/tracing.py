"""OpenTelemetry tracing: off by default; one span per stage, named as the stage, linked across gRPC."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace


def setup_tracing(exporter: str, service_name: str) -> tuple[list[Any], list[Any]]:
    """Install a tracer provider; return (server, client) gRPC interceptors.

    With exporter `none` nothing is installed: no interceptors, no-op spans.
    """
    if exporter == "none":
        return [], []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

    span_exporter: SpanExporter
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporter = ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise ValueError(f"otel_exporter: unknown exporter {exporter!r} (none, console, otlp)")
    trace.set_tracer_provider(provider)
    return [aio_server_interceptor()], list(aio_client_interceptors())  # type: ignore[no-untyped-call]


def tracer() -> trace.Tracer:
    return trace.get_tracer("promptpipe")
