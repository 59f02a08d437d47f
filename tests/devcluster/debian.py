"""The node's Debian parts: runc and the CNI plugins run its containers (containerd is built, `build.py`);
buildah and debootstrap build its images; iptables and conntrack serve kube-proxy. And redis-server,
which the tests run as the gateway's shared quota store. Installed with apt as root, once."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from tests.devcluster import versions

log = logging.getLogger(__name__)

# Command each package provides, to tell whether it is installed without asking dpkg for each.
COMMANDS = {
    "runc": "runc",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "buildah": "buildah",
    "debootstrap": "debootstrap",
    "iptables": "iptables",
    "conntrack": "conntrack",
    # not the node's: the gateway's shared quota store in the tests (auth.quotaStore)
    "redis-server": "redis-server",
}


def missing() -> list[str]:
    return [p for p, command in COMMANDS.items() if not (shutil.which(command) or os.path.exists(command))]


def ensure_packages() -> None:
    """apt-get install what is missing (Debian bookworm's versions: `versions.NODE_PACKAGES` records them)."""
    needed = missing()
    if not needed:
        return
    if os.geteuid() != 0:
        raise PermissionError(f"installing {', '.join(needed)} needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log.info("apt-get install %s", " ".join(needed))
    install = ["apt-get", "install", "--yes", "--quiet", "--no-install-recommends", *needed]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "--quiet"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    for package, version in versions.NODE_PACKAGES.items():
        installed = subprocess.run(
            ["dpkg-query", "--show", "--showformat=${Version}", package], capture_output=True, text=True, check=False
        ).stdout
        if installed != version:
            log.warning("%s %s installed; the node was tested with %s", package, installed, version)
