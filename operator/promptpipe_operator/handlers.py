"""kopf wiring: when a pipeline is reconciled, and what a failed reconcile means to kopf.

Triggers, all ending in the same level-triggered reconcile (`reconcile.py`):
- the pipeline created, its spec changed, or the operator (re)started;
- any change to a child (deleted, edited, its readiness changed), for quick repair;
- a resync of every pipeline every `resyncSeconds`, whatever the events said;
- a wake-up a reconcile asks for (a rollout's deadline, analysis interval, alias poll);
- a new `promptpipe.io/rollback` annotation (a manual rollback).
No timers or daemons on the pipeline: kopf would put a finalizer on it for them,
and children need none (owner references let the garbage collector remove them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any, cast

import kopf
from kubernetes import config

from promptpipe.contract.labels import MANAGED_BY, MANAGER
from promptpipe.contract.labels import ROLLBACK as ROLLBACK_ANNOTATION
from promptpipe.contract.spec import GROUP, PLURAL, VERSION
from promptpipe.registry.settings import RegistrySettings
from promptpipe.registry.store import Registry
from promptpipe_operator.kube import Kube, api_client
from promptpipe_operator.leader.write_fence import LEADERSHIP
from promptpipe_operator.metrics import CHILD_CHANGES, RECONCILE_ERRORS, RECONCILE_SECONDS, RECONCILES
from promptpipe_operator.reconcile import InvalidSpec, Result, Transient, reconcile_once
from promptpipe_operator.settings import OperatorSettings
from promptpipe_operator.workqueue import KeyedRunner

log = logging.getLogger("promptpipe.operator")
# How long the API server keeps a watch open before kopf opens it again (so a watch on a connection
# that died silently is replaced within about this long).
WATCH_SECONDS = 60  # whole seconds: the API server refuses "60.0"
Key = tuple[str, str]  # (namespace, name)
MANAGED = {MANAGED_BY: MANAGER}


def _registry() -> Registry | None:
    try:
        return Registry(RegistrySettings())
    except Exception as err:  # noqa: BLE001 - e.g. no AWS region anywhere: pipelines on the registry say why
        log.warning("no model registry: %s", err)
        return None


class Operator:
    """What the handlers share: the API client, the per-pipeline runner, the known pipelines."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        config.load_config()  # in a pod: its ServiceAccount; else KUBECONFIG
        self.kube = Kube(
            api_client(),
            workers=settings.apply_concurrency,
            timeout_seconds=settings.api_timeout_seconds,
            may_write=LEADERSHIP.check,
        )
        self.runner: KeyedRunner[Key, Result | None] = KeyedRunner(self._reconcile)
        self.known: set[Key] = set()
        self.running: dict[Key, float] = {}  # reconciles in progress, since (time.monotonic())
        self._wakeups: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.registry = _registry()

    async def stop(self) -> None:
        for handle in self._wakeups.values():
            handle.cancel()
        self.kube.close()

    async def _reconcile(self, key: Key) -> Result | None:
        """Reconcile one pipeline, and set its next resync: every pipeline has its own, so one whose
        reconcile is slow (a stalled call waits out its timeout) holds up no other."""
        namespace, name = key
        started = time.perf_counter()
        self.running[key] = time.monotonic()
        try:
            result = await asyncio.to_thread(reconcile_once, self.kube, self.settings, namespace, name, self.registry)
        except Exception:
            RECONCILES.labels("crashed").inc()
            log.exception("reconcile failed", extra={"pipeline": name, "namespace": namespace})
            self._wake(key, self.settings.resync_seconds)
            raise
        finally:
            self.running.pop(key, None)
            RECONCILE_SECONDS.observe(time.perf_counter() - started)
        if result is None:
            self.known.discard(key)
            return None
        resync = self.settings.resync_seconds
        self._wake(key, resync if result.requeue_after is None else min(result.requeue_after, resync))
        outcome = "ok" if result.error is None else "invalid" if isinstance(result.error, InvalidSpec) else "error"
        RECONCILES.labels(outcome).inc()
        if result.error is not None:
            RECONCILE_ERRORS.labels(result.status.get("conditions", [{}])[0].get("reason", "Unknown")).inc()
        for action, items in (("created", result.created), ("updated", result.updated), ("deleted", result.deleted)):
            for item in items:
                CHILD_CHANGES.labels(action, item.split(" ", 1)[0]).inc()
        for event in result.events:
            kopf.event(
                kopf.Body(cast(kopf.RawBody, result.body)), type=event.type, reason=event.reason, message=event.message
            )
        if result.created or result.updated or result.deleted or result.error:
            log.info(
                "reconciled",
                extra={
                    "pipeline": name,
                    "namespace": namespace,
                    "phase": result.status.get("phase"),
                    "children_created": len(result.created),
                    "children_updated": len(result.updated),
                    "children_deleted": len(result.deleted),
                    "error": str(result.error) if result.error else None,
                    "seconds": round(time.perf_counter() - started, 4),
                },
            )
        return result

    def _wake(self, key: Key, delay: float) -> None:
        """Reconcile `key` again in `delay` seconds (one pending wake-up per pipeline: the latest asked)."""
        if (old := self._wakeups.pop(key, None)) is not None:
            old.cancel()
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._wakeups.pop(key, None)
            task = loop.create_task(self.request_quietly(key))
            self._tasks.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)

        self._wakeups[key] = loop.call_later(delay, fire)

    async def request_quietly(self, key: Key) -> None:
        with contextlib.suppress(Exception):  # logged by _reconcile; the resync tries again
            await self.request(key)

    async def request(self, key: Key) -> Result | None:
        self.known.add(key)
        return await self.runner.request(key)

    def overdue(self) -> list[Key]:
        """Pipelines whose reconcile has run past its bound (a thread that cannot be stopped)."""
        bound = self.settings.reconcile_timeout_seconds
        now = time.monotonic()
        return sorted(key for key, since in self.running.items() if now - since > bound)


