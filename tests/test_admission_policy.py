"""The chart's admission policy on the real API server: a pipeline may name only an API-key Secret its
author may read (the API server's own authorizer decides, as the user making the request)."""

from __future__ import annotations

import copy
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
POLICY = "templates/admissionpolicy.yaml"


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
    policy: str, control_plane: ControlPlane, kube_tools: Tools, kube: client.ApiClient, namespace: str
) -> None:
    core, rbac = client.CoreV1Api(kube), client.RbacAuthorizationV1Api(kube)
    for secret in ("llm-key", "database-password"):
        core.create_namespaced_secret(
            namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=secret), string_data={"key": "k"})
        )
    # Alice may manage pipelines, and read the one Secret meant for them.
    pipelines = _rule(["promptpipelines"], ["get", "create", "patch"], "promptpipe.io")
    grant(rbac, namespace, "pipeline-author", AUTHOR, [pipelines, _rule(["secrets"], ["get"], names=["llm-key"])])

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
