"""pytest fixtures for the local control plane."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client, config

from tests.devcluster.build import Tools, expected_tools
from tests.devcluster.cluster import ControlPlane
from tests.devcluster.keda import install_keda_crds


def kubectl(
    plane: ControlPlane, tools: Tools, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The pinned kubectl as the admin; with `check`, a failure fails the test with kubectl's message."""
    result = subprocess.run(
        [str(tools.kubectl), f"--kubeconfig={plane.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def service_account_token(api: client.ApiClient, namespace: str, name: str, seconds: int = 3600) -> str:
    """A token the API server issues for an existing ServiceAccount (TokenRequest)."""
    token: str = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(
            name,
            namespace,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds)
            ),
        )
        .status.token
    )
    return token


@pytest.fixture(scope="session")
def kube_tools() -> Tools:
    tools = expected_tools()
    missing = [
        str(p)
        for p in (tools.etcd, tools.kube_apiserver, tools.kube_controller_manager, tools.kubectl, tools.helm)
        if not p.exists()
    ]
    if missing:  # a failure, not a skip: these tests are part of the suite
        pytest.fail(f"control-plane binaries not built ({', '.join(missing)}); run `make setup`", pytrace=False)
    return tools


@pytest.fixture(scope="session")
def control_plane(kube_tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane.start(kube_tools, tmp_path_factory.mktemp("controlplane"))
    try:
        install_keda_crds(plane, kube_tools)
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """An API client with the admin identity (group system:masters)."""
    api = config.new_client_from_config(config_file=control_plane.kubeconfig)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(kube: client.ApiClient) -> Iterator[str]:
    """A fresh namespace, deleted (with everything in it) after the test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture
def as_service_account(
    kube: client.ApiClient, control_plane: ControlPlane
) -> Iterator[Callable[[str, str], client.ApiClient]]:
    """A client that authenticates as a ServiceAccount, with a token the API server issued."""
    made: list[client.ApiClient] = []

    def make(namespace: str, name: str) -> client.ApiClient:
        core = client.CoreV1Api(kube)
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )
        token = service_account_token(kube, namespace, name)
        cfg = client.Configuration()
        cfg.host = control_plane.server
        cfg.ssl_ca_cert = str(kube.configuration.ssl_ca_cert)
        cfg.api_key = {"authorization": f"Bearer {token}"}
        api = client.ApiClient(cfg)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


def replica_set_owning(apps: client.AppsV1Api, namespace: str, deployment: str, suffix: str) -> list[dict[str, Any]]:
    """A ReplicaSet `<deployment>-<suffix>` controlled by the Deployment, with its pod template, as the
    Deployment controller makes one; the owner references a Pod of it carries (the ReplicaSet controller's
    part, where no controller runs)."""
    d = apps.read_namespaced_deployment(deployment, namespace)
    template = client.ApiClient().sanitize_for_serialization(d.spec.template)
    rs = apps.create_namespaced_replica_set(
        namespace,
        {
            "metadata": {
                "name": f"{deployment}-{suffix}",
                "labels": template["metadata"].get("labels") or {},
                "ownerReferences": [_controller("apps/v1", "Deployment", d.metadata.name, d.metadata.uid)],
            },
            "spec": {
                "replicas": 1,
                "selector": client.ApiClient().sanitize_for_serialization(d.spec.selector),
                "template": template,
            },
        },
    )
    return [_controller("apps/v1", "ReplicaSet", rs.metadata.name, rs.metadata.uid)]


def _controller(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True}
