"""The operator's TGI pods get their model from the registry: the init container the operator renders is
run (by tests/support/kubelet.py, as a kubelet would: the env and Secret from the API server, volumes as
folders) against moto's server, and its result is written to the Pod's status for the operator to read.

A verified version is served from local disk; a corrupted or missing one fails its pod visibly (exit code
and message in the Pod's status, main container never started) and the rollout is rolled back naming why.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from kubernetes import client

from promptpipe.registry.manifest import MARKER, scan
from promptpipe.registry.refs import ModelRef
from promptpipe.registry.store import Registry
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.cluster import QUICKSTART, Cluster, apply
from tests.support.kubelet import Container, Kubelet
from tests.support.moto import CREDENTIALS, make_model, registry_env
from tests.support.operator import OperatorProcess

pytestmark = pytest.mark.controlplane
NAME = "quickstart"
TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference"


def tgi_stand_in(container: Container, mapped: Callable[[str], str], port: int) -> list[str]:
    """TGI's image cannot run here: a process speaking its protocol, given the launcher's --model-id."""
    args = container["args"]
    model_id = mapped(args[args.index("--model-id") + 1])
    return [sys.executable, "-m", "tests.support.tgi_server", "--port", str(port), "--model-id", model_id]


def pipeline(version: str) -> dict[str, Any]:
    doc = copy.deepcopy(QUICKSTART)
    doc["spec"]["model"] = {"name": "smollm2", "backend": "tgi", "tgi": {"gpus": 1}, "version": version}
    doc["spec"]["rollout"] = {"progressDeadline": 10, "keepPrevious": 2, "analysis": {"window": 0}}
    return doc


@pytest.fixture
def kubelet(kube: client.ApiClient, namespace: str, tmp_path: Path) -> Iterator[Kubelet]:
    k = Kubelet(
        client.CoreV1Api(kube), client.AppsV1Api(kube), namespace, tmp_path / "pods", runtimes={TGI_IMAGE: tgi_stand_in}
    )
    try:
        yield k
    finally:
        k.stop()


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("corrupted", "downloaded content does not match the registry"),
        ("missing", "is missing"),
    ],
)
def test_a_verified_version_is_served_from_disk_and_a_damaged_one_never_serves(
    registry: Registry,
    operator_identity: Path,
    namespace: str,
    kube: client.ApiClient,
    control_plane: ControlPlane,
    kube_tools: Tools,
    kubelet: Kubelet,
    tmp_path: Path,
    damage: str,
    said: str,
) -> None:
    cluster = Cluster(kube, namespace)
    v1 = registry.push("smollm2", make_model(tmp_path / "v1", "one"), "v1").record
    v2_folder = make_model(tmp_path / "v2", "two")
    registry.push("smollm2", v2_folder, "v2")
    # The pods' keys come from a Secret in the pipeline's namespace, named by the operator's settings.
    cluster.core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="registry-keys"), string_data=CREDENTIALS)
    )
    op = OperatorProcess(
        operator_identity,
        namespace,
        tmp_path / "operator.log",
        env={**registry_env(registry.settings), "PROMPTPIPE_OPERATOR_REGISTRY_SECRET": "registry-keys"},
    )
    op.start()
    try:
        apply(control_plane, kube_tools, namespace, pipeline("v1"))
        wait_until(lambda: ("Deployment", f"{NAME}-backend-blue") in cluster.children(NAME), "blue")
        blue = kubelet.run(f"{NAME}-backend-blue")

        # The init container pulled v1 into the volume TGI reads, every hash checked; TGI loaded it from there.
        models = blue.volumes["models"] / "model"
        assert scan(models).digest == v1.digest
        assert json.loads((models / MARKER).read_text())["version"] == "v1"
        with urllib.request.urlopen(f"{blue.url}/info", timeout=5) as response:
            assert json.loads(response.read())["model_id"] == str(models)
        pod = cluster.core.read_namespaced_pod(blue.name, namespace).status
        assert pod.init_container_statuses[0].state.terminated.exit_code == 0
        assert [c.status for c in pod.conditions if c.type == "Ready"] == ["True"]

        # v2's weights are tampered with, or lost, in S3 after it was published.
        weights = hashlib.sha256((v2_folder / "model.safetensors").read_bytes()).hexdigest()
        s3 = boto3.client("s3", endpoint_url=registry.settings.endpoint_url, region_name="us-east-1")
        blob = {"Bucket": registry.settings.bucket, "Key": f"blobs/sha256/{weights}"}
        if damage == "corrupted":
            s3.put_object(**blob, Body=b"not the weights")
        else:
            s3.delete_object(**blob)
        cluster.set_ready(f"{NAME}-backend-blue")  # the Deployment controller counts blue's Ready pod
        apply(control_plane, kube_tools, namespace, pipeline("v2"))
        wait_until(lambda: ("Deployment", f"{NAME}-backend-green") in cluster.children(NAME), "green")
        green = kubelet.run(f"{NAME}-backend-green")

        assert green.process is None, "TGI never started on a model that failed its hashes"
        assert not (green.volumes["models"] / "model").exists(), "nothing half-written"
        status = cluster.core.read_namespaced_pod(green.name, namespace).status
        fetch = status.init_container_statuses[0].state.terminated
        assert fetch.exit_code != 0 and "model.safetensors" in fetch.message and weights in fetch.message
        assert said in fetch.message, fetch.message
        assert status.phase == "Pending" and status.container_statuses[0].state.waiting.reason == "PodInitializing"

        rollout = wait_until(
            lambda: (
                (cluster.status(NAME).get("rollout") or {}).get("phase") == "RolledBack"
                and cluster.status(NAME)["rollout"]
            ),
            "the rollback at the deadline",
            timeout=30,
        )
        assert rollout["reason"] == "ProgressDeadlineExceeded"
        assert f"pod {green.name}: init container fetch-model failed (exit {fetch.exit_code})" in rollout["message"]
        assert "model.safetensors" in rollout["message"]
        wait_until(
            lambda: any("init container fetch-model failed" in m for m in cluster.events("RolledBack")),
            "the reason in the RolledBack Event too",
        )
        service = cluster.core.read_namespaced_service(f"{NAME}-backend", namespace)
        assert service.spec.selector["promptpipe.io/color"] == "blue" and cluster.status(NAME)["activeVersion"] == "v1"
        assert registry.resolve(ModelRef("smollm2", version="v2")).digest != scan(models).digest
    finally:
        op.stop()
