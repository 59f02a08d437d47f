"""The test node's NetworkPolicy enforcer: the policies, pods and namespaces the API server holds, made
into iptables rules in the node's network namespace, as a CNI's policy agent does it.

Why our own: the SIG Network reference (kube-network-policies) queues packets with nftables' `queue`
statement, which this kernel is built without (CONFIG_NFT_QUEUE), and kube-router's release on the Go
proxy is flagged for security flaws. iptables and conntrack are here, and a node this size needs nothing
faster than one rule per (pod, allowed peer, port).

What a packet meets (filter table, FORWARD for pod-to-pod, INPUT for pod-to-node, e.g. the API server
and DNS behind their Services): replies of allowed connections pass; a new connection from a pod some
policy isolates for egress must match one of its egress rules, one to a pod isolated for ingress one of
its ingress rules, else it is refused (an ICMP port-unreachable, so a client fails at once). The node's
own processes (the kubelet's probes, Prometheus, the tests' forwarders) reach pods through OUTPUT,
which no policy covers, as on a cluster where the host is trusted.

Kubernetes' semantics (networking.k8s.io/v1): a pod is isolated in a direction when a policy of its
namespace selects it with that policy type; the rules of every policy selecting it add up; a missing or
empty `from`/`to` means every peer, missing `ports` every port; a port by name is the destination pod's
container port of that name; `ipBlock.except` carves out of its `cidr`; host-network pods are not
selected. `rules` is pure; `main` polls the API server and applies what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import logging
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TOP = "PP-NETPOL"
PREFIX = "PP-"
HOOKS = ("FORWARD", "INPUT")
# A mark bit of our own (kube-proxy uses 0x4000 and 0x8000): set when a packet matches an allowed peer.
ALLOWED = "0x200000"
CLEAR = f"{int(ALLOWED, 16) ^ 0xFFFFFFFF:#x}"
REFUSE = "-j REJECT --reject-with icmp-port-unreachable"


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    ip: str = ""
    # Container port name → (protocol, number): what a policy's port by name means for this pod.
    ports: dict[str, tuple[str, int]] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against labels; an empty one selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"selector operator {op!r}")
    return True


@dataclass(frozen=True)
class Block:
    cidr: str
    excepts: tuple[str, ...] = ()

    def contains(self, ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        if address not in ipaddress.ip_network(self.cidr, strict=False):
            return False
        return not any(address in ipaddress.ip_network(e, strict=False) for e in self.excepts)


@dataclass(frozen=True)
class Match:
    """One allowed (peer, port) of a pod's rules, as iptables match arguments: `peer` is an address
    (`-s`/`-d`) or a Block; `port` None for every port."""

    peer: str | Block | None  # None: any address
    protocol: str | None = None
    port: str | None = None  # "80" or "8000:8080"


def _ports(rule_ports: list[dict[str, Any]] | None, target: Pod | None) -> list[tuple[str | None, str | None]]:
    """A rule's ports as (protocol, port) pairs for connections to `target` (needed for ports by name;
    None: any pod, when the peer is not a pod). [(None, None)]: every port."""
    if not rule_ports:
        return [(None, None)]
    out: list[tuple[str | None, str | None]] = []
    for p in rule_ports:
        protocol = (p.get("protocol") or "TCP").lower()
        port = p.get("port")
        if port is None:
            out.append((protocol, None))
        elif isinstance(port, int) or str(port).isdigit():
            end = p.get("endPort")
            out.append((protocol, f"{port}:{end}" if end else str(port)))
        elif target is not None and port in target.ports and target.ports[port][0].lower() == protocol:
            out.append((protocol, str(target.ports[port][1])))
    return out


@dataclass(frozen=True)
class Cluster:
    pods: tuple[Pod, ...]
    namespaces: dict[str, dict[str, str]] = field(hash=False)  # name → labels
    policies: tuple[dict[str, Any], ...] = field(hash=False)

    def peers(self, peer: dict[str, Any], policy_namespace: str) -> list[Pod] | Block:
        """The pods (or the address block) a policy's peer names."""
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            return Block(block["cidr"], tuple(block.get("except") or ()))
        if "namespaceSelector" in peer:
            spaces = {n for n, labels in self.namespaces.items() if selects(peer["namespaceSelector"], labels)}
        else:
            spaces = {policy_namespace}
        return [p for p in self.pods if p.namespace in spaces and selects(peer.get("podSelector"), p.labels)]


