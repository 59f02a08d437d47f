"""Blue-green rollouts against the real kube-apiserver, with the registry on moto's server.

No kubelet: readiness is simulated by writing Deployment status; the smoke generation goes
to a TGI-protocol server standing in for each color's Service; gateway metrics come from a
real Prometheus exposition, at the address of a gateway Pod whose status the test writes, or from a
real Prometheus scraping it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import prometheus_client
import psutil
import pytest
import yaml
from kubernetes import client

from promptpipe.localproc import free_port
from promptpipe.registry.refs import parse_ref
from promptpipe.registry.store import Registry
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.cluster import QUICKSTART, Cluster, apply
from tests.support.faults import FaultyProxy, Mode
from tests.support.kube import kubectl
from tests.support.moto import make_model, registry_env, registry_env_through
from tests.support.operator import OperatorProcess
from tests.support.pipelines import tgi_server
from tests.support.prometheus import SCRAPE_SECONDS, gateway_exposition, prometheus, scraped

pytestmark = pytest.mark.controlplane
NAME = "quickstart"


def bg_doc(model: dict[str, Any], **rollout: Any) -> dict[str, Any]:
    doc = copy.deepcopy(QUICKSTART)
    doc["spec"]["model"] = {"name": "smollm2", "backend": "tgi", "tgi": {"gpus": 1}, **model}
    doc["spec"]["rollout"] = {
        "progressDeadline": 10,
        "keepPrevious": 2,
        # Journeys about the switch, with no calls to judge: promoted all the same (the hold is tested apart).
        "analysis": {"window": 1, "interval": 1, "onNoVerdict": "promote"},
        **rollout,
    }
    return doc


class Rollouts:
    def __init__(
        self,
        cluster: Cluster,
        plane: ControlPlane,
        tools: Tools,
        registry: Registry,
        tgi: str,
        operator: OperatorProcess,
    ) -> None:
        self.cluster, self.plane, self.tools, self.registry, self.tgi = cluster, plane, tools, registry, tgi
        self.operator = operator

    def apply(self, doc: dict[str, Any]) -> None:
        apply(self.plane, self.tools, self.cluster.ns, doc)

    def rollout(self) -> dict[str, Any]:
        return self.cluster.status(NAME).get("rollout") or {}

    def traffic(self) -> str:
        """The color the inference Service sends traffic to."""
        svc = self.cluster.core.read_namespaced_service(f"{NAME}-backend", self.cluster.ns)
        return str(svc.spec.selector["promptpipe.io/color"])

    def backends(self) -> dict[str, str]:
        """Backend Deployments: color → model version."""
        return {
            d["metadata"]["labels"]["promptpipe.io/color"]: d["metadata"]["annotations"]["promptpipe.io/model-version"]
            for (k, n), d in self.cluster.children(NAME).items()
            if k == "Deployment" and "-backend-" in n
        }

    def start_on(self, version: str, **rollout: Any) -> None:
        """Serving `version` on blue, every stage Ready."""
        self.apply(bg_doc({"version": version}, **rollout))
        wait_until(lambda: self.backends() == {"blue": version}, "blue")
        self.all_ready()
        wait_until(lambda: self.cluster.status(NAME).get("phase") == "Ready", "Ready")

    def all_ready(self) -> None:
        """Every stage and blue Ready (children are applied concurrently: wait until all exist)."""
        deployments = {
            f"{NAME}-{stage}" for stage in ("stream", "rag", "assemble", "inference", "post", "backend-blue")
        }
        wait_until(
            lambda: deployments <= {n for (k, n) in self.cluster.children(NAME) if k == "Deployment"},
            "every Deployment",
        )
        for deployment in sorted(deployments):
            self.cluster.set_ready(deployment)

    def fail_smoke(self, color: str, mode: str = "error") -> None:
        """Make that color's backend answer the smoke generation as `mode` says (tests/support/tgi_server)."""
        body = json.dumps({"prefix": f"{self.cluster.ns}/{NAME}-backend-{color}", "mode": mode}).encode()
        urllib.request.urlopen(
            urllib.request.Request(
                f"{self.tgi}/control/fail", data=body, method="POST", headers={"Content-Type": "application/json"}
            )
        ).close()


