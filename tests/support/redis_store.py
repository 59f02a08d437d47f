"""Debian's redis-server on loopback, as the gateway's shared quota store (auth.quotaStore): real, with a
password, and able to stop, hang (SIGSTOP) and come back on the same port, as a store does."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from promptpipe.localproc import free_port
from promptpipe.waiting import wait_until


class RedisServer:
    def __init__(self, folder: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: `make setup` installs it (Debian's redis-server)")
        self.executable = executable
        self.folder = folder
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # Nothing on disk, no other address than loopback, no protected mode to trip over.
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--requirepass", self.password, "--dir", str(self.folder), "--daemonize", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        try:
            wait_until(client.ping, "redis-server to answer", 20, retry_on=(redis.ConnectionError,))
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)  # a hung one must be able to die
                self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def hang(self) -> None:
        """Stopped, not gone: connections stay open and nothing answers (a store that stalls)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def quota_store(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server
