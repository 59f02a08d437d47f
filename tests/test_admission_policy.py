"""The chart's admission policy on the real API server: a pipeline may name only Secrets its author may
read, and only such an author may change where one is sent (the API server's own authorizer decides, as the
user making the request)."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.cluster import QUICKSTART
from tests.support.kube import kubectl

pytestmark = [pytest.mark.controlplane, pytest.mark.helm]

CHART = Path(__file__).resolve().parents[1] / "charts" / "promptpipe"
AUTHOR = "alice@example.com"
# May edit pipelines, may read no Secret.
EDITOR = "mallory@example.com"
POLICY = "templates/admissionpolicy.yaml"
KEY_FILE = QUICKSTART["spec"]["auth"]["apiKeysSecret"]["name"]


@pytest.fixture
def policy(control_plane: ControlPlane, kube_tools: Tools, promptpipe_crd: None) -> Iterator[str]:
    """The chart's policy and binding, applied as `helm install` would; removed after the test."""
    rendered = subprocess.run(
        [str(kube_tools.helm), "template", "pp", str(CHART), "--kube-version", "1.32.4", "--show-only", POLICY],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    kubectl(control_plane, kube_tools, "apply", "-f", "-", stdin=rendered)
    try:
        yield rendered
    finally:
        kubectl(control_plane, kube_tools, "delete", "-f", "-", "--ignore-not-found", stdin=rendered)


@pytest.fixture
def secrets(kube: client.ApiClient, namespace: str) -> None:
    """The Secrets a pipeline might name: the one meant for it (llm-key) and one that is not."""
    for secret in ("llm-key", "database-password"):
        client.CoreV1Api(kube).create_namespaced_secret(
            namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=secret), string_data={"key": "k"})
        )


def with_key_secret(name: str, secret: str) -> dict[str, Any]:
    doc = copy.deepcopy(QUICKSTART)
    doc["metadata"]["name"] = name
    doc["spec"]["model"] = {
        "name": "gpt-small",
        "backend": "openai",
        "openai": {"endpoints": ["http://llm:8000/v1"], "apiKeySecret": {"name": secret, "key": "key"}},
    }
    return doc


def test_a_pipeline_may_name_only_a_secret_its_author_can_read(
    policy: str, secrets: None, control_plane: ControlPlane, kube_tools: Tools, kube: client.ApiClient, namespace: str
) -> None:
    rbac = client.RbacAuthorizationV1Api(kube)
    # Alice may manage pipelines, and read the Secrets meant for them (the OpenAI key; the quickstart's
    # gateway key file).
    pipelines = _rule(["promptpipelines"], ["get", "create", "patch"], "promptpipe.io")
    grant(
        rbac,
        namespace,
        "pipeline-author",
        AUTHOR,
        [pipelines, _rule(["secrets"], ["get"], names=["llm-key", KEY_FILE])],
    )

    def apply_as_alice(doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        args = ("apply", "-n", namespace, f"--as={AUTHOR}", "-f", "-")
        return kubectl(control_plane, kube_tools, *args, stdin=yaml.safe_dump(doc), check=False)

    # The policy takes effect once the API server has loaded it: retry the allowed case until it answers
    # as the policy says for the refused one.
    attempts = iter(range(1000))

    def refused() -> subprocess.CompletedProcess[str] | None:
        # A new pipeline each time: one created before the policy was loaded would not be judged again.
        result = apply_as_alice(with_key_secret(f"exfiltrate-{next(attempts)}", "database-password"))
        # Only the policy's own refusal counts: an apply failing for another reason (the API server still
        # loading the CRD or the policy) is tried again.
        return result if result.returncode != 0 and "may not read Secret" in result.stderr else None

    denied = wait_until(refused, "the policy to refuse a Secret alice may not read", timeout=30)
    assert "spec.model.openai.apiKeySecret.name: alice@example.com may not read Secret database-password" in (
        denied.stderr
    ), denied.stderr
    allowed = apply_as_alice(with_key_secret("assistant", "llm-key"))
    assert allowed.returncode == 0, allowed.stderr
    # Changing it to another Secret is judged again.
    moved = apply_as_alice(with_key_secret("assistant", "database-password"))
    assert moved.returncode != 0 and "may not read Secret database-password" in moved.stderr
    # Writes that leave the Secret alone are not judged (as the operator's own): one by a user who may
    # read no Secret at all passes.
    grant(rbac, namespace, "annotator", "bob", [_rule(["promptpipelines"], ["get", "patch"], "promptpipe.io")])
    annotated = kubectl(
        control_plane,
        kube_tools,
        "annotate",
        "-n",
        namespace,
        "pp",
        "assistant",
        "example.com/reviewed=yes",
        "--as=bob",
        check=False,
    )
    assert annotated.returncode == 0, annotated.stderr


def _rule(resources: list[str], verbs: list[str], group: str = "", names: list[str] | None = None) -> Any:
    return client.V1PolicyRule(api_groups=[group], resources=resources, verbs=verbs, resource_names=names)


def grant(rbac: client.RbacAuthorizationV1Api, namespace: str, role: str, user: str, rules: list[Any]) -> None:
    rbac.create_namespaced_role(namespace, client.V1Role(metadata=client.V1ObjectMeta(name=role), rules=rules))
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name=role),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=role),
            subjects=[client.RbacV1Subject(kind="User", name=user, api_group="rbac.authorization.k8s.io")],
        ),
    )