def _raise_for(result: Result | None) -> None:
    """What kopf should do about the run: nothing, retry later, or wait for the next spec change."""
    if result is None or result.error is None:
        return
    if isinstance(result.error, InvalidSpec):
        raise kopf.PermanentError(f"invalid spec: {result.error}")
    if isinstance(result.error, Transient):
        raise kopf.TemporaryError(str(result.error), delay=result.error.delay)


class _QuietWatchers(logging.Filter):
    """kopf logs every event handler's success at INFO: one line per child event is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith("succeeded.") and ("'child_changed'" in message or "'track'" in message))


def _namespaced(namespace: str | None) -> str:
    if namespace is None:  # PromptPipelines are namespaced: the API server never sends one without
        raise kopf.PermanentError("a PromptPipeline without a namespace")
    return namespace


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    logging.getLogger("kopf.objects").addFilter(_QuietWatchers())
    # Keep kopf's bookkeeping in our own annotations, and out of the status we write.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.reporting_component = MANAGER
    settings.posting.reporting_instance = socket.gethostname()
    operator = Operator(OperatorSettings())
    # kopf's own calls (patches, events, watches) are bounded too: a stalled connection fails, and a
    # watch that stays silent past the server's timeout is reopened.
    timeout = operator.settings.api_timeout_seconds
    settings.networking.request_timeout = timeout
    settings.networking.connect_timeout = timeout
    settings.watching.connect_timeout = timeout
    settings.watching.server_timeout = WATCH_SECONDS
    settings.watching.client_timeout = WATCH_SECONDS + timeout
    memo["operator"] = operator


@kopf.on.probe(id="reconciles")
async def reconciles(memo: kopf.Memo, **_: Any) -> int:
    """kopf's liveness endpoint fails while a reconcile has run past its bound: only a restart ends it."""
    operator: Operator = memo["operator"]
    overdue = operator.overdue()
    if overdue:
        names = ", ".join(f"{ns}/{name}" for ns, name in overdue)
        raise kopf.PermanentError(f"reconciles running past {operator.settings.reconcile_timeout_seconds:g}s: {names}")
    return len(operator.running)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    await memo["operator"].stop()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def converge(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    _raise_for(await memo["operator"].request((_namespaced(namespace), name)))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def track(
    type: str,  # noqa: A002 - kopf passes it by this name
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: Any,
    **_: Any,
) -> None:
    operator: Operator = memo["operator"]
    namespace = _namespaced(namespace)
    if type == "DELETED":
        operator.known.discard((namespace, name))
        return
    operator.known.add((namespace, name))
    # A rollback is asked for with an annotation (not the spec): act on a new one at once.
    request = (body.metadata.annotations or {}).get(ROLLBACK_ANNOTATION, "")
    handled = ((body.get("status") or {}).get("rollout") or {}).get("rollbackHandled", "")
    if request and request != handled:
        await operator.request_quietly((namespace, name))


@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("keda.sh", "v1alpha1", "scaledobjects", labels=MANAGED)
@kopf.on.event("", "v1", "serviceaccounts", labels=MANAGED)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=MANAGED)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=MANAGED)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def child_changed(body: kopf.Body, namespace: str | None, memo: Any, **_: Any) -> None:
    """Any change to a child (gone, edited, readiness) reconciles its pipeline."""
    owner = next(
        (
            r["name"]
            for r in body.metadata.get("ownerReferences") or []
            if r.get("kind") == "PromptPipeline" and r.get("controller")
        ),
        None,
    )
    if owner is None or namespace is None:
        return
    await memo["operator"].request_quietly((namespace, owner))
