"""Is the new version healthy? Gateway metrics in, a verdict out: pure functions, no I/O.

Counters come from every gateway pod's /metrics (a snapshot per pod; the baseline is
the snapshot at the switch) or from Prometheus. Only server-side failures count as
errors: a client's bad request, cancellation or load shedding says nothing about the model,
and neither does a deadline the client chose shorter than the gateway's timeout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from promptpipe.contract import metrics
from promptpipe.contract.codes import SERVER_ERROR_CODES
from promptpipe.contract.spec import AnalysisSpec, StageName

CALLS = metrics.series(metrics.STAGE_DURATION, "_count")
CALLER_DEADLINES = metrics.series(metrics.STAGE_CALLER_DEADLINES)
TTFT_BUCKETS = metrics.series(metrics.GATEWAY_TTFT, "_bucket")
GATEWAY_STAGE = StageName.STREAM.value  # the stage that serves the public API


@dataclass(frozen=True)
class Counts:
    requests: float = 0.0
    errors: float = 0.0
    ttft_buckets: dict[str, float] = field(default_factory=dict)  # upper bound ("+Inf" too) → cumulative count

    def as_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "ttftBuckets": dict(self.ttft_buckets)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Counts:
        return Counts(
            float(data.get("requests", 0)),
            float(data.get("errors", 0)),
            {str(k): float(v) for k, v in (data.get("ttftBuckets") or {}).items()},
        )


def parse_gateway(text: str, pipeline: str) -> Counts:
    """One gateway pod's exposition → its counters for `pipeline`."""
    requests = errors = 0.0
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("pipeline") != pipeline:
                continue
            if sample.name == CALLS and labels.get("stage") == GATEWAY_STAGE:
                requests += sample.value
                if labels.get("code") in SERVER_ERROR_CODES:
                    errors += sample.value
            elif sample.name == CALLER_DEADLINES and labels.get("stage") == GATEWAY_STAGE:
                errors -= sample.value  # counted among the DEADLINE_EXCEEDED ones: the caller's
            elif sample.name == TTFT_BUCKETS:
                le = labels["le"]
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return Counts(requests, errors, buckets)


def since(now: dict[str, Counts], baseline: dict[str, Counts]) -> Counts:
    """What happened across pods since the baseline. A pod whose counters went down restarted:
    all it counted is new. A pod that is new counts from zero."""
    requests = errors = 0.0
    buckets: dict[str, float] = {}
    for pod, cur in now.items():
        base = baseline.get(pod, Counts())
        if cur.requests < base.requests:
            base = Counts()
        requests += cur.requests - base.requests
        errors += cur.errors - base.errors
        for le, count in cur.ttft_buckets.items():
            buckets[le] = buckets.get(le, 0.0) + count - base.ttft_buckets.get(le, 0.0)
    return Counts(requests, errors, buckets)


def quantile(q: float, buckets: dict[str, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets: linear within the bucket."""
    bounds = sorted(((math.inf if le == "+Inf" else float(le)), count) for le, count in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in bounds:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # above the highest finite bucket: its bound, as Prometheus does
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def verdict(requests: float, errors: float, ttft_p95: float | None, cfg: AnalysisSpec) -> tuple[bool | None, str]:
    """(False, why) to roll back; (True, summary) if within thresholds; (None, why) if too few calls to tell."""
    if requests < cfg.min_requests:
        return None, f"{requests:.0f} calls since the switch, fewer than minRequests {cfg.min_requests}"
    rate = errors / requests if requests else 0.0
    summary = f"error rate {rate:.1%} over {requests:.0f} calls"
    if ttft_p95 is not None:
        summary += f", TTFT p95 {ttft_p95:.3f}s"
    if rate > cfg.max_error_rate:
        return False, f"{summary}: error rate above maxErrorRate {cfg.max_error_rate:.1%}"
    if cfg.max_ttft_p95_seconds is not None and ttft_p95 is not None and ttft_p95 > cfg.max_ttft_p95_seconds:
        return False, f"{summary}: TTFT p95 above maxTtftP95Seconds {cfg.max_ttft_p95_seconds:g}s"
    return True, summary


def prometheus_queries(namespace: str, pipeline: str, seconds: float) -> dict[str, str]:
    """The PromQL the Prometheus source runs (the `namespace` label comes from the ServiceMonitor)."""
    sel = f'namespace="{namespace}",pipeline="{pipeline}"'
    codes = "|".join(SERVER_ERROR_CODES)
    window = f"[{max(round(seconds * 1000), 1000)}ms]"  # to the millisecond: a second more reaches an older scrape
    return {
        "requests": f'sum(increase({CALLS}{{{sel},stage="{GATEWAY_STAGE}"}}{window}))',
        # Server errors, less the deadlines callers chose (`or vector(0)`: a missing series is none).
        "errors": f'(sum(increase({CALLS}{{{sel},stage="{GATEWAY_STAGE}",code=~"{codes}"}}{window})) or vector(0))'
        f' - (sum(increase({CALLER_DEADLINES}{{{sel},stage="{GATEWAY_STAGE}"}}{window})) or vector(0))',
        "ttft_p95": f"histogram_quantile(0.95, sum by (le) (increase({TTFT_BUCKETS}{{{sel}}}{window})))",
    }
