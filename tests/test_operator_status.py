"""The operator's pure parts: readiness and status from Deployments, Events, and the per-pipeline runner."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from promptpipe.contract.pipeline_file import parse_pipeline
from promptpipe_operator.reconcile import Result, changed_by_apply, events_for
from promptpipe_operator.status import Health, components, condition, deployment_health, pipeline_status
from promptpipe_operator.workqueue import KeyedRunner

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "examples" / "quickstart.yaml").read_text())
PP = parse_pipeline(QUICKSTART)


def deployment(
    generation: int = 1,
    observed: int = 1,
    replicas: int | None = 1,
    updated: int = 1,
    available: int = 1,
    total: int | None = None,
    deadline_exceeded: bool = False,
) -> dict[str, Any]:
    spec = {} if replicas is None else {"replicas": replicas}
    status: dict[str, Any] = {
        "observedGeneration": observed,
        "updatedReplicas": updated,
        "availableReplicas": available,
        "replicas": updated if total is None else total,
    }
    if deadline_exceeded:
        status["conditions"] = [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing.",
            }
        ]
    return {"metadata": {"generation": generation}, "spec": spec, "status": status}


def test_deployment_health_follows_rollout_status() -> None:
    assert deployment_health("rag", deployment()).health is Health.READY
    assert deployment_health("rag", deployment(generation=2, observed=1)).health is Health.ROLLING
    assert deployment_health("rag", deployment(replicas=2, updated=1, available=2)).health is Health.ROLLING
    assert deployment_health("rag", deployment(updated=1, total=2)).health is Health.ROLLING, "old pods remain"
    assert deployment_health("rag", deployment(available=0)).health is Health.UNAVAILABLE
    assert deployment_health("rag", deployment(replicas=0, updated=0, available=0)).health is Health.READY, (
        "scaled to zero by KEDA is ready: a request wakes it"
    )
    assert deployment_health("rag", deployment(deadline_exceeded=True)).health is Health.FAILED
    assert deployment_health("rag", None).health is Health.MISSING


def all_deployments(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {f"quickstart-{s}": deployment() for s in ("stream", "rag", "assemble", "inference", "post")}
    out.update({f"quickstart-{k}": v for k, v in overrides.items()})
    return out


def status_of(
    deployments: dict[str, dict[str, Any]], previous: dict[str, Any] | None = None, now: str = "2026-01-01T00:00:00Z"
) -> dict[str, Any]:
    return pipeline_status(PP, "ns", 3, components(PP, deployments), previous or {}, now)


def test_phases_from_stage_health() -> None:
    ready = status_of(all_deployments())
    assert (ready["phase"], ready["readyStages"], ready["observedGeneration"]) == ("Ready", "5/5", 3)
    starting = status_of(all_deployments(rag=deployment(available=0)))
    assert starting["phase"] == "Progressing", "not yet ready once: still starting, not degraded"
    broke = status_of(all_deployments(rag=deployment(available=0)), previous=ready)
    assert broke["phase"] == "Degraded"
    assert condition(broke, "Degraded")["message"] == "rag: 0 of 1 replicas available"
    failed = status_of(all_deployments(post=deployment(deadline_exceeded=True)))
    assert failed["phase"] == "Degraded" and condition(failed, "Degraded")["reason"] == "StagesFailed"


def test_the_gateway_access_condition_says_whether_calls_need_a_key_or_are_all_refused() -> None:
    keyed = condition(status_of(all_deployments()), "GatewayAccess")
    assert keyed is not None and keyed["status"] == "True" and keyed["reason"] == "APIKeys"
    assert "Secret quickstart-api-keys" in keyed["message"]
    for auth, ok, reason, words in (
        ({"open": True}, "True", "Open", "anyone who reaches the gateway"),
        ({}, "False", "NoAPIKeys", "refuses every call: name a Secret in spec.auth.apiKeysSecret"),
    ):
        pp = parse_pipeline({**QUICKSTART, "spec": {**QUICKSTART["spec"], "auth": auth}})
        got = condition(pipeline_status(pp, "ns", 1, [], {}, "2026-01-01T00:00:00Z"), "GatewayAccess")
        assert got is not None and (got["status"], got["reason"]) == (ok, reason) and words in got["message"]


def test_transition_time_moves_only_when_the_condition_status_does() -> None:
    first = status_of(all_deployments(), now="2026-01-01T00:00:00Z")
    again = status_of(all_deployments(), previous=first, now="2026-01-01T00:05:00Z")
    assert again == first, "an unchanged state gives an identical status (so nothing is written)"
    broke = status_of(all_deployments(rag=deployment(available=0)), previous=first, now="2026-01-01T00:09:00Z")
    assert condition(broke, "Ready")["lastTransitionTime"] == "2026-01-01T00:09:00Z"


def test_events_say_created_then_drift_then_ready() -> None:
    progressing = status_of(all_deployments(rag=deployment(available=0)))
    first = Result({}, progressing, created=["Deployment quickstart-rag"])
    assert [(e.type, e.reason) for e in events_for(first, {}, 3)] == [("Normal", "Created")]
    drift = Result({}, progressing, created=["Service quickstart-rag"], updated=["Deployment quickstart-post"])
    (event,) = events_for(drift, progressing, 3)
    assert (event.type, event.reason) == ("Warning", "DriftRepaired")
    assert event.message == "recreated Service quickstart-rag; reverted changes to Deployment quickstart-post"
    ready = Result({}, status_of(all_deployments()))
    assert [e.reason for e in events_for(ready, progressing, 3)] == ["Ready"]
    assert events_for(ready, ready.status, 3) == [], "no news, no Event"


def test_runner_serializes_per_key_and_coalesces_requests_made_during_a_run() -> None:
    async def scenario() -> tuple[list[str], int, list[int]]:
        log: list[str] = []
        gate = asyncio.Event()
        runs = 0

        async def run(key: str) -> int:
            nonlocal runs
            runs += 1
            n = runs
            log.append(f"start {key}{n}")
            await gate.wait()
            log.append(f"end {key}{n}")
            return n

        runner: KeyedRunner[str, int] = KeyedRunner(run)
        first = asyncio.ensure_future(runner.request("a"))
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(runner.request("a")) for _ in range(5)]
        await asyncio.sleep(0)
        gate.set()
        results = [await first] + [await o for o in others]
        return log, runs, results

    log, runs, results = asyncio.run(scenario())
    assert runs == 2, "five requests during a run share one more run"
    assert log == ["start a1", "end a1", "start a2", "end a2"], "never two runs of one key at once"
    assert results == [1, 2, 2, 2, 2, 2], "each caller gets a run that started after it asked"


def test_runner_hands_an_error_to_every_caller_of_that_run() -> None:
    async def scenario() -> list[str]:
        async def run(key: str) -> int:
            await asyncio.sleep(0.01)
            raise RuntimeError(f"boom {key}")

        runner: KeyedRunner[str, int] = KeyedRunner(run)
        calls = [runner.request("k") for _ in range(3)]
        return [str(r) for r in await asyncio.gather(*calls, return_exceptions=True)]

    assert asyncio.run(scenario()) == ["boom k"] * 3


def test_a_controllers_status_write_is_not_a_change_but_a_reverted_edit_is() -> None:
    before = {"metadata": {"generation": 2, "resourceVersion": "10", "labels": {"a": "b"}}}
    status_written = {"metadata": {"generation": 2, "resourceVersion": "14", "labels": {"a": "b"}}}
    assert not changed_by_apply(before, status_written)
    assert changed_by_apply(before, {"metadata": {"generation": 3, "resourceVersion": "15", "labels": {"a": "b"}}})
    assert changed_by_apply(before, {"metadata": {"generation": 2, "resourceVersion": "15", "labels": {}}})
    # No generation (a ConfigMap, a Service): any write was ours.
    assert changed_by_apply({"metadata": {"resourceVersion": "1"}}, {"metadata": {"resourceVersion": "2"}})
    assert not changed_by_apply({"metadata": {"resourceVersion": "1"}}, {"metadata": {"resourceVersion": "1"}})
