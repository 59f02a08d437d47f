"""A real node for the test cluster, inside a network namespace of its own.

    netns pp-XXXX ── cni0 10.88.0.1/16 ── pods (bridge + host-local), each in its own netns
      containerd (runc, CNI)   kubelet   kube-proxy (iptables)   CoreDNS (10.0.0.10 → :53)
      NetworkPolicies enforced with iptables (`netpol`)
      forwarder 10.88.0.1:<api port> ─┐
                                      unix socket ── forwarder ── kube-apiserver 127.0.0.1:<api port>
    host: etcd, kube-apiserver, kube-controller-manager (a cluster's controllers), kube-scheduler

Every address of the node, its pods and its Services (10.0.0.0/24) lives inside the namespace: it
has no route anywhere else. The API server stays on loopback; unix sockets (files, which both sides
see) carry the bytes between them, for the kubelet and pods (the `kubernetes` Service), and for
tests reaching a Service (`forward`).

What the node changes on the machine is put back by `stop`, and by `reap` after a crash (run at
every start): its processes, containers, mounts, network namespaces, and the kernel sysctls the
kubelet sets. Each node keeps a record of that in `cache_root()/nodes/`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptpipe.localproc import alive, die_with_parent, exits, free_port, listening
from promptpipe.waiting import wait_until
from tests.devcluster import keda
from tests.devcluster.build import Tools, cache_root
from tests.devcluster.cluster import SERVICE_CIDR, ControlPlane, Wiring, kubeconfig
from tests.devcluster.images import Builder, Image
from tests.devcluster.keda import install_keda_crds

log = logging.getLogger(__name__)

NODE_NAME = "promptpipe-node"
NODE_IP = "10.88.0.1"
POD_CIDR = "10.88.0.0/16"
DNS_IP = "10.0.0.10"
METADATA_IP = "169.254.169.254"
CLUSTER_DOMAIN = "cluster.local"
# Kernel settings (not per network namespace) the kubelet sets at start: saved first, put back after.
KERNEL_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
ROOT = Path(__file__).resolve().parents[2]


class NodeError(RuntimeError):
    pass


def records_dir() -> Path:
    return cache_root() / "nodes"


@dataclass
class Record:
    """What a node changed on the machine, written before it changes anything."""

    netns: str
    folder: str
    sysctls: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return records_dir() / f"{self.netns}.json"

    def save(self) -> None:
        records_dir().mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(self), indent=2))
        partial.replace(self.path)


def _read_sysctls() -> dict[str, str]:
    out = {}
    for key in KERNEL_SYSCTLS:
        path = Path("/proc/sys") / key
        if path.exists():
            out[key] = path.read_text().strip()
    return out


def _restore_sysctls(saved: dict[str, str]) -> None:
    for key, value in saved.items():
        path = Path("/proc/sys") / key
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError as err:
            log.warning("could not restore %s to %s: %s", key, value, err)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result


def _mounts_under(folder: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return sorted((p for p in points if p == folder or p.startswith(folder + "/")), key=len, reverse=True)


def _shims_of(folder: str) -> list[int]:
    """containerd's shims for this node's containerd (they outlive it: they are daemons)."""
    socket = f"{folder}/containerd/containerd.sock"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def live_others(record: Record) -> list[Record]:
    """Other nodes on this machine whose test run is still going."""
    return [
        r
        for r in leftover_records()
        if r.netns != record.netns and r.pids.get("owner", 0) != 0 and alive(r.pids["owner"])
    ]


def _original_sysctls() -> dict[str, str]:
    """The machine's own values: a node already running has changed them, and saved them first."""
    running = [r for r in leftover_records() if r.pids.get("owner", 0) and alive(r.pids["owner"])]
    return dict(running[0].sysctls) if running else _read_sysctls()


