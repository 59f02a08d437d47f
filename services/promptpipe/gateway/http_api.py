"""The gateway's OpenAI-compatible HTTP API (aiohttp), beside its gRPC one, on its own port.

Same admission, same pipeline (`GatewayServicer.answer`), same limits: only the wire differs. aiohttp
because it serves on the stage's own event loop (no second loop, no thread hop per token), is already
what the stage's backends use, and is maintained by the aio-libs team; the choice is measured in
bench/http.py against the gRPC path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from promptpipe.contract.spec import HttpSpec, ModelSpec
from promptpipe.gateway import openai_api as api
from promptpipe.gateway.access_log import AccessLog, status_of_http
from promptpipe.gateway.grpc_api import GatewayServicer, with_tenant
from promptpipe.gateway.http_body import read_body
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.errors import ClientGone, QuotaExceeded, StageError, Unauthenticated, Unavailable
from promptpipe.runtime.logs import in_call
from promptpipe.runtime.stage import StageRuntime
from promptpipe.runtime.tls import ServerCertificate
from promptpipe.runtime.tracing import continuing
from promptpipe.runtime.watched_file import RELOAD_EVERY_SECONDS
from promptpipe.v1 import gateway_pb2

log = logging.getLogger(__name__)

# A client still sending the rest of a refused body is read from this long, so that it sees the answer
# (closing on unread data resets the connection), and no longer: a stranger's drip holds nothing.
LINGER_SECONDS = 1.0
TIMEOUT_HEADER = "X-Request-Timeout"
JSON = "application/json"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIGateway:
    def __init__(
        self,
        gateway: GatewayServicer,
        runtime: StageRuntime,
        pipeline: str,
        model: ModelSpec,
        keys: KeyRing,
        limits: HttpSpec,
    ) -> None:
        self._keys = keys
        self._limits = limits
        self._gateway = gateway
        self._runtime = runtime
        self._serving: Callable[[], bool] = lambda: False
        self._runner: web.AppRunner | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._created = int(time.time())
        self._models = frozenset({model.name, pipeline})
        card = {"object": "model", "created": self._created, "owned_by": "promptpipe"}
        extra = {"pipeline": pipeline, "version": model.version, "alias": model.alias}
        self._model_cards = [{"id": model.name, **card, "promptpipe": extra}]
        if pipeline != model.name:
            self._model_cards.append({"id": pipeline, **card, "promptpipe": extra})

    async def serve(
        self,
        host: str,
        port: int,
        grace: float,
        serving: Callable[[], bool],
        tls: ServerCertificate | None = None,
    ) -> int:
        """Start serving; the bound port (0 picks one). Handlers are cancelled when their client leaves,
        which ends the call down to the backend, as a gRPC cancellation does. On `stop`, answers in
        progress get `grace` seconds, as on gRPC. With `tls`, HTTPS, the certificate followed as it changes."""
        self._serving = serving
        # The keep-alive timer runs from a connection's opening and from each answer to the next request's
        # whole head: a client dripping its headers is closed when it fires. Bodies are inflated by
        # read_body, in bounded steps, not by aiohttp.
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=grace,
            keepalive_timeout=self._limits.header_timeout_seconds,
            lingering_time=LINGER_SECONDS,
            auto_decompress=False,
        )
        await self._runner.setup()
        context = tls.ssl_context() if tls is not None else None
        site = web.TCPSite(self._runner, host, port, reuse_address=True, ssl_context=context)
        await site.start()
        if tls is not None and context is not None:
            self._reloading = asyncio.create_task(_follow_certificate(tls, context))
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._reloading is not None:
            self._reloading.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._limits.max_body_bytes, middlewares=[_openai_errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model}", self._get_model)
        app.router.add_get("/health", self._health)
        # No /metrics here: the public port serves no one the tenants' names (the metrics port does).
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _generate(self, request: web.Request, kind: api.Kind) -> web.StreamResponse:
        """One call, and its access log line however it ends."""
        access = AccessLog("http", uuid.uuid4().hex)
        in_call(request_id=access.request_id)
        try:
            response = await self._answer(request, kind, access)
        except (api.ApiError, web.HTTPException) as err:
            if access.status == "OK":
                access.status = status_of_http(err.status)
            raise
        except asyncio.CancelledError:
            access.status = "CANCELLED"
            raise
        except Exception:
            access.status = "INTERNAL"
            raise
        else:
            if access.status == "OK":
                access.status = status_of_http(response.status)
        finally:
            access.write()
        return response

    async def _answer(self, request: web.Request, kind: api.Kind, access: AccessLog) -> web.StreamResponse:
        received = time.perf_counter()
        request_id = access.request_id
        headers = {"x-request-id": request_id}
        tenant = access.tenant = self._tenant(request)
        in_call(tenant=tenant)
        if request.content_type != JSON:
            # A text/plain or form POST is one any web page can make a browser send to a local gateway.
            got = request.headers.get("Content-Type") or "none"
            raise api.ApiError(415, f"Content-Type must be {JSON}, not {got}", code="unsupported_media_type")
        # A call the gateway's queue would refuse now is refused before its body is read, and not charged
        # (front_door.py says why); admission looks again once the body is in.
        refused = self._runtime.refused_at_the_door(tenant)
        if refused is not None:
            raise api.api_error(refused) from None
        # Charged before its body is read: a body refused while it is read or parsed still counts.
        try:
            flow = await self._gateway.tenancy.charge(tenant)
        except (QuotaExceeded, Unavailable) as exc:  # Unavailable: the shared quota store, failing closed
            raise api.api_error(exc) from None
        limits = self._limits
        body = await read_body(request, limits.max_body_bytes, limits.body_timeout_seconds)
        parsed = api.parse(kind, body, self._models)
        with_tenant(parsed.request, tenant)
        shapes = api.Shapes(kind, request_id, parsed.model, int(time.time()), parsed.include_usage)
        response: web.StreamResponse | None = None
        deadline, callers = self._runtime.deadline_within(_timeout(request))
        try:
            # A caller's W3C traceparent makes this call's spans part of its trace, as over gRPC.
            with continuing(request.headers):
                async with self._runtime.admit(deadline, callers, lambda: None, flow) as call:
                    answer = self._gateway.answer(parsed.request, call, received, access)
                    async with contextlib.aclosing(answer):
                        if not parsed.stream:
                            return await _whole(answer, shapes, headers)
                        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
                        await _stream(request, response, answer, shapes)
                        return response
        except ClientGone:
            log.debug("client left request %s", request_id)
            access.status = "CANCELLED"
            return response or web.Response(status=499)
        except StageError as exc:
            access.status = exc.code.name
            err = api.api_error(exc, parsed.names)
            if response is None or not response.prepared:
                raise err from None
            with contextlib.suppress(ConnectionError):
                await response.write(api.sse_error(err))
                await response.write_eof()
            return response
        raise AssertionError("unreachable: the answer ends with its summary or raises")

    def _tenant(self, request: web.Request) -> str:
        try:
            return self._keys.tenant_of(request.headers.get("Authorization"))
        except Unauthenticated as exc:
            raise api.api_error(exc) from None

    async def _list_models(self, request: web.Request) -> web.Response:
        self._tenant(request)
        return web.json_response(api.model_list(self._model_cards))

    async def _get_model(self, request: web.Request) -> web.Response:
        self._tenant(request)
        for card in self._model_cards:
            if card["id"] == request.match_info["model"]:
                return web.json_response(card)
        name = request.match_info["model"]
        raise api.ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")

    async def _health(self, request: web.Request) -> web.Response:
        serving = self._serving()
        return web.json_response({"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503)


async def _follow_certificate(tls: ServerCertificate, context: ssl.SSLContext) -> None:
    """New connections get the certificate as it is now: loaded into the listening context when it changes."""
    loaded = tls.version
    while True:
        await asyncio.sleep(RELOAD_EVERY_SECONDS)
        loaded = tls.reload_into(context, loaded)


def _timeout(request: web.Request) -> float | None:
    """The client's deadline, in seconds from now: gRPC has one on every call; HTTP, this header."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise api.bad_request(TIMEOUT_HEADER, f"{TIMEOUT_HEADER}: must be a positive number of seconds, not {raw!r}")
    return seconds


