"""The operator's permissions: the one source for the ClusterRole in deploy/ and the Helm chart.

Every rule is here because a call in the operator needs it; the integration tests
run the operator with exactly this role, and check that it is refused the rest.
`python -m promptpipe_operator.rbac [--namespaced | --cluster | --leader-election]` prints the
rules the Helm chart's roles include (charts/promptpipe/files/), and so deploy/install.yaml,
rendered from the chart.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from promptpipe.contract.spec import GROUP, PLURAL
from promptpipe_operator.render import DISCOVERY_RULE

NAME = "promptpipe-operator"
# Children are applied server-side (patch; create when absent), listed to find
# strays, deleted when the spec no longer has them, and watched to repair drift.
_CHILD_VERBS = ["list", "watch", "create", "patch", "delete"]

# What the operator does inside the namespaces it watches: a ClusterRole's rules when it watches all of
# them, a Role's in each one when the chart's watchNamespaces names them (outside, it gets 403).
NAMESPACED_RULES: list[dict[str, Any]] = [
    # The pipelines: read them, and kopf keeps its handled-state in their annotations.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": _CHILD_VERBS},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _CHILD_VERBS},
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": _CHILD_VERBS},
    # The inference stage's own account and Role, for finding the TGI pods it routes to; the operator
    # holds what that Role grants (RBAC lets it grant no more).
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": _CHILD_VERBS},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": _CHILD_VERBS},
    DISCOVERY_RULE,
    # Each pipeline's NetworkPolicies: who may reach which of its pods.
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": _CHILD_VERBS},
    # Each multi-replica stage's PodDisruptionBudget: a drain takes one pod at a time.
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": _CHILD_VERBS},
    # A rollout finds the Ready gateway pods' /metrics here, and reads why green's pods do not serve: the
    # pods of a Deployment's ReplicaSets, by ownership (labels can be copied onto anyone's pod).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list"]},
    # Events on the pipelines, for `kubectl describe`.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
# What only a ClusterRole can grant, needed either way: kopf notices CRDs and namespaces appearing
# (KEDA installed after the operator, a namespace matching --namespace created later).
CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    # The cluster's service-account issuer and its public keys, copied to each pipeline for stage identity
    # (most clusters grant these to every ServiceAccount already; said here so that none has to).
    {"nonResourceURLs": ["/.well-known/openid-configuration", "/openid/v1/jwks"], "verbs": ["get"]},
    # The API server's endpoints (the slice it keeps for its `kubernetes` Service in `default`): the inference
    # stage's NetworkPolicy lets it reach them, for replica discovery, and nothing else of the API's.
    {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "resourceNames": ["kubernetes"],
        "verbs": ["get"],
    },
]
RULES: list[dict[str, Any]] = [*NAMESPACED_RULES, *CLUSTER_RULES]


# A namespaced Role in the operator's own namespace: the leader-election Lease
# (read, created by the first replica, renewed and handed over with update).
LEADER_ELECTION_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
]


def cluster_role(name: str = NAME, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": NAME}},
        "rules": RULES if rules is None else rules,
    }


def service_account(namespace: str, name: str = NAME) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}


def cluster_role_binding(namespace: str, name: str = NAME, account: str = NAME) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }


def rules_yaml(rules: list[dict[str, Any]] | None = None) -> str:
    """Rules alone, for the Helm chart's role templates (charts/promptpipe/files/)."""
    header = "# Generated by `python -m promptpipe_operator.rbac` (make manifests); do not edit.\n"
    return header + yaml.safe_dump(RULES if rules is None else rules, sort_keys=False)


_WHICH = {
    "": RULES,
    "--leader-election": LEADER_ELECTION_RULES,
    "--namespaced": NAMESPACED_RULES,
    "--cluster": CLUSTER_RULES,
}

if __name__ == "__main__":
    sys.stdout.write(rules_yaml(_WHICH[" ".join(sys.argv[1:])]))
