"""The rollout decision and the analysis, as pure functions."""

from __future__ import annotations

import datetime as dt

import pytest

from promptpipe.contract.pipeline_file import parse_pipeline
from promptpipe.contract.spec import AnalysisSpec, NoVerdict, RolloutSpec
from promptpipe.localproc import free_port
from promptpipe.registry.errors import UNREACHABLE_EXIT
from promptpipe.registry.settings import RegistrySettings
from promptpipe.registry.store import Registry
from promptpipe_operator.analysis import Counts, parse_gateway, quantile, since, verdict
from promptpipe_operator.pods import gave_up, metrics_urls, pod_problem
from promptpipe_operator.rollout import (
    ANALYZING,
    BLUE,
    GREEN,
    PROGRESSING,
    ROLLED_BACK,
    STABLE,
    TARGET_PODS_POLL_SECONDS,
    Observed,
    Slot,
    State,
    decide,
    only_pinned,
    ts,
    wake_in,
)
from promptpipe_operator.rollout_checks import digest_of

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
CFG = RolloutSpec.model_validate({"keepPrevious": "10m", "progressDeadline": "5m", "analysis": {"window": "2m"}})


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def obs(desired: str | None, seconds: float = 0, generation: int = 1, **kw: object) -> Observed:
    return Observed(desired, generation, at(seconds), **kw)  # type: ignore[arg-type]


STABLE_V1 = State(active=Slot("v1", BLUE))


def test_the_first_version_is_deployed_on_blue_without_a_rollout() -> None:
    d = decide(State(), obs("v1"), CFG)
    assert d.state.active == Slot("v1", BLUE) and d.state.phase == STABLE and d.switched


def test_happy_path_green_ready_smoke_switch_analysis_then_blue_expires() -> None:
    d = decide(STABLE_V1, obs("v2"), CFG)
    assert d.state.phase == PROGRESSING and d.state.target == Slot("v2", GREEN) and not d.switched
    assert decide(d.state, obs("v2", 5), CFG).state == d.state, "waits for green"
    d = decide(d.state, obs("v2", 30, target_ready=True, smoke=(True, "ok")), CFG)
    assert d.switched and d.state.phase == ANALYZING
    assert (d.state.active, d.state.previous) == (Slot("v2", GREEN), Slot("v1", BLUE))
    d = decide(d.state, obs("v2", 60, verdict=(True, "fine")), CFG)
    assert d.state.phase == ANALYZING
    d = decide(d.state, obs("v2", 151, verdict=(True, "fine")), CFG)
    assert d.state.phase == STABLE and d.state.previous == Slot("v1", BLUE), "kept for keepPrevious"
    assert d.state.previous_until == ts(at(151 + 600))
    assert decide(d.state, obs("v2", 751), CFG).state.previous is None
    assert [h["result"] for h in d.state.history] == ["Succeeded"]


@pytest.mark.parametrize(
    ("observed", "reason"),
    [
        ({"seconds": 301}, "ProgressDeadlineExceeded"),
        ({"seconds": 10, "target_failed": "ProgressDeadlineExceeded: pods crash"}, "ProgressDeadlineExceeded"),
        ({"seconds": 10, "target_ready": True, "smoke": (False, "HTTP 500")}, "SmokeTestFailed"),
        (
            {"seconds": 40, "target_gave_up": "pod p-1: init container fetch-model failed (exit 1, 2 restarts)"},
            "TargetFailing",
        ),
    ],
)
def test_green_that_cannot_serve_is_rolled_back_before_any_traffic(observed: dict[str, object], reason: str) -> None:
    progressing = decide(STABLE_V1, obs("v2"), CFG).state
    d = decide(progressing, obs("v2", **observed), CFG)  # type: ignore[arg-type]
    assert d.state.phase == ROLLED_BACK and d.state.reason == reason
    assert d.state.active == Slot("v1", BLUE) and d.state.deployed() == [Slot("v1", BLUE)]
    assert not d.switched, "traffic never left blue"
    assert decide(d.state, obs("v2", 400), CFG).state.phase == ROLLED_BACK, "not retried for the same spec"
    retried = decide(d.state, obs("v2", 400, generation=2), CFG).state
    assert retried.phase == PROGRESSING and retried.target == Slot("v2", GREEN), "retried once the spec changes"


