"""`kubectl port-forward` on the real node outlives a connection the pod resets.

Users reach a pipeline's gateway through `kubectl port-forward` (the README's Kubernetes section). A
container runtime that reports a pod's reset of one connection as an error ends the whole forward
(kubernetes#111825; containerd fixed it in 1.6.22, containerd#8805): every call after it is refused.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from promptpipe.localproc import free_port, listening
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.node import Node
from tests.support.node import shell_env

pytestmark = [pytest.mark.node]

# A line "reset" is answered with a TCP reset (SO_LINGER 0 on close); any other line with "served".
SERVER = """
import socket, struct
server = socket.create_server(("0.0.0.0", 7000))
while True:
    conn, _ = server.accept()
    with conn:
        line = conn.makefile("rb").readline()
        if line.strip() == b"reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.sendall(b"served\\n")
"""


def ask(port: int, line: bytes) -> bytes:
    """Send one line through the forward; what came back (empty when the connection was reset or closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(line + b"\n")
        try:
            return conn.makefile("rb").readline()
        except ConnectionResetError:
            return b""


def test_port_forward_outlives_a_connection_the_pod_resets(node: Node, kube_tools: Tools, tmp_path: Path) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "resetter", "namespace": "default"},
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": node.images["stage"],
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", SERVER],
                    "ports": [{"containerPort": 7000}],
                }
            ],
            "terminationGracePeriodSeconds": 0,
        },
    }
    node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod))
    forward: subprocess.Popen[str] | None = None
    try:
        node.kubectl("wait", "--for=condition=Ready", "pod/resetter", "--timeout=120s")
        port = free_port()
        forward = subprocess.Popen(
            ["kubectl", "port-forward", "pod/resetter", f"{port}:7000"],
            env=shell_env(node, kube_tools),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        running = forward
        wait_until(lambda: running.poll() is None and listening(port), "the port-forward to listen", 30)
        assert ask(port, b"hello") == b"served\n"
        for _ in range(3):
            assert ask(port, b"reset") == b"", "the pod resets this one"
            time.sleep(1)  # the forward hears of the reset (an error on its stream's other channel) a moment later
            assert ask(port, b"hello") == b"served\n", "the next connection through the same forward is served"
        assert forward.poll() is None, "the forward still runs"
    finally:
        if forward is not None:
            forward.kill()
            print(f"kubectl port-forward:\n{forward.communicate()[0]}")  # shown when the test fails
        node.kubectl("delete", "pod", "resetter", "--ignore-not-found", "--wait=false")
