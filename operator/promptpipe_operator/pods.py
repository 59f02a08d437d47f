"""What pods say about themselves, read from their spec and status as the kubelet writes it: where a
Ready pod serves its metrics, and why a pod is not serving. Pure functions, no I/O."""

from __future__ import annotations

from typing import Any

from promptpipe.registry.errors import UNREACHABLE_EXIT

# Waiting reasons that will not clear by themselves (image, config, or a container that keeps failing).
STUCK = frozenset(
    {
        "CrashLoopBackOff",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
MESSAGE_LIMIT = 400
# A container that failed again this many times after its first failure (a model that fails its hashes, a
# server that cannot load it) will not start by itself: a rollout rolls back at once, not at its deadline.
GIVE_UP_AFTER_RESTARTS = 2


def _last_words(message: str) -> str:
    """The last non-empty line of a termination message (with FallbackToLogsOnError: the log's tail)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= MESSAGE_LIMIT else "…" + text[-MESSAGE_LIMIT:]


def _container_problem(kind: str, status: dict[str, Any]) -> str:
    state = status.get("state") or {}
    terminated = state.get("terminated") or (
        (status.get("lastState") or {}).get("terminated") if "waiting" in state else None
    )
    name = status.get("name", "?")
    if terminated and terminated.get("exitCode", 0) != 0:
        why = _last_words(terminated.get("message") or "") or terminated.get("reason") or "no message"
        restarts = status.get("restartCount", 0)
        again = f", {restarts} restarts" if restarts else ""
        return f"{kind} {name} failed (exit {terminated['exitCode']}{again}): {why}"
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in STUCK:
        return f"{kind} {name} {waiting['reason']}: {_last_words(waiting.get('message') or '')}".rstrip(": ")
    return ""


def pod_problem(pod: dict[str, Any]) -> str:
    """'pod NAME: init container fetch-model failed (exit 1): …', or '' if nothing is wrong yet."""
    status = pod.get("status") or {}
    for kind, key in (("init container", "initContainerStatuses"), ("container", "containerStatuses")):
        for container in status.get(key) or []:
            if problem := _container_problem(kind, container):
                return f"pod {pod['metadata']['name']}: {problem}"
    return ""


def first_problem(pods: list[dict[str, Any]]) -> str:
    return next((problem for pod in pods if (problem := pod_problem(pod))), "")


def _exit_code(status: dict[str, Any]) -> int | None:
    state = status.get("state") or {}
    terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated") or {}
    code = terminated.get("exitCode")
    return int(code) if code is not None else None


def gave_up(pods: list[dict[str, Any]]) -> str:
    """The problem of the first pod with a container that keeps failing (GIVE_UP_AFTER_RESTARTS), or ''. A
    model download that failed only because the registry could not be reached (UNREACHABLE_EXIT) has not:
    the kubelet tries it again with back-off, as long as the rollout's progress deadline lets it."""
    for pod in pods:
        status = pod.get("status") or {}
        for kind, key in (("init container", "initContainerStatuses"), ("container", "containerStatuses")):
            for container in status.get(key) or []:
                if (
                    container.get("restartCount", 0) < GIVE_UP_AFTER_RESTARTS
                    or _exit_code(container) == UNREACHABLE_EXIT
                ):
                    continue
                if problem := _container_problem(kind, container):
                    return f"pod {pod['metadata']['name']}: {problem}"
    return ""


def controlled_by(items: list[dict[str, Any]], owner_uids: set[str]) -> list[dict[str, Any]]:
    """The objects whose controller (the owner reference marked `controller`) is one of `owner_uids`."""
    return [
        item
        for item in items
        if any(
            ref.get("controller") and ref.get("uid") in owner_uids
            for ref in (item.get("metadata") or {}).get("ownerReferences") or []
        )
    ]


def metrics_urls(pods: list[dict[str, Any]]) -> dict[str, str]:
    """`/metrics` of every Ready pod, by pod name (its container port named `metrics`)."""
    out: dict[str, str] = {}
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        ports = [
            p["containerPort"]
            for c in pod["spec"].get("containers", [])
            for p in c.get("ports") or []
            if p.get("name") == "metrics"
        ]
        if ready and status.get("podIP") and ports:
            out[pod["metadata"]["name"]] = f"http://{status['podIP']}:{ports[0]}/metrics"
    return out
