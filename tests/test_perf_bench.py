"""`promptpipe bench` and `analyze` as a user runs them, against real pipelines (five stage processes):
each call's breakdown adds up to what the client measured, and a stage made slow on purpose is named."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from promptpipe.perf import records
from promptpipe.perf.breakdown import split
from tests.devcluster.build import Tools
from tests.support.cli import promptpipe
from tests.support.pipelines import running_pipeline, synthetic_pipeline
from tests.support.prometheus import gateway_exposition, prometheus, scraped

pytestmark = pytest.mark.processes

# A backend with a visible first token and decode time, so every part of a call is there to measure.
FIRST_TOKEN = 0.02
TIMER_GRAIN = 0.001
BACKEND = {"model": {"synthetic": {"tokensPerSecond": 400, "firstTokenSeconds": FIRST_TOKEN}}}


def assert_each_call_adds_up(result: records.BenchResult, calls: int, first_token: float = 0.0) -> None:
    """Stage shares plus the unaccounted rest match the client's own TTFT and end-to-end time, within 5%;
    the backend's part of the TTFT is at least its `first_token` seconds."""
    ok = [c for c in result.calls if c.ok]
    assert len(ok) == calls, [c.status for c in result.calls if not c.ok]
    for c in ok:
        s = split(c)
        assert s is not None, "every call carries its per-stage timings"
        assert c.e2e is not None and c.ttft is not None and c.server_total is not None
        assert all(v >= 0 for v in (*s.e2e.values(), *s.ttft.values()))
        assert abs(s.e2e_sum - c.e2e) <= 0.05 * c.e2e, s.e2e
        assert abs(s.ttft_sum - c.ttft) <= 0.05 * c.ttft, s.ttft
        # The gateway's figures, which the shares add up to, are its own measurement: the client's is longer.
        assert c.server_total <= c.e2e
        assert {x.stage for x in c.stages} == {"stream", "rag", "assemble", "inference", "post"}
        # Within a millisecond: uvloop's timers count whole milliseconds from the loop's cached clock, so a
        # 20 ms sleep can end 0.3 ms early on time.perf_counter.
        least = first_token - TIMER_GRAIN
        assert s.ttft["inference work"] >= least > 0 or (first_token == 0 and s.ttft["inference work"] > 0)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_sweep_records_every_call_and_its_breakdown_adds_up(tmp_path: Path, transport: str) -> None:
    doc = synthetic_pipeline("sweep", **BACKEND, slo={"ttftP95Milliseconds": 500})
    with running_pipeline(doc, tmp_path / "p") as pipeline:
        target = pipeline.gateway if transport == "grpc" else pipeline.openai_base_url
        out = tmp_path / "bench.json"
        run = promptpipe(
            "bench",
            "--transport",
            transport,
            "--target",
            target,
            "--concurrency",
            "1,4",
            "--requests",
            "20",
            "--output-tokens",
            "12",
            "--turns",
            "2",
            "-f",
            str(tmp_path / "p" / "sweep.yaml"),
            "-o",
            str(out),
            home=tmp_path / "home",
        )
    assert run.returncode == 0, run.stderr
    assert "goodput" in run.stdout and "SLO at 4 concurrent: TTFT p95" in run.stdout
    result = records.load(out)
    assert [lv.label for lv in result.levels] == ["1 concurrent", "4 concurrent"]
    assert len(result.calls_of(0)) == len(result.calls_of(1)) == 20
    assert all(c.output_tokens == 12 for c in result.calls)
    # Multi-turn: the second turn of a session carries the first, and its answer, in its prompt.
    by_session: dict[str, list[records.CallRecord]] = {}
    for c in result.calls:
        by_session.setdefault(c.session, []).append(c)
    assert all(len(turns) == 2 for turns in by_session.values())
    assert all(t[1].prompt_tokens > t[0].prompt_tokens + 12 for t in by_session.values())
    assert_each_call_adds_up(result, 40, FIRST_TOKEN)
    assert out.with_suffix(".csv").read_text().count("\n") == 41

    report = tmp_path / "report"
    analyzed = promptpipe("analyze", str(out), "--report", str(report), home=tmp_path / "home")
    assert analyzed.returncode == 0, analyzed.stderr
    assert "bottleneck: " in analyzed.stdout and "accounting: " in analyzed.stdout
    series = json.loads((report / "series.json").read_text())
    assert series["latency_vs_load"]["load"] == [1, 4]
    assert sum(sum(c) for c in series["ttft_histogram"]["counts"].values()) == 40


