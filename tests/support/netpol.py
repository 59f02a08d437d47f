"""What a set of NetworkPolicies admits, as a CNI that enforces them decides it (ingress only).

The test node's CNI does not enforce policies, so the tests read the operator's policies back from the API
server and ask this: Kubernetes' semantics for the parts the operator uses (matchLabels selectors, ports
by name). Anything else in a policy fails loudly rather than be judged wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    unknown = set(selector) - {"matchLabels"}
    if unknown:
        raise NotImplementedError(f"selector keys {sorted(unknown)}")
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_admits(peer: dict[str, Any], policy_namespace: str, source: Pod) -> bool:
    unknown = set(peer) - {"podSelector", "namespaceSelector"}
    if unknown:
        raise NotImplementedError(f"peer keys {sorted(unknown)}")
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": source.namespace}
        if not _matches(peer["namespaceSelector"], ns_labels):
            return False
    elif source.namespace != policy_namespace:
        return False  # a podSelector alone selects pods of the policy's namespace
    return "podSelector" not in peer or _matches(peer["podSelector"], source.labels)


def admits(policies: list[dict[str, Any]], source: Pod, target: Pod, port: str) -> bool:
    """Whether a connection from `source` to `target`'s named `port` is allowed."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _matches(p["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True  # a pod no policy selects is not isolated
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports is not None and port not in [p["port"] for p in ports]:
                continue
            peers = rule.get("from")
            if peers is None or any(_peer_admits(peer, policy["metadata"]["namespace"], source) for peer in peers):
                return True
    return False
