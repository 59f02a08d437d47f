"""Prometheus metrics of a stage. Labels are bounded: pipeline, stage, code, reason."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from promptpipe.runtime.admission import AdmissionQueue

# Latency buckets from 100 µs to 2 min: stage hops are sub-millisecond, generations long.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
# gRPC codes that say the server failed, not its caller (what a rollout's error rate counts).
SERVER_ERROR_CODES = ("INTERNAL", "UNAVAILABLE", "UNKNOWN", "DEADLINE_EXCEEDED", "DATA_LOSS", "UNIMPLEMENTED")


class StageMetrics:
    def __init__(self, registry: CollectorRegistry, pipeline: str, stage: str, queue: AdmissionQueue) -> None:
        labels = {"pipeline": pipeline, "stage": stage}
        names = list(labels)
        # Gauges read the queue when scraped: nothing to keep in sync on the hot path.
        Gauge("promptpipe_stage_queue_depth", "Requests waiting for a work slot (KEDA scales on this).",
              names, registry=registry).labels(**labels).set_function(lambda: queue.depth)
        Gauge("promptpipe_stage_queue_capacity", "Most requests that may wait.",
              names, registry=registry).labels(**labels).set(queue.capacity)
        Gauge("promptpipe_stage_in_flight", "Requests holding a work slot.",
              names, registry=registry).labels(**labels).set_function(lambda: queue.in_flight)
        Gauge("promptpipe_stage_concurrency", "Work slots.",
              names, registry=registry).labels(**labels).set(queue.concurrency)
        self.queue_wait = Histogram("promptpipe_stage_queue_wait_seconds", "Time spent waiting for a work slot.",
                                    names, registry=registry, buckets=_LATENCY_BUCKETS).labels(**labels)
        self._duration = Histogram("promptpipe_stage_duration_seconds", "Time from slot to end of call, by status.",
                                   [*names, "code"], registry=registry, buckets=_LATENCY_BUCKETS)
        self._shed = Counter("promptpipe_stage_shed_total", "Requests shed by the queue, by reason.",
                             [*names, "reason"], registry=registry)
        self._labels = labels
        # These series exist from the start, at zero: PromQL's increase() cannot see the first errors of a
        # series that appears already at 6, so an error-rate query would read 0 exactly when it matters.
        for code in ("OK", *SERVER_ERROR_CODES):
            self._duration.labels(**labels, code=code)
        self.rejected = self._shed.labels(**labels, reason="rejected")
        self.dropped = self._shed.labels(**labels, reason="dropped")

    def observe_call(self, code: str, seconds: float) -> None:
        self._duration.labels(**self._labels, code=code).observe(seconds)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, pipeline: str) -> None:
        labels = {"pipeline": pipeline}
        self.ttft = Histogram("promptpipe_gateway_time_to_first_token_seconds",
                              "Time from request to first chunk sent.", list(labels),
                              registry=registry, buckets=_LATENCY_BUCKETS).labels(**labels)
        self.tpot = Histogram("promptpipe_gateway_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", list(labels),
                              registry=registry, buckets=_TOKEN_BUCKETS).labels(**labels)
        self.tokens = Counter("promptpipe_gateway_output_tokens_total", "Output tokens streamed to clients.",
                              list(labels), registry=registry).labels(**labels)


class BackendMetrics:
    def __init__(self, registry: CollectorRegistry, pipeline: str, backend: str) -> None:
        labels = {"pipeline": pipeline, "backend": backend}
        names = list(labels)
        self.tokens = Counter("promptpipe_backend_generated_tokens_total", "Tokens received from the backend.",
                              names, registry=registry).labels(**labels)
        self.cancelled = Counter("promptpipe_backend_generations_cancelled_total",
                                 "Generations stopped early because the caller went away or its deadline passed.",
                                 names, registry=registry).labels(**labels)
        self.active = Gauge("promptpipe_backend_active_generations", "Generations running now.",
                            names, registry=registry).labels(**labels)
        # Counted inside llama.cpp's decode loop: proves generation stops, not just streaming.
        self.decoded = Counter("promptpipe_backend_decoded_tokens_total",
                               "Tokens the embedded llama.cpp decoded (llamacpp backend only).",
                               names, registry=registry).labels(**labels)
        self.circuit_open = Gauge("promptpipe_backend_circuit_open", "1 while the circuit breaker is open.",
                                  names, registry=registry).labels(**labels)