def _policy_types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress", "Egress"] if spec.get("egress") else ["Ingress"])


def allowed(cluster: Cluster, pod: Pod, direction: str) -> list[Match] | None:
    """What `pod` may receive from (`Ingress`) or send to (`Egress`); None when no policy isolates it."""
    selecting = [
        p
        for p in cluster.policies
        if p["metadata"]["namespace"] == pod.namespace
        and direction in _policy_types(p)
        and selects(p["spec"].get("podSelector"), pod.labels)
    ]
    if not selecting:
        return None
    out: list[Match] = []
    for policy in selecting:
        for rule in policy["spec"].get("ingress" if direction == "Ingress" else "egress") or []:
            peers = rule.get("from" if direction == "Ingress" else "to") or []
            resolved: list[Pod | Block | None] = []
            for peer in peers:
                found = cluster.peers(peer, policy["metadata"]["namespace"])
                resolved += [found] if isinstance(found, Block) else list(found)
            if not peers:
                resolved = [None]
            for peer in resolved:
                # Ports by name: the receiving pod's (this one for ingress, the peer pod for egress).
                target = pod if direction == "Ingress" else (peer if isinstance(peer, Pod) else None)
                address: str | Block | None = peer.ip if isinstance(peer, Pod) else peer
                if isinstance(peer, Pod) and not peer.ip:
                    continue
                out += [Match(address, proto, port) for proto, port in _ports(rule.get("ports"), target)]
    return list(dict.fromkeys(out))


def _chain(kind: str, pod: Pod) -> str:
    return f"{PREFIX}{kind}-{hashlib.sha256(pod.key.encode()).hexdigest()[:12]}"


def _match_args(m: Match, side: str) -> Iterator[str]:
    if isinstance(m.peer, str):
        yield f"{side} {m.peer}/32"
    if m.protocol:
        yield f"-p {m.protocol}"
    if m.port:
        yield f"--dport {m.port}"


def _pod_chain(chain: str, pod: Pod, matches: list[Match], side: str) -> tuple[list[str], list[str]]:
    """One pod's chain (and the chains its address blocks need): matches set the mark, then refuse
    unless marked."""
    chains, lines = [chain], []
    comment = f'-m comment --comment "{pod.key}"'
    for i, m in enumerate(matches):
        if isinstance(m.peer, Block) and ipaddress.ip_network(m.peer.cidr, strict=False).version != 4:
            continue  # the node is IPv4 only (iptables, not ip6tables)
        if isinstance(m.peer, Block):
            sub = f"{chain}-{i}"
            chains.append(sub)
            lines += [f"-A {sub} {side} {e} -j RETURN" for e in m.peer.excepts]
            lines.append(f"-A {sub} {side} {m.peer.cidr} -j MARK --or-mark {ALLOWED}")
            target = f"-j {sub}"
        else:
            target = f"-j MARK --or-mark {ALLOWED}"
        lines.append(" ".join(["-A", chain, *_match_args(m, side), target]))
    lines.append(f"-A {chain} -m mark --mark {ALLOWED}/{ALLOWED} -j RETURN")
    lines.append(f"-A {chain} {comment} {REFUSE}")
    return chains, lines


