"""KEDA on a real node: load scales the inference stage out, the new pod gets calls, and it scales back
when the load stops; a stage at zero is woken by the first call to it, which waits instead of failing,
and a stage that is called is not scaled away.

KEDA's operator and metrics API server run on the node (tests/devcluster/keda.py), Prometheus scrapes
the stage pods, the ScaledObjects the operator renders become HPAs that kube-controller-manager runs.
Each test prints its timeline (`pytest -s`); docs/operator.md quotes them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from promptpipe.client import GenerationError, PipelineClient
from promptpipe.waiting import wait_until, wait_until_async
from tests.devcluster import keda
from tests.devcluster.node import NODE_IP, Node
from tests.support.node import all_running, apply, instance, pods, service_ip, stream
from tests.support.prometheus import query

pytestmark = [pytest.mark.node, pytest.mark.helm]

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 20
TOKENS_PER_SECOND = 40  # half a second per call: CPU-cheap load


def pipeline(name: str, corpus: dict[str, object] | None = None, **stages: dict[str, object]) -> dict[str, object]:
    """A synthetic pipeline; `corpus`: rag on, answering from it; `stages`: the stages' specs."""
    return {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "synthetic", "backend": "synthetic", "synthetic": {"tokensPerSecond": TOKENS_PER_SECOND}},
            "generation": {"maxNewTokens": TOKENS},
            "rag": {"corpus": corpus, "topK": 2} if corpus else {"enabled": False},
            "stages": stages,
            "auth": {"open": True},  # the journey here is not about keys
        },
    }


@pytest.fixture
def namespace(node: Node, operator_installed: None) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        node.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def prometheus(node: Node) -> str:
    """The node's Prometheus (the one KEDA reads), reached from here."""
    return f"http://127.0.0.1:{node.forward(NODE_IP, keda.PROMETHEUS_PORT)}"


def gateway_of(node: Node, namespace: str, name: str) -> str:
    gateway = f"127.0.0.1:{node.forward(service_ip(node, namespace, f'{name}-stream'), 50051)}"
    # Pods Ready is not yet Services routed: kube-proxy programs each new endpoint a moment later.
    wait_until(lambda: asyncio.run(stream(gateway, max_new_tokens=2)) == (2, None), "a first call through", 60, every=1)
    return gateway


def replicas(node: Node, namespace: str, deployment: str) -> int:
    out = node.kubectl("get", "deployment", deployment, "-n", namespace, "-o", "jsonpath={.spec.replicas}").stdout
    return int(out or 0)


def ready_pods(node: Node, namespace: str, selector: str) -> list[str]:
    return [
        str(p["metadata"]["name"])  # type: ignore[index]
        for p in pods(node, namespace, selector)
        if p["status"].get("containerStatuses")  # type: ignore[union-attr]
        and all(c["ready"] for c in p["status"]["containerStatuses"])  # type: ignore[index]
        and not p["metadata"].get("deletionTimestamp")  # type: ignore[union-attr]
    ]


def calls_per_pod(prometheus: str, namespace: str, stage: str) -> dict[str, int]:
    """Calls each pod of the stage completed OK, as Prometheus last scraped them."""
    found = query(
        prometheus,
        f'promptpipe_stage_duration_seconds_count{{namespace="{namespace}",stage="{stage}",code="OK"}}',
    )
    return {r["metric"]["pod"]: int(float(r["value"][1])) for r in found}


def scalar(prometheus: str, promql: str) -> float:
    found = query(prometheus, promql)
    return float(found[0]["value"][1]) if found else 0.0


@dataclass
class Load:
    """`workers` clients calling back to back until stopped; every call's ending is kept."""

    gateway: str
    workers: int
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with PipelineClient(self.gateway) as client:
            await asyncio.gather(*(self._worker(client) for _ in range(self.workers)))

    async def _worker(self, client: PipelineClient) -> None:
        while not self.stop.is_set():
            try:
                tokens = 0
                async for response in client.generate("load", max_new_tokens=TOKENS, timeout=60):
                    if response.HasField("chunk"):
                        tokens += response.chunk.token_count
                self.ok += tokens == TOKENS
            except GenerationError as err:
                self.failed.append(f"{err.code.name}: {err}")


