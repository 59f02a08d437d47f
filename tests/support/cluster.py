"""What the operator tests look at in the cluster, and how they apply pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.kube import kubectl, replica_set_owning

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "examples" / "quickstart.yaml").read_text())
GROUP, VERSION, PLURAL = "promptpipe.io", "v1alpha1", "promptpipelines"


class Cluster:
    """What a test looks at, through the admin identity."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.ns = namespace
        self.core, self.apps = client.CoreV1Api(api), client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.net = client.NetworkingV1Api(api)
        self.policy = client.PolicyV1Api(api)

    def pipeline(self, name: str = "quickstart") -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return obj

    def status(self, name: str = "quickstart") -> dict[str, Any]:
        return self.pipeline(name).get("status") or {}

    def children(self, name: str = "quickstart") -> dict[tuple[str, str], dict[str, Any]]:
        """Every object labelled as this pipeline's, by (kind, name)."""
        selector = f"app.kubernetes.io/instance={name}"
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for kind, items in (
            ("ConfigMap", self.core.list_namespaced_config_map(self.ns, label_selector=selector).items),
            ("Service", self.core.list_namespaced_service(self.ns, label_selector=selector).items),
            ("Deployment", self.apps.list_namespaced_deployment(self.ns, label_selector=selector).items),
            ("ServiceAccount", self.core.list_namespaced_service_account(self.ns, label_selector=selector).items),
            ("Role", self.rbac.list_namespaced_role(self.ns, label_selector=selector).items),
            ("RoleBinding", self.rbac.list_namespaced_role_binding(self.ns, label_selector=selector).items),
            ("NetworkPolicy", self.net.list_namespaced_network_policy(self.ns, label_selector=selector).items),
            (
                "PodDisruptionBudget",
                self.policy.list_namespaced_pod_disruption_budget(self.ns, label_selector=selector).items,
            ),
        ):
            for item in items:
                out[(kind, item.metadata.name)] = client.ApiClient().sanitize_for_serialization(item)
        for item in self.custom.list_namespaced_custom_object(
            "keda.sh", "v1alpha1", self.ns, "scaledobjects", label_selector=selector
        )["items"]:
            out[("ScaledObject", item["metadata"]["name"])] = item
        return out

    def versions(self, name: str = "quickstart") -> dict[tuple[str, str], str]:
        return {k: v["metadata"]["resourceVersion"] for k, v in self.children(name).items()}

    def set_ready(self, deployment: str, available: int | None = None) -> None:
        """Write the status the Deployment controller writes once the pods are (or are not) available."""
        d = self.apps.read_namespaced_deployment(deployment, self.ns)
        want = d.spec.replicas if d.spec.replicas is not None else 1
        up = want if available is None else available
        self.apps.patch_namespaced_deployment_status(
            deployment,
            self.ns,
            {
                "status": {
                    "observedGeneration": d.metadata.generation,
                    "replicas": want,
                    "updatedReplicas": want,
                    "readyReplicas": up,
                    "availableReplicas": up,
                    "unavailableReplicas": want - up,
                }
            },
        )

    def ready_pod(self, name: str, containers: list[dict[str, Any]], deployment: str, owned: bool = True) -> None:
        """A Pod Ready at 127.0.0.1 (status as a kubelet writes it) with `deployment`'s pod labels: owned as
        its controllers would make it, by a ReplicaSet that Deployment controls; or (not `owned`) a
        look-alike, which anyone who may create pods in the namespace could make."""
        d = self.apps.read_namespaced_deployment(deployment, self.ns)
        labels = dict(d.spec.selector.match_labels)
        owners = replica_set_owning(self.apps, self.ns, deployment, name) if owned else []
        self.core.create_namespaced_pod(
            self.ns,
            {
                "metadata": {"name": name, "labels": labels, "ownerReferences": owners},
                "spec": {"containers": containers},
            },
        )
        ready = [{"type": "Ready", "status": "True"}]
        status = {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "conditions": ready}
        self.core.patch_namespaced_pod_status(name, self.ns, {"status": status})

    def events(self, reason: str) -> list[str]:
        items = self.core.list_namespaced_event(self.ns).items
        return [e.message for e in items if e.reason == reason and e.involved_object.kind == "PromptPipeline"]


def apply(plane: ControlPlane, tools: Tools, namespace: str, doc: dict[str, Any]) -> None:
    kubectl(plane, tools, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
