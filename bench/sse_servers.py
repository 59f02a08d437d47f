"""The same server-sent-events endpoint in two Python HTTP stacks, to choose between them by measure.

`python -m bench.sse_servers aiohttp|starlette PORT`: POST /stream answers 8 events and [DONE]
(GET /health says ok), the
shape of a streamed chat completion, with nothing else in the way (no pipeline behind it).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

EVENTS = [
    b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}).encode() + b"\n\n"
    for i in range(8)
]
DONE = b"data: [DONE]\n\n"
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def events() -> AsyncIterator[bytes]:
    for e in EVENTS:
        yield e
        await asyncio.sleep(0)  # a token arriving: the loop turns between events, as in the gateway
    yield DONE


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers=HEADERS)
        await resp.prepare(request)
        async for e in events():
            await resp.write(e)
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/stream", stream)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def stream(request: Request) -> StreamingResponse:
        await request.body()
        return StreamingResponse(events(), headers=HEADERS)

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/stream", stream, methods=["POST"]), Route("/health", health)])
    uvicorn.run(
        app, host="127.0.0.1", port=port, http="httptools", loop="asyncio", access_log=False, log_level="warning"
    )


if __name__ == "__main__":
    {"aiohttp": serve_aiohttp, "starlette": serve_starlette}[sys.argv[1]](int(sys.argv[2]))
