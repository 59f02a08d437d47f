"""The committed generated code is exactly what protos/generate.py produces."""

from __future__ import annotations

import filecmp
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    runpy.run_path(str(ROOT / "protos" / "generate.py"))["generate"](tmp_path)  # protoc runs in this process
    fresh = tmp_path / "promptpipe" / "v1"
    committed = ROOT / "services" / "promptpipe" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"run `make proto`: {mismatch or errors} drifted from protos/"
