"""One /metrics for a stage's worker processes: their expositions merged into the stage's series.

Each worker counts its own calls; the stage's figure is the sum (counters, histograms, and gauges that
count things: generations running, and the calls each worker has waiting or working in the stage's one
queue). A few gauges say something of the whole stage instead: its queue's capacity and concurrency (the
same in every worker), serving only while every worker serves (min), a circuit open in any worker (max),
a ratio averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from statistics import fmean

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from promptpipe.contract import metrics as m

# Gauges of the stage as a whole: how the workers' values combine (every other series is summed).
_COMBINE: dict[str, Callable[[list[float]], float]] = {
    m.STAGE_QUEUE_CAPACITY.name: max,
    m.STAGE_CONCURRENCY.name: max,
    m.STAGE_SERVING.name: min,
    m.BACKEND_CIRCUIT_OPEN.name: max,
    m.GATEWAY_SLO_OBJECTIVE.name: max,
    m.BACKEND_AFFINITY_RATIO.name: fmean,
}


def merge(expositions: Sequence[str]) -> Iterator[Metric]:
    """The families of the workers' text expositions, each series combined across workers."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            series = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):  # per process; a merged series has no one start
                    continue
                series.setdefault((sample.name, tuple(sorted(sample.labels.items()))), []).append(sample.value)
    for name, family in families.items():
        combine = _COMBINE.get(name, _sum)
        for (sample_name, labels), each in values[name].items():
            family.add_sample(sample_name, dict(labels), combine(each))
        yield family


def _sum(values: list[float]) -> float:
    return float(sum(values))