def slow_pipeline(stage: str) -> dict[str, Any]:
    return synthetic_pipeline(
        "slow",
        **BACKEND,
        generation={"maxNewTokens": 16},
        stages={stage: {"queue": {"capacity": 64, "concurrency": 1}}},
    )


@pytest.mark.parametrize("stage", ["inference", "post"])
def test_a_stage_given_concurrency_1_under_load_is_named_as_the_bottleneck(tmp_path: Path, stage: str) -> None:
    """The post stage holds its slot for the whole of the inference call it makes: with one slot, calls
    queue there, not at inference, and analyze must tell the two apart."""
    with running_pipeline(slow_pipeline(stage), tmp_path / "p") as pipeline:
        out = tmp_path / "bench.json"
        run = promptpipe(
            "bench",
            "--target",
            pipeline.gateway,
            "--rate",
            "40",
            "--requests",
            "60",
            "--output-tokens",
            "16",
            "-o",
            str(out),
            home=tmp_path / "home",
        )
        assert run.returncode == 0, run.stderr
    analyzed = promptpipe("analyze", str(out), "-f", str(tmp_path / "p" / "slow.yaml"), home=tmp_path / "home")
    assert analyzed.returncode == 0, analyzed.stderr
    bottleneck = next(
        line for line in analyzed.stdout.splitlines() if line.startswith("bottleneck: ") and "TTFT" in line
    )
    assert bottleneck.startswith(f"bottleneck: {stage} queue wait is "), analyzed.stdout
    assert "of p95 TTFT at 40 req/s" in bottleneck
    assert f"`stages.{stage}.queue.concurrency` (now 1)" in bottleneck
    assert_each_call_adds_up(records.load(out), 60, FIRST_TOKEN)


QUICKSTART = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "quickstart.yaml"


@pytest.mark.model
def test_bench_and_analyze_the_quickstart_on_the_embedded_model(tmp_path: Path) -> None:
    """The user's journey: `up` the quickstart, bench it, analyze it against its own spec.slo."""
    home = tmp_path / "home"
    up = promptpipe("up", "-f", str(QUICKSTART), home=home)
    assert up.returncode == 0, up.stderr
    try:
        out = tmp_path / "bench.json"
        run = promptpipe(
            "bench", "--concurrency", "1,2", "--requests", "4", "--output-tokens", "16", "-o", str(out), home=home
        )
        assert run.returncode == 0, run.stderr
    finally:
        assert promptpipe("down", home=home).returncode == 0
    result = records.load(out)
    assert_each_call_adds_up(result, 8)
    # Real tokens: llama.cpp prefills the assembled prompt (the retrieved passages included) before the first.
    assert all(c.prompt_tokens > 50 and 0 < c.output_tokens <= 16 for c in result.calls)
    analyzed = promptpipe("analyze", str(out), "-f", str(QUICKSTART), "--report", str(tmp_path / "r"), home=home)
    assert analyzed.returncode == 0, analyzed.stderr
    assert "SLO at 1 concurrent: TTFT p95" in analyzed.stdout
    # One call at a time: nothing queues, the model's prefill is the first token's time.
    first = next(line for line in analyzed.stdout.splitlines() if line.startswith("bottleneck: "))
    assert first.startswith("bottleneck: inference work is ") and "of p95 TTFT at 1 concurrent" in first
    assert (tmp_path / "r" / "index.html").exists()


