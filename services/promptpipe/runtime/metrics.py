"""Prometheus metrics of a stage, named and labelled by the contract (`promptpipe.contract.metrics`)."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from promptpipe.contract import metrics as m
from promptpipe.contract.codes import SERVER_ERROR_CODES
from promptpipe.contract.spec import SloSpec
from promptpipe.runtime.admission import AdmissionQueue

# Latency buckets from 100 µs to 2 min: stage hops are sub-millisecond, generations long.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def _gauge(metric: m.Metric, registry: CollectorRegistry) -> Gauge:
    return Gauge(metric.name, metric.help, metric.label_names, registry=registry)


def _counter(metric: m.Metric, registry: CollectorRegistry) -> Counter:
    # prometheus_client appends `_total` itself.
    return Counter(metric.name.removesuffix("_total"), metric.help, metric.label_names, registry=registry)


def _histogram(metric: m.Metric, registry: CollectorRegistry, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(metric.name, metric.help, metric.label_names, registry=registry, buckets=buckets)


@dataclass(frozen=True)
class _StageFamilies:
    """The stage metrics of one registry: a process with fused stages holds the series of each."""

    queue_depth: Gauge
    queue_capacity: Gauge
    in_flight: Gauge
    concurrency: Gauge
    queue_wait: Histogram
    duration: Histogram
    shed: Counter
    caller_deadlines: Counter


_stage_families: weakref.WeakKeyDictionary[CollectorRegistry, _StageFamilies] = weakref.WeakKeyDictionary()


def _families_of(registry: CollectorRegistry) -> _StageFamilies:
    families = _stage_families.get(registry)
    if families is None:
        families = _stage_families[registry] = _StageFamilies(
            _gauge(m.STAGE_QUEUE_DEPTH, registry),
            _gauge(m.STAGE_QUEUE_CAPACITY, registry),
            _gauge(m.STAGE_IN_FLIGHT, registry),
            _gauge(m.STAGE_CONCURRENCY, registry),
            _histogram(m.STAGE_QUEUE_WAIT, registry, _LATENCY_BUCKETS),
            _histogram(m.STAGE_DURATION, registry, _LATENCY_BUCKETS),
            _counter(m.STAGE_SHED, registry),
            _counter(m.STAGE_CALLER_DEADLINES, registry),
        )
    return families


class StageMetrics:
    def __init__(self, registry: CollectorRegistry, pipeline: str, stage: str, queue: AdmissionQueue) -> None:
        labels = {m.Label.PIPELINE.value: pipeline, m.Label.STAGE.value: stage}
        f = _families_of(registry)
        # Gauges read the queue when scraped: nothing to keep in sync on the hot path.
        f.queue_depth.labels(**labels).set_function(lambda: queue.depth)
        f.queue_capacity.labels(**labels).set(queue.capacity)
        f.in_flight.labels(**labels).set_function(lambda: queue.in_flight)
        f.concurrency.labels(**labels).set(queue.concurrency)
        self.queue_wait = f.queue_wait.labels(**labels)
        self._duration = f.duration
        self._labels = labels
        # These series exist from the start, at zero: PromQL's increase() cannot see the first errors of a
        # series that appears already at 6, so an error-rate query would read 0 exactly when it matters.
        # RESOURCE_EXHAUSTED too: sheds count against the SLO's error budget (the chart's alerts).
        for code in ("OK", *SERVER_ERROR_CODES, "RESOURCE_EXHAUSTED"):
            self._duration.labels(**labels, code=code)
        # By Shed.reason: refused as it came (a full queue), dropped from it, or the wait cap's.
        self.shed = {reason: f.shed.labels(**labels, reason=reason) for reason in ("rejected", "dropped", "wait_cap")}
        self.caller_deadlines = f.caller_deadlines.labels(**labels)

    def observe_call(self, code: str, seconds: float) -> None:
        self._duration.labels(**self._labels, code=code).observe(seconds)


class OpenCallSeconds:
    """Seconds that calls have been open, the ones still open included, so the total grows while a call
    waits; its rate over a window is the mean number of calls open in it (Little's law), which sees short
    calls a gauge read now and then would miss. O(1) per call; read from the scrape thread under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = 0.0  # seconds of the calls that ended
        self._open = 0
        self._starts = 0.0  # the sum of the open calls' start times
        self._last = 0.0

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        start = time.monotonic()
        with self._lock:
            self._open += 1
            self._starts += start
        try:
            yield
        finally:
            end = time.monotonic()
            with self._lock:
                self._open -= 1
                self._starts = self._starts - start if self._open else 0.0  # no rounding left to drift
                self._closed += end - start

    def total(self) -> float:
        with self._lock:
            now = self._closed + self._open * time.monotonic() - self._starts
            self._last = max(self._last, now)  # a counter never goes back, whatever the float rounding
            return self._last


class NextStageCalls(Collector):
    """The open-call seconds of each next stage a stage calls: what that stage scales on (see the operator's
    ScaledObject). Every series exists from the start."""

    def __init__(self, registry: CollectorRegistry, pipeline: str, stage: str) -> None:
        self._labels = [pipeline, stage]
        self._by_stage: dict[str, OpenCallSeconds] = {}
        registry.register(self)

    def to(self, stage: str) -> OpenCallSeconds:
        return self._by_stage.setdefault(stage, OpenCallSeconds())

    def collect(self) -> Iterator[CounterMetricFamily]:
        metric = m.STAGE_NEXT_CALL_SECONDS
        family = CounterMetricFamily(metric.name.removesuffix("_total"), metric.help, labels=metric.label_names)
        for to, seconds in self._by_stage.items():
            family.add_metric([*self._labels, to], seconds.total())
        yield family


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, pipeline: str, slo: SloSpec | None = None) -> None:
        labels = {m.Label.PIPELINE.value: pipeline}
        self._ttft = _histogram(m.GATEWAY_TTFT, registry, _LATENCY_BUCKETS).labels(**labels)
        self.tpot = _histogram(m.GATEWAY_TPOT, registry, _TOKEN_BUCKETS).labels(**labels)
        self.tokens = _counter(m.GATEWAY_OUTPUT_TOKENS, registry).labels(**labels)
        # The SLO as series, so one set of alerting rules serves every pipeline with its own objectives.
        objectives = _gauge(m.GATEWAY_SLO_OBJECTIVE, registry)
        self._ttft_objective: float | None = None
        if slo is not None:
            if slo.ttft_p95_milliseconds is not None:
                self._ttft_objective = slo.ttft_p95_milliseconds / 1000
                objectives.labels(**labels, objective="ttft_p95_seconds").set(self._ttft_objective)
            if slo.tpot_p95_milliseconds is not None:
                objectives.labels(**labels, objective="tpot_p95_seconds").set(slo.tpot_p95_milliseconds / 1000)
            if slo.error_rate is not None:
                objectives.labels(**labels, objective="error_rate").set(slo.error_rate)
        self._slow_first = _counter(m.GATEWAY_SLOW_FIRST_TOKENS, registry).labels(**labels)

    def first_token(self, seconds: float) -> None:
        """A call's time to first token, and whether it missed the TTFT objective."""
        self._ttft.observe(seconds)
        if self._ttft_objective is not None and seconds > self._ttft_objective:
            self._slow_first.inc()


