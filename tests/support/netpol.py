"""What a set of NetworkPolicies admits, asked as the test node's enforcer (`tests.devcluster.netpol`)
decides it: a connection passes when the source's egress rules and the target's ingress rules both let
it. For tests that read a pipeline's policies back from the API server and ask about every pair."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.devcluster import netpol

# The ports the project's pods name, at numbers of their own (a policy names them; only distinctness matters).
PORTS = {"grpc": 50051, "http": 8080, "stage": 50061, "metrics": 9090, "redis": 6379}
SOURCE_IP, TARGET_IP = "10.88.1.1", "10.88.1.2"


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)


def _permits(matches: list[netpol.Match] | None, ip: str, port: int, protocol: str) -> bool:
    if matches is None:
        return True  # a pod no policy selects is not isolated
    for m in matches:
        if m.protocol not in (None, protocol.lower()):
            continue
        if m.port is not None:
            low, _, high = m.port.partition(":")
            if not int(low) <= port <= int(high or low):
                continue
        if m.peer is None or m.peer == ip or (isinstance(m.peer, netpol.Block) and m.peer.contains(ip)):
            return True
    return False


def _cluster(policies: list[dict[str, Any]], *pods: netpol.Pod) -> netpol.Cluster:
    spaces = {p.namespace: {"kubernetes.io/metadata.name": p.namespace} for p in pods}
    return netpol.Cluster(pods, spaces, tuple(policies))


def _as_pod(pod: Pod, name: str, ip: str) -> netpol.Pod:
    return netpol.Pod(pod.namespace, name, pod.labels, ip, {n: ("TCP", v) for n, v in PORTS.items()})


def admits(policies: list[dict[str, Any]], source: Pod, target: Pod, port: str) -> bool:
    """Whether a connection from `source` to `target`'s named `port` is allowed."""
    src, dst = _as_pod(source, "source", SOURCE_IP), _as_pod(target, "target", TARGET_IP)
    cluster = _cluster(policies, src, dst)
    number = PORTS[port]
    return _permits(netpol.allowed(cluster, src, "Egress"), TARGET_IP, number, "TCP") and _permits(
        netpol.allowed(cluster, dst, "Ingress"), SOURCE_IP, number, "TCP"
    )


def reaches(policies: list[dict[str, Any]], source: Pod, address: str, port: int, protocol: str = "TCP") -> bool:
    """Whether `source` may open a connection to an address no pod has (the API server, DNS on a node,
    the cloud's metadata service, a server outside the cluster)."""
    src = _as_pod(source, "source", SOURCE_IP)
    return _permits(netpol.allowed(_cluster(policies, src), src, "Egress"), address, port, protocol)