def test_why_green_does_not_serve_is_shown_while_waiting_and_in_the_rollback() -> None:
    progressing = decide(STABLE_V1, obs("v2"), CFG).state
    why = "pod p-1: init container fetch-model failed (exit 1): error: model.safetensors: …"
    waiting = decide(progressing, obs("v2", 10, target_pods=why), CFG).state
    assert waiting.phase == PROGRESSING and waiting.message == why
    d = decide(waiting, obs("v2", 301, target_pods=why), CFG)
    assert d.state.phase == ROLLED_BACK and d.state.message == f"v2 not Ready and smoke-tested within 300s: {why}"


def pod(init: list[dict[str, object]], containers: list[dict[str, object]]) -> dict[str, object]:
    return {"metadata": {"name": "p-1"}, "status": {"initContainerStatuses": init, "containerStatuses": containers}}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (
            pod(
                [
                    {
                        "name": "fetch-model",
                        "state": {
                            "terminated": {
                                "exitCode": 1,
                                "reason": "Error",
                                "message": "pulling\nerror: config.json: missing\n",
                            }
                        },
                    }
                ],
                [{"name": "tgi", "state": {"waiting": {"reason": "PodInitializing"}}}],
            ),
            "pod p-1: init container fetch-model failed (exit 1): error: config.json: missing",
        ),
        # Restarted by the kubelet: the failure is in lastState while it waits to run again.
        (
            pod(
                [
                    {
                        "name": "fetch-model",
                        "restartCount": 3,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}},
                    }
                ],
                [],
            ),
            "pod p-1: init container fetch-model failed (exit 2, 3 restarts): Error",
        ),
        (
            pod([], [{"name": "tgi", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]),
            "pod p-1: container tgi ImagePullBackOff: not found",
        ),
        (
            pod(
                [{"name": "fetch-model", "state": {"running": {}}}],
                [{"name": "tgi", "state": {"waiting": {"reason": "PodInitializing"}}}],
            ),
            "",
        ),
        (
            pod(
                [{"name": "fetch-model", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
                [{"name": "tgi", "state": {"running": {}}}],
            ),
            "",
        ),
    ],
)
def test_a_pods_status_says_why_it_does_not_serve(status: dict[str, object], expected: str) -> None:
    assert pod_problem(status) == expected


def test_a_container_is_given_up_on_after_its_third_failure_not_before() -> None:
    def failing(restarts: int) -> dict[str, object]:
        fetch = {
            "name": "fetch-model",
            "restartCount": restarts,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "error: config.json: does not match"}},
        }
        return pod([fetch], [{"name": "tgi", "state": {"waiting": {"reason": "PodInitializing"}}}])

    assert gave_up([failing(1)]) == "", "a second failure may still be a passing one (a network error)"
    assert gave_up([failing(2)]) == (
        "pod p-1: init container fetch-model failed (exit 1, 2 restarts): error: config.json: does not match"
    )
    running = pod([{"name": "fetch-model", "restartCount": 5, "state": {"running": {}}}], [])
    assert gave_up([running]) == "", "running again after failures: not failing now"


def test_only_ready_pods_with_an_address_and_a_metrics_port_are_scraped() -> None:
    def gateway(name: str, ready: str, ip: str | None, port: str = "metrics") -> dict[str, object]:
        return {
            "metadata": {"name": name},
            "spec": {
                "containers": [
                    {"ports": [{"name": "grpc", "containerPort": 50051}, {"name": port, "containerPort": 9090}]}
                ]
            },
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
        }

    found = metrics_urls(
        [
            gateway("a", "True", "10.0.0.1"),
            gateway("b", "False", "10.0.0.2"),
            gateway("c", "True", None),
            gateway("d", "True", "10.0.0.4", port="http"),
        ]
    )
    assert found == {"a": "http://10.0.0.1:9090/metrics"}


def test_bad_analysis_puts_traffic_back_on_blue() -> None:
    s = decide(decide(STABLE_V1, obs("v2"), CFG).state, obs("v2", 5, target_ready=True, smoke=(True, "")), CFG).state
    assert decide(s, obs("v2", 20, verdict=(None, "too few calls")), CFG).state.phase == ANALYZING
    d = decide(s, obs("v2", 30, verdict=(False, "error rate 40%")), CFG)
    assert d.switched and d.state.active == Slot("v1", BLUE) and d.state.reason == "AnalysisFailed"
    assert d.events[-1].reason == "RolledBack" and "error rate 40%" in d.events[-1].message


