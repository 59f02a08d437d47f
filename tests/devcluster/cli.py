"""`python -m tests.devcluster cluster build|up|env|down`: the test control plane from a shell."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Annotated

import typer
from kubernetes import client, config

from promptpipe.localproc import state_home
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools, ensure_tools
from tests.devcluster.cluster import ControlPlane, ControlPlaneError

app = typer.Typer(help="Developer tools for promptpipe.", no_args_is_help=True, pretty_exceptions_enable=False)
cluster = typer.Typer(
    help="A local kube-apiserver + etcd (no kubelet), with helm, kubectl and KEDA's CRDs.", no_args_is_help=True
)
app.add_typer(cluster, name="cluster")


def state_dir() -> Path:
    return state_home() / "cluster"


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
        names = [f"{p.name.split('_', 1)[1].removesuffix('.yaml')}.keda.sh" for p in tools.keda_crds.glob("*.yaml")]
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


def _env_lines(plane: ControlPlane, tools: Tools) -> str:
    return (
        f"export KUBECONFIG={plane.kubeconfig}\n"
        f"export PATH={tools.kubectl.parent}:$PATH  # kubectl and helm of the pinned versions\n"
    )


@cluster.command()
def build() -> None:
    """Build (once) and cache etcd, kube-apiserver, kubectl, helm; fetch KEDA's CRDs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tools = ensure_tools()
    typer.echo(f"control-plane tools ready in {tools.kubectl.parent.parent}")


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
    """Print `export` lines for the running control plane (eval "$(promptpipe-dev cluster env)")."""
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
