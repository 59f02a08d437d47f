"""The parts of a kubelet the tests need, since none runs here: a container's environment as the kubelet
would build it from the API server (env, envFrom, Secrets, ConfigMaps, the downward API)."""

from __future__ import annotations

import base64
from typing import Any

from kubernetes import client

Container = dict[str, Any]  # as in a Pod spec, camelCase keys


def _secret(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, str]:
    data = core.read_namespaced_secret(name, namespace).data or {}
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def _config_map(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, str]:
    return dict(core.read_namespaced_config_map(name, namespace).data or {})


def _field(path: str, namespace: str, pod_name: str) -> str:
    fields = {"metadata.namespace": namespace, "metadata.name": pod_name}
    if path not in fields:
        raise NotImplementedError(f"fieldRef {path}")
    return fields[path]


def container_env(core: client.CoreV1Api, namespace: str, container: Container, pod_name: str = "") -> dict[str, str]:
    """envFrom first, then env on top (the kubelet's precedence). `$(VAR)` expansion is not done."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            values = _secret(core, namespace, source["secretRef"]["name"])
        else:
            values = _config_map(core, namespace, source["configMapRef"]["name"])
        env |= {prefix + k: v for k, v in values.items()}
    for var in container.get("env") or []:
        if "valueFrom" not in var:  # the API server omits an empty value
            env[var["name"]] = var.get("value", "")
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            env[var["name"]] = _field(ref["fieldRef"]["fieldPath"], namespace, pod_name)
        elif "secretKeyRef" in ref:
            env[var["name"]] = _secret(core, namespace, ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        else:
            key = ref["configMapKeyRef"]
            env[var["name"]] = _config_map(core, namespace, key["name"])[key["key"]]
    return env
