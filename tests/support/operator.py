"""The operator as the tests run it: its own process, authenticated as its ServiceAccount,
bound to exactly the ClusterRole in `promptpipe_operator.rbac`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from promptpipe.localproc import die_with_parent, free_port
from promptpipe.waiting import wait_until
from promptpipe_operator import rbac
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.faults import FaultyProxy
from tests.support.kube import kubectl, service_account_token

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "deploy" / "crds" / "promptpipelines.promptpipe.io.yaml"
SYSTEM_NAMESPACE = "promptpipe-system"


def apply_crd(plane: ControlPlane, tools: Tools) -> None:
    """Install the CRD the way the docs say: `kubectl apply --server-side -f deploy/crds/`."""
    kubectl(plane, tools, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    kubectl(plane, tools, "wait", "--for=condition=Established", "--timeout=30s", "crd/promptpipelines.promptpipe.io")


def operator_kubeconfig(
    plane: ControlPlane, folder: Path, account: str = rbac.NAME, rules: list[dict[str, Any]] | None = None
) -> Path:
    """Install the operator's ServiceAccount, ClusterRole and binding; a kubeconfig with a token for it.

    `account` and `rules` make another identity (for tests of what happens without a permission)."""
    api = config.new_client_from_config(config_file=plane.kubeconfig)
    try:
        core, authz = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
        if not any(n.metadata.name == SYSTEM_NAMESPACE for n in core.list_namespace().items):
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=SYSTEM_NAMESPACE)))
        lease_role = {"metadata": {"name": account, "namespace": SYSTEM_NAMESPACE}, "rules": rbac.LEADER_ELECTION_RULES}
        lease_binding = {
            "metadata": {"name": account, "namespace": SYSTEM_NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": SYSTEM_NAMESPACE}],
        }
        for create, body in (
            (
                lambda b: core.create_namespaced_service_account(SYSTEM_NAMESPACE, b),
                rbac.service_account(SYSTEM_NAMESPACE, account),
            ),
            (authz.create_cluster_role, rbac.cluster_role(account, rules)),
            (authz.create_cluster_role_binding, rbac.cluster_role_binding(SYSTEM_NAMESPACE, account, account)),
            (lambda b: authz.create_namespaced_role(SYSTEM_NAMESPACE, b), lease_role),
            (lambda b: authz.create_namespaced_role_binding(SYSTEM_NAMESPACE, b), lease_binding),
        ):
            try:
                create(body)
            except client.ApiException as err:
                if err.status != 409:
                    raise
    finally:
        api.close()
    return service_account_kubeconfig(plane, folder, SYSTEM_NAMESPACE, account)


def service_account_kubeconfig(plane: ControlPlane, folder: Path, namespace: str, account: str) -> Path:
    """A kubeconfig authenticating as an existing ServiceAccount, with a token the API server issued."""
    api = config.new_client_from_config(config_file=plane.kubeconfig)
    try:
        token = service_account_token(api, namespace, account, seconds=24 * 3600)
    finally:
        api.close()
    admin = yaml.safe_load(Path(plane.kubeconfig).read_text())
    cluster = admin["clusters"][0]
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": cluster["name"], "user": account}}],
        "current-context": account,
    }
    path = folder / f"{namespace}-{account}.kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    path.chmod(0o600)
    return path


@contextmanager
def api_through_proxy(kubeconfig: Path, folder: Path) -> Iterator[tuple[Path, FaultyProxy]]:
    """`kubeconfig`, but reaching the API server through a TCP proxy the test can break (TLS passes
    through it untouched; the server's certificate names 127.0.0.1 whatever the port)."""
    doc = yaml.safe_load(kubeconfig.read_text())
    server = urllib.parse.urlsplit(doc["clusters"][0]["cluster"]["server"])
    with FaultyProxy(str(server.hostname), int(server.port or 443)) as proxy:
        doc["clusters"][0]["cluster"]["server"] = f"https://{proxy.address}"
        path = folder / f"through-proxy-{proxy.port}.kubeconfig"
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        yield path, proxy


@dataclass
class OperatorProcess:
    """`promptpipe-operator` watching one namespace; stop and start it like a pod restart."""

    kubeconfig: Path
    namespace: str
    log: Path
    resync_seconds: float = 30.0
    lease: str = ""  # with a name: leader election on that Lease (short timings, for tests)
    lease_namespace: str = SYSTEM_NAMESPACE
    env: dict[str, str] = field(default_factory=dict)  # more PROMPTPIPE_OPERATOR_* settings
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0

    def start(self) -> None:
        self.metrics_port = free_port()
        health = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PROMPTPIPE_OPERATOR_NAMESPACES": self.namespace,
            "PROMPTPIPE_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "PROMPTPIPE_OPERATOR_LIVENESS_ENDPOINT": f"http://127.0.0.1:{health}/healthz",
            "PROMPTPIPE_OPERATOR_RESYNC_SECONDS": str(self.resync_seconds),
            "PROMPTPIPE_OPERATOR_LOG_FORMAT": "json",
            **self.env,
        }
        if self.lease:
            env |= {
                "PROMPTPIPE_OPERATOR_LEADER_ELECTION": "true",
                "PROMPTPIPE_OPERATOR_LEASE_NAME": self.lease,
                "PROMPTPIPE_OPERATOR_LEASE_NAMESPACE": self.lease_namespace,
                "PROMPTPIPE_OPERATOR_LEASE_SECONDS": "4",
                "PROMPTPIPE_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS": "3",
                "PROMPTPIPE_OPERATOR_LEASE_RETRY_SECONDS": "1",
            }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "promptpipe_operator"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

        def alive() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"the operator exited:\n{self.log.read_text()[-3000:]}", pytrace=False)
            # A follower runs no kopf, so no kopf liveness endpoint: it serves its metrics.
            url = (
                f"http://127.0.0.1:{self.metrics_port}/metrics" if self.lease else f"http://127.0.0.1:{health}/healthz"
            )
            try:
                urllib.request.urlopen(url, timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(alive, "the operator to serve", timeout=30)

    def __enter__(self) -> OperatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self) -> None:
        """A crash: no chance to release anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def metric(self, name: str, labels: str = "") -> float:
        """A sample from the operator's /metrics (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
        return sum(float(m.group(2)) for m in pattern.finditer(text) if labels in (m.group(1) or ""))


@pytest.fixture(scope="session")
def promptpipe_crd(control_plane: ControlPlane, kube_tools: Tools) -> None:
    apply_crd(control_plane, kube_tools)


@pytest.fixture(scope="session")
def operator_identity(
    control_plane: ControlPlane, promptpipe_crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return operator_kubeconfig(control_plane, tmp_path_factory.mktemp("operator"))


@pytest.fixture
def operator(operator_identity: Path, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator, running as its ServiceAccount, watching the test's namespace."""
    op = OperatorProcess(operator_identity, namespace, tmp_path / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()
