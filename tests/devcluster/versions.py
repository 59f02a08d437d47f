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
# Prometheus, to run the rollout analysis's PromQL against the real thing: Debian bookworm's package
# (a Go build of prometheus pulls every service-discovery SDK). Debian replaces a security update's
# predecessor on its mirrors: a refused download means a newer `+deb12uN`, bump it here.
PROMETHEUS_DEB = "2.42.0+ds-5+deb12u1"
PROMETHEUS = PROMETHEUS_DEB.split("+", 1)[0]
