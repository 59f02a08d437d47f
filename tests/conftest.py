from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipelines import RunningPipeline, running_pipeline

# A test that uses one of these fixtures starts what the marker names, so it carries the marker
# (and `make test-fast` leaves it out); tests that start such things directly are marked by hand.
MARKED_BY_FIXTURE = {
    "control_plane": "controlplane",
    "moto_endpoint": "moto",
    "quota_store": "redis",
    "start_pipeline": "processes",
    "node": "node",
}


@pytest.hookimpl(tryfirst=True)  # before -m selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in MARKED_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture(autouse=True)
def _pure_tier_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the pure tier (`make test-fast`), a test that starts a process without a marker saying so fails."""
    if not os.environ.get("PROMPTPIPE_PURE_TESTS"):
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("this test starts a process but has none of the markers that say so (see pyproject.toml)")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


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


pytest_plugins = [
    "tests.support.kube",
    "tests.support.operator",
    "tests.support.moto",
    "tests.support.node",
    "tests.support.redis_store",
]