@pytest.fixture
def registry_proxy(registry: Registry) -> Iterator[FaultyProxy]:
    """What the operator reaches the registry through: a TCP proxy in front of moto, for faults."""
    url = urllib.parse.urlsplit(str(registry.settings.endpoint_url))
    with FaultyProxy(str(url.hostname), int(url.port or 80)) as proxy:
        yield proxy


RolloutsFor = Callable[..., AbstractContextManager[list[Rollouts]]]


@pytest.fixture
def rollouts_for(
    registry: Registry,
    operator_identity: Path,
    kube: client.ApiClient,
    control_plane: ControlPlane,
    kube_tools: Tools,
    tmp_path: Path,
) -> RolloutsFor:
    """Called with namespaces, the registry's settings (env) and more operator settings: one operator watching
    those namespaces, the registry holding `versions` of smollm2, every backend played by one TGI test
    server; a Rollouts for each namespace."""

    @contextmanager
    def start(namespaces: list[str], env: dict[str, str], versions: int = 3) -> Iterator[list[Rollouts]]:
        for i in range(versions):
            registry.push("smollm2", make_model(tmp_path / f"v{i + 1}", f"seed-{i}"), f"v{i + 1}")
        with (
            tgi_server() as tgi,
            OperatorProcess(
                operator_identity,
                ",".join(namespaces),
                tmp_path / "operator.log",
                env={"PROMPTPIPE_OPERATOR_BACKEND_URL_TEMPLATE": f"{tgi}/{{namespace}}/{{service}}", **env},
            ) as op,
        ):
            yield [Rollouts(Cluster(kube, ns), control_plane, kube_tools, registry, tgi, op) for ns in namespaces]

    return start


@pytest.fixture
def rollouts(
    rollouts_for: RolloutsFor, registry: Registry, registry_proxy: FaultyProxy, namespace: str
) -> Iterator[Rollouts]:
    env = {
        **registry_env_through(registry.settings, registry_proxy.address),
        "PROMPTPIPE_OPERATOR_ALIAS_POLL_SECONDS": "0.5",
    }
    with rollouts_for([namespace], env) as (one,):
        yield one


def test_a_stalled_registry_leaves_the_version_unresolved_with_the_reason_and_the_reconcile_goes_on(
    rollouts: Rollouts, registry_proxy: FaultyProxy
) -> None:
    r, cluster = rollouts, rollouts.cluster
    r.registry.promote("smollm2", "v1", "prod")
    r.apply(bg_doc({"alias": "prod"}))
    wait_until(lambda: r.backends() == {"blue": "v1"}, "v1 on blue")
    r.all_ready()

    registry_proxy.mode = Mode.STALL  # connections open, no answer: a read timeout, not a refusal
    r.registry.promote("smollm2", "v2", "prod")  # directly, not through the proxy
    doc = bg_doc({"alias": "prod"})
    doc["spec"]["stages"]["post"] = {"timeoutSeconds": 33}
    r.apply(doc)

    def unresolved() -> dict[str, Any] | None:
        conditions = {c["type"]: c for c in cluster.status(NAME).get("conditions", [])}
        degraded = conditions.get("Degraded", {})
        return degraded if degraded.get("reason") == "ModelUnresolved" else None

    why = wait_until(unresolved, "the status to say the version is unresolved", timeout=30)
    assert "no answer in time from" in why["message"], why
    # The rest of the spec is still applied, and traffic stays on what is serving.
    post = cluster.apps.read_namespaced_deployment(f"{NAME}-post", cluster.ns)
    wait_until(
        lambda: (
            cluster.apps.read_namespaced_deployment(
                f"{NAME}-post", cluster.ns
            ).spec.template.spec.termination_grace_period_seconds
            == 38
        ),
        "the post stage's new timeout applied while the registry is stalled",
    )
    assert post is not None and r.backends() == {"blue": "v1"} and r.traffic() == "blue"

    registry_proxy.mode = Mode.PASS
    wait_until(lambda: r.backends() == {"blue": "v1", "green": "v2"}, "the rollout once the registry answers")
    wait_until(lambda: unresolved() is None, "the condition cleared")


