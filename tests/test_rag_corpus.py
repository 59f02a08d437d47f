"""The rag stage's corpus, read from a folder as `promptpipe up` and a pod give it."""

from __future__ import annotations

import os
from pathlib import Path

from promptpipe.stages.rag import load_corpus


def test_a_config_map_mount_gives_each_file_once(tmp_path: Path) -> None:
    # How the kubelet lays out a ConfigMap volume: the files in a hidden timestamped folder,
    # `..data` linking to it, and one link per key at the top.
    real = tmp_path / "..2026_12_01_01_33_17.000000001"
    real.mkdir()
    (real / "paris.txt").write_text("Paris is the capital of France.")
    (real / "tower.md").write_text("The Eiffel Tower was built in 1889.")
    os.symlink(real.name, tmp_path / "..data")
    for name in ("paris.txt", "tower.md"):
        os.symlink(f"..data/{name}", tmp_path / name)

    assert load_corpus(tmp_path, 800) == [
        ("paris.txt", "Paris is the capital of France."),
        ("tower.md", "The Eiffel Tower was built in 1889."),
    ]


def test_a_plain_folder_is_read_below_every_subfolder(tmp_path: Path) -> None:
    (tmp_path / "guides").mkdir()
    (tmp_path / "guides" / "a.md").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "notes.pdf").write_text("not text")
    (tmp_path / ".cache.md").write_text("hidden")
    assert load_corpus(tmp_path, 800) == [("b.txt", "second"), ("guides/a.md", "first")]