def rules(cluster: Cluster) -> tuple[list[str], str]:
    """The chains and the `iptables-restore --noflush` input that enforce the cluster's policies."""
    chains, lines = (
        [TOP],
        [
            f"-A {TOP} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
            f"-A {TOP} -j MARK --and-mark {CLEAR}",
        ],
    )
    tail: list[str] = []
    for direction, kind, side, select in (("Egress", "E", "-d", "-s"), ("Ingress", "I", "-s", "-d")):
        for pod in sorted((p for p in cluster.pods if p.ip), key=lambda p: p.key):
            matches = allowed(cluster, pod, direction)
            if matches is None:
                continue
            chain = _chain(kind, pod)
            made, body = _pod_chain(chain, pod, matches, side)
            chains += made
            tail += body
            lines.append(f"-A {TOP} {select} {pod.ip}/32 -j {chain}")
        # Ingress is judged afresh (a packet an egress rule let through carries the mark), and no packet
        # leaves with it.
        lines.append(f"-A {TOP} -j MARK --and-mark {CLEAR}")
    text = ["*filter", *(f":{c} - [0:0]" for c in chains), *lines, *tail, "COMMIT", ""]
    return chains, "\n".join(text)


# ---- the edge: the API server in, iptables out


def _pod(obj: dict[str, Any]) -> Pod | None:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    ports = {
        p["name"]: (p.get("protocol", "TCP"), int(p["containerPort"]))
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
        for p in c.get("ports") or []
        if p.get("name")
    }
    meta = obj["metadata"]
    return Pod(meta["namespace"], meta["name"], meta.get("labels") or {}, status.get("podIP") or "", ports)


def read_cluster(core: Any, networking: Any) -> Cluster:
    """The pods, namespaces and policies (`kubernetes.client.CoreV1Api`, `NetworkingV1Api`), as JSON."""

    def items(list_call: Any) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = json.loads(list_call(_preload_content=False, _request_timeout=(5, 20)).data)[
            "items"
        ]
        return got

    pods = tuple(p for o in items(core.list_pod_for_all_namespaces) if (p := _pod(o)) is not None)
    spaces = {o["metadata"]["name"]: o["metadata"].get("labels") or {} for o in items(core.list_namespace)}
    policies = tuple(items(networking.list_network_policy_for_all_namespaces))
    return Cluster(pods, spaces, policies)


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, check=False)


def _ours() -> set[str]:
    listed = _iptables("-S").stdout.splitlines()
    return {line.split()[1] for line in listed if line.startswith(f"-N {PREFIX}")}


def _hook() -> None:
    """Our chain first in FORWARD and INPUT, ahead of kube-proxy's accepts."""
    for hook in HOOKS:
        listed = _iptables("-S", hook).stdout.splitlines()
        first = next((line for line in listed if line.startswith("-A ")), "")
        if first != f"-A {hook} -j {TOP}":
            while _iptables("-D", hook, "-j", TOP).returncode == 0:
                pass
            _iptables("-I", hook, "1", "-j", TOP)


def apply(chains: list[str], text: str, previous: Iterable[str]) -> None:
    """One transaction: our chains rewritten, those no longer wanted emptied and deleted."""
    stale = [c for c in previous if c not in chains]
    ending = "".join(f":{c} - [0:0]\n" for c in stale) + "".join(f"-X {c}\n" for c in stale) + "COMMIT"
    payload = text.replace("COMMIT", ending)
    result = subprocess.run(
        ["iptables-restore", "-w", "5", "--noflush"], input=payload, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"iptables-restore: {result.stderr.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description="The test node's NetworkPolicy enforcer.")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between looks at the API server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from kubernetes import client, config  # the node's process only; the pure part above needs none

    api = config.new_client_from_config(config_file=args.kubeconfig)
    core, networking = client.CoreV1Api(api), client.NetworkingV1Api(api)
    applied = ""
    while True:
        try:
            chains, text = rules(read_cluster(core, networking))
            if text != applied:
                apply(chains, text, previous=_ours())
                log.info("applied %d chains", len(chains))
                applied = text
            _hook()
        except Exception as err:  # a failed look is retried; the rules in place stay
            log.warning("not synced: %s", err)
        time.sleep(args.every)


if __name__ == "__main__":
    main()
