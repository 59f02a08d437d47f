"""A pipeline's status from what its children report: pure functions, no I/O.

Readiness follows `kubectl rollout status`: a Deployment is ready when its
controller has seen the newest spec, every replica runs it, and all of them are
available. A stage KEDA scaled to zero is ready too: a request wakes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from promptpipe.contract import topology
from promptpipe.contract.spec import PromptPipeline
from promptpipe_operator.render import (
    BACKEND,
    GRPC_PORT,
    KubeObject,
    backend_name,
    child_name,
    managed_tgi,
    runtime_config,
)
from promptpipe_operator.rollout import ANALYZING, BLUE, PROGRESSING, ROLLED_BACK, State


class Health(str, enum.Enum):
    READY = "Ready"
    ROLLING = "RollingOut"  # the newest spec is not on every replica yet
    UNAVAILABLE = "Unavailable"  # on every replica, but not all of them are available
    FAILED = "Failed"  # the Deployment's progress deadline passed
    MISSING = "Missing"


@dataclass(frozen=True)
class ComponentHealth:
    name: str  # a stage, or "backend"
    health: Health
    replicas: int
    available: int
    detail: str = ""


@dataclass(frozen=True)
class Problem:
    """Why the pipeline cannot be (fully) reconciled, shown in its conditions."""

    reason: str
    message: str


def deployment_health(name: str, deployment: KubeObject | None) -> ComponentHealth:
    if deployment is None:
        return ComponentHealth(name, Health.MISSING, 0, 0, "Deployment not found")
    spec, status = deployment.get("spec", {}), deployment.get("status") or {}
    want = int(spec.get("replicas", 1))
    updated, available = int(status.get("updatedReplicas", 0)), int(status.get("availableReplicas", 0))
    total = int(status.get("replicas", 0))
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return ComponentHealth(name, Health.FAILED, want, available, cond.get("message", ""))
    if int(status.get("observedGeneration", 0)) < int(deployment["metadata"].get("generation", 1)):
        return ComponentHealth(name, Health.ROLLING, want, available, "waiting for the controller")
    if updated < want or total > updated:
        return ComponentHealth(name, Health.ROLLING, want, available, f"{updated} of {want} replicas updated")
    if available < want:
        return ComponentHealth(name, Health.UNAVAILABLE, want, available, f"{available} of {want} replicas available")
    return ComponentHealth(name, Health.READY, want, available)


def components(
    pp: PromptPipeline, deployments: dict[str, KubeObject], active_color: str | None = None
) -> list[ComponentHealth]:
    """Health of every Deployment serving the pipeline (the backend: its active color), keyed by
    Deployment name in `deployments`."""
    name = pp.metadata.name
    out = [deployment_health(s.value, deployments.get(child_name(name, s.value))) for s in topology.processes(pp.spec)]
    if managed_tgi(pp) is not None:
        out.append(deployment_health(BACKEND, deployments.get(backend_name(name, active_color or BLUE))))
    return out


def endpoints(pp: PromptPipeline, namespace: str) -> dict[str, str]:
    name = pp.metadata.name
    out = {"gateway": f"{child_name(name, 'stream')}.{namespace}.svc:{GRPC_PORT}"}
    model = runtime_config(pp, namespace).pipeline.spec.model
    remote = model.tgi if model.backend.value == "tgi" else model.openai if model.backend.value == "openai" else None
    if remote is not None and remote.endpoints:
        out["backend"] = ",".join(remote.endpoints)
    return out


def gateway_access(pp: PromptPipeline) -> tuple[bool, str, str]:
    """Who the gateway takes calls from, for `kubectl describe`: a closed gateway without keys refuses
    every call, which should not need a pod's log to find out."""
    auth = pp.spec.auth
    if auth.api_keys_secret is not None:
        ref = auth.api_keys_secret
        return True, "APIKeys", f"calls need an API key from Secret {ref.name} (key {ref.key})"
    if auth.open:
        return True, "Open", "spec.auth.open: anyone who reaches the gateway may call it"
    return (
        False,
        "NoAPIKeys",
        "the gateway refuses every call: name a Secret in spec.auth.apiKeysSecret, or set spec.auth.open: true",
    )


