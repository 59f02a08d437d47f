"""The operator against the real kube-apiserver, running as its own process under its ServiceAccount.

There is no kubelet: tests simulate readiness by writing Deployment status, as the
Deployment controller would once pods are Ready.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from kubernetes import client

from promptpipe.contract.labels import ROLLBACK
from promptpipe.contract.spec import GROUP, STAGE_ORDER
from promptpipe.localproc import free_port
from promptpipe.registry.store import Registry
from promptpipe.v1 import stage_pb2, stage_pb2_grpc
from promptpipe.waiting import wait_until
from promptpipe_operator import rbac
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.cluster import QUICKSTART, Cluster, apply
from tests.support.faults import Mode
from tests.support.kube import kubectl
from tests.support.moto import make_model, registry_env
from tests.support.operator import (
    SYSTEM_NAMESPACE,
    OperatorProcess,
    api_through_proxy,
    operator_kubeconfig,
    service_account_kubeconfig,
)
from tests.support.pipelines import serving_process

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[1]
STAGES = [s.value for s in STAGE_ORDER]
# The config and identity ConfigMaps, and per stage a Deployment, a Service, a ScaledObject, a NetworkPolicy
# and a ServiceAccount (its identity).
QUICKSTART_CHILDREN = 2 + 6 * len(STAGES)
# The TGI the operator runs: the inference Service, blue's Deployment and Service, the inference stage's
# Role and RoleBinding (it watches the TGI pods' EndpointSlices), the TGI pods' NetworkPolicy.
TGI_CHILDREN = 6
# Where kopf records the spec it last handled (handlers.py configures the prefix).
LAST_HANDLED = f"{GROUP}/last-handled-configuration"
KOPF_MANAGED = f"{GROUP}/kopf-managed"  # kopf's mark on every object it has seen: not a handler's progress


def pipeline_doc(name: str = "quickstart", **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(QUICKSTART)
    doc["metadata"]["name"] = name
    doc["spec"].update(spec)
    return doc


@pytest.fixture
def cluster(kube: client.ApiClient, namespace: str) -> Cluster:
    return Cluster(kube, namespace)


def all_created(cluster: Cluster, count: int = QUICKSTART_CHILDREN, name: str = "quickstart") -> bool:
    return len(cluster.children(name)) == count


def settled(cluster: Cluster, name: str = "quickstart") -> bool:
    """The operator has observed the current generation."""
    p = cluster.pipeline(name)
    return (p.get("status") or {}).get("observedGeneration") == p["metadata"]["generation"]


def handled_by_kopf(cluster: Cluster, name: str = "quickstart") -> str:
    """The pipeline's resourceVersion once kopf has finished with its spec: the status is observed, kopf
    recorded the spec it handled (its last write, after the status) and holds no handler progress."""

    def done() -> str | None:
        p = cluster.pipeline(name)
        notes = p["metadata"].get("annotations") or {}
        handled = json.loads(notes.get(LAST_HANDLED, "{}")).get("spec")
        progress = [k for k in notes if k.startswith(f"{GROUP}/") and k not in (LAST_HANDLED, KOPF_MANAGED, ROLLBACK)]
        fresh = (p.get("status") or {}).get("observedGeneration") == p["metadata"]["generation"]
        return str(p["metadata"]["resourceVersion"]) if fresh and handled == p["spec"] and not progress else None

    return wait_until(done, "kopf to record the spec it handled")


def deploy(plane: ControlPlane, tools: Tools, cluster: Cluster, doc: dict[str, Any]) -> None:
    """Apply a quickstart-shaped pipeline and wait until the operator made all of it and saw this generation."""
    apply(plane, tools, cluster.ns, doc)
    wait_until(
        lambda: all_created(cluster, name=doc["metadata"]["name"]) and settled(cluster, doc["metadata"]["name"]),
        "all children",
    )


def test_apply_creates_every_child_owned_by_the_pipeline(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    apply(control_plane, kube_tools, cluster.ns, pipeline_doc())
    wait_until(lambda: all_created(cluster), "all children")
    uid = cluster.pipeline()["metadata"]["uid"]
    children = cluster.children()
    expected = (
        {("ConfigMap", "quickstart-config"), ("ConfigMap", "quickstart-identity")}
        | {(k, f"quickstart-{s}") for s in STAGES for k in ("Deployment", "Service", "ScaledObject", "ServiceAccount")}
        | {("NetworkPolicy", f"quickstart-{s}-network") for s in STAGES}
        | {("PodDisruptionBudget", f"quickstart-{s}") for s in STAGES}  # up to 4 replicas each by default
    )
    assert set(children) == expected
    for key, obj in children.items():
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [
            ("PromptPipeline", "quickstart", uid, True)
        ], key
    # Every ScaledObject was admitted by KEDA's real CRD schema (its CEL rules included).
    so = children[("ScaledObject", "quickstart-inference")]["spec"]
    assert so["scaleTargetRef"]["name"] == "quickstart-inference" and so["triggers"][0]["type"] == "prometheus"
    status = wait_until(lambda: settled(cluster) and cluster.status(), "a first status")
    assert status["phase"] == "Progressing" and status["readyStages"] == "0/5"
    assert status["endpoints"]["gateway"] == f"quickstart-stream.{cluster.ns}.svc:50051"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "False",
        "Progressing": "True",
        "Degraded": "False",
        "GatewayAccess": "True",  # the quickstart names its key Secret
    }
    created = wait_until(lambda: cluster.events("Created"), "a Created event")
    assert "ServiceAccount quickstart-stream" in created[0] and "and 26 more" in created[0]
    # The operator stored nothing of kopf's in the status, and put no finalizer on the pipeline.
    assert "kopf" not in status and not cluster.pipeline()["metadata"].get("finalizers")


def test_cluster_wide_as_the_chart_runs_it_by_default(
    operator_identity: Path, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools, tmp_path: Path
) -> None:
    op = OperatorProcess(operator_identity, "", tmp_path / "operator.log")  # no namespaces: all of them
    op.start()
    try:
        deploy(control_plane, kube_tools, cluster, pipeline_doc())
    finally:
        op.stop()


def test_ready_when_every_stage_is_available_then_degraded_when_one_is_not(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    apply(control_plane, kube_tools, cluster.ns, pipeline_doc())
    wait_until(lambda: all_created(cluster), "all children")
    for stage in STAGES:
        cluster.set_ready(f"quickstart-{stage}")
    status = wait_until(lambda: cluster.status().get("phase") == "Ready" and cluster.status(), "phase Ready")
    assert status["readyStages"] == "5/5"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "AllStagesReady")
    listed = kubectl(control_plane, kube_tools, "get", "pp", "-n", cluster.ns).stdout.splitlines()
    assert listed[1].split()[:4] == ["quickstart", "Ready", "smollm2-135m-instruct", "5/5"]
    wait_until(lambda: cluster.events("Ready"), "a Ready event")

    cluster.set_ready("quickstart-post", available=0)
    status = wait_until(lambda: cluster.status().get("phase") == "Degraded" and cluster.status(), "phase Degraded")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StagesUnavailable"
    assert "post: 0 of 1 replicas available" in degraded["message"]
    assert status["stages"]["post"]["health"] == "Unavailable"
    wait_until(lambda: cluster.events("StagesUnavailable"), "a Warning event naming the reason")
    described = kubectl(control_plane, kube_tools, "describe", "pp", "-n", cluster.ns, "quickstart").stdout
    assert "StagesUnavailable" in described and "Observed Generation" in described


def test_a_spec_edit_changes_exactly_the_children_it_must(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    doc = pipeline_doc()
    deploy(control_plane, kube_tools, cluster, doc)
    before = cluster.versions()

    # Scaling is the operator's business only: one ScaledObject changes, no pod rolls.
    doc["spec"]["stages"]["rag"]["scaling"] = {"maxReplicas": 9}
    apply(control_plane, kube_tools, cluster.ns, doc)
    wait_until(lambda: settled(cluster), "the edit observed")
    after = cluster.versions()
    assert {k for k in before if before[k] != after[k]} == {("ScaledObject", "quickstart-rag")}
    assert cluster.children()[("ScaledObject", "quickstart-rag")]["spec"]["maxReplicaCount"] == 9

    # A runtime setting: the ConfigMap changes and every stage Deployment rolls (new config hash).
    doc["spec"]["stages"]["post"]["timeoutSeconds"] = 30
    apply(control_plane, kube_tools, cluster.ns, doc)
    wait_until(lambda: settled(cluster), "the second edit observed")
    final = cluster.versions()
    assert {k for k in after if after[k] != final[k]} == {("ConfigMap", "quickstart-config")} | {
        ("Deployment", f"quickstart-{s}") for s in STAGES
    }
    wait_until(lambda: cluster.events("Updated"), "an Updated event")


def test_an_object_of_a_childs_name_that_is_not_the_pipelines_is_never_taken_over(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    theirs = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="quickstart-config"), data={"owner": "someone"})
    cluster.core.create_namespaced_config_map(cluster.ns, theirs)

    apply(control_plane, kube_tools, cluster.ns, pipeline_doc())

    status = wait_until(lambda: cluster.status().get("phase") == "Degraded" and cluster.status(), "phase Degraded")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "NameTaken", degraded
    assert degraded["message"].startswith("ConfigMap quickstart-config: ")
    wait_until(lambda: all_created(cluster, QUICKSTART_CHILDREN - 1), "every other child")
    left = cluster.core.read_namespaced_config_map("quickstart-config", cluster.ns)
    assert left.data == {"owner": "someone"} and not left.metadata.owner_references
    assert wait_until(lambda: cluster.events("NameTaken"), "a Warning event naming it")


def test_a_deleted_or_hand_edited_child_is_repaired(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    deploy(control_plane, kube_tools, cluster, pipeline_doc())
    old_uid = cluster.children()[("Service", "quickstart-rag")]["metadata"]["uid"]

    cluster.core.delete_namespaced_service("quickstart-rag", cluster.ns)
    cluster.apps.patch_namespaced_deployment(
        "quickstart-post",
        cluster.ns,
        {"spec": {"template": {"spec": {"containers": [{"name": "stage", "image": "evil/image:latest"}]}}}},
    )
    kubectl(
        control_plane,
        kube_tools,
        "patch",
        "scaledobject",
        "quickstart-stream",
        "-n",
        cluster.ns,
        "--type=merge",
        "-p",
        '{"spec":{"maxReplicaCount":99}}',
    )
    # Replicas belong to KEDA, not to the operator: a scale is not drift.
    cluster.apps.patch_namespaced_deployment_scale("quickstart-rag", cluster.ns, {"spec": {"replicas": 3}})

    def repaired() -> bool:
        c = cluster.children()
        svc = c.get(("Service", "quickstart-rag"))
        image = c[("Deployment", "quickstart-post")]["spec"]["template"]["spec"]["containers"][0]["image"]
        return (
            svc is not None
            and svc["metadata"]["uid"] != old_uid
            and image != "evil/image:latest"
            and c[("ScaledObject", "quickstart-stream")]["spec"]["maxReplicaCount"] == 4
        )

    wait_until(repaired, "the Service back and both edits reverted")
    assert cluster.apps.read_namespaced_deployment("quickstart-rag", cluster.ns).spec.replicas == 3
    wait_until(
        lambda: any("Service quickstart-rag" in m for m in cluster.events("DriftRepaired")),
        "a DriftRepaired event naming the Service",
    )


def test_a_stages_cluster_ip_service_from_an_earlier_version_is_replaced_by_a_headless_one(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    deploy(control_plane, kube_tools, cluster, pipeline_doc())
    # As an earlier operator left it before this one started: a ClusterIP Service of the pipeline's,
    # whose clusterIP cannot be changed in place.
    operator.stop()
    headless = cluster.core.read_namespaced_service("quickstart-rag", cluster.ns)
    cluster.core.delete_namespaced_service("quickstart-rag", cluster.ns)
    wait_until(lambda: ("Service", "quickstart-rag") not in cluster.children(), "the Service gone")
    earlier = client.V1Service(
        metadata=client.V1ObjectMeta(
            name="quickstart-rag",
            labels=headless.metadata.labels,
            owner_references=headless.metadata.owner_references,
        ),
        spec=client.V1ServiceSpec(ports=headless.spec.ports, selector=headless.spec.selector),
    )
    cluster.core.create_namespaced_service(cluster.ns, earlier)
    assert cluster.core.read_namespaced_service("quickstart-rag", cluster.ns).spec.cluster_ip != "None"

    operator.start()

    wait_until(
        lambda: cluster.children().get(("Service", "quickstart-rag"), {}).get("spec", {}).get("clusterIP") == "None",
        "the rag Service replaced by a headless one",
    )
    assert cluster.children()[("Service", "quickstart-stream")]["spec"]["clusterIP"] != "None"


def test_a_restart_changes_nothing_that_was_right_and_finishes_what_was_half_done(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    doc = pipeline_doc()
    deploy(control_plane, kube_tools, cluster, doc)
    # kopf still records the handled spec on the object after the status is written: let it finish.
    pipeline_rv = handled_by_kopf(cluster)
    before = cluster.versions()

    operator.stop()
    operator.start()
    wait_until(
        lambda: operator.metric("promptpipe_operator_reconciles_total", 'outcome="ok"') >= 1,
        "a reconcile after the restart",
    )
    assert cluster.versions() == before, "a restart rewrote children that were right"
    assert cluster.pipeline()["metadata"]["resourceVersion"] == pipeline_rv, "nor the pipeline or its status"

    # Half done: while the operator is down, a child goes and the spec changes.
    operator.stop()
    cluster.apps.delete_namespaced_deployment("quickstart-assemble", cluster.ns)
    doc["spec"]["stages"]["inference"]["scaling"] = {"minReplicas": 0, "maxReplicas": 2}
    apply(control_plane, kube_tools, cluster.ns, doc)
    operator.start()
    wait_until(lambda: all_created(cluster) and settled(cluster), "the missing child and the edit")
    assert cluster.children()[("ScaledObject", "quickstart-inference")]["spec"]["minReplicaCount"] == 0


def test_deleting_the_pipeline_removes_all_children(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    apply(control_plane, kube_tools, cluster.ns, pipeline_doc())
    wait_until(lambda: all_created(cluster), "all children")
    kubectl(control_plane, kube_tools, "delete", "pp", "quickstart", "-n", cluster.ns, "--wait=true", "--timeout=20s")
    # The garbage collector follows the owner references (it may need a while to sync after start).
    wait_until(lambda: not cluster.children(), "the garbage collector to remove every child", timeout=90, every=0.5)


def test_operator_run_tgi_gets_a_gpu_deployment_and_is_pruned_when_the_backend_changes(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    doc = pipeline_doc("gpu")
    doc["spec"]["model"] = {
        "name": "Qwen/Qwen2.5-0.5B-Instruct",
        "backend": "tgi",
        "tgi": {"gpus": 1, "maxConcurrentRequests": 32},
    }
    apply(control_plane, kube_tools, cluster.ns, doc)
    wait_until(lambda: all_created(cluster, QUICKSTART_CHILDREN + TGI_CHILDREN, "gpu"), "the pipeline and TGI children")
    tgi = cluster.children("gpu")[("Deployment", "gpu-backend-blue")]["spec"]["template"]["spec"]["containers"][0]
    assert tgi["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--max-concurrent-requests" in tgi["args"]
    status = wait_until(lambda: settled(cluster, "gpu") and cluster.status("gpu"), "a status")
    assert status["endpoints"]["backend"] == f"http://gpu-backend.{cluster.ns}.svc:8080"
    assert status["readyStages"] == "0/6", "the TGI Deployment counts towards readiness"
    assert (status["activeVersion"], status["activeColor"]) == ("Qwen/Qwen2.5-0.5B-Instruct", "blue")

    doc["spec"]["model"] = {"name": "smollm2-135m-instruct", "backend": "llamacpp"}
    apply(control_plane, kube_tools, cluster.ns, doc)
    wait_until(lambda: all_created(cluster, QUICKSTART_CHILDREN, "gpu"), "the TGI children pruned")
    assert wait_until(lambda: cluster.events("Pruned"), "a Pruned event")


def replicas_known(metrics_url: str) -> set[str]:
    """The backend replicas an inference stage routes over, from its per-replica gauge."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return set(re.findall(r'promptpipe_backend_replica_in_flight\{[^}]*replica="([^"]+)"', text))


def endpoint_slice(
    name: str, service: str, ready: dict[str, bool], managed_by: str = "endpointslice-controller.k8s.io"
) -> dict[str, Any]:
    """A slice as the EndpointSlice controller writes one (`managed_by` another: one anybody could write)."""
    labels = {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": managed_by}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": labels},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": up}} for ip, up in ready.items()],
    }


@pytest.mark.processes
def test_the_inference_stage_follows_the_tgi_pods_through_the_endpointslices_its_own_role_may_watch(
    operator: OperatorProcess,
    cluster: Cluster,
    control_plane: ControlPlane,
    kube_tools: Tools,
    kube: client.ApiClient,
    tmp_path: Path,
) -> None:
    """The inference stage process runs with the config the operator rendered and the token of the
    ServiceAccount the operator made for it; pods coming, going and turning unready are EndpointSlice
    changes (written here as the EndpointSlice controller would, there being no pods without a node)."""
    doc = pipeline_doc("disc")
    doc["spec"]["model"] = {"name": "Qwen/Qwen2.5-0.5B-Instruct", "backend": "tgi", "tgi": {"gpus": 0}}
    apply(control_plane, kube_tools, cluster.ns, doc)
    wait_until(lambda: all_created(cluster, QUICKSTART_CHILDREN + TGI_CHILDREN, "disc"), "the pipeline's children")
    children = cluster.children("disc")
    inference = children[("Deployment", "disc-inference")]["spec"]["template"]["spec"]
    assert inference["serviceAccountName"] == "disc-inference" and inference["automountServiceAccountToken"]
    for stage in STAGES:
        if stage != "inference":
            pod = children[("Deployment", f"disc-{stage}")]["spec"]["template"]["spec"]
            assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == f"disc-{stage}"
    runtime = yaml.safe_load(children[("ConfigMap", "disc-config")]["data"]["runtime.yaml"])
    runtime.pop("identity")  # the stage's identity is another test's (below); here it runs without
    assert runtime["backend_pods"] == {
        "service": "disc-backend",
        "namespace": cluster.ns,
        "port": "http",
        "scheme": "http",
    }
    config_file = tmp_path / "runtime.yaml"
    config_file.write_text(yaml.safe_dump(runtime))
    identity = service_account_kubeconfig(control_plane, tmp_path, cluster.ns, "disc-inference")

    slices = client.DiscoveryV1Api(kube)
    slices.create_namespaced_endpoint_slice(
        cluster.ns, endpoint_slice("disc-backend-a", "disc-backend", {"10.1.0.1": True, "10.1.0.2": False})
    )
    port, metrics_port = free_port(), free_port()
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    env = {
        "PROMPTPIPE_STAGE": "inference",
        "PROMPTPIPE_CONFIG": str(config_file),
        "PROMPTPIPE_HOST": "127.0.0.1",
        "PROMPTPIPE_PORT": str(port),
        "PROMPTPIPE_METRICS_PORT": str(metrics_port),
        "KUBECONFIG": str(identity),
    }
    stage = [str(Path(sys.executable).parent / "promptpipe-stage")]
    with serving_process(stage, metrics, "the inference stage", env=env):
        wait_until(lambda: replicas_known(metrics) == {"http://10.1.0.1:8080"}, "the ready pod, not the unready one")

        def changed(what: str, want: set[str]) -> float:
            started = time.monotonic()
            wait_until(lambda: replicas_known(metrics) == want, what, 10, every=0.05)
            return time.monotonic() - started

        slices.patch_namespaced_endpoint_slice(
            "disc-backend-a", cluster.ns, {"endpoints": [{"addresses": [ip]} for ip in ("10.1.0.1", "10.1.0.2")]}
        )
        took = [changed("the second pod ready", {"http://10.1.0.1:8080", "http://10.1.0.2:8080"})]
        slices.create_namespaced_endpoint_slice(
            cluster.ns, endpoint_slice("disc-backend-b", "disc-backend", {"10.1.0.3": True})
        )
        took.append(changed("a third pod, in another slice", {f"http://10.1.0.{i}:8080" for i in (1, 2, 3)}))
        slices.delete_namespaced_endpoint_slice("disc-backend-a", cluster.ns)
        took.append(changed("two pods gone", {"http://10.1.0.3:8080"}))
        print(f"\nEndpointSlice change → in the stage's ring: {', '.join(f'{t * 1000:.0f} ms' for t in took)}")
        # Another Service's slices are not this backend's replicas, nor is a look-alike labelled with its name
        # by someone else than the EndpointSlice controller (which would get the prompts sent to it).
        slices.create_namespaced_endpoint_slice(cluster.ns, endpoint_slice("other", "disc-stream", {"10.1.0.9": True}))
        forged = endpoint_slice("disc-backend-x", "disc-backend", {"10.6.6.6": True}, managed_by="tenant")
        slices.create_namespaced_endpoint_slice(cluster.ns, forged)
        time.sleep(1)
        assert replicas_known(metrics) == {"http://10.1.0.3:8080"}


def test_a_missing_permission_degrades_the_pipeline_and_it_recovers_once_granted_without_any_event(
    promptpipe_crd: None,
    kube: client.ApiClient,
    cluster: Cluster,
    control_plane: ControlPlane,
    kube_tools: Tools,
    tmp_path: Path,
) -> None:
    account = f"limited-{cluster.ns}"
    without_keda = [r for r in rbac.RULES if r.get("apiGroups") != ["keda.sh"]]
    op = OperatorProcess(
        operator_kubeconfig(control_plane, tmp_path, account, without_keda),
        cluster.ns,
        tmp_path / "operator.log",
        resync_seconds=1.0,
    )
    op.start()
    try:
        apply(control_plane, kube_tools, cluster.ns, pipeline_doc())
        status = wait_until(lambda: cluster.status().get("phase") == "Degraded" and cluster.status(), "phase Degraded")
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert degraded["reason"] == "ApplyFailed" and "403" in degraded["message"]
        wait_until(lambda: cluster.events("ApplyFailed"), "a Warning event")
        assert op.metric("promptpipe_operator_reconciles_total", 'outcome="error"') >= 1

        # Granting the permission changes nothing the operator watches: the resync converges it.
        client.RbacAuthorizationV1Api(kube).patch_cluster_role(account, {"rules": rbac.RULES})
        wait_until(
            lambda: all_created(cluster) and cluster.status().get("phase") == "Progressing",
            "every child, and the Degraded condition cleared",
        )
    finally:
        op.stop()
        rbac_api = client.RbacAuthorizationV1Api(kube)
        rbac_api.delete_cluster_role_binding(account)
        rbac_api.delete_cluster_role(account)


def test_a_spec_the_api_server_took_but_the_pipeline_refuses_fails_visibly_and_creates_nothing(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    # Kubernetes allows dots in object names; Service names (and so pipeline names) cannot have them.
    apply(control_plane, kube_tools, cluster.ns, pipeline_doc("my.pipeline"))
    status = wait_until(
        lambda: cluster.status("my.pipeline").get("phase") == "Failed" and cluster.status("my.pipeline"), "phase Failed"
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "metadata.name" in ready["message"]
    assert not cluster.children("my.pipeline")
    wait_until(lambda: cluster.events("InvalidSpec"), "a Warning event")


def test_the_operators_service_account_is_refused_what_it_does_not_need(
    operator_identity: Path, control_plane: ControlPlane, kube_tools: Tools, namespace: str
) -> None:
    def can_i(*args: str) -> str:
        result = kubectl(
            control_plane,
            kube_tools,
            "auth",
            "can-i",
            *args,
            "-n",
            namespace,
            f"--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{rbac.NAME}",
            check=False,
        )
        return result.stdout.strip()

    for allowed in (
        ("patch", "deployments.apps"),
        ("patch", "promptpipelines.promptpipe.io/status"),
        ("watch", "scaledobjects.keda.sh"),
        ("create", "events"),
        # the inference stage's account and Role (replica discovery), and what that Role grants
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("watch", "endpointslices.discovery.k8s.io"),
    ):
        assert can_i(*allowed) == "yes", allowed
    for denied in (
        ("get", "secrets"),
        ("create", "pods"),
        ("delete", "promptpipelines.promptpipe.io"),
        ("update", "deployments.apps/scale"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("escalate", "roles.rbac.authorization.k8s.io"),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "endpointslices.discovery.k8s.io"),
        ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
        ("get", "configmaps"),
    ):
        assert can_i(*denied) == "no", denied


def test_every_example_is_reconciled(
    operator_identity: Path,
    registry: Registry,
    cluster: Cluster,
    control_plane: ControlPlane,
    kube_tools: Tools,
    tmp_path: Path,
) -> None:
    # The blue-green example follows a registry alias.
    registry.push("qwen2-5-7b", make_model(tmp_path / "model"), "v1")
    registry.promote("qwen2-5-7b", "v1", "prod")
    operator = OperatorProcess(
        operator_identity, cluster.ns, tmp_path / "operator.log", env=registry_env(registry.settings)
    )
    operator.start()
    try:
        examples = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
        assert len(examples) >= 4
        for path in examples:
            doc = yaml.safe_load(path.read_text())
            model = doc["spec"]["model"]
            tgi = model.get("tgi") or {}
            tgi_run_here = model.get("backend") == "tgi" and not tgi.get("endpoints")
            # ... and a PodDisruptionBudget over TGI's pods when it runs more than one.
            children = QUICKSTART_CHILDREN + (TGI_CHILDREN + (tgi.get("replicas", 1) > 1)) * tgi_run_here
            apply(control_plane, kube_tools, cluster.ns, doc)
            name = doc["metadata"]["name"]
            wait_until(
                lambda n=name, c=children: all_created(cluster, c, n) and settled(cluster, n),
                f"{path.name} reconciled",
            )
            assert len(cluster.children(name)) == children, path.name  # not a count passed on the way
        assert cluster.status("assistant-bg")["activeVersion"] == "v1"
        # Each was made in one go: no child refused on the way (a RoleBinding sent before its Role was).
        assert not cluster.events("ApplyFailed")
    finally:
        operator.stop()


def test_two_replicas_one_leads_and_the_other_takes_over_when_it_dies(
    operator_identity: Path, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools, tmp_path: Path
) -> None:
    lease = f"lease-{cluster.ns}"
    replicas = [
        OperatorProcess(operator_identity, cluster.ns, tmp_path / f"operator-{i}.log", lease=lease) for i in range(2)
    ]
    try:
        for op in replicas:
            op.start()

        def leaders() -> list[OperatorProcess]:
            return [
                op
                for op in replicas
                if op.proc and op.proc.poll() is None and op.metric("promptpipe_operator_leader") == 1
            ]

        (leader,) = wait_until(lambda: len(leaders()) == 1 and leaders(), "one leader")
        (follower,) = [op for op in replicas if op is not leader]
        doc = pipeline_doc()
        deploy(control_plane, kube_tools, cluster, doc)
        assert follower.metric("promptpipe_operator_reconciles_total") == 0, "the follower did nothing"
        assert follower.metric("promptpipe_operator_leader") == 0

        leader.kill()  # a crash: the Lease is not released and must expire (4 s here)
        wait_until(lambda: follower.metric("promptpipe_operator_leader") == 1, "the follower to lead", timeout=30)
        doc["spec"]["stages"]["rag"]["scaling"] = {"maxReplicas": 7}
        apply(control_plane, kube_tools, cluster.ns, doc)
        wait_until(
            lambda: (
                settled(cluster)
                and cluster.children()[("ScaledObject", "quickstart-rag")]["spec"]["maxReplicaCount"] == 7
            ),
            "the new leader to reconcile the edit",
        )

        follower.stop()  # a normal stop hands the Lease over at once
        held = client.CoordinationV1Api(cluster.core.api_client).read_namespaced_lease(lease, SYSTEM_NAMESPACE)
        assert held.spec.holder_identity is None
    finally:
        for op in replicas:
            op.stop()


def test_a_leader_that_loses_its_lease_stops_and_exits_non_zero(
    operator_identity: Path, cluster: Cluster, tmp_path: Path
) -> None:
    lease = f"lease-{cluster.ns}"
    op = OperatorProcess(operator_identity, cluster.ns, tmp_path / "operator.log", lease=lease)
    op.start()
    try:
        wait_until(lambda: op.metric("promptpipe_operator_leader") == 1, "it to lead")
        coordination = client.CoordinationV1Api(cluster.core.api_client)
        held = coordination.read_namespaced_lease(lease, SYSTEM_NAMESPACE)
        # Another holder, renewing: as after a network partition in which another replica took over.
        held.spec.holder_identity = "someone-else"
        held.spec.renew_time = datetime.now(UTC)
        coordination.replace_namespaced_lease(lease, SYSTEM_NAMESPACE, held)
        assert op.proc is not None
        wait_until(lambda: op.proc is not None and op.proc.poll() is not None, "the operator to stop", timeout=30)
        assert op.proc.returncode == 1
        assert coordination.read_namespaced_lease(lease, SYSTEM_NAMESPACE).spec.holder_identity == "someone-else", (
            "a leader that lost the Lease does not release someone else's"
        )
    finally:
        op.stop()


@pytest.mark.parametrize("fault", [Mode.STALL, Mode.RESET], ids=["stalled", "reset"])
def test_a_leader_cut_off_from_the_api_server_exits_in_bounded_time_while_the_other_replica_takes_over(
    operator_identity: Path, cluster: Cluster, tmp_path: Path, fault: Mode
) -> None:
    lease = f"lease-{cluster.ns}"
    with api_through_proxy(operator_identity, tmp_path) as (through, proxy):
        cut_off = OperatorProcess(through, cluster.ns, tmp_path / "cut-off.log", lease=lease)
        cut_off.start()
        other = OperatorProcess(operator_identity, cluster.ns, tmp_path / "other.log", lease=lease)
        try:
            wait_until(lambda: cut_off.metric("promptpipe_operator_leader") == 1, "the first replica to lead")
            other.start()
            proxy.mode = fault  # stalled: every call hangs (a half-open connection); reset: every call fails
            proxy.cut() if fault is Mode.RESET else None
            cut_at = time.monotonic()

            wait_until(lambda: cut_off.proc is not None and cut_off.proc.poll() is not None, "the leader to exit", 30)
            took = time.monotonic() - cut_at
            assert cut_off.proc is not None and cut_off.proc.returncode == 1
            # Renewals fail from the cut; 3 s later (the renew deadline) it stops writing and exits; the 4 s
            # of the Lease bound how long kopf may take to stop.
            assert took < 3 + 1 + 4 + 3, took
            assert "lost the lease" in (tmp_path / "cut-off.log").read_text()
            wait_until(lambda: other.metric("promptpipe_operator_leader") == 1, "the other replica to lead", 30)
        finally:
            cut_off.stop()
            other.stop()


def test_a_stalled_api_server_connection_fails_calls_in_time_and_the_pipeline_converges_after_it(
    operator_identity: Path, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools, tmp_path: Path
) -> None:
    with api_through_proxy(operator_identity, tmp_path) as (through, proxy):
        op = OperatorProcess(
            through,
            cluster.ns,
            tmp_path / "operator.log",
            resync_seconds=1.0,
            env={"PROMPTPIPE_OPERATOR_API_TIMEOUT_SECONDS": "2"},
        )
        op.start()
        try:
            doc = pipeline_doc()
            deploy(control_plane, kube_tools, cluster, doc)
            # Every connection the operator has open, and every one it opens now, goes dead for good: a peer
            # that vanished without a reset. The pipeline is edited meanwhile (by its user, not cut off).
            proxy.mode = Mode.STALL
            doc["spec"]["stages"]["rag"]["scaling"] = {"maxReplicas": 7}
            apply(control_plane, kube_tools, cluster.ns, doc)
            wait_until(
                lambda: (
                    op.metric("promptpipe_operator_reconciles_total", 'outcome="crashed"')
                    + op.metric("promptpipe_operator_reconciles_total", 'outcome="error"')
                    >= 1
                ),
                "a reconcile to fail on its timeout while everything is stalled",
                timeout=20,
            )
            proxy.mode = Mode.PASS  # new connections work; the dead ones stay dead until their calls time out
            wait_until(
                lambda: cluster.children()[("ScaledObject", "quickstart-rag")]["spec"]["maxReplicaCount"] == 7,
                "the edit applied once the API server answers again",
                timeout=30,
            )
        finally:
            op.stop()


def _token(api: client.ApiClient, namespace: str, account: str, audience: str | None) -> str:
    """A token the API server signs for `account` (TokenRequest), for `audience` (None: the API server's own)."""
    spec = client.V1TokenRequestSpec(audiences=[audience] if audience else [], expiration_seconds=600)
    request = client.AuthenticationV1TokenRequest(spec=spec)
    token: str = client.CoreV1Api(api).create_namespaced_service_account_token(account, namespace, request).status.token
    return token


async def _run_as(target: str, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            async for _ in stage_pb2_grpc.StageStub(channel).Run(
                stage_pb2.WorkItem(prompt="hi"), timeout=30, metadata=metadata
            ):
                pass
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.mark.processes
def test_a_stage_admits_the_tokens_the_api_server_signs_for_its_callers_account_and_pipeline_only(
    operator: OperatorProcess,
    cluster: Cluster,
    control_plane: ControlPlane,
    kube_tools: Tools,
    kube: client.ApiClient,
    tmp_path: Path,
) -> None:
    """The inference stage runs with the config and the keys the operator published (the cluster's
    service-account issuer and keys, read by the operator, never by a stage); the tokens are the API
    server's own, as the kubelet would mount them in the pods."""
    doc = pipeline_doc("ident")
    doc["spec"]["model"] = {"name": "synthetic", "backend": "synthetic"}
    deploy(control_plane, kube_tools, cluster, doc)
    children = cluster.children("ident")
    assert {("ServiceAccount", f"ident-{s}") for s in STAGES} <= set(children)
    keys = json.loads(children[("ConfigMap", "ident-identity")]["data"]["keys.json"])
    assert keys["issuer"] == "https://kubernetes.default.svc.cluster.local" and keys["keys"], keys
    runtime = yaml.safe_load(children[("ConfigMap", "ident-config")]["data"]["runtime.yaml"])
    audience = f"promptpipe.io/{cluster.ns}/ident"
    assert runtime["identity"]["audience"] == audience
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    runtime["identity"]["keys_file"] = str(tmp_path / "keys.json")  # where the pod's volume has it
    (tmp_path / "runtime.yaml").write_text(yaml.safe_dump(runtime))
    (tmp_path / "token").write_text(_token(kube, cluster.ns, "ident-inference", audience))
    port, metrics_port = free_port(), free_port()
    env = {
        "PROMPTPIPE_STAGE": "inference",
        "PROMPTPIPE_CONFIG": str(tmp_path / "runtime.yaml"),
        "PROMPTPIPE_PORT": str(port),
        "PROMPTPIPE_METRICS_PORT": str(metrics_port),
        "PROMPTPIPE_IDENTITY_TOKEN_FILE": str(tmp_path / "token"),
    }
    stage = [str(Path(sys.executable).parent / "promptpipe-stage")]
    target = f"127.0.0.1:{port}"
    with serving_process(stage, f"http://127.0.0.1:{metrics_port}/metrics", "the inference stage", env=env):
        assert asyncio.run(_run_as(target, _token(kube, cluster.ns, "ident-post", audience))) is grpc.StatusCode.OK
        refused = {
            "no token": None,
            "post's API token (not for the pipeline)": _token(kube, cluster.ns, "ident-post", None),
            "post's token for another pipeline": _token(kube, cluster.ns, "ident-post", audience + "-other"),
        }
        for what, token in refused.items():
            assert asyncio.run(_run_as(target, token)) is grpc.StatusCode.UNAUTHENTICATED, what
        # Valid tokens for the pipeline, of accounts that do not call inference: the gateway's, and a pod's own.
        for account in ("ident-stream", "default"):
            token = _token(kube, cluster.ns, account, audience)
            assert asyncio.run(_run_as(target, token)) is grpc.StatusCode.PERMISSION_DENIED, account


def test_a_pipeline_from_before_stage_identity_enforces_it_only_once_every_stage_pod_sends_its_token(
    operator: OperatorProcess, cluster: Cluster, control_plane: ControlPlane, kube_tools: Tools
) -> None:
    """As an upgrade finds it: the runtime config without identity and pods of a template without the token
    volume. The operator renders the stages with identity not enforced, and enforces once every stage
    Deployment has rolled out with the volume (its status written here as the Deployment controller would,
    there being no pods without a node)."""
    deploy(control_plane, kube_tools, cluster, pipeline_doc())

    def enforce() -> bool | None:
        runtime = yaml.safe_load(cluster.children()[("ConfigMap", "quickstart-config")]["data"]["runtime.yaml"])
        value = runtime.get("identity", {}).get("enforce")
        return value if isinstance(value, bool) else None

    assert enforce() is True, "a new pipeline enforces from the start"
    # What the previous version left: no identity in the config, no token volume in the pods.
    runtime = yaml.safe_load(cluster.children()[("ConfigMap", "quickstart-config")]["data"]["runtime.yaml"])
    runtime.pop("identity")
    cluster.core.patch_namespaced_config_map(
        "quickstart-config", cluster.ns, {"data": {"runtime.yaml": yaml.safe_dump(runtime)}}
    )
    for stage in STAGES:
        mounts = [{"mountPath": "/var/run/promptpipe/identity", "$patch": "delete"}]
        pod = {
            "volumes": [{"name": "identity", "$patch": "delete"}],
            "containers": [{"name": "stage", "volumeMounts": mounts}],
        }
        drop = {"spec": {"template": {"spec": pod}}}
        cluster.apps.patch_namespaced_deployment(f"quickstart-{stage}", cluster.ns, drop)
    wait_until(lambda: enforce() is False, "the stages rendered with identity checked but not enforced")
    # Every stage Deployment rolled out with the volume: enforced.
    for stage in STAGES:
        made = cluster.apps.read_namespaced_deployment(f"quickstart-{stage}", cluster.ns)
        assert any(v.name == "identity" for v in made.spec.template.spec.volumes)
        status = {"observedGeneration": made.metadata.generation, "replicas": 1, "updatedReplicas": 1}
        cluster.apps.patch_namespaced_deployment_status(f"quickstart-{stage}", cluster.ns, {"status": status})
    wait_until(lambda: enforce() is True, "identity enforced once every pod sends its token", timeout=90)