def test_manual_rollback_while_analysing_after_and_when_nothing_is_left() -> None:
    s = decide(decide(STABLE_V1, obs("v2"), CFG).state, obs("v2", 5, target_ready=True, smoke=(True, "")), CFG).state
    d = decide(s, obs("v2", 10, rollback_request="r1"), CFG)
    assert d.switched and d.state.active == Slot("v1", BLUE) and d.state.reason == "ManualRollback"
    assert decide(d.state, obs("v2", 11, rollback_request="r1"), CFG).state == d.state, "handled once"
    d2 = decide(d.state, obs("v2", 12, rollback_request="r2"), CFG)
    assert d2.events[0].reason == "RollbackUnavailable" and d2.state.active == Slot("v1", BLUE)


def test_undoing_the_change_cancels_green_and_a_new_one_retargets_it() -> None:
    s = decide(STABLE_V1, obs("v2"), CFG).state
    assert decide(s, obs("v3", 5), CFG).state.target == Slot("v3", GREEN)
    cancelled = decide(s, obs("v1", 5), CFG).state
    assert cancelled.phase == STABLE and cancelled.target is None


def test_wake_ups_follow_deadline_analysis_and_expiry() -> None:
    s = decide(STABLE_V1, obs("v2"), CFG).state
    assert wake_in(s, CFG, at(0)) == TARGET_PODS_POLL_SECONDS, "green's pods are looked at while it comes up"
    assert wake_in(s, CFG, at(298)) == 2, "and the deadline is kept"
    s = decide(s, obs("v2", 5, target_ready=True, smoke=(True, "")), CFG).state
    assert wake_in(s, CFG, at(5)) == CFG.analysis.interval
    assert wake_in(STABLE_V1, CFG, at(0)) is None


def test_state_survives_the_status_round_trip() -> None:
    s = decide(decide(STABLE_V1, obs("v2"), CFG).state, obs("v2", 5, target_ready=True, smoke=(True, "")), CFG).state
    assert State.from_status(s.to_status()) == s


GATEWAY = """
# TYPE promptpipe_stage_duration_seconds histogram
promptpipe_stage_duration_seconds_count{pipeline="p",stage="stream",code="OK"} 90
promptpipe_stage_duration_seconds_count{pipeline="p",stage="stream",code="UNAVAILABLE"} 6
promptpipe_stage_duration_seconds_count{pipeline="p",stage="stream",code="RESOURCE_EXHAUSTED"} 4
promptpipe_stage_duration_seconds_count{pipeline="other",stage="stream",code="INTERNAL"} 50
# TYPE promptpipe_gateway_time_to_first_token_seconds histogram
promptpipe_gateway_time_to_first_token_seconds_bucket{pipeline="p",le="0.1"} 50
promptpipe_gateway_time_to_first_token_seconds_bucket{pipeline="p",le="0.5"} 90
promptpipe_gateway_time_to_first_token_seconds_bucket{pipeline="p",le="+Inf"} 100
"""


def test_gateway_counters_count_server_errors_only_and_per_pipeline() -> None:
    c = parse_gateway(GATEWAY, "p")
    assert (c.requests, c.errors) == (100, 6), "shedding is not the model's fault; other pipelines are not counted"
    assert quantile(0.5, c.ttft_buckets) == pytest.approx(0.1)
    assert quantile(0.95, c.ttft_buckets) == pytest.approx(0.5), "in +Inf: the highest finite bound"
    assert quantile(0.7, c.ttft_buckets) == pytest.approx(0.1 + 0.4 * (70 - 50) / 40)


def test_deltas_across_pods_handle_restarts_and_new_pods() -> None:
    base = {"a": Counts(100, 1), "b": Counts(50, 0)}
    now = {"a": Counts(130, 4), "b": Counts(5, 5), "c": Counts(10, 0)}  # b restarted, c is new
    d = since(now, base)
    assert (d.requests, d.errors) == (30 + 5 + 10, 3 + 5)


