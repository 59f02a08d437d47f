"""OpenTelemetry tracing: off by default; one span per stage, named as the stage, linked across gRPC."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from promptpipe.contract.spec import TracingSpec
from promptpipe.contract.tracing import EXPORTERS, TRACED_METHODS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.sampling import Sampler

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


# Where the OpenTelemetry SDK reads an OTLP endpoint from, most specific first.
ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


@dataclass(frozen=True)
class TracingPlan:
    """What a stage process exports: `exporter` (none, console, otlp), to `endpoint` (None: the SDK's own,
    from the environment or its default), traced calls in `sample_ratio` (None: the SDK's sampler)."""

    exporter: str
    endpoint: str | None = None
    sample_ratio: float | None = None


def plan(exporter: str, spec: TracingSpec | None, env: Mapping[str, str]) -> TracingPlan:
    """The exporter asked for (`""`: as the pipeline's `spec.tracing` says, off without it), the spec's
    endpoint unless the environment names one, and the spec's sample ratio."""
    if exporter not in ("", *EXPORTERS):
        raise ValueError(f"otel_exporter: unknown exporter {exporter!r} ({', '.join(EXPORTERS)})")
    chosen = exporter or ("otlp" if spec is not None else "none")
    if chosen == "none":
        return TracingPlan("none")
    from_env = any(env.get(k) for k in ENDPOINT_ENV)
    endpoint = spec.otlp_endpoint if spec is not None and chosen == "otlp" and not from_env else None
    return TracingPlan(chosen, endpoint, spec.sample_ratio if spec is not None else None)


def sampler(ratio: float | None, edge: bool) -> Sampler | None:
    """Which calls a process traces, at `ratio` (None: the SDK's default, every call). A call is traced whole
    or not at all: a stage inside the pipeline follows its caller's decision, and the process where calls
    enter (`edge`, the gateway) decides, at `ratio`, also for a call whose client sent a sampled W3C
    traceparent, so no client can have more traced than the ratio says; one the client did not sample is
    not traced."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if ratio is None:
        return None
    by_ratio = TraceIdRatioBased(ratio)
    return ParentBased(by_ratio, remote_parent_sampled=by_ratio) if edge else ParentBased(by_ratio)


def setup_tracing(
    exporter: str, service_name: str, spec: TracingSpec | None = None, edge: bool = False
) -> tuple[list[Any], list[Any]]:
    """Install a tracer provider as `plan` says; return (server, client) gRPC interceptors. `edge`: the
    process where calls enter the pipeline (see `sampler`).

    Off (exporter `none`, or `""` without `spec.tracing`): nothing is installed, no interceptors, no-op spans.
    """
    chosen = plan(exporter, spec, os.environ)
    if chosen.exporter == "none":
        return [], []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

    span_exporter: SpanExporter
    # host.name tells replicas apart: on a cluster it is the pod's name.
    resource = Resource.create({"service.name": service_name, "host.name": socket.gethostname()})
    provider = TracerProvider(resource=resource, sampler=sampler(chosen.sample_ratio, edge))
    if chosen.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporter = ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # An http:// endpoint is plaintext, https:// TLS (the exporter reads the scheme).
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=chosen.endpoint)))
    trace.set_tracer_provider(provider)
    quiet_foreign_detach()
    calls_only = filters.any_of(*(filters.full_method_name(m) for m in sorted(TRACED_METHODS)))
    return (
        [aio_server_interceptor(filter_=calls_only)],  # type: ignore[no-untyped-call]
        list(aio_client_interceptors(filter_=calls_only)),  # type: ignore[no-untyped-call]
    )


@contextmanager
def continuing(headers: Mapping[str, str]) -> Iterator[None]:
    """Run the block in the trace context a caller sent (W3C `traceparent`), as the gRPC server interceptor
    does for gRPC calls: the HTTP gateway's stage span becomes the caller's span's child. A no-op when the
    headers carry none."""
    if "traceparent" not in headers:
        yield
        return
    token = otel_context.attach(propagate.extract(headers))
    try:
        yield
    finally:
        otel_context.detach(token)


def tracer() -> trace.Tracer:
    return trace.get_tracer("promptpipe")


def note(event: str, attributes: Mapping[str, str | int | float]) -> None:
    """An event on the span of the call running now (none when tracing is off)."""
    trace.get_current_span().add_event(event, dict(attributes))
