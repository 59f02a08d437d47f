"""The stage's /metrics from its workers' (pure: real registries' expositions, merged)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from promptpipe.contract.spec import QueueSpec
from promptpipe.runtime.broker import BrokeredQueue, BrokerLink
from promptpipe.runtime.metrics import BackendMetrics, StageMetrics, serving_gauge
from promptpipe.runtime.metrics_merge import merge


def worker(calls: int, active: int, serving: bool, circuit_open: bool) -> str:
    registry = CollectorRegistry()
    stage = StageMetrics(registry, "p", "post", BrokeredQueue(BrokerLink(), QueueSpec(capacity=4, concurrency=2)))
    for _ in range(calls):
        stage.observe_call("OK", 0.003)
    stage.rejected.inc()
    backend = BackendMetrics(registry, "p", "tgi")
    backend.active.set(active)
    backend.circuit_open.set(1 if circuit_open else 0)
    serving_gauge(registry, "p", "post", lambda: serving)
    return generate_latest(registry).decode()


class Merged(Collector):
    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def collect(self):  # type: ignore[no-untyped-def]
        yield from merge(self.texts)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_counts_add_up_and_the_stage_wide_gauges_combine_as_the_whole_stage() -> None:
    registry = CollectorRegistry()
    registry.register(Merged([worker(3, 1, True, False), worker(5, 2, False, True)]))
    post = {"pipeline": "p", "stage": "post"}
    assert value(registry, "promptpipe_stage_duration_seconds_count", **post, code="OK") == 8
    assert value(registry, "promptpipe_stage_duration_seconds_bucket", **post, code="OK", le="0.005") == 8
    assert value(registry, "promptpipe_stage_shed_total", **post, reason="rejected") == 2
    tgi = {"pipeline": "p", "backend": "tgi"}
    assert value(registry, "promptpipe_backend_active_generations", **tgi) == 3  # generations: summed
    assert value(registry, "promptpipe_backend_circuit_open", **tgi) == 1  # open in any worker
    assert value(registry, "promptpipe_stage_serving", **post) == 0  # serving only while every worker does
    assert value(registry, "promptpipe_stage_queue_capacity", **post) == 4  # the stage's, not 4 per worker
    assert value(registry, "promptpipe_stage_concurrency", **post) == 2
    assert value(registry, "promptpipe_stage_queue_depth", **post) == 0
    # No worker's start time passes for the stage's.
    assert value(registry, "promptpipe_stage_shed_created", **post, reason="rejected") is None
    assert "# TYPE promptpipe_stage_duration_seconds histogram" in generate_latest(registry).decode()
