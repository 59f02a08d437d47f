"""deploy/install.yaml: the chart rendered with its defaults, for users without Helm.

`python -m charts.generate` (from the repository root) prints it (make manifests); a test
fails if the committed file differs from what the chart renders.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.devcluster.build import Tools, expected_tools

CHART = Path(__file__).resolve().parent / "promptpipe"
NAMESPACE = "promptpipe-system"
KUBE_VERSION = "1.32.4"


def plain_install(tools: Tools) -> str:
    rendered = subprocess.run(  # noqa: S603 - our pinned helm, our chart
        [
            str(tools.helm),
            "template",
            "promptpipe",
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--include-crds",
            "--kube-version",
            KUBE_VERSION,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header = (
        "# Generated from charts/promptpipe with its default values (make manifests); do not edit.\n"
        f"#   kubectl create namespace {NAMESPACE}\n"
        "#   kubectl apply --server-side -f deploy/install.yaml\n"
    )
    return header + rendered


if __name__ == "__main__":
    sys.stdout.write(plain_install(expected_tools()))
