"""A pipeline's NetworkPolicies enforced on a real node: packets refused both ways.

The node runs a policy enforcer (`tests.devcluster.netpol`), as a cluster's CNI does. A pod of another
namespace reaches the gateway's public port and nothing else of the pipeline; from inside a stage's own
pod, the cloud's metadata address, the API server, the gateway and a stage it does not call are refused,
while DNS answers; and the pipeline's own calls still go through. Each refusal is shown against a control
that the same address answers a pod no policy covers (the stranger), so a refusal is the policy's, not a
missing listener's.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import pytest

from promptpipe.waiting import wait_until
from tests.devcluster.node import METADATA_IP, Node
from tests.support.node import all_running, apply, instance, pod_output, pods, service_ip, stream
from tests.support.pipelines import synthetic_pipeline

pytestmark = [pytest.mark.node, pytest.mark.helm]

NAME = "fenced"
TOKENS = 6
METADATA = METADATA_IP

# Each argument `name=host:port` (a TCP connect) or `name=host` (a DNS look-up); prints `name outcome`.
PROBE = """
import socket, sys
for arg in sys.argv[1:]:
    name, target = arg.split("=", 1)
    try:
        if ":" in target:
            host, port = target.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=5).close()
        else:
            socket.getaddrinfo(target, 80)
        said = "open"
    except ConnectionRefusedError:
        said = "refused"
    except socket.timeout:
        said = "timeout"
    except OSError as err:
        said = type(err).__name__
    print(name, said, flush=True)
"""


def outcomes(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def stranger(node: Node, namespace: str, targets: list[str]) -> dict[str, str]:
    """The probe run by a pod of `namespace` that no policy selects."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stranger", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "probe",
                    "image": node.images["stage"],
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", PROBE, *targets],
                }
            ],
        },
    }
    return outcomes(pod_output(node, pod))


def from_inside(node: Node, namespace: str, pod: str, targets: list[str]) -> dict[str, str]:
    """The probe run in a stage's own pod (`kubectl exec`), under that stage's policy."""
    return outcomes(node.kubectl("exec", "-n", namespace, pod, "--", "python", "-c", PROBE, *targets).stdout)


def refusals(node: Node, namespace: str) -> int:
    """Packets the enforcer's rules for `namespace`'s pods have refused so far (each pod's last rule)."""
    listed = node.iptables("-L", "-v", "-n", "-x")
    return sum(int(line.split()[0]) for line in listed.splitlines() if "REJECT" in line and f"/* {namespace}/" in line)


def test_a_stage_reaches_only_what_it_calls_and_a_stranger_only_the_gateway(
    node: Node, operator_installed: None
) -> None:
    suffix = uuid.uuid4().hex[:8]
    namespace, elsewhere = f"fenced-{suffix}", f"other-{suffix}"
    node.kubectl("create", "namespace", namespace)
    node.kubectl("create", "namespace", elsewhere)
    # A listener at the cloud's metadata address, as an instance has one: reachable unless a policy says no.
    node.ip("addr", "add", f"{METADATA}/32", "dev", "lo")
    metadata = node.run_inside("metadata", [sys.executable, "-m", "http.server", "--bind", METADATA, "80"])
    try:
        apply(node, namespace, synthetic_pipeline(NAME, generation={"maxNewTokens": TOKENS}, auth={"open": True}))
        wait_until(lambda: all_running(node, namespace, instance(NAME), 5), "five pods Ready", 180, every=1)
        gateway_ip = service_ip(node, namespace, f"{NAME}-stream")
        gateway = f"127.0.0.1:{node.forward(gateway_ip, 50051)}"
        wait_until(
            lambda: asyncio.run(stream(gateway)) == (TOKENS, None),
            "a call through the pipeline, every hop under its policy",
            60,
            every=1,
            retry_on=(Exception,),
        )
        by_component: dict[str, Any] = {
            p["metadata"]["labels"]["app.kubernetes.io/component"]: p  # type: ignore[index]
            for p in pods(node, namespace, instance(NAME))
        }
        post_ip, assemble_ip = by_component["post"]["status"]["podIP"], by_component["assemble"]["status"]["podIP"]
        api_server = f"{service_ip(node, 'default', 'kubernetes')}:443"
        targets = [
            f"metadata={METADATA}:80",
            f"apiserver={api_server}",
            f"gateway={gateway_ip}:50051",
            f"post={post_ip}:50051",
            f"assemble={assemble_ip}:50051",
        ]
        before = refusals(node, namespace)

        # Controls: a pod no policy selects reaches the metadata listener, the API server and the gateway's
        # public port; the stages' own ports are refused to it (ingress).
        assert stranger(node, elsewhere, targets) == {
            "metadata": "open",
            "apiserver": "open",
            "gateway": "open",
            "post": "refused",
            "assemble": "refused",
        }
        # From inside the inference stage's pod (egress): only DNS, and nothing it does not call. (Inference
        # calls no stage; with the synthetic backend, nothing at all.)
        inference = by_component["inference"]["metadata"]["name"]
        assert from_inside(node, namespace, inference, [*targets, "dns=kubernetes.default.svc.cluster.local"]) == {
            "metadata": "refused",
            "apiserver": "refused",
            "gateway": "refused",
            "post": "refused",
            "assemble": "refused",
            "dns": "open",
        }
        # The gateway calls assemble and post: those open; the rest of the world is refused.
        gateway_pod = by_component["stream"]["metadata"]["name"]
        assert from_inside(node, namespace, gateway_pod, targets[:2] + targets[3:]) == {
            "metadata": "refused",
            "apiserver": "refused",
            "post": "open",
            "assemble": "open",
        }
        assert refusals(node, namespace) - before >= 9  # the enforcer's rules refused them: 2 + 5 + 2
        # And the pipeline still answers.
        assert asyncio.run(stream(gateway)) == (TOKENS, None)
    finally:
        metadata.kill()
        node.ip("addr", "del", f"{METADATA}/32", "dev", "lo")
        node.kubectl("delete", "namespace", namespace, elsewhere, "--wait=false")
