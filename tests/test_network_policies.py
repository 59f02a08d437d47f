"""The back door closed: each pipeline's NetworkPolicies, as the API server stores them, admit exactly the
calls the pipeline makes (gateway -> rag, assemble, post; post -> inference; inference and assemble (its
/tokenize) -> its TGI), clients
to the gateway's public ports only, and the operator and Prometheus to the metrics ports."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from promptpipe.contract.pipeline_file import parse_pipeline
from promptpipe.registry.settings import RegistrySettings
from promptpipe_operator import egress
from promptpipe_operator.render import children, network_policies
from promptpipe_operator.rollout import BLUE, GREEN, Slot, State
from promptpipe_operator.settings import OperatorSettings
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.kube import kubectl
from tests.support.netpol import Pod, admits, reaches
from tests.test_operator_render import QUICKSTART, pipeline

NS = "kubernetes.io/metadata.name"
API_SERVER = ("192.0.2.10", 6443)  # the `kubernetes` Service's endpoint
METADATA = ("169.254.169.254", 80)  # the cloud's instance metadata: credentials
ELSEWHERE = ("203.0.113.5", 443)
REGISTRY = RegistrySettings(endpoint_url="http://moto.registry.svc.cluster.local:5000")
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
    manifests = children(pp, namespace, SETTINGS, both, REGISTRY, api_server=[API_SERVER])
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
                # Egress closed: not even the gateway's public ports are a stage's to call.
                expected = (caller, callee, port) in ALLOWED_INSIDE
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

    # Out of the pipeline: DNS for all; the API server for inference alone (it discovers TGI's replicas);
    # the registry for the TGI pods alone (their init container fetches the model); nothing else.
    registry = Pod("registry", {"app": "moto"})
    for component, pod in [*pods.items(), *(("backend", b) for b in backends)]:
        assert reaches(policies, pod, "10.0.0.10", 53, "UDP") and reaches(policies, pod, "10.0.0.10", 53, "TCP")
        assert not reaches(policies, pod, *METADATA), component
        assert not reaches(policies, pod, *ELSEWHERE), component
        assert reaches(policies, pod, *API_SERVER) == (component == "inference"), component
        assert admits(policies, pod, registry, "http") == (component == "backend"), component
        assert not admits(policies, pod, client, "http"), component


def test_a_pipeline_without_operator_run_tgi_gets_no_backend_policy() -> None:
    names = [p["metadata"]["name"] for p in network_policies(pipeline(), "ns1", SETTINGS)]
    assert names == [f"quickstart-{c}-network" for c in ("stream", "rag", "assemble", "post", "inference")]


def spec_with(**spec: Any) -> Any:
    doc = copy.deepcopy(QUICKSTART)
    doc["spec"].update(spec)
    return parse_pipeline(doc)


def stage_pods(pp: Any, policies: list[dict[str, Any]]) -> dict[str, Pod]:
    return {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: Pod("ns1", p["spec"]["podSelector"]["matchLabels"])
        for p in policies
    }


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        (
            "http://10.88.0.1:4317",
            {"to": [{"ipBlock": {"cidr": "10.88.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 4317}]},
        ),
        # A Service's port need not be its pods' (policies see pods): the namespace, any port.
        ("http://tgi.ml.svc.cluster.local:8080", {"to": [{"namespaceSelector": {"matchLabels": {NS: "ml"}}}]}),
        ("redis://:secret@store.ops.svc:6379/0", {"to": [{"namespaceSelector": {"matchLabels": {NS: "ops"}}}]}),
        ("http://jaeger:4317", {"to": [{"podSelector": {}}]}),  # a Service of the pipeline's own namespace
        (
            "http://[fd00::7]:80/v1",
            {"to": [{"ipBlock": {"cidr": "fd00::7/128"}}], "ports": [{"protocol": "TCP", "port": 80}]},
        ),
    ],
)
def test_a_url_becomes_the_narrowest_rule_a_policy_can_say(url: str, rule: dict[str, Any]) -> None:
    assert egress.to_url(url) == rule


def test_a_host_name_opens_its_port_anywhere_but_link_local_and_the_api_server() -> None:
    rule = egress.to_url("https://api.example.com/v1", [API_SERVER])
    assert rule["ports"] == [{"protocol": "TCP", "port": 443}]
    policy = {
        "metadata": {"namespace": "ns1"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [rule]},
    }
    pod = Pod("ns1", {})
    assert reaches([policy], pod, "203.0.113.5", 443)
    assert not reaches([policy], pod, "203.0.113.5", 80)
    assert not reaches([policy], pod, "169.254.169.254", 443)
    assert not reaches([policy], pod, API_SERVER[0], 443)


def test_openai_endpoints_are_the_inference_stages_alone_to_call() -> None:
    pp = pipeline(with_model={"name": "gpt", "backend": "openai", "openai": {"endpoints": ["https://llm.example.com"]}})
    policies = network_policies(pp, "ns1", SETTINGS, api_server=[API_SERVER])
    for component, pod in stage_pods(pp, policies).items():
        assert reaches(policies, pod, "203.0.113.5", 443) == (component == "inference"), component
        assert not reaches(policies, pod, *API_SERVER), component  # no operator-run TGI: no discovery


def test_declared_egress_reaches_the_components_it_names_wherever_they_run() -> None:
    store = {"to": [{"ipBlock": {"cidr": "10.9.0.0/16", "except": ["10.9.9.0/24"]}}], "ports": [{"port": 6379}]}
    proxy = {"to": [{"namespaceSelector": {"matchLabels": {NS: "proxy"}}}]}
    pp = spec_with(network={"egress": [{"components": ["stream", "post"], **store}, proxy]}, fuse=["post", "inference"])
    policies = network_policies(pp, "ns1", SETTINGS)
    pods = stage_pods(pp, policies)
    assert set(pods) == {"stream", "rag", "assemble"}  # post and inference run in the gateway
    for component, pod in pods.items():
        assert reaches(policies, pod, "10.9.1.1", 6379) == (component == "stream"), component
        assert not reaches(policies, pod, "10.9.9.1", 6379)
        assert not reaches(policies, pod, "10.9.1.1", 6380)
        assert admits(policies, pod, Pod("proxy", {}), "http"), component  # no components: every pod


def test_a_gateway_with_a_shared_quota_store_reaches_the_operators_namespace_on_redis_alone() -> None:
    store = {"urlSecret": {"name": "qs", "key": "url"}}
    pp = spec_with(auth={"apiKeysSecret": {"name": "k", "key": "keys.yaml"}, "quotaStore": store})
    policies = network_policies(pp, "ns1", SETTINGS)
    beside_operator = Pod("promptpipe-system", {"app.kubernetes.io/name": "promptpipe-quota-store"})
    for component, pod in stage_pods(pp, policies).items():
        assert admits(policies, pod, beside_operator, "redis") == (component == "stream"), component
        assert not admits(policies, pod, beside_operator, "http"), component