def _condition(
    type_: str, ok: bool, reason: str, message: str, generation: int, previous: list[dict[str, Any]], now: str
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    # The transition time moves only when the status does.
    since = before["lastTransitionTime"] if before and before.get("status") == status else now
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def pipeline_status(
    pp: PromptPipeline,
    namespace: str,
    generation: int,
    health: list[ComponentHealth],
    previous: dict[str, Any],
    now: str,
    problem: Problem | None = None,
    rollout: State | None = None,
) -> dict[str, Any]:
    """The whole `status` to write. `previous` is the status now stored; `now` an RFC 3339 time."""
    conditions_before: list[dict[str, Any]] = previous.get("conditions") or []
    was_ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions_before)
    ready = [c for c in health if c.health is Health.READY]
    failed = [c for c in health if c.health in (Health.FAILED, Health.MISSING)]
    rolling = [c for c in health if c.health is Health.ROLLING]
    unavailable = [c for c in health if c.health is Health.UNAVAILABLE]

    def listed(items: list[ComponentHealth]) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in items)

    if problem is not None:
        phase, ready_c = "Degraded", (False, problem.reason, problem.message)
        progressing, degraded = (False, problem.reason, problem.message), (True, problem.reason, problem.message)
    elif failed:
        phase, ready_c = "Degraded", (False, "StagesFailed", listed(failed))
        progressing, degraded = (False, "StagesFailed", listed(failed)), (True, "StagesFailed", listed(failed))
    elif rolling or (unavailable and not was_ready):
        waiting = rolling + unavailable
        phase, ready_c = "Progressing", (False, "WaitingForStages", listed(waiting))
        progressing, degraded = (True, "RollingOut", listed(waiting)), (False, "AsExpected", "")
    elif unavailable:
        phase, ready_c = "Degraded", (False, "StagesUnavailable", listed(unavailable))
        progressing, degraded = (False, "StagesUnavailable", ""), (True, "StagesUnavailable", listed(unavailable))
    else:
        phase, ready_c = "Ready", (True, "AllStagesReady", f"{len(ready)} of {len(health)} ready")
        progressing, degraded = (False, "Complete", ""), (False, "AsExpected", "")

    rolled_back: tuple[bool, str, str] = (False, "AsExpected", "")
    if rollout is not None and problem is None:
        target = rollout.target or rollout.active
        if rollout.phase in (PROGRESSING, ANALYZING) and target is not None:
            step = "bringing up" if rollout.phase == PROGRESSING else "analysing"
            progressing = (True, f"Model{rollout.phase}", f"{step} {target.version} ({target.color})")
        if rollout.phase == ROLLED_BACK:
            rolled_back = (True, rollout.reason, rollout.message)
            if phase == "Ready":
                phase = "RolledBack"
    conditions = [
        _condition("Ready", *ready_c, generation, conditions_before, now),
        _condition("Progressing", *progressing, generation, conditions_before, now),
        _condition("Degraded", *degraded, generation, conditions_before, now),
    ]
    if rollout is not None:
        conditions.append(_condition("RolledBack", *rolled_back, generation, conditions_before, now))
    conditions.append(_condition("GatewayAccess", *gateway_access(pp), generation, conditions_before, now))
    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "readyStages": f"{len(ready)}/{len(health)}",
        "stages": {
            c.name: {"health": c.health.value, "replicas": c.replicas, "available": c.available} for c in health
        },
        "conditions": conditions,
        "endpoints": endpoints(pp, namespace),
    }
    if rollout is not None:
        if rollout.active is not None:
            status["activeVersion"], status["activeColor"] = rollout.active.version, rollout.active.color
        if rollout.previous is not None:
            status["previousVersion"], status["previousColor"] = rollout.previous.version, rollout.previous.color
        status["rollout"] = rollout.to_status()
    elif pp.spec.model.version:
        status["activeVersion"] = pp.spec.model.version
    return status


def invalid_spec_status(
    generation: int, message: str, previous: dict[str, Any], now: str, reason: str = "InvalidSpec"
) -> dict[str, Any]:
    """A spec the API server took but the pipeline model (InvalidSpec) or the operator's policy (NotAllowed)
    refuses: nothing is changed until it is fixed."""
    before: list[dict[str, Any]] = previous.get("conditions") or []
    return {
        "phase": "Failed",
        "observedGeneration": generation,
        "conditions": [
            _condition("Ready", False, reason, message, generation, before, now),
            _condition("Progressing", False, reason, "waiting for a corrected spec", generation, before, now),
            _condition("Degraded", True, reason, message, generation, before, now),
        ],
    }


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)
