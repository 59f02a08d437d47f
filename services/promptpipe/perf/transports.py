"""One call to a gateway, timed as its client sees it: over gRPC (the gateway's own API) or over the
OpenAI-compatible HTTP API (server-sent events). Either way the call ends as a `CallOutcome`: its
tokens and times, or the status it ended with, never an exception."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from promptpipe.client import GenerationError, PipelineClient
from promptpipe.perf.prompts import Prompt
from promptpipe.perf.records import StageShare
from promptpipe.v1 import gateway_pb2

# How the OpenAI-compatible API says a pipeline status (see gateway/openai_api.py), back to its name.
_HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",  # a tenant's quota
    504: "DEADLINE_EXCEEDED",
}
_HTTP_503 = {"overloaded": "RESOURCE_EXHAUSTED", "unavailable": "UNAVAILABLE"}


@dataclass
class CallOutcome:
    status: str = "OK"
    message: str = ""
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    server_ttft: float | None = None
    server_total: float | None = None
    stages: tuple[StageShare, ...] = ()
    itl: list[float] = field(default_factory=list)
    text: str = ""


class Transport(Protocol):
    async def call(self, prompt: Prompt, session: str, timeout: float) -> CallOutcome: ...

    async def close(self) -> None: ...


class _Clock:
    """The client's view of one call: when it was sent, and when each piece of its answer arrived."""

    def __init__(self, outcome: CallOutcome) -> None:
        self.outcome = outcome
        self.sent = time.perf_counter()
        self._last: float | None = None

    def token(self, text: str) -> None:
        now = time.perf_counter()
        if self._last is None:
            self.outcome.ttft = now - self.sent
        else:
            self.outcome.itl.append(now - self._last)
        self._last = now
        self.outcome.text += text

    def end(self) -> CallOutcome:
        self.outcome.e2e = time.perf_counter() - self.sent
        return self.outcome


def share(stage: str, t: Any) -> StageShare:
    """A stage's timing from the gateway's summary (a StageTiming, or its JSON in the HTTP extension)."""
    get = t.get if isinstance(t, dict) else lambda k, _d=0.0: getattr(t, k)
    return StageShare(
        stage=stage,
        queue=float(get("queue_wait_seconds", 0.0)),
        work=float(get("work_seconds", 0.0)),
        first=float(get("first_output_seconds", 0.0)),
        hop=float(get("hop_seconds", 0.0)),
        hop_first=float(get("hop_first_seconds", 0.0)),
        failovers=int(get("failovers", 0)),
    )


class GrpcTransport:
    def __init__(self, target: str, api_key: str | None = None, *, tls: bool = False, roots: bytes | None = None):
        self._client = PipelineClient(target, api_key, tls=tls, root_certificates=roots)

    async def call(self, prompt: Prompt, session: str, timeout: float) -> CallOutcome:
        clock = _Clock(CallOutcome())
        out = clock.outcome
        try:
            async for response in self._client.generate(
                prompt.text,
                messages=prompt.messages,
                session_id=session,
                max_new_tokens=prompt.max_new_tokens,
                timeout=timeout,
            ):
                if response.HasField("chunk"):
                    clock.token(response.chunk.text)
                else:
                    _summary(out, response.summary)
        except GenerationError as e:
            out.status, out.message = e.code.name, e.message
        return clock.end()

    async def close(self) -> None:
        await self._client.close()


def _summary(out: CallOutcome, s: gateway_pb2.GenerateSummary) -> None:
    out.output_tokens = s.usage.completion_tokens
    out.prompt_tokens = s.usage.prompt_tokens
    out.server_ttft = s.time_to_first_token_seconds
    out.server_total = s.total_seconds
    out.stages = tuple(share(t.stage, t) for t in s.timings)


class HttpTransport:
    """POST /v1/chat/completions with `stream: true`; the last chunk's `promptpipe` extension carries the
    same per-stage timings as gRPC's summary, and `stream_options.include_usage` the token counts."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None) -> None:
        self._base = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No pool limit: the load level, not the client, decides how many calls are open.
        self._session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))
        self._model = model

    async def model(self) -> str:
        if self._model is None:
            async with self._session.get(f"{self._base}/models") as r:
                r.raise_for_status()
                self._model = str((await r.json())["data"][0]["id"])
        return self._model

    async def call(self, prompt: Prompt, session: str, timeout: float) -> CallOutcome:
        messages = [{"role": r, "content": c} for r, c in prompt.messages] or [{"role": "user", "content": prompt.text}]
        body: dict[str, Any] = {
            "model": await self.model(),
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if prompt.max_new_tokens:
            body["max_tokens"] = prompt.max_new_tokens
        if session:
            body["prompt_cache_key"] = session  # the session the backend replica is chosen by
        clock = _Clock(CallOutcome())
        out = clock.outcome
        try:
            async with asyncio.timeout(timeout):
                await self._stream(body, timeout, clock)
        except TimeoutError:
            out.status, out.message = "DEADLINE_EXCEEDED", f"no end within {timeout:g}s"
        except aiohttp.ClientError as e:
            out.status, out.message = "UNAVAILABLE", str(e)
        return clock.end()

    async def _stream(self, body: dict[str, Any], timeout: float, clock: _Clock) -> None:
        out = clock.outcome
        headers = {"X-Request-Timeout": f"{timeout:g}"}
        async with self._session.post(f"{self._base}/chat/completions", json=body, headers=headers) as r:
            if r.status != 200:
                _http_error(out, r.status, await r.read())
                return
            event = "message"
            async for raw in r.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                    continue
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                if event == "error":
                    _http_error(out, 0, data.encode())
                    return
                _sse_chunk(out, clock, json.loads(data))
        out.status, out.message = "DATA_LOSS", "the stream ended without [DONE]"

    async def close(self) -> None:
        await self._session.close()


def _sse_chunk(out: CallOutcome, clock: _Clock, chunk: dict[str, Any]) -> None:
    for choice in chunk.get("choices") or ():
        text = (choice.get("delta") or {}).get("content")
        if text:
            clock.token(text)
    if usage := chunk.get("usage"):
        out.output_tokens = int(usage["completion_tokens"])
        out.prompt_tokens = int(usage["prompt_tokens"])
    if ext := chunk.get("promptpipe"):
        out.server_ttft = float(ext["time_to_first_token_seconds"])
        out.server_total = float(ext["total_seconds"])
        out.stages = tuple(share(t["stage"], t) for t in ext["timings"])


def _http_error(out: CallOutcome, status: int, raw: bytes) -> None:
    """An error response (before the stream) or error event (in it) as the status a gRPC client gets."""
    try:
        error = json.loads(raw)["error"]
        message, code = str(error.get("message", "")), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = raw.decode(errors="replace")[:200], None
    if status == 0:  # an error event: its code names it, as the 503s' do
        status = {"overloaded": 503, "unavailable": 503, "timeout": 504, "invalid_api_key": 401}.get(code or "", 500)
    name = _HTTP_503.get(code or "", "UNAVAILABLE") if status == 503 else _HTTP_STATUS.get(status, "INTERNAL")
    out.status, out.message = name, message
