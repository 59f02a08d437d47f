"""The test control plane: a real kube-apiserver + etcd, RBAC, CRD schemas, KEDA's CRDs, helm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane

pytestmark = pytest.mark.controlplane


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """RBAC and CRD changes take effect after the API server's caches catch up: `check` raising
    ApiException or AssertionError means "not yet"."""
    wait_until(
        lambda: check() or True, "the API server's caches", timeout, every=0.1, retry_on=(ApiException, AssertionError)
    )


def test_namespaced_object_round_trips(kube: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="settings", labels={"app": "t"}), data={"greeting": "hello"}
        ),
    )
    core.patch_namespaced_config_map("settings", namespace, {"data": {"greeting": "bonjour"}})
    read = core.read_namespaced_config_map("settings", namespace)
    assert read.data == {"greeting": "bonjour"} and read.metadata.labels == {"app": "t"}
    assert [c.metadata.name for c in core.list_namespaced_config_map(namespace, label_selector="app=t").items] == [
        "settings"
    ]


def test_rbac_denies_what_a_service_account_was_not_granted(
    kube: client.ApiClient, namespace: str, as_service_account: Callable[[str, str], client.ApiClient]
) -> None:
    robot = client.CoreV1Api(as_service_account(namespace, "robot"))
    with pytest.raises(ApiException) as denied:
        robot.list_namespaced_config_map(namespace)
    assert denied.value.status == 403
    assert f"system:serviceaccount:{namespace}:robot" in denied.value.body

    rbac = client.RbacAuthorizationV1Api(kube)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="read-config"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="robot-reads-config"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="read-config"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="robot", namespace=namespace)],
        ),
    )

    eventually(lambda: robot.list_namespaced_config_map(namespace))
    forbidden_calls: tuple[Callable[[], object], ...] = (
        lambda: robot.list_namespaced_secret(namespace),
        lambda: robot.list_namespaced_config_map("default"),
        lambda: robot.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="x"))
        ),
    )
    for forbidden in forbidden_calls:
        with pytest.raises(ApiException) as info:
            forbidden()
        assert info.value.status == 403


WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.promptpipe.io"},
    "spec": {
        "group": "test.promptpipe.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "x-kubernetes-validations": [
                                    {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                ],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "min": {"type": "integer"},
                                    "max": {"type": "integer"},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_schema_refuses_a_bad_object_naming_the_field(kube: client.ApiClient, namespace: str) -> None:
    client.ApiextensionsV1Api(kube).create_custom_resource_definition(WIDGET_CRD)
    objects = client.CustomObjectsApi(kube)

    def create(spec: dict[str, Any]) -> Any:
        return objects.create_namespaced_custom_object(
            "test.promptpipe.io",
            "v1",
            namespace,
            "widgets",
            {
                "apiVersion": "test.promptpipe.io/v1",
                "kind": "Widget",
                "metadata": {"name": f"w{time.time_ns()}"},
                "spec": spec,
            },
        )

    eventually(lambda: create({"size": 1, "min": 0, "max": 1}))
    for spec, field, words in (
        ({"size": "big", "min": 0, "max": 1}, "spec.size", "must be of type integer"),
        ({"size": 0, "min": 0, "max": 1}, "spec.size", "should be greater than or equal to 1"),
        ({"size": 2, "min": 5, "max": 1}, "spec", "min must not exceed max"),
    ):
        with pytest.raises(ApiException) as info:
            create(spec)
        assert info.value.status == 422
        message = json.loads(info.value.body)["message"]
        assert f"{field}:" in message and words in message, message


def scaled_object(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    base = {
        "scaleTargetRef": {"name": "stage-rag"},
        "minReplicaCount": 1,
        "maxReplicaCount": 4,
        "triggers": [
            {
                "type": "prometheus",
                "metadata": {
                    "serverAddress": "http://prometheus:9090",
                    "query": "sum(promptpipe_stage_queue_depth)",
                    "threshold": "8",
                },
            }
        ],
    }
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": name}, "spec": base | spec}


def test_keda_crd_schema_checks_scaled_objects(kube: client.ApiClient, namespace: str) -> None:
    objects = client.CustomObjectsApi(kube)

    def create(body: dict[str, Any]) -> Any:
        return objects.create_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects", body)

    assert create(scaled_object("ok", {}))["spec"]["maxReplicaCount"] == 4
    with pytest.raises(ApiException) as info:
        create(scaled_object("min-over-max", {"minReplicaCount": 5, "maxReplicaCount": 2}))
    assert info.value.status == 422
    assert "minReplicaCount must be less than or equal to maxReplicaCount" in info.value.body
    bad_trigger = scaled_object(
        "number",
        {
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {"serverAddress": "http://prometheus:9090", "query": "q", "threshold": 8},
                }
            ]
        },
    )
    with pytest.raises(ApiException) as info:
        create(bad_trigger)
    assert info.value.status == 422
    assert "spec.triggers[0].metadata.threshold" in info.value.body


@pytest.mark.helm
def test_helm_installs_upgrades_and_uninstalls_a_chart(
    control_plane: ControlPlane, kube_tools: Tools, kube: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-settings\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )

    def helm(*args: str) -> str:
        return subprocess.run(
            [str(kube_tools.helm), *args, "-n", namespace],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **control_plane.env(), "HELM_CACHE_HOME": str(tmp_path)},
        ).stdout

    core = client.CoreV1Api(kube)
    helm("install", "demo", str(chart))
    assert core.read_namespaced_config_map("demo-settings", namespace).data == {"greeting": "hello"}
    helm("upgrade", "demo", str(chart), "--set", "greeting=bonjour")
    assert core.read_namespaced_config_map("demo-settings", namespace).data == {"greeting": "bonjour"}
    assert json.loads(helm("list", "-o", "json"))[0]["revision"] == "2"
    helm("uninstall", "demo")
    with pytest.raises(ApiException) as info:
        core.read_namespaced_config_map("demo-settings", namespace)
    assert info.value.status == 404


def absent(read: Callable[[], Any]) -> None:
    """Passes when `read` answers 404; raises AssertionError (retried by `eventually`) otherwise."""
    try:
        read()
    except ApiException as err:
        assert err.status == 404, err
        return
    raise AssertionError("still there")


def test_owner_references_are_garbage_collected_and_namespaces_deleted(kube: client.ApiClient) -> None:
    core = client.CoreV1Api(kube)
    ns = f"gc-{time.time_ns()}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    owner = core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[ref]))
    )
    core.delete_namespaced_config_map("owner", ns)

    eventually(
        lambda: absent(lambda: core.read_namespaced_config_map("dependent", ns)), timeout=60
    )  # the collector first syncs its informers
    eventually(lambda: core.read_namespaced_service_account("default", ns), timeout=30)
    core.delete_namespace(ns)

    eventually(lambda: absent(lambda: core.read_namespace(ns)), timeout=60)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.controlplane
def test_cli_up_and_down_leave_no_process_behind(kube_tools: Tools, tmp_path: Path) -> None:
    env = {**os.environ, "PROMPTPIPE_HOME": str(tmp_path)}
    cli = [sys.executable, "-m", "tests.devcluster", "cluster"]
    up = subprocess.run([*cli, "up"], env=env, check=True, capture_output=True, text=True)
    plane = ControlPlane.load(tmp_path / "cluster")
    try:
        assert f"export KUBECONFIG={plane.kubeconfig}" in up.stdout
        namespaces = subprocess.run(
            [
                str(kube_tools.kubectl),
                f"--kubeconfig={plane.kubeconfig}",
                "get",
                "crd",
                "scaledobjects.keda.sh",
                "-o",
                "name",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        assert namespaces.stdout.strip() == "customresourcedefinition.apiextensions.k8s.io/scaledobjects.keda.sh"
        assert not any(gone(pid) for pid in plane.pids)
    finally:
        subprocess.run([*cli, "down"], env=env, check=True, capture_output=True)
    assert all(gone(pid) for pid in plane.pids)
    assert not (tmp_path / "cluster").exists()
