"""Pinned versions of the control-plane parts. Changing one rebuilds only that part."""

KUBERNETES = "1.32.4"  # kube-apiserver and kubectl; the machine's kubectl is 1.32 too
# kube-apiserver 1.31+ reads consistently from its watch cache, which needs etcd >= 3.5.13.
ETCD = "3.5.21"
HELM = "3.16.4"
# The first KEDA releases whose ScaledObject CRD checks minReplicaCount <= maxReplicaCount (CEL)
# are after 2.16; 2.21.0 is pinned.
KEDA = "2.21.0"
# BuildKit, for its Dockerfile checks (dockerfile-lint); the binary's name carries the version.
BUILDKIT = "0.25.2"
# skaffold, to check skaffold.yaml with the real CLI (render, diagnose); the binary's name carries the version.
SKAFFOLD = "2.16.1"
# Prometheus, to run the rollout analysis's PromQL against the real thing, and on the node for KEDA: built
# from its Go module (v0.3XX.Y is release 3.XX.Y) with Kubernetes service discovery only. Debian's package
# has no Kubernetes service discovery at all.
PROMETHEUS = "3.16.0"
PROMETHEUS_MODULE = "v0.316.0"
# Jaeger v2 (`cmd/jaeger`, released in the v1.x module line): the tracing backend the trace tests export
# to over OTLP and read back through its query API; in-memory storage, no UI assets.
JAEGER = "1.76.0"
# ghz, the gRPC load tool bench/ drives surges with (a client that is not the bottleneck); bench only.
GHZ = "0.120.0"
# CoreDNS for the node's cluster DNS: 1.12.1 builds on the same k8s.io/client-go minor (0.32) as the cluster.
COREDNS = "1.12.1"
# containerd (with its runc shim and ctr) for the node, from its Go module: Debian bookworm's 1.6.20 lacks
# containerd#8805 (1.6.22): a pod resetting one port-forwarded connection ended the whole `kubectl port-forward`.
CONTAINERD = "1.7.35"
# The node's Debian packages (bookworm), as tested. Installed by name: Debian replaces a package's
# +deb12uN on its mirrors when a security update lands, and a newer one is what a fresh machine gets.
NODE_PACKAGES = {
    "runc": "1.1.5+ds1-1+deb12u1",
    "containernetworking-plugins": "1.1.1+ds1-3+b5",
    "buildah": "1.28.2+ds1-3+deb12u1+b3",
    "debootstrap": "1.0.128+nmu2+deb12u2",
    "iptables": "1.8.9-2",
    "conntrack": "1:1.4.7-1+b2",
    "redis-server": "5:7.0.15-1~deb12u10",
}
# The images' base: Debian bookworm with its own Python 3.11, from debootstrap.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