def callers_refused(registry: CollectorRegistry, pipeline: str, stage: str) -> Callable[[str], None]:
    """`promptpipe_stage_callers_refused_total`: counts one refusal of the identity check, by status code."""
    counter = _counter(m.STAGE_CALLERS_REFUSED, registry)
    labels = {m.Label.PIPELINE.value: pipeline, m.Label.STAGE.value: stage}
    for code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):  # present from the start, at 0
        counter.labels(**labels, code=code)
    return lambda code: counter.labels(**labels, code=code).inc()


class QuotaStoreMetrics:
    """Whether the gateway's shared quota store answers, and how often it did not."""

    def __init__(self, registry: CollectorRegistry, pipeline: str) -> None:
        self._up = _gauge(m.GATEWAY_QUOTA_STORE_UP, registry).labels(pipeline)
        self._failures = _counter(m.GATEWAY_QUOTA_STORE_FAILURES, registry).labels(pipeline)
        self._up.set(1)

    def answered(self) -> None:
        self._up.set(1)

    def failed(self) -> None:
        self._up.set(0)
        self._failures.inc()


def serving_gauge(registry: CollectorRegistry, pipeline: str, stage: str, serving: Callable[[], bool]) -> None:
    """`promptpipe_stage_serving`, read from the stage's health when scraped."""
    labels = {m.Label.PIPELINE.value: pipeline, m.Label.STAGE.value: stage}
    _gauge(m.STAGE_SERVING, registry).labels(**labels).set_function(lambda: 1.0 if serving() else 0.0)


class LivenessMetrics:
    """How long a stage's calls have held its slots or its model, and whether it is stuck (`liveness`)."""

    def __init__(self, registry: CollectorRegistry, pipeline: str) -> None:
        self._pipeline = pipeline
        self._held = _gauge(m.STAGE_HELD, registry)
        self._stuck = _gauge(m.STAGE_STUCK, registry)

    def held(self, stage: str, what: str, seconds: Callable[[], float]) -> None:
        self._held.labels(self._pipeline, stage, what).set_function(seconds)

    def stuck(self, stage: str, stuck: Callable[[], bool]) -> None:
        self._stuck.labels(self._pipeline, stage).set_function(lambda: 1.0 if stuck() else 0.0)


