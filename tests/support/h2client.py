"""A raw HTTP/2 gRPC client that can stop reading: it grants the server a small window per stream and
opens it further only when told, which a gRPC library's client never lets a test do (it keeps
granting window as its buffers allow)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from google.protobuf.message import Message

# Bytes each stream may receive before the client opens its window (it never does, until `read_all`).
STALLED_WINDOW = 1024


@dataclass
class RawStream:
    data_bytes: int = 0
    status: int | None = None  # grpc-status of the trailers, once they came
    reset: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class StalledGrpcClient:
    """One HTTP/2 connection to a gRPC server whose calls nobody reads (until `read_all`)."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self.streams: dict[int, RawStream] = {}
        self._reading = False
        self.closed = asyncio.Event()

    async def __aenter__(self) -> StalledGrpcClient:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self._conn = h2.connection.H2Connection(config=config)
        self._conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STALLED_WINDOW}
        )
        self._conn.initiate_connection()
        await self._flush()
        self._pump = asyncio.create_task(self._receive())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def call(self, method: str, request: Message) -> RawStream:
        """Start a unary-request, streamed-response call."""
        stream_id = self._conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", f"{self._host}:{self._port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        body = request.SerializeToString()
        self.streams[stream_id] = RawStream()
        self._conn.send_headers(stream_id, headers)
        self._conn.send_data(stream_id, struct.pack(">BI", 0, len(body)) + body, end_stream=True)
        await self._flush()
        return self.streams[stream_id]

    async def read_all(self) -> None:
        """Start reading: every byte received from now on is acknowledged, which opens the windows."""
        self._reading = True
        for stream_id, stream in self.streams.items():
            if not stream.ended.is_set() and stream.data_bytes:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self._conn.acknowledge_received_data(stream.data_bytes, stream_id)
        await self._flush()

    async def _flush(self) -> None:
        self._writer.write(self._conn.data_to_send())
        await self._writer.drain()

    async def _receive(self) -> None:
        try:
            while not self.closed.is_set() and (data := await self._reader.read(65536)):
                try:
                    events = self._conn.receive_data(data)
                except h2.exceptions.ProtocolError:  # frames after the server's GOAWAY
                    break
                for event in events:
                    self._handle(event)
                await self._flush()
        finally:
            for stream in self.streams.values():
                stream.ended.set()
            self.closed.set()

    def _handle(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived) and stream is not None:
            stream.data_bytes += len(event.data)
            if self._reading:
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.status = int(dict(event.headers).get("grpc-status", -1))
        elif isinstance(event, h2.events.ResponseReceived) and stream is not None:
            status = dict(event.headers).get("grpc-status")  # a trailers-only response
            if status is not None:
                stream.status = int(status)
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset = True
            stream.ended.set()
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed.set()  # every stream still open ends without a status
