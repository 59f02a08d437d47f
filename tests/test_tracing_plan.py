"""Where a stage's spans go: the pipeline's `spec.tracing`, the exporter a process is started with, and the
environment an OpenTelemetry user already sets (pure: `runtime.tracing.plan`)."""

from __future__ import annotations

from typing import Any

import pytest

from promptpipe.contract.spec import TracingSpec
from promptpipe.contract.tracing import TRACED_METHODS
from promptpipe.runtime.tracing import TracingPlan, plan, sampler
from promptpipe.v1 import gateway_pb2, stage_pb2

SPEC = TracingSpec.model_validate({"otlpEndpoint": "http://jaeger-collector.obs.svc:4317", "sampleRatio": 0.25})


def test_without_spec_tracing_or_an_exporter_nothing_is_traced() -> None:
    assert plan("", None, {}) == TracingPlan("none")


def test_spec_tracing_alone_exports_over_otlp_to_its_endpoint_at_its_ratio() -> None:
    assert plan("", SPEC, {}) == TracingPlan("otlp", "http://jaeger-collector.obs.svc:4317", 0.25)
    assert plan("otlp", SPEC, {}) == plan("", SPEC, {})


def test_an_endpoint_in_the_environment_wins_over_the_files() -> None:
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        assert plan("", SPEC, {key: "http://127.0.0.1:4317"}) == TracingPlan("otlp", None, 0.25), key
    # Set but empty is not set.
    assert plan("", SPEC, {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}).endpoint == SPEC.otlp_endpoint


def test_the_exporter_asked_for_overrides_the_file() -> None:
    assert plan("none", SPEC, {}) == TracingPlan("none"), "off, though the file names a collector"
    assert plan("console", SPEC, {}) == TracingPlan("console", None, 0.25), "printed, sampled as the file says"
    assert plan("otlp", None, {}) == TracingPlan("otlp"), "the SDK's endpoint and sampler, from the environment"


def test_an_unknown_exporter_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="otel_exporter: unknown exporter 'jaeger' \\(none, console, otlp\\)"):
        plan("jaeger", SPEC, {})


def test_the_methods_that_carry_a_call_are_traced_and_the_stats_poll_is_not() -> None:
    """Every method of the Gateway and Stage services is a call but Stats (health and reflection are other
    services): a method added to either must be placed on one side of this line."""
    methods = {
        f"/{service.full_name}/{method.name}"
        for file in (gateway_pb2.DESCRIPTOR, stage_pb2.DESCRIPTOR)
        for service in file.services_by_name.values()
        for method in service.methods
    }
    assert methods - TRACED_METHODS == {"/promptpipe.v1.Stage/Stats"}
    assert methods >= TRACED_METHODS


def _parent(trace_id: int, sampled: bool) -> Any:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    span = NonRecordingSpan(SpanContext(trace_id, 0x1234, is_remote=True, trace_flags=flags))
    return trace.set_span_in_context(span)


def test_the_gateway_decides_at_its_ratio_whatever_a_clients_traceparent_says_and_the_stages_follow() -> None:
    from opentelemetry.sdk.trace.sampling import Decision

    low, high = 1, (1 << 64) - 1  # trace ids the ratio's bound keeps and drops (it looks at the low 64 bits)
    edge, inside = sampler(0.5, edge=True), sampler(0.5, edge=False)
    assert edge is not None and inside is not None

    def sampled(s: Any, trace_id: int, parent_sampled: bool) -> bool:
        decision = s.should_sample(_parent(trace_id, parent_sampled), trace_id, "call").decision
        return bool(decision is Decision.RECORD_AND_SAMPLE)

    # A client's sampled traceparent does not force the gateway to trace: its ratio decides.
    assert sampled(edge, low, True) and not sampled(edge, high, True)
    assert not sampled(edge, low, False), "a call its client did not sample is not traced"
    # Inside the pipeline a stage follows its caller (the gateway), so a call is traced whole or not at all.
    assert sampled(inside, high, True) and not sampled(inside, low, False)
    assert sampler(None, edge=True) is None, "no ratio: the SDK's default"
