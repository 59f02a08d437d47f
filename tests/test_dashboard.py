"""The chart's Grafana dashboard, proven: every panel's query, and every variable's, runs against a real
Prometheus scraping a pipeline (five stage processes) while it serves and sheds, and returns series."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from tests.devcluster.build import Tools
from tests.support.cli import promptpipe
from tests.support.pipelines import running_pipeline, synthetic_pipeline
from tests.support.prometheus import prometheus, query, scraped

pytestmark = [pytest.mark.prometheus, pytest.mark.processes]

DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "promptpipe" / "files" / "dashboard.json"
NAMESPACE, PIPELINE = "team-a", "dash"


def promql(expr: str) -> str:
    """A panel's query as Grafana sends it with every namespace and pipeline selected."""
    return expr.replace("$namespace", ".*").replace("$pipeline", ".*")


def variable_query(text: str) -> str:
    """Grafana's `label_values(series, label)` as the PromQL that lists the same values."""
    found = re.fullmatch(r"label_values\((.+), (\w+)\)", text)
    assert found, text
    return f"group by ({found[2]}) ({promql(found[1])})"


def test_every_dashboard_query_returns_series_while_a_pipeline_serves(kube_tools: Tools, tmp_path: Path) -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    doc = synthetic_pipeline(
        PIPELINE,
        model={"synthetic": {"tokensPerSecond": 400, "firstTokenSeconds": 0.02}},
        generation={"maxNewTokens": 16},
        # A TTFT objective most calls miss, and an inference stage that sheds: every panel has data.
        slo={"ttftP95Milliseconds": 25, "errorRate": 0.01},
        stages={"inference": {"queue": {"capacity": 1, "concurrency": 1}}},
    )
    with running_pipeline(doc, tmp_path / "p") as pipeline:
        # As a ServiceMonitor does: each target's series get its namespace.
        targets = {f"127.0.0.1:{p.metrics_port}": {"namespace": NAMESPACE} for p in pipeline.run.stages.values()}
        with prometheus(kube_tools, tmp_path / "prometheus", targets) as url:
            for target in targets:
                scraped(url, target)
            load = ("--rate", "40", "--requests", "40", "-o", str(tmp_path / "b.json"))
            run = promptpipe("bench", "--target", pipeline.gateway, *load, home=tmp_path)
            assert run.returncode == 0, run.stderr
            assert "RESOURCE_EXHAUSTED" in run.stdout, "the inference stage shed some calls"
            for target in targets:
                scraped(url, target)

            for variable in dashboard["templating"]["list"]:
                if variable["type"] != "query":
                    continue
                rows = query(url, variable_query(variable["query"]["query"]))
                values = {next(iter(r["metric"].values())) for r in rows}
                assert (NAMESPACE if variable["name"] == "namespace" else PIPELINE) in values, variable["name"]

            results: dict[str, list[dict[str, Any]]] = {}
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    rows = query(url, promql(target["expr"]))
                    assert rows, f"panel {panel['title']!r} returned no series: {target['expr']}"
                    assert all(math.isfinite(float(r["value"][1])) for r in rows), panel["title"]
                    results[panel["title"]] = rows

    def values(title_start: str) -> dict[str, float]:
        rows = next(rows for title, rows in results.items() if title.startswith(title_start))
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in rows}

    shed = values("Shed requests per second, by reason")
    assert any('"reason": "rejected"' in k and '"stage": "inference"' in k and v > 0 for k, v in shed.items())
    assert all(v > 0 for v in values("Error budget burn rate").values()), "sheds are failed calls"
    assert all(v > 1 for v in values("TTFT budget burn rate").values()), "most first tokens came after 25 ms"
    waits = values("Queue wait by stage, mean")
    inference = next(v for k, v in waits.items() if '"stage": "inference"' in k)
    assert inference == max(waits.values()) > 0
    assert set(values("Stage replicas not serving").values()) == {0.0}
