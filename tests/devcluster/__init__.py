"""The test cluster: a real Kubernetes control plane (etcd, kube-apiserver, a
kube-controller-manager with the garbage-collector, namespace and service-account
controllers), with helm, kubectl and the other tools the tests run, built from pinned
sources. Test infrastructure: nothing under services/ or operator/ imports it, and
neither the wheel nor an image carries it.
"""
