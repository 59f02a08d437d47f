"""One version everywhere (issue 33): the wheel, both commands, the chart, the default images, the changelog."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from promptpipe import __version__
from promptpipe.cli.main import app
from promptpipe_operator import __main__ as operator_main
from promptpipe_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_says_the_packages_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    assert importlib.metadata.version("promptpipe") == __version__


def test_both_commands_print_it() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"promptpipe {__version__}"


def test_the_operator_prints_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.argv", ["promptpipe-operator", "--version"])
    with pytest.raises(SystemExit) as ended:
        operator_main.main()
    assert ended.value.code == 0
    assert capsys.readouterr().out.strip() == f"promptpipe-operator {__version__}"


def test_the_chart_and_the_default_images_carry_it() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "promptpipe" / "Chart.yaml").read_text())
    assert chart["version"] == __version__ and chart["appVersion"] == __version__
    # The chart's image tags default to its appVersion; the operator's own default stage image:
    assert OperatorSettings().stage_image.endswith(f":{__version__}")


def test_the_changelogs_newest_release_is_it() -> None:
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert released and released[0] == __version__
