"""The node's images, built here from the project's own Dockerfiles, with no registry anywhere.

- A base: Debian bookworm from debootstrap, with Debian's Python 3.11 (what `python:3.11-slim-bookworm`
  is to a Docker user), made an image with buildah.
- Each Dockerfile is built FROM that base by buildah, installing from the wheel cache `make setup`
  fills (no index; llama.cpp's wheel is the one compiled once), without network.
- Each image is saved as a docker-archive, which the node imports into its containerd.

Everything is cached by content: a tag is the hash of what went in (the Dockerfile, the files it
copies, the base, the wheels), so a second run builds nothing and any change builds anew.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tests.devcluster import versions
from tests.devcluster.build import Tools, cache_root, timed

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "localhost/promptpipe"


def locks(image: str) -> tuple[str, str]:
    """An image's hashed dependency lock, and llama-cpp-python's (requirements/generate.py)."""
    return (f"requirements/{image}.txt", "requirements/llama-cpp.txt")


# The Dockerfiles, by image name; what each copies from the repository root.
DOCKERFILES = {
    "operator": (
        ROOT / "operator" / "Dockerfile",
        ("pyproject.toml", "constraints.txt", "README.md", "requirements/operator.txt", "services", "operator"),
    ),
    "stage": (
        ROOT / "services" / "Dockerfile",
        ("pyproject.toml", "constraints.txt", "README.md", *locks("stage"), "services", "operator"),
    ),
    "llamacpp-server": (ROOT / "services" / "Dockerfile.llamacpp-server", locks("llamacpp-server")),
    # Not a product image: TGI's stand-in on the node (TGI needs GPUs), for the blue-green journeys.
    "tgi": (ROOT / "tests" / "support" / "Dockerfile.tgi", (*locks("tgi-standin"), "tests/support/tgi_server.py")),
}
# What the Dockerfiles' bases bring: Python with venv, and llama.cpp's OpenMP runtime.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "libgomp1", "ca-certificates")
# The quota store's image: Debian's redis-server alone (the chart's default is valkey's image).
STORE_PACKAGES = ("redis-server",)


@dataclass(frozen=True)
class Image:
    name: str  # repository:tag, as pods name it
    archive: Path  # a docker-archive of it, for `ctr images import`


def images_dir() -> Path:
    return cache_root() / "images"


def wheels_dir() -> Path:
    return cache_root() / "wheels"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def llama_wheel_sha256() -> str:
    (wheel,) = wheels_dir().glob("llama_cpp_python-*.whl")
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


def context_digest(paths: tuple[str, ...], root: Path = ROOT) -> str:
    """What a Dockerfile copies, by content (bytecode caches aside, as .dockerignore says)."""
    parts: list[bytes] = []
    for rel in paths:
        target = root / rel
        files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            parts += [str(f.relative_to(root)).encode(), f.read_bytes()]
    return _digest(*parts)


class Builder:
    def __init__(self, tools: Tools, folder: Path | None = None) -> None:
        self.tools = tools
        self.folder = folder or images_dir()
        self.store = self.folder / "storage"

    def buildah(self, *args: str, quiet: bool = True) -> str:
        command = [
            "buildah",
            "--root",
            str(self.store / "root"),
            "--runroot",
            str(self.store / "run"),
            "--storage-driver",
            "overlay",
            *args,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed:\n{result.stderr[-4000:]}\n{result.stdout[-4000:]}")
        return result.stdout.strip()

    def _exists(self, name: str) -> bool:
        return bool(self.buildah("images", "--quiet", "--filter", f"reference={name}"))

    def _archive_path(self, name: str) -> Path:
        return self.folder / "archives" / (name.rsplit("/", 1)[1].replace(":", "-") + ".tar")

    def _archive(self, name: str) -> Image:
        archive = self._archive_path(name)
        if not archive.exists():
            archive.parent.mkdir(parents=True, exist_ok=True)
            partial = archive.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            self.buildah("push", name, f"docker-archive:{partial}:{name}")
            partial.replace(archive)
        return Image(name, archive)

    def base(self) -> str:
        """Debian bookworm with Python 3.11 from Debian's own packages."""
        return self._debian("base", BASE_PACKAGES, ("--cmd", "/bin/bash"))

    def quota_store(self) -> Image:
        """The gateways' shared quota store on the node (the chart's `quotaStore`): Debian's redis-server,
        as the chart runs valkey's image (its arguments after the entrypoint; uid 999, nothing written)."""
        config = ("--entrypoint", '["redis-server"]', "--cmd", "[]", "--user", "999:999")
        return self._archive(self._debian("quota-store", STORE_PACKAGES, config))

    def _debian(self, image: str, packages: tuple[str, ...], config: tuple[str, ...]) -> str:
        """Debian bookworm (minbase) with `packages`, from debootstrap, made an image with buildah `config`."""
        key = _digest(
            versions.DEBIAN_SUITE.encode(),
            versions.DEBIAN_MIRROR.encode(),
            " ".join(packages).encode(),
            *([" ".join(config).encode()] if image != "base" else []),
        )
        name = f"{REPOSITORY}/{image}:{key}"
        if self._exists(name):
            return name
        work = self.folder / "work" / f"{image}-{key}"
        rootfs, tar = work / "rootfs", work / "rootfs.tar"
        if not tar.exists():
            log.info("debootstrap %s with %s (about 90 s)", versions.DEBIAN_SUITE, ", ".join(packages))
            subprocess.run(["rm", "-rf", str(rootfs)], check=True)
            rootfs.mkdir(parents=True)
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(packages)}",
                    versions.DEBIAN_SUITE,
                    str(rootfs),
                    versions.DEBIAN_MIRROR,
                ],
                check=True,
                capture_output=True,
            )
            subprocess.run(["rm", "-rf", str(rootfs / "var" / "cache" / "apt" / "archives")], check=True)
            with tarfile.open(tar.with_suffix(".partial"), "w") as out:
                for entry in sorted(rootfs.iterdir()):
                    if entry.name in ("dev", "proc", "sys"):  # the runtime mounts these
                        out.add(entry, arcname=entry.name, recursive=False)
                    else:
                        out.add(entry, arcname=entry.name)
            tar.with_suffix(".partial").replace(tar)
            subprocess.run(["rm", "-rf", str(rootfs)], check=True)
        container = self.buildah("from", "scratch")
        try:
            self.buildah("add", container, str(tar), "/")
            self.buildah(
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env",
                "LANG=C.UTF-8",
                *config,
                container,
            )
            self.buildah("commit", "--quiet", container, name)
        finally:
            self.buildah("rm", container)
        return name

    def pause(self) -> Image:
        """The sandbox image containerd starts every pod with (its `sandbox_image`)."""
        key = _digest(self.tools.pause.read_bytes())
        name = f"{REPOSITORY}/pause:{key}"
        if not self._exists(name):
            container = self.buildah("from", "scratch")
            try:
                self.buildah("copy", "--chmod", "0755", container, str(self.tools.pause), "/pause")
                self.buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", container)
                self.buildah("commit", "--quiet", container, name)
            finally:
                self.buildah("rm", container)
        return self._archive(name)

    def build(self, image: str) -> Image:
        """One of DOCKERFILES, from the base, offline from the wheel cache."""
        dockerfile, copied = DOCKERFILES[image]
        base = self.base()
        wheels = sorted(p.name for p in wheels_dir().glob("*.whl"))
        key = _digest(
            dockerfile.read_bytes(),
            context_digest(copied).encode(),
            base.encode(),
            "\n".join(wheels).encode(),
            llama_wheel_sha256().encode(),  # compiled here: the same name may be another build
        )
        name = f"{REPOSITORY}/{image}:{key}"
        if not self._exists(name):
            log.info("building %s from %s", name, dockerfile.relative_to(ROOT))
            with timed(image):
                self.buildah(
                    "bud",
                    "--isolation",
                    "oci",  # runc, so that RUN steps get no network at all
                    "--network",
                    "none",
                    "--pull=never",  # an optional-value flag: the value must be attached
                    "--volume",
                    f"{wheels_dir()}:/wheels:ro",
                    "--build-arg",
                    f"PYTHON_IMAGE={base}",
                    "--build-arg",
                    "PIP_NO_INDEX=1",
                    "--build-arg",
                    "PIP_FIND_LINKS=/wheels",
                    "--build-arg",
                    "BUILD_PACKAGES=",
                    "--build-arg",
                    "RUNTIME_PACKAGES=",
                    # The wheel of llama-cpp-python compiled here from its hashed source archive (make setup).
                    "--build-arg",
                    f"LLAMA_CPP_WHEEL_SHA256={llama_wheel_sha256()}",
                    "--file",
                    str(dockerfile),
                    "--tag",
                    name,
                    str(ROOT),
                )
        return self._archive(name)

    def all(self) -> dict[str, Image]:
        images = {
            "pause": self.pause(),
            "quota-store": self.quota_store(),
            **{image: self.build(image) for image in DOCKERFILES},
        }
        self.prune({self.base(), *(i.name for i in images.values())})
        return images

    def prune(self, keep: set[str]) -> None:
        """Drop the images and archives of earlier builds: every code change makes new ones (about
        1.5 GB), and a cache that only grows fills the disk."""
        wanted = {self._archive_path(name) for name in keep}
        for archive in (self.folder / "archives").glob("*.tar"):
            if archive not in wanted:
                archive.unlink()
        for name in self.buildah("images", "--format", "{{.Name}}:{{.Tag}}").split():
            if name.startswith(f"{REPOSITORY}/") and name not in keep:
                self.buildah("rmi", name)
