"""The chart's alerting rules: promtool's unit tests (tests/alerts/) against the rules file, the
PrometheusRule the chart renders from that same file, and the series the rules read, as the stages
and the operator export them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import prometheus_client
import pytest
import yaml

from promptpipe.contract import metrics as m
from promptpipe.contract.spec import SloSpec
from promptpipe.runtime.metrics import GatewayMetrics, serving_gauge
from promptpipe_operator import metrics as operator_metrics
from promptpipe_operator.events import Event
from promptpipe_operator.reconcile import count_rollbacks
from promptpipe_operator.rollout import Decision, State
from tests.devcluster.build import Tools

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "charts" / "promptpipe" / "files" / "promptpipe-alerts.yaml"
UNIT_TESTS = ROOT / "tests" / "alerts" / "promptpipe-alerts-test.yaml"


def promtool(tools: Tools, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools.promtool), *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.prometheus
def test_the_rules_are_valid_and_pass_their_unit_tests(kube_tools: Tools) -> None:
    checked = promtool(kube_tools, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 18 rules found" in checked.stdout
    tested = promtool(kube_tools, "test", "rules", str(UNIT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@pytest.mark.prometheus
def test_a_rule_that_counted_cancelled_calls_as_errors_fails_the_unit_tests(kube_tools: Tools, tmp_path: Path) -> None:
    """The unit tests can fail: the same rules, with the caller's cancellations counted as the service's errors."""
    broken = tmp_path / "charts" / "promptpipe" / "files"
    broken.mkdir(parents=True)
    (broken / RULES.name).write_text(
        RULES.read_text()
        .replace('code!="CANCELLED"', 'code!="NONE"')
        .replace('RESOURCE_EXHAUSTED"}', 'RESOURCE_EXHAUSTED|CANCELLED"}')
    )
    tests = tmp_path / "tests" / "alerts"
    tests.mkdir(parents=True)
    (tests / UNIT_TESTS.name).write_text(UNIT_TESTS.read_text())
    tested = promtool(kube_tools, "test", "rules", str(tests / UNIT_TESTS.name))
    assert tested.returncode != 0 and 'pipeline="c"' in tested.stdout + tested.stderr


@pytest.mark.helm
def test_the_chart_installs_the_rules_file_as_a_prometheus_rule(kube_tools: Tools) -> None:
    chart = ROOT / "charts" / "promptpipe"

    def kinds(*args: str) -> list[dict[str, object]]:
        out = subprocess.run(
            [str(kube_tools.helm), "template", "pp", str(chart), "--kube-version", "1.32.4", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    docs = kinds("--set", "alerts.enabled=true", "--set", "alerts.labels.release=kps")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert rule["metadata"]["labels"]["release"] == "kps"  # type: ignore[index]
    assert not [d for d in kinds() if d["kind"] == "PrometheusRule"], "off by default"


def test_every_series_the_rules_read_is_one_promptpipe_exports() -> None:
    """Stage and gateway series as the contract names them; the operator's as its registry exports them."""
    exported = {x.name for x in m.ALL} | {f"{x.name}_count" for x in m.ALL if x.kind is m.Kind.HISTOGRAM}
    operator = [family for family in prometheus_client.REGISTRY.collect() if family.name.startswith("promptpipe_")]
    assert operator_metrics.ROLLBACKS.describe()[0].name in {f.name for f in operator}
    exported |= {f.name + ("_total" if f.type == "counter" else "") for f in operator}
    read = set(re.findall(r"\b(promptpipe_[a-z_]+)", RULES.read_text()))
    assert read and read <= exported, read - exported


def test_the_gateway_exports_its_slo_and_counts_late_first_tokens() -> None:
    registry = prometheus_client.CollectorRegistry()
    metrics = GatewayMetrics(registry, "p", SloSpec(ttft_p95_milliseconds=500, error_rate=0.01))
    for seconds in (0.1, 0.4, 0.6, 2.0):
        metrics.first_token(seconds)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"pipeline": "p", **labels})

    assert sample(m.GATEWAY_SLO_OBJECTIVE.name, objective="ttft_p95_seconds") == 0.5
    assert sample(m.GATEWAY_SLO_OBJECTIVE.name, objective="error_rate") == 0.01
    assert sample(m.GATEWAY_SLO_OBJECTIVE.name, objective="tpot_p95_seconds") is None  # not set: no series
    assert sample(m.GATEWAY_SLOW_FIRST_TOKENS.name) == 2
    assert sample(m.GATEWAY_TTFT.name + "_count") == 4

    without = prometheus_client.CollectorRegistry()
    GatewayMetrics(without, "q").first_token(60.0)
    assert without.get_sample_value(m.GATEWAY_SLOW_FIRST_TOKENS.name, {"pipeline": "q"}) == 0


def test_the_serving_gauge_follows_the_stages_health() -> None:
    registry = prometheus_client.CollectorRegistry()
    serving = [False]
    serving_gauge(registry, "p", "inference", lambda: serving[0])
    labels = {"pipeline": "p", "stage": "inference"}
    assert registry.get_sample_value(m.STAGE_SERVING.name, labels) == 0
    serving[0] = True
    assert registry.get_sample_value(m.STAGE_SERVING.name, labels) == 1


def test_a_rollback_is_counted_once_with_its_reason() -> None:
    def count() -> float:
        value = prometheus_client.REGISTRY.get_sample_value(
            "promptpipe_operator_rollbacks_total",
            {"pipeline_namespace": "team-a", "pipeline": "assistant", "reason": "AnalysisFailed"},
        )
        return value or 0.0

    before = count()
    rolled = State(reason="AnalysisFailed")
    count_rollbacks("team-a", "assistant", Decision(rolled, [Event("Warning", "RolledBack", "rolled back v2")]))
    count_rollbacks("team-a", "assistant", Decision(rolled, [Event("Normal", "Switched", "traffic on v2")]))
    assert count() == before + 1


def test_the_series_the_error_budget_counts_exist_at_zero_before_the_first_error() -> None:
    """increase() cannot see the first errors of a series born at 6: sheds and server errors start at 0."""
    from promptpipe.contract.codes import SERVER_ERROR_CODES
    from promptpipe.contract.spec import ShedPolicy
    from promptpipe.runtime.admission import AdmissionQueue
    from promptpipe.runtime.metrics import StageMetrics

    registry = prometheus_client.CollectorRegistry()
    queue = AdmissionQueue(capacity=1, concurrency=1, policy=ShedPolicy.REJECT_NEW, retry_after=1.0)
    StageMetrics(registry, "p", "stream", queue)
    for code in ("OK", "RESOURCE_EXHAUSTED", *SERVER_ERROR_CODES):
        labels = {"pipeline": "p", "stage": "stream", "code": code}
        assert registry.get_sample_value(f"{m.STAGE_DURATION.name}_count", labels) == 0, code