def test_a_promoted_alias_rolls_out_green_switches_after_the_smoke_test_and_retires_blue(rollouts: Rollouts) -> None:
    r, cluster = rollouts, rollouts.cluster
    r.registry.promote("smollm2", "v1", "prod")
    r.apply(bg_doc({"alias": "prod"}, analysis={"window": 1, "interval": 1}))  # onNoVerdict: hold
    wait_until(lambda: r.backends() == {"blue": "v1"}, "v1 on blue")
    r.all_ready()
    r.registry.promote("smollm2", "v2", "prod")
    wait_until(lambda: r.backends() == {"blue": "v1", "green": "v2"}, "green brought up next to blue")
    green = cluster.apps.read_namespaced_deployment(f"{NAME}-backend-green", cluster.ns)
    fetch = green.spec.template.spec.init_containers[0].command
    assert fetch[3] == "smollm2:v2"
    # Pinned to the content the operator resolved: a record changed later is refused by the pod's pull.
    assert fetch[-2:] == ["--digest", r.registry.resolve(parse_ref("smollm2:v2")).digest]
    wait_until(lambda: r.rollout()["phase"] == "Progressing", "status Progressing")
    assert r.traffic() == "blue"
    cluster.set_ready(f"{NAME}-backend-green")
    wait_until(lambda: r.traffic() == "green", "the switch to green")
    status = wait_until(lambda: cluster.status(NAME).get("activeColor") == "green" and cluster.status(NAME), "status")
    assert (status["activeVersion"], status["activeColor"]) == ("v2", "green")
    assert (status["previousVersion"], status["previousColor"]) == ("v1", "blue")
    # The analysis window passes without enough calls to judge: held, by default, saying so; blue keeps
    # running and traffic stays on green.
    held = wait_until(lambda: r.rollout().get("reason") == "AnalysisHeld" and r.rollout(), "the hold", timeout=15)
    assert held["phase"] == "Analyzing" and held["message"].startswith("held without a verdict: "), held
    assert wait_until(lambda: cluster.events("RolloutHeld"), "a RolloutHeld event")
    assert r.backends() == {"blue": "v1", "green": "v2"} and r.traffic() == "green"
    # Told to promote without a verdict, it does, saying so; then blue is kept for keepPrevious and removed.
    r.apply(bg_doc({"alias": "prod"}, analysis={"window": 1, "interval": 1, "onNoVerdict": "promote"}))
    wait_until(lambda: r.rollout()["phase"] == "Stable", "the analysis to end", timeout=15)
    assert r.rollout()["reason"] == "AnalysisInconclusive"
    assert r.rollout()["message"].startswith("promoted without a verdict: ")
    wait_until(lambda: r.backends() == {"green": "v2"}, "blue retired after keepPrevious", timeout=15)
    assert [h["result"] for h in r.rollout()["history"]] == ["Deployed", "Succeeded"]
    for reason in ("RolloutStarted", "Switched", "RolloutInconclusive"):
        assert wait_until(lambda rs=reason: cluster.events(rs), f"a {reason} event")


@pytest.fixture
def refuse_a_child(rollouts: Rollouts, control_plane: ControlPlane, kube_tools: Tools) -> Iterator[Callable[[], str]]:
    """Called, it makes the API server refuse every write to one child, the rag ScaledObject (an admission
    policy, as a cluster's own policies might): what the operator applies for it fails every time."""
    ns = rollouts.cluster.ns
    policy = f"refuse-rag-{ns}"
    docs = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["keda.sh"],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": ["scaledobjects"],
                        }
                    ]
                },
                "validations": [
                    {"expression": f"object.metadata.name != '{NAME}-rag'", "message": "refused by a test policy"}
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {
                "policyName": policy,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
            },
        },
    ]
    text = yaml.safe_dump_all(docs)

    def refuse() -> str:
        kubectl(control_plane, kube_tools, "apply", "-f", "-", stdin=text)
        return f"ScaledObject {NAME}-rag"

    try:
        yield refuse
    finally:
        kubectl(control_plane, kube_tools, "delete", "-f", "-", "--ignore-not-found", stdin=text)


