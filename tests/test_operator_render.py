"""The operator's render layer: a PromptPipeline's children, as pure manifests."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from promptpipe.config.loader import RuntimeConfig, parse_pipeline
from promptpipe.config.spec import STAGE_ORDER, StageName
from promptpipe.devcluster.build import Tools
from promptpipe.devcluster.cluster import ControlPlane
from promptpipe_operator.render import GRPC_PORT, child_name, children, config_map, deployment, scaled_object
from promptpipe_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "examples" / "quickstart.yaml").read_text())
SETTINGS = OperatorSettings()
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def pipeline(name: str = "quickstart", **stages: Any) -> Any:
    doc = copy.deepcopy(QUICKSTART)
    doc["metadata"]["name"] = name
    for stage, spec in stages.items():
        doc["spec"]["stages"].setdefault(stage, {}).update(spec)
    return parse_pipeline(doc)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def test_one_deployment_service_and_scaled_object_per_stage_and_one_config_map() -> None:
    out = children(pipeline(), "ns1", SETTINGS)
    assert [m["kind"] for m in out].count("ConfigMap") == 1
    for kind in ("Deployment", "Service", "ScaledObject"):
        assert set(by_kind(out, kind)) == {f"quickstart-{s.value}" for s in STAGE_ORDER}
    assert all(m["metadata"]["namespace"] == "ns1" for m in out)


def test_names_stay_dns_labels_for_the_longest_pipeline_name() -> None:
    long = "p" * 63
    for m in children(pipeline(long), "ns1", SETTINGS):
        assert DNS_LABEL.match(m["metadata"]["name"]), m["metadata"]["name"]
    assert child_name(long, "inference").endswith("-inference")


def test_services_select_exactly_their_stage_pods() -> None:
    out = children(pipeline(), "ns1", SETTINGS)
    deployments, services = by_kind(out, "Deployment"), by_kind(out, "Service")
    for name, svc in services.items():
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert deployments[name]["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
        others = [d for n, d in deployments.items() if n != name]
        assert not any(svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
                       for d in others)


def test_runtime_config_points_each_stage_at_the_service_dns_names() -> None:
    cm, _ = config_map(pipeline(), "ns1")
    config = RuntimeConfig.model_validate(yaml.safe_load(cm["data"]["runtime.yaml"]))
    assert config.endpoints[StageName.RAG] == f"quickstart-rag.ns1.svc:{GRPC_PORT}"
    assert config.pipeline.spec == pipeline().spec


def test_deployment_probes_security_drain_and_config_rollout() -> None:
    pp = pipeline(inference={"drainGraceSeconds": 40})
    _, digest = config_map(pp, "ns1")
    d = deployment(pp, "ns1", StageName.INFERENCE, SETTINGS, digest)
    pod = d["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "replicas" not in d["spec"], "KEDA owns the replica count"
    assert container["readinessProbe"]["grpc"] == {"port": GRPC_PORT}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    assert pod["terminationGracePeriodSeconds"] == 45
    assert {"name": "PROMPTPIPE_STAGE", "value": "inference"} in container["env"]
    changed = pipeline(inference={"timeoutSeconds": 10})
    assert config_map(changed, "ns1")[1] != digest, "a spec change rolls the pods"


def test_scaled_object_scales_on_the_stages_queue_depth() -> None:
    pp = pipeline(rag={"scaling": {"minReplicas": 0, "maxReplicas": 7, "targetQueueDepth": 3}})
    so = scaled_object(pp, "ns1", StageName.RAG, SETTINGS)
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (0, 7)
    trigger = so["spec"]["triggers"][0]
    assert trigger["metadata"]["threshold"] == "3"
    assert 'stage="rag"' in trigger["metadata"]["query"] and 'pipeline="quickstart"' in trigger["metadata"]["query"]
    assert so["spec"]["scaleTargetRef"]["name"] == "quickstart-rag"


@pytest.mark.controlplane
def test_every_child_is_accepted_by_the_api_server_and_kedas_crd(
        control_plane: ControlPlane, kube_tools: Tools, namespace: str) -> None:
    for pp in (pipeline(), pipeline("scale-to-zero", post={"scaling": {"minReplicas": 0, "maxReplicas": 2}})):
        manifests = yaml.safe_dump_all(children(pp, namespace, SETTINGS))
        result = subprocess.run([str(kube_tools.kubectl), f"--kubeconfig={control_plane.kubeconfig}", "apply",
                                 "--dry-run=server", "-f", "-"], input=manifests, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("(server dry run)") == 1 + 3 * len(STAGE_ORDER)
