"""The rollout analysis's Prometheus source against a real Prometheus scraping the real gateway metrics.

The same calls are judged from Prometheus (PromQL over the scraped series) and from the gateway's
own exposition (the operator's scrape source): both must reach the same verdict."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from promptpipe.contract.spec import PipelineSpec
from promptpipe_operator import analysis, rollout_checks
from tests.devcluster.build import Tools
from tests.support.prometheus import SCRAPE_SECONDS, gateway_exposition, prometheus, query, scraped

PIPELINE, NAMESPACE = "assistant", "team-a"


def spec(url: str, **analysis_: object) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "model": {"name": "smollm2", "backend": "tgi", "tgi": {"gpus": 1}},
            "rollout": {"analysis": {**analysis_, "prometheus": {"url": url, "scrapeInterval": SCRAPE_SECONDS}}},
        }
    )


def exposition_text(target: str) -> str:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_server_error_series_exist_at_zero_before_any_call() -> None:
    """Without them, increase() over a series born at 6 errors reads 0: the analysis would see no errors."""
    with gateway_exposition(PIPELINE) as gateway:
        text = exposition_text(gateway.target)
    for code in ("OK", *analysis.SERVER_ERROR_CODES):
        assert re.search(rf'promptpipe_stage_duration_seconds_count\{{[^}}]*code="{code}"[^}}]*\}} 0\.0', text), code


@pytest.mark.prometheus
def test_prometheus_and_the_gateway_scrape_reach_the_same_verdict(kube_tools: Tools, tmp_path: Path) -> None:
    with (
        gateway_exposition(PIPELINE) as gateway,
        prometheus(kube_tools, tmp_path / "prometheus", {gateway.target: {"namespace": NAMESPACE}}) as url,
    ):
        cfg = spec(url, minRequests=20, maxErrorRate=0.05, maxTtftP95Seconds=1.0)
        # Before the switch, and over a scrape interval before it: outside the range the analysis reads.
        gateway.calls({"OK": 10}, ttft_seconds=0.2)
        scraped(url, gateway.target)
        scraped(url, gateway.target)
        baseline = analysis.parse_gateway(exposition_text(gateway.target), PIPELINE)
        switched = time.monotonic()
        # 40 calls: 4 server errors (10%), 2 cancelled by their callers (not the model's fault);
        # 4 first tokens of 3 s, so p95 lands in the (2.5, 5] bucket.
        gateway.calls({"OK": 30, "UNAVAILABLE": 3, "INTERNAL": 1, "CANCELLED": 2}, ttft_seconds=0.2)
        gateway.calls({"OK": 4}, ttft_seconds=3.0)
        current = analysis.parse_gateway(exposition_text(gateway.target), PIPELINE)
        for _ in range(3):  # the calls' scrape is then older than the time since the switch
            scraped(url, gateway.target)
        since_switch = time.monotonic() - switched
        healthy, why = rollout_checks.analyse_prometheus(NAMESPACE, PIPELINE, since_switch, cfg)
        delta = analysis.since({"pod": current}, {"pod": baseline})
        from_scrape = analysis.verdict(
            delta.requests, delta.errors, analysis.quantile(0.95, delta.ttft_buckets), cfg.rollout.analysis
        )
        assert (healthy, from_scrape[0]) == (False, False), (why, from_scrape)
        assert "error rate 10.0% over 40 calls" in from_scrape[1]
        # increase() extrapolates each series to the range's edges (a series at zero not below zero), so
        # Prometheus's figures are estimates: close to the exact ones, never below them here.
        found = re.search(r"error rate ([\d.]+)% over (\d+) calls, TTFT p95 ([\d.]+)s", why)
        assert found, why
        rate, requests, p95 = float(found[1]) / 100, float(found[2]), float(found[3])
        assert rate == pytest.approx(0.10, abs=0.025) and 40 <= requests <= 60, why
        exact_p95 = analysis.quantile(0.95, delta.ttft_buckets)
        assert 2.5 < p95 <= 5.0 and p95 == pytest.approx(exact_p95, rel=0.15), (why, exact_p95)

        # The selector is the pipeline's and namespace's: another namespace's series are not counted.
        assert rollout_checks.analyse_prometheus("team-b", PIPELINE, since_switch, cfg)[0] is None
        assert query(url, 'count(promptpipe_stage_duration_seconds_count{namespace="team-a"})')


@pytest.mark.prometheus
def test_an_unreachable_or_refusing_prometheus_gives_no_verdict_and_says_why(kube_tools: Tools, tmp_path: Path) -> None:
    healthy, why = rollout_checks.analyse_prometheus(NAMESPACE, PIPELINE, 30, spec("http://127.0.0.1:9"))
    assert healthy is None and "could not be queried" in why
    with prometheus(kube_tools, tmp_path / "prometheus", {}) as url:
        healthy, why = rollout_checks.analyse_prometheus('a"b', PIPELINE, 30, spec(url))  # a broken selector
    assert healthy is None and "Prometheus refused the query" in why, why


@pytest.mark.processes
def test_what_a_server_other_than_prometheus_answers_is_never_copied_into_the_status() -> None:
    secret = "root:x:0:0:/etc/shadow-like-content"

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = (
                (400, json.dumps({"status": "error", "leak": secret}))
                if "leak" in self.path
                else (
                    200,
                    json.dumps({"anything": secret}),
                )
            )
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        for base in (url, f"{url}/leak"):
            healthy, why = rollout_checks.analyse_prometheus(NAMESPACE, PIPELINE, 30, spec(base))
            assert healthy is None and "not a Prometheus API answer" in why
            assert secret not in why
    finally:
        server.shutdown()
        thread.join()