def reap(record: Record) -> None:
    """Undo everything a node did, whatever state it was left in (idempotent)."""
    folder = record.folder
    for name, pid in record.pids.items():
        if name != "owner" and alive(pid):
            os.kill(pid, signal.SIGKILL)
            exits(pid, 10)
    runc_root = Path(folder, "runc", "k8s.io")
    if runc_root.exists():
        listed = _run("runc", "--root", str(runc_root), "list", "--quiet", check=False).stdout.split()
        for container in listed:
            _run("runc", "--root", str(runc_root), "delete", "--force", container, check=False)
    for pid in _shims_of(folder):
        os.kill(pid, signal.SIGKILL)
        exits(pid, 10)
    for point in _mounts_under(folder):
        _run("umount", "--lazy", point, check=False)
    if Path("/run/netns", record.netns).exists():
        _run("ip", "netns", "delete", record.netns, check=False)
    if not live_others(record):  # the last node out puts the kernel's settings back
        _restore_sysctls(record.sysctls)
    shutil.rmtree(folder, ignore_errors=True)
    record.path.unlink(missing_ok=True)


def leftover_records() -> list[Record]:
    records = []
    for path in sorted(records_dir().glob("*.json")) if records_dir().exists() else []:
        try:
            records.append(Record(**json.loads(path.read_text())))
        except (ValueError, TypeError):
            path.unlink()
    return records


def reap_leftovers() -> list[str]:
    """Clean up after nodes whose test run crashed; returns their names."""
    done = []
    for record in leftover_records():
        owner = record.pids.get("owner", 0)
        if owner and owner != os.getpid() and alive(owner):
            continue  # another test run's node, still in use
        log.warning("cleaning up after node %s", record.netns)
        reap(record)
        done.append(record.netns)
    return done


def containerd_config(folder: Path, sandbox_image: str) -> str:
    """containerd's own root, state, socket and CNI config; on this VM `restrict_oom_score_adj`
    (no CAP_SYS_RESOURCE), cgroupfs, and pod network namespaces under its state folder."""
    return f"""version = 2
root = "{folder}/containerd/root"
state = "{folder}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{folder}/containerd/containerd.sock"

[ttrpc]
  address = "{folder}/containerd/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{folder}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{folder}/runc"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{folder}/cni/net.d"
"""


def cni_config(folder: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "promptpipe",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                # Nothing leaves the namespace: no masquerade, no route out.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    # Pods reach Services through the node (where kube-proxy translates them), nothing beyond;
                    # and the cloud's metadata address, as on a cloud's node (nothing answers unless a test
                    # puts a listener there, to show what policies do to it).
                    "routes": [{"dst": SERVICE_CIDR}, {"dst": METADATA_IP + "/32"}],
                    "dataDir": str(folder / "cni" / "ipam"),
                },
            }
        ],
    }


def kubelet_config(folder: Path, pki: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{folder}/containerd/containerd.sock",
        # cgroup v1 on this VM, and no systemd.
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "address": NODE_IP,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(folder / "resolv.conf"),
        "podLogsDir": str(folder / "pod-logs"),
        "serializeImagePulls": False,
        # Pods are not evicted for a machine that is merely busy, nor images collected mid-run.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
    }


