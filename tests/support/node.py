"""pytest fixtures for the real node: a control plane wired to a node that runs pods from the
project's own images (tests/devcluster/node.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from promptpipe.client import GenerationError, PipelineClient
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.images import images_dir
from tests.devcluster.node import KERNEL_SYSCTLS, Node, live_others

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = "app.kubernetes.io/name=promptpipe-operator"


@pytest.fixture(scope="session")
def node(kube_tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the session (images built first if they changed); stopped, and the machine put back, at the end."""
    started = Node.start(kube_tools, tmp_path_factory.mktemp("node"))
    try:
        # The image cache holds this build's images only: earlier builds' were pruned.
        archives = {p.name for p in (images_dir() / "archives").glob("*.tar")}
        assert archives == {name.rsplit("/", 1)[1].replace(":", "-") + ".tar" for name in started.images.values()}
        yield started
    finally:
        started.stop()
    # Another test run's node on this machine (CI beside a local run) keeps the kubelet's values
    # until the last node stops: only then are the machine's own values back.
    if not live_others(started.record):
        assert kernel_settings() == started.record.sysctls, "the last node out put the kernel's settings back"
    assert not Path("/run/netns", started.netns).exists(), "the node's network namespace is gone"
    assert not [m for m in Path("/proc/self/mounts").read_text().splitlines() if started.folder in m], "mounts left"


def kernel_settings() -> dict[str, str]:
    return {key: (Path("/proc/sys") / key).read_text().strip() for key in KERNEL_SYSCTLS}


def images_values(images: dict[str, str], prometheus_url: str) -> dict[str, object]:
    """Chart values naming the images built here (repository:tag by key), and the cluster's Prometheus
    that KEDA reads."""
    operator, stage = images["operator"].rsplit(":", 1), images["stage"].rsplit(":", 1)
    return {
        "operator": {"image": {"repository": operator[0], "tag": operator[1], "pullPolicy": "IfNotPresent"}},
        "pipelines": {
            "stageImage": {"repository": stage[0], "tag": stage[1], "pullPolicy": "IfNotPresent"},
            "prometheusAddress": prometheus_url,
            "loadWindow": "10s",  # five of its scrapes
            # The TGI-protocol image built here stands in for TGI's own.
            "allowedTgiImages": [images["tgi"].rsplit(":", 1)[0]],
        },
    }


class _QuotedStrings(yaml.SafeDumper):
    """Every string double-quoted. Helm reads YAML 1.2, where an image tag of hex digits such as
    2245820300176e16 is a number; PyYAML (YAML 1.1) would write it bare."""


_QuotedStrings.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style='"'))


def write_values(path: Path, values: dict[str, object]) -> Path:
    """A values file helm reads as written."""
    path.write_text(yaml.dump(values, Dumper=_QuotedStrings))
    return path


def image_values(node: Node, folder: Path) -> Path:
    """`images_values` of the node, as my-images.yaml (docs/install.md: `-f my-images.yaml`)."""
    return write_values(folder / "my-images.yaml", images_values(node.images, node.prometheus_url))


def shell_env(node: Node, tools: Tools) -> dict[str, str]:
    """A user's shell pointed at the node's cluster: KUBECONFIG, and the pinned kubectl and helm first on PATH."""
    return {**os.environ, "KUBECONFIG": node.plane.kubeconfig, "PATH": f"{tools.kubectl.parent}:{os.environ['PATH']}"}


def pods(node: Node, namespace: str, selector: str = "") -> list[dict[str, object]]:
    args = ["get", "pods", "-n", namespace, "-o", "yaml", *(["-l", selector] if selector else [])]
    items: list[dict[str, object]] = yaml.safe_load(node.kubectl(*args).stdout)["items"]
    return items


def all_running(node: Node, namespace: str, selector: str, count: int) -> bool:
    found = pods(node, namespace, selector)
    ready = [
        p
        for p in found
        if p["status"]["phase"] == "Running"  # type: ignore[index]
        and all(c["ready"] for c in p["status"].get("containerStatuses", []))  # type: ignore[index,union-attr]
        and not p["metadata"].get("deletionTimestamp")  # type: ignore[index,union-attr]
    ]
    return len(ready) == count == len(found)


def wait_gone(node: Node, namespace: str, selector: str, timeout: float = 120) -> None:
    wait_until(lambda: not pods(node, namespace, selector), f"pods {selector} to be gone", timeout, every=1)


def pod_output(node: Node, pod: dict[str, Any], timeout: float = 120) -> str:
    """Run a pod (`restartPolicy: Never`) to its end and return what it printed."""
    name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
    node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod))

    def finished() -> bool:
        phase = node.kubectl("get", "pod", name, "-n", namespace, "-o", "jsonpath={.status.phase}").stdout
        return phase in ("Succeeded", "Failed")

    wait_until(finished, f"pod {name} to finish", timeout, every=1)
    return str(node.kubectl("logs", name, "-n", namespace).stdout)


def service_ip(node: Node, namespace: str, name: str) -> str:
    return str(node.kubectl("get", "svc", name, "-n", namespace, "-o", "jsonpath={.spec.clusterIP}").stdout)


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def lease_holder(node: Node, name: str = "promptpipe") -> str:
    """The pod holding the operator's leader Lease ('' while none does)."""
    identity = node.kubectl(
        "get", "lease", name, "-n", "promptpipe-system", "-o", "jsonpath={.spec.holderIdentity}", check=False
    ).stdout
    return identity.split("_", 1)[0]  # the elector's identity is `<pod>_<random>`


@contextmanager
def installed_operator(
    node: Node, tools: Tools, folder: Path, values: dict[str, object] | None = None
) -> Iterator[None]:
    """The chart installed as docs/install.md says (`values` merged over my-images.yaml), both operator
    replicas Ready; uninstalled at the end."""
    env = shell_env(node, tools)
    files = [image_values(node, folder)]
    if values:
        files.append(folder / "more-values.yaml")
        files[-1].write_text(yaml.safe_dump(values))
    chart = str(ROOT / "charts" / "promptpipe")
    run(
        ["helm", "install", "promptpipe", chart, "-n", "promptpipe-system", "--create-namespace"]
        + [arg for f in files for arg in ("-f", str(f))],
        env,
        ROOT,
    )
    try:
        wait_until(lambda: all_running(node, "promptpipe-system", OPERATOR, 2), "the operator pods", 180, every=1)
        yield
    finally:
        run(["helm", "uninstall", "promptpipe", "-n", "promptpipe-system", "--wait"], env, ROOT)


@pytest.fixture(scope="module")
def operator_installed(node: Node, kube_tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with installed_operator(node, kube_tools, tmp_path_factory.mktemp("chart")):
        yield


def instance(name: str) -> str:
    return f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=promptpipe-operator"


def apply(node: Node, namespace: str, doc: dict[str, object]) -> None:
    node.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))


async def stream(
    target: str, prompt: str = "go", seen: list[int] | None = None, max_new_tokens: int = 0, api_key: str | None = None
) -> tuple[int, grpc.StatusCode | None]:
    """(tokens received, the status the call ended with: None for OK); `seen` counts them as they come."""
    seen = seen if seen is not None else [0]
    async with PipelineClient(target, api_key) as client:
        try:
            async for response in client.generate(prompt, max_new_tokens=max_new_tokens, timeout=60):
                if response.HasField("chunk"):
                    seen[0] += response.chunk.token_count
        except GenerationError as err:
            return seen[0], err.code
    return seen[0], None
