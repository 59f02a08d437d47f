"""A real Kubernetes control plane for tests and development: etcd + kube-apiserver
(no kubelet, no controllers), helm and kubectl, built from pinned sources.

Services never import this package.
"""