def test_the_verdict_needs_enough_calls_and_names_the_threshold() -> None:
    cfg = AnalysisSpec(min_requests=20, max_error_rate=0.05, max_ttft_p95_seconds=1.0)
    assert verdict(10, 10, None, cfg)[0] is None
    assert verdict(100, 4, 0.5, cfg)[0] is True
    ok, why = verdict(100, 6, 0.5, cfg)
    assert ok is False and "maxErrorRate" in why
    ok, why = verdict(100, 0, 1.5, cfg)
    assert ok is False and "maxTtftP95Seconds" in why


QUIET = "3 calls since the switch, fewer than minRequests 20"


def switched_and_quiet(cfg: RolloutSpec) -> State:
    """v2 switched to at 30 s; an analysis at 60 s had too few calls to judge."""
    d = decide(STABLE_V1, obs("v2"), cfg)
    d = decide(d.state, obs("v2", 30, target_ready=True, smoke=(True, "ok")), cfg)
    d = decide(d.state, obs("v2", 60, verdict=(None, QUIET)), cfg)
    assert d.state.phase == ANALYZING and not d.state.judged
    return d.state


def test_a_window_without_a_verdict_holds_by_default_until_one_comes() -> None:
    d = decide(switched_and_quiet(CFG), obs("v2", 151, verdict=(None, QUIET)), CFG)
    # Held: traffic stays on v2, v1 keeps running (not expired), the status and a Warning event say why.
    assert d.state.phase == ANALYZING and (d.state.active, d.state.previous) == (Slot("v2", GREEN), Slot("v1", BLUE))
    assert (d.state.reason, d.state.message) == ("AnalysisHeld", f"held without a verdict: {QUIET}")
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "RolloutHeld")] and QUIET in d.events[0].message
    assert d.state.previous_until == "" and not d.switched
    # The analysis goes on every interval (not in a tight loop for the passed window), the event said once.
    assert wake_in(d.state, CFG, at(152)) == pytest.approx(CFG.analysis.interval - 1)
    assert decide(d.state, obs("v2", 155), CFG).state == d.state, "between analyses, nothing changes"
    d = decide(d.state, obs("v2", 161, verdict=(None, QUIET)), CFG)
    assert d.state.phase == ANALYZING and d.events == []
    assert d.state.message == f"held without a verdict: {QUIET}"
    # Calls come: a verdict decides.
    passed = decide(d.state, obs("v2", 171, verdict=(True, "error rate 0.0% over 40 calls")), CFG)
    assert passed.state.phase == STABLE and passed.state.history[-1]["reason"] == "AnalysisPassed"
    assert passed.state.previous_until == ts(at(171 + 600))
    failed = decide(d.state, obs("v2", 171, verdict=(False, "error rate 30% over maxErrorRate")), CFG)
    assert failed.state.phase == ROLLED_BACK and failed.state.active == Slot("v1", BLUE) and failed.switched


def test_on_no_verdict_promote_promotes_only_with_the_reason_said() -> None:
    cfg = CFG.model_copy(update={"analysis": AnalysisSpec(window=120, on_no_verdict=NoVerdict.PROMOTE)})
    d = decide(switched_and_quiet(cfg), obs("v2", 151, verdict=(None, QUIET)), cfg)
    assert d.state.phase == STABLE and d.state.previous == Slot("v1", BLUE)
    assert d.state.history[-1]["reason"] == "AnalysisInconclusive"
    assert (d.state.reason, d.state.message) == ("AnalysisInconclusive", f"promoted without a verdict: {QUIET}")
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "RolloutInconclusive")]
    assert QUIET in d.events[0].message


def test_on_no_verdict_rollback_goes_back_to_the_previous_version() -> None:
    cfg = CFG.model_copy(update={"analysis": AnalysisSpec(window=120, on_no_verdict=NoVerdict.ROLLBACK)})
    d = decide(switched_and_quiet(cfg), obs("v2", 151, verdict=(None, QUIET)), cfg)
    assert d.state.phase == ROLLED_BACK and d.state.active == Slot("v1", BLUE) and d.switched
    assert (d.state.reason, d.state.message) == ("AnalysisInconclusive", f"no verdict: {QUIET}")


