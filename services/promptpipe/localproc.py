"""Helpers for the processes promptpipe starts on this machine (local runs, the test
control plane): free loopback ports and whether a process is still alive."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A loopback port free right now (bind-then-close: a tiny race, fine locally)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Whether `pid` still runs; a child of ours that exited is reaped and counts as gone."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