def test_load_scales_the_inference_stage_out_the_new_pod_serves_calls_and_it_scales_back(
    node: Node, namespace: str, prometheus: str
) -> None:
    # A pod per 3 calls open (2 working, 1 waiting), 3 at most: 10 callers ask for all 3.
    inference = {
        "queue": {"concurrency": 2, "capacity": 64},
        "scaling": {"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 1, "cooldownSeconds": 20},
    }
    apply(node, namespace, pipeline("scale", inference=inference))
    wait_until(lambda: all_running(node, namespace, instance("scale"), 5), "five stage pods Ready", 180, every=1)
    gateway = gateway_of(node, namespace, "scale")
    selector = f"{instance('scale')},app.kubernetes.io/component=inference"
    (first,) = ready_pods(node, namespace, selector)
    load_query = node.kubectl(
        "get", "scaledobject", "scale-inference", "-n", namespace, "-o", "jsonpath={.spec.triggers[0].metadata.query}"
    ).stdout
    assert "promptpipe_stage_next_call_seconds_total" in load_query
    target = 2 + 1  # concurrency + targetQueueDepth: the ScaledObject's threshold per pod
    wait_until(
        lambda: node.kubectl("get", "hpa", "keda-hpa-scale-inference", "-n", namespace, check=False).returncode == 0,
        "KEDA to make the HPA",
        60,
    )

    timeline: dict[str, float] = {}

    async def scenario() -> Load:
        load = Load(gateway, workers=10)
        start = time.monotonic()
        running = asyncio.create_task(load.run())

        def at(event: str) -> None:
            timeline.setdefault(event, round(time.monotonic() - start, 1))

        def progressed() -> bool:
            if running.done():
                running.result()  # raises what ended it
                raise AssertionError("the load ended by itself")
            if scalar(prometheus, load_query) > target:
                at("load over target")
            if replicas(node, namespace, "scale-inference") >= 2:
                at("HPA asks for 2+ pods")
            new = [p for p in ready_pods(node, namespace, selector) if p != first]
            if new:
                at("new pod Ready")
                if any(calls_per_pod(prometheus, namespace, "inference").get(p, 0) > 0 for p in new):
                    at("new pod served a call")
                    return True
            return False

        try:
            await wait_until_async(progressed, "a new inference pod to serve calls", 180, every=0.5)
            await asyncio.sleep(10)  # more calls, so the spread shows
        finally:
            load.stop.set()
            await running
        timeline["load stopped"] = round(time.monotonic() - start, 1)
        return load

    load = asyncio.run(scenario())
    per_pod = calls_per_pod(prometheus, namespace, "inference")
    print(f"\nscale-out timeline (s from load start): {timeline}")
    print(f"calls per inference pod: {per_pod}; calls OK: {load.ok}, failed: {len(load.failed)}")
    assert not load.failed, load.failed[:5]
    assert load.ok > 0
    assert len([p for p, n in per_pod.items() if n > 0]) >= 2, per_pod

    stopped = time.monotonic()
    wait_until(lambda: replicas(node, namespace, "scale-inference") == 1, "the HPA to scale back to 1", 180, every=1)
    print(f"scaled back to 1 pod {time.monotonic() - stopped:.0f} s after the load stopped (cooldown 20 s)")


def test_a_stage_at_zero_is_woken_by_the_first_call_which_waits_and_a_called_stage_stays(
    node: Node, namespace: str, prometheus: str
) -> None:
    node.kubectl(
        "create", "configmap", "wake-corpus", "-n", namespace, f"--from-file={ROOT / 'deploy' / 'examples' / 'corpus'}"
    )
    corpus = {"path": "corpus", "configMap": "wake-corpus"}
    rag = {"scaling": {"minReplicas": 0, "maxReplicas": 2, "cooldownSeconds": 10}}
    apply(node, namespace, pipeline("wake", corpus=corpus, rag=rag))
    rag_pods = f"{instance('wake')},app.kubernetes.io/component=rag"
    # rag may be at zero already (KEDA has no initial cooldown): the first call through wakes it if so.
    others = f"{instance('wake')},app.kubernetes.io/component in (stream,assemble,inference,post)"
    wait_until(lambda: all_running(node, namespace, others, 4), "the other four stage pods Ready", 180, every=1)
    gateway = gateway_of(node, namespace, "wake")

    # Idle: KEDA takes rag to zero once its load has been 0 for the cooldown.
    wait_until(lambda: replicas(node, namespace, "wake-rag") == 0, "KEDA to scale rag to zero", 180, every=1)
    wait_until(lambda: not pods(node, namespace, rag_pods), "rag's pod to be gone", 120, every=1)

    async def first_call() -> tuple[float, int, grpc.StatusCode | None]:
        start = time.monotonic()
        tokens, status = await stream(gateway, prompt="What does the inference stage do?", max_new_tokens=TOKENS)
        return time.monotonic() - start, tokens, status

    took, tokens, status = asyncio.run(first_call())
    print(f"\nfirst call with rag at zero: answered in {took:.1f} s (rag woken meanwhile)")
    assert status is None and tokens == TOKENS, (status, tokens)
    assert sum(calls_per_pod_now(node, namespace, prometheus, "rag").values()) >= 1

    # Called steadily (short calls: a gauge read now and then would see ~0), rag is not scaled away.
    async def steady(seconds: float) -> int:
        done = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert await stream(gateway, prompt="steady", max_new_tokens=1) == (1, None)
            done += 1
            await asyncio.sleep(1.0)
        return done

    lowest = [replicas(node, namespace, "wake-rag")]

    async def watch_while_steady() -> int:
        task = asyncio.create_task(steady(40))  # four cooldowns
        while not task.done():
            lowest[0] = min(lowest[0], replicas(node, namespace, "wake-rag"))
            await asyncio.sleep(0.5)
        return await task

    calls = asyncio.run(watch_while_steady())
    assert lowest[0] >= 1, "rag was scaled away while it was being called"
    print(f"{calls} calls over 40 s: rag stayed at {lowest[0]}+ replicas")
    wait_until(lambda: replicas(node, namespace, "wake-rag") == 0, "rag back to zero once idle", 180, every=1)


def calls_per_pod_now(node: Node, namespace: str, prometheus: str, stage: str) -> dict[str, int]:
    """After at least one more scrape of every pod (scrapes are `keda.SCRAPE_SECONDS` apart)."""
    time.sleep(2 * keda.SCRAPE_SECONDS + 1)
    return calls_per_pod(prometheus, namespace, stage)
