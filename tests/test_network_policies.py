"""The back door closed: each pipeline's NetworkPolicies, as the API server stores them, admit exactly the
calls the pipeline makes (gateway -> rag, assemble, post; post -> inference; inference and assemble (its
/tokenize) -> its TGI), clients
to the gateway's public ports only, and the operator and Prometheus to the metrics ports."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from promptpipe_operator.render import children, network_policies
from promptpipe_operator.rollout import BLUE, GREEN, Slot, State
from promptpipe_operator.settings import OperatorSettings
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.kube import kubectl
from tests.support.netpol import Pod, admits
from tests.test_operator_render import pipeline

SETTINGS = OperatorSettings(lease_namespace="promptpipe-system", scrape_namespaces=["monitoring"])
STAGES = ("stream", "rag", "assemble", "inference", "post")
COMPONENTS = (*STAGES, "backend")
PORTS = ("grpc", "http", "stage", "metrics")

# Every (caller, callee, port) that is allowed; everything else between them is refused.
ALLOWED_INSIDE = {
    ("stream", "rag", "grpc"),
    ("stream", "assemble", "grpc"),
    ("stream", "post", "grpc"),
    ("post", "inference", "grpc"),
    ("inference", "backend", "http"),
    ("assemble", "backend", "http"),  # TGI's /tokenize: the served model's own token counts
}


def pods_of(manifests: list[dict[str, Any]], namespace: str) -> dict[str, list[Pod]]:
    """Each component's pods, with the labels their Deployments give them."""
    out = {}
    for m in manifests:
        if m["kind"] == "Deployment":
            labels = m["spec"]["template"]["metadata"]["labels"]
            out.setdefault(labels["app.kubernetes.io/component"], []).append(Pod(namespace, labels))
    return out


@pytest.mark.controlplane
def test_the_policies_read_back_from_the_api_server_admit_exactly_the_pipelines_calls(
    control_plane: ControlPlane, kube_tools: Tools, namespace: str
) -> None:
    pp = pipeline("gpu", with_model={"name": "m", "version": "v2", "backend": "tgi", "tgi": {"gpus": 1}})
    both = State(active=Slot("v1", BLUE), target=Slot("v2", GREEN), phase="Progressing")
    manifests = children(pp, namespace, SETTINGS, both)
    rendered = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    assert len(rendered) == 6  # the five stages and the TGI pods
    kubectl(control_plane, kube_tools, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(rendered))
    got = json.loads(kubectl(control_plane, kube_tools, "get", "networkpolicy", "-n", namespace, "-o", "json").stdout)
    policies = got["items"]
    assert len(policies) == 6

    by_component = pods_of(manifests, namespace)
    assert set(by_component) == set(COMPONENTS)
    pods = {c: by_component[c][0] for c in STAGES}
    backends = by_component["backend"]
    assert len(backends) == 2  # blue and green: both behind one policy
    for backend in backends:
        for caller in STAGES:
            assert admits(policies, pods[caller], backend, "http") == ((caller, "backend", "http") in ALLOWED_INSIDE)

    for caller in STAGES:
        for callee in STAGES:
            for port in PORTS:
                expected = (caller, callee, port) in ALLOWED_INSIDE or (callee == "stream" and port in ("grpc", "http"))
                assert admits(policies, pods[caller], pods[callee], port) == expected, (caller, callee, port)

    client = Pod("apps", {"app": "chatbot"})
    for callee, pod in [*pods.items(), *(("backend", b) for b in backends)]:
        for port in PORTS:
            assert admits(policies, client, pod, port) == (callee == "stream" and port in ("grpc", "http"))

    operator = Pod("promptpipe-system", {"app.kubernetes.io/name": "promptpipe-operator"})
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    for callee in STAGES:
        assert admits(policies, operator, pods[callee], "metrics")
        assert admits(policies, prometheus, pods[callee], "metrics")
    assert admits(policies, operator, pods["stream"], "stage")
    assert not admits(policies, prometheus, pods["stream"], "stage")
    for backend in backends:
        assert admits(policies, operator, backend, "http")  # the rollout's smoke test


def test_a_pipeline_without_operator_run_tgi_gets_no_backend_policy() -> None:
    names = [p["metadata"]["name"] for p in network_policies(pipeline(), "ns1", SETTINGS)]
    assert names == [f"quickstart-{c}-ingress" for c in ("stream", "rag", "assemble", "post", "inference")]
