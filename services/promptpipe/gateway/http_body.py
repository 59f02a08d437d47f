"""Reading a request body with bounds: its size counted inflated, inflated in bounded steps, in bounded time.

aiohttp's own decompression inflates whatever a chunk holds at once (a 97 KB gzip body is 60 MB of memory
before its size is checked) and its reads have no deadline. The gateway's server turns it off and reads
here instead: the compressed bytes as they arrive, inflated at most `STEP` bytes at a time, refused as soon
as the inflated size passes the limit, and the whole body within its timeout.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from promptpipe.gateway.openai_api import ApiError

# The most one inflate call may produce: memory for a body is its limit plus this, however it compresses.
STEP = 64 * 1024
# zlib's window bits: a gzip header and trailer, or a zlib one (HTTP's "deflate" is zlib-wrapped).
_WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes (spec.http.maxBodyBytes)", code="too_large")


class Inflated:
    """The body as it is inflated: each piece in bounded steps, the total checked after every step."""

    def __init__(self, encoding: str, limit: int) -> None:
        coding = encoding.strip().lower() or "identity"
        if coding != "identity" and coding not in _WINDOW_BITS:
            known = ", ".join(["identity", *_WINDOW_BITS])
            raise ApiError(415, f"Content-Encoding {encoding!r} is not one of {known}", code="unsupported_encoding")
        self._inflater = None if coding == "identity" else zlib.decompressobj(_WINDOW_BITS[coding])
        self._limit = limit
        self.body = bytearray()

    def add(self, data: bytes) -> None:
        if self._inflater is None:
            self._keep(data)
            return
        while data:
            self._keep(self._inflater.decompress(data, STEP))
            data = self._inflater.unconsumed_tail
            if self._inflater.eof and (data or self._inflater.unused_data):
                raise ApiError(400, "the request body has data after its compressed stream ends")

    def end(self) -> bytes:
        if self._inflater is not None and not self._inflater.eof:
            raise ApiError(400, "the request body's compressed stream is cut short")
        return bytes(self.body)

    def _keep(self, piece: bytes) -> None:
        if len(self.body) + len(piece) > self._limit:
            raise too_large(self._limit)
        self.body += piece


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """The whole body, inflated: 413 past `limit` (before reading more when Content-Length says so), 415 for
    an encoding other than gzip or deflate, 400 for a broken one, 408 when it has not all come in `timeout`."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit)
    inflated = Inflated(request.headers.get("Content-Encoding", ""), limit)
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                inflated.add(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="timeout") from None
    except zlib.error as exc:
        raise ApiError(400, f"the request body does not inflate: {exc}") from None
    return inflated.end()
