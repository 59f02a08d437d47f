"""The promptpipe command as a user runs it: up, generate, status, down."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.cli import promptpipe
from tests.support.pipelines import synthetic_pipeline

pytestmark = pytest.mark.processes


def test_up_generate_status_down(tmp_path: Path) -> None:
    home = tmp_path / "home"
    pipeline = tmp_path / "p.yaml"
    doc = synthetic_pipeline("cli", post={"redact": {"replacement": "[X]"}})
    pipeline.write_text(yaml.safe_dump(doc))

    up = promptpipe("up", "-f", str(pipeline), home=home)
    assert up.returncode == 0, up.stderr
    try:
        assert "pipeline cli is serving" in up.stdout
        assert up.stdout.count("SERVING") == 5

        again = promptpipe("up", "-f", str(pipeline), home=home)
        assert again.returncode == 1 and "already running" in again.stderr

        gen = promptpipe("generate", "--session", "s1", "hello", home=home)
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout == " tok" * 16 + "\n"
        assert "finish=length" in gen.stderr and "tokens=" in gen.stderr
        for stage in ("rag", "assemble", "inference", "post", "stream"):
            assert f"{stage} " in gen.stderr

        bad = promptpipe("generate", "hello", "--temperature", "7", home=home)
        assert bad.returncode == 1 and "INVALID_ARGUMENT: parameters.temperature" in bad.stderr

        status = promptpipe("status", home=home)
        assert status.returncode == 0
        rows = [
            line.split()
            for line in status.stdout.splitlines()
            if line.split()[:1] in (["stream"], ["rag"], ["assemble"], ["inference"], ["post"])
        ]
        assert len(rows) == 5 and all(row[1] == "SERVING" for row in rows)
        done = {row[0]: row[-1] for row in rows}
        # The gateway admits before it validates, so the refused request held a gateway slot too.
        assert done == {"stream": "2", "rag": "1", "assemble": "1", "inference": "1", "post": "1"}
    finally:
        down = promptpipe("down", home=home)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert promptpipe("status", home=home).returncode == 1


def test_up_refuses_operator_managed_tgi_locally_saying_what_to_set(tmp_path: Path) -> None:
    file = tmp_path / "gpu.yaml"
    file.write_text(yaml.safe_dump(synthetic_pipeline("gpu", model={"name": "m", "backend": "tgi"})))
    home = tmp_path / "home"
    assert promptpipe("validate", "-f", str(file), home=home).returncode == 0, "valid for a cluster"
    result = promptpipe("up", "-f", str(file), home=home)
    assert result.returncode != 0
    assert "spec.model.tgi.endpoints" in result.stderr + result.stdout
    assert not (tmp_path / "home" / "runs" / "gpu").exists(), "nothing was started"
