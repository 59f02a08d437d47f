# promptpipe: one entry point for setting up, running and testing.
#   make demo   set everything up, start the quickstart pipeline, stream an answer, stop it
#   make test   set everything up and run every test
#   make test-fast  only the pure tests, right after the Python install (no Go build)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON      ?= python3.11
VENV        := .venv
BIN         := $(VENV)/bin
# Heavy builds are cached outside the clone, so a fresh clone on the same machine reuses them.
CACHE       ?= $(HOME)/.cache/promptpipe
WHEELS      := $(CACHE)/wheels
LLAMA_VER   := 0.3.36
# Only the library is needed: no llama.cpp examples, tools or server binaries. Not tuned to the build
# machine's CPU (GGML_NATIVE): its AMX kernels fault where the kernel does not grant AMX to processes
# (general protection fault in ggml_backend_amx_mul_mat), and the wheel also goes into images that
# run elsewhere. AVX2 + FMA + F16C (x86-64-v3) is what any recent x86 server has.
LLAMA_CMAKE := -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# Keyed by the build flags too: changing them builds the wheel again.
LLAMA_WHEEL := $(WHEELS)/.llama-cpp-python-$(LLAMA_VER)-$(shell echo '$(LLAMA_CMAKE)' | sha256sum | cut -c1-12).built
STAMP       := $(VENV)/.installed
# Every pinned dependency as a wheel, for installs without an index: the per-image venv test and image builds.
WHEELHOUSE  := $(WHEELS)/.complete-$(shell cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
DEV         := $(BIN)/python -m tests.devcluster
QUESTION    ?= When was the Eiffel Tower built?
export PROMPTPIPE_HOME ?= $(CURDIR)/.cache/local

.PHONY: help lock setup wheelhouse controlplane cluster-up cluster-down node-up node-down demo test test-fast faults proto manifests crd bench lint clean

help:
	@grep -E '^#   make' $(MAKEFILE_LIST) | sed 's/^#   //'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==25.3

# llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores): build it once, from the
# source archive whose hash requirements/llama-cpp.txt gives.
$(LLAMA_WHEEL): | $(BIN)/python
	mkdir -p $(WHEELS)
	rm -f $(WHEELS)/llama_cpp_python-$(LLAMA_VER)-*.whl  # else pip keeps the wheel it finds there
	time CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE)" \
	  $(BIN)/pip wheel --no-cache-dir --no-deps --require-hashes --wheel-dir $(WHEELS) -r requirements/llama-cpp.txt
	touch $@

$(STAMP): pyproject.toml constraints.txt $(LLAMA_WHEEL) | $(BIN)/python
	$(BIN)/pip install --quiet --find-links $(WHEELS) --constraint constraints.txt --editable '.[dev]'
	# A venv made before the wheel was built again keeps the old build unless told.
	$(BIN)/pip install --quiet --no-index --no-deps --force-reinstall --find-links $(WHEELS) llama-cpp-python==$(LLAMA_VER)
	touch $@

# pip's own cache makes this mostly copying; the build backend comes along, so a wheel of ours builds offline too.
$(WHEELHOUSE): $(STAMP)
	$(BIN)/pip wheel --quiet --wheel-dir $(WHEELS) --find-links $(WHEELS) --requirement constraints.txt setuptools==80.9.0
	touch $@

wheelhouse: $(WHEELHOUSE)

# etcd, kube-apiserver, kube-controller-manager, kubectl, helm, skaffold, dockerfile-lint, Prometheus
# and promtool, Jaeger (the tracing backend) and KEDA (with only the scalers the project uses) from the Go
# module proxy, plus KEDA's CRDs; the node's kubelet, kube-scheduler, kube-proxy, CoreDNS, pause and
# containerd, and its Debian packages (runc, CNI, buildah, debootstrap, iptables: apt-get install, as
# root). Built once into $(CACHE)/controlplane (about 26 minutes the first time on 2 cores: the setup log
# times each part); a no-op when they are there.
controlplane: $(STAMP)
	PROMPTPIPE_CACHE=$(CACHE) $(DEV) cluster build