def test_a_child_the_api_refuses_does_not_hold_the_rollout_at_one_step(
    rollouts: Rollouts, refuse_a_child: Callable[[], str]
) -> None:
    r, cluster = rollouts, rollouts.cluster
    r.start_on("v1", analysis={"window": 2, "interval": 1, "onNoVerdict": "promote"})
    # The rag child is refused from now on, on every reconcile; the model's rollout must go on regardless.
    refused_child = refuse_a_child()
    doc = bg_doc({"version": "v2"}, analysis={"window": 2, "interval": 1, "onNoVerdict": "promote"})
    doc["spec"]["stages"]["rag"] = {"scaling": {"maxReplicas": 9}}
    r.apply(doc)

    def refused() -> dict[str, Any] | None:
        degraded = next((c for c in cluster.status(NAME).get("conditions", []) if c["type"] == "Degraded"), {})
        return degraded if degraded.get("reason") == "ApplyFailed" else None

    why = wait_until(refused, "the refusal in the status")
    assert (
        f"applying {refused_child}: HTTP 422" in why["message"]
        or f"applying {refused_child}: HTTP 403" in why["message"]
    ), why
    wait_until(lambda: "green" in r.backends(), "green brought up all the same")
    cluster.set_ready(f"{NAME}-backend-green")
    wait_until(lambda: r.traffic() == "green", "the switch")
    # Recorded once decided: the analysis runs and ends, and the switch happened once.
    wait_until(lambda: r.rollout().get("phase") == "Stable", "the rollout to finish", timeout=30)
    assert r.rollout()["history"][-1]["version"] == "v2"
    switched = [e for e in cluster.events("Switched") if "v2" in e]
    assert len(switched) == 1, switched
    assert refused() is not None, "the refused child is still reported"


def test_green_never_ready_is_rolled_back_at_the_progress_deadline_and_not_retried(rollouts: Rollouts) -> None:
    r, cluster = rollouts, rollouts.cluster
    r.start_on("v1")
    r.apply(bg_doc({"version": "v2"}))
    versions = cluster.versions(NAME)
    wait_until(lambda: "green" in r.backends(), "green")
    stages = {k: v for k, v in versions.items() if k[0] == "Deployment" and "backend" not in k[1]}
    assert {k: v for k, v in cluster.versions(NAME).items() if k in stages} == stages, "a rollout rolls no stage"
    wait_until(lambda: r.rollout().get("phase") == "RolledBack", "the rollback", timeout=25)
    rollout = r.rollout()
    assert rollout["reason"] == "ProgressDeadlineExceeded" and rollout["failedVersion"] == "v2"
    # Recorded first, then carried out in the same reconcile: traffic back, green removed.
    wait_until(lambda: r.backends() == {"blue": "v1"} and r.traffic() == "blue", "blue alone, serving")
    status = cluster.status(NAME)
    assert status["phase"] == "RolledBack" and status["activeVersion"] == "v1"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["RolledBack"] == "ProgressDeadlineExceeded"
    assert "rolled back v2 (green) to v1 (blue)" in wait_until(lambda: cluster.events("RolledBack"), "an Event")[0]
    r.operator.stop()  # a restart re-reads everything: still not retried for the same spec
    r.operator.start()
    wait_until(lambda: r.operator.metric("promptpipe_operator_reconciles_total") >= 1, "a reconcile")
    assert r.backends() == {"blue": "v1"}


def test_a_failed_smoke_generation_rolls_back_before_any_traffic_moves(rollouts: Rollouts) -> None:
    r, cluster = rollouts, rollouts.cluster
    r.start_on("v1")
    r.fail_smoke("green")
    r.apply(bg_doc({"version": "v2"}))
    wait_until(lambda: "green" in r.backends(), "green")
    cluster.set_ready(f"{NAME}-backend-green")
    wait_until(lambda: r.rollout().get("phase") == "RolledBack", "the rollback")
    assert r.rollout()["reason"] == "SmokeTestFailed" and "HTTP 500" in r.rollout()["message"]
    # Recorded first, then carried out in the same reconcile: traffic back, green removed.
    wait_until(lambda: r.backends() == {"blue": "v1"} and r.traffic() == "blue", "blue alone, serving")


