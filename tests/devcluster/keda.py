"""KEDA in the test cluster: its CRDs (from KEDA's published module, `build.fetch_keda_crds`); on a node,
also its operator and metrics API server (built from the same module), and the Prometheus they read."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

from kubernetes import client, config

from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.devcluster.pki import issue, make_ca


def install_keda_crds(plane: ControlPlane, tools: Tools, timeout: float = 30.0) -> None:
    """KEDA's own CRDs, so every ScaledObject is checked against KEDA's real schema."""
    subprocess.run(
        [str(tools.kubectl), f"--kubeconfig={plane.kubeconfig}", "apply", "--server-side", "-f", str(tools.keda_crds)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # Polled here: `kubectl wait` fails outright while a new CRD has no conditions yet.
    api = config.new_client_from_config(config_file=plane.kubeconfig)
    try:
        crds = client.ApiextensionsV1Api(api)
        # `<group>_<plural>.yaml` is the CRD `<plural>.<group>`.
        names = [".".join(reversed(p.stem.split("_", 1))) for p in tools.keda_crds.glob("*.yaml")]
        for name in names:
            wait_until(
                lambda: _established(crds.read_custom_resource_definition(name)),
                f"CRD {name} to be Established",
                timeout,
                every=0.1,
            )
    finally:
        api.close()


def _established(crd: client.V1CustomResourceDefinition) -> bool:
    conditions = (crd.status.conditions if crd.status else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


# ---- KEDA running on a node: its operator, its metrics API server, and the Prometheus they read.

NAMESPACE = "keda"
OPERATOR_SERVICE = "keda-operator"
METRICS_SERVICE = "keda-metrics-apiserver"
METRICS_API = "v1beta1.external.metrics.k8s.io"
ADAPTER_PORT = 6443
OPERATOR_GRPC_PORT = 9666
# 9090 is every stage pod's metrics port; this Prometheus is the node's own, on the node's address.
PROMETHEUS_PORT = 9091
SCRAPE_SECONDS = 2


def service_names(service: str, domain: str) -> tuple[str, ...]:
    return (f"{service}.{NAMESPACE}.svc", f"{service}.{NAMESPACE}.svc.{domain}")


def prometheus_config(kubeconfig: Path) -> dict[str, Any]:
    """Scrapes the pods that ask for it (`prometheus.io/scrape` and `/port` annotations), found through the API
    server, labelled with their namespace and pod as a cluster's Prometheus labels them."""
    return {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "scrape_configs": [
            {
                "job_name": "pods",
                "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
                "relabel_configs": [
                    {
                        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
                        "regex": "true",
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
                    {
                        "source_labels": [
                            "__meta_kubernetes_pod_ip",
                            "__meta_kubernetes_pod_annotation_prometheus_io_port",
                        ],
                        "regex": "(.+);(\\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ],
    }


def metrics_api_objects(node_ip: str, ca_bundle: bytes) -> list[dict[str, Any]]:
    """KEDA's metrics API server registered with the aggregator, as KEDA's own manifests register it; its
    Service's endpoint is the node's address, where the server runs."""
    port = {"name": "https", "port": 443, "targetPort": ADAPTER_PORT, "protocol": "TCP"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": METRICS_SERVICE, "namespace": NAMESPACE},
            "spec": {"ports": [port]},
        },
        {
            # Endpoints, not an EndpointSlice: the aggregator looks its backends up there (and the mirroring
            # controller makes the slice kube-proxy reads).
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": METRICS_SERVICE, "namespace": NAMESPACE},
            "subsets": [
                {"addresses": [{"ip": node_ip}], "ports": [{"name": "https", "port": ADAPTER_PORT, "protocol": "TCP"}]}
            ],
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": METRICS_API},
            "spec": {
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "service": {"name": METRICS_SERVICE, "namespace": NAMESPACE, "port": 443},
                "caBundle": base64.b64encode(ca_bundle).decode(),
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
    ]


def write_certs(folder: Path, node_ip: str, domain: str) -> bytes:
    """The certificate KEDA's operator (gRPC) and metrics API server serve, and present to each other;
    returns the CA's certificate (the APIService's caBundle)."""
    ca = make_ca("promptpipe-test-keda-ca")
    names = (*service_names(OPERATOR_SERVICE, domain), *service_names(METRICS_SERVICE, domain))
    leaf = issue(ca, "keda", dns=names, ips=(node_ip, "127.0.0.1"), server=True, client=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("ca.crt", ca.cert), ("tls.crt", leaf.cert), ("tls.key", leaf.key)):
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o600)
    return ca.cert


def operator_args(tools: Tools, certs: Path, node_ip: str) -> list[str]:
    return [
        str(tools.keda),
        f"--cert-dir={certs}",
        f"--metrics-service-bind-address={node_ip}:{OPERATOR_GRPC_PORT}",
        "--metrics-bind-address=127.0.0.1:8082",
        "--health-probe-bind-address=127.0.0.1:8081",
        "--enable-cert-rotation=false",
        "--leader-elect=false",
        "--zap-log-level=info",
    ]


def adapter_args(tools: Tools, certs: Path, node_ip: str, kubeconfig_path: Path, domain: str) -> list[str]:
    return [
        str(tools.keda_adapter),
        f"--cert-dir={certs}",
        f"--tls-cert-file={certs / 'tls.crt'}",
        f"--tls-private-key-file={certs / 'tls.key'}",
        f"--bind-address={node_ip}",
        f"--secure-port={ADAPTER_PORT}",
        "--port=8083",
        f"--authentication-kubeconfig={kubeconfig_path}",
        f"--authorization-kubeconfig={kubeconfig_path}",
        f"--lister-kubeconfig={kubeconfig_path}",
        f"--metrics-service-address={node_ip}:{OPERATOR_GRPC_PORT}",
        f"--metrics-service-grpc-authority={service_names(OPERATOR_SERVICE, domain)[1]}",
        "--zap-log-level=info",
    ]


def process_env(kubeconfig_path: Path) -> dict[str, str]:
    """As in KEDA's pods: every namespace watched, its own objects in `keda`."""
    return {
        "KUBECONFIG": str(kubeconfig_path),
        "WATCH_NAMESPACE": "",
        "POD_NAMESPACE": NAMESPACE,
        "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
    }
