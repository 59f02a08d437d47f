"""Traces in a real backend: calls through the five stage processes, exported over OTLP to Jaeger, read
back through its query API: one trace per call, five stage spans linked across processes, the queue wait
on each, and no prompt text anywhere."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from promptpipe.client import PipelineClient
from promptpipe.contract.tracing import QUEUE_WAIT_ATTRIBUTE, service_name
from promptpipe.perf import records, traces
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.support.cli import promptpipe
from tests.support.jaeger import jaeger
from tests.support.pipelines import running_pipeline, synthetic_pipeline

pytestmark = [pytest.mark.jaeger, pytest.mark.processes]

STAGES = ("stream", "rag", "assemble", "post", "inference")
CALLS = 4
SECRET = "pumpernickel-4242"  # in every prompt: it must not reach any span


def stage_spans(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for span in trace["spans"]:
        if span["operationName"] in STAGES:
            out.setdefault(span["operationName"], []).append(span)
    return out


def ancestors(trace: dict[str, Any], span: dict[str, Any]) -> list[dict[str, Any]]:
    """The span's parents up to the root, nearest first."""
    by_id = {s["spanID"]: s for s in trace["spans"]}
    out = []
    while parents := [r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"]:
        span = by_id[parents[0]]
        out.append(span)
    return out


def test_one_trace_per_call_with_the_five_stage_spans_linked_across_processes(
    kube_tools: Tools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = synthetic_pipeline("traced", model={"synthetic": {"firstTokenSeconds": 0.01}})
    with jaeger(kube_tools, tmp_path / "jaeger") as backend:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", backend.otlp)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: spans leave soon after each call
        with running_pipeline(doc, tmp_path / "p", otel_exporter="otlp") as pipeline:

            async def calls() -> list[str]:
                ids = []
                async with PipelineClient(pipeline.gateway) as client:
                    for i in range(CALLS):
                        prompt = f"call {i}: the secret word is {SECRET}"
                        async for response in client.generate(prompt, session_id=f"s{i}", timeout=30):
                            if response.HasField("summary"):
                                ids.append(response.summary.request_id)
                return ids

            assert len(asyncio.run(calls())) == CALLS
            gateway = service_name("traced", "stream")

            def whole(trace: dict[str, Any]) -> bool:
                """Every stage's span in, and every span's parent: spans leave each process in batches."""
                ids = {s["spanID"] for s in trace["spans"]}
                parents = {r["spanID"] for s in trace["spans"] for r in s["references"] if r["refType"] == "CHILD_OF"}
                return stage_spans(trace).keys() == set(STAGES) and parents <= ids

            def complete() -> list[dict[str, Any]] | None:
                traces = [t for t in backend.traces(gateway) if whole(t)]
                return traces if len(traces) >= CALLS else None

            traces = wait_until(complete, "every call's trace in Jaeger", 30, every=0.5)

    assert len(traces) == CALLS, "one trace per call"
    for trace in traces:
        spans = stage_spans(trace)
        assert {name: len(s) for name, s in spans.items()} == dict.fromkeys(STAGES, 1), "one span per stage"
        one = {name: s[0] for name, s in spans.items()}
        # Each stage's span comes from its own process, under its own service name.
        for name, span in one.items():
            assert trace["processes"][span["processID"]]["serviceName"] == service_name("traced", name)
        # The gateway's span is the root of the stages; the others hang under it across processes (through
        # the gRPC client and server spans), inference under post, which calls it.
        assert not [a for a in ancestors(trace, one["stream"]) if a["operationName"] in STAGES]
        for name in ("rag", "assemble", "post"):
            above = [a["operationName"] for a in ancestors(trace, one[name]) if a["operationName"] in STAGES]
            assert above == ["stream"], name
        above = [a["operationName"] for a in ancestors(trace, one["inference"]) if a["operationName"] in STAGES]
        assert above == ["post", "stream"]
        # The queue wait rides on each stage span.
        for name, span in one.items():
            tags = {t["key"]: t["value"] for t in span["tags"]}
            assert QUEUE_WAIT_ATTRIBUTE in tags and float(tags[QUEUE_WAIT_ATTRIBUTE]) >= 0, name
        # No prompt text in any attribute, log or process tag of any span of the call.
        for span in trace["spans"]:
            values = [str(t["value"]) for t in span["tags"]]
            values += [str(f["value"]) for log in span.get("logs", []) for f in log["fields"]]
            assert not [v for v in values if SECRET in v or "secret word" in v], span["operationName"]
        for process in trace["processes"].values():
            assert not [t for t in process["tags"] if SECRET in str(t["value"])]


def test_analyze_reads_the_traces_and_names_the_slow_stage(
    kube_tools: Tools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The traces as a source: the same calls a bench run recorded, split from their spans alone."""
    doc = synthetic_pipeline(
        "traced",
        model={"synthetic": {"tokensPerSecond": 400, "firstTokenSeconds": 0.02}},
        stages={"inference": {"queue": {"capacity": 64, "concurrency": 1}}},
    )
    calls = 30
    with jaeger(kube_tools, tmp_path / "jaeger") as backend:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", backend.otlp)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        with running_pipeline(doc, tmp_path / "p", otel_exporter="otlp") as pipeline:
            out = tmp_path / "bench.json"
            load = ("--rate", "30", "--requests", str(calls), "--output-tokens", "16", "-o", str(out))
            run = promptpipe("bench", "--target", pipeline.gateway, *load, home=tmp_path)
            assert run.returncode == 0, run.stderr

            def complete() -> bool:
                traced = traces.result(backend.query, "traced", traces.fetch(backend.query, "traced"))
                return len(traced.calls) == calls

            wait_until(complete, "every call's trace in Jaeger", 30, every=0.5, retry_on=(traces.TraceSourceError,))
            traced = traces.result(backend.query, "traced", traces.fetch(backend.query, "traced"))
            analyzed = promptpipe("analyze", "--jaeger", backend.query, "--pipeline", "traced", home=tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr
    bottleneck = next(line for line in analyzed.stdout.splitlines() if line.startswith("bottleneck: "))
    assert bottleneck.startswith("bottleneck: inference queue wait is "), analyzed.stdout
    assert f"of p95 end-to-end time at {calls} traced calls" in bottleneck

    # The spans tell the same story as the calls' own timings: the mean inference queue wait, both ways.
    bench = records.load(out)

    def mean_wait(result: records.BenchResult) -> float:
        waits = [s.queue for c in result.calls for s in c.stages if s.stage == "inference"]
        return sum(waits) / len(waits)

    assert mean_wait(traced) == pytest.approx(mean_wait(bench), rel=0.05)
    for call in traced.calls:  # each trace's parts add up to the gateway's time, none negative
        parts = [x for s in call.stages for x in (s.queue, s.work, s.hop)]
        assert min(parts) >= 0 and sum(parts) == pytest.approx(call.e2e, rel=0.05)
