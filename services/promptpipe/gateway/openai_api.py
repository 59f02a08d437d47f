"""The OpenAI-compatible API's wire format: pure functions.

Request bodies in (checked, turned into a GenerateRequest), chunks, responses and errors out, in the shapes
the OpenAI SDKs parse. What the pipeline cannot honour is refused naming the parameter, never ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import pydantic
from pydantic import BaseModel, ConfigDict

from promptpipe.runtime.errors import InvalidArgument, QuotaExceeded, Shed, StageError, UpstreamError
from promptpipe.v1 import common_pb2, gateway_pb2

Kind = Literal["chat", "completion"]

FINISH_REASONS = {
    common_pb2.FINISH_REASON_EOS: "stop",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}
# Roles a client may send. The system prompt is the pipeline's own (its template), like on gRPC.
CLIENT_ROLES = ("user", "assistant")
RETRY_UNAVAILABLE_SECONDS = 1.0


@dataclass(eq=False)
class ApiError(Exception):
    """An error as the OpenAI API reports it: HTTP status, then `{"error": {...}}`."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # The SDKs read retry-after-ms first (sub-second hints), then Retry-After in whole seconds.
        return {
            "Retry-After": str(max(1, math.ceil(self.retry_after))),
            # Rounded up: a bucket a fraction of a millisecond from its next token must not say "now" (0).
            "retry-after-ms": str(max(1, math.ceil(round(self.retry_after * 1000, 6)))),
        }


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _StreamOptions(_Strict):
    include_usage: bool | None = None


