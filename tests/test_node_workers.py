"""A stage with worker processes (`stages.<stage>.workers`) on the real node: the operator's pods run the
supervisor and its workers from the image built here; the stage's queue bounds the post pod as a whole,
and a tenant's quota the gateway pod as a whole."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from promptpipe.contract.apikeys import hash_key, new_key
from promptpipe.waiting import wait_until
from tests.devcluster.node import Node
from tests.support.node import all_running, apply, instance, pods, service_ip, stream
from tests.support.pipelines import synthetic_pipeline

pytestmark = [pytest.mark.node, pytest.mark.helm]

# Counts the stage processes in the container: the supervisor and its workers (run with `kubectl exec`).
COUNT_STAGE_PROCESSES = """
import os
def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""
others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]  # not this one
print(sum(1 for p in others if b"promptpipe" in cmdline(p)))
"""


def pipeline(name: str) -> dict[str, object]:
    # 16 tokens at 20 tokens/s: each call holds its post slot for about 0.8 s.
    return synthetic_pipeline(
        name,
        model={"synthetic": {"tokensPerSecond": 20}},
        stages={
            "stream": {"workers": 2},
            "post": {"workers": 2, "queue": {"capacity": 2, "concurrency": 2, "shedPolicy": "reject-new"}},
            "inference": {"queue": {"capacity": 64, "concurrency": 64}},
        },
        auth={
            "apiKeysSecret": {"name": "wrk-keys", "key": "keys.yaml"},
            "tenants": [{"name": "limited", "requestsPerMinute": 4}],
        },
    )


def processes_in(node: Node, namespace: str, component: str) -> int:
    (pod,) = pods(node, namespace, instance("wrk") + f",app.kubernetes.io/component={component}")
    name = pod["metadata"]["name"]  # type: ignore[index]
    return int(node.kubectl("exec", "-n", namespace, name, "--", "python", "-c", COUNT_STAGE_PROCESSES).stdout)


def test_stage_pods_run_their_workers_and_the_queue_and_quotas_bound_each_pod(
    node: Node, operator_installed: None
) -> None:
    namespace = f"w-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", namespace)
    team, limited = new_key(), new_key()
    keys = f"team: {hash_key(team)}\nlimited: {hash_key(limited)}\n"
    try:
        node.kubectl("create", "secret", "generic", "wrk-keys", "-n", namespace, f"--from-literal=keys.yaml={keys}")
        apply(node, namespace, pipeline("wrk"))
        wait_until(lambda: all_running(node, namespace, instance("wrk"), 5), "five stage pods Ready", 180, every=1)
        assert processes_in(node, namespace, "post") == 3, "post's supervisor and its two workers"
        assert processes_in(node, namespace, "stream") == 3, "the gateway's supervisor and its two workers"

        gateway = f"127.0.0.1:{node.forward(service_ip(node, namespace, 'wrk-stream'), 50051)}"
        # Pods Ready is not yet Services routed: kube-proxy programs each new endpoint a moment later.
        wait_until(
            lambda: asyncio.run(stream(gateway, max_new_tokens=2, api_key=team)) == (2, None),
            "a first call",
            60,
            every=1,
        )

        async def ten_at_once() -> list[tuple[int, grpc.StatusCode | None]]:
            return await asyncio.gather(*(stream(gateway, f"call {i}", api_key=team) for i in range(10)))

        # Two run and two wait in the pod's one queue, whichever worker a call reaches; six are refused.
        ends = asyncio.run(ten_at_once())
        assert sorted(code.name if code else "OK" for _, code in ends) == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 6
        assert all(tokens == 16 for tokens, code in ends if code is None)

        async def eight_in_turn() -> list[grpc.StatusCode | None]:
            # Each on a connection of its own, so the kernel hands each to either worker.
            return [(await stream(gateway, f"q {i}", max_new_tokens=1, api_key=limited))[1] for i in range(8)]

        # The tenant may start 4 calls a minute in the pod, whichever worker takes them: 4 served, 4 refused.
        # (A bucket per worker would serve up to 8.)
        codes = asyncio.run(eight_in_turn())
        assert [c.name if c else "OK" for c in codes] == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 4, codes
    finally:
        node.kubectl("delete", "namespace", namespace, "--wait=false")