def test_errors_at_the_gateway_during_analysis_put_traffic_back_on_blue_whatever_a_look_alike_says(
    rollouts: Rollouts,
) -> None:
    r, cluster = rollouts, rollouts.cluster
    # The gateway's own pod, and a look-alike carrying its labels (any pod author in the namespace could
    # make one) that reports a thousand healthy calls after the switch: counted, they would pass analysis.
    exposed = {}
    for who in ("gateway", "look-alike"):
        metrics = prometheus_client.CollectorRegistry()
        calls = prometheus_client.Histogram(
            "promptpipe_stage_duration_seconds", "", ["pipeline", "stage", "code"], registry=metrics
        )
        port = free_port()
        exposed[who] = (calls, port, prometheus_client.start_http_server(port, addr="127.0.0.1", registry=metrics))
    try:
        analysis = {"window": 60, "interval": 1, "minRequests": 10, "maxErrorRate": 0.1}
        r.start_on("v1", analysis=analysis)
        gateway_pod(cluster, exposed["gateway"][1], f"{NAME}-stream-6b7f9-abcde")
        gateway_pod(cluster, exposed["look-alike"][1], f"{NAME}-stream-look-alike", owned=False)
        calls, forged = exposed["gateway"][0], exposed["look-alike"][0]
        for _ in range(50):
            calls.labels(NAME, "stream", "OK").observe(0.2)  # before the switch: not counted
        r.apply(bg_doc({"version": "v2"}, analysis=analysis))
        wait_until(lambda: "green" in r.backends(), "green")
        cluster.set_ready(f"{NAME}-backend-green")
        wait_until(lambda: r.traffic() == "green" and r.rollout().get("baseline"), "the switch and a baseline")
        assert list(r.rollout()["baseline"]) == [f"{NAME}-stream-6b7f9-abcde"], "only the gateway's own pod"
        for _ in range(1000):
            forged.labels(NAME, "stream", "OK").observe(0.1)
        for code in ["OK"] * 14 + ["UNAVAILABLE"] * 6:
            calls.labels(NAME, "stream", code).observe(0.3)
        wait_until(lambda: r.traffic() == "blue", "traffic back on blue")
        rollout = wait_until(lambda: r.rollout().get("phase") == "RolledBack" and r.rollout(), "the status")
        assert rollout["reason"] == "AnalysisFailed" and "error rate 30.0% over 20 calls" in rollout["message"]
        # Recorded first, then carried out in the same reconcile: traffic back, green removed.
        wait_until(lambda: r.backends() == {"blue": "v1"} and r.traffic() == "blue", "blue alone, serving")
    finally:
        for _, _, (server, thread) in exposed.values():
            server.shutdown()
            thread.join()


@pytest.mark.prometheus
def test_errors_read_from_prometheus_during_analysis_put_traffic_back_on_blue(
    rollouts: Rollouts, kube_tools: Tools, tmp_path: Path
) -> None:
    r, cluster = rollouts, rollouts.cluster
    with (
        gateway_exposition(NAME) as gateway,
        prometheus(kube_tools, tmp_path / "prometheus", {gateway.target: {"namespace": cluster.ns}}) as url,
    ):
        analysis = {
            "window": 60,
            "interval": 1,
            "minRequests": 10,
            "maxErrorRate": 0.1,
            "prometheus": {"url": url, "scrapeInterval": SCRAPE_SECONDS},
        }
        # The operator queries only a Prometheus its installer named: this one, now that it is up.
        r.operator.stop()
        r.operator.env["PROMPTPIPE_OPERATOR_ANALYSIS_PROMETHEUS_URLS"] = url
        r.operator.start()
        r.start_on("v1", analysis=analysis)
        gateway.calls({"OK": 50}, ttft_seconds=0.2)  # blue's calls, long before the switch
        scraped(url, gateway.target)  # Prometheus knows the counters before the switch, as a running one would
        r.apply(bg_doc({"version": "v2"}, analysis=analysis))
        wait_until(lambda: "green" in r.backends(), "green")
        cluster.set_ready(f"{NAME}-backend-green")
        wait_until(lambda: r.traffic() == "green", "the switch")
        gateway.calls({"OK": 14, "UNAVAILABLE": 6}, ttft_seconds=0.3)
        wait_until(lambda: r.traffic() == "blue", "traffic back on blue")
        rollout = wait_until(lambda: r.rollout().get("phase") == "RolledBack" and r.rollout(), "the status")
        assert rollout["reason"] == "AnalysisFailed" and "above maxErrorRate 10.0%" in rollout["message"]
        # Recorded first, then carried out in the same reconcile: traffic back, green removed.
        wait_until(lambda: r.backends() == {"blue": "v1"} and r.traffic() == "blue", "blue alone, serving")


