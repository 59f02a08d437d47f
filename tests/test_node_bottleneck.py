"""Finding the bottleneck on a cluster (the real node, the operator's pods from images built here): a
pipeline whose inference stage takes one call at a time is loaded through its gateway's Service with
`promptpipe bench`; `analyze` names inference's queue wait from the bench's own records, from the node's
Prometheus (which found the pods through the API server) and from the traces. `spec.tracing` sends every
stage pod's spans to a collector named by a Service, as in a cluster with an observability namespace: each
call is one trace in Jaeger, its five stage spans from five pods, linked across them."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from promptpipe.contract.tracing import service_name
from promptpipe.waiting import wait_until
from tests.devcluster import keda
from tests.devcluster.build import Tools
from tests.devcluster.node import NODE_IP, Node
from tests.support import jaeger
from tests.support.cli import promptpipe
from tests.support.node import all_running, apply, instance, pods, service_ip, stream
from tests.support.pipelines import synthetic_pipeline

pytestmark = [pytest.mark.node, pytest.mark.helm, pytest.mark.jaeger]

# Jaeger's ports inside the node's network namespace, which has its own.
OTLP, QUERY, HEALTH = 4317, 16686, 13133
CALLS = 6
SECRET = "pumpernickel-4242"


def collector_service(namespace: str) -> list[dict[str, Any]]:
    """A Service without a selector and its EndpointSlice: the collector at the node's address, reached by
    name from any pod (how a cluster reaches a collector run outside it)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "jaeger-collector", "namespace": namespace},
            "spec": {"ports": [{"name": "otlp-grpc", "port": OTLP, "protocol": "TCP", "appProtocol": "grpc"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "jaeger-collector-node",
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": "jaeger-collector"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "otlp-grpc", "port": OTLP, "protocol": "TCP"}],
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
        },
    ]


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def pipeline(endpoint: str) -> dict[str, Any]:
    return synthetic_pipeline(
        "slow",
        model={"synthetic": {"tokensPerSecond": 400, "firstTokenSeconds": 0.02}},
        stages={"inference": {"queue": {"capacity": 64, "concurrency": 1}}},
        auth={"open": True},
        tracing={"otlpEndpoint": endpoint},
        # The collector is a process of the node behind a selector-less Service: policies see past Services,
        # so its address is named (a collector running as pods of its namespace needs no rule).
        network={"egress": [{"to": [{"ipBlock": {"cidr": f"{NODE_IP}/32"}}], "ports": [{"port": OTLP}]}]},
    )


def test_bench_and_analyze_find_the_slow_stage_from_records_prometheus_and_traces_of_the_pods(
    node: Node, operator_installed: None, kube_tools: Tools, tmp_path: Path
) -> None:
    jaeger.built(kube_tools)
    config = Path(node.folder, "jaeger.yaml")
    config.write_text(yaml.safe_dump(jaeger.config(NODE_IP, OTLP, QUERY, HEALTH)))
    node.run_inside("jaeger", [str(kube_tools.jaeger), "--config", str(config)])
    backend = jaeger.Jaeger(f"http://{NODE_IP}:{OTLP}", f"http://127.0.0.1:{node.forward(NODE_IP, QUERY)}")
    health = f"http://127.0.0.1:{node.forward(NODE_IP, HEALTH)}/status"
    wait_until(lambda: answers(health), "Jaeger to be healthy", 60, every=0.5, retry_on=(OSError,))
    prometheus = f"http://127.0.0.1:{node.forward(NODE_IP, keda.PROMETHEUS_PORT)}"

    suffix = uuid.uuid4().hex[:8]
    observability, namespace = f"obs-{suffix}", f"slow-{suffix}"
    node.kubectl("create", "namespace", observability)
    node.kubectl("create", "namespace", namespace)
    try:
        node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(collector_service(observability)))
        apply(node, namespace, pipeline(f"http://jaeger-collector.{observability}.svc:{OTLP}"))
        wait_until(lambda: all_running(node, namespace, instance("slow"), 5), "five stage pods Ready", 180, every=1)
        gateway = f"127.0.0.1:{node.forward(service_ip(node, namespace, 'slow-stream'), 50051)}"
        # Pods Ready is not yet Services routed: kube-proxy programs each new endpoint a moment later.
        wait_until(lambda: asyncio.run(stream(gateway, max_new_tokens=2)) == (2, None), "a first call", 60, every=1)

        async def calls() -> list[tuple[int, Any]]:
            return [await stream(gateway, f"call {i}: {SECRET}", max_new_tokens=4) for i in range(CALLS)]

        assert asyncio.run(calls()) == [(4, None)] * CALLS
        out = tmp_path / "bench.json"
        load = ("--rate", "30", "--requests", "30", "--output-tokens", "16", "-o", str(out))
        run = promptpipe("bench", "--target", gateway, *load, home=tmp_path)
        assert run.returncode == 0, run.stderr
        spec_file = tmp_path / "slow.yaml"
        spec_file.write_text(yaml.safe_dump(pipeline("http://unused:4317")))

        # The bench's own records: the gateway's per-stage timings of each call.
        analyzed = promptpipe("analyze", str(out), "-f", str(spec_file), home=tmp_path)
        assert analyzed.returncode == 0, analyzed.stderr
        assert first_bottleneck(analyzed.stdout).startswith("bottleneck: inference queue wait is "), analyzed.stdout

        # The node's Prometheus, scraping the pods every 2 s: once it has the last calls, the same verdict.
        def from_prometheus() -> str | None:
            args = ("--prometheus", prometheus, "--pipeline", "slow", "--namespace", namespace, "--window", "2m")
            done = promptpipe("analyze", *args, "-f", str(spec_file), home=tmp_path)
            line = first_bottleneck(done.stdout) if done.returncode == 0 else ""
            return done.stdout if line.startswith("bottleneck: inference queue wait (p95 ") else None

        by_prometheus = wait_until(from_prometheus, "Prometheus to name inference's queue", 60, every=2)
        assert "`stages.inference.queue.concurrency` (now 1)" in by_prometheus

        # The traces: every call whole, the five spans from the five pods.
        def whole_traces() -> list[dict[str, Any]] | None:
            found = [t for t in backend.traces(service_name("slow", "stream")) if jaeger.whole(t)]
            return found if len(found) >= CALLS + 30 else None

        traces = wait_until(whole_traces, "every call's trace in Jaeger", 60, every=1)  # batches leave every 5 s
        stage_pods = {p["metadata"]["name"] for p in pods(node, namespace, instance("slow"))}  # type: ignore[index]
        for trace in traces:
            one = jaeger.assert_one_call(trace, "slow", SECRET)
            hosts = {
                name: {t["key"]: t["value"] for t in trace["processes"][span["processID"]]["tags"]}.get("host.name")
                for name, span in one.items()
            }
            assert set(hosts.values()) <= stage_pods and len(set(hosts.values())) == 5, hosts
        by_traces = promptpipe("analyze", "--jaeger", backend.query, "--pipeline", "slow", home=tmp_path)
        assert by_traces.returncode == 0, by_traces.stderr
        assert first_bottleneck(by_traces.stdout).startswith("bottleneck: inference queue wait is "), by_traces.stdout
    finally:
        node.kubectl("delete", "namespace", namespace, observability, "--wait=false")


def first_bottleneck(stdout: str) -> str:
    return next((line for line in stdout.splitlines() if line.startswith("bottleneck: ")), "")
