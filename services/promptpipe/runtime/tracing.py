"""OpenTelemetry tracing: off by default; one span per stage, named as the stage, linked across gRPC."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

# What OpenTelemetry logs when a context is reset from another one: grpc drops a handler whose client
# left while it sat at a `yield`, and its span contexts (the gRPC instrumentation's and our stage span) are
# closed later by the event loop's generator finalizer, in another task. The spans still end and are
# exported; the task whose context it was is gone. Known upstream (opentelemetry-python-contrib#2357).
DETACH_FAILED = "Failed to detach context"


class _ForeignDetach(logging.Filter):
    """Drops OpenTelemetry's error for a context reset from another task's context (see DETACH_FAILED);
    its other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != DETACH_FAILED or not _from_another_context(record)


def quiet_foreign_detach() -> None:
    """Drop DETACH_FAILED for a context reset from another task's (once per process)."""
    logger = logging.getLogger("opentelemetry.context")
    if not any(isinstance(f, _ForeignDetach) for f in logger.filters):
        logger.addFilter(_ForeignDetach())


def _from_another_context(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, ValueError) and "was created in a different Context" in str(exc)


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
    quiet_foreign_detach()
    return [aio_server_interceptor()], list(aio_client_interceptors())  # type: ignore[no-untyped-call]


def tracer() -> trace.Tracer:
    return trace.get_tracer("promptpipe")