setup: $(STAMP) $(WHEELHOUSE) controlplane

# The demo needs no Kubernetes tools: only the Python install.
demo: $(STAMP)
	$(BIN)/promptpipe up -f deploy/examples/quickstart.yaml
	$(BIN)/promptpipe generate --session demo "$(QUESTION)" || { $(BIN)/promptpipe down; exit 1; }
	$(BIN)/promptpipe down

# The pure tier: every test that starts nothing (no process, server or Go-built tool). It needs only
# the Python install, and fails a test that starts a process without saying so in its markers.
PURE := not (processes or model or controlplane or helm or skaffold or dockerfile_lint or prometheus or jaeger or moto or redis or venv or node)

# The node's images are built (or found cached) before the tests: on a new machine that takes longer
# than a test may (the base image, llama.cpp in two images).
test: setup lint
	PROMPTPIPE_CACHE=$(CACHE) $(DEV) node images
	PROMPTPIPE_CACHE=$(CACHE) $(BIN)/python -m pytest -q -ra --durations=12

# matplotlib builds its font cache (running fc-list) the first time it is used: built here, before the
# pure tier, which refuses any test that starts a process.
test-fast: $(STAMP)
	$(BIN)/python -c "import matplotlib.font_manager"
	PROMPTPIPE_PURE_TESTS=1 $(BIN)/python -m pytest -q -m "$(PURE)"

# The fault run alone, with its report (it is part of `make test` too).
faults: setup
	PROMPTPIPE_CACHE=$(CACHE) $(BIN)/python -m pytest -q -s -m faults

proto: setup
	$(BIN)/python protos/generate.py

# Generated manifests: the CRD from the spec models, the operator's RBAC rules from
# rbac.py, and deploy/install.yaml (for users without Helm) from the chart.
manifests: setup
	$(BIN)/python -m promptpipe.contract.crd > deploy/crds/promptpipelines.promptpipe.io.yaml
	$(BIN)/python -m promptpipe.contract.crd > charts/promptpipe/crds/promptpipelines.promptpipe.io.yaml
	$(BIN)/python -m promptpipe_operator.rbac > charts/promptpipe/files/operator-rules.yaml
	$(BIN)/python -m promptpipe_operator.rbac --namespaced > charts/promptpipe/files/operator-namespaced-rules.yaml
	$(BIN)/python -m promptpipe_operator.rbac --cluster > charts/promptpipe/files/operator-cluster-rules.yaml
	$(BIN)/python -m promptpipe_operator.rbac --leader-election > charts/promptpipe/files/leader-election-rules.yaml
	$(BIN)/python -m charts.generate > deploy/install.yaml

crd: manifests

# The images' hashed dependency locks (requirements/*.txt) from pyproject.toml and constraints.txt: run after
# changing either (pip-compile asks the package index for every file's hash).
lock: $(STAMP)
	$(BIN)/python -m requirements.generate

cluster-up: setup
	PROMPTPIPE_CACHE=$(CACHE) $(DEV) cluster up

cluster-down:
	$(DEV) cluster down

# A control plane with a real node (containerd, kubelet, kube-proxy, CoreDNS) running the project's images,
# in the foreground until Ctrl-C; node-down cleans up after one that did not stop.
node-up: setup
	PROMPTPIPE_CACHE=$(CACHE) $(DEV) node up

node-down:
	$(DEV) node down

bench: setup
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.operator
	$(BIN)/python -m bench.rollout
	$(BIN)/python -m bench.postfilter
	$(BIN)/python -m bench.routing
	$(BIN)/python -m bench.http
	$(BIN)/python -m bench.fairness
	$(BIN)/python -m bench.quota_store

# Boundaries between the deployables (import-linter), style (ruff) and types (mypy --strict).
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache
