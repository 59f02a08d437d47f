# promptpipe: one entry point for setting up, running and testing.
#   make demo   set everything up, start the quickstart pipeline, stream an answer, stop it
#   make test   set everything up and run every test
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
LLAMA_WHEEL := $(WHEELS)/.llama-cpp-python-$(LLAMA_VER).built
# Only the library is needed: no llama.cpp examples, tools or server binaries.
LLAMA_CMAKE := -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
STAMP       := $(VENV)/.installed
QUESTION    ?= When was the Eiffel Tower built?
export PROMPTPIPE_HOME ?= $(CURDIR)/.cache/local

.PHONY: help setup controlplane cluster-up cluster-down demo test test-fast proto manifests crd bench lint clean

help:
	@grep -E '^#   make' $(MAKEFILE_LIST) | sed 's/^#   //'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==25.3

# llama-cpp-python compiles llama.cpp from source (about 10 minutes on 2 cores): build it once.
$(LLAMA_WHEEL): | $(BIN)/python
	mkdir -p $(WHEELS)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE)" \
	  $(BIN)/pip wheel --no-deps --wheel-dir $(WHEELS) llama-cpp-python==$(LLAMA_VER)
	touch $@

$(STAMP): pyproject.toml constraints.txt $(LLAMA_WHEEL) | $(BIN)/python
	$(BIN)/pip install --quiet --find-links $(WHEELS) --constraint constraints.txt --editable '.[dev]'
	touch $@

# etcd, kube-apiserver, kube-controller-manager, kubectl, helm, skaffold and dockerfile-lint from
# the Go module proxy, Prometheus from Debian's package, plus KEDA's CRDs: built once into
# $(CACHE)/controlplane (about 20 minutes the first time on 2 cores); a no-op when they are there.
controlplane: $(STAMP)
	PROMPTPIPE_CACHE=$(CACHE) $(BIN)/promptpipe-dev cluster build

setup: $(STAMP) controlplane

# The demo needs no Kubernetes tools: only the Python install.
demo: $(STAMP)
	$(BIN)/promptpipe up -f deploy/examples/quickstart.yaml
	$(BIN)/promptpipe generate --session demo "$(QUESTION)" || { $(BIN)/promptpipe down; exit 1; }
	$(BIN)/promptpipe down

test: setup
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not processes and not model"

proto: setup
	$(BIN)/python protos/generate.py

# Generated manifests: the CRD from the spec models, the operator's RBAC rules from
# rbac.py, and deploy/install.yaml (for users without Helm) from the chart.
manifests: setup
	$(BIN)/python -m promptpipe.config.crd > deploy/crds/promptpipelines.promptpipe.io.yaml
	$(BIN)/python -m promptpipe.config.crd > charts/promptpipe/crds/promptpipelines.promptpipe.io.yaml
	$(BIN)/python -m promptpipe_operator.rbac > charts/promptpipe/files/operator-rules.yaml
	$(BIN)/python -m promptpipe_operator.rbac --leader-election > charts/promptpipe/files/leader-election-rules.yaml
	$(BIN)/python charts/generate.py > deploy/install.yaml

crd: manifests

cluster-up: setup
	PROMPTPIPE_CACHE=$(CACHE) $(BIN)/promptpipe-dev cluster up

cluster-down:
	$(BIN)/promptpipe-dev cluster down

bench: setup
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.operator
	$(BIN)/python -m bench.rollout

lint: setup
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache
