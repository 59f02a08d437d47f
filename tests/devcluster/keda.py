"""KEDA in the test cluster: its CRDs (from KEDA's published module, `build.fetch_keda_crds`)."""

from __future__ import annotations

import subprocess

from kubernetes import client, config

from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane


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
