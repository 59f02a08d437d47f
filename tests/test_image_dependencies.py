"""Each deployable's dependency set, installed alone, the way its image installs it.

One wheel of the project; per deployable a fresh virtualenv with only that extra, from the
wheel cache `make setup` fills (no index: what is not there is not installed). Each entry
point then starts far enough to import everything it runs and parse its settings. The
Dockerfiles must install exactly these extras: a missing dependency fails here, not in a pod.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from promptpipe.contract.pipeline_file import parse_pipeline
from promptpipe.contract.runtime_config import RuntimeConfig
from promptpipe.contract.spec import STAGE_ORDER
from tests.devcluster.build import cache_root
from tests.devcluster.images import llama_wheel_sha256

pytestmark = pytest.mark.venv

ROOT = Path(__file__).resolve().parents[1]
WHEELS = cache_root() / "wheels"
QUICKSTART = ROOT / "deploy" / "examples" / "quickstart.yaml"
# What each image installs, and why: the stage image also runs the TGI pods' fetch-model init
# container (`promptpipe model pull`), which is the CLI's.
IMAGE_EXTRAS = {
    ROOT / "operator" / "Dockerfile": {"operator"},
    ROOT / "services" / "Dockerfile": {"stage", "cli"},
}
INSTALLED_EXTRAS = re.compile(r'pip install [^\n]*"\.\[([a-z,]+)\]"')


def run(*args: str | Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert (WHEELS / "setuptools-80.9.0-py3-none-any.whl").exists(), f"no wheel cache in {WHEELS}: run `make setup`"
    out = tmp_path_factory.mktemp("wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--find-links",
        WHEELS,
        "--wheel-dir",
        out,
        ROOT,
    )
    (built,) = out.glob("promptpipe-*.whl")
    return built


class Venv:
    def __init__(self, folder: Path, wheel: Path, extras: str) -> None:
        self.bin = folder / "bin"
        run(sys.executable, "-m", "venv", folder)
        self.pip_install("--constraint", ROOT / "constraints.txt", f"{wheel}[{extras}]")

    @classmethod
    def locked(cls, folder: Path, wheel: Path, image: str) -> Venv:
        """As the image installs it: its lock with --require-hashes (llama-cpp-python's with the hash of
        the wheel compiled here, as the node's build gives it), then the project without dependencies."""
        venv = cls.__new__(cls)
        venv.bin = folder / "bin"
        run(sys.executable, "-m", "venv", folder)
        llama = folder / "llama-cpp.txt"
        line = (ROOT / "requirements" / "llama-cpp.txt").read_text().splitlines()[-1]
        llama.write_text(f"{line} --hash=sha256:{llama_wheel_sha256()}\n")
        lock = ROOT / "requirements" / f"{image}.txt"
        venv.pip_install("--require-hashes", "--no-deps", "-r", lock, "-r", llama)
        venv.pip_install("--no-deps", wheel)
        return venv

    def pip_install(self, *args: str | Path) -> None:
        run(self.bin / "pip", "install", "--quiet", "--no-index", "--find-links", WHEELS, *args)

    def run(
        self, command: str, *args: str | Path, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # Outside the repository, so nothing is imported from the work tree by accident.
        return run(self.bin / command, *args, env={"PYTHONSAFEPATH": "1", **(env or {})}, check=check)

    def can_import(self, module: str) -> bool:
        return self.run("python", "-c", f"import {module}", check=False).returncode == 0


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Venv]:
    """`venv("operator")`: a virtualenv with only that extra installed."""
    return functools.cache(lambda extras: Venv(tmp_path_factory.mktemp(f"venv-{extras}"), wheel, extras))


def test_each_dockerfile_installs_exactly_its_deployables_extras() -> None:
    for dockerfile, extras in IMAGE_EXTRAS.items():
        installs = INSTALLED_EXTRAS.findall(dockerfile.read_text())
        assert [set(found.split(",")) for found in installs] == [extras], dockerfile


def test_the_wheel_ships_the_deployables_and_no_test_infrastructure(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert tops == {"promptpipe", "promptpipe_operator"}
    assert not [n for n in names if "devcluster" in n or n.startswith("tests/")]
    assert "promptpipe/contract/spec.py" in names and "promptpipe/v1/stage_pb2.py" in names


def test_the_operator_runs_on_its_own_dependencies(venv: Callable[[str], Venv]) -> None:
    venv = venv("operator")
    help_text = venv.run("promptpipe-operator", "--help").stdout
    assert "PROMPTPIPE_OPERATOR_STAGE_IMAGE" in help_text and "--check" in help_text
    checked = venv.run(
        "promptpipe-operator",
        "--check",
        env={"PROMPTPIPE_OPERATOR_NAMESPACES": "team-a, team-b", "PROMPTPIPE_REGISTRY_BUCKET": "acme-models"},
    )
    report = json.loads(checked.stdout)
    assert report["operator"]["namespaces"] == ["team-a", "team-b"]
    assert report["registry"]["bucket"] == "acme-models"
    refused = venv.run("promptpipe-operator", "--check", env={"PROMPTPIPE_OPERATOR_LOG_FORMAT": "xml"}, check=False)
    assert refused.returncode != 0 and "log_format" in refused.stderr
    # Nothing of the data path came along.
    assert not venv.can_import("grpc") and not venv.can_import("llama_cpp")


def test_every_stage_builds_on_the_stage_dependencies(venv: Callable[[str], Venv], tmp_path: Path) -> None:
    stage = venv("stage")
    every_stage_builds(stage, tmp_path)
    assert not stage.can_import("kopf") and not stage.can_import("boto3") and not stage.can_import("typer")


def test_the_stage_images_hashed_lock_installs_from_the_wheels_and_every_stage_builds_on_it(
    wheel: Path, tmp_path: Path
) -> None:
    image = Venv.locked(tmp_path / "venv", wheel, "stage")
    every_stage_builds(image, tmp_path)
    # The image also runs the fetch-model init container (the CLI's), never the operator.
    assert image.can_import("typer") and not image.can_import("kopf")


def test_the_operator_images_hashed_lock_installs_and_the_operator_starts_on_it(wheel: Path, tmp_path: Path) -> None:
    venv = Venv.locked(tmp_path / "venv", wheel, "operator")
    assert "PROMPTPIPE_OPERATOR_STAGE_IMAGE" in venv.run("promptpipe-operator", "--help").stdout
    report = json.loads(venv.run("promptpipe-operator", "--check").stdout)
    assert "operator" in report and "registry" in report


def test_a_wheel_whose_hash_the_lock_does_not_hold_is_refused(wheel: Path, tmp_path: Path) -> None:
    # llama-cpp-python's lock alone, without the hash of the wheel compiled here: pip must refuse that wheel.
    run(sys.executable, "-m", "venv", tmp_path / "venv")
    refused = run(
        tmp_path / "venv" / "bin" / "pip",
        "install",
        "--no-index",
        "--find-links",
        WHEELS,
        "--require-hashes",
        "--no-deps",
        "-r",
        ROOT / "requirements" / "llama-cpp.txt",
        check=False,
    )
    assert refused.returncode != 0 and "THESE PACKAGES DO NOT MATCH THE HASHES" in refused.stderr, refused.stderr


def every_stage_builds(venv: Venv, tmp_path: Path) -> None:
    pipeline = parse_pipeline(yaml.safe_load(QUICKSTART.read_text()))
    config = RuntimeConfig(
        pipeline=pipeline,
        endpoints={s: f"127.0.0.1:{50051 + i}" for i, s in enumerate(STAGE_ORDER)},
        base_dir=str(QUICKSTART.parent),
    )
    path = tmp_path / "runtime.yaml"
    path.write_text(config.dump_yaml())
    for stage in STAGE_ORDER:
        checked = venv.run(
            "promptpipe-stage", "--check", env={"PROMPTPIPE_STAGE": stage.value, "PROMPTPIPE_CONFIG": str(path)}
        )
        report = json.loads(checked.stdout)
        assert report["settings"]["stage"] == stage.value and report["backend"] == "llamacpp", report
    assert (
        "--port"
        in venv.run(
            "promptpipe-stage", "--help", env={"PROMPTPIPE_STAGE": "rag", "PROMPTPIPE_CONFIG": str(path)}
        ).stdout
    )
    refused = venv.run(
        "promptpipe-stage", "--check", env={"PROMPTPIPE_STAGE": "ranker", "PROMPTPIPE_CONFIG": str(path)}, check=False
    )
    assert refused.returncode != 0 and "stage" in refused.stderr


def test_the_cli_runs_on_its_own_dependencies(venv: Callable[[str], Venv]) -> None:
    venv = venv("cli")
    assert "model" in venv.run("promptpipe", "--help").stdout
    # The fetch-model init container's command.
    assert "verify every file" in venv.run("promptpipe", "model", "pull", "--help").stdout
    valid = venv.run("promptpipe", "validate", "-f", QUICKSTART)
    assert "quickstart" in valid.stdout
    assert not venv.can_import("llama_cpp") and not venv.can_import("kopf")
