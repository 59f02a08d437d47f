"""What pods must survive on a real node: a stage killed mid-stream, a config change that rolls
every stage under traffic, the leading operator replica killed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import pytest

from promptpipe.waiting import wait_until, wait_until_async
from tests.devcluster.node import Node
from tests.support.node import OPERATOR, all_running, apply, instance, lease_holder, pods, service_ip, stream

pytestmark = [pytest.mark.node, pytest.mark.helm]

TOKENS = 120  # at 20 tokens/s: a six-second stream to do things during


def pipeline(name: str, system: str = "You are terse.") -> dict[str, object]:
    return {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "synthetic", "backend": "synthetic", "synthetic": {"tokensPerSecond": 20}},
            "generation": {"maxNewTokens": TOKENS},
            "rag": {"enabled": False},
            "template": {"system": system},
            "stages": {s: {"drainGraceSeconds": 20} for s in ("stream", "rag", "assemble", "inference", "post")},
            "auth": {"open": True},  # the journey here is not about keys
        },
    }


@pytest.fixture
def deployed(node: Node, operator_installed: None) -> Iterator[tuple[str, str]]:
    """A synthetic pipeline in a namespace of its own, Ready; yields (namespace, its gateway on loopback)."""
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", namespace)
    apply(node, namespace, pipeline("surv"))
    wait_until(lambda: all_running(node, namespace, instance("surv"), 5), "five stage pods Ready", 180, every=1)
    gateway = f"127.0.0.1:{node.forward(service_ip(node, namespace, 'surv-stream'), 50051)}"
    # Pods Ready is not yet Services routed: kube-proxy programs each new endpoint a moment later.
    wait_until(lambda: asyncio.run(stream(gateway, max_new_tokens=2)) == (2, None), "a first call through", 60, every=1)
    try:
        yield namespace, gateway
    finally:
        node.kubectl("delete", "namespace", namespace, "--wait=false")


def stage_pod(node: Node, namespace: str, stage: str) -> dict[str, object]:
    (pod,) = pods(node, namespace, f"app.kubernetes.io/instance=surv,app.kubernetes.io/component={stage}")
    return pod


def test_a_stage_killed_mid_stream_ends_the_call_with_a_status_and_the_next_call_succeeds_once_it_is_back(
    node: Node, deployed: tuple[str, str]
) -> None:
    namespace, gateway = deployed
    before = stage_pod(node, namespace, "inference")
    container = before["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]  # type: ignore[index]

    async def scenario() -> tuple[int, grpc.StatusCode | None]:
        seen = [0]
        call = asyncio.create_task(stream(gateway, seen=seen))
        await wait_until_async(lambda: seen[0] >= 20 or call.done(), "20 tokens streamed", 30)  # mid-stream
        assert not call.done(), f"the call ended before the kill: {call.result()}"
        node.kill_container(container)
        return await call

    tokens, status = asyncio.run(scenario())
    assert 0 < tokens < TOKENS, tokens
    assert status is grpc.StatusCode.UNAVAILABLE, status

    # The kubelet restarts the container in the same pod; the next call gets every token.
    def restarted() -> bool:
        after = stage_pod(node, namespace, "inference")
        return (
            after["metadata"]["uid"] == before["metadata"]["uid"]  # type: ignore[index]
            and after["status"]["containerStatuses"][0]["restartCount"] == 1  # type: ignore[index]
            and all_running(node, namespace, instance("surv"), 5)
        )

    wait_until(restarted, "inference restarted and Ready", 120, every=1)
    assert asyncio.run(stream(gateway)) == (TOKENS, None)


def test_a_config_change_rolls_every_stage_while_streams_in_flight_finish(
    node: Node, deployed: tuple[str, str]
) -> None:
    namespace, gateway = deployed
    old = {p["metadata"]["name"] for p in pods(node, namespace, instance("surv"))}  # type: ignore[index]

    async def scenario() -> list[tuple[int, grpc.StatusCode | None]]:
        seen = [[0] for _ in range(3)]
        calls = [asyncio.create_task(stream(gateway, f"q{i}", seen[i])) for i in range(3)]
        await wait_until_async(
            lambda: all(s[0] >= 10 for s in seen) or any(c.done() for c in calls), "three streams under way", 30
        )
        apply(node, namespace, pipeline("surv", system="You are verbose."))  # the stages' ConfigMap changes
        return await asyncio.gather(*calls)

    assert asyncio.run(scenario()) == [(TOKENS, None)] * 3, "every stream in flight finished whole"
    wait_until(
        lambda: (
            all_running(node, namespace, instance("surv"), 5)
            and not old & {p["metadata"]["name"] for p in pods(node, namespace, instance("surv"))}
        ),  # type: ignore[index]
        "five new stage pods, the old ones gone",
        180,
        every=1,
    )
    config = node.kubectl("get", "cm", "surv-config", "-n", namespace, "-o", "jsonpath={.data.runtime\\.yaml}").stdout
    assert "You are verbose." in config


def test_the_other_operator_replica_takes_the_lease_and_carries_on(node: Node, deployed: tuple[str, str]) -> None:
    namespace, _ = deployed

    leader = wait_until(lambda: lease_holder(node), "a leader")
    node.kubectl("delete", "pod", leader, "-n", "promptpipe-system", "--grace-period=0", "--force")
    new_leader = wait_until(lambda: (h := lease_holder(node)) != leader and h, "another replica to lead", 90, every=1)
    assert new_leader in {p["metadata"]["name"] for p in pods(node, "promptpipe-system", OPERATOR)}  # type: ignore[index]
    # It acts: a child deleted by hand comes back.
    node.kubectl("delete", "service", "surv-rag", "-n", namespace)
    wait_until(
        lambda: node.kubectl("get", "service", "surv-rag", "-n", namespace, check=False).returncode == 0,
        "the Service back",
        60,
        every=1,
    )
