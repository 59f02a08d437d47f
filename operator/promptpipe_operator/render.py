"""A PromptPipeline's children as plain manifests: pure functions, no I/O.

Per stage: a Deployment and a Service, and a KEDA ScaledObject scaling the Deployment
on the stage's queue depth; one ConfigMap holds the runtime config every stage reads
(the same file `promptpipe up` writes locally, with Service DNS names as endpoints).
Replicas are left out of the Deployment: KEDA owns them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from promptpipe.config.loader import RuntimeConfig
from promptpipe.config.spec import STAGE_ORDER, PromptPipeline, StageName
from promptpipe_operator.settings import OperatorSettings

GRPC_PORT = 50051
METRICS_PORT = 9090
CONFIG_DIR = "/etc/promptpipe"
CONFIG_FILE = "runtime.yaml"
MANAGER = "promptpipe-operator"
# Pods get a little longer than the stage's drain grace before they are killed.
TERMINATION_MARGIN_SECONDS = 5

Manifest = dict[str, Any]


def child_name(pipeline: str, suffix: str) -> str:
    """`<pipeline>-<suffix>`, cut to a 63-character DNS label."""
    head = pipeline[: 63 - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}"


def labels(pipeline: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "promptpipe",
        "app.kubernetes.io/instance": pipeline,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
    }


def selector(pipeline: str, component: str) -> dict[str, str]:
    return {k: v for k, v in labels(pipeline, component).items() if k != "app.kubernetes.io/managed-by"}


def runtime_config(pp: PromptPipeline, namespace: str) -> RuntimeConfig:
    name = pp.metadata.name
    endpoints = {s: f"{child_name(name, s.value)}.{namespace}.svc:{GRPC_PORT}" for s in STAGE_ORDER}
    bare = pp.model_copy(update={"status": None})
    return RuntimeConfig(pipeline=bare, endpoints=endpoints, base_dir=CONFIG_DIR)


def config_map(pp: PromptPipeline, namespace: str) -> tuple[Manifest, str]:
    """The runtime-config ConfigMap, and a hash of it that rolls the pods when it changes."""
    text = runtime_config(pp, namespace).dump_yaml()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    manifest = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": child_name(pp.metadata.name, "config"), "namespace": namespace,
                     "labels": labels(pp.metadata.name, "config")},
        "data": {CONFIG_FILE: text},
    }
    return manifest, digest


def _probe(stage: StageName, kind: str) -> dict[str, Any]:
    probe: dict[str, Any] = {"grpc": {"port": GRPC_PORT}, "periodSeconds": 5, "timeoutSeconds": 2}
    if kind == "startup":
        # The inference stage loads a model before it reports SERVING.
        probe |= {"failureThreshold": 120 if stage is StageName.INFERENCE else 24}
    elif kind == "liveness":
        probe |= {"failureThreshold": 6}
    return probe


def deployment(pp: PromptPipeline, namespace: str, stage: StageName, settings: OperatorSettings,
               config_hash: str) -> Manifest:
    name = pp.metadata.name
    spec = pp.spec.stages.get(stage)
    env = [
        {"name": "PROMPTPIPE_STAGE", "value": stage.value},
        {"name": "PROMPTPIPE_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_FILE}"},
        {"name": "PROMPTPIPE_HOST", "value": "0.0.0.0"},  # noqa: S104 - inside the pod
        {"name": "PROMPTPIPE_PORT", "value": str(GRPC_PORT)},
        {"name": "PROMPTPIPE_METRICS_PORT", "value": str(METRICS_PORT)},
    ]
    container = {
        "name": "stage",
        "image": settings.stage_image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": env,
        "ports": [{"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "startupProbe": _probe(stage, "startup"),
        "readinessProbe": _probe(stage, "readiness"),
        "livenessProbe": _probe(stage, "liveness"),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108 - an emptyDir
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": child_name(name, stage.value), "namespace": namespace,
                     "labels": labels(name, stage.value)},
        "spec": {
            "selector": {"matchLabels": selector(name, stage.value)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(name, stage.value),
                    "annotations": {"promptpipe.io/config-hash": config_hash,
                                    "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT)},
                },
                "spec": {
                    "terminationGracePeriodSeconds": int(spec.drain_grace_seconds) + TERMINATION_MARGIN_SECONDS,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": child_name(name, "config")}},
                                {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def service(pp: PromptPipeline, namespace: str, stage: StageName) -> Manifest:
    name = pp.metadata.name
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": child_name(name, stage.value), "namespace": namespace,
                     "labels": labels(name, stage.value)},
        "spec": {
            "selector": selector(name, stage.value),
            "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
                      {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
        },
    }


def queue_depth_query(pipeline: str, namespace: str, stage: StageName) -> str:
    return (f'sum(promptpipe_stage_queue_depth{{namespace="{namespace}",pipeline="{pipeline}",'
            f'stage="{stage.value}"}})')


def scaled_object(pp: PromptPipeline, namespace: str, stage: StageName, settings: OperatorSettings) -> Manifest:
    name = pp.metadata.name
    scaling = pp.spec.stages.get(stage).scaling
    trigger_metadata = {
        "serverAddress": settings.prometheus_address,
        "query": queue_depth_query(name, namespace, stage),
        "threshold": str(scaling.target_queue_depth),
        # With minReplicas 0, any queued request wakes the stage.
        "activationThreshold": "0",
    }
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": child_name(name, stage.value), "namespace": namespace,
                     "labels": labels(name, stage.value)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": child_name(name, stage.value)},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [{"type": "prometheus", "metadata": trigger_metadata}],
        },
    }


def children(pp: PromptPipeline, namespace: str, settings: OperatorSettings) -> list[Manifest]:
    """Everything the pipeline owns, in the order it should be applied."""
    cm, config_hash = config_map(pp, namespace)
    out = [cm]
    for stage in STAGE_ORDER:
        out += [deployment(pp, namespace, stage, settings, config_hash), service(pp, namespace, stage),
                scaled_object(pp, namespace, stage, settings)]
    return out
