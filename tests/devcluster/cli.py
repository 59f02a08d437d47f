"""`python -m tests.devcluster cluster build|up|env|down`: the test control plane from a shell."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from promptpipe.localproc import alive, exits, state_home
from tests.devcluster.build import Tools, ensure_tools
from tests.devcluster.cluster import ControlPlane, ControlPlaneError
from tests.devcluster.debian import ensure_packages
from tests.devcluster.images import Builder
from tests.devcluster.keda import install_keda_crds
from tests.devcluster.node import NODE_NAME, Node, leftover_records, reap_leftovers

app = typer.Typer(help="Developer tools for promptpipe.", no_args_is_help=True, pretty_exceptions_enable=False)
cluster = typer.Typer(
    help="A local kube-apiserver + etcd (no kubelet), with helm, kubectl and KEDA's CRDs.", no_args_is_help=True
)
app.add_typer(cluster, name="cluster")
node_app = typer.Typer(
    help="A control plane with a real node: containerd, kubelet, kube-proxy, CoreDNS.", no_args_is_help=True
)
app.add_typer(node_app, name="node")


def state_dir() -> Path:
    return state_home() / "cluster"


def _env_lines(plane: ControlPlane, tools: Tools) -> str:
    return (
        f"export KUBECONFIG={plane.kubeconfig}\n"
        f"export PATH={tools.kubectl.parent}:$PATH  # kubectl and helm of the pinned versions\n"
    )


@cluster.command()
def build() -> None:
    """Build (once) and cache etcd, kube-apiserver, kubectl, helm; fetch KEDA's CRDs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure_packages()
    tools = ensure_tools()
    typer.echo(f"control-plane and node tools ready in {tools.kubectl.parent.parent}")


@cluster.command()
def up(timeout: Annotated[float, typer.Option(help="Seconds to wait for /readyz.")] = 60.0) -> None:
    """Start the control plane in the background; prints the environment to use it."""
    folder = state_dir()
    if (folder / "controlplane.json").exists():
        raise typer.BadParameter(f"a control plane is already up (state in {folder}); run `down` first")
    tools = ensure_tools()
    try:
        plane = ControlPlane.start(tools, folder, tied_to_parent=False, timeout=timeout)
        try:
            install_keda_crds(plane, tools)
        except BaseException:
            plane.stop()
            raise
    except (ControlPlaneError, subprocess.CalledProcessError) as err:
        shutil.rmtree(folder, ignore_errors=True)
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"# kube-apiserver at {plane.server}\n" + _env_lines(plane, tools), nl=False)


@cluster.command()
def env() -> None:
    """Print `export` lines for the running control plane (eval "$(python -m tests.devcluster cluster env)")."""
    folder = state_dir()
    if not (folder / "controlplane.json").exists():
        typer.echo("error: no control plane is up", err=True)
        raise typer.Exit(1)
    typer.echo(_env_lines(ControlPlane.load(folder), ensure_tools()), nl=False)


@cluster.command()
def down() -> None:
    """Stop the control plane and delete its state."""
    folder = state_dir()
    if not (folder / "controlplane.json").exists():
        typer.echo("no control plane is up")
        return
    ControlPlane.load(folder).stop()
    shutil.rmtree(folder, ignore_errors=True)
    typer.echo("control plane stopped")


@node_app.command("up")
def node_up() -> None:
    """Start a control plane with a real node (images built first if they changed); runs until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure_packages()
    tools = ensure_tools()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])  # stop cleanly on either
    started = Node.start(tools, state_home() / "node")
    typer.echo(
        f"# node {NODE_NAME} Ready in network namespace {started.netns}; images: {', '.join(started.images.values())}\n"
        + _env_lines(started.plane, tools)
        + f"# a shell where Services route: nsenter --net=/run/netns/{started.netns} bash\n# Ctrl-C stops it all",
    )
    signal.sigwait([signal.SIGINT, signal.SIGTERM])
    started.stop()
    typer.echo("node stopped; the machine is as it was")


@node_app.command("images")
def node_images() -> None:
    """Build (or find cached) every image the node runs, from this checkout: `make test` does it before the
    tests, so the first node test on a new machine does not spend its timeout building them."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure_packages()
    images = Builder(ensure_tools()).all()
    typer.echo("node images ready: " + ", ".join(i.name for i in images.values()))


@node_app.command("down")
def node_down() -> None:
    """Stop a node left running by `node up` (it is asked to stop), or clean up after one that crashed."""
    for record in leftover_records():
        owner = record.pids.get("owner", 0)
        if owner and alive(owner):
            os.kill(owner, signal.SIGTERM)
            exits(owner, 120)
    typer.echo(f"cleaned up: {', '.join(reap_leftovers()) or 'nothing left over'}")
