"""`promptpipe analyze --jaeger URL`: calls read back from a tracing backend (Jaeger's query API), each
turned into the same per-stage record a bench run makes, so the same analysis splits them.

A trace holds each stage's span (named as `SPAN_NAMES` says, from its work slot to the call's end, its
queue wait as an attribute) and, around each call between stages, the caller's gRPC client span. A
stage's own work is its span less the client spans of the calls it made; the hop to a stage is its
caller's client span less the stage's queue wait and span. Traces carry no first-token time: the split
is of the end-to-end time."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any

from promptpipe.contract.tracing import QUEUE_WAIT_ATTRIBUTE, STAGE_OF_SPAN, service_name
from promptpipe.perf.records import STAGES, BenchResult, CallRecord, Level, StageShare

# Who calls whom: the gateway calls rag, assemble and post; post calls inference.
CALLER = {"rag": "stream", "assemble": "stream", "post": "stream", "inference": "post"}


class TraceSourceError(Exception):
    pass


def fetch(url: str, pipeline: str, limit: int = 500, lookback: str = "1h") -> list[dict[str, Any]]:
    """The pipeline's traces (those with a span of its gateway) from Jaeger's query API."""
    params = urllib.parse.urlencode({"service": service_name(pipeline, "stream"), "limit": limit, "lookback": lookback})
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/traces?{params}", timeout=30) as r:  # noqa: S310 - the user's URL
            data = json.loads(r.read())
    except (OSError, ValueError) as e:
        raise TraceSourceError(f"{url}: {e}") from None
    if data.get("errors"):
        raise TraceSourceError(f"{url}: {data['errors']}")
    return list(data.get("data") or [])


def record(trace: dict[str, Any], origin: float) -> CallRecord | None:
    """One call's record, or None for a trace without every stage's span (still arriving, or cut short)."""
    spans = trace["spans"]
    by_id = {s["spanID"]: s for s in spans}
    stage_of = {s["spanID"]: STAGE_OF_SPAN[s["operationName"]] for s in spans if s["operationName"] in STAGE_OF_SPAN}
    stage_span = {name: by_id[i] for i, name in stage_of.items()}
    if set(stage_span) != set(STAGES) or len(stage_of) != len(STAGES):
        return None

    def parent(span: dict[str, Any]) -> dict[str, Any] | None:
        refs = [r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"]
        return by_id.get(refs[0]) if refs else None

    def client_span(stage: str) -> dict[str, Any] | None:
        """The caller's span around the call to `stage`: its ancestor that is a child of the caller's span."""
        span: dict[str, Any] | None = stage_span[stage]
        caller_id = stage_span[CALLER[stage]]["spanID"]
        while span is not None and (up := parent(span)) is not None:
            if up["spanID"] == caller_id:
                return span
            span = up
        return None

    def queue(stage: str) -> float:
        for tag in stage_span[stage]["tags"]:
            if tag["key"] == QUEUE_WAIT_ATTRIBUTE:
                return float(tag["value"])
        return 0.0

    seconds = {name: s["duration"] / 1e6 for name, s in stage_span.items()}
    around: dict[str, float] = {}
    for stage in CALLER:
        span = client_span(stage)
        if span is None:
            return None
        around[stage] = span["duration"] / 1e6
    # A stage's span can end after its caller's client span did (the caller had the last message and went
    # on while the stage wound down; under load, by milliseconds): only what falls inside the caller's span
    # is the call's. Callers come first in CALLER, so a clipped post clips the inference call inside it.
    for stage, caller in CALLER.items():
        around[stage] = min(around[stage], seconds[caller])
        seconds[stage] = min(seconds[stage], max(0.0, around[stage] - queue(stage)))
    shares = []
    for stage in STAGES:
        called = sum(around[c] for c, caller in CALLER.items() if caller == stage)
        work = max(0.0, seconds[stage] - called)
        hop = max(0.0, around[stage] - queue(stage) - seconds[stage]) if stage in around else 0.0
        shares.append(StageShare(stage, queue(stage), work, work, hop, hop))
    failed = any(t["key"] == "error" and t["value"] is True for t in stage_span["stream"]["tags"])
    total = queue("stream") + seconds["stream"]
    return CallRecord(
        level=0,
        start=stage_span["stream"]["startTime"] / 1e6 - origin,
        status="ERROR" if failed else "OK",
        e2e=total,
        server_total=total,
        stages=tuple(shares),
    )


def result(url: str, pipeline: str, traces: list[dict[str, Any]]) -> BenchResult:
    """The traces as a result of one level: the calls that happened, at whatever load they came."""
    if not traces:
        raise TraceSourceError(f"no traces of pipeline {pipeline!r} at {url}")
    starts = [s["startTime"] / 1e6 for t in traces for s in t["spans"]]
    origin = min(starts)
    calls = [c for t in traces if (c := record(t, origin)) is not None]
    if not calls:
        raise TraceSourceError(f"no complete trace of pipeline {pipeline!r} at {url} (every stage's span)")
    calls.sort(key=lambda c: c.start)
    end = max(c.start + (c.e2e or 0.0) for c in calls)
    return BenchResult(url, "jaeger", [Level("traced", len(calls))], calls, [(calls[0].start, end)])
