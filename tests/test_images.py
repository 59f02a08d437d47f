"""The Dockerfiles and skaffold.yaml. No container engine runs here, so images are not
built: the Dockerfiles are checked by BuildKit's own linter (the checks of
`docker build --check`) and by the rules below, which is what can be verified."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.devcluster.build import Tools

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "operator": ROOT / "operator" / "Dockerfile",
    "stage": ROOT / "services" / "Dockerfile",
    "llamacpp-server": ROOT / "services" / "Dockerfile.llamacpp-server",
}
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def lint(tools: Tools, *paths: Path) -> subprocess.CompletedProcess[str]:
    assert tools.dockerfile_lint.exists(), "run `make setup` (builds dockerfile-lint)"
    return subprocess.run(
        [str(tools.dockerfile_lint), *map(str, paths)], capture_output=True, text=True, timeout=120, check=False
    )


def final_stage(path: Path) -> list[str]:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    start = max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    return lines[start:]


@pytest.mark.dockerfile_lint
def test_every_dockerfile_passes_buildkits_checks(kube_tools: Tools) -> None:
    result = lint(kube_tools, *DOCKERFILES.values())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.dockerfile_lint
def test_the_linter_reports_what_it_finds(kube_tools: Tools, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM scratch as build\nENV MODE fast\nCMD run --fast\n")
    result = lint(kube_tools, bad)
    assert result.returncode == 1
    for rule in ("FromAsCasing", "LegacyKeyValueFormat", "JSONArgsRecommended"):
        assert rule in result.stdout, rule


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_run_as_non_root_from_a_base_pinned_by_tag_and_digest(name: str) -> None:
    text = DOCKERFILES[name].read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base.group(1)), (
        "a base pinned to a patch release, and by digest"
    )
    tail = final_stage(DOCKERFILES[name])
    users = [ln.split()[1] for ln in tail if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    entry = [ln for ln in tail if ln.startswith("ENTRYPOINT ")]
    assert entry and entry[-1].startswith('ENTRYPOINT ["'), "exec form: the process gets SIGTERM"
    assert not any("build-essential" in ln or "cmake" in ln for ln in tail), "compilers stay in the build stage"
    # Debian packages are named in ARGs (empty when a base has them already), each pinned.
    installs = re.findall(r"--no-install-recommends ([^\\\n&]+)", text)
    assert all(i.strip().startswith("$") and i.strip().endswith("_PACKAGES") for i in installs), installs
    for packages in re.findall(r'^ARG \w+_PACKAGES="([^"]*)"$', text, re.MULTILINE):
        for package in packages.split():
            assert re.fullmatch(r"[a-z0-9.+-]+=\S+", package), f"Debian package not pinned: {package}"


def test_entry_points_exist_and_the_chart_runs_the_operators() -> None:
    assert '["promptpipe-operator"]' in DOCKERFILES["operator"].read_text() and "promptpipe-operator" in SCRIPTS
    assert '["promptpipe-stage"]' in DOCKERFILES["stage"].read_text() and "promptpipe-stage" in SCRIPTS
    chart = (ROOT / "charts" / "promptpipe" / "templates" / "deployment.yaml").read_text()
    assert "command: [promptpipe-operator]" in chart
    # The operator image installs only what the operator imports: no llama.cpp build.
    assert "llama-cpp-python" not in DOCKERFILES["operator"].read_text()


def test_skaffold_builds_every_image_from_its_dockerfile_and_deploys_the_chart() -> None:
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    built = {a["docker"]["dockerfile"] for a in config["build"]["artifacts"]}
    assert built == {str(p.relative_to(ROOT)) for p in DOCKERFILES.values()}
    (release,) = config["manifests"]["helm"]["releases"]
    assert (ROOT / release["chartPath"] / "Chart.yaml").exists()
    values = yaml.safe_load((ROOT / release["chartPath"] / "values.yaml").read_text())
    for key in release["setValueTemplates"]:
        node = values
        for part in key.split("."):
            assert part in node, f"skaffold sets {key}, which values.yaml does not have"
            node = node[part]


def skaffold(tools: Tools, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert tools.skaffold.exists(), "run `make setup` (builds skaffold)"
    env = {**os.environ, "PATH": f"{tools.helm.parent}:{os.environ['PATH']}", "SKAFFOLD_UPDATE_CHECK": "false"}
    return subprocess.run(
        [str(tools.skaffold), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.skaffold
def test_the_real_skaffold_reads_the_config_and_refuses_a_broken_one(kube_tools: Tools, tmp_path: Path) -> None:
    result = skaffold(kube_tools, "diagnose", "--yaml-only")
    assert result.returncode == 0, result.stderr
    assert "dockerfile: services/Dockerfile" in result.stdout
    broken = tmp_path / "skaffold.yaml"
    broken.write_text((ROOT / "skaffold.yaml").read_text().replace("chartPath:", "chartDir:"))
    result = skaffold(kube_tools, "diagnose", "--yaml-only", "-f", str(broken))
    assert result.returncode != 0 and "chartDir" in result.stdout + result.stderr


@pytest.mark.skaffold
@pytest.mark.helm
def test_skaffold_renders_the_chart_with_the_images_it_builds(kube_tools: Tools) -> None:
    result = skaffold(kube_tools, "render", "--offline=true", "--digest-source=tag", "--tag=dev1")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    operator = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert operator["image"] == "ghcr.io/promptpipe/operator:dev1"
    env = {e["name"]: e.get("value") for e in operator["env"]}
    assert env["PROMPTPIPE_OPERATOR_STAGE_IMAGE"] == "ghcr.io/promptpipe/stage:dev1"
