"""Running the `promptpipe` command as a user does, in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def promptpipe(*args: str, home: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`promptpipe ARGS` with its local runs under `home`, on a wide terminal (no table is wrapped)."""
    env = {**os.environ, "PROMPTPIPE_HOME": str(home), "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "promptpipe.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
