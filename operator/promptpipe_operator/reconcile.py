"""One reconcile of one pipeline: render, apply, prune, observe, write status.

Level-triggered: it reads the pipeline and its children afresh every time and
converges them, whatever event (or timer) asked for it, so running it twice
changes nothing the first run got right. Blocking (it runs in a worker thread);
the kopf handlers in `handlers.py` decide when it runs and what its failures mean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any

import urllib3
from kubernetes.dynamic.exceptions import DynamicApiError

from promptpipe.contract import labels as keys
from promptpipe.contract.pipeline_file import PipelineFileError, parse_pipeline
from promptpipe.contract.spec import PromptPipeline, StageName
from promptpipe.contract.timestamps import format_time, parse_time
from promptpipe.registry.store import Registry
from promptpipe_operator import metrics, pods, policy, render, rollout_checks
from promptpipe_operator.analysis import Counts
from promptpipe_operator.events import Event
from promptpipe_operator.kube import CHILD_KINDS, ChildKey, KindNotServed, Kube
from promptpipe_operator.rollout import (
    ANALYZING,
    PROGRESSING,
    Decision,
    Observed,
    State,
    decide,
    only_pinned,
    wake_in,
    wants_analysis,
    wants_smoke,
)
from promptpipe_operator.settings import OperatorSettings
from promptpipe_operator.status import (
    Health,
    Problem,
    components,
    condition,
    deployment_health,
    invalid_spec_status,
    pipeline_status,
)

# The most of a reconcile's bound (`reconcile_timeout_seconds`) a rollout's smoke generation may take: the
# rest is the API calls around it.
SMOKE_SHARE_OF_RECONCILE = 0.5


class InvalidSpec(Exception):
    """The spec passed the API server's schema but not the pipeline model: retrying cannot help."""


class Transient(Exception):
    """The API server refused or failed a call, or a kind is missing; a later attempt may succeed."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass
class Result:
    body: dict[str, Any]  # the pipeline as read, for posting Events on it
    status: dict[str, Any]
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # Set when the run could not converge everything; the status already says why.
    error: InvalidSpec | Transient | None = None
    # Run again in this many seconds (a rollout's deadline, analysis, expiry, alias poll).
    requeue_after: float | None = None


def _label(manifest: dict[str, Any]) -> str:
    return f"{manifest['kind']} {manifest['metadata']['name']}"


def _summary(items: list[str], limit: int = 6) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def changed_by_apply(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether the apply changed the object. For kinds with a spec generation (Deployments, ScaledObjects)
    that is the generation, or labels and owners: their controllers write status (and annotations) all
    the time, and such a write between our read and our apply is not drift. Other kinds (ConfigMaps,
    Services) have no such writers: any new resourceVersion is ours."""
    old, new = before["metadata"], after["metadata"]
    if "generation" in old and "generation" in new:
        return any(old.get(k) != new.get(k) for k in ("generation", "labels", "ownerReferences"))
    return bool(old["resourceVersion"] != new["resourceVersion"])


def events_for(result: Result, before: dict[str, Any], generation: int) -> list[Event]:
    """What to tell `kubectl describe` about this run (pure)."""
    out: list[Event] = []
    seen_generation = before.get("observedGeneration")
    if seen_generation == generation and (result.created or result.updated):
        # Nothing in the spec changed, so the children had drifted: say what was put back.
        parts = ([f"recreated {_summary(result.created)}"] if result.created else []) + (
            [f"reverted changes to {_summary(result.updated)}"] if result.updated else []
        )
        out.append(Event("Warning", "DriftRepaired", "; ".join(parts)))
    else:
        if result.created:
            out.append(Event("Normal", "Created", f"created {_summary(result.created)}"))
        if result.updated:
            out.append(Event("Normal", "Updated", f"updated {_summary(result.updated)}"))
    if result.deleted:
        out.append(Event("Normal", "Pruned", f"deleted {_summary(result.deleted)}, no longer in the spec"))
    was, now = condition(before, "Ready"), condition(result.status, "Ready")
    if now and now["status"] == "True" and not (was and was["status"] == "True"):
        out.append(Event("Normal", "Ready", now["message"]))
    was_d, now_d = condition(before, "Degraded"), condition(result.status, "Degraded")
    if (
        now_d
        and now_d["status"] == "True"
        and not (was_d and was_d["status"] == "True" and was_d["reason"] == now_d["reason"])
    ):
        out.append(Event("Warning", now_d["reason"], now_d["message"]))
    return out


