"""A stage with worker processes (`stages.<stage>.workers`) on the real node: the operator's pod runs the
supervisor and its workers from the image built here, and the stage's queue bounds the pod as a whole."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

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
            "post": {"workers": 2, "queue": {"capacity": 2, "concurrency": 2, "shedPolicy": "reject-new"}},
            "inference": {"queue": {"capacity": 64, "concurrency": 64}},
        },
        auth={"open": True},
    )


def test_a_stage_pod_runs_its_workers_and_its_queue_bounds_the_pod(node: Node, operator_installed: None) -> None:
    namespace = f"w-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", namespace)
    try:
        apply(node, namespace, pipeline("wrk"))
        wait_until(lambda: all_running(node, namespace, instance("wrk"), 5), "five stage pods Ready", 180, every=1)
        (post,) = pods(node, namespace, instance("wrk") + ",app.kubernetes.io/component=post")
        name = post["metadata"]["name"]  # type: ignore[index]
        processes = node.kubectl("exec", "-n", namespace, name, "--", "python", "-c", COUNT_STAGE_PROCESSES).stdout
        assert int(processes) == 3, "the supervisor and its two workers"

        gateway = f"127.0.0.1:{node.forward(service_ip(node, namespace, 'wrk-stream'), 50051)}"
        # Pods Ready is not yet Services routed: kube-proxy programs each new endpoint a moment later.
        wait_until(lambda: asyncio.run(stream(gateway, max_new_tokens=2)) == (2, None), "a first call", 60, every=1)

        async def ten_at_once() -> list[tuple[int, grpc.StatusCode | None]]:
            return await asyncio.gather(*(stream(gateway, f"call {i}") for i in range(10)))

        # Two run and two wait in the pod's one queue, whichever worker a call reaches; six are refused.
        ends = asyncio.run(ten_at_once())
        assert sorted(code.name if code else "OK" for _, code in ends) == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 6
        assert all(tokens == 16 for tokens, code in ends if code is None)
    finally:
        node.kubectl("delete", "namespace", namespace, "--wait=false")
