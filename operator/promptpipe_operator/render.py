"""A PromptPipeline's children as plain manifests: pure functions, no I/O.

Per stage: a Deployment and a Service, and a KEDA ScaledObject scaling the Deployment
on the stage's queue depth; one ConfigMap holds the runtime config every stage reads
(the same file `promptpipe up` writes locally, with Service DNS names as endpoints).
Replicas are left out of the stage Deployments: KEDA owns them. With backend `tgi`
and no endpoints, the operator also runs TGI: a GPU Deployment per color (blue-green,
see `rollout.py`), behind one inference Service that selects the active color; the inference
stage finds that Service's pods from its EndpointSlices (its own ServiceAccount, with a Role that
may only list and watch them), and routes each call to one of them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import yaml

from promptpipe.contract import health, identity, metrics, topology
from promptpipe.contract import labels as keys
from promptpipe.contract.runtime_config import BackendPods, RuntimeConfig
from promptpipe.contract.spec import (
    API_VERSION,
    KIND,
    STAGE_ORDER,
    BackendKind,
    CorpusSpec,
    PipelineSpec,
    PromptPipeline,
    ResourcesSpec,
    RolloutSpec,
    ScalingSpec,
    StageName,
    StageSpec,
    TgiSpec,
)
from promptpipe.registry.settings import RegistrySettings
from promptpipe_operator import egress
from promptpipe_operator.rollout import BLUE, State
from promptpipe_operator.settings import OperatorSettings

GRPC_PORT = 50051
STAGE_PORT = 50052  # the gateway's internal Stage service; not in its Service
METRICS_PORT = 9090
# The gateway's OpenAI-compatible HTTP API (docs/api.md).
HTTP_PORT = 8080
CONFIG_DIR = "/etc/promptpipe"
CONFIG_FILE = "runtime.yaml"
CORPUS_DIR = "/var/lib/promptpipe/corpus"
BACKEND = "backend"
TGI_PORT = 8080
MODELS_DIR = "/models"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
API_KEYS_DIR = "/var/run/promptpipe/api-keys"
API_KEYS_FILE = "keys.yaml"
TLS_DIR = "/var/run/promptpipe/tls"
# Stage identity: the pod's projected token (for the pipeline's audience) and the cluster's signing keys.
IDENTITY_DIR = "/var/run/promptpipe/identity"
# Pods get a little longer than the stage's drain grace before they are killed.
TERMINATION_MARGIN_SECONDS = 5
# The gateway keeps serving this long after its pod is marked for deletion, before it stops listening:
# time for the endpoints to drop it everywhere (kube-proxy, ingress controllers, clients' resolvers), so
# no new connection meets a closed port.
GATEWAY_PRE_STOP_SECONDS = 5
DNS_LABEL_CHARS = 63
NAME_HASH_CHARS = 8
# What a stage (or the model download's) /tmp may hold: nothing we run writes much there.
SCRATCH_SIZE_LIMIT = "256Mi"

# A Kubernetes object as the API takes it (apiVersion, kind, metadata, ...). `Manifest` is the registry's file list.
KubeObject = dict[str, Any]


def child_name(pipeline: str, suffix: str) -> str:
    """`<pipeline>-<suffix>`, within a 63-character DNS label. A name too long for it is cut, and a hash of
    the whole pipeline name goes in, so two long names that share a beginning never share a child."""
    name = f"{pipeline}-{suffix}"
    if len(name) <= DNS_LABEL_CHARS:
        return name
    digest = hashlib.sha256(pipeline.encode()).hexdigest()[:NAME_HASH_CHARS]
    head = pipeline[: DNS_LABEL_CHARS - len(suffix) - NAME_HASH_CHARS - 2].rstrip("-")
    return f"{head}-{digest}-{suffix}"


def labels(pipeline: str, component: str) -> dict[str, str]:
    return {
        keys.NAME: "promptpipe",
        keys.INSTANCE: pipeline,
        keys.COMPONENT: component,
        keys.MANAGED_BY: keys.MANAGER,
    }


def selector(pipeline: str, component: str) -> dict[str, str]:
    return {k: v for k, v in labels(pipeline, component).items() if k != keys.MANAGED_BY}


def owner_reference(pipeline: str, uid: str) -> dict[str, Any]:
    # No blockOwnerDeletion: it would need update on promptpipelines/finalizers, and
    # background deletion (the default) does not wait on it.
    return {"apiVersion": API_VERSION, "kind": KIND, "name": pipeline, "uid": uid, "controller": True}


def managed_tgi(pp: PromptPipeline) -> TgiSpec | None:
    """The TGI the operator runs for this pipeline, or None (another backend, or TGI at given endpoints)."""
    model = pp.spec.model
    if model.backend is not BackendKind.TGI:
        return None
    tgi = model.tgi or TgiSpec()
    return None if tgi.endpoints else tgi


def runtime_config(pp: PromptPipeline, namespace: str, enforce_identity: bool = True) -> RuntimeConfig:
    """The pipeline as the stages see it in the cluster: cluster paths and endpoints filled in,
    and what only the operator uses (scaling, resources, how TGI is run) left at defaults, so
    editing those changes the ScaledObject or the TGI Deployment without rolling every stage."""
    name = pp.metadata.name
    # A fused stage is reached at its host's Service (`spec.fuse`).
    hosts = {s: child_name(name, topology.host_of(pp.spec, s).value) for s in STAGE_ORDER}
    endpoints = {s: f"{host}.{namespace}.svc:{GRPC_PORT}" for s, host in hosts.items()}
    spec = pp.spec
    model = spec.model
    tgi = managed_tgi(pp)
    if tgi is not None:
        # The stages call the inference Service whatever version is behind it: a rollout rolls no stage.
        url = f"http://{backend_name(name)}.{namespace}.svc:{TGI_PORT}"
        model = model.model_copy(
            update={
                "version": "",
                "alias": "",
                "tgi": TgiSpec(
                    endpoints=[url],
                    read_timeout_seconds=tgi.read_timeout_seconds,
                    connect_timeout_seconds=tgi.connect_timeout_seconds,
                ),
            }
        )
    if model.openai is not None and model.openai.api_key_secret is not None:
        key_env = model.openai.api_key_env or OPENAI_KEY_ENV
        model = model.model_copy(
            update={"openai": model.openai.model_copy(update={"api_key_env": key_env, "api_key_secret": None})}
        )
    pods = BackendPods(service=backend_name(name), namespace=namespace) if tgi is not None else None
    rag = spec.rag
    if rag.corpus.config_map:
        rag = rag.model_copy(update={"corpus": CorpusSpec(path=CORPUS_DIR)})
    stages = spec.stages.model_copy(update={s.value: _as_the_stage_sees_it(spec, s) for s in STAGE_ORDER})
    spec = spec.model_copy(update={"model": model, "rag": rag, "stages": stages, "rollout": RolloutSpec()})
    bare = pp.model_copy(
        update={"status": None, "spec": spec, "metadata": type(pp.metadata)(name=name, namespace=namespace)}
    )
    return RuntimeConfig(
        pipeline=bare,
        endpoints=endpoints,
        base_dir=CONFIG_DIR,
        backend_pods=pods,
        identity=stage_identity(pp, namespace, enforce_identity),
    )


def stage_identity(pp: PromptPipeline, namespace: str, enforce: bool = True) -> identity.StageIdentity:
    """Who each process of the pipeline is (its ServiceAccount) and where its pods find the keys to check
    their callers' tokens with; each pod reads its own token (PROMPTPIPE_IDENTITY_TOKEN_FILE)."""
    name = pp.metadata.name
    return identity.StageIdentity(
        audience=identity.audience(namespace, name),
        namespace=namespace,
        accounts={stage: stage_account(name, stage) for stage in topology.processes(pp.spec)},
        keys_file=f"{IDENTITY_DIR}/{identity.KEYS_FILE}",
        enforce=enforce,
    )


