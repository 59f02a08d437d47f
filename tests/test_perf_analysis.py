"""`promptpipe bench` and `analyze`, their pure parts: load shapes, prompts, the result file, each call's
split, the split at each percentile, the knob, the SLO, the knee and the report's series."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest

from promptpipe.contract.spec import BackendKind, FusedStage, PipelineSpec, QueueSpec
from promptpipe.perf import records
from promptpipe.perf.advice import knob
from promptpipe.perf.analysis import analyze
from promptpipe.perf.breakdown import NETWORK, PARTS, Slo, at_percentiles, knee, percentile, split, summarize
from promptpipe.perf.load import parse_levels, poisson_arrivals
from promptpipe.perf.prompts import Conversation, Prompt, from_jsonl, synthetic
from promptpipe.perf.records import BenchResult, CallRecord, Level, StageShare
from promptpipe.perf.runner import Plan, prompt_source, run
from promptpipe.perf.transports import CallOutcome
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.errors import Shed


def stage(name: str, queue: float = 0.0, work: float = 0.0, first: float | None = None, hop: float = 0.0) -> StageShare:
    return StageShare(name, queue, work, work if first is None else first, hop, hop)


def call(
    level: int = 0,
    *,
    inference_queue: float = 0.0,
    inference_work: float = 0.1,
    inference_first: float = 0.02,
    client_gap: float = 0.002,
    tokens: int = 11,
    status: str = "OK",
) -> CallRecord:
    """A call whose shares add up to the gateway's figures, as own_timings makes them."""
    stages = (
        stage("rag", work=0.001, hop=0.001),
        stage("assemble", work=0.002, hop=0.001),
        stage("inference", queue=inference_queue, work=inference_work, first=inference_first, hop=0.003),
        stage("post", work=0.004, first=0.001, hop=0.001),
        stage("stream", queue=0.0005, work=0.006, first=0.002),
    )
    server_total = sum(s.queue + s.work + s.hop for s in stages)
    server_ttft = sum(s.queue + s.first + s.hop_first for s in stages)
    return CallRecord(
        level=level,
        start=0.0,
        status=status,
        ttft=server_ttft + client_gap / 2 if status == "OK" else None,
        e2e=server_total + client_gap if status == "OK" else 0.01,
        output_tokens=tokens if status == "OK" else 0,
        prompt_tokens=20,
        server_ttft=server_ttft if status == "OK" else None,
        server_total=server_total if status == "OK" else None,
        stages=stages if status == "OK" else (),
        itl=(0.008,) * (tokens - 1) if status == "OK" else (),
    )


def test_levels_are_one_kind_of_positive_numbers() -> None:
    assert parse_levels("1,4,16", None) == [Level("concurrency", 1), Level("concurrency", 4), Level("concurrency", 16)]
    assert parse_levels(None, "2.5") == [Level("rate", 2.5)]
    for concurrency, rate, problem in (
        (None, None, "one of"),
        ("1", "2", "one of"),
        ("1.5", None, "positive integer"),
        ("0", None, "positive integer"),
        (None, "x", "not a number"),
        (None, "-1", "positive number"),
    ):
        with pytest.raises(ValueError, match=problem):
            parse_levels(concurrency, rate)


def test_poisson_arrivals_keep_the_rate_the_window_and_the_count() -> None:
    times = poisson_arrivals(50.0, 20.0, 10_000, random.Random(1))
    assert times == sorted(times) and times[0] > 0 and times[-1] < 20.0
    assert len(times) == pytest.approx(1000, rel=0.1)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Exponential gaps: mean and standard deviation both 1/rate (a fixed pace would have none).
    mean = sum(gaps) / len(gaps)
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert mean == pytest.approx(0.02, rel=0.1) and sd == pytest.approx(0.02, rel=0.15)
    assert len(poisson_arrivals(50.0, 20.0, 7, random.Random(1))) == 7


