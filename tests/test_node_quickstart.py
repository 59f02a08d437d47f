"""The README's Kubernetes section, run line by line as a user would, on the real node.

The node runs containerd, kubelet, kube-proxy and CoreDNS in a network namespace; the images
are built here from the project's Dockerfiles (tests/devcluster/). The lines are taken from the
README itself, so a README that stops working fails this test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from promptpipe.cli import localrun
from promptpipe.client import GenerationError, PipelineClient
from promptpipe.contract.apikeys import hash_key, new_key
from promptpipe.localproc import listening
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.node import Node
from tests.support.node import all_running, image_values, lease_holder, pods, shell_env, wait_gone

pytestmark = [pytest.mark.node, pytest.mark.helm, pytest.mark.model, pytest.mark.processes]

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "When was the Eiffel Tower built?"


def readme_lines() -> list[str]:
    """The shell lines of the README's Kubernetes section, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## On Kubernetes", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def stage_selector(pipeline: str) -> str:
    return f"app.kubernetes.io/instance={pipeline},app.kubernetes.io/managed-by=promptpipe-operator"


@contextmanager
def local_quickstart() -> Iterator[str]:
    """`promptpipe up -f deploy/examples/quickstart.yaml`; yields the gateway's address."""
    run = localrun.start(ROOT / "deploy" / "examples" / "quickstart.yaml")
    try:
        localrun.wait_serving(run, timeout=120)
        yield run.gateway
    finally:
        localrun.stop(run)


async def greedy_answer(target: str, key: str | None = None) -> str:
    text = []
    async with PipelineClient(target, key) as client:
        async for response in client.generate(QUESTION, temperature=0.0, max_new_tokens=48, timeout=120):
            if response.HasField("chunk"):
                text.append(response.chunk.text)
    return "".join(text)