def test_a_pipeline_editor_who_may_not_read_its_secrets_cannot_send_them_elsewhere(
    policy: str, secrets: None, control_plane: ControlPlane, kube_tools: Tools, kube: client.ApiClient, namespace: str
) -> None:
    rbac = client.RbacAuthorizationV1Api(kube)
    grant(rbac, namespace, "pipeline-editor", EDITOR, [_rule(["promptpipelines"], ["get", "patch"], "promptpipe.io")])
    # The admin (who may read every Secret) sets up two pipelines naming the key: one sending it, one that
    # names it but runs the embedded model, so the key goes nowhere yet.
    kubectl(
        control_plane,
        kube_tools,
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump(with_key_secret("assistant", "llm-key")),
    )
    dormant = with_key_secret("dormant", "llm-key")
    dormant["spec"]["model"]["backend"] = "llamacpp"
    kubectl(control_plane, kube_tools, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(dormant))

    def patch_as_editor(name: str, spec: dict[str, Any], *dry_run: str) -> subprocess.CompletedProcess[str]:
        patch = json.dumps({"spec": spec})
        args = ("patch", "-n", namespace, "pp", name, "--type=merge", f"--as={EDITOR}", "-p", patch, *dry_run)
        return kubectl(control_plane, kube_tools, *args, check=False)

    # Until the API server has loaded the policy, the first refusal is waited for, on a dry run: a patch
    # let through before the policy was loaded would change the pipeline, and the same patch again would
    # then change nothing and never be judged.
    def refused(name: str, spec: dict[str, Any]) -> subprocess.CompletedProcess[str] | None:
        result = patch_as_editor(name, spec, "--dry-run=server")
        return result if result.returncode != 0 and "may not read Secret" in result.stderr else None

    evil = {"model": {"openai": {"endpoints": ["https://collector.example.net/v1"]}}}
    wait_until(lambda: refused("assistant", evil), "the policy to refuse moving the key", timeout=30)
    moved = patch_as_editor("assistant", evil)
    assert moved.returncode != 0
    assert f"spec.model.openai.apiKeySecret.name: {EDITOR} may not read Secret llm-key" in moved.stderr, moved.stderr
    # Turning on the backend that sends it is deciding where it goes, too.
    woken = patch_as_editor("dormant", {"model": {"backend": "openai"}})
    assert woken.returncode != 0 and "may not read Secret llm-key" in woken.stderr, woken.stderr
    # The gateway's key file and its TLS key: naming one the editor may not read is refused, naming the field.
    for spec, field in (
        ({"auth": {"apiKeysSecret": {"name": "database-password", "key": "key"}}}, "spec.auth.apiKeysSecret.name"),
        ({"tls": {"secretName": "database-password"}}, "spec.tls.secretName"),
        (
            {"auth": {"quotaStore": {"urlSecret": {"name": "database-password", "key": "url"}}}},
            "spec.auth.quotaStore.urlSecret.name",
        ),
    ):
        named = patch_as_editor("assistant", spec)
        assert named.returncode != 0 and f"{field}: {EDITOR} may not read Secret database-password" in named.stderr
    # Nothing of the above reached the stored pipelines.
    stored = json.loads(kubectl(control_plane, kube_tools, "get", "-n", namespace, "pp", "-o", "json").stdout)
    models = {item["metadata"]["name"]: item["spec"]["model"] for item in stored["items"]}
    assert models["assistant"]["openai"]["endpoints"] == ["http://llm:8000/v1"]
    assert models["dormant"]["backend"] == "llamacpp"
    # What leaves the Secrets' destinations alone is the editor's to change: a stage's scaling, and turning
    # the OpenAI backend off (the key then goes nowhere).
    scaled = patch_as_editor("assistant", {"stages": {"post": {"scaling": {"maxReplicas": 3}}}})
    assert scaled.returncode == 0, scaled.stderr
    off = patch_as_editor("assistant", {"model": {"backend": "llamacpp"}})
    assert off.returncode == 0, off.stderr
