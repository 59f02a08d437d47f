"""Stage identity on a real node: every hop of a pipeline's calls carries the kubelet's projected token of
the calling stage's ServiceAccount, and a pod of the namespace that copies a stage's labels is refused."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from promptpipe.waiting import wait_until
from tests.devcluster.node import Node
from tests.support.node import all_running, apply, instance, pod_output, pods, service_ip, stream

pytestmark = [pytest.mark.node, pytest.mark.helm]

NAME = "ident"
TOKENS = 8

# A pod of the namespace, labelled as post's pods are (the one stage inference admits), calling inference:
# with no token, then with a token of its own account for the pipeline's audience (any pod can ask the
# kubelet for one), then with a token of post's account it has no way to get (the API server's own, from
# its automounted account: not for the pipeline). It waits for a connection (`wait_for_ready`): the node's
# policy enforcer admits a new pod's address a moment after the pod has one.
IMPOSTOR = """
import sys, grpc
from promptpipe.v1 import stage_pb2, stage_pb2_grpc
def run(token):
    metadata = (("authorization", "Bearer " + token),) if token else ()
    item = stage_pb2.WorkItem(prompt="hi")
    with grpc.insecure_channel(sys.argv[1]) as channel:
        try:
            for _ in stage_pb2_grpc.StageStub(channel).Run(item, timeout=20, metadata=metadata, wait_for_ready=True):
                pass
        except grpc.RpcError as err:
            return err.code().name
    return "OK"
print("none", run(None), flush=True)
print("own", run(open("/var/run/impostor/token").read().strip()), flush=True)
"""


def pipeline() -> dict[str, object]:
    return {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"name": "synthetic", "backend": "synthetic"},
            "generation": {"maxNewTokens": TOKENS},
            "rag": {"enabled": False},
            "auth": {"open": True},
        },
    }


def impostor(node: Node, namespace: str, labels: dict[str, str]) -> dict[str, object]:
    token = {"audience": f"promptpipe.io/{namespace}/{NAME}", "expirationSeconds": 600, "path": "token"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "impostor", "namespace": namespace, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "caller",
                    "image": node.images["stage"],
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", IMPOSTOR, f"{NAME}-inference.{namespace}.svc:50051"],
                    "volumeMounts": [{"name": "token", "mountPath": "/var/run/impostor"}],
                }
            ],
            "volumes": [{"name": "token", "projected": {"sources": [{"serviceAccountToken": token}]}}],
        },
    }


def test_the_pipelines_own_calls_carry_their_stage_tokens_and_a_look_alike_pod_is_refused(
    node: Node, operator_installed: None
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", namespace)
    try:
        apply(node, namespace, pipeline())
        wait_until(lambda: all_running(node, namespace, instance(NAME), 5), "five pods Ready", 180, every=1)
        gateway = f"127.0.0.1:{node.forward(service_ip(node, namespace, f'{NAME}-stream'), 50051)}"
        # Through the gateway, rag, assemble, post and inference each admitted the caller's projected token.
        wait_until(
            lambda: asyncio.run(stream(gateway)) == (TOKENS, None),
            "a call through the pipeline",
            60,
            every=1,
            retry_on=(Exception,),
        )
        stage_pods: list[Any] = pods(node, namespace, instance(NAME))
        component = "app.kubernetes.io/component"
        accounts = {p["metadata"]["labels"][component]: p["spec"]["serviceAccountName"] for p in stage_pods}
        assert accounts == {s: f"{NAME}-{s}" for s in ("stream", "rag", "assemble", "inference", "post")}

        (post,) = [p for p in stage_pods if p["metadata"]["labels"][component] == "post"]
        # Every label of post's pods but the ReplicaSet's own hash (a pod with it would be adopted and removed).
        labels = {k: v for k, v in post["metadata"]["labels"].items() if k != "pod-template-hash"}
        said = dict(
            line.split(" ", 1)
            for line in pod_output(node, impostor(node, namespace, labels)).splitlines()
            if " " in line
        )
        assert said == {"none": "UNAUTHENTICATED", "own": "PERMISSION_DENIED"}, said
        # And the pipeline still answers; no stage restarted.
        assert asyncio.run(stream(gateway)) == (TOKENS, None)
        now: list[Any] = [p for p in pods(node, namespace, instance(NAME)) if p["metadata"]["name"] != "impostor"]  # type: ignore[index]
        restarts = [s["restartCount"] for p in now for s in p["status"]["containerStatuses"]]
        assert restarts == [0] * 5, restarts
    finally:
        node.kubectl("delete", "namespace", namespace, "--wait=false")
