"""The PromptPipeline CRD: generated from the spec models, enforced by the real API server."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from promptpipe.contract.crd import promptpipeline_crd, render
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.kube import kubectl

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "deploy" / "crds" / "promptpipelines.promptpipe.io.yaml"
QUICKSTART = ROOT / "deploy" / "examples" / "quickstart.yaml"


def test_committed_crd_is_what_the_spec_generates() -> None:
    assert CRD_FILE.read_text() == render(), "run `make manifests`: deploy/crds drifted from contract/spec.py"


def test_schema_is_structural() -> None:
    text = yaml.safe_dump(promptpipeline_crd())
    for keyword in ("$ref", "additionalProperties: false", "title:"):
        assert keyword not in text, keyword

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            # The one anyOf a structural schema takes: int-or-string (resource quantities).
            assert "anyOf" not in node or node.get("x-kubernetes-int-or-string") is True, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(promptpipeline_crd())


def quickstart(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    doc["metadata"]["name"] = name
    return doc


@pytest.mark.controlplane
def test_examples_are_accepted_and_listed_by_short_name(
    promptpipe_crd: None, control_plane: ControlPlane, kube_tools: Tools, namespace: str
) -> None:
    for example in sorted((ROOT / "deploy" / "examples").glob("*.yaml")):
        dry = kubectl(control_plane, kube_tools, "apply", "-n", namespace, "--dry-run=server", "-f", str(example))
        assert "created (server dry run)" in dry.stdout, dry.stderr
    kubectl(control_plane, kube_tools, "apply", "-n", namespace, "-f", str(QUICKSTART))
    listed = kubectl(control_plane, kube_tools, "get", "pp", "-n", namespace)
    header = listed.stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "MODEL", "VERSION", "COLOR", "READY", "AGE"]
    # No operator runs here, so the status columns are empty; spec columns are filled.
    assert listed.stdout.splitlines()[1].split()[:2] == ["quickstart", "smollm2-135m-instruct"]


MALFORMED = [
    (["spec", "stages", "rag", "queue", "capacity"], -1, "spec.stages.rag.queue.capacity"),
    (["spec", "stages", "post", "queue", "shedPolicy"], "drop-newest", "spec.stages.post.queue.shedPolicy"),
    (["spec", "stages", "inference", "scaling"], {"minReplicas": 5, "maxReplicas": 2}, "spec.stages.inference.scaling"),
    (["spec", "stages", "inference", "scaling"], {"minReplicas": 6}, "spec.stages.inference.scaling"),
    (["spec", "stages", "ranker"], {"queue": {"capacity": 1}}, "spec.stages.ranker"),
    # The other stages may scale to zero (their callers wake them); nothing calls the gateway.
    (["spec", "stages", "stream"], {"scaling": {"minReplicas": 0}}, "spec.stages.stream.scaling.minReplicas"),
    (["spec", "model", "backend"], "openai", "spec.model"),
    (["spec", "generation", "temperature"], 3, "spec.generation.temperature"),
    (["spec", "failover"], {"maxAttempts": -1}, "spec.failover.maxAttempts"),
    (["spec", "failover"], {"maxAttempts": 11}, "spec.failover.maxAttempts"),
    (["spec", "model", "name"], "", "spec.model.name"),
    (["spec", "stages", "rag", "resources"], {"requests": {"cpu": "lots"}}, "spec.stages.rag.resources.requests.cpu"),
    # Durations are int-or-string: their bounds are CEL rules, for integers and strings alike.
    (["spec", "rollout"], {"progressDeadline": 6}, "spec.rollout.progressDeadline"),
    (["spec", "rollout"], {"progressDeadline": "5s"}, "spec.rollout.progressDeadline"),
    (["spec", "rollout"], {"analysis": {"interval": "2h"}}, "spec.rollout.analysis.interval"),
    (["spec", "rollout"], {"keepPrevious": "soon"}, "spec.rollout.keepPrevious"),
    # What the post stage holds back waiting for a match is bounded by the longest one.
    (["spec", "post"], {"stopSequences": ["#" * 65]}, "spec.post.stopSequences[0]"),
    (["spec", "post"], {"blocklist": {"words": ["w" * 129]}}, "spec.post.blocklist.words[0]"),
    # Judged at apply time: limits that contradict each other, bounds the wrong way round, endpoints that
    # are not URLs, values that make a stage useless.
    (
        ["spec", "stages", "rag", "retries"],
        {"initialBackoffSeconds": 5},
        "spec.stages.rag.retries.initialBackoffSeconds",
    ),
    (["spec", "generation", "maxNewTokens"], 5000, "spec.generation.maxNewTokens"),
    (["spec", "rag", "topK"], 0, "spec.rag.topK"),
    (["spec", "generation", "maxNewTokens"], 2048, "spec.generation.maxNewTokens"),  # the whole context
    (
        ["spec", "model"],
        {"name": "m", "backend": "tgi", "tgi": {"endpoints": ["tgi:8080"]}},
        "spec.model.tgi.endpoints[0]",
    ),
    (
        ["spec", "model"],
        {"name": "m", "backend": "tgi", "tgi": {"maxInputTokens": 4096, "maxTotalTokens": 4096}},
        "spec.model.tgi.maxInputTokens",
    ),
    (
        ["spec", "model"],
        {"name": "m", "backend": "tgi", "tgi": {"maxInputTokens": 4096, "maxBatchPrefillTokens": 1024}},
        "spec.model.tgi.maxBatchPrefillTokens",
    ),
    (["spec", "model", "routing"], {"policy": "random"}, "spec.model.routing.policy"),
    (["spec", "model", "routing"], {"loadBound": 0.5}, "spec.model.routing.loadBound"),
    # The front door: tenants are a list keyed by name, their quotas bounded; open excludes a key Secret.
    (["spec", "auth"], {"tenants": [{"name": "a"}, {"name": "a"}]}, "spec.auth.tenants[1]"),
    (["spec", "auth"], {"tenants": [{"name": "Team A"}]}, "spec.auth.tenants[0].name"),
    (["spec", "auth"], {"defaultQuota": {"tokensPerMinute": 0}}, "spec.auth.defaultQuota.tokensPerMinute"),
    (["spec", "auth"], {"tenants": [{"name": "a", "priority": "urgent"}]}, "spec.auth.tenants[0].priority"),
    (
        ["spec", "auth"],
        {"open": True, "apiKeysSecret": {"name": "k", "key": "keys.yaml"}},
        "spec.auth.open",
    ),
    # The SLO `promptpipe analyze` checks and the alerts watch: latencies in ms, an error share below 1.
    (["spec", "slo"], {"ttftP95Milliseconds": 0}, "spec.slo.ttftP95Milliseconds"),
    (["spec", "slo"], {"errorRate": 1.5}, "spec.slo.errorRate"),
    (["spec", "slo"], {"tpotP95": 40}, "spec.slo.tpotP95"),
    # Where the stages' spans go (an OTLP/gRPC URL), and the share of calls traced.
    (["spec", "tracing"], {"otlpEndpoint": "jaeger-collector:4317"}, "spec.tracing.otlpEndpoint"),
    (["spec", "tracing"], {"otlpEndpoint": "http://jaeger:4317", "sampleRatio": -0.1}, "spec.tracing.sampleRatio"),
    (["spec", "tracing"], {"sampleRatio": 0.5}, "spec.tracing.otlpEndpoint"),
    # Fusion: only rag, assemble, post and inference run inside a neighbour, each named once; inference
    # only with post, which calls it.
    (["spec", "fuse"], ["stream"], "spec.fuse[0]"),
    (["spec", "fuse"], ["post", "post"], "spec.fuse[1]"),
    (["spec", "fuse"], ["rag", "inference"], "spec.fuse: Invalid value"),
    # A cluster reads a pipeline's paths inside the stage's container: nothing outside its working directory.
    (["spec", "rag", "corpus"], {"path": "/var/run/secrets/kubernetes.io/serviceaccount"}, "spec.rag.corpus.path"),
    (["spec", "rag", "corpus"], {"path": "corpus/../../proc/self"}, "spec.rag.corpus.path"),
    (["spec", "model", "llamacpp"], {"modelPath": "/etc/shadow"}, "spec.model.llamacpp.modelPath"),
    (["spec", "model", "llamacpp"], {"modelPath": ".."}, "spec.model.llamacpp.modelPath"),
    # Egress the pipeline opens beyond what it calls: NetworkPolicy shapes, checked as a CNI would need them.
    (
        ["spec", "network"],
        {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
        "spec.network.egress[0].to[0].ipBlock.cidr",
    ),
    (
        ["spec", "network"],
        {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
        "spec.network.egress[0].to[0]",
    ),
    (["spec", "network"], {"egress": [{"ports": [{"port": 70000}]}]}, "spec.network.egress[0].ports[0].port"),
    (
        ["spec", "network"],
        {"egress": [{"ports": [{"port": 90, "endPort": 80}]}]},
        "spec.network.egress[0].ports[0].endPort",
    ),
    (["spec", "network"], {"egress": [{"components": ["gateway"]}]}, "spec.network.egress[0].components[0]"),
    # Worker processes were removed in 0.2.0: a stage pod runs one process.
    (["spec", "stages", "post", "workers"], 1, "spec.stages.post.workers"),
    # The pipeline names the variable sent to the endpoint as its key: never another credential.
    (
        ["spec", "model", "openai"],
        {"endpoints": ["http://llm:8000"], "apiKeyEnv": "AWS_SECRET_ACCESS_KEY"},
        "spec.model.openai.apiKeyEnv",
    ),
]


@pytest.mark.controlplane
@pytest.mark.parametrize(("path", "value", "field"), MALFORMED)
def test_malformed_resource_is_refused_at_apply_naming_the_field(
    promptpipe_crd: None,
    control_plane: ControlPlane,
    kube_tools: Tools,
    namespace: str,
    path: list[str],
    value: object,
    field: str,
) -> None:
    doc = quickstart("bad")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    result = kubectl(
        control_plane, kube_tools, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc), check=False
    )
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


@pytest.mark.controlplane
@pytest.mark.parametrize("stage", ["stream", "inference"])
def test_workers_are_refused_at_apply_naming_the_field_and_what_to_do_instead(
    promptpipe_crd: None, control_plane: ControlPlane, kube_tools: Tools, namespace: str, stage: str
) -> None:
    doc = quickstart("workers")
    doc["spec"]["stages"][stage]["workers"] = 4
    result = kubectl(
        control_plane, kube_tools, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc), check=False
    )
    assert result.returncode != 0
    assert f"spec.stages.{stage}.workers" in result.stderr, result.stderr
    assert "scale a stage with replicas" in result.stderr, result.stderr


@pytest.mark.controlplane
def test_missing_model_is_refused(promptpipe_crd: None, kube: client.ApiClient, namespace: str) -> None:
    doc = copy.deepcopy(quickstart("nomodel"))
    del doc["spec"]["model"]
    with pytest.raises(client.exceptions.ApiException) as info:
        client.CustomObjectsApi(kube).create_namespaced_custom_object(
            "promptpipe.io", "v1alpha1", namespace, "promptpipelines", doc
        )
    assert info.value.status == 422 and "spec.model: Required value" in info.value.body