@pytest.mark.prometheus
def test_analyze_reads_a_pipelines_prometheus_and_names_the_slow_stage(kube_tools: Tools, tmp_path: Path) -> None:
    """A cluster's view: no bench result, only what Prometheus scraped from the five stages while they served."""
    with running_pipeline(slow_pipeline("inference"), tmp_path / "p") as pipeline:
        targets = {f"127.0.0.1:{proc.metrics_port}": {} for proc in pipeline.run.stages.values()}
        with prometheus(kube_tools, tmp_path / "prometheus", targets) as url:
            for target in targets:  # every counter seen at zero, so no call falls before its first sample
                scraped(url, target)
            out = tmp_path / "bench.json"
            run = promptpipe(
                "bench", "--target", pipeline.gateway, "--rate", "40", "--requests", "60", "-o", str(out), home=tmp_path
            )
            assert run.returncode == 0, run.stderr
            for target in targets:  # the calls' last series are in
                scraped(url, target)
            analyzed = promptpipe(
                "analyze",
                "--prometheus",
                url,
                "--pipeline",
                "slow",
                "--window",
                "2m",
                "-f",
                str(tmp_path / "p" / "slow.yaml"),
                home=tmp_path,
            )
    assert analyzed.returncode == 0, analyzed.stderr
    lines = analyzed.stdout.splitlines()
    bottleneck = next(line for line in lines if line.startswith("bottleneck: "))
    assert bottleneck.startswith("bottleneck: inference queue wait (p95 "), analyzed.stdout
    assert "`stages.inference.queue.concurrency` (now 1)" in bottleneck
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["inference"], ["stream"])}
    # 60 calls within a 2-minute window: each stage saw them all (rate × window, give or take the edges).
    assert 40 < float(rows["stream"][1]) * 120 < 80
    # The bench's own figures, from the same calls: the mean inference queue wait as both measured it.
    result = records.load(out)
    waits = [s.queue for c in result.calls for s in c.stages if s.stage == "inference"]
    assert float(rows["inference"][2]) == pytest.approx(1000 * sum(waits) / len(waits), rel=0.1)

    missing = promptpipe("analyze", "--prometheus", "http://127.0.0.1:9", "--pipeline", "slow", home=tmp_path)
    assert missing.returncode == 1 and "http://127.0.0.1:9" in missing.stderr


@pytest.mark.prometheus
def test_analyze_refuses_a_name_pipelines_in_two_namespaces_share_unless_told_which(
    kube_tools: Tools, tmp_path: Path
) -> None:
    """Summed, team-a's quick calls and team-b's slow ones would describe neither pipeline."""
    with gateway_exposition("assistant") as team_a, gateway_exposition("assistant") as team_b:
        targets = {team_a.target: {"namespace": "team-a"}, team_b.target: {"namespace": "team-b"}}
        with prometheus(kube_tools, tmp_path / "prometheus", targets) as url:
            for target in targets:  # every series seen at zero first
                scraped(url, target)
            team_a.calls({"OK": 30}, ttft_seconds=0.2)  # each call 0.3 s long at the gateway
            team_b.calls({"OK": 30}, ttft_seconds=3.0)
            for target in targets:
                scraped(url, target)
            args = ("analyze", "--prometheus", url, "--pipeline", "assistant", "--window", "2m")
            both = promptpipe(*args, home=tmp_path)
            one = promptpipe(*args, "--namespace", "team-a", home=tmp_path)
    assert both.returncode == 1
    assert "pipeline 'assistant' runs in namespaces team-a, team-b: name one with --namespace" in both.stderr
    assert one.returncode == 0, one.stderr
    stream = next(line.split() for line in one.stdout.splitlines() if line.split()[:1] == ["stream"])
    assert float(stream[4]) == pytest.approx(300, rel=0.05), one.stdout  # own work mean: team-a's alone
    p95 = re.search(r"gateway TTFT .*p95 ([\d.]+) ms", one.stdout)
    assert p95 is not None and float(p95[1]) < 1000, one.stdout