class _Refused(Exception):
    """The API server refused one child (the others were applied), or what the children are made of."""

    def __init__(self, child: str, cause: DynamicApiError, doing: str = "applying") -> None:
        super().__init__(f"{child}: {cause}")
        self.child, self.cause, self.doing = child, cause, doing


def _api_failure(err: DynamicApiError, what: str) -> Transient:
    status = getattr(err, "status", None)
    summary = getattr(err, "summary", lambda: str(err))()
    # Forbidden or invalid will not fix themselves quickly; back off longer than for a busy server. A
    # conflict is a pipeline changed since it was read: reconcile it again at once.
    delay = 30.0 if status in (403, 422) else 0.5 if status == 409 else 5.0
    return Transient(f"{what}: HTTP {status}: {summary}", delay)


# A call the API server did not answer: refused or reset connections, and the timeouts every call has.
UNANSWERED: tuple[type[Exception], ...] = (urllib3.exceptions.HTTPError, OSError)


def _unanswered(err: Exception, what: str) -> Transient:
    return Transient(f"{what}: the API server did not answer ({type(err).__name__})", 5.0)


def reconcile_once(
    kube: Kube, settings: OperatorSettings, namespace: str, name: str, registry: Registry | None = None
) -> Result | None:
    """Converge one pipeline's children and status; None if the pipeline is gone."""
    body = kube.get_pipeline(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None  # its children go with it: they carry owner references
    meta = body["metadata"]
    generation = int(meta.get("generation", 1))
    before: dict[str, Any] = body.get("status") or {}
    try:
        pp = parse_pipeline(body)
    except PipelineFileError as err:
        return _refuse(kube, body, str(err), "InvalidSpec")
    if (invalid := policy.invalid(pp)) is not None:
        return _refuse(kube, body, invalid, "InvalidSpec")
    refused = policy.refusal(pp, settings)
    if refused is not None:  # as a spec the model refuses: nothing is changed until it is fixed
        return _refuse(kube, body, refused, "NotAllowed")

    selector = f"{keys.INSTANCE}={name},{keys.MANAGED_BY}={keys.MANAGER}"
    result = Result(body, {})
    run = _converge(kube, settings, registry, pp, body, selector, result)
    deployments = {n: obj for (k, n), obj in run.applied.items() if k == "Deployment"}
    rollout_state = run.rollout
    if run.failure is not None:  # what was not applied this time may still be there from before
        # The status then says less of the stages; the condition says why.
        with contextlib.suppress(DynamicApiError, *UNANSWERED):
            deployments = {
                n: obj for (k, n), obj in kube.owned(namespace, meta["uid"], selector).items() if k == "Deployment"
            } | deployments
        if rollout_state is not None and not run.recorded:  # the decision was not recorded: nothing of it stands
            rollout_state = State.from_status(before.get("rollout"))
    failure, problem, body = run.failure, run.problem, run.body
    active_color = rollout_state.active.color if rollout_state and rollout_state.active else None
    health = components(pp, deployments, active_color)
    result.status = pipeline_status(pp, namespace, generation, health, before, format_time(), problem, rollout_state)
    try:
        _write_status(kube, body, result.status)
    except DynamicApiError as err:
        failure = failure or _api_failure(err, "writing the status")
    except UNANSWERED as err:
        failure = failure or _unanswered(err, "writing the status")
    result.events = events_for(result, before, generation) + result.events
    result.error = failure
    return result


@dataclass
class _Run:
    """What one pass of applying a pipeline's children did, for its status."""

    body: dict[str, Any]  # the pipeline, as last written (a recorded rollout decision writes it)
    applied: dict[ChildKey, dict[str, Any]] = field(default_factory=dict)
    problem: Problem | None = None
    failure: Transient | None = None
    rollout: State | None = None  # the rollout's state, as decided this pass
    recorded: bool = False  # whether that decision was written before anything it decided was applied


def _converge(
    kube: Kube,
    settings: OperatorSettings,
    registry: Registry | None,
    pp: PromptPipeline,
    body: dict[str, Any],
    selector: str,
    result: Result,
) -> _Run:
    """Apply the pipeline's children (and decide its rollout), delete the ones no longer wanted; what
    failed is in the returned value, never raised."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    generation = int(meta.get("generation", 1))
    before: dict[str, Any] = body.get("status") or {}
    owner = render.owner_reference(name, meta["uid"])
    run = _Run(body)
    decision: Decision | None = None
    try:
        existing = kube.owned(namespace, meta["uid"], selector)
        if render.managed_tgi(pp) is not None:
            decision, unresolved = advance_rollout(kube, settings, registry, pp, body, existing, generation)
            run.rollout = decision.state
            result.requeue_after = wake_in(run.rollout, pp.spec.rollout, rollout_checks.now())
            if pp.spec.model.alias or unresolved:  # a promotion, or the registry back, is seen at the next poll
                result.requeue_after = min(
                    result.requeue_after or settings.alias_poll_seconds, settings.alias_poll_seconds
                )
            if unresolved:
                run.problem = Problem("ModelUnresolved", unresolved)
        try:
            issuer_keys = kube.issuer_keys()
        except DynamicApiError as err:
            raise _Refused("the cluster's service-account keys (stage identity)", err, "reading") from None
        api_server: list[tuple[str, int]] = []
        if render.managed_tgi(pp) is not None:  # the inference stage's replica discovery calls it
            try:
                api_server = kube.api_server()
            except DynamicApiError as err:
                raise _Refused("the API server's endpoints (the inference stage's egress)", err, "reading") from None
        stages = {s.value for s in StageName}
        stage_deployments = [
            obj
            for (kind, _), obj in existing.items()
            if kind == "Deployment" and (obj["metadata"].get("labels") or {}).get(keys.COMPONENT) in stages
        ]
        enforce = render.identity_enforceable(
            existing.get(("ConfigMap", render.child_name(name, "config"))), stage_deployments
        )
        desired = render.children(
            pp,
            namespace,
            settings,
            run.rollout,
            registry.settings if registry else None,
            issuer_keys,
            enforce,
            api_server,
        )
        # An object of a child's name that is not ours is left alone: a forced apply would take it over.
        new = [m for m in desired if (m["kind"], m["metadata"]["name"]) not in existing]
        taken = kube.strangers(namespace, meta["uid"], new) if new else []
        if taken:
            run.problem = Problem("NameTaken", name_taken_message(taken))
            desired = [m for m in desired if (m["kind"], m["metadata"]["name"]) not in taken]
        for manifest in desired:
            manifest["metadata"]["ownerReferences"] = [owner]
        if run.rollout is not None and run.rollout.to_status() != before.get("rollout"):
            # The rollout's decision is recorded before anything it decided is applied, so a child that
            # keeps failing to apply cannot hold the rollout at one step, deciding it again every time.
            run.body = _write_status(kube, run.body, {**before, "rollout": run.rollout.to_status()})
            run.recorded = True
            if decision is not None:
                result.events += decision.events
                count_rollbacks(namespace, name, decision)
        failed: list[tuple[render.KubeObject, Exception]] = []
        for batch in apply_batches(desired, render.backend_name(name)):
            for manifest, outcome in zip(batch, kube.apply_each(batch), strict=True):
                key = (manifest["kind"], manifest["metadata"]["name"])
                if isinstance(outcome, Exception):
                    failed.append((manifest, outcome))
                    continue
                run.applied[key] = outcome
                if key not in existing:
                    result.created.append(_label(manifest))
                elif changed_by_apply(existing[key], outcome):
                    result.updated.append(_label(manifest))
        versions = {kind: v for v, kind in CHILD_KINDS}
        wanted = {(m["kind"], m["metadata"]["name"]) for m in desired}
        for kind, child in sorted(set(existing) - wanted):
            kube.delete(versions[kind], kind, namespace, child)
            result.deleted.append(f"{kind} {child}")
        if decision is not None and not run.recorded:  # nothing new to record: told once it is applied
            result.events += decision.events
        if failed:
            failed_child, first_failure = failed[0]
            if isinstance(first_failure, DynamicApiError):
                raise _Refused(_label(failed_child), first_failure)
            raise first_failure
    except KindNotServed as err:
        run.problem = Problem("KindNotServed", f"{err}; install KEDA's CRDs (keda.sh) and the operator retries")
        run.failure = Transient(str(err), 30.0)
    except _Refused as err:
        run.failure = _api_failure(err.cause, f"{err.doing} {err.child}")
        run.problem = Problem("ApplyFailed", str(run.failure))
    except DynamicApiError as err:
        run.failure = _api_failure(err, "applying the children")
        run.problem = Problem("ApplyFailed", str(run.failure))
    except UNANSWERED as err:
        run.failure = _unanswered(err, "applying the children")
        run.problem = Problem("ApiUnreachable", str(run.failure))

    return run


def apply_batches(desired: list[render.KubeObject], switch: str) -> list[list[render.KubeObject]]:
    """The children in the order they can be applied, each batch concurrently (pure): Roles before
    anything, since the API server refuses a RoleBinding to a Role it cannot read yet (it checks the
    binder holds what the Role grants); the traffic switch (the backend Service `switch`) after all else."""

    def batch(m: render.KubeObject) -> int:
        return 0 if m["kind"] == "Role" else 2 if (m["kind"], m["metadata"]["name"]) == ("Service", switch) else 1

    batches = [[m for m in desired if batch(m) == b] for b in range(3)]
    return [b for b in batches if b]


def _refuse(kube: Kube, body: dict[str, Any], message: str, reason: str) -> Result:
    """A pipeline the operator will not run as specified: status Failed saying why, nothing else changed."""
    meta = body["metadata"]
    generation = int(meta.get("generation", 1))
    before: dict[str, Any] = body.get("status") or {}
    status = invalid_spec_status(generation, message, before, format_time(), reason=reason)
    result = Result(body, status, error=InvalidSpec(message))
    try:
        _write_status(kube, body, result.status)
    except DynamicApiError as api_err:
        result.error = _api_failure(api_err, "writing the status")
    result.events = events_for(result, before, generation)
    return result


def name_taken_message(taken: list[ChildKey]) -> str:
    names = ", ".join(f"{kind} {name}" for kind, name in taken)
    return (
        f"{names}: already there and not this pipeline's (no controller reference to it), so left as it is; "
        "delete or rename it, or rename the pipeline"
    )


def advance_rollout(
    kube: Kube,
    settings: OperatorSettings,
    registry: Registry | None,
    pp: PromptPipeline,
    body: dict[str, Any],
    existing: dict[ChildKey, dict[str, Any]],
    generation: int,
) -> tuple[Decision, str]:
    """Observe what the rollout's next step depends on (only what it needs now) and decide it.
    Returns the decision and, if the spec's version cannot be resolved, why."""
    name, namespace = pp.metadata.name, body["metadata"]["namespace"]
    state = State.from_status((body.get("status") or {}).get("rollout"))
    cfg, now = pp.spec.rollout, rollout_checks.now()
    desired, unresolved = rollout_checks.resolve_version(registry, pp.spec)
    digest, no_digest = rollout_checks.digest_of(registry, pp.spec, desired)
    desired, unresolved = only_pinned(state, desired, unresolved, no_digest)
    request = (body["metadata"].get("annotations") or {}).get(keys.ROLLBACK, "")
    target_ready, target_failed, target_pods, target_gave_up = False, "", "", ""
    target = state.target
    if state.phase == PROGRESSING and target is not None:
        dep = existing.get(("Deployment", render.backend_name(name, target.color)))
        # Only the Deployment already carrying the target version counts (not the color's previous occupant).
        if dep is not None and (dep["metadata"].get("annotations") or {}).get(keys.MODEL_VERSION) == target.version:
            health = deployment_health(render.BACKEND, dep)
            target_ready = health.health is Health.READY
            target_failed = health.detail if health.health is Health.FAILED else ""
        if not target_ready and dep is not None:  # its pods say why (a model that failed its hashes, a pull)
            listed = kube.pods_of(namespace, dep)
            target_pods, target_gave_up = pods.first_problem(listed), pods.gave_up(listed)
    smoke = None
    if (
        target is not None
        and wants_smoke(state, target_ready)
        and desired in (None, target.version)
        and request == state.rollback_handled
    ):
        smoke = rollout_checks.smoke(
            settings.backend_url_template.format(
                service=render.backend_name(name, target.color), namespace=namespace, port=render.TGI_PORT
            ),
            pp.spec,
            settings.reconcile_timeout_seconds * SMOKE_SHARE_OF_RECONCILE,
        )
    verdict = None

    def gateway_counts() -> dict[str, Counts]:
        gateway = existing.get(("Deployment", render.child_name(name, StageName.STREAM.value)))
        return rollout_checks.scrape(pods.metrics_urls(kube.pods_of(namespace, gateway) if gateway else []), name)

    if wants_analysis(state, cfg, now):
        analysis = cfg.analysis
        if analysis.prometheus is not None:
            since_switch = (now - (parse_time(state.switched_at) or now)).total_seconds()
            verdict = rollout_checks.analyse_prometheus(namespace, name, since_switch, pp.spec)
        else:
            current = gateway_counts()
            if state.baseline is None:  # no counters from the switch: start counting now
                state = replace(state, baseline=baseline(current))
                verdict = (None, "counting calls from now")
            else:
                verdict = rollout_checks.analyse_scrapes(current, state.baseline, pp.spec)
    decision = decide(
        state,
        Observed(
            desired,
            generation,
            now,
            target_ready,
            target_failed,
            smoke,
            verdict,
            request,
            target_pods=target_pods,
            target_gave_up=target_gave_up,
            desired_digest=digest,
        ),
        cfg,
    )
    if decision.state.phase == ANALYZING and decision.state.baseline is None and cfg.analysis.prometheus is None:
        decision = replace(decision, state=replace(decision.state, baseline=baseline(gateway_counts())))
    return decision, unresolved


def count_rollbacks(namespace: str, name: str, decision: Decision) -> None:
    """A rollback the rollout just decided and recorded (its RolledBack event comes once), for the alerts."""
    if any(e.reason == "RolledBack" for e in decision.events):
        metrics.ROLLBACKS.labels(namespace, name, decision.state.reason).inc()


def baseline(counts: dict[str, Counts]) -> dict[str, Any]:
    """Each gateway pod's counters at the switch, as stored in the status."""
    return {pod: c.as_json() for pod, c in counts.items()}


def _write_status(kube: Kube, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """Write the status the reconcile of `body` computed, only onto that very version of the pipeline (a
    pipeline changed since is reconciled again); return the pipeline as written. Unchanged status is not
    written: no watch event, no loop."""
    meta, before = body["metadata"], body.get("status") or {}
    if before == status:
        return body
    try:
        return kube.patch_pipeline_status(
            meta["namespace"], meta["name"], merge_patch(before, status), meta.get("resourceVersion")
        )
    except DynamicApiError as err:
        # Written meanwhile: by kopf's own bookkeeping (annotations), the status still holds; by a spec
        # change (a new generation), it does not, and the pipeline is reconciled again.
        fresh = kube.get_pipeline(meta["namespace"], meta["name"]) if getattr(err, "status", None) == 409 else None
        if fresh is None or fresh["metadata"].get("generation") != meta.get("generation"):
            raise
        return kube.patch_pipeline_status(
            meta["namespace"],
            meta["name"],
            merge_patch(fresh.get("status") or {}, status),
            fresh["metadata"]["resourceVersion"],
        )


def merge_patch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning `before` into `after`: keys gone become null, at every depth."""
    patch: dict[str, Any] = {k: None for k in before if k not in after}
    for key, value in after.items():
        old = before.get(key)
        patch[key] = merge_patch(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return patch
