"""Building the control-plane binaries from the Go module proxy, once, into a cache.

kube-apiserver cannot be `go install`ed: k8s.io/kubernetes's go.mod replaces every
k8s.io staging module with a local path (kubernetes issue #79384). A small wrapper
module of ours requires k8s.io/kubernetes and replaces each staging module with its
published v0.Y.Z instead. etcd's server module has local replaces too, so it gets a
wrapper as well (a dependency's replaces are ignored). helm installs directly.
kube-controller-manager is built too: run with only the garbage collector, namespace
and service-account controllers, it makes owner references and namespace deletion
behave as in a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.devcluster import dockerfile_lint, jaeger_trim, versions

log = logging.getLogger(__name__)

# `replace path => path vX` lines of a go.mod (replaces to another version, not to a folder).
_VERSION_REPLACE = re.compile(r"^replace\s+(\S+)(?:\s+v\S+)?\s+=>\s+\1\s+(v\S+)\s*$", re.MULTILINE)
_LOCAL_REPLACE = re.compile(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/src/\1\s*$", re.MULTILINE)


@contextmanager
def timed(what: str) -> Iterator[None]:
    """Logs how long the block took: the setup log then shows where a first run on a new machine spends
    its time."""
    started = time.monotonic()
    yield
    log.info("built %s in %.0f s", what, time.monotonic() - started)


def cache_root() -> Path:
    return Path(os.environ.get("PROMPTPIPE_CACHE", Path.home() / ".cache" / "promptpipe"))


@dataclass(frozen=True)
class Tools:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path
    helm: Path
    keda_crds: Path  # a folder of keda.sh CRD manifests
    dockerfile_lint: Path
    skaffold: Path
    prometheus: Path
    # From the same module and build: `promtool test rules` unit-tests the chart's alerting rules.
    promtool: Path
    # The tracing backend (Jaeger v2, all in one: OTLP in, query API out).
    jaeger: Path
    # The node: kubelet, kube-scheduler and kube-proxy from the same build as kube-apiserver; CoreDNS with
    # the plugins a cluster's DNS needs; the pause program every pod's sandbox runs.
    kubelet: Path
    kube_scheduler: Path
    kube_proxy: Path
    coredns: Path
    pause: Path
    # KEDA's operator and its metrics API server, from the module whose CRDs are `keda_crds`.
    keda: Path
    keda_adapter: Path
    # containerd with its runc shim and ctr, in a folder of their own: containerd finds the shim on its PATH.
    containerd: Path
    containerd_shim: Path
    ctr: Path


def tools_dir() -> Path:
    return (
        cache_root()
        / "controlplane"
        / (f"kubernetes-{versions.KUBERNETES}_etcd-{versions.ETCD}_helm-{versions.HELM}_keda-{versions.KEDA}")
    )


def expected_tools(root: Path | None = None) -> Tools:
    root = root or tools_dir()
    b = root / "bin"
    return Tools(
        b / "etcd",
        b / "kube-apiserver",
        b / "kube-controller-manager",
        b / "kubectl",
        b / "helm",
        root / "keda-crds",
        b / f"dockerfile-lint-buildkit-{versions.BUILDKIT}",
        b / f"skaffold-{versions.SKAFFOLD}",
        b / f"prometheus-{versions.PROMETHEUS}",
        b / f"promtool-{versions.PROMETHEUS}",
        b / f"jaeger-{versions.JAEGER}",
        b / "kubelet",
        b / "kube-scheduler",
        b / "kube-proxy",
        b / f"coredns-{versions.COREDNS}",
        b / "pause",
        b / f"keda-{'-'.join(KEDA_TRIGGERS)}",
        b / f"keda-adapter-{'-'.join(KEDA_TRIGGERS)}",
        b / f"containerd-{versions.CONTAINERD}" / "containerd",
        b / f"containerd-{versions.CONTAINERD}" / "containerd-shim-runc-v2",
        b / f"containerd-{versions.CONTAINERD}" / "ctr",
    )


def staging_modules(kubernetes_gomod: str) -> list[str]:
    """The k8s.io modules that k8s.io/kubernetes's go.mod points at ./staging/src."""
    return sorted(_LOCAL_REPLACE.findall(kubernetes_gomod))


def wrapper_gomod(module: str, requires: dict[str, str], replaces: dict[str, str]) -> str:
    lines = [f"module {module}", "", "go 1.23", "", "require ("]
    lines += [f"\t{path} {version}" for path, version in sorted(requires.items())]
    lines.append(")")
    if replaces:
        lines += ["", "replace ("]
        # A replace by a folder ("./x") or by another version of the same module.
        lines += [
            f"\t{path} => {version}" if version.startswith("./") else f"\t{path} => {path} {version}"
            for path, version in sorted(replaces.items())
        ]
        lines.append(")")
    return "\n".join(lines) + "\n"