def identity_enforceable(config: KubeObject | None, deployments: list[KubeObject]) -> bool:
    """Whether the stages refuse calls identity refuses (`StageIdentity.enforce`), from the pipeline's
    runtime-config ConfigMap and stage Deployments as they are. A new pipeline enforces from the start, and
    once enforced it stays so. A pipeline made by a version without stage identity first runs its new pods
    with `enforce: false` (an old caller, not yet restarted, is not refused by a new callee), and enforces
    once every stage Deployment has the identity volume and no pod of an older template is left."""
    if config is None:
        return True
    try:
        before = yaml.safe_load(config.get("data", {}).get(CONFIG_FILE, "")) or {}
    except yaml.YAMLError:
        before = {}
    previous = before.get("identity") if isinstance(before, dict) else None
    if isinstance(previous, dict) and previous.get("enforce", True) is True:
        return True

    def carries_token(d: KubeObject) -> bool:
        volumes = d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []
        status = d.get("status") or {}
        rolled = status.get("observedGeneration") == d.get("metadata", {}).get("generation") and (
            status.get("updatedReplicas") or 0
        ) >= (status.get("replicas") or 0)
        return any(v.get("name") == "identity" for v in volumes) and rolled

    return all(carries_token(d) for d in deployments)


def stage_account(pipeline: str, process: StageName) -> str:
    """A process's ServiceAccount: its identity in its calls to other stages (and, for inference with the
    operator's TGI, its right to read EndpointSlices)."""
    return child_name(pipeline, process.value)


def identity_keys(pp: PromptPipeline, namespace: str, issuer_keys: str) -> KubeObject:
    """The cluster's service-account issuer and its public keys, copied where the stages read them (a change
    reaches the pods' volume without a restart; no stage talks to the API server for it)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(pp.metadata.name, "identity"),
            "namespace": namespace,
            "labels": labels(pp.metadata.name, "identity"),
        },
        "data": {identity.KEYS_FILE: issuer_keys},
    }


def stage_accounts(pp: PromptPipeline, namespace: str) -> list[KubeObject]:
    """One ServiceAccount per process, with no API token mounted (only the one that reads EndpointSlices
    mounts it)."""
    name = pp.metadata.name
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {
                "name": stage_account(name, stage),
                "namespace": namespace,
                "labels": labels(name, stage.value),
            },
            "automountServiceAccountToken": False,
        }
        for stage in topology.processes(pp.spec)
    ]


def config_map(pp: PromptPipeline, namespace: str, enforce_identity: bool = True) -> tuple[KubeObject, str]:
    """The runtime-config ConfigMap, and a hash of it that rolls the pods when it changes."""
    text = runtime_config(pp, namespace, enforce_identity).dump_yaml()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(pp.metadata.name, "config"),
            "namespace": namespace,
            "labels": labels(pp.metadata.name, "config"),
        },
        "data": {CONFIG_FILE: text},
    }
    return manifest, digest


def _probe(stage: StageName, kind: str, loads_model: bool) -> dict[str, Any]:
    # The gateway's on its internal port, which is plain gRPC even when the public one is TLS (the kubelet's
    # gRPC probe speaks no TLS); the same health service answers on both.
    port = STAGE_PORT if stage is StageName.STREAM else GRPC_PORT
    probe: dict[str, Any] = {"grpc": {"port": port}, "periodSeconds": 5, "timeoutSeconds": 2}
    if kind == "startup":
        # The inference stage (or the process it is fused into) loads a model before it reports SERVING.
        probe |= {"failureThreshold": 120 if loads_model else 24}
    elif kind == "liveness":
        # Its own health service: NOT_SERVING only while the stage is stuck, so a stage is restarted for
        # that, never for a backend whose circuit is open (which only takes it out of its Service).
        probe |= {"grpc": {"port": port, "service": health.LIVENESS}, "failureThreshold": 6}
    return probe


# Requests sized for this machine class of work; limits only on memory, so a stage
# is throttled rather than killed when it bursts on CPU.
def _as_the_stage_sees_it(spec: PipelineSpec, stage: StageName) -> StageSpec:
    """A stage's spec without what only the operator uses (its scaling and resources)."""
    return spec.stages.get(stage).model_copy(update={"scaling": ScalingSpec(), "resources": None})


