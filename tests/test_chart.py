"""The Helm chart, with the real helm CLI: lint, render, schema, and install/upgrade/uninstall
on the real kube-apiserver with the operator running as the chart's ServiceAccount."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from promptpipe.contract.crd import render as render_crd
from promptpipe.registry.store import Registry
from promptpipe.waiting import wait_until
from promptpipe_operator import rbac
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.kube import kubectl
from tests.support.kubelet import container_env
from tests.support.moto import CREDENTIALS, make_model
from tests.support.node import images_values, write_values
from tests.support.operator import OperatorProcess, service_account_kubeconfig

pytestmark = pytest.mark.helm

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "promptpipe"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.32.4"
CRD_NAME = "promptpipelines.promptpipe.io"


def helm(
    tools: Tools, *args: str, plane: ControlPlane | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    kube = [f"--kubeconfig={plane.kubeconfig}"] if plane else []
    result = subprocess.run([str(tools.helm), *kube, *args], capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def rendered(tools: Tools, *args: str) -> list[dict[str, Any]]:
    out = helm(tools, "template", "pp", str(CHART), "--kube-version", KUBE_VERSION, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_the_chart_crd_rules_and_plain_install_are_generated_from_their_one_source(kube_tools: Tools) -> None:
    assert (CHART / "crds" / f"{CRD_NAME}.yaml").read_text() == render_crd(), "run `make manifests`"
    assert (CHART / "files" / "operator-rules.yaml").read_text() == rbac.rules_yaml(), "run `make manifests`"
    for file, rules in (
        ("operator-namespaced-rules.yaml", rbac.NAMESPACED_RULES),
        ("operator-cluster-rules.yaml", rbac.CLUSTER_RULES),
    ):
        assert (CHART / "files" / file).read_text() == rbac.rules_yaml(rules), "run `make manifests`"
    assert (CHART / "files" / "leader-election-rules.yaml").read_text() == rbac.rules_yaml(
        rbac.LEADER_ELECTION_RULES
    ), "run `make manifests`"
    generated = subprocess.run(
        [sys.executable, "-m", "charts.generate"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert (ROOT / "deploy" / "install.yaml").read_text() == generated, "run `make manifests`"


@pytest.mark.parametrize("values", [None, *SCENARIOS], ids=lambda v: v.name if v else "defaults")
def test_lint_and_template_every_scenario(kube_tools: Tools, values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    helm(kube_tools, "lint", "--strict", str(CHART), *extra)
    docs = rendered(kube_tools, *extra)
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    watched = (yaml.safe_load(values.read_text()) if values else {}).get("operator", {}).get("watchNamespaces")
    roles = {
        d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role" and d["rules"] != rbac.LEADER_ELECTION_RULES
    }
    if watched:  # a Role in each watched namespace; cluster-wide only what no Role can grant
        assert role["rules"] == rbac.CLUSTER_RULES
        assert set(roles) == set(watched) and all(r["rules"] == rbac.NAMESPACED_RULES for r in roles.values())
        bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
        assert set(watched) <= bindings
    else:
        assert role["rules"] == rbac.RULES, "the chart's ClusterRole is exactly the operator's rules"
        assert not roles
    lease_role = next(d for d in docs if d["kind"] == "Role" and d["rules"] == rbac.LEADER_ELECTION_RULES)
    assert lease_role["rules"] == rbac.LEADER_ELECTION_RULES
    assert (
        lease_role["metadata"]["namespace"]
        == next(d for d in docs if d["kind"] == "Deployment")["metadata"]["namespace"]
    ), "the Lease permission is only in the operator's namespace"
    operator = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert operator["securityContext"]["runAsNonRoot"] is True
    assert operator["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_monitoring_scenario_adds_service_monitors_and_the_dashboard(kube_tools: Tools) -> None:
    docs = rendered(kube_tools, "-f", str(CHART / "ci" / "monitoring-values.yaml"))
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2 and monitors[1]["spec"]["namespaceSelector"] == {"any": True}
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap")
    assert "promptpipe_stage_queue_depth" in dashboard["data"]["promptpipe-pipelines.json"]
    assert not [d for d in rendered(kube_tools) if d["kind"] in ("ServiceMonitor", "ConfigMap")], "off by default"


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_registry_values_reach_the_operator_environment(kube_tools: Tools) -> None:
    default = operator_container(rendered(kube_tools))
    names = {e["name"]: e.get("value") for e in default["env"]}
    assert names["PROMPTPIPE_REGISTRY_BUCKET"] == names["PROMPTPIPE_REGISTRY_TABLE"] == "promptpipe-models"
    assert "PROMPTPIPE_REGISTRY_ENDPOINT_URL" not in names and "PROMPTPIPE_REGISTRY_REGION" not in names, (
        "unset values leave boto3's own chain (IRSA's AWS_REGION) in charge"
    )
    assert "envFrom" not in default and "PROMPTPIPE_OPERATOR_REGISTRY_SECRET" not in names

    container = operator_container(rendered(kube_tools, "-f", str(CHART / "ci" / "registry-values.yaml")))
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["PROMPTPIPE_REGISTRY_BUCKET"] == "acme-models" and env["PROMPTPIPE_REGISTRY_TABLE"] == "acme-models"
    assert env["PROMPTPIPE_REGISTRY_REGION"] == "eu-west-1"
    assert env["PROMPTPIPE_REGISTRY_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
    assert env["PROMPTPIPE_REGISTRY_PREFIX"] == "prod/"
    assert env["PROMPTPIPE_OPERATOR_REGISTRY_SECRET"] == "registry-keys"
    assert env["PROMPTPIPE_OPERATOR_BACKEND_SERVICE_ACCOUNT"] == "tgi"
    assert container["envFrom"] == [{"secretRef": {"name": "operator-registry-keys"}}]


def test_the_optional_quota_store_runs_with_a_password_only_the_gateways_reach_it_and_off_by_default(
    kube_tools: Tools,
) -> None:
    assert not [d for d in rendered(kube_tools) if "quota-store" in d["metadata"]["name"]], "off by default"
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered(kube_tools, "--set", "quotaStore.enabled=true")}
    name = "pp-promptpipe-quota-store"
    secret = docs["Secret", name]["stringData"]
    assert len(secret["password"]) == 32
    assert secret["url"] == f"redis://:{secret['password']}@{name}.default.svc:6379/0"
    pod = docs["Deployment", name]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "docker.io/valkey/valkey:8.1"
    args = container["args"]
    # The password from the Secret, never in the manifest; nothing kept on disk.
    assert args[args.index("--requirepass") + 1] == "$(STORE_PASSWORD)"
    assert container["env"] == [
        {"name": "STORE_PASSWORD", "valueFrom": {"secretKeyRef": {"name": name, "key": "password"}}}
    ]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["automountServiceAccountToken"] is False
    selector = docs["Deployment", name]["spec"]["selector"]["matchLabels"]
    assert docs["Service", name]["spec"]["selector"] == selector
    assert docs["NetworkPolicy", name]["spec"]["podSelector"]["matchLabels"] == selector
    # Its pods are not the operator's: no selector of the operator's (Deployment, metrics Service) takes them.
    operator = docs["Deployment", "pp-promptpipe"]["spec"]["selector"]["matchLabels"]
    labels = docs["Deployment", name]["spec"]["template"]["metadata"]["labels"]
    assert not operator.items() <= labels.items()
    assert not docs["Service", "pp-promptpipe-metrics"]["spec"]["selector"].items() <= labels.items()
    (rule,) = docs["NetworkPolicy", name]["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer == {
        "namespaceSelector": {},
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": "promptpipe", "app.kubernetes.io/component": "stream"}
        },
    }
    own = rendered(kube_tools, "--set", "quotaStore.enabled=true,quotaStore.passwordSecret=store-password")
    assert not [d for d in own if d["kind"] == "Secret"], "a Secret of the user's: the chart makes none"
    store = next(d for d in own if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
    env = store["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"]["name"] == "store-password"


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("operator.resyncSeconds=soon", "operator.resyncSeconds"),
        ("registry.endpointUrl=minio:9000", "registry.endpointUrl"),
        ("registry.bucket=Models_1", "registry.bucket"),
        ("registry.backendCredentialsSecret=Keys", "registry.backendCredentialsSecret"),
        ("operator.logFormat=xml", "operator.logFormat"),
        ("operator.leaderElection=false,operator.replicas=2", "operator.replicas"),
        ("operator.image.pullPolicy=Sometimes", "operator.image.pullPolicy"),
        ("operator.colour=blue", "colour"),
        ("pipelines.prometheusAddress=prometheus:9090", "pipelines.prometheusAddress"),
        ("quotaStore.maxMemory=lots", "quotaStore.maxMemory"),
    ],
)
def test_values_schema_refuses_wrong_values_naming_the_field(kube_tools: Tools, setting: str, field: str) -> None:
    result = helm(
        kube_tools, "template", "pp", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting, check=False
    )
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr and field in result.stderr


@pytest.mark.controlplane
def test_install_runs_the_operator_under_the_charts_identity_then_upgrade_and_uninstall(
    control_plane: ControlPlane,
    kube_tools: Tools,
    kube: client.ApiClient,
    namespace: str,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ext, core = client.ApiextensionsV1Api(kube), client.CoreV1Api(kube)
    authz, apps = client.RbacAuthorizationV1Api(kube), client.AppsV1Api(kube)
    # Helm installs crds/ only when the CRD is absent: start from a cluster without it.
    if any(c.metadata.name == CRD_NAME for c in ext.list_custom_resource_definition().items):
        ext.delete_custom_resource_definition(CRD_NAME)
        wait_until(
            lambda: all(c.metadata.name != CRD_NAME for c in ext.list_custom_resource_definition().items),
            "the old CRD to be gone",
            timeout=60,
        )
    release_ns = f"{namespace}-sys"
    # The blue-green example follows a registry alias; the operator gets the registry and its keys only
    # from the chart (a Secret in the release namespace), not from this test's environment.
    registry.push("qwen2-5-7b", make_model(tmp_path / "model"), "v1")
    registry.promote("qwen2-5-7b", "v1", "prod")
    for key in CREDENTIALS:
        monkeypatch.delenv(key)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=release_ns)))
    core.create_namespaced_secret(
        release_ns,
        client.V1Secret(metadata=client.V1ObjectMeta(name="operator-registry-keys"), string_data=CREDENTIALS),
    )
    settings = registry.settings
    helm(
        kube_tools,
        "install",
        "promptpipe",
        str(CHART),
        "-n",
        release_ns,
        "--wait=false",
        "--set",
        f"operator.watchNamespaces={{{namespace}}}",
        "--set",
        f"registry.bucket={settings.bucket},registry.table={settings.table},registry.region=us-east-1",
        "--set",
        f"registry.endpointUrl={settings.endpoint_url},registry.backendCredentialsSecret=registry-keys",
        "--set",
        "registry.operatorCredentialsSecret=operator-registry-keys,pipelines.backendServiceAccount=tgi",
        plane=control_plane,
    )
    try:
        crd = wait_until(
            lambda: next(
                (
                    c
                    for c in ext.list_custom_resource_definition().items
                    if c.metadata.name == CRD_NAME
                    and any(s.type == "Established" and s.status == "True" for s in c.status.conditions or [])
                ),
                None,
            ),
            "the CRD served",
        )
        assert crd.spec.names.short_names == ["pp"]
        deployment = apps.read_namespaced_deployment("promptpipe", release_ns)
        env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
        assert env["PROMPTPIPE_OPERATOR_NAMESPACES"] == namespace
        account = deployment.spec.template.spec.service_account_name
        assert env["PROMPTPIPE_OPERATOR_LEADER_ELECTION"] == "true"

        # No kubelet runs the operator's pod here: run the operator as that pod would, with its identity and
        # the environment the kubelet would give it (the chart's env and envFrom, resolved from the API
        # server), electing a leader on the chart's Lease in the release namespace.
        pod = client.ApiClient().sanitize_for_serialization(deployment.spec.template.spec)
        pod_env = container_env(core, release_ns, pod["containers"][0], pod_name="promptpipe-0")
        harness = {"PROMPTPIPE_OPERATOR_METRICS_PORT", "PROMPTPIPE_OPERATOR_LIVENESS_ENDPOINT"}
        identity = service_account_kubeconfig(control_plane, tmp_path, release_ns, account)
        op = OperatorProcess(
            identity,
            namespace,
            tmp_path / "operator.log",
            lease=env["PROMPTPIPE_OPERATOR_LEASE_NAME"],
            lease_namespace=release_ns,
            env={k: v for k, v in pod_env.items() if k not in harness},
        )
        op.start()
        try:
            objects = client.CustomObjectsApi(kube)
            for example in ("quickstart.yaml", "blue-green.yaml"):
                doc = yaml.safe_load((ROOT / "deploy" / "examples" / example).read_text())
                objects.create_namespaced_custom_object("promptpipe.io", "v1alpha1", namespace, "promptpipelines", doc)
            wait_until(lambda: op.metric("promptpipe_operator_leader") == 1, "the operator to lead")
            wait_until(
                lambda: (
                    len(
                        apps.list_namespaced_deployment(
                            namespace, label_selector="app.kubernetes.io/instance=quickstart"
                        ).items
                    )
                    == 5
                ),
                "the example reconciled by the chart's identity",
            )
            status = wait_until(
                lambda: (
                    objects.get_namespaced_custom_object(
                        "promptpipe.io", "v1alpha1", namespace, "promptpipelines", "assistant-bg"
                    ).get("status")
                    or {}
                ).get("activeVersion"),
                "the alias resolved in the chart's registry",
                timeout=30,
            )
            assert status == "v1"
            tgi = apps.read_namespaced_deployment("assistant-bg-backend-blue", namespace).spec.template.spec
            assert tgi.service_account_name == "tgi"
            fetch = tgi.init_containers[0]
            # The AWS keys of the chart's Secret, one by one, never the whole Secret as environment.
            assert not fetch.env_from
            from_secret = {e.name: e.value_from.secret_key_ref.name for e in fetch.env if e.value_from}
            assert from_secret == dict.fromkeys(
                ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"), "registry-keys"
            )
            fetch_env = {e.name: e.value for e in fetch.env}
            assert fetch_env["PROMPTPIPE_REGISTRY_BUCKET"] == settings.bucket
            assert fetch_env["PROMPTPIPE_REGISTRY_ENDPOINT_URL"] == settings.endpoint_url
        finally:
            op.stop()
        who = f"--as=system:serviceaccount:{release_ns}:{account}"
        for verb, resource in (("get", "secrets"), ("create", "pods"), ("delete", "namespaces")):
            can = kubectl(control_plane, kube_tools, "auth", "can-i", verb, resource, "-n", namespace, who, check=False)
            assert can.stdout.strip() == "no", (verb, resource)
        # Watching one namespace, the operator's rights end at it: a Role there, not a ClusterRole.
        for verb, resource in (("patch", "deployments.apps"), ("list", "promptpipelines.promptpipe.io")):
            for where, expected in ((namespace, "yes"), ("default", "no"), (release_ns, "no")):
                can = kubectl(control_plane, kube_tools, "auth", "can-i", verb, resource, "-n", where, who, check=False)
                assert can.stdout.strip() == expected, (verb, resource, where)
        # And as the operator itself, with its own token: the API server refuses it outside.
        for where, refused in ((namespace, False), ("default", True)):
            got = subprocess.run(
                [str(kube_tools.kubectl), f"--kubeconfig={identity}", "get", "deployments", "-n", where],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert (got.returncode != 0 and "Forbidden" in got.stderr) is refused, (where, got.stderr)

        helm(
            kube_tools,
            "upgrade",
            "promptpipe",
            str(CHART),
            "-n",
            release_ns,
            "--reuse-values",
            "--set",
            "operator.resyncSeconds=5",
            plane=control_plane,
        )
        env = {
            e.name: e.value
            for e in apps.read_namespaced_deployment("promptpipe", release_ns).spec.template.spec.containers[0].env
        }
        assert env["PROMPTPIPE_OPERATOR_RESYNC_SECONDS"] == "5"
        assert env["PROMPTPIPE_OPERATOR_NAMESPACES"] == namespace, "reused values kept"
    finally:
        helm(kube_tools, "uninstall", "promptpipe", "-n", release_ns, "--wait", plane=control_plane)
    labelled = "app.kubernetes.io/instance=promptpipe"
    assert not authz.list_cluster_role(label_selector=labelled).items
    assert not authz.list_cluster_role_binding(label_selector=labelled).items
    assert not authz.list_namespaced_role(release_ns).items and not authz.list_namespaced_role_binding(release_ns).items
    assert not apps.list_namespaced_deployment(release_ns).items
    assert not [s for s in core.list_namespaced_service_account(release_ns).items if s.metadata.name == "promptpipe"]
    # Helm never deletes what crds/ installed (pipelines would go with it): the CRD stays, as documented.
    assert any(c.metadata.name == CRD_NAME for c in ext.list_custom_resource_definition().items)
    core.delete_namespace(release_ns)


@pytest.mark.controlplane
def test_the_plain_install_is_accepted_by_the_api_server(
    control_plane: ControlPlane, kube_tools: Tools, kube: client.ApiClient
) -> None:
    core = client.CoreV1Api(kube)
    if not any(n.metadata.name == "promptpipe-system" for n in core.list_namespace().items):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="promptpipe-system")))
    result = kubectl(
        control_plane,
        kube_tools,
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-f",
        str(ROOT / "deploy" / "install.yaml"),
    )
    assert result.stdout.count("(server dry run)") == 10


@pytest.mark.parametrize("tag", ["2245820300176e16", "0123456789abcdef", "1234567890123456"])
def test_the_harness_values_file_names_an_image_tag_of_hex_digits_as_helm_must_read_it(
    kube_tools: Tools, tmp_path: Path, tag: str
) -> None:
    # A content hash that reads as a number in YAML 1.2 (CI met 2245820300176e16: "operator.image.tag: Invalid
    # type. Expected: string, given: integer").
    images = {key: f"localhost/promptpipe/{key}:{tag}" for key in ("operator", "stage", "tgi")}
    values = write_values(tmp_path / "my-images.yaml", images_values(images, "http://10.88.0.1:9091"))
    out = helm(kube_tools, "template", "pp", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(values)).stdout
    assert (
        f"image: localhost/promptpipe/operator:{tag}" in out or f'image: "localhost/promptpipe/operator:{tag}"' in out
    )
