"""Where a pipeline's pods may open connections, as NetworkPolicy egress rules (pure).

A URL the spec names (a backend, the tracing collector, the registry) becomes a rule by the kind of its
host: an address → that address and port; a Service name (`name.namespace.svc[.cluster.local]`) → pods of
that namespace, on any port (a Service's port need not be its pods', and policies see the pods'); one
label → pods of the pipeline's own namespace; any other name → any address outside the link-local range
(the cloud's metadata service) and the API server, on the URL's port, since a policy cannot name a host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from promptpipe.contract.spec import EgressRule

NAMESPACE_LABEL = "kubernetes.io/metadata.name"
# Link-local: the metadata services of EC2, GCE and Azure (169.254.169.254, fd00:ec2::254) and node-local
# agents live there.
LINK_LOCAL = ("169.254.0.0/16",)
LINK_LOCAL_V6 = ("fe80::/10", "fd00:ec2::254/128")
DNS: dict[str, Any] = {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}

# scheme://[user@]host[:port]...: the parts a rule needs (urllib stays out of the pure modules).
URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?:[^@/?#]*@)?(?P<host>\[[^\]]+\]|[^:/?#]+)(?::(?P<port>\d+))?")
Address = tuple[str, int]  # an IP and a port: the API server's endpoints


def in_namespace(namespace: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: namespace}}}


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in sorted(set(ports))]


def anywhere_outside(api_server: Sequence[Address]) -> list[dict[str, Any]]:
    """Every address but the link-local ranges and the API server's: a host name's possible addresses."""
    v4 = [a for a, _ in api_server if ipaddress.ip_address(a).version == 4]
    v6 = [a for a, _ in api_server if ipaddress.ip_address(a).version == 6]
    return [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": [*LINK_LOCAL, *(f"{a}/32" for a in sorted(set(v4)))]}},
        {"ipBlock": {"cidr": "::/0", "except": [*LINK_LOCAL_V6, *(f"{a}/128" for a in sorted(set(v6)))]}},
    ]


def to_url(url: str, api_server: Sequence[Address] = ()) -> dict[str, Any]:
    """The rule that lets a pod call `url`, and as little else as a NetworkPolicy can say."""
    parts = URL.match(url)
    if parts is None:
        raise ValueError(f"not a URL: {url!r}")
    host = parts["host"].strip("[]").rstrip(".").lower()
    port = int(parts["port"]) if parts["port"] else (443 if parts["scheme"] in ("https", "rediss") else 80)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        labels = host.split(".")
        if len(labels) >= 3 and labels[2] == "svc":
            return {"to": [in_namespace(labels[1])]}
        if len(labels) == 1:
            return {"to": [{"podSelector": {}}]}
        return {"to": anywhere_outside(api_server), "ports": _tcp(port)}
    prefix = 32 if address.version == 4 else 128
    return {"to": [{"ipBlock": {"cidr": f"{address}/{prefix}"}}], "ports": _tcp(port)}


def to_api_server(api_server: Sequence[Address]) -> dict[str, Any]:
    """The API server's endpoints (what the `kubernetes` Service leads to: policies see past Services)."""
    prefix = {4: 32, 6: 128}
    blocks = sorted({f"{a}/{prefix[ipaddress.ip_address(a).version]}" for a, _ in api_server})
    return {"to": [{"ipBlock": {"cidr": b}} for b in blocks], "ports": _tcp(*(p for _, p in api_server))}


def declared(rule: EgressRule) -> dict[str, Any]:
    """A `spec.network.egress` rule as a NetworkPolicy's."""
    out: dict[str, Any] = {}
    if rule.to:
        out["to"] = [p.model_dump(by_alias=True, exclude_none=True, mode="json") for p in rule.to]
    if rule.ports:
        out["ports"] = [p.model_dump(by_alias=True, exclude_none=True, mode="json") for p in rule.ports]
    return out
