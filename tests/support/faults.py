"""A TCP proxy a test can break: real network faults between a client and a real server.

    with FaultyProxy("127.0.0.1", 8080) as proxy:   # clients connect to proxy.address
        proxy.mode = Mode.STALL      # bytes go nowhere: a connection that carries any while stalled is
                                     # dead for good (a half-open one: the peer vanished), new ones hang
        proxy.mode = Mode.HOLD       # bytes wait, and flow again once the mode is PASS
        proxy.mode = Mode.SLOW       # every chunk waits proxy.delay seconds
        proxy.mode = Mode.RESET      # new connections are reset at once (open ones: `cut()`)
        proxy.cut()                  # reset every open connection now

It runs its own event loop in a thread, so synchronous clients (boto3, the kubernetes client) and
servers in other processes go through it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from types import TracebackType

from promptpipe.localproc import free_port


class Mode(enum.Enum):
    PASS = "pass"
    STALL = "stall"  # accepted and read; what arrives is dropped, and that connection never recovers
    HOLD = "hold"  # accepted and read; what arrives waits until the mode changes
    SLOW = "slow"  # each chunk is forwarded after `delay` seconds
    RESET = "reset"  # accepted and reset at once


class FaultyProxy:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.port = free_port()
        self.mode = Mode.PASS
        self.delay = 0.0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> None:
        """Reset every open connection (RST, as a dropped route or a dead peer looks)."""
        asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(10)

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        self._server.close()
        await self._reset_all()

    async def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode is Mode.RESET:
            _reset(writer)
            return
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _reset(writer)
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dead = False
        while data := await reader.read(1 << 16):
            dead = dead or self.mode is Mode.STALL
            if dead:
                continue  # dropped: the other end never hears of it
            while self.mode is Mode.HOLD:
                await asyncio.sleep(0.05)
            if self.mode is Mode.SLOW:
                await asyncio.sleep(self.delay)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
