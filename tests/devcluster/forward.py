"""A byte forwarder between TCP and unix sockets, to cross into the node's network namespace.

Nothing routes between the machine's loopback and the node's namespace, on purpose: no traffic
may go to an address outside either. A unix socket is a file, reachable from both, so two of
these make a tunnel: one listens on loopback (or on the node's address) and connects to the
socket, the other listens on the socket and connects inside the namespace.

    python -m tests.devcluster.forward --listen tcp:127.0.0.1:6443 --connect unix:/path/api.sock

With `--connect http-connect` it is an HTTP CONNECT proxy instead: each connection names its
target first (`CONNECT 10.88.0.1:10250 HTTP/1.1`). The API server's egress selector uses one on a
unix socket to reach the kubelet (logs, exec, port-forward) as a cluster's API server would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # a half-close passes through
    except (ConnectionError, OSError):
        writer.close()


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return await asyncio.open_unix_connection(rest)
    host, _, port = rest.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def _serve(address: str, handler: Handler) -> asyncio.Server:
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return await asyncio.start_unix_server(handler, rest)
    host, _, port = rest.rpartition(":")
    return await asyncio.start_server(handler, host, int(port), reuse_address=True)


async def _http_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
    """Read a CONNECT request; the target as `tcp:HOST:PORT`, or None (answered with an error)."""
    head = await reader.readuntil(b"\r\n\r\n")
    method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if method != "CONNECT":
        writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
        return None
    return f"tcp:{target}"


async def forward(listen: str, connect: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = connect
        try:
            if connect == "http-connect":
                found = await _http_connect(reader, writer)
                if found is None:
                    writer.close()
                    return
                target = found
            upstream_reader, upstream_writer = await _open(target)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            if connect == "http-connect":
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            writer.close()
            return
        if connect == "http-connect":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        for w in (writer, upstream_writer):
            w.close()

    server = await _serve(listen, handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    with contextlib.suppress(Exception):
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="tcp:HOST:PORT or unix:PATH")
    parser.add_argument("--connect", required=True, help="tcp:HOST:PORT, unix:PATH or http-connect")
    args = parser.parse_args()
    asyncio.run(forward(args.listen, args.connect))


if __name__ == "__main__":
    main()
