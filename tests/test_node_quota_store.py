"""A tenant's quota across the replicas of a pipeline's gateway, on a real node: the chart's quota store
(Debian's redis-server, built here, run as the chart runs valkey's image) and three gateway pods behind
the Service. Each pod alone would admit the tenant its whole quota; together they admit it once."""

from __future__ import annotations

import asyncio
import base64
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from promptpipe.contract.apikeys import hash_key, new_key
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.node import Node
from tests.support import netpol
from tests.support.node import all_running, apply, installed_operator, instance, pods, service_ip, stream

pytestmark = [pytest.mark.node, pytest.mark.helm]

NAME = "shared"
PER_MINUTE = 8
CALLS = 24
GATEWAYS = 3
STORE = "promptpipe-quota-store"  # the chart's, in release promptpipe


@pytest.fixture(scope="module")
def store_installed(node: Node, kube_tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    repository, tag = node.images["quota-store"].rsplit(":", 1)
    values = {"quotaStore": {"enabled": True, "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}}}
    with installed_operator(node, kube_tools, tmp_path_factory.mktemp("chart"), values):
        wait_until(
            lambda: all_running(node, "promptpipe-system", "app.kubernetes.io/name=promptpipe-quota-store", 1),
            "the quota store Ready",
            120,
            every=1,
        )
        yield


def pipeline() -> dict[str, object]:
    return {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"name": "synthetic", "backend": "synthetic"},
            "generation": {"maxNewTokens": 4},
            "rag": {"enabled": False},
            "stages": {"stream": {"scaling": {"minReplicas": GATEWAYS, "maxReplicas": GATEWAYS}}},
            "auth": {
                "apiKeysSecret": {"name": "keys", "key": "keys.yaml"},
                "tenants": [{"name": "alice", "requestsPerMinute": PER_MINUTE}],
                "quotaStore": {"urlSecret": {"name": "quota-store", "key": "url"}, "onUnreachable": "closed"},
            },
        },
    }


def secret(node: Node, namespace: str, name: str, data: dict[str, str]) -> None:
    literals = [f"--from-literal={k}={v}" for k, v in data.items()]
    node.kubectl("create", "secret", "generic", name, "-n", namespace, *literals)


def admitted_by_pod(node: Node, gateways: list[Any]) -> dict[str, float]:
    """Each gateway pod's own count of alice's admitted calls, from its metrics port."""
    counted = {}
    for pod in gateways:
        port = node.forward(pod["status"]["podIP"], 9090)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        counted[pod["metadata"]["name"]] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("promptpipe_gateway_tenant_calls_total{")
            and 'tenant="alice"' in line
            and 'outcome="admitted"' in line
        )
    return counted


def test_three_gateway_pods_admit_a_tenant_its_requests_per_minute_once_not_three_times(
    node: Node, store_installed: None, tmp_path: Path
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", namespace)
    try:
        key = new_key()
        secret(node, namespace, "keys", {"keys.yaml": f"alice: {hash_key(key)}\n"})
        # As the chart's notes say: the store's URL, from its Secret, into one of the pipeline's namespace.
        encoded = node.kubectl("get", "secret", STORE, "-n", "promptpipe-system", "-o", "jsonpath={.data.url}").stdout
        secret(node, namespace, "quota-store", {"url": base64.b64decode(encoded).decode()})
        apply(node, namespace, pipeline())
        gateway_selector = f"{instance(NAME)},app.kubernetes.io/component=stream"
        wait_until(lambda: all_running(node, namespace, gateway_selector, GATEWAYS), "3 gateways Ready", 240, every=1)
        wait_until(lambda: all_running(node, namespace, instance(NAME), GATEWAYS + 4), "the stages Ready", 240, every=1)
        service = f"127.0.0.1:{node.forward(service_ip(node, namespace, f'{NAME}-stream'), 50051)}"

        async def calls() -> list[grpc.StatusCode | None]:
            # A client (a connection) per call: kube-proxy spreads connections over the Service's pods.
            return [(await stream(service, api_key=key))[1] for _ in range(CALLS)]

        codes = asyncio.run(calls())
        ok = codes.count(None)
        # Each pod alone admits PER_MINUTE: about CALLS in all. Shared: PER_MINUTE, plus what refills while
        # the calls run (2 s per call at most: under one).
        assert ok in (PER_MINUTE, PER_MINUTE + 1), codes
        assert set(codes) == {None, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        gateways: list[Any] = pods(node, namespace, gateway_selector)
        by_pod = admitted_by_pod(node, gateways)
        # The calls were spread (the test would prove nothing if one pod took them all), and the pods'
        # own counts add up to what the client saw.
        assert sum(1 for n in by_pod.values() if n) >= 2, by_pod
        assert sum(by_pod.values()) == ok, by_pod

        # Only the gateways may reach the store (as a CNI enforcing the chart's policy decides it).
        listed = node.kubectl("get", "networkpolicy", "-n", "promptpipe-system", "-o", "yaml").stdout
        policies = yaml.safe_load(listed)["items"]
        (store,) = pods(node, "promptpipe-system", "app.kubernetes.io/name=promptpipe-quota-store")
        store_pod = netpol.Pod("promptpipe-system", store["metadata"]["labels"])  # type: ignore[index]
        stages: list[Any] = pods(node, namespace, instance(NAME))
        for pod in stages:
            labels = pod["metadata"]["labels"]
            reaches = netpol.admits(policies, netpol.Pod(namespace, labels), store_pod, "redis")
            assert reaches == (labels["app.kubernetes.io/component"] == "stream"), labels
    finally:
        node.kubectl("delete", "namespace", namespace, "--wait=false")