def test_a_prometheus_or_a_tgi_image_the_installer_did_not_allow_is_refused_naming_the_field(
    rollouts: Rollouts,
) -> None:
    r, cluster = rollouts, rollouts.cluster
    r.start_on("v1")
    elsewhere = bg_doc({"version": "v2"}, analysis={"prometheus": {"url": "http://10.0.0.99:9090"}})
    miner = bg_doc({"version": "v2"})
    miner["spec"]["model"]["tgi"]["image"] = "evil.example/miner:latest"
    for doc, field in ((elsewhere, "spec.rollout.analysis.prometheus.url"), (miner, "spec.model.tgi.image")):
        r.apply(doc)

        def refused() -> dict[str, Any] | None:
            degraded = next((c for c in cluster.status(NAME).get("conditions", []) if c["type"] == "Degraded"), {})
            return degraded if degraded.get("reason") == "NotAllowed" else None

        why = wait_until(refused, f"{field} refused")
        assert why["message"].startswith(f"{field}: "), why
        assert cluster.status(NAME)["phase"] == "Failed"
        # Nothing was changed: blue still serves v1, no green was started.
        assert r.backends() == {"blue": "v1"} and r.traffic() == "blue"
        r.apply(bg_doc({"version": "v1"}))
        wait_until(lambda: cluster.status(NAME).get("phase") == "Ready", "Ready again once undone")


