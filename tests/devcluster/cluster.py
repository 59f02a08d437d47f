"""Starting and stopping a local control plane: etcd, kube-apiserver and a
kube-controller-manager, on free loopback ports in a folder of their own, RBAC on, an
admin client certificate and a kubeconfig.

Alone (`wiring=None`), it is like envtest: only the garbage collector, namespace and
service-account controllers, no scheduler, so Deployments never get pods and tests write
their status. Wired to a node (`node.py`), it runs the controllers a real cluster has,
authorizes the node's kubelet, and advertises itself at the node's address."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from promptpipe.localproc import die_with_parent, exits, free_port
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.pki import issue, make_ca, make_pki


class ControlPlaneError(RuntimeError):
    pass


SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service: the first address of SERVICE_CIDR
FRONT_PROXY_CLIENT = "front-proxy-client"  # who the API server is to the aggregated APIs it proxies to
# What a cluster with a node runs: Deployments get ReplicaSets and pods, Services get endpoints,
# HPAs scale, namespaces and owners are cleaned up, every namespace gets its root CA ConfigMap.
NODE_CONTROLLERS = (
    "deployment,replicaset,endpoint,endpointslice,endpointslicemirroring,serviceaccount,serviceaccount-token,"
    "namespace,garbagecollector,horizontalpodautoscaling,root-ca-cert-publisher,nodelifecycle,podgc,ttl,"
    "statefulset,job,disruption"
)


@dataclass(frozen=True)
class Wiring:
    """How the control plane meets a node: the node's name and address (inside its network namespace)."""

    node_name: str
    node_ip: str

    def egress_socket(self, folder: Path) -> Path:
        """Where the API server meets the node (an HTTP CONNECT proxy inside its namespace)."""
        return folder / "egress.sock"


def egress_selector(socket: Path) -> dict[str, object]:
    """The API server reaches nodes and pods (logs, exec, port-forward) through a CONNECT proxy on a unix
    socket, as it does through konnectivity in clusters whose nodes it cannot route to."""
    return {
        "apiVersion": "apiserver.k8s.io/v1beta1",
        "kind": "EgressSelectorConfiguration",
        "egressSelections": [
            {
                "name": "cluster",
                "connection": {"proxyProtocol": "HTTPConnect", "transport": {"uds": {"udsName": str(socket)}}},
            }
        ],
    }


def kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "promptpipe-test",
        "clusters": [{"name": "promptpipe-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "admin", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "promptpipe-test", "context": {"cluster": "promptpipe-test", "user": "admin"}}],
    }


def apiserver_args(tools: Tools, folder: Path, etcd_url: str, port: int, wiring: Wiring | None = None) -> list[str]:
    pki = folder / "pki"
    if wiring is None:
        # ClusterIPs are only allocated (stored in etcd); nothing listens on or sends to them.
        node = ["--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none", "--authorization-mode=RBAC"]
    else:
        # The `kubernetes` Service's endpoint is the node's address, where a forwarder reaches this server.
        egress = folder / "egress-selector.yaml"
        egress.write_text(yaml.safe_dump(egress_selector(wiring.egress_socket(folder))))
        node = [
            f"--advertise-address={wiring.node_ip}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--egress-selector-config-file={egress}",
            "--kubelet-preferred-address-types=InternalIP",  # the node's address; its name resolves nowhere
            # The kubelet trusts this CA's clients: the API server signs in as the admin.
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            # Aggregated APIs (KEDA's external metrics): this server signs in to them as the front proxy, and
            # they trust the user it names in these headers.
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        ]
    return [
        str(tools.kube_apiserver),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1",
        *node,
        f"--secure-port={port}",
        f"--cert-dir={pki}",
        f"--tls-cert-file={pki / 'server.crt'}",
        f"--tls-private-key-file={pki / 'server.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        "--profiling=false",
        "--enable-priority-and-fairness=false",
        "--v=0",
    ]


def controller_manager_args(
    tools: Tools, folder: Path, kubeconfig: Path, port: int, wiring: Wiring | None = None
) -> list[str]:
    """Alone: only what makes the API behave as in a cluster (owner-reference garbage collection,
    namespace deletion, default ServiceAccounts), and no pods run. With a node: a cluster's controllers."""
    controllers = NODE_CONTROLLERS if wiring else "garbagecollector,namespace,serviceaccount"
    return [
        str(tools.kube_controller_manager),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--controllers={controllers}",
        f"--service-account-private-key-file={folder / 'pki' / 'sa.key'}",
        # Quick reactions for tests: an HPA reads its metrics every 5 s.
        "--horizontal-pod-autoscaler-sync-period=5s",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--root-ca-file={folder / 'pki' / 'ca.crt'}",
        "--v=0",
    ]


def etcd_args(tools: Tools, folder: Path, client_port: int, peer_port: int) -> list[str]:
    peer = f"http://127.0.0.1:{peer_port}"
    client = f"http://127.0.0.1:{client_port}"
    return [
        str(tools.etcd),
        "--name=default",
        f"--data-dir={folder / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


@dataclass
class ControlPlane:
    folder: str
    server: str
    kubeconfig: str
    etcd_pid: int
    apiserver_pid: int
    controller_manager_pid: int = 0

    @property
    def pids(self) -> list[int]:
        """In stopping order."""
        return [pid for pid in (self.controller_manager_pid, self.apiserver_pid, self.etcd_pid) if pid]

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig}

    def save(self) -> None:
        Path(self.folder, "controlplane.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> ControlPlane:
        return cls(**json.loads((folder / "controlplane.json").read_text()))

    @classmethod
    def start(
        cls,
        tools: Tools,
        folder: Path,
        *,
        tied_to_parent: bool = True,
        timeout: float = 60.0,
        wiring: Wiring | None = None,
    ) -> ControlPlane:
        """Start etcd and kube-apiserver; return once /readyz answers ok."""
        folder.mkdir(parents=True, exist_ok=True)
        pki_dir = folder / "pki"
        pki_dir.mkdir(exist_ok=True)
        if wiring is None:
            pki = make_pki()
        else:
            pki = make_pki((wiring.node_ip, KUBERNETES_SERVICE_IP), node=wiring.node_name)
            assert pki.node is not None
            front_ca = make_ca("promptpipe-test-front-proxy-ca")
            front = issue(front_ca, FRONT_PROXY_CLIENT, client=True)
            for name, data in (
                ("node.crt", pki.node.cert),
                ("node.key", pki.node.key),
                ("front-proxy-ca.crt", front_ca.cert),
                ("front-proxy-client.crt", front.cert),
                ("front-proxy-client.key", front.key),
            ):
                (pki_dir / name).write_bytes(data)
                (pki_dir / name).chmod(0o600)
        for name, data in (
            ("ca.crt", pki.ca.cert),
            ("ca.key", pki.ca.key),
            ("server.crt", pki.server.cert),
            ("server.key", pki.server.key),
            ("admin.crt", pki.admin.cert),
            ("admin.key", pki.admin.key),
            ("sa.key", pki.service_account_key),
            ("sa.pub", pki.service_account_pub),
        ):
            (pki_dir / name).write_bytes(data)
            (pki_dir / name).chmod(0o600)
        client_port, peer_port, api_port = free_port(), free_port(), free_port()
        preexec = die_with_parent if tied_to_parent else os.setsid
        etcd = _start(etcd_args(tools, folder, client_port, peer_port), folder / "etcd.log", preexec)
        api = _start(
            apiserver_args(tools, folder, f"http://127.0.0.1:{client_port}", api_port, wiring),
            folder / "kube-apiserver.log",
            preexec,
        )
        server = f"https://127.0.0.1:{api_port}"
        config = folder / "kubeconfig"
        config.touch(mode=0o600)  # it holds the admin's key path; kubectl warns about a readable one
        config.write_text(
            yaml.safe_dump(kubeconfig(server, pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key"))
        )
        plane = cls(str(folder), server, str(config), etcd.pid, api.pid)
        plane.save()
        try:
            plane.wait_ready(timeout, (etcd, api))
            kcm = _start(
                controller_manager_args(tools, folder, config, free_port(), wiring),
                folder / "kube-controller-manager.log",
                preexec,
            )
            plane.controller_manager_pid = kcm.pid
            plane.save()
        except BaseException:
            plane.stop()
            raise
        return plane

    def _ssl(self) -> ssl.SSLContext:
        pki = Path(self.folder) / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(pki / "admin.crt", pki / "admin.key")
        return ctx

    def wait_ready(self, timeout: float, procs: tuple[subprocess.Popen[bytes], ...] = ()) -> None:
        ctx = self._ssl()

        def ready() -> bool:
            for proc in procs:
                if proc.poll() is not None:
                    log = Path(self.folder, "kube-apiserver.log" if proc.pid == self.apiserver_pid else "etcd.log")
                    raise ControlPlaneError(f"{log.stem} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            with urllib.request.urlopen(self.server + "/readyz", context=ctx, timeout=2) as r:
                return bool(r.status == 200)

        try:
            wait_until(ready, "kube-apiserver's /readyz", timeout, every=0.2, retry_on=(OSError,))
        except TimeoutError as err:
            raise ControlPlaneError(str(err)) from None

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process (and anything they started); never leaves one behind."""
        for pid in self.pids:
            _signal_group(pid, signal.SIGTERM)
        stop_by = time.monotonic() + grace
        for pid in self.pids:
            if not exits(pid, max(0.0, stop_by - time.monotonic())):
                _signal_group(pid, signal.SIGKILL)
                exits(pid, 30.0)


def _start(args: list[str], log: Path, preexec: Callable[[], None]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, preexec_fn=preexec, stdout=out, stderr=subprocess.STDOUT)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
