"""The node's record of what it changed: with two nodes at once (two test runs), the machine's own
kernel settings are the ones saved, and only the last node out puts them back. Pure: no node runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.devcluster import node as node_module
from tests.devcluster.node import Record, leftover_records


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """Records in a folder of the test's own; restores are recorded, not written to /proc/sys."""
    monkeypatch.setenv("PROMPTPIPE_CACHE", str(tmp_path))
    restored: list[dict[str, str]] = []
    monkeypatch.setattr(node_module, "_restore_sysctls", restored.append)
    monkeypatch.setattr(node_module, "_read_sysctls", lambda: {"kernel/panic": "10"})  # as a running kubelet left it
    return restored


def test_a_second_node_saves_the_first_ones_originals_and_only_the_last_out_restores(
    records: list[dict[str, str]], tmp_path: Path
) -> None:
    first = Record("pp-first", str(tmp_path / "first"), {"kernel/panic": "1"}, {"owner": os.getpid()})
    first.save()
    assert node_module._original_sysctls() == {"kernel/panic": "1"}, "not what the first node's kubelet set"

    second = Record("pp-second", str(tmp_path / "second"), node_module._original_sysctls(), {"owner": os.getpid()})
    second.save()
    node_module.reap(second)
    assert records == [], "the first node still runs: its kubelet's settings stay"
    node_module.reap(first)
    assert records == [{"kernel/panic": "1"}]
    assert leftover_records() == []


def test_with_no_node_running_the_current_values_are_the_originals(records: list[dict[str, str]]) -> None:
    assert node_module._original_sysctls() == {"kernel/panic": "10"}
