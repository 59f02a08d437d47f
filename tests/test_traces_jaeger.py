"""Traces in a real backend: calls through the five stage processes, exported over OTLP to Jaeger, read
back through its query API: one trace per call, five stage spans linked across processes, the queue wait
on each, and no prompt text anywhere."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from promptpipe.cli.localrun import health_status
from promptpipe.client import PipelineClient
from promptpipe.contract.spec import StageName
from promptpipe.contract.tracing import service_name
from promptpipe.perf import records, traces
from promptpipe.v1 import stage_pb2, stage_pb2_grpc
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.support.cli import promptpipe
from tests.support.jaeger import assert_one_call, jaeger, stage_spans, whole
from tests.support.pipelines import running_pipeline, synthetic_pipeline

pytestmark = [pytest.mark.jaeger, pytest.mark.processes]

CALLS = 4
SECRET = "pumpernickel-4242"  # in every prompt: it must not reach any span


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

            def complete() -> list[dict[str, Any]] | None:
                traces = [t for t in backend.traces(gateway) if whole(t)]
                return traces if len(traces) >= CALLS else None

            traces = wait_until(complete, "every call's trace in Jaeger", 30, every=0.5)

    assert len(traces) == CALLS, "one trace per call"
    for trace in traces:
        assert_one_call(trace, "traced", SECRET, "secret word")


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


def stats(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stage_pb2_grpc.StageStub(channel).Stats(stage_pb2.StatsRequest(), timeout=5)  # type: ignore[no-untyped-call]


def post_chat(base_url: str, prompt: str, headers: dict[str, str]) -> None:
    body = {"model": "synthetic", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def caller_trace_id(kept_at_half: bool) -> str:
    """A W3C trace id whose low 64 bits a 0.5 ratio keeps (under 2^63) or drops."""
    low = random.getrandbits(62) | 1 if kept_at_half else 1 << 63 | random.getrandbits(62)
    return f"{random.getrandbits(64) | 1 << 60:016x}{low:016x}"


def test_spec_tracing_samples_whole_calls_and_a_callers_traceparent_cannot_trace_more_than_the_ratio(
    kube_tools: Tools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline file alone turns tracing on (no exporter asked for, no OTEL_ endpoint): half the calls
    are traced, each with every stage's span (the stages follow the gateway's decision), none in part. Over
    HTTP, a call whose caller sent a sampled W3C traceparent is traced only where the gateway's ratio keeps
    its trace id (a client cannot have more traced than the ratio says), and then as part of the caller's
    trace, under its span; one the caller did not sample leaves no span. Health probes and Stats polls, as
    a kubelet and a scaler send them, start no trace."""
    calls = 60
    with jaeger(kube_tools, tmp_path / "jaeger") as backend:
        for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        doc = synthetic_pipeline("sampled", tracing={"otlpEndpoint": backend.otlp, "sampleRatio": 0.5})
        with running_pipeline(doc, tmp_path / "p") as pipeline:

            async def grpc_calls() -> None:
                async with PipelineClient(pipeline.gateway) as client:
                    for i in range(calls):
                        async for _ in client.generate(f"call {i}: {SECRET}", max_new_tokens=4, timeout=30):
                            pass

            for stage in StageName:  # 20 probes each: traced at 0.5, some would start traces of their own
                for _ in range(10):
                    assert health_status(pipeline.stats_target(stage), 5.0) == "SERVING"
                    stats(pipeline.stats_target(stage))
            asyncio.run(grpc_calls())
            # At ratio 0.5 the gateway keeps a trace id whose low 64 bits are under 2^63 (TraceIdRatioBased).
            # (kept by the ratio, sampled by the caller): only the calls with both are traced.
            shapes = [(True, True), (True, True), (False, True), (False, True), (True, False), (True, False)]
            callers = {caller_trace_id(kept): (f"{random.getrandbits(63) | 1:016x}", on) for kept, on in shapes}
            for i, (trace_id, (span_id, on)) in enumerate(callers.items()):
                flags = "01" if on else "00"
                post_chat(
                    pipeline.openai_base_url, f"http {i}: {SECRET}", {"traceparent": f"00-{trace_id}-{span_id}-{flags}"}
                )
            sampled = {t: s for (t, (s, _)), (kept, on) in zip(callers.items(), shapes, strict=True) if kept and on}
            from_callers = {int(t, 16): int(s, 16) for t, (s, _) in callers.items()}
            gateway = service_name("sampled", "stream")

            def settled() -> list[dict[str, Any]] | None:
                """Every trace whole, and the callers' sampled ones in."""
                found = backend.traces(gateway, limit=1000)
                ids = {int(t["traceID"], 16) for t in found}
                callers_own = [int(t["traceID"], 16) in from_callers for t in found]
                done = all(whole(t, mine) for t, mine in zip(found, callers_own, strict=True))
                return found if done and {int(t, 16) for t in sampled} <= ids else None

            found = wait_until(settled, "the traced calls whole in Jaeger", 30, every=0.5)
            time.sleep(1)  # anything late (a partial trace, an unsampled call) would be in by now
            found = backend.traces(gateway, limit=1000)
            rag_traces = {t["traceID"] for t in backend.traces(service_name("sampled", "rag"), limit=1000)}

    by_id = {int(t["traceID"], 16): t for t in found}
    own = [t for i, t in by_id.items() if i not in from_callers]
    # Half of 60 at random: outside 10..50 once in about 10^7 runs.
    assert 10 <= len(own) <= 50, len(own)
    assert {t["traceID"] for t in found} == rag_traces, "a stage traces exactly the calls the gateway does"
    assert all(s["operationName"] != "/grpc.health.v1.Health/Check" for t in found for s in t["spans"])
    for trace in found:
        assert_one_call(trace, "sampled", SECRET)
    # The caller's sampled calls the ratio keeps are in its traces, the gateway's span under the caller's;
    # its sampled calls the ratio drops and its unsampled ones are nowhere.
    assert {i for i in by_id if i in from_callers} == {int(t, 16) for t in sampled}
    for trace_id in sampled:
        stream = stage_spans(by_id[int(trace_id, 16)])["stream"][0]
        parents = {int(r["spanID"], 16) for r in stream["references"] if r["refType"] == "CHILD_OF"}
        assert parents == {from_callers[int(trace_id, 16)]}
