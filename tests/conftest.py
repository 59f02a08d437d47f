from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipelines import RunningPipeline, running_pipeline


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local runs of a test live in its own folder, never in the user's ~/.promptpipe."""
    monkeypatch.setenv("PROMPTPIPE_HOME", str(tmp_path / "home"))


@pytest.fixture
def start_pipeline(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], RunningPipeline]]:
    with ExitStack() as stack:
        def start(doc: dict[str, Any]) -> RunningPipeline:
            return stack.enter_context(running_pipeline(doc, tmp_path / "pipelines"))

        yield start


pytest_plugins = ["tests.support.kube", "tests.support.operator", "tests.support.moto"]