def kube_proxy_config(kubeconfig_path: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig_path)},
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_CIDR,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # A pod reaching a Service whose endpoint shares its bridge gets its answer back through the node.
        "iptables": {"masqueradeAll": True, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        # Leave the machine's conntrack table alone (it is not per namespace).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def corefile(kubeconfig_path: Path) -> str:
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig_path} promptpipe-test
        pods insecure
    }}
    cache 5
}}
.:53 {{
    errors
}}
"""


@dataclass
class Node:
    folder: str
    netns: str
    plane: ControlPlane
    api_port: int
    images: dict[str, str]  # image key (operator, stage, ...) → name in containerd
    kubectl_path: str
    ctr_path: str
    record: Record = field(repr=False)

    # ---- starting

    @classmethod
    def start(cls, tools: Tools, folder: Path, images: dict[str, Image] | None = None) -> Node:
        """A control plane wired to a fresh node, with `images` imported (default: every image
        of the project, built if needed); returns once the node is Ready, with cluster DNS and KEDA's CRDs."""
        reap_leftovers()
        netns = f"pp-{uuid.uuid4().hex[:8]}"
        folder = folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        record = Record(netns, str(folder), _original_sysctls(), {"owner": os.getpid()})
        record.save()
        try:
            built = images if images is not None else Builder(tools).all()
            node = cls._start(tools, folder, netns, record, built)
        except BaseException:
            reap(record)
            raise
        return node

    @classmethod
    def _start(cls, tools: Tools, folder: Path, netns: str, record: Record, images: dict[str, Image]) -> Node:
        _run("ip", "netns", "add", netns)
        for args in (
            ("link", "set", "lo", "up"),
            ("link", "add", "cni0", "type", "bridge"),
            ("addr", "add", f"{NODE_IP}/16", "dev", "cni0"),
            ("link", "set", "cni0", "up"),
            # The node's own processes reach Services too: the route lets a connection start, then
            # kube-proxy's rules translate it to a pod. There is no other route: nothing leaves.
            ("route", "add", SERVICE_CIDR, "dev", "cni0", "src", NODE_IP),
        ):
            _run("ip", "-n", netns, *args)
        plane = ControlPlane.start(tools, folder / "plane", wiring=Wiring(NODE_NAME, NODE_IP))
        record.pids |= {f"plane-{i}": pid for i, pid in enumerate(plane.pids)}
        record.save()
        api_port = int(plane.server.rsplit(":", 1)[1])
        node = cls(
            str(folder),
            netns,
            plane,
            api_port,
            {k: v.name for k, v in images.items()},
            str(tools.kubectl),
            str(tools.ctr),
            record,
        )
        pki = Path(plane.folder) / "pki"
        inside = f"https://{NODE_IP}:{api_port}"
        node._write_kubeconfig("admin-inside.kubeconfig", inside, pki / "admin.crt", pki / "admin.key")
        node._write_kubeconfig("kubelet.kubeconfig", inside, pki / "node.crt", pki / "node.key")

        # The API server, reached from inside at the node's address (also what the `kubernetes` Service points at).
        api_socket = folder / "api.sock"
        node._forwarder("api-out", f"unix:{api_socket}", f"tcp:127.0.0.1:{api_port}")
        wait_until(api_socket.exists, "the API server's socket", 10)
        node._forwarder("api-in", f"tcp:{NODE_IP}:{api_port}", f"unix:{api_socket}", inside=True)

        # The API server's way to the kubelet and pods (logs, exec, port-forward).
        egress = Wiring(NODE_NAME, NODE_IP).egress_socket(Path(plane.folder))
        node._forwarder("egress", f"unix:{egress}", "http-connect", inside=True)

        (folder / "resolv.conf").write_text("")  # no upstream DNS: nothing outside the cluster resolves
        cni = folder / "cni" / "net.d"
        cni.mkdir(parents=True, exist_ok=True)
        (cni / "10-promptpipe.conflist").write_text(json.dumps(cni_config(folder), indent=2))
        (folder / "containerd").mkdir(exist_ok=True)
        (folder / "containerd" / "config.toml").write_text(containerd_config(folder, images["pause"].name))
        node._spawn(
            "containerd",
            [str(tools.containerd), "--config", str(folder / "containerd" / "config.toml")],
            inside=True,
            env={"PATH": f"{tools.containerd.parent}:/usr/sbin:/sbin:{os.environ['PATH']}"},  # its own shim first
        )
        wait_until(lambda: _run(*node.ctr("version"), check=False).returncode == 0, "containerd", 30)
        for image in images.values():
            _run(*node.ctr("images", "import", "--no-unpack", str(image.archive)))

        (folder / "kubelet-config.yaml").write_text(yaml.safe_dump(kubelet_config(folder, pki)))
        node._spawn(
            "kubelet",
            [
                str(tools.kubelet),
                f"--config={folder / 'kubelet-config.yaml'}",
                f"--kubeconfig={folder / 'kubelet.kubeconfig'}",
                f"--root-dir={folder / 'kubelet'}",
                f"--cert-dir={folder / 'kubelet-pki'}",
                f"--node-ip={NODE_IP}",
                f"--hostname-override={NODE_NAME}",
                "--v=1",
            ],
            inside=True,
        )
        (folder / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config(folder / "admin-inside.kubeconfig")))
        node._spawn(
            "kube-proxy", [str(tools.kube_proxy), f"--config={folder / 'kube-proxy.yaml'}", "--v=1"], inside=True
        )
        node._spawn(
            "netpol",  # NetworkPolicies enforced, as by a CNI's policy agent
            [sys.executable, "-m", "tests.devcluster.netpol", f"--kubeconfig={folder / 'admin-inside.kubeconfig'}"],
            inside=True,
        )
        node._spawn(
            "kube-scheduler",
            [
                str(tools.kube_scheduler),
                f"--kubeconfig={plane.kubeconfig}",
                f"--authentication-kubeconfig={plane.kubeconfig}",
                f"--authorization-kubeconfig={plane.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--v=1",
            ],
        )
        (folder / "Corefile").write_text(corefile(folder / "admin-inside.kubeconfig"))
        node._spawn("coredns", [str(tools.coredns), "-conf", str(folder / "Corefile")], inside=True)
        node._wait_ready()
        node._publish_dns()
        install_keda_crds(plane, tools)  # pipelines' ScaledObjects need them, as in a cluster with KEDA
        node._start_autoscaling(tools)
        return node

    def _start_autoscaling(self, tools: Tools, timeout: float = 60) -> None:
        """What a cluster with KEDA runs: a Prometheus scraping the pods, KEDA's operator (ScaledObjects
        become HPAs; 0 ↔ 1 itself) and its metrics API server (what those HPAs read, through the aggregator)."""
        folder = Path(self.folder)
        inside = folder / "admin-inside.kubeconfig"
        (folder / "prometheus.yml").write_text(yaml.safe_dump(keda.prometheus_config(inside)))
        self._spawn(
            "prometheus",
            [
                str(tools.prometheus),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'prometheus'}",
                f"--web.listen-address={NODE_IP}:{keda.PROMETHEUS_PORT}",
                "--log.level=warn",
            ],
            inside=True,
        )
        certs = folder / "keda-certs"
        ca_bundle = keda.write_certs(certs, NODE_IP, CLUSTER_DOMAIN)
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(keda.metrics_api_objects(NODE_IP, ca_bundle)))
        env = keda.process_env(inside)
        self._spawn("keda-operator", keda.operator_args(tools, certs, NODE_IP), inside=True, env=env)
        self._spawn(
            "keda-metrics-apiserver",
            keda.adapter_args(tools, certs, NODE_IP, inside, CLUSTER_DOMAIN),
            inside=True,
            env=env,
        )

        def available() -> bool:
            self._check_alive()
            jsonpath = "jsonpath={.status.conditions[?(@.type=='Available')].status}"
            return self.kubectl("get", "apiservice", keda.METRICS_API, "-o", jsonpath, check=False).stdout == "True"

        try:
            wait_until(available, "KEDA's metrics API to be Available", timeout, every=0.5)
        except TimeoutError as err:
            status = self.kubectl("get", "apiservice", keda.METRICS_API, "-o", "jsonpath={.status}", check=False).stdout
            logs = {
                n: Path(self.folder, f"{n}.log").read_text(errors="replace")[-2000:]
                for n in ("keda-operator", "keda-metrics-apiserver")
            }
            raise NodeError(f"{err}; APIService status: {status}; logs: {logs}") from None

    @property
    def prometheus_url(self) -> str:
        """The node's Prometheus, as pods and KEDA reach it (`forward` it to reach it from outside)."""
        return f"http://{NODE_IP}:{keda.PROMETHEUS_PORT}"

    def _write_kubeconfig(self, name: str, server: str, cert: Path, key: Path) -> None:
        ca = Path(self.plane.folder) / "pki" / "ca.crt"
        Path(self.folder, name).write_text(yaml.safe_dump(kubeconfig(server, ca, cert, key)))

    def _spawn(
        self, name: str, args: list[str], inside: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process of the node (in its network namespace if `inside`, with `env` added), logging
        to `<name>.log`."""
        command = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *args] if inside else args
        with Path(self.folder, f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                cwd=ROOT,
                env={**os.environ, "PATH": f"/usr/sbin:/sbin:{os.environ['PATH']}", **(env or {})},
            )
        self.record.pids[name] = proc.pid
        self.record.save()
        return proc

    def _forwarder(self, name: str, listen: str, connect: str, inside: bool = False) -> subprocess.Popen[bytes]:
        """A `tests.devcluster.forward` process: `listen` and `connect` as tcp:HOST:PORT, unix:PATH, http-connect."""
        forward = [sys.executable, "-m", "tests.devcluster.forward", "--listen", listen, "--connect", connect]
        return self._spawn(name, forward, inside=inside)

    def ctr(self, *args: str) -> list[str]:
        return [self.ctr_path, "--address", f"{self.folder}/containerd/containerd.sock", "--namespace", "k8s.io", *args]

    def kill_container(self, container: str) -> None:
        """SIGKILL a container's process, as an OOM kill or a crash would end it."""
        _run(*self.ctr("tasks", "kill", "--signal", "SIGKILL", container))

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The pinned kubectl as the admin; with `check`, a failure raises naming kubectl's message."""
        result = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.plane.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def _check_alive(self) -> None:
        for name, pid in self.record.pids.items():
            if name != "owner" and not alive(pid):
                tail = Path(self.folder, f"{name}.log").read_text(errors="replace")[-3000:]
                raise NodeError(f"{name} exited while the node started; its log ends:\n{tail}")

    def _wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            self._check_alive()
            jsonpath = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
            return self.kubectl("get", "node", NODE_NAME, "-o", jsonpath, check=False).stdout.strip() == "True"

        wait_until(ready, f"node {NODE_NAME} to be Ready", timeout, every=0.5)

    def _publish_dns(self) -> None:
        """The cluster's DNS Service: kube-dns at DNS_IP, its endpoint CoreDNS on the node's address."""
        manifests = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
                "spec": {
                    "clusterIP": DNS_IP,
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP"},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    ],
                },
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "kube-dns-node",
                    "namespace": "kube-system",
                    "labels": {"kubernetes.io/service-name": "kube-dns"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        ]
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))

    # ---- using

    def run_inside(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A process of the test's own inside the node's network namespace (a server pods reach at the node's
        address, as at a host's); it lasts as long as the node, logging to `<name>.log` in its folder."""
        return self._spawn(name, args, inside=True, env=env)

    def ip(self, *args: str) -> None:
        """`ip` inside the node's network namespace (an address a test adds to it, say)."""
        _run("ip", "-n", self.netns, *args)

    def iptables(self, *args: str) -> str:
        """`iptables` inside the node's network namespace: the rules kube-proxy and the policy enforcer wrote."""
        return _run("nsenter", f"--net=/run/netns/{self.netns}", "--", "iptables", "-w", "5", *args).stdout

    def forward(self, target: str, port: int) -> int:
        """A loopback port that reaches `target:port` inside the node (a Service's ClusterIP, a pod's IP),
        listening when this returns; it lasts as long as the node."""
        sock = Path(self.folder, f"forward-{uuid.uuid4().hex[:8]}.sock")
        local = free_port()
        self._forwarder(f"forward-in-{sock.stem}", f"unix:{sock}", f"tcp:{target}:{port}", inside=True)
        wait_until(sock.exists, "the forward's socket", 10)
        self._forwarder(f"forward-out-{sock.stem}", f"tcp:127.0.0.1:{local}", f"unix:{sock}")
        wait_until(lambda: listening(local), f"127.0.0.1:{local} to listen", 10)
        return local

    # ---- stopping

    def stop(self) -> None:
        """Stop everything and put the machine back as it was."""
        record = self.record
        # The kubelet first, so nothing restarts the containers that go next. Nothing of the node
        # needs a graceful end: it goes whole.
        for name in (
            "keda-operator",
            "keda-metrics-apiserver",
            "kubelet",
            "kube-scheduler",
            "kube-proxy",
            "netpol",
            "coredns",
        ):
            pid = record.pids.get(name)
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
                exits(pid, 10)
        self.plane.stop()
        record.pids.pop("owner", None)
        reap(record)