def test_prompts_from_a_jsonl_file_name_the_line_that_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hi", "max_tokens": 5}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    assert from_jsonl(good) == [Prompt(text="hi", max_new_tokens=5), Prompt(messages=(("user", "yo"),))]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: needs a non-empty"):
        from_jsonl(bad)
    bad.write_text('{"prompt": "hi"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2:"):
        from_jsonl(bad)


def test_a_conversation_carries_its_history_into_each_turn() -> None:
    talk = Conversation("s1", 3)
    first = talk.next(Prompt(text="one", max_new_tokens=4))
    assert first.messages == (("user", "one"),) and first.max_new_tokens == 4
    talk.answered("answer one")
    second = talk.next(Prompt(text="two"))
    assert second.messages == (("user", "one"), ("assistant", "answer one"), ("user", "two"))


def test_synthetic_prompts_have_the_asked_length_in_words() -> None:
    p = synthetic(50, 7, random.Random(3))
    assert len(p.text.split()) == 50 and p.max_new_tokens == 7


class CountingTransport:
    """Answers every call at once and remembers the prompts it was sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def call(self, prompt: Prompt, session: str, timeout: float) -> CallOutcome:
        self.sent.append(prompt.text)
        return CallOutcome(ttft=0.001, e2e=0.002, output_tokens=2)

    async def close(self) -> None:
        pass


def test_warmup_calls_go_first_and_are_not_recorded() -> None:
    transport = CountingTransport()
    prompts = prompt_source(None, 8, 2)
    levels = [Level("concurrency", 2), Level("concurrency", 1)]
    result = asyncio.run(run(Plan(levels, 5, 60.0, prompts, warmup=3), transport, BenchResult("t", "grpc", levels)))
    assert len(transport.sent) == 3 + 5 + 5, "three warm-up calls, then each level's five"
    assert [len(result.calls_of(i)) for i in range(2)] == [5, 5]
    assert min(c.start for c in result.calls) >= 0, "the run's clock starts after the warm-up"


def test_a_calls_parts_add_up_to_what_its_client_measured() -> None:
    c = call(inference_queue=0.05, client_gap=0.004)
    s = split(c)
    assert s is not None and c.ttft is not None and c.e2e is not None
    assert set(s.ttft) == set(PARTS) == set(s.e2e)
    assert s.e2e_sum == pytest.approx(c.e2e) and s.ttft_sum == pytest.approx(c.ttft)
    assert s.e2e["inference queue"] == s.ttft["inference queue"] == 0.05
    assert s.ttft["inference work"] == 0.02 and s.e2e["inference work"] == 0.1
    # Every hop between processes and the client's own: 0.001 + 0.001 + 0.003 + 0.001 + 0.004.
    assert s.e2e[NETWORK] == pytest.approx(0.010)
    tpot = s.tpot()
    assert sum(tpot.values()) == pytest.approx((c.e2e - c.ttft) / 10)
    assert tpot["inference work"] == pytest.approx(0.08 / 10)
    assert split(call(status="RESOURCE_EXHAUSTED")) is None


def test_the_split_at_each_percentile_finds_what_makes_the_slow_calls_slow() -> None:
    # 90 calls that wait for nothing, 10 that wait 200 ms in the inference queue.
    calls = [call() for _ in range(90)] + [call(inference_queue=0.2) for _ in range(10)]
    splits = [s for s in map(split, calls) if s is not None]
    rows = {r.percentile: r for r in at_percentiles(splits, "ttft")}
    assert rows[50].dominant()[0] == "inference work"
    part, share = rows[99].dominant()
    assert part == "inference queue" and share > 0.8
    for r in rows.values():
        assert sum(r.parts.values()) == pytest.approx(r.value)
    assert rows[99].value == pytest.approx(calls[-1].ttft)


def test_the_knob_is_named_as_the_spec_spells_it_with_its_value_now() -> None:
    spec = PipelineSpec.model_validate(
        {"model": {"name": "m"}, "rag": {"enabled": False}, "stages": {"inference": {"queue": {"concurrency": 3}}}}
    )
    advice = knob("inference queue", "ttft", spec)
    assert "`stages.inference.queue.concurrency` (now 3)" in advice
    assert "`stages.inference.scaling.maxReplicas` (now 4)" in advice
    # The embedded model (llamacpp, the default) takes its calls in turn: more slots are not the answer.
    assert "only moves the wait into it" in advice and "batching backend" in advice
    synthetic = spec.model_copy(update={"model": spec.model.model_copy(update={"backend": BackendKind.SYNTHETIC})})
    assert knob("inference queue", "ttft", synthetic).startswith("raise `stages.inference.queue.concurrency` (now 3)")
    assert "`stages.post.queue.concurrency`" in knob("post queue", "ttft", None)
    prefill = knob("inference work", "ttft", spec)
    assert "`template.maxPromptTokens` (now 1536)" in prefill and "rag.topK" not in prefill  # rag is off
    assert "rag.topK" in knob("inference work", "ttft", None)
    assert "gRPC" in knob(NETWORK, "ttft", spec)
    # post fused into inference has inference's replicas.
    fused = spec.model_copy(update={"fuse": [FusedStage.POST]})
    assert "`stages.post.queue.concurrency` (now 64) or `stages.inference.scaling.maxReplicas`" in knob(
        "post queue", "ttft", fused
    )


def bench_result(levels: list[Level], per_level: list[list[CallRecord]]) -> BenchResult:
    result = BenchResult("127.0.0.1:1", "grpc", levels)
    for i, calls in enumerate(per_level):
        result.calls += [CallRecord(**{**c.__dict__, "level": i}) for c in calls]
        result.windows.append((i * 10.0, i * 10.0 + 10.0))
    return result


def test_a_level_reports_what_load_tools_report_and_its_goodput() -> None:
    calls = [call() for _ in range(8)] + [call(inference_queue=0.5)] + [call(status="RESOURCE_EXHAUSTED")]
    result = bench_result([Level("rate", 1.0)], [calls])
    s = summarize(result, 0, Slo(ttft_p95=0.1, tpot_p95=0.05, error_rate=0.05))
    assert s.calls == 10 and s.ok == 9 and s.statuses == {"OK": 9, "RESOURCE_EXHAUSTED": 1}
    assert s.requests_per_second == pytest.approx(0.9) and s.output_tokens_per_second == pytest.approx(9.9)
    assert s.goodput == pytest.approx(0.8)  # the slow call and the shed one miss it
    assert s.error_rate == pytest.approx(0.1)
    verdicts = {name: met for name, _, _, met in s.slo_verdicts(Slo(ttft_p95=0.1, error_rate=0.05))}
    assert verdicts == {"TTFT p95": False, "error rate": False}
    assert s.itl[50] == pytest.approx(0.008)
    assert summarize(result, 0, Slo()).goodput is None


def test_the_knee_is_the_last_level_before_latency_leaves_its_curve() -> None:
    fast, slow = [call() for _ in range(10)], [call(inference_queue=0.3) for _ in range(10)]
    levels = [Level("concurrency", n) for n in (1, 2, 4, 8)]
    result = bench_result(levels, [fast, fast, slow, slow])
    summaries = [summarize(result, i, Slo()) for i in range(4)]
    assert knee(summaries, Slo()) == 1
    assert knee(summaries[:2], Slo()) is None
    assert knee(summaries[:2], Slo(ttft_p95=0.001)) == 0  # the SLO is missed from the second level on


def test_analyze_names_the_bottleneck_with_its_share_load_and_knob() -> None:
    calls = [call(inference_queue=0.2 + i / 1000) for i in range(40)]
    model = {"name": "m", "backend": "synthetic"}
    spec = PipelineSpec.model_validate({"model": model, "slo": {"ttftP95Milliseconds": 100}})
    analysis = analyze(bench_result([Level("rate", 12)], [calls]), spec)
    ttft = analysis.levels[0].findings[0]
    assert ttft.metric == "TTFT" and ttft.percentile == 95 and ttft.part == "inference queue"
    sentence = ttft.sentence()
    assert sentence.startswith("inference queue wait is ") and "% of p95 TTFT at 12 req/s: raise" in sentence
    assert analysis.slo.ttft_p95 == 0.1
    assert max(analysis.sum_errors()) < 1e-9


def test_a_result_file_round_trips_and_its_csv_has_a_row_per_call(tmp_path: Path) -> None:
    result = bench_result([Level("concurrency", 2)], [[call(), call(status="DEADLINE_EXCEEDED")]])
    result.meta["seed"] = 4
    csv_path = records.save(result, tmp_path / "r.json")
    again = records.load(tmp_path / "r.json")
    assert again == result
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["status"] for r in rows] == ["OK", "DEADLINE_EXCEEDED"]
    assert rows[0]["load"] == "2 concurrent" and float(rows[0]["inference_work"]) == pytest.approx(0.1)
    assert rows[1]["inference_work"] == ""
    (tmp_path / "old.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(ValueError, match="version 1"):
        records.load(tmp_path / "old.json")


def test_the_report_draws_the_series_it_says(tmp_path: Path) -> None:
    from promptpipe.perf import report

    fast, slow = [call() for _ in range(20)], [call(inference_queue=0.3 + i / 100) for i in range(20)]
    levels = [Level("concurrency", n) for n in (1, 2, 4)]
    analysis = analyze(bench_result(levels, [fast, fast, slow]), slo=Slo(ttft_p95=0.2))
    files = report.write(analysis, tmp_path / "report")
    assert {f.name for f in files} == {*(f"{n}.png" for n in report.FIGURES), "series.json", "index.html"}
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    data = json.loads((tmp_path / "report" / "series.json").read_text())

    composition = data["ttft_composition"]
    assert data["composition_of"] == "time to first token"
    assert list(composition) == ["1 concurrent", "2 concurrent", "4 concurrent"]
    assert list(composition["4 concurrent"]) == ["p50", "p95", "p99"]
    p99 = composition["4 concurrent"]["p99"]
    assert max(p99, key=p99.get) == "inference queue"
    assert sum(p99.values()) == pytest.approx(1000 * percentile([c.ttft for c in slow if c.ttft], 99), rel=1e-3)

    load = data["latency_vs_load"]
    assert load["load"] == [1, 2, 4] and load["slo_ttft_p95"] == 200.0 and load["knee"] == 2
    assert load["ttft_p95"][2] > 300 > load["ttft_p95"][0]

    waterfall = data["waterfall"]["calls"]
    assert len(waterfall) == 12 and [w["e2e"] for w in waterfall] == sorted((w["e2e"] for w in waterfall), reverse=True)
    assert all(w["level"] == "4 concurrent" for w in waterfall)
    assert sum(waterfall[0]["parts"].values()) == pytest.approx(waterfall[0]["e2e"], rel=1e-3)

    for name in ("ttft_histogram", "tpot_histogram"):
        hist = data[name]
        assert hist["values"] == 60 and len(hist["edges"]) == 31
        assert {level: sum(c) for level, c in hist["counts"].items()} == dict.fromkeys(composition, 20)
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") == len(report.FIGURES)
    assert "inference queue wait is" in html and "missed" in html


def test_prometheus_figures_split_the_mean_call_and_name_a_long_queue() -> None:
    from promptpipe.perf.prometheus import PipelineFigures, StageFigures, bottleneck

    def fig(inference_queue_p95: float) -> PipelineFigures:
        stages = {
            "stream": StageFigures("stream", 10.0, 0.001, 0.002, 0.5),
            "rag": StageFigures("rag", 10.0, 0.0, 0.0, 0.01),
            "assemble": StageFigures("assemble", 10.0, 0.0, 0.0, 0.02),
            "post": StageFigures("post", 10.0, 0.0, 0.0, 0.45),
            "inference": StageFigures("inference", 10.0, 0.1, inference_queue_p95, 0.3),
        }
        return PipelineFigures("p", "5m", stages, {50: 0.1, 90: 0.2, 95: 0.25, 99: 0.3})

    parts = fig(0.2).mean_parts()
    # The mean call is the gateway's queue wait and duration; its parts add up to it.
    assert sum(parts.values()) == pytest.approx(0.501)
    assert parts["post work"] == pytest.approx(0.45 - 0.4)
    assert parts["stream work"] == pytest.approx(0.5 - 0.01 - 0.02 - 0.45)
    named = bottleneck(fig(0.2), None)
    assert named.startswith("inference queue wait (p95 200 ms) is 80% of p95 TTFT at 10 req/s: raise")
    # A short queue is not named: the biggest part of the mean call is.
    assert bottleneck(fig(0.01), None).startswith("inference work is 60% of the mean call at 10 req/s")


def test_a_trace_becomes_a_call_record_split_like_a_bench_call() -> None:
    from promptpipe.contract.tracing import QUEUE_WAIT_ATTRIBUTE
    from promptpipe.perf import traces

    spans: list[dict[str, object]] = []

    def span(span_id: str, name: str, parent: str | None, start: int, micros: int, queue: float | None = None) -> None:
        tags = [{"key": QUEUE_WAIT_ATTRIBUTE, "type": "float64", "value": queue}] if queue is not None else []
        refs = [{"refType": "CHILD_OF", "traceID": "t", "spanID": parent}] if parent else []
        spans.append(
            {"spanID": span_id, "operationName": name, "references": refs, "startTime": start, "duration": micros,
             "tags": tags}
        )  # fmt: skip

    # The gateway's 100 ms span calls rag (client span 3 ms), assemble (4 ms) and post (90 ms); post calls
    # inference (client span 80 ms), which waited 50 ms for its slot and worked 28 ms.
    span("g", "stream", "root", 1_000_000, 100_000, queue=0.002)
    span("root", "/promptpipe.v1.Gateway/Generate", None, 999_000, 103_000)
    for name, micros, work in (("rag", 3_000, 2_000), ("assemble", 4_000, 3_000)):
        span(f"c-{name}", "/promptpipe.v1.Stage/Process", "g", 1_001_000, micros)
        span(f"s-{name}", "/promptpipe.v1.Stage/Process", f"c-{name}", 1_001_100, micros - 200)
        span(name, name, f"s-{name}", 1_001_200, work, queue=0.0)
    span("c-post", "/promptpipe.v1.Stage/Run", "g", 1_008_000, 90_000)
    span("post", "post", "c-post", 1_008_500, 89_000, queue=0.0)
    span("c-inf", "/promptpipe.v1.Stage/Run", "post", 1_009_000, 80_000)
    span("inference", "infer", "c-inf", 1_059_500, 28_000, queue=0.05)
    call = traces.record({"spans": spans}, origin=1.0)
    assert call is not None and call.ok and call.start == 0.0
    assert call.e2e == pytest.approx(0.102)
    shares = {s.stage: s for s in call.stages}
    assert shares["stream"].work == pytest.approx(0.100 - 0.003 - 0.004 - 0.090)
    assert shares["post"].work == pytest.approx(0.089 - 0.080)
    assert shares["inference"].queue == 0.05 and shares["inference"].work == pytest.approx(0.028)
    assert shares["inference"].hop == pytest.approx(0.080 - 0.05 - 0.028)
    assert shares["rag"].hop == pytest.approx(0.001)
    s = split(call)
    assert s is not None and s.e2e_sum == pytest.approx(0.102) and s.ttft == {}
    # Traces split the end-to-end time, in the report too.
    from promptpipe.perf import report

    traced = BenchResult("jaeger", "jaeger", [Level("traced", 1)], [call], [(0.0, 0.102)])
    data = report.series(analyze(traced))
    assert data["composition_of"] == "end-to-end time"
    assert sum(data["ttft_composition"]["1 traced call"]["p50"].values()) == pytest.approx(102.0)
    # A trace still missing a stage's span is no call yet.
    assert traces.record({"spans": [x for x in spans if x["operationName"] != "infer"]}, origin=1.0) is None
    # Post's span outlives the gateway's call to it by 12 ms (it wound down after its last message): only
    # what falls inside the gateway's span is the call's, so the parts still add up to the gateway's time.
    late = [{**x, "duration": 101_500} if x["spanID"] == "post" else x for x in spans]
    late_call = traces.record({"spans": late}, origin=1.0)
    assert late_call is not None and late_call.e2e is not None
    late_split = split(late_call)
    assert late_split is not None and late_split.e2e_sum == pytest.approx(late_call.e2e)
    assert {s.stage: s for s in late_call.stages}["post"].hop == 0.0


def test_analyze_piped_into_a_file_keeps_each_verdict_on_one_line(tmp_path: Path) -> None:
    """A report read by a script or pasted into a ticket: no line is wrapped at rich's 80 columns."""
    from typer.testing import CliRunner

    from promptpipe.cli.main import app

    calls = [call(inference_queue=0.2 + i / 1000) for i in range(40)]
    path = tmp_path / "bench.json"
    records.save(bench_result([Level("concurrency", 16)], [calls]), path)
    slo = ["--slo-ttft-ms", "150", "--slo-tpot-ms", "5"]
    result = CliRunner().invoke(app, ["analyze", str(path), *slo], env={"COLUMNS": ""})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    slo_line = next(line for line in lines if line.startswith("SLO at 16 concurrent: "))
    assert slo_line.endswith(("met", "missed")) and "TPOT p95" in slo_line
    accounting = next(line for line in lines if line.startswith("accounting: "))
    assert accounting.endswith("40 calls)")
    bottleneck = next(line for line in lines if line.startswith("bottleneck: inference queue wait"))
    assert bottleneck.endswith("calls wait for a free slot") and len(bottleneck) > 80


async def test_analyze_names_the_stage_whose_wait_cap_refused_or_ended_calls() -> None:
    # The refusals' words as the queue says them (not copied here): one refused, one ended at the cap.
    q = AdmissionQueue.of(QueueSpec(concurrency=1, max_wait_milliseconds=1), "inference")
    async with q.slot(5.0):
        await asyncio.sleep(0.01)  # a slot-time of about 10 ms, ten times the cap
    words = []
    async with q.slot(5.0):
        for _ in range(2):
            try:
                async with q.slot(5.0):
                    pass
            except Shed as refused:
                words.append(str(refused))
            q._slot_seconds = 0.0  # the next one is let in to wait, and waits past the cap
    assert words[0].startswith("stage inference: expected wait") and words[1].startswith("stage inference: waited")
    capped = [CallRecord(**{**call(status="RESOURCE_EXHAUSTED").__dict__, "error": w}) for w in words]
    full = CallRecord(**{**call(status="RESOURCE_EXHAUSTED").__dict__, "error": "stage post: queue full (1 waiting)"})
    result = bench_result([Level("rate", 1.0)], [[call(), *capped, full]])
    assert summarize(result, 0, Slo()).wait_capped == {"inference": 2}


def test_analyze_counts_the_calls_a_stage_carried_on_mid_stream_and_a_result_file_keeps_them(tmp_path: Path) -> None:
    def failed_over(times: int) -> CallRecord:
        c = call()
        shares = tuple(dataclasses.replace(s, failovers=times) if s.stage == "inference" else s for s in c.stages)
        return dataclasses.replace(c, stages=shares)

    result = bench_result([Level("rate", 1.0)], [[call(), failed_over(1), failed_over(2), call()]])
    assert summarize(result, 0, Slo()).failed_over == {"inference": (2, 3)}
    records.save(result, tmp_path / "run.json")
    assert summarize(records.load(tmp_path / "run.json"), 0, Slo()).failed_over == {"inference": (2, 3)}
    assert summarize(bench_result([Level("rate", 1.0)], [[call()]]), 0, Slo()).failed_over == {}
