"""`promptpipe analyze --prometheus URL`: the breakdown of a pipeline serving real traffic, from the
metrics its stages export, as a cluster's Prometheus has scraped them.

Prometheus keeps distributions, not calls, so this source splits the mean call: means add up (the
mean of a sum is the sum of the means), percentiles do not. Each stage's own time is its mean
duration less the mean calls it made; the hops to the stages it called fall in its share, as
Prometheus does not see the network. Queue waits come at p95 too, set against the gateway's p95 TTFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from promptpipe import promql as promql_client
from promptpipe.contract.metrics import GATEWAY_TTFT, STAGE_DURATION, STAGE_QUEUE_WAIT
from promptpipe.contract.spec import PipelineSpec
from promptpipe.perf.advice import knob
from promptpipe.perf.analysis import part_label
from promptpipe.perf.breakdown import PERCENTILES
from promptpipe.perf.records import STAGES

# Whom each stage calls (the gateway: rag, assemble and post; post: inference).
CALLS = {"stream": ("rag", "assemble", "post"), "post": ("inference",)}


@dataclass(frozen=True)
class StageFigures:
    stage: str
    calls_per_second: float
    queue_mean: float
    queue_p95: float
    duration_mean: float  # from its slot to the call's end, the stages it called included (OK calls)


@dataclass(frozen=True)
class PipelineFigures:
    pipeline: str
    window: str
    stages: dict[str, StageFigures]
    ttft: dict[int, float]  # the gateway's, at PERCENTILES

    @property
    def calls_per_second(self) -> float:
        gateway = self.stages.get("stream")
        return gateway.calls_per_second if gateway else 0.0

    def mean_parts(self) -> dict[str, float]:
        """The mean call, split: "<stage> queue" and "<stage> work" (its own, with the hops of its calls)."""
        parts: dict[str, float] = {}
        for name in STAGES:
            s = self.stages.get(name)
            if s is None:
                continue
            called = sum(self._whole(c) for c in CALLS.get(name, ()))
            parts[f"{name} queue"] = s.queue_mean
            parts[f"{name} work"] = max(0.0, s.duration_mean - called)
        return parts

    def _whole(self, stage: str) -> float:
        s = self.stages.get(stage)
        return s.queue_mean + s.duration_mean if s else 0.0


def _query(url: str, promql: str, label: str = "stage") -> dict[str, float]:
    """An instant query's vector, by its `label` ("" when it has none). NaN (no calls) is left out."""
    return promql_client.vector(url, promql, QUERY_TIMEOUT_SECONDS, label)


QUERY_TIMEOUT_SECONDS = 10.0


def figures(url: str, pipeline: str, window: str = "5m", namespace: str | None = None) -> PipelineFigures:
    """The pipeline's figures over the last `window` (a PromQL duration). Without `namespace`, a name that
    pipelines in several namespaces share is refused: their series would be summed as one pipeline's."""
    if not namespace:
        _one_namespace(url, pipeline, window)
    selector = f'pipeline="{pipeline}"' + (f',namespace="{namespace}"' if namespace else "")
    wait, duration, ttft = STAGE_QUEUE_WAIT.name, STAGE_DURATION.name, GATEWAY_TTFT.name

    def rate(metric: str, extra: str = "") -> str:
        return f"sum by (stage) (rate({metric}{{{selector}{extra}}}[{window}]))"

    ok = ',code="OK"'
    calls = _query(url, rate(f"{duration}_count", ok))
    queue_mean = _query(url, f"{rate(f'{wait}_sum')} / {rate(f'{wait}_count')}")
    queue_p95 = _query(
        url, f"histogram_quantile(0.95, sum by (stage, le) (rate({wait}_bucket{{{selector}}}[{window}])))"
    )
    duration_mean = _query(url, f"{rate(f'{duration}_sum', ok)} / {rate(f'{duration}_count', ok)}")
    stages = {
        name: StageFigures(name, calls[name], queue_mean.get(name, 0.0), queue_p95.get(name, 0.0), duration_mean[name])
        for name in STAGES
        if calls.get(name) and name in duration_mean
    }
    if not stages:
        raise promql_client.PrometheusError(f"no calls of pipeline {pipeline!r} in the last {window} at {url}")
    quantiles = {}
    for p in PERCENTILES:
        got = _query(url, f"histogram_quantile({p / 100}, sum by (le) (rate({ttft}_bucket{{{selector}}}[{window}])))")
        quantiles[p] = got.get("", math.nan)
    return PipelineFigures(pipeline, window, stages, quantiles)


def _one_namespace(url: str, pipeline: str, window: str) -> None:
    seen = f'count by (namespace) (count_over_time({STAGE_DURATION.name}_count{{pipeline="{pipeline}"}}[{window}]))'
    namespaces = sorted(_query(url, seen, "namespace"))
    if len(namespaces) > 1:
        raise promql_client.PrometheusError(
            f"pipeline {pipeline!r} runs in namespaces {', '.join(namespaces)}: name one with --namespace"
        )


# A queue whose p95 wait is at least this share of the gateway's p95 TTFT is the bottleneck named.
QUEUE_SHARE = 0.2


def bottleneck(fig: PipelineFigures, spec: PipelineSpec | None) -> str:
    """The sentence naming the bottleneck: the longest p95 queue wait, when it is a real share of p95 TTFT,
    else the biggest part of the mean call; with the knob that moves it."""
    load = f"{fig.calls_per_second:.3g} req/s"
    ttft = fig.ttft.get(95, math.nan)
    queued = max(fig.stages.values(), key=lambda s: s.queue_p95)
    if ttft > 0 and queued.queue_p95 >= QUEUE_SHARE * ttft:
        part = f"{queued.stage} queue"
        share = min(1.0, queued.queue_p95 / ttft)
        return (
            f"{part_label(part)} (p95 {queued.queue_p95 * 1000:.0f} ms) is {share:.0%} of p95 TTFT at {load}: "
            f"{knob(part, 'ttft', spec)}"
        )
    parts = fig.mean_parts()
    part = max(parts, key=lambda k: parts[k])
    total = sum(parts.values())
    share = parts[part] / total if total > 0 else 0.0
    return f"{part_label(part)} is {share:.0%} of the mean call at {load}: {knob(part, 'ttft', spec)}"