_STAGE_RESOURCES = ResourcesSpec(requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"})
_LLAMACPP_RESOURCES = ResourcesSpec(requests={"cpu": "1", "memory": "1Gi"}, limits={"memory": "4Gi"})


def stage_resources(pp: PromptPipeline, stage: StageName) -> dict[str, Any]:
    """The stage container's resources: the spec's, else a default for what the stage runs."""
    chosen = pp.spec.stages.get(stage).resources
    if chosen is None:
        runs_inference = topology.runs_inference(pp.spec, stage)
        embedded = runs_inference and pp.spec.model.backend is BackendKind.LLAMACPP
        chosen = _LLAMACPP_RESOURCES if embedded else _STAGE_RESOURCES
    return _resources(chosen)


def _resources(spec: ResourcesSpec) -> dict[str, Any]:
    return {k: dict(v) for k, v in (("requests", spec.requests), ("limits", spec.limits)) if v}


def deployment(
    pp: PromptPipeline, namespace: str, stage: StageName, settings: OperatorSettings, config_hash: str
) -> KubeObject:
    name = pp.metadata.name
    runs_inference = topology.runs_inference(pp.spec, stage)
    drain_grace = topology.drain_grace(pp.spec, stage)
    env: list[dict[str, Any]] = [
        {"name": "PROMPTPIPE_STAGE", "value": stage.value},
        {"name": "PROMPTPIPE_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_FILE}"},
        {"name": "PROMPTPIPE_HOST", "value": "0.0.0.0"},  # noqa: S104 - inside the pod
        {"name": "PROMPTPIPE_PORT", "value": str(GRPC_PORT)},
        {"name": "PROMPTPIPE_METRICS_PORT", "value": str(METRICS_PORT)},
        # The stages log as the operator does: JSON lines unless the chart says plain.
        {"name": "PROMPTPIPE_LOG_FORMAT", "value": "json" if settings.log_format == "json" else "text"},
    ]
    ports = [
        {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": child_name(name, "config")}},
        {"name": "tmp", "emptyDir": {"sizeLimit": SCRATCH_SIZE_LIMIT}},
    ]
    _identity(pp, namespace, env, mounts, volumes)
    if stage is StageName.STREAM:
        env.append({"name": "PROMPTPIPE_HTTP_PORT", "value": str(HTTP_PORT)})
        env.append({"name": "PROMPTPIPE_STAGE_PORT", "value": str(STAGE_PORT)})
        ports.append({"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"})
        ports.append({"name": "stage", "containerPort": STAGE_PORT, "protocol": "TCP"})
        _gateway_front_door(pp, env, mounts, volumes)
    corpus = pp.spec.rag.corpus.config_map
    if topology.host_of(pp.spec, StageName.RAG) is stage and corpus:  # rag's own pod, or the gateway's with rag fused
        mounts.append({"name": "corpus", "mountPath": CORPUS_DIR, "readOnly": True})
        volumes.append({"name": "corpus", "configMap": {"name": corpus}})
    openai = pp.spec.model.openai
    if (
        runs_inference
        and pp.spec.model.backend is BackendKind.OPENAI
        and openai is not None
        and openai.api_key_secret is not None
    ):
        ref = openai.api_key_secret
        env.append(
            {
                "name": openai.api_key_env or OPENAI_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    container = {
        "name": "stage",
        "image": settings.stage_image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": env,
        "ports": ports,
        "startupProbe": _probe(stage, "startup", runs_inference),
        "readinessProbe": _probe(stage, "readiness", runs_inference),
        "livenessProbe": _probe(stage, "liveness", runs_inference),
        "resources": stage_resources(pp, stage),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    pre_stop = GATEWAY_PRE_STOP_SECONDS if stage is StageName.STREAM else 0
    if pre_stop:  # the kubelet's own sleep (Kubernetes 1.30+): no binary needed in the image
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": pre_stop}}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": child_name(name, stage.value),
            "namespace": namespace,
            "labels": labels(name, stage.value),
        },
        "spec": {
            "selector": {"matchLabels": selector(name, stage.value)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(name, stage.value),
                    "annotations": {
                        keys.CONFIG_HASH: config_hash,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": math.ceil(drain_grace) + TERMINATION_MARGIN_SECONDS + pre_stop,
                    "topologySpreadConstraints": spread(selector(name, stage.value)),
                    **_service_account(pp, stage),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def spread(pods: dict[str, str]) -> list[dict[str, Any]]:
    """Replicas of one component spread over nodes and zones, so that a node's drain or a zone's outage takes
    one, not all; `ScheduleAnyway`: a one-node cluster still schedules them. Counted per ReplicaSet
    (`pod-template-hash`), so a rollout's new pods are spread among themselves."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": pods},
            "matchLabelKeys": ["pod-template-hash"],
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


def disruption_budget(pp: PromptPipeline, namespace: str, component: str, pods: dict[str, str]) -> KubeObject:
    """At most one of a component's pods evicted at a time (a drain, a cluster upgrade), whatever the
    replica count KEDA has set; an unready pod may always go (it serves nothing, and would block a drain)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": child_name(pp.metadata.name, component),
            "namespace": namespace,
            "labels": labels(pp.metadata.name, component),
        },
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": pods},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def disruption_budgets(pp: PromptPipeline, namespace: str) -> list[KubeObject]:
    """One for each component that may run more than one pod: each stage process whose scaling allows it,
    and operator-run TGI with replicas (both colors under one budget)."""
    name = pp.metadata.name
    out = [
        disruption_budget(pp, namespace, stage.value, selector(name, stage.value))
        for stage in topology.processes(pp.spec)
        if pp.spec.stages.get(stage).scaling.max_replicas > 1
    ]
    tgi = managed_tgi(pp)
    if tgi is not None and tgi.replicas > 1:
        out.append(disruption_budget(pp, namespace, BACKEND, selector(name, BACKEND)))
    return out


def _identity(
    pp: PromptPipeline,
    namespace: str,
    env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> None:
    """The pod's token for the pipeline's audience (the kubelet writes it and refreshes it before it
    expires) and the keys its callers' tokens are checked against, in one volume."""
    token = {
        "audience": identity.audience(namespace, pp.metadata.name),
        "expirationSeconds": identity.TOKEN_SECONDS,
        "path": identity.TOKEN_FILE,
    }
    keys = {
        "name": child_name(pp.metadata.name, "identity"),
        "items": [{"key": identity.KEYS_FILE, "path": identity.KEYS_FILE}],
    }
    env.append({"name": "PROMPTPIPE_IDENTITY_TOKEN_FILE", "value": f"{IDENTITY_DIR}/{identity.TOKEN_FILE}"})
    mounts.append({"name": "identity", "mountPath": IDENTITY_DIR, "readOnly": True})
    volumes.append(
        {
            "name": "identity",
            "projected": {"sources": [{"serviceAccountToken": token}, {"configMap": keys}], "defaultMode": 0o440},
        }
    )


def _gateway_front_door(
    pp: PromptPipeline, env: list[dict[str, Any]], mounts: list[dict[str, Any]], volumes: list[dict[str, Any]]
) -> None:
    """The gateway's API keys, TLS certificate and shared quota store. Keys and certificate: each Secret
    mounted as a volume (not an env var, not a subPath: the kubelet swaps a volume's files when the Secret
    changes, and the gateway reads them again, so keys rotate and certificates renew without a restart).
    Without keys, a cluster's gateway refuses every call unless the pipeline says `open`."""
    auth = pp.spec.auth
    if auth.api_keys_secret is not None:
        ref = auth.api_keys_secret
        env.append({"name": "PROMPTPIPE_API_KEYS_FILE", "value": f"{API_KEYS_DIR}/{API_KEYS_FILE}"})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        items = [{"key": ref.key, "path": API_KEYS_FILE}]
        # Group-readable: the pod's fsGroup owns the files, its non-root user reads them.
        volumes.append({"name": "api-keys", "secret": {"secretName": ref.name, "items": items, "defaultMode": 0o440}})
    elif not auth.open:
        env.append({"name": "PROMPTPIPE_REQUIRE_API_KEYS", "value": "true"})
    store = auth.quota_store
    if store is not None and store.url_secret is not None:
        # An env var from the Secret, not a file: the URL (and its password) changes with a rollout.
        url = {"name": store.url_secret.name, "key": store.url_secret.key}
        env.append({"name": "PROMPTPIPE_QUOTA_STORE_URL", "valueFrom": {"secretKeyRef": url}})
    if pp.spec.tls is not None:
        env.append({"name": "PROMPTPIPE_TLS_CERT_FILE", "value": f"{TLS_DIR}/tls.crt"})
        env.append({"name": "PROMPTPIPE_TLS_KEY_FILE", "value": f"{TLS_DIR}/tls.key"})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": pp.spec.tls.secret_name, "defaultMode": 0o440}})


def discovers_backend(pp: PromptPipeline, stage: StageName) -> bool:
    """The inference stage (or the process it is fused into) of a pipeline whose TGI the operator runs: it
    watches the TGI pods' EndpointSlices."""
    return topology.runs_inference(pp.spec, stage) and managed_tgi(pp) is not None


def _service_account(pp: PromptPipeline, stage: StageName) -> dict[str, Any]:
    # Only the process that finds the TGI pods calls the Kubernetes API: no API token in the others to steal.
    return {
        "serviceAccountName": stage_account(pp.metadata.name, stage),
        "automountServiceAccountToken": discovers_backend(pp, stage),
    }


def discovery_name(pipeline: str) -> str:
    """The inference stage's Role and RoleBinding (replica discovery)."""
    return child_name(pipeline, "inference-discovery")


def discovery_access(pp: PromptPipeline, namespace: str) -> list[KubeObject]:
    """What lets the inference stage find the TGI pods: a Role for its process's ServiceAccount that may read
    EndpointSlices in the pipeline's namespace, and nothing else (RBAC cannot narrow a list to one Service's
    slices)."""
    name = pp.metadata.name
    role = discovery_name(name)
    account = stage_account(name, topology.host_of(pp.spec, StageName.INFERENCE))
    meta = {"name": role, "namespace": namespace, "labels": labels(name, StageName.INFERENCE.value)}
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": rbac, "kind": "Role", "metadata": meta, "rules": [DISCOVERY_RULE]},
        {
            "apiVersion": rbac,
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    ]


# What the inference stage's Role grants (the operator holds it too: RBAC lets it grant no more than it has).
DISCOVERY_RULE: dict[str, Any] = {
    "apiGroups": ["discovery.k8s.io"],
    "resources": ["endpointslices"],
    "verbs": ["list", "watch"],
}


def service(pp: PromptPipeline, namespace: str, stage: StageName) -> KubeObject:
    """The stages call each other through headless Services: the name resolves to every ready pod, and
    the caller spreads its calls over them (a ClusterIP would pin each HTTP/2 connection to one pod).
    The gateway keeps a ClusterIP: its clients are anyone's."""
    name = pp.metadata.name
    spec: dict[str, Any] = {
        "selector": selector(name, stage.value),
        "ports": [
            {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
        ],
    }
    if stage is StageName.STREAM:
        spec["ports"].append({"name": "http", "port": HTTP_PORT, "targetPort": "http", "appProtocol": "http"})
    else:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_name(name, stage.value),
            "namespace": namespace,
            "labels": labels(name, stage.value),
        },
        "spec": spec,
    }


def load_query(pipeline: str, namespace: str, stage: StageName, window: str) -> str:
    """A stage's load: the mean number of calls working or waiting in it over `window`. For the stages others
    call, measured by the callers (seconds their calls to it were open), so it is there, and wakes the
    stage, while the stage has no pod at all, and short calls count as much as long ones. The gateway, which
    nothing calls, counts its own calls."""
    if stage is StageName.STREAM:
        own = metrics.selector(namespace=namespace, pipeline=pipeline, stage=stage.value)
        return f"sum({metrics.STAGE_IN_FLIGHT.name}{own}) + sum({metrics.STAGE_QUEUE_DEPTH.name}{own})"
    callers = metrics.selector(namespace=namespace, pipeline=pipeline, to=stage.value)
    return f"sum(rate({metrics.STAGE_NEXT_CALL_SECONDS.name}{callers}[{window}]))"


# KEDA reads the load this often: it decides 0 ↔ 1 itself, and feeds the HPA for 1 ↔ N.
POLLING_SECONDS = 5


def scaled_object(pp: PromptPipeline, namespace: str, stage: StageName, settings: OperatorSettings) -> KubeObject:
    """Replicas = load / (concurrency + targetQueueDepth), rounded up: a replica is added once every replica's
    slots are busy and more than `targetQueueDepth` calls wait on each. A busy stage (load > 0) is never
    scaled to zero; a stage at zero is woken by the first call to it (activation above 0)."""
    name = pp.metadata.name
    scaling = pp.spec.stages.get(stage).scaling
    # What its callers call it as, and whose queue bounds a replica's calls: post's, when post is fused in.
    called = topology.called_as(pp.spec, stage)
    trigger_metadata = {
        "serverAddress": settings.prometheus_address,
        "query": load_query(name, namespace, called, settings.load_window),
        "threshold": str(pp.spec.stages.get(called).queue.concurrency + scaling.target_queue_depth),
        "activationThreshold": "0",
    }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": child_name(name, stage.value),
            "namespace": namespace,
            "labels": labels(name, stage.value),
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": child_name(name, stage.value)},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": POLLING_SECONDS,
            "cooldownPeriod": scaling.cooldown_seconds,
            "triggers": [{"type": "prometheus", "metadata": trigger_metadata, "metricType": "AverageValue"}],
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        # Up at once; down only after the load has stayed lower for the cooldown.
                        "scaleUp": {"stabilizationWindowSeconds": 0},
                        "scaleDown": {"stabilizationWindowSeconds": scaling.cooldown_seconds},
                    }
                }
            },
        },
    }


def _tgi_args(tgi: TgiSpec, model_id: str) -> list[str]:
    args = [
        "--model-id",
        model_id,
        "--port",
        str(TGI_PORT),
        "--hostname",
        "0.0.0.0",  # noqa: S104 - in the pod
        "--max-concurrent-requests",
        str(tgi.max_concurrent_requests),
        # TGI reports usage to Hugging Face unless told not to (on by default since 2.1): a cluster's model
        # server sends nothing out, and its egress policy would refuse it anyway.
        "--usage-stats",
        "off",
    ]
    for flag, value in (
        ("--max-input-tokens", tgi.max_input_tokens),
        ("--max-total-tokens", tgi.max_total_tokens),
        ("--max-batch-prefill-tokens", tgi.max_batch_prefill_tokens),
    ):
        if value is not None:
            args += [flag, str(value)]
    if tgi.quantize is not None:
        args += ["--quantize", tgi.quantize.value]
    if tgi.gpus > 1:
        args += ["--num-shard", str(tgi.gpus)]
    return args


def backend_name(pipeline: str, color: str | None = None) -> str:
    """`<pipeline>-backend` (the inference Service, on the active color) or `<pipeline>-backend-<color>`."""
    return child_name(pipeline, f"{BACKEND}-{color}" if color else BACKEND)


# What the model download takes from `registry_secret`: the AWS SDK's static credentials.
REGISTRY_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Operator-run TGI's memory when its resources name none: the request, or this default's, as a limit too, so
# a leak or an oversized model takes its own pod down and not the node's others.
TGI_DEFAULT_RESOURCES = ResourcesSpec(requests={"cpu": "2", "memory": "16Gi"}, limits={"memory": "16Gi"})


def _fetch_model(
    pp: PromptPipeline, version: str, settings: OperatorSettings, registry: RegistrySettings, digest: str = ""
) -> dict[str, Any]:
    """The init container that puts the registry version on local disk, verified, before TGI starts: its
    files against their hashes, its file list against its digest, and that digest against the one the
    operator resolved when it chose the version (`digest`, when known).

    A missing or corrupted artifact makes it fail: the pod never becomes Ready and never serves."""
    env = [
        {"name": f"PROMPTPIPE_REGISTRY_{k.upper()}", "value": str(v)}
        for k, v in registry.model_dump(
            include={"bucket", "table", "region", "endpoint_url", "s3_endpoint_url", "prefix"}
        ).items()
        if v
    ]
    container: dict[str, Any] = {
        "name": "fetch-model",
        "image": settings.stage_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": [
            "promptpipe",
            "model",
            "pull",
            f"{pp.spec.model.name}:{version}",
            f"{MODELS_DIR}/model",
            *(["--digest", digest] if digest else []),
        ],
        "env": env,
        # The error (which file failed its hash, which version is missing) lands in the pod's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
        },
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}, {"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
    }
    if settings.registry_secret:  # AWS keys; without it, the pod's identity (IRSA, instance role)
        # Only the keys the download reads, never the whole Secret as environment: whatever else it holds
        # stays out of a container that runs a model's files through a parser.
        container["env"] += [
            {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": settings.registry_secret, "key": key, "optional": True}},
            }
            for key in REGISTRY_SECRET_KEYS
        ]
    return container


def tgi_deployment(
    pp: PromptPipeline,
    namespace: str,
    tgi: TgiSpec,
    color: str,
    version: str,
    settings: OperatorSettings,
    registry: RegistrySettings | None,
    digest: str = "",
) -> KubeObject:
    """TGI serving one model version on GPUs (the image runs as root; it is not ours to change)."""
    name = pp.metadata.name
    resources = _resources(tgi.resources or TGI_DEFAULT_RESOURCES)
    memory = resources.get("requests", {}).get("memory", TGI_DEFAULT_RESOURCES.requests["memory"])
    resources.setdefault("limits", {}).setdefault("memory", memory)
    if tgi.gpus:
        resources["limits"]["nvidia.com/gpu"] = str(tgi.gpus)
    health = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    from_registry = pp.spec.model.from_registry and registry is not None
    mounts: list[dict[str, Any]] = [{"name": "data", "mountPath": "/data"}, {"name": "shm", "mountPath": "/dev/shm"}]  # noqa: S108 - a mount in the pod
    volumes: list[dict[str, Any]] = [
        {"name": "data", "emptyDir": {"sizeLimit": tgi.model_storage}},
        # NCCL and the model shards share memory through /dev/shm.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    if from_registry:
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
        volumes += [
            {"name": "models", "emptyDir": {"sizeLimit": tgi.model_storage}},
            {"name": "tmp", "emptyDir": {"sizeLimit": SCRATCH_SIZE_LIMIT}},
        ]
    pod: dict[str, Any] = {
        # In-flight generations finish before the pod goes.
        "terminationGracePeriodSeconds": int(pp.spec.stages.inference.timeout_seconds) + TERMINATION_MARGIN_SECONDS,
        # Neither TGI nor the model download calls the Kubernetes API (an IRSA role comes in a token of its own).
        "automountServiceAccountToken": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "topologySpreadConstraints": spread({**selector(name, BACKEND), keys.COLOR: color}),
        "containers": [
            {
                "name": "tgi",
                "image": tgi.image,
                "args": _tgi_args(tgi, f"{MODELS_DIR}/model" if from_registry else version),
                "env": [{"name": "HF_HOME", "value": "/data"}],
                "ports": [{"name": "http", "containerPort": TGI_PORT, "protocol": "TCP"}],
                # Downloading and loading weights can take long; after that, /health answers in milliseconds.
                "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 180},
                "readinessProbe": {**health, "periodSeconds": 5},
                "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 4},
                "resources": resources,
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    if from_registry and registry is not None:
        pod["initContainers"] = [_fetch_model(pp, version, settings, registry, digest)]
    if settings.backend_service_account:
        pod["serviceAccountName"] = settings.backend_service_account
    if tgi.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if tgi.node_selector:
        pod["nodeSelector"] = dict(tgi.node_selector)
    pod_labels = {**labels(name, BACKEND), keys.COLOR: color}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": backend_name(name, color),
            "namespace": namespace,
            "labels": pod_labels,
            "annotations": {keys.MODEL_VERSION: version},
        },
        "spec": {
            "replicas": tgi.replicas,
            "selector": {"matchLabels": {**selector(name, BACKEND), keys.COLOR: color}},
            # GPUs are scarce: replace a pod at a time rather than needing a spare GPU.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
            "template": {"metadata": {"labels": pod_labels, "annotations": {keys.MODEL_VERSION: version}}, "spec": pod},
        },
    }


def tgi_service(pp: PromptPipeline, namespace: str, color: str, main: bool) -> KubeObject:
    """`main`: the inference Service, selecting the active color (the switch); else one color's own."""
    name = pp.metadata.name
    svc_labels = labels(name, BACKEND) if main else {**labels(name, BACKEND), keys.COLOR: color}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": backend_name(name, None if main else color), "namespace": namespace, "labels": svc_labels},
        "spec": {
            "selector": {**selector(name, BACKEND), keys.COLOR: color},
            "ports": [{"name": "http", "port": TGI_PORT, "targetPort": "http"}],
        },
    }


def backend_children(
    pp: PromptPipeline, namespace: str, state: State, settings: OperatorSettings, registry: RegistrySettings | None
) -> list[KubeObject]:
    """The inference Service first (the switch is one apply), then each running color."""
    tgi = managed_tgi(pp)
    if tgi is None:
        return []
    active = state.active.color if state.active else BLUE
    out = [tgi_service(pp, namespace, active, main=True)]
    for slot in state.deployed():
        out += [
            tgi_deployment(pp, namespace, tgi, slot.color, slot.version, settings, registry, slot.digest),
            tgi_service(pp, namespace, slot.color, main=False),
        ]
    return out


# Who calls whom inside a pipeline: each stage's callers, by component label.
CALLERS: dict[str, tuple[str, ...]] = {
    StageName.RAG.value: (StageName.STREAM.value,),
    StageName.ASSEMBLE.value: (StageName.STREAM.value,),
    StageName.POST.value: (StageName.STREAM.value,),
    StageName.INFERENCE.value: (StageName.POST.value,),
    # assemble counts a prompt's tokens with TGI's own tokenizer (POST /tokenize).
    BACKEND: (StageName.INFERENCE.value, StageName.ASSEMBLE.value),
}


# Whom each stage calls: the inverse of CALLERS.
CALLEES: dict[str, tuple[str, ...]] = {
    c: tuple(callee for callee, callers in CALLERS.items() if c in callers) for c in (s.value for s in StageName)
}


def _backend_urls(pp: PromptPipeline, stage: str) -> list[str]:
    """The URLs a stage calls for the backend when the operator does not run it."""
    model = pp.spec.model
    if model.backend is BackendKind.OPENAI and model.openai is not None and stage == StageName.INFERENCE.value:
        return list(model.openai.endpoints)
    if model.backend is BackendKind.TGI and model.tgi is not None:
        return list(model.tgi.endpoints)  # inference generates, assemble asks /tokenize
    return []


def _registry_urls(registry: RegistrySettings) -> list[str]:
    urls = {u for u in (registry.endpoint_url, registry.s3_endpoint_url) if u}
    # No endpoint: AWS itself (S3 and DynamoDB over https, at names a policy cannot pin).
    return sorted(urls) or ["https://s3.amazonaws.com"]


def network_policies(
    pp: PromptPipeline,
    namespace: str,
    settings: OperatorSettings,
    registry: RegistrySettings | None = None,
    api_server: Sequence[egress.Address] = (),
) -> list[KubeObject]:
    """One NetworkPolicy per component: who may open connections to its pods, on which port, and where its
    pods may open connections. Clients reach the gateway's public ports only; each stage is reached by the
    stage that calls it alone (so nothing skips the template, the limits or the filters by calling inference
    or post directly); metrics ports by the operator and the scrapers' namespaces; the gateway's internal
    port by the operator alone. Out of each pod: DNS, the stages and backend it calls, what the spec names
    (tracing collector, endpoints, registry, `network.egress`); the inference stage reaches the API server
    (`api_server`, the `kubernetes` Service's endpoints) only to discover operator-run TGI's replicas."""
    name = pp.metadata.name

    def pods(component: str) -> dict[str, Any]:
        return {"podSelector": {"matchLabels": selector(name, component)}}

    def namespaces(*names: str) -> list[dict[str, Any]]:
        return [egress.in_namespace(n) for n in names]

    def ports(*names: str) -> list[dict[str, Any]]:
        return [{"protocol": "TCP", "port": n} for n in names]

    operator = namespaces(settings.lease_namespace)
    scrapers = namespaces(*dict.fromkeys((settings.lease_namespace, *settings.scrape_namespaces)))
    rules: dict[str, list[dict[str, Any]]] = {
        # No `from`: any client, in the cluster or through an ingress.
        StageName.STREAM.value: [
            {"ports": ports("grpc", "http")},
            {"from": operator, "ports": ports("stage")},
            {"from": scrapers, "ports": ports("metrics")},
        ]
    }
    processes = {s.value: s for s in topology.processes(pp.spec)}
    tgi = managed_tgi(pp)

    def host(stage: str) -> str:
        return topology.host_of(pp.spec, StageName(stage)).value

    def hosts(stages: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(host(c) for c in stages))

    for component, stage_callers in CALLERS.items():
        callers = hosts(stage_callers)  # the processes the calling stages run in
        if component in processes:  # a process's callers are those of the stage called in it
            callers = hosts(CALLERS[topology.called_as(pp.spec, processes[component]).value])
        elif component != BACKEND:
            continue  # fused: no pods of its own
        if component == BACKEND:
            if tgi is None:
                continue
            # TGI serves its API and its /metrics on one port; the operator smoke-tests each color there.
            rules[BACKEND] = [
                {"from": [pods(c) for c in callers], "ports": ports("http")},
                {"from": scrapers, "ports": ports("http")},
            ]
            continue
        rules[component] = [
            {"from": [pods(c) for c in callers], "ports": ports("grpc")},
            {"from": scrapers, "ports": ports("metrics")},
        ]

    tracing = [egress.to_url(pp.spec.tracing.otlp_endpoint, api_server)] if pp.spec.tracing else []
    out_rules: dict[str, list[dict[str, Any]]] = {}
    for component in rules:
        hosted = [s.value for s in StageName if host(s.value) == component] if component != BACKEND else []
        out = [egress.DNS, *tracing]
        for stage in hosted:
            for callee in CALLEES[stage]:
                if callee != BACKEND and host(callee) != component:
                    out.append({"to": [pods(host(callee))], "ports": ports("grpc")})
                elif callee == BACKEND and tgi is not None:
                    out.append({"to": [pods(BACKEND)], "ports": ports("http")})
                elif callee == BACKEND:
                    out += [egress.to_url(u, api_server) for u in _backend_urls(pp, stage)]
        if tgi is not None and host(StageName.INFERENCE.value) == component and api_server:
            out.append(egress.to_api_server(api_server))  # replica discovery: EndpointSlices
        if component == StageName.STREAM.value and pp.spec.auth.quota_store is not None:
            # The chart's store runs beside the operator; another store needs a `network.egress` rule.
            out.append({"to": operator, "ports": [{"protocol": "TCP", "port": 6379}]})
        if component == BACKEND:
            if pp.spec.model.from_registry and registry is not None:
                out += [egress.to_url(u, api_server) for u in _registry_urls(registry)]
            else:  # TGI downloads the model from the Hugging Face Hub
                out.append(egress.to_url("https://huggingface.co", api_server))
        for declared in pp.spec.network.egress:
            named = {c.value for c in declared.components}
            if not named or named & {*hosted, *([BACKEND] if component == BACKEND else [])}:
                out.append(egress.declared(declared))
        out_rules[component] = list({yaml.safe_dump(r, sort_keys=True): r for r in out}.values())

    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {
                "name": child_name(name, f"{component}-network"),
                "namespace": namespace,
                "labels": labels(name, component),
            },
            "spec": {
                "podSelector": {"matchLabels": selector(name, component)},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": out_rules[component],
            },
        }
        for component, ingress in rules.items()
    ]