def tools_go(packages: list[str]) -> str:
    imports = "\n".join(f'\t_ "{p}"' for p in packages)
    return f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # The checksum database reachable here has no entries for k8s.io/kubernetes and
    # several k8s.io staging modules; those are taken from the proxy by pinned version
    # without it, every other module is verified as usual. Never fetch a Go toolchain.
    env.update({"GONOSUMDB": "k8s.io", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"})
    return env


def _go(args: list[str], cwd: Path) -> str:
    log.info("go %s", " ".join(args))
    done = subprocess.run(["go", *args], cwd=cwd, env=_go_env(), check=True, text=True, stdout=subprocess.PIPE)
    return done.stdout


def _module_file(path: str, version: str, work: Path) -> dict[str, str]:
    info: dict[str, str] = json.loads(_go(["mod", "download", "-json", f"{path}@{version}"], work))
    return info


def _wrapper(work: Path, requires: dict[str, str], replaces: dict[str, str], packages: list[str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(wrapper_gomod("promptpipe.local/controlplane", requires, replaces))
    (work / "tools.go").write_text(tools_go(packages))
    _go(["mod", "tidy"], work)


CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kubectl")
NODE = ("kubelet", "kube-scheduler", "kube-proxy")


def build_kubernetes(bin_dir: Path, work: Path, commands: tuple[str, ...] = CONTROL_PLANE) -> None:
    """kubelet & co. share the wrapper module, and most packages, with kube-apiserver: a second build is short."""
    v = versions.KUBERNETES
    work.mkdir(parents=True, exist_ok=True)
    gomod = Path(_module_file("k8s.io/kubernetes", f"v{v}", work)["GoMod"]).read_text()
    staging = {m: "v0." + v.split(".", 1)[1] for m in staging_modules(gomod)}
    # Every command the harness builds is listed, so tidying for one set never drops another's modules.
    _wrapper(
        work, {"k8s.io/kubernetes": f"v{v}"}, staging, [f"k8s.io/kubernetes/cmd/{c}" for c in CONTROL_PLANE + NODE]
    )
    major, minor, _ = v.split(".")
    stamp = " ".join(
        f"-X k8s.io/component-base/version.{k}={val}"
        for k, val in (("gitVersion", f"v{v}"), ("gitMajor", major), ("gitMinor", minor), ("gitTreeState", "clean"))
    )
    for cmd in commands:
        _go(
            ["build", "-trimpath", f"-ldflags=-s -w {stamp}", "-o", str(bin_dir / cmd), f"k8s.io/kubernetes/cmd/{cmd}"],
            work,
        )


# CoreDNS with the plugins a cluster's DNS uses, and nothing that reaches a cloud (its full build pulls every
# cloud SDK). Plugin order comes from CoreDNS's own directive list, so a Corefile reads as anywhere.
COREDNS_MAIN = """// coredns for the test node: CoreDNS's own main, with fewer plugins.
package main

import (
\t"github.com/coredns/coredns/coremain"

\t_ "github.com/coredns/coredns/plugin/cache"
\t_ "github.com/coredns/coredns/plugin/errors"
\t_ "github.com/coredns/coredns/plugin/health"
\t_ "github.com/coredns/coredns/plugin/kubernetes"
\t_ "github.com/coredns/coredns/plugin/log"
\t_ "github.com/coredns/coredns/plugin/loop"
\t_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
\tcoremain.Run()
}
"""


def build_coredns(dest: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    module = "github.com/coredns/coredns"
    gomod = Path(_module_file(module, f"v{versions.COREDNS}", work)["GoMod"]).read_text()
    (work / "go.mod").write_text(
        wrapper_gomod(
            "promptpipe.local/coredns", {module: f"v{versions.COREDNS}"}, dict(_VERSION_REPLACE.findall(gomod))
        )
    )
    (work / "main.go").write_text(COREDNS_MAIN)
    _go(["mod", "tidy"], work)
    _go(["build", "-trimpath", "-ldflags=-s -w", "-o", str(dest), "."], work)


# Every pod's sandbox runs this: it holds the pod's namespaces and reaps orphans until it is told to stop.
PAUSE_MAIN = """// pause: the sandbox process of every pod on the test node.
package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tsignals := make(chan os.Signal, 1)
\tsignal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
\tfor s := range signals {
\t\tif s == syscall.SIGCHLD {
\t\t\tfor {
\t\t\t\tpid, _ := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
\t\t\t\tif pid <= 0 {
\t\t\t\t\tbreak
\t\t\t\t}
\t\t\t}
\t\t\tcontinue
\t\t}
\t\tos.Exit(0)
\t}
}
"""


def build_pause(dest: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text("module promptpipe.local/pause\n\ngo 1.23\n")
    (work / "main.go").write_text(PAUSE_MAIN)
    _go(["build", "-trimpath", "-ldflags=-s -w", "-o", str(dest), "."], work)


def build_etcd(bin_dir: Path, work: Path) -> None:
    _wrapper(work, {"go.etcd.io/etcd/server/v3": f"v{versions.ETCD}"}, {}, ["go.etcd.io/etcd/server/v3"])
    _go(["build", "-trimpath", "-ldflags=-s -w", "-o", str(bin_dir / "etcd"), "go.etcd.io/etcd/server/v3"], work)


def build_helm(bin_dir: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    env_bin = work / "gobin"
    env = _go_env() | {"GOBIN": str(env_bin)}
    stamp = f"-X helm.sh/helm/v3/internal/version.version=v{versions.HELM}"
    subprocess.run(
        ["go", "install", "-trimpath", f"-ldflags=-s -w {stamp}", f"helm.sh/helm/v3/cmd/helm@v{versions.HELM}"],
        cwd=work,
        env=env,
        check=True,
    )
    shutil.move(env_bin / "helm", bin_dir / "helm")


def build_dockerfile_lint(dest: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(
        wrapper_gomod("promptpipe.local/dockerfile-lint", {"github.com/moby/buildkit": f"v{versions.BUILDKIT}"}, {})
    )
    (work / "main.go").write_text(dockerfile_lint.MAIN_GO)
    _go(["mod", "tidy"], work)
    _go(["build", "-trimpath", "-ldflags=-s -w", "-o", str(dest), "."], work)


def build_skaffold(dest: Path, work: Path) -> None:
    """skaffold pins some dependencies with replaces in its go.mod, which a dependent ignores: copy them."""
    v = versions.SKAFFOLD
    work.mkdir(parents=True, exist_ok=True)
    module = "github.com/GoogleContainerTools/skaffold/v2"
    gomod = Path(_module_file(module, f"v{v}", work)["GoMod"]).read_text()
    command = f"{module}/cmd/skaffold"
    _wrapper(work, {module: f"v{v}"}, dict(_VERSION_REPLACE.findall(gomod)), [command])
    _go(
        [
            "build",
            "-trimpath",
            f"-ldflags=-s -w -X {module}/pkg/skaffold/version.version=v{v}",
            "-o",
            str(dest),
            command,
        ],
        work,
    )


def _module_wrapper(work: Path, module: str, version: str, commands: list[str]) -> None:
    """A wrapper module for commands of `module`, with the replaces its go.mod pins (a dependent ignores
    them: copied)."""
    work.mkdir(parents=True, exist_ok=True)
    gomod = Path(_module_file(module, version, work)["GoMod"]).read_text()
    _wrapper(work, {module: version}, dict(_VERSION_REPLACE.findall(gomod)), [f"{module}/{c}" for c in commands])


def _build_module_command(dest: Path, work: Path, module: str, version: str, command: str) -> None:
    """One command of a module."""
    _module_wrapper(work, module, version, [command])
    _go(["build", "-trimpath", "-ldflags=-s -w", "-o", str(dest), f"{module}/{command}"], work)


def build_jaeger(dest: Path, work: Path) -> None:
    """Jaeger v2 (all in one) from its module, cut to what the tests configure (jaeger_trim): a wrapper
    module points Jaeger at the edited copy, with the version replaces of Jaeger's go.mod copied in."""
    v = f"v{versions.JAEGER}"
    work.mkdir(parents=True, exist_ok=True)
    module = "github.com/jaegertracing/jaeger"
    info = _module_file(module, v, work)
    source = work / "jaeger"
    writable_source(Path(info["Dir"]), source)
    for path, rewrite in jaeger_trim.REWRITES.items():
        (source / path).write_text(rewrite((source / path).read_text()))
    replaces = dict(_VERSION_REPLACE.findall(Path(info["GoMod"]).read_text()))
    _wrapper(work, {module: v}, {**replaces, module: "./jaeger"}, [f"{module}/cmd/jaeger"])
    _go(["build", "-trimpath", "-ldflags=-s -w", "-o", str(dest), f"{module}/cmd/jaeger"], work)


def build_containerd(dest: Path, work: Path) -> None:
    """containerd, its runc shim and ctr into `dest`, from one module and build."""
    module = "github.com/containerd/containerd"
    commands = ("containerd", "containerd-shim-runc-v2", "ctr")
    _module_wrapper(work, module, f"v{versions.CONTAINERD}", [f"cmd/{c}" for c in commands])
    stamp = f"-X {module}/version.Version={versions.CONTAINERD}"
    for command in commands:
        _go(
            ["build", "-trimpath", f"-ldflags=-s -w {stamp}", "-o", str(dest / command), f"{module}/cmd/{command}"],
            work,
        )


def build_ghz(dest: Path, work: Path) -> None:
    """ghz, the gRPC load tool, from its module."""
    _build_module_command(dest, work, "github.com/bojand/ghz", f"v{versions.GHZ}", "cmd/ghz")


def ensure_ghz() -> Path:
    """The load tool of bench/ (not of the tests): built once, kept by version in the cache."""
    dest = cache_root() / "bench" / f"ghz-{versions.GHZ}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        build_ghz(dest, cache_root() / "bench" / "work" / f"ghz-{versions.GHZ}")
    return dest


KEDA_COMMANDS = {"keda": "cmd/operator", "keda-adapter": "cmd/adapter"}
# The triggers the project's ScaledObjects use: prometheus (the stages' load), and cpu and memory, which
# KEDA hands to the HPA itself. A KEDA build links every scaler's client (cloud SDKs, databases,
# Elasticsearch's typed API: 3,300 packages, most of a 10-minute build); this one only these.
KEDA_TRIGGERS = ("prometheus", "cpu", "memory")
# What of KEDA's scalers package those need: its interfaces and helpers, and the scalers themselves; and
# the one constant they share with the scalers left out (defined in azure_queue_scaler.go), given again.
KEDA_SCALER_FILES = ("scaler.go", "prometheus_scaler.go", "cpu_memory_scaler.go")
KEDA_SHARED_GO = 'package scalers\n\nconst externalMetricType = "External"\n'
_KEDA_CASE = re.compile(r'\tcase "([a-z0-9-]+)":\n\t\treturn [^\n]*\n')


def keda_scaler_switch(builder: str, triggers: tuple[str, ...] = KEDA_TRIGGERS) -> str:
    """KEDA's scaler builder (pkg/scaling/scalers_builder.go) with only the cases of `triggers`: any other
    trigger type gets KEDA's own "no scaler found" error."""
    start = builder.index("\tswitch triggerType {", builder.index("// TRIGGERS-START"))
    end = builder.index("\tdefault:", start)
    cases = [m.group(0) for m in _KEDA_CASE.finditer(builder, start, end) if m.group(1) in triggers]
    if len(cases) != len(triggers):
        raise RuntimeError(f"KEDA's scaler builder has not every one of {triggers}: its layout changed")
    return builder[:start] + "\tswitch triggerType {\n" + "".join(cases) + builder[end:]


def writable_source(module: Path, dest: Path) -> None:
    """A module's source to edit (the module cache's copy is read-only), without its tests."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(module, dest, ignore=shutil.ignore_patterns("*_test.go", "testdata", ".git"))
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def trimmed_keda_source(module: Path, dest: Path) -> None:
    """KEDA's module source with only the scalers of KEDA_TRIGGERS."""
    writable_source(module, dest)
    for source in (dest / "pkg" / "scalers").glob("*.go"):
        if source.name not in KEDA_SCALER_FILES:
            source.unlink()
    (dest / "pkg" / "scalers" / "shared_by_left_out_scalers.go").write_text(KEDA_SHARED_GO)
    builder = dest / "pkg" / "scaling" / "scalers_builder.go"
    builder.write_text(keda_scaler_switch(builder.read_text()))


def build_keda(dest: dict[str, Path], work: Path) -> None:
    """KEDA's operator and its metrics API server (the adapter), from the module whose CRDs are pinned,
    with the scalers of KEDA_TRIGGERS only.

    Its go.mod replaces one module by version, which a dependent ignores: the wrapper copies it."""
    v = versions.KEDA
    work.mkdir(parents=True, exist_ok=True)
    module = "github.com/kedacore/keda/v2"
    info = _module_file(module, f"v{v}", work)
    trimmed_keda_source(Path(info["Dir"]), work / "keda")
    replaces = [
        f"\t{path} => {path} {version}"
        for path, version in sorted(_VERSION_REPLACE.findall(Path(info["GoMod"]).read_text()))
    ]
    (work / "go.mod").write_text(
        f"module promptpipe.local/keda\n\ngo 1.23\n\nrequire {module} v{v}\n\n"
        + "replace (\n"
        + "\n".join([f"\t{module} => ./keda", *replaces])
        + "\n)\n"
    )
    commands = [f"{module}/{path}" for path in KEDA_COMMANDS.values()]
    (work / "tools.go").write_text(tools_go(commands))
    _go(["mod", "tidy"], work)
    stamp = f"-X {module}/version.Version=v{v}"
    for binary, command in zip(KEDA_COMMANDS, commands, strict=True):
        _go(["build", "-trimpath", f"-ldflags=-s -w {stamp}", "-o", str(dest[binary]), command], work)


def fetch_keda_crds(dest: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    module = Path(_module_file("github.com/kedacore/keda/v2", f"v{versions.KEDA}", work)["Dir"])
    dest.mkdir(parents=True, exist_ok=True)
    for crd in sorted((module / "config" / "crd" / "bases").glob("*keda.sh_*.yaml")):  # keda.sh, eventing.keda.sh
        shutil.copyfile(crd, dest / crd.name)


def build_prometheus(dest: Path, work: Path, command: str = "prometheus") -> None:
    """Prometheus with Kubernetes service discovery and no other (Debian's build has none; the full one
    pulls every cloud's SDK): its build tags leave the rest out. No UI assets; the API is all tests use.
    `command` promtool: the rules checker from the same module, sharing the build's compiled packages."""
    work.mkdir(parents=True, exist_ok=True)
    module = "github.com/prometheus/prometheus"
    (work / "go.mod").write_text(wrapper_gomod("promptpipe.local/prometheus", {module: versions.PROMETHEUS_MODULE}, {}))
    # No `go mod tidy`: it would resolve every service discovery's modules, whatever the tags.
    stamp = f"-X github.com/prometheus/common/version.Version={versions.PROMETHEUS}"
    tags = "remove_all_sd,enable_kubernetes_sd"
    _go(
        ["build", "-trimpath", f"-tags={tags}", f"-ldflags=-s -w {stamp}", "-o", str(dest), f"{module}/cmd/{command}"],
        work,
    )


def ensure_tools() -> Tools:
    """Build whatever is missing; a second call costs nothing."""
    root = tools_dir()
    tools = expected_tools(root)
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    work = cache_root() / "controlplane" / "work"
    kubernetes = (tools.kube_apiserver, tools.kube_controller_manager, tools.kubectl)
    k8s_work = work / f"kubernetes-{versions.KUBERNETES}"
    steps: list[tuple[tuple[Path, ...], Callable[[], None]]] = [
        (kubernetes, lambda: build_kubernetes(bin_dir, k8s_work)),
        ((tools.kubelet, tools.kube_scheduler, tools.kube_proxy), lambda: build_kubernetes(bin_dir, k8s_work, NODE)),
        ((tools.coredns,), lambda: build_coredns(tools.coredns, work / f"coredns-{versions.COREDNS}")),
        ((tools.pause,), lambda: build_pause(tools.pause, work / "pause")),
        ((tools.etcd,), lambda: build_etcd(bin_dir, work / f"etcd-{versions.ETCD}")),
        ((tools.helm,), lambda: build_helm(bin_dir, work / f"helm-{versions.HELM}")),
        (
            (
                tools.keda_crds / "keda.sh_scaledobjects.yaml",
                tools.keda_crds / "eventing.keda.sh_cloudeventsources.yaml",
            ),
            lambda: fetch_keda_crds(tools.keda_crds, work / "keda"),
        ),
        (
            (tools.keda, tools.keda_adapter),
            lambda: build_keda(
                {"keda": tools.keda, "keda-adapter": tools.keda_adapter}, work / f"keda-{versions.KEDA}"
            ),
        ),
        (
            (tools.containerd, tools.containerd_shim, tools.ctr),
            lambda: build_containerd(tools.containerd.parent, work / f"containerd-{versions.CONTAINERD}"),
        ),
        ((tools.dockerfile_lint,), lambda: build_dockerfile_lint(tools.dockerfile_lint, work / "dockerfile-lint")),
        ((tools.skaffold,), lambda: build_skaffold(tools.skaffold, work / f"skaffold-{versions.SKAFFOLD}")),
        ((tools.prometheus,), lambda: build_prometheus(tools.prometheus, work / f"prometheus-{versions.PROMETHEUS}")),
        ((tools.jaeger,), lambda: build_jaeger(tools.jaeger, work / f"jaeger-{versions.JAEGER}")),
        (
            (tools.promtool,),
            lambda: build_prometheus(tools.promtool, work / f"prometheus-{versions.PROMETHEUS}", "promtool"),
        ),
    ]
    for products, step in steps:
        if not all(p.exists() for p in products):
            with timed(", ".join(p.name for p in products)):
                step()
    return tools