def test_manual_rollback_with_the_command_while_green_is_analysed(
    rollouts: Rollouts, control_plane: ControlPlane
) -> None:
    r, cluster = rollouts, rollouts.cluster
    r.start_on("v1", analysis={"window": 120})
    r.apply(bg_doc({"version": "v2"}, analysis={"window": 120}))
    wait_until(lambda: "green" in r.backends(), "green")
    cluster.set_ready(f"{NAME}-backend-green")
    wait_until(lambda: r.traffic() == "green", "the switch")
    done = subprocess.run(
        [sys.executable, "-m", "promptpipe.cli.main", "rollback", NAME, "-n", cluster.ns],
        env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "traffic on v1 (blue)" in done.stdout
    assert r.traffic() == "blue" and r.rollout()["reason"] == "ManualRollback"
    wait_until(lambda: r.backends() == {"blue": "v1"}, "green removed")


def test_an_operator_restarted_mid_rollout_finishes_it_and_leaves_no_orphans(rollouts: Rollouts) -> None:
    r, cluster = rollouts, rollouts.cluster
    r.start_on("v1")
    r.apply(bg_doc({"version": "v2"}))
    wait_until(lambda: "green" in r.backends(), "green")
    r.operator.stop()
    cluster.set_ready(f"{NAME}-backend-green")  # green became Ready while no operator ran
    r.operator.start()
    wait_until(lambda: r.traffic() == "green", "the switch after the restart")
    wait_until(lambda: r.backends() == {"green": "v2"}, "blue retired", timeout=15)
    deployments = {n for (k, n) in cluster.children(NAME) if k == "Deployment"}
    assert deployments == {f"{NAME}-{s}" for s in ("stream", "rag", "assemble", "inference", "post", "backend-green")}
    services = {n for (k, n) in cluster.children(NAME) if k == "Service" and "backend" in n}
    assert services == {f"{NAME}-backend", f"{NAME}-backend-green"}


def gateway_pod(cluster: Cluster, metrics_port: int, name: str, owned: bool = True) -> None:
    """A gateway Pod serving its metrics at 127.0.0.1:`metrics_port`: the gateway Deployment's own, or (not
    `owned`) a look-alike carrying its labels."""
    containers = [{"name": "stage", "image": "stage", "ports": [{"name": "metrics", "containerPort": metrics_port}]}]
    cluster.ready_pod(name, containers, f"{NAME}-stream", owned)


@pytest.fixture
def two_namespaces(
    rollouts_for: RolloutsFor, registry: Registry, namespace: str, kube: client.ApiClient
) -> Iterator[list[Rollouts]]:
    """One operator watching two namespaces (a tenant's each); its reconcile bound 16 s, so a smoke check may
    take 8."""
    core = client.CoreV1Api(kube)
    other = f"{namespace}-b"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    env = {**registry_env(registry.settings), "PROMPTPIPE_OPERATOR_RECONCILE_TIMEOUT_SECONDS": "16"}
    try:
        with rollouts_for([namespace, other], env, versions=5) as both:
            yield both
    finally:
        core.delete_namespace(other)


def test_a_hostile_green_in_one_namespace_neither_stalls_nor_floods_the_operator_for_another(
    two_namespaces: list[Rollouts],
) -> None:
    a, b = two_namespaces
    a.start_on("v1")
    b.start_on("v1")
    # A's green accepts the smoke generation and never answers; meanwhile B's pipeline is edited.
    a.fail_smoke("green", "stall")
    a.apply(bg_doc({"version": "v2"}))
    wait_until(lambda: "green" in a.backends(), "A's green")
    a.cluster.set_ready(f"{NAME}-backend-green")
    wait_until(lambda: a.rollout().get("phase") == "Progressing", "A's smoke check under way")
    edited = time.monotonic()
    doc = bg_doc({"version": "v1"})
    doc["spec"]["stages"]["post"] = {"timeoutSeconds": 33}
    b.apply(doc)

    def grace(r: Rollouts) -> int:
        post = r.cluster.apps.read_namespaced_deployment(f"{NAME}-post", r.cluster.ns)
        return int(post.spec.template.spec.termination_grace_period_seconds)

    wait_until(lambda: grace(b) == 38, "B's edit reconciled", timeout=30)
    b_took = time.monotonic() - edited
    stalled = wait_until(lambda: a.rollout().get("phase") == "RolledBack" and a.rollout(), "A's rollback", timeout=30)
    a_took = time.monotonic() - edited
    assert b_took < a_took and b_took < 6, (b_took, a_took)
    assert stalled["reason"] == "SmokeTestFailed" and "no whole answer within 8 s" in stalled["message"], stalled

    # A green that floods (1 GiB, unannounced), one that redirects elsewhere, one that errs with a secret in
    # its body: each fails its smoke check at once, with a reason, and nothing it sent is told.
    for version, mode, said in (
        ("v3", "flood", "the answer is larger than 65536 bytes"),
        ("v4", "redirect", "answered HTTP 307"),
        ("v5", "error", "answered HTTP 500"),
    ):
        a.fail_smoke("green", mode)
        a.apply(bg_doc({"version": version}))
        wait_until(lambda v=version: a.backends().get("green") == v, f"A's green on {version}")  # type: ignore[misc]
        a.cluster.set_ready(f"{NAME}-backend-green")
        failed = wait_until(
            lambda v=version: (r := a.rollout()).get("history", [{}])[-1].get("version") == v and r,  # type: ignore[misc]
            f"{version}'s rollback",
        )
        assert failed["phase"] == "RolledBack" and failed["reason"] == "SmokeTestFailed", failed
        assert said in failed["message"], failed
    told = json.dumps([a.cluster.status(NAME), a.cluster.events("RolledBack")])
    for sent in ("SECRET-FROM-THE-POD", "xxxxxxxx", "10.6.6.6", "generated_text"):
        assert sent not in told, sent
    # The operator never restarted, and stayed well inside its pod's memory limit (256Mi in the chart).
    op = a.operator
    assert op.proc is not None and op.proc.poll() is None
    assert psutil.Process(op.proc.pid).memory_info().rss < 256 * 2**20