def test_a_held_rollout_gives_way_to_another_version() -> None:
    held = decide(switched_and_quiet(CFG), obs("v2", 151, verdict=(None, QUIET)), CFG).state
    d = decide(held, obs("v3", 160), CFG)
    assert d.state.phase == PROGRESSING and d.state.target == Slot("v3", BLUE)
    assert d.state.history[-1]["reason"] == "AnalysisInconclusive"


def test_one_conclusive_verdict_in_the_window_makes_it_a_pass() -> None:
    d = decide(STABLE_V1, obs("v2"), CFG)
    d = decide(d.state, obs("v2", 30, target_ready=True, smoke=(True, "ok")), CFG)
    d = decide(d.state, obs("v2", 60, verdict=(True, "error rate 0.0% over 40 calls")), CFG)
    assert d.state.judged and State.from_status(d.state.to_status()).judged
    d = decide(d.state, obs("v2", 151), CFG)
    assert d.state.history[-1]["reason"] == "AnalysisPassed" and d.state.reason == ""
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "RolloutSucceeded")]


def test_deadlines_the_callers_chose_are_not_the_models_errors() -> None:
    text = GATEWAY + (
        "# TYPE promptpipe_stage_duration_seconds histogram\n"
        'promptpipe_stage_duration_seconds_count{pipeline="q",stage="stream",code="OK"} 80\n'
        'promptpipe_stage_duration_seconds_count{pipeline="q",stage="stream",code="DEADLINE_EXCEEDED"} 20\n'
        "# TYPE promptpipe_stage_caller_deadline_exceeded counter\n"
        'promptpipe_stage_caller_deadline_exceeded_total{pipeline="q",stage="stream"} 18\n'
    )
    c = parse_gateway(text, "q")
    assert (c.requests, c.errors) == (100, 2), "18 of the 20 deadlines were the callers' own, shorter than the timeout"


def test_a_version_whose_digest_cannot_be_read_is_not_started_unpinned() -> None:
    why = "the digest of smollm2:v2 cannot be read now (cannot reach the registry): not rolled out unpinned"
    # Not running yet: nothing is started, and the status will say why.
    assert only_pinned(STABLE_V1, "v2", "", why) == (None, why)
    assert only_pinned(State(), "v1", "", why) == (None, why), "nor the first version"
    # Running already (pinned when it started): the rollout goes on with it.
    assert only_pinned(STABLE_V1, "v1", "", why) == ("v1", "")
    progressing = State(active=Slot("v1", BLUE), target=Slot("v2", GREEN, "sha256:22"), phase=PROGRESSING)
    assert only_pinned(progressing, "v2", "", why) == ("v2", "")
    assert only_pinned(STABLE_V1, "v2", "", "") == ("v2", "")
    # Decided on None, a stable rollout starts nothing.
    assert decide(STABLE_V1, obs(None), CFG).state == STABLE_V1


def test_the_digest_of_an_unreachable_registry_is_a_reason_not_an_empty_pin() -> None:
    settings = RegistrySettings(
        bucket="b", table="t", region="eu-west-1", endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    spec = parse_pipeline(
        {
            "apiVersion": "promptpipe.io/v1alpha1",
            "kind": "PromptPipeline",
            "metadata": {"name": "p"},
            "spec": {"model": {"name": "smollm2", "version": "v2", "backend": "tgi"}},
        }
    ).spec
    digest, why = digest_of(Registry(settings), spec, "v2")
    assert digest == "" and why.startswith("the digest of smollm2:v2 cannot be read now (") and "unpinned" in why


def test_a_download_failing_only_for_an_unreachable_registry_is_waited_for_not_given_up_on() -> None:
    def fetch(code: int) -> dict[str, object]:
        failed = {"terminated": {"exitCode": code, "reason": "Error", "message": "error: cannot reach the registry"}}
        return pod(
            [
                {
                    "name": "fetch-model",
                    "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": failed,
                }
            ],
            [],
        )

    assert gave_up([fetch(UNREACHABLE_EXIT)]) == "", "retried by the kubelet while the deadline allows"
    assert "(exit 75, 4 restarts)" in pod_problem(fetch(UNREACHABLE_EXIT)), "and still shown as why it waits"
    assert gave_up([fetch(1)]).startswith("pod p-1: init container fetch-model failed (exit 1, 4 restarts)")
