"""Stage fusion on a real node: a pipeline fused whole runs as one pod and answers; unfused, the operator
brings the other four back, and with post fused again it removes post's, calls served throughout."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from promptpipe.client import PipelineClient
from promptpipe.waiting import wait_until
from tests.devcluster.node import Node
from tests.support.node import all_running, apply, instance, service_ip

pytestmark = [pytest.mark.node, pytest.mark.helm]

TOKENS = 8


def pipeline(fuse: list[str]) -> dict[str, object]:
    return {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": "fused"},
        "spec": {
            "model": {"name": "synthetic", "backend": "synthetic", "synthetic": {"tokenText": " bob@example.com"}},
            "generation": {"maxNewTokens": TOKENS},
            "rag": {"enabled": False},
            "post": {"redact": {"email": True}},
            "stages": {s: {"drainGraceSeconds": 5} for s in ("stream", "rag", "assemble", "inference", "post")},
            "auth": {"open": True},
            "fuse": fuse,
        },
    }


async def answer(target: str) -> tuple[str, int]:
    text, tokens = "", 0
    async with PipelineClient(target) as client:
        async for response in client.generate("go", timeout=30):
            if response.HasField("chunk"):
                text += response.chunk.text
                tokens += response.chunk.token_count
    return text, tokens


def deployments(node: Node, namespace: str) -> set[str]:
    out = node.kubectl("get", "deployments", "-n", namespace, "-l", instance("fused"), "-o", "name").stdout
    return {line.removeprefix("deployment.apps/") for line in out.split()}


def test_a_pipeline_fused_whole_runs_as_one_pod_and_fusing_or_unfusing_it_live_adds_or_removes_the_others(
    node: Node, operator_installed: None
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", namespace)
    try:
        apply(node, namespace, pipeline(["rag", "assemble", "post", "inference"]))
        wait_until(lambda: all_running(node, namespace, instance("fused"), 1), "one pod Ready", 180, every=1)
        assert deployments(node, namespace) == {"fused-stream"}
        gateway = f"127.0.0.1:{node.forward(service_ip(node, namespace, 'fused-stream'), 50051)}"

        def answered() -> bool:
            # Pods Ready is not yet Services routed: kube-proxy programs each new endpoint a moment later.
            text, tokens = asyncio.run(answer(gateway))
            # post, in the process that runs it, redacted every address.
            assert tokens == TOKENS and "bob@example.com" not in text and "[REDACTED]" in text, text
            return True

        wait_until(answered, "a call through the fused pipeline", 60, every=1, retry_on=(Exception,))

        apply(node, namespace, pipeline([]))
        wait_until(lambda: all_running(node, namespace, instance("fused"), 5), "five pods Ready", 180, every=1)
        assert deployments(node, namespace) == {
            f"fused-{s}" for s in ("stream", "rag", "assemble", "inference", "post")
        }
        wait_until(answered, "a call through the five services", 60, every=1, retry_on=(Exception,))

        apply(node, namespace, pipeline(["post"]))
        wait_until(
            lambda: deployments(node, namespace) == {f"fused-{s}" for s in ("stream", "rag", "assemble", "inference")},
            "post's Deployment pruned",
            120,
            every=1,
        )
        wait_until(lambda: all_running(node, namespace, instance("fused"), 4), "four pods Ready", 180, every=1)
        wait_until(answered, "a call with post in the inference pod", 60, every=1, retry_on=(Exception,))
    finally:
        node.kubectl("delete", "namespace", namespace, "--wait=false")