class Failovers:
    """`promptpipe_failovers_total` of one process: calls whose part on `stage` moved mid-stream to another
    backend replica or stage pod, by why (`FAILOVER_REASONS`)."""

    def __init__(self, registry: CollectorRegistry, pipeline: str) -> None:
        self._counter = _counter(m.FAILOVERS, registry)
        self._pipeline = pipeline

    def count(self, stage: str, reason: str) -> None:
        self._counter.labels(pipeline=self._pipeline, stage=stage, reason=reason).inc()

    def series(self, stage: str) -> None:
        """Every reason's series for `stage`, there from the start."""
        for reason in m.FAILOVER_REASONS:
            self._counter.labels(pipeline=self._pipeline, stage=stage, reason=reason)


class BackendMetrics:
    def __init__(
        self, registry: CollectorRegistry, pipeline: str, backend: str, failovers: Failovers | None = None
    ) -> None:
        labels = {m.Label.PIPELINE.value: pipeline, m.Label.BACKEND.value: backend}
        self.tokens = _counter(m.BACKEND_GENERATED_TOKENS, registry).labels(**labels)
        self.cancelled = _counter(m.BACKEND_CANCELLED, registry).labels(**labels)
        self.active = _gauge(m.BACKEND_ACTIVE, registry).labels(**labels)
        # Counted inside llama.cpp's decode loop: proves generation stops, not just streaming.
        self.decoded = _counter(m.BACKEND_DECODED_TOKENS, registry).labels(**labels)
        self.circuit_open = _gauge(m.BACKEND_CIRCUIT_OPEN, registry).labels(**labels)
        routed = _counter(m.BACKEND_ROUTED, registry)
        self._routed = {reason: routed.labels(**labels, reason=reason) for reason in ROUTING_REASONS}
        self._home = self._decided = 0
        self._affinity = _gauge(m.BACKEND_AFFINITY_RATIO, registry).labels(**labels)
        self._replicas = ReplicaLoad(registry, [pipeline, backend])
        self._failovers = failovers or Failovers(registry, pipeline)
        self._failovers.series("inference")

    def failed_over(self, reason: str) -> None:
        """The inference stage carried a call on on another backend replica."""
        self._failovers.count("inference", reason)

    def routed(self, reason: str) -> None:
        self._routed[reason].inc()
        self._decided += 1
        self._home += reason == "home"
        self._affinity.set(self._home / self._decided)

    def replicas_from(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Where the per-replica in-flight gauge reads: the replicas known now, so a gone one's series goes."""
        self._replicas.source = source


# Every reason a routing decision may give (`promptpipe.backends.routing.Reason`), each series there from the start.
ROUTING_REASONS = ("home", "overflow", "circuit", "balanced")


class ReplicaLoad(Collector):
    def __init__(self, registry: CollectorRegistry, labels: list[str]) -> None:
        self._labels = labels
        self.source: Callable[[], Mapping[str, int]] = dict
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        metric = m.BACKEND_REPLICA_IN_FLIGHT
        family = GaugeMetricFamily(metric.name, metric.help, labels=metric.label_names)
        for replica, calls in self.source().items():
            family.add_metric([*self._labels, replica], calls)
        yield family


class TenantMetrics:
    """Per-tenant calls, tokens and queue depth, under a bounded label: the first TENANT_LABELS_MAX tenants
    seen keep their name, any later one is `other`."""

    def __init__(self, registry: CollectorRegistry, pipeline: str, queue: AdmissionQueue) -> None:
        self.pipeline = pipeline
        self._queue = queue
        self._calls = _counter(m.GATEWAY_TENANT_CALLS, registry)
        self._tokens = _counter(m.GATEWAY_TENANT_TOKENS, registry)
        self._labels: dict[str, str] = {}
        self._children: dict[tuple[str, str], Counter] = {}
        registry.register(_TenantQueueDepth(self))

    def label(self, tenant: str) -> str:
        value = self._labels.get(tenant)
        if value is None:
            named = sum(1 for v in self._labels.values() if v != "other")
            value = self._labels[tenant] = tenant if named < m.TENANT_LABELS_MAX else "other"
        return value

    def call(self, tenant: str, outcome: str) -> None:
        key = (tenant, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._calls.labels(self.pipeline, self.label(tenant), outcome)
        child.inc()

    def tokens(self, tenant: str, count: int) -> None:
        self._tokens.labels(self.pipeline, self.label(tenant)).inc(count)

    def depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tenant, value in self._labels.items():
            out[value] = out.get(value, 0) + self._queue.waiting(tenant)
        return out


class _TenantQueueDepth(Collector):
    def __init__(self, tenants: TenantMetrics) -> None:
        self._tenants = tenants

    def collect(self) -> Iterator[GaugeMetricFamily]:
        metric = m.GATEWAY_TENANT_QUEUE_DEPTH
        family = GaugeMetricFamily(metric.name, metric.help, labels=metric.label_names)
        for value, depth in self._tenants.depths().items():
            family.add_metric([self._tenants.pipeline, value], depth)
        yield family