async def _whole(
    answer: AsyncIterator[gateway_pb2.GenerateResponse], shapes: api.Shapes, headers: dict[str, str]
) -> web.Response:
    texts: list[str] = []
    async for event in answer:
        if event.HasField("chunk"):
            texts.append(event.chunk.text)
        else:
            body = shapes.response("".join(texts), event.summary)
            return web.Response(
                text=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
                content_type="application/json",
                headers=headers,
            )
    raise AssertionError("unreachable: the answer ends with its summary or raises")


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    answer: AsyncIterator[gateway_pb2.GenerateResponse],
    shapes: api.Shapes,
) -> None:
    """The answer as server-sent events. Headers go out with the first event, so an error before it
    (a refusal, a bad parameter found downstream) is still a plain HTTP error."""
    opening = shapes.opening()
    try:
        async for event in answer:
            if not response.prepared:
                await response.prepare(request)
                if opening is not None:
                    await response.write(api.sse(opening))
            if event.HasField("chunk"):
                await response.write(api.sse(shapes.chunk(event.chunk.text)))
                continue
            summary: gateway_pb2.GenerateSummary = event.summary
            for last in shapes.closing(summary):
                await response.write(api.sse(last))
            await response.write(api.SSE_DONE)
            await response.write_eof()
            return
    except ConnectionError as exc:
        raise ClientGone("the client closed the connection") from exc


@web.middleware
async def _openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error leaves in OpenAI's shape: ours, aiohttp's own (unknown path, body too large), and the
    unexpected (logged, a fixed message out)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except api.ApiError as err:
        refused = web.json_response(err.body(), status=err.status, headers=err.headers())
        if err.status in (408, 413):
            refused.force_close()  # the rest of its body is not read: the connection cannot carry another
        return refused
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        theirs = api.ApiError(exc.status, exc.reason if exc.text is None else exc.text, kind)
        return web.json_response(theirs.body(), status=theirs.status, headers=_allowed(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        internal = api.ApiError(500, "internal error in stage stream", "server_error")
        return web.json_response(internal.body(), status=500)


def _allowed(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