class _Message(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Common(_Strict):
    """Fields both endpoints share. The ones after `metadata` are accepted only at their defaults."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    # OpenAI's cache-routing hint: here, the session a call's backend replica is chosen by.
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class _Chat(_Common):
    messages: list[_Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class _Completion(_Common):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


# Accepted only when they ask for what the pipeline does anyway: (is it the default?, why not otherwise).
_AT_DEFAULT_ONLY: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v == 1, "only n=1 is supported: one answer per request"),
    "best_of": (lambda v: v == 1, "only best_of=1 is supported"),
    "presence_penalty": (lambda v: v == 0, "penalties are not supported"),
    "frequency_penalty": (lambda v: v == 0, "penalties are not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "logprobs": (lambda v: not v, "logprobs are not supported"),
    "top_logprobs": (lambda v: not v, "logprobs are not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
    "tools": (lambda v: not v, "tools are not supported"),
    "tool_choice": (lambda v: v == "none", "tools are not supported"),
    "response_format": (lambda v: v == {"type": "text"}, 'only response_format {"type": "text"} is supported'),
    "store": (lambda v: not v, "stored completions are not supported"),
    "service_tier": (lambda v: v in ("auto", "default"), "service tiers are not supported"),
}


@dataclass(frozen=True)
class ParsedRequest:
    kind: Kind
    model: str
    request: gateway_pb2.GenerateRequest
    stream: bool
    include_usage: bool
    # The parameter names the client used, for errors the pipeline finds later (see `api_error`).
    names: Mapping[str, str] = field(default_factory=dict)


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[dict[str,any]]", "dict[str,any]"):
            continue  # pydantic names the union member it tried; the client named only the field
        else:
            out += f".{part}" if out else str(part)
    return out


# JSON objects one body may hold (messages, their content parts, metadata, stream options): a chat needs a
# few hundred at most. Counted while the body is decoded, which stops at the first past it: a body of tiny
# content parts would otherwise cost 30 times its size in memory, and its parse would hold the event loop.
MAX_OBJECTS = 1024


class _TooManyObjects(Exception):
    pass


def _count_objects(raw: bytes) -> None:
    """Decodes `raw` only to count its objects, stopping at MAX_OBJECTS + 1 (a body that is not JSON is left
    for the model's parse to name)."""
    seen = 0

    def counted(pairs: list[tuple[str, Any]]) -> None:
        nonlocal seen
        seen += 1
        if seen > MAX_OBJECTS:
            raise _TooManyObjects

    try:
        json.loads(raw, object_pairs_hook=counted)
    except _TooManyObjects:
        raise bad_request(None, f"the body holds more than {MAX_OBJECTS} JSON objects") from None
    except ValueError:
        pass


def _validated(model: type[_Chat] | type[_Completion], raw: bytes) -> _Chat | _Completion:
    _count_objects(raw)
    try:
        return model.model_validate_json(raw, strict=True)
    except pydantic.ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = _param(first["loc"])
        if first["type"] == "json_invalid":
            raise bad_request(None, f"the body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise bad_request(None, "the body must be a JSON object") from None
        if first["type"] == "extra_forbidden":
            raise bad_request(param, f"Unrecognized request argument supplied: {param}") from None
        if first["type"] == "missing":
            raise bad_request(param, f"Missing required parameter: '{param}'") from None
        raise bad_request(param, f"Invalid value for '{param}': {first['msg']}") from None


def _message_text(i: int, m: _Message) -> common_pb2.ChatMessage:
    if m.role not in CLIENT_ROLES:
        why = (
            "the pipeline sets its own system prompt (spec.template.system)"
            if m.role in ("system", "developer")
            else "tools are not supported"
        )
        raise bad_request(f"messages[{i}].role", f"role {m.role!r} is not supported: {why}")
    if m.content is None:
        raise bad_request(f"messages[{i}].content", "must be a string or a list of text parts")
    if isinstance(m.content, str):
        return common_pb2.ChatMessage(role=m.role, content=m.content)
    texts = []
    for j, part in enumerate(m.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise bad_request(f"messages[{i}].content[{j}]", 'only text parts ({"type": "text", "text": ...})')
        texts.append(part["text"])
    return common_pb2.ChatMessage(role=m.role, content="".join(texts))


def parse(kind: Kind, raw: bytes, models: frozenset[str]) -> ParsedRequest:
    """Check an OpenAI request body and turn it into the gateway's request.

    Ranges the gRPC API also checks (max tokens, temperature, stop lengths) are left to the one check in
    `requests.py`; `api_error` gives its errors the client's parameter names.
    """
    body = _validated(_Chat if kind == "chat" else _Completion, raw)
    if body.model not in models:
        raise ApiError(
            404,
            f"The model '{body.model}' does not exist; this pipeline serves {', '.join(sorted(models))}",
            param="model",
            code="model_not_found",
        )
    for name, (is_default, why) in _AT_DEFAULT_ONLY.items():
        value = getattr(body, name, None)
        if value is not None and not is_default(value):
            raise bad_request(name, why)
    names = {"session_id": "prompt_cache_key", "metadata": "metadata"}
    request = gateway_pb2.GenerateRequest(session_id=body.prompt_cache_key or "", metadata=body.metadata or {})
    if body.user:
        if "user" in request.metadata:
            raise bad_request("metadata", "'user' is set by the user parameter")
        request.metadata["user"] = body.user
    if isinstance(body, _Chat):
        if not body.messages:
            raise bad_request("messages", "at least one message is required")
        request.messages.extend(_message_text(i, m) for i, m in enumerate(body.messages))
        names["prompt"] = "messages"
    else:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise bad_request("prompt", "exactly one prompt per request")
        request.prompt = prompts[0]
    _parameters(body, request.parameters, names)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options", "only allowed when stream is true")
    return ParsedRequest(kind, body.model, request, bool(body.stream), include_usage, names)


def _parameters(body: _Chat | _Completion, p: common_pb2.GenerationParameters, names: dict[str, str]) -> None:
    max_name = (
        "max_completion_tokens" if isinstance(body, _Chat) and body.max_completion_tokens is not None else "max_tokens"
    )
    max_tokens = body.max_completion_tokens if max_name == "max_completion_tokens" else body.max_tokens  # type: ignore[union-attr]
    if max_tokens is not None:
        if max_tokens < 1:
            raise bad_request(max_name, "must be at least 1")
        p.max_new_tokens = min(max_tokens, 2**32 - 1)
    names["parameters.max_new_tokens"] = max_name
    if body.temperature is not None:
        p.temperature = body.temperature
    if body.top_p is not None:
        p.top_p = body.top_p
    if body.stop is not None:
        p.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.seed is not None:
        if not 0 <= body.seed < 2**64:
            raise bad_request("seed", "must be between 0 and 2^64-1")
        p.seed = body.seed


def _client_param(field_name: str, names: Mapping[str, str]) -> str:
    """A field as the gateway's checks name it (`parameters.stop[1]`), as the client named it (`stop[1]`)."""
    for ours, theirs in names.items():
        if field_name == ours or field_name.startswith((ours + "[", ours + ".")):
            return theirs + field_name[len(ours) :]
    return field_name.removeprefix("parameters.")


_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "server_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
}


def api_error(exc: StageError, names: Mapping[str, str] | None = None) -> ApiError:
    """A pipeline error (the ones gRPC clients get as statuses) as the OpenAI API says it."""
    if isinstance(exc, QuotaExceeded):
        # OpenAI's own shape for its rate limits: the type names the limit.
        return ApiError(429, exc.message, exc.limit, None, "rate_limit_exceeded", exc.retry_after)
    status, kind, code = _BY_CODE.get(exc.code, (500, "server_error", None))
    if isinstance(exc, InvalidArgument):
        param = _client_param(exc.field, names or {})
        problem = exc.message.split(": ", 1)[-1]
        return ApiError(status, f"{param}: {problem}", kind, param, code)
    retry_after: float | None = None
    if isinstance(exc, Shed | UpstreamError) and exc.retry_after is not None:
        retry_after = exc.retry_after
    elif status == 503:
        retry_after = RETRY_UNAVAILABLE_SECONDS
    return ApiError(status, exc.message, kind, None, code, retry_after)


@dataclass
class Shapes:
    """The JSON of one answer's chunks and response, with what every chunk repeats built once."""

    kind: Kind
    request_id: str
    model: str
    created: int
    include_usage: bool = False
    _head: str = ""
    _tail: str = ""

    def __post_init__(self) -> None:
        head = json.dumps(self._base(), separators=(",", ":"))[:-1]  # open for the choices
        if self.kind == "chat":
            self._head = head + ',"choices":[{"index":0,"delta":{"content":'
            self._tail = (
                '},"logprobs":null,"finish_reason":null}]' + (',"usage":null' if self.include_usage else "") + "}"
            )
        else:
            self._head = head + ',"choices":[{"index":0,"text":'
            self._tail = (
                ',"logprobs":null,"finish_reason":null}]' + (',"usage":null' if self.include_usage else "") + "}"
            )

    def _base(self) -> dict[str, Any]:
        chat = self.kind == "chat"
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + self.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def chunk(self, text: str) -> str:
        """One streamed piece of text: the hot path, a string join."""
        return self._head + json.dumps(text, ensure_ascii=False) + self._tail

    def opening(self) -> str | None:
        """Chat streams begin with the assistant's role, as OpenAI's do."""
        if self.kind != "chat":
            return None
        return self._head.removesuffix('"content":') + '"role":"assistant","content":""' + self._tail

    def closing(self, summary: gateway_pb2.GenerateSummary) -> list[dict[str, Any]]:
        """The chunk with the finish reason (and our timings), then the usage chunk if asked for."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(summary)}
        if self.kind == "chat":
            choice["delta"] = {}
        else:
            choice["text"] = ""
        last = {**self._base(), "choices": [choice], "promptpipe": extension(summary)}
        if not self.include_usage:
            return [last]
        return [{**last, "usage": None}, {**self._base(), "choices": [], "usage": usage(summary)}]

    def response(self, text: str, summary: gateway_pb2.GenerateSummary) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(summary)}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            kind = "chat.completion"
        else:
            choice["text"] = text
            kind = "text_completion"
        return {
            **self._base(),
            "object": kind,
            "choices": [choice],
            "usage": usage(summary),
            "promptpipe": extension(summary),
        }


def finish_reason(summary: gateway_pb2.GenerateSummary) -> str:
    return FINISH_REASONS.get(summary.finish_reason, "stop")


def usage(summary: gateway_pb2.GenerateSummary) -> dict[str, int]:
    prompt, completion = summary.usage.prompt_tokens, summary.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension(summary: gateway_pb2.GenerateSummary) -> dict[str, Any]:
    """Per-stage timings, where the SDKs keep unknown fields (`model_extra`) and otherwise ignore them."""
    return {
        "request_id": summary.request_id,
        "time_to_first_token_seconds": round(summary.time_to_first_token_seconds, 6),
        "total_seconds": round(summary.total_seconds, 6),
        "timings": [
            {
                "stage": t.stage,
                "queue_wait_seconds": round(t.queue_wait_seconds, 6),
                "work_seconds": round(t.work_seconds, 6),
                "first_output_seconds": round(t.first_output_seconds, 6),
                "hop_seconds": round(t.hop_seconds, 6),
                "hop_first_seconds": round(t.hop_first_seconds, 6),
                "failovers": t.failovers,
            }
            for t in summary.timings
        ],
    }


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(err: ApiError) -> bytes:
    """A failure after the stream began: OpenAI's error event (the SDKs raise it), then the stream ends."""
    return b"event: error\n" + sse(err.body())


def model_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": models}