# Its waits (the key's rotation up to 240 s, the pods' drain up to 240 s) may add up past the default timeout.
@pytest.mark.timeout(900)
def test_the_readme_kubernetes_section_runs_as_written(node: Node, kube_tools: Tools, tmp_path: Path) -> None:
    lines = readme_lines()
    assert lines[0].startswith("helm install") and lines[-1].startswith("helm uninstall"), lines
    # The user's working copy: the repository's folders, and the my-images.yaml the README asks for.
    for name in ("charts", "deploy"):
        (tmp_path / name).symlink_to(ROOT / name)
    image_values(node, tmp_path)
    env = shell_env(node, kube_tools)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `promptpipe` itself
    background: list[subprocess.Popen[str]] = []
    try:
        for line in lines:
            if line.endswith("&"):
                proc = subprocess.Popen(
                    line.removesuffix("&"),
                    shell=True,
                    env=env,
                    cwd=tmp_path,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                background.append(proc)
                port = int(re.findall(r"(\d+):\d+", line)[0])
                wait_until(lambda: proc.poll() is None and listening(port), f"`{line}` to listen", 30)
                continue
            result = subprocess.run(
                line, shell=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
            )
            assert result.returncode == 0, f"README line failed: {line}\n{result.stdout}\n{result.stderr}"
            check_after(line, result.stdout, result.stderr, node, tmp_path)
    finally:
        for proc in background:
            os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
            print(f"`{proc.args}` exited {proc.returncode}:\n{out}")  # shown when the test fails
        # A line that failed leaves what the README's last lines remove: remove it, so the node's next tests
        # (which install the chart themselves) start from the same clean cluster either way.
        for cleanup in ("kubectl delete pp quickstart --ignore-not-found --wait", lines[-1]):
            subprocess.run(cleanup, shell=True, env=env, cwd=tmp_path, capture_output=True, timeout=300, check=False)


def rotate_the_key(node: Node, cwd: Path, old: str) -> None:
    """A new key into the Secret, the old one out: the gateway pod follows without a restart."""
    pod = pods(node, "default", stage_selector("quickstart") + ",app.kubernetes.io/component=stream")[0]
    new = new_key()
    keys = f"me: {hash_key(new)}\n"
    secret = node.kubectl(
        "create",
        "secret",
        "generic",
        "quickstart-api-keys",
        f"--from-literal=keys.yaml={keys}",
        "--dry-run=client",
        "-o",
        "yaml",
    ).stdout
    node.kubectl("apply", "-f", "-", stdin=secret)
    started = time.monotonic()

    def old_refused() -> bool:
        try:
            asyncio.run(greedy_answer("127.0.0.1:50051", old))
        except GenerationError as exc:
            if exc.code is grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise  # any other refusal (the port-forward gone: UNAVAILABLE) ends the wait, named
        return False

    # The kubelet refreshes a Secret volume on its sync (a minute, plus its cache's time): seconds usually,
    # once here over two minutes.
    wait_until(old_refused, "the rotated-out key to be refused", 240, every=1)
    print(f"key rotation seen by the gateway {time.monotonic() - started:.1f}s after the Secret changed")
    assert "1889" in asyncio.run(greedy_answer("127.0.0.1:50051", new))
    after = pods(node, "default", stage_selector("quickstart") + ",app.kubernetes.io/component=stream")[0]
    assert after["metadata"]["name"] == pod["metadata"]["name"]  # type: ignore[index]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0  # type: ignore[index]
    (cwd / "me.key").write_text(new + "\n")


def check_after(line: str, out: str, err: str, node: Node, cwd: Path) -> None:
    """What a user sees after each README line, checked on the cluster."""
    if line.startswith("helm install"):
        wait_until(
            lambda: all_running(node, "promptpipe-system", "app.kubernetes.io/name=promptpipe-operator", 2),
            "both operator pods Running and Ready",
            180,
            every=1,
        )
        names = {
            p["metadata"]["name"] for p in pods(node, "promptpipe-system", "app.kubernetes.io/name=promptpipe-operator")
        }  # type: ignore[index]
        # The Lease outlives an earlier install's operator (another test's, in the same namespace): its holder
        # names a pod gone until the lease runs out and one of these takes it.
        wait_until(lambda: lease_holder(node) in names, f"one of {sorted(names)} to hold the leader Lease", 90, every=1)
    elif line.startswith("kubectl wait"):
        assert all_running(node, "default", stage_selector("quickstart"), 5), "every stage pod Running and Ready"
    elif line.startswith("kubectl get pp"):
        assert re.search(r"quickstart\s+Ready\s+smollm2-135m-instruct\s+.*5/5", out), out
    elif "promptpipe generate" in line:
        assert "1889" in out, out  # SmolLM2 answers from the corpus, through all five pods
        assert re.search(r"── finish=(eos|length|stop) +tokens=\d+\+\d+", err), err  # the summary, on stderr
        key = (cwd / "me.key").read_text().strip()
        on_node = asyncio.run(greedy_answer("127.0.0.1:50051", key))
        with local_quickstart() as gateway:
            on_laptop = asyncio.run(greedy_answer(gateway))  # locally no keys: open
        assert on_node == on_laptop and on_node, (on_node, on_laptop)
        # A cluster's gateway is closed: no key, no answer, and no place in the queue.
        with pytest.raises(GenerationError) as refused:
            asyncio.run(greedy_answer("127.0.0.1:50051"))
        assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED, refused.value
        rotate_the_key(node, cwd, key)
    elif line.startswith("curl"):
        # (after the rotation above: the line reads me.key, which now holds the new key)
        # The OpenAI-compatible API of the same pods: server-sent events, then [DONE].
        events = [e for e in out.split("\n\n") if e.strip()]
        assert events and all(e.startswith("data: ") for e in events), out
        assert events[-1] == "data: [DONE]", out
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert "1889" in text, text
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), chunks[-1]
    elif line.startswith("kubectl delete pp"):
        wait_until(
            lambda: (
                not node.kubectl(
                    "get", "deploy,svc,cm,scaledobject", "-l", stage_selector("quickstart"), "-o", "name"
                ).stdout.strip()
            ),
            "every child gone",
            120,
            every=1,
        )
        # A pod may take its whole termination grace (the quickstart's timeoutSeconds, 120 s, plus a margin)
        # to drain: `kubectl delete` on a cluster waits as long. Once here it did.
        wait_gone(node, "default", stage_selector("quickstart"), 240)
    elif line.startswith("helm uninstall"):
        wait_gone(node, "promptpipe-system", "app.kubernetes.io/name=promptpipe-operator")
