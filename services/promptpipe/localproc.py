"""Helpers for the processes promptpipe starts on this machine (local runs, the test
cluster): where their state lives, free loopback ports, whether a process is still
alive, and tying a child's life to its parent's."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
from pathlib import Path

from promptpipe.waiting import wait_until


def state_home() -> Path:
    """Where local runs (and the test cluster) keep their state: $PROMPTPIPE_HOME, else ~/.promptpipe."""
    return Path(os.environ.get("PROMPTPIPE_HOME", Path.home() / ".promptpipe"))


# Ports handed out by this process, so two callers never get the same one.
_handed_out: set[int] = set()
_LOWEST = 10_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A loopback port that is free now, for a server started next.

    Chosen below the kernel's ephemeral range: ports from bind(0) come from that range,
    where outgoing connections take their source ports, so one could take the port
    before our server binds it.
    """
    high = _ephemeral_low()
    for _ in range(500):
        port = random.randrange(_LOWEST, high)  # noqa: S311 - not security-relevant
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port between {_LOWEST} and {high}")


def listening(port: int) -> bool:
    """Whether something accepts connections on this loopback port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


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


def exits(pid: int, timeout: float) -> bool:
    """Whether the process is gone within `timeout` seconds."""
    try:
        wait_until(lambda: not alive(pid), f"pid {pid} to exit", timeout)
    except TimeoutError:
        return False
    return True


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child (a `preexec_fn`): be killed when the process that started it dies (a crashed test run)."""
    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