def children(
    pp: PromptPipeline,
    namespace: str,
    settings: OperatorSettings,
    state: State | None = None,
    registry: RegistrySettings | None = None,
    issuer_keys: str = "",
    enforce_identity: bool = True,
    api_server: Sequence[egress.Address] = (),
) -> list[KubeObject]:
    """Everything the pipeline owns, in the order it should be applied. `state`: the backend rollout's;
    `issuer_keys`: the cluster's service-account issuer and keys (`Kube.issuer_keys`), for stage identity;
    `enforce_identity`: `identity_enforceable` of the pipeline's Deployments as they are; `api_server`: the
    API server's endpoints (`Kube.api_server`), which replica discovery calls."""
    cm, config_hash = config_map(pp, namespace, enforce_identity)
    access = discovery_access(pp, namespace) if managed_tgi(pp) is not None else []
    accounts = [*stage_accounts(pp, namespace), identity_keys(pp, namespace, issuer_keys)]
    out = [*backend_children(pp, namespace, state or State(), settings, registry), *accounts, *access, cm]
    for stage in topology.processes(pp.spec):
        out += [
            deployment(pp, namespace, stage, settings, config_hash),
            service(pp, namespace, stage),
            scaled_object(pp, namespace, stage, settings),
        ]
    return [*out, *disruption_budgets(pp, namespace), *network_policies(pp, namespace, settings, registry, api_server)]
