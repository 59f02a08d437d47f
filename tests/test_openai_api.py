"""The OpenAI-compatible API's wire format (gateway/openai_api.py): requests in, chunks and errors out."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from promptpipe.gateway import openai_api as api
from promptpipe.runtime.errors import DeadlineExceeded, InvalidArgument, Shed, UpstreamError
from promptpipe.v1 import common_pb2, gateway_pb2

MODELS = frozenset({"smollm2", "quickstart"})


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "smollm2", "prompt": "hi", **fields}).encode()


def refused(kind: api.Kind, body: bytes) -> api.ApiError:
    with pytest.raises(api.ApiError) as caught:
        api.parse(kind, body, MODELS)
    return caught.value


def test_a_chat_request_becomes_the_gateways_request_field_by_field() -> None:
    parsed = api.parse(
        "chat",
        chat(
            messages=[
                {"role": "user", "content": "What is X?"},
                {"role": "assistant", "content": "A letter."},
                {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Y?"}]},
            ],
            max_completion_tokens=12,
            temperature=0,
            top_p=0.5,
            stop="\n\n",
            seed=7,
            user="u-1",
            prompt_cache_key="conv-9",
            metadata={"team": "search"},
            stream=True,
            stream_options={"include_usage": True},
            n=1,
            tool_choice="none",
            response_format={"type": "text"},
        ),
        MODELS,
    )
    r = parsed.request
    assert [(m.role, m.content) for m in r.messages] == [
        ("user", "What is X?"),
        ("assistant", "A letter."),
        ("user", "And Y?"),
    ]
    assert r.parameters.max_new_tokens == 12
    assert r.parameters.HasField("temperature") and r.parameters.temperature == 0
    assert r.parameters.top_p == 0.5 and list(r.parameters.stop) == ["\n\n"] and r.parameters.seed == 7
    assert r.session_id == "conv-9"
    assert dict(r.metadata) == {"team": "search", "user": "u-1"}
    assert (parsed.stream, parsed.include_usage, parsed.model) == (True, True, "smollm2")


def test_unset_parameters_stay_unset_so_the_pipelines_defaults_apply() -> None:
    r = api.parse("completion", completion(), MODELS).request
    assert r.prompt == "hi"
    assert r.parameters.max_new_tokens == 0
    assert not r.parameters.HasField("temperature") and not r.parameters.HasField("top_p")
    assert not r.parameters.HasField("seed")


@pytest.mark.parametrize(
    ("kind", "body", "param", "words"),
    [
        ("chat", chat(n=2), "n", "n=1"),
        ("chat", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "tools"),
        ("chat", chat(logprobs=True), "logprobs", "logprobs"),
        ("chat", chat(presence_penalty=0.5), "presence_penalty", "penalties"),
        ("chat", chat(response_format={"type": "json_object"}), "response_format", "text"),
        ("chat", chat(frobnicate=1), "frobnicate", "Unrecognized request argument"),
        ("chat", chat(temperature="hot"), "temperature", "temperature"),
        ("chat", chat(max_tokens=0), "max_tokens", "at least 1"),
        ("chat", chat(seed=-1), "seed", "between 0"),
        ("chat", chat(messages=[]), "messages", "at least one"),
        ("chat", chat(messages=[{"role": "system", "content": "be evil"}]), "messages[0].role", "system prompt"),
        ("chat", chat(messages=[{"role": "tool", "content": "{}"}]), "messages[0].role", "tools"),
        ("chat", chat(messages=[{"role": "user", "content": "a", "name": "x"}]), "messages[0].name", "Unrecognized"),
        (
            "chat",
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "messages[0].content[0]",
            "text parts",
        ),
        ("chat", chat(stream_options={"include_usage": True}), "stream_options", "stream is true"),
        ("chat", json.dumps({"model": "smollm2"}).encode(), "messages", "Missing required parameter"),
        ("completion", completion(prompt=["a", "b"]), "prompt", "one prompt"),
        ("completion", completion(echo=True), "echo", "echo"),
        ("completion", completion(best_of=3), "best_of", "best_of"),
        ("completion", completion(suffix="end"), "suffix", "suffix"),
    ],
)
def test_what_the_pipeline_cannot_honour_is_refused_naming_the_parameter(
    kind: api.Kind, body: bytes, param: str, words: str
) -> None:
    err = refused(kind, body)
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", param)
    assert words in err.message
    assert err.body() == {
        "error": {"message": err.message, "type": "invalid_request_error", "param": param, "code": None}
    }


def test_a_body_that_is_not_json_or_not_an_object_is_refused() -> None:
    assert "not valid JSON" in refused("chat", b"{nope").message
    assert refused("chat", b"[1, 2]").status == 400


def test_an_unknown_model_is_not_found_and_the_error_lists_what_is_served() -> None:
    err = refused("chat", chat(model="gpt-4o"))
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")
    assert "quickstart, smollm2" in err.message


def test_the_pipelines_own_checks_come_back_under_the_clients_parameter_names() -> None:
    names = api.parse("chat", chat(max_completion_tokens=5), MODELS).names
    err = api.api_error(InvalidArgument("parameters.max_new_tokens", "must be at most 4096"), names)
    assert (err.status, err.param, err.message) == (
        400,
        "max_completion_tokens",
        "max_completion_tokens: must be at most 4096",
    )
    assert api.api_error(InvalidArgument("parameters.stop[1]", "too long"), names).param == "stop[1]"
    assert api.api_error(InvalidArgument("prompt", "too long"), names).param == "messages"
    assert api.api_error(InvalidArgument("session_id", "too long"), names).param == "prompt_cache_key"
    assert api.api_error(InvalidArgument("messages[2].content", "empty"), names).param == "messages[2].content"


def test_overload_is_a_503_with_the_stages_retry_hint_in_both_headers_the_sdks_read() -> None:
    err = api.api_error(Shed("stage stream: queue full", 0.25))
    assert (err.status, err.type, err.code) == (503, "server_error", "overloaded")
    assert err.headers() == {"Retry-After": "1", "retry-after-ms": "250"}
    passed_on = api.api_error(UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", (), 2.5))
    assert passed_on.status == 503 and passed_on.headers() == {"Retry-After": "3", "retry-after-ms": "2500"}
    # Nearly due is still not now: a hint of 0 ms would send the SDK back at once, to be refused again.
    nearly = api.api_error(Shed("stage stream: queue full", 0.0004))
    assert nearly.headers() == {"Retry-After": "1", "retry-after-ms": "1"}
    unavailable = api.api_error(UpstreamError(grpc.StatusCode.UNAVAILABLE, "draining"))
    assert unavailable.status == 503 and "Retry-After" in unavailable.headers()


def test_deadlines_are_504_and_anything_unexpected_a_500_without_a_retry_hint() -> None:
    assert api.api_error(DeadlineExceeded("too slow")).status == 504
    internal = api.api_error(UpstreamError(grpc.StatusCode.DATA_LOSS, "cut"))
    assert (internal.status, internal.type, internal.headers()) == (500, "server_error", {})


def summary(reason: int = common_pb2.FINISH_REASON_EOS) -> gateway_pb2.GenerateSummary:
    return gateway_pb2.GenerateSummary(
        finish_reason=reason,
        usage=common_pb2.Usage(prompt_tokens=10, completion_tokens=3),
        timings=[common_pb2.StageTiming(stage="rag", queue_wait_seconds=0.001, work_seconds=0.002)],
        request_id="abc",
    )


def test_a_chat_stream_is_openais_chunk_sequence_with_usage_last_when_asked() -> None:
    shapes = api.Shapes("chat", "abc", "smollm2", 1700000000, include_usage=True)
    opening = json.loads(shapes.opening() or "")
    piece = json.loads(shapes.chunk('say "hi"\n'))
    last, usage = shapes.closing(summary(common_pb2.FINISH_REASON_LENGTH))

    for c in (opening, piece, last, usage):
        assert (c["id"], c["object"], c["model"], c["created"]) == (
            "chatcmpl-abc",
            "chat.completion.chunk",
            "smollm2",
            1700000000,
        )
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert piece["choices"] == [
        {"index": 0, "delta": {"content": 'say "hi"\n'}, "logprobs": None, "finish_reason": None}
    ]
    assert piece["usage"] is None and last["usage"] is None
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    assert last["promptpipe"]["timings"] == [
        {
            "stage": "rag",
            "queue_wait_seconds": 0.001,
            "work_seconds": 0.002,
            "first_output_seconds": 0.0,
            "hop_seconds": 0.0,
            "hop_first_seconds": 0.0,
            "failovers": 0,
        }
    ]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
    }


def test_a_completion_stream_carries_text_and_no_usage_unless_asked() -> None:
    shapes = api.Shapes("completion", "abc", "smollm2", 1)
    assert shapes.opening() is None
    piece = json.loads(shapes.chunk("é"))
    assert piece["object"] == "text_completion" and piece["choices"][0]["text"] == "é"
    assert "usage" not in piece
    (last,) = shapes.closing(summary(common_pb2.FINISH_REASON_CONTENT_FILTER))
    assert last["choices"][0]["finish_reason"] == "content_filter"


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (common_pb2.FINISH_REASON_EOS, "stop"),
        (common_pb2.FINISH_REASON_STOP, "stop"),
        (common_pb2.FINISH_REASON_LENGTH, "length"),
        (common_pb2.FINISH_REASON_CONTENT_FILTER, "content_filter"),
    ],
)
def test_a_whole_response_has_the_text_usage_and_mapped_finish_reason(ours: int, theirs: str) -> None:
    body = api.Shapes("chat", "abc", "smollm2", 1).response("Hello.", summary(ours))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello.", "refusal": None}
    assert body["choices"][0]["finish_reason"] == theirs
    assert body["usage"]["total_tokens"] == 13


def test_a_failure_mid_stream_is_an_error_event_the_sdks_raise() -> None:
    event = api.sse_error(api.api_error(DeadlineExceeded("stage stream: deadline passed")))
    lines = event.decode().split("\n")
    assert lines[0] == "event: error" and lines[1].startswith("data: ") and event.endswith(b"\n\n")
    assert json.loads(lines[1][6:])["error"]["message"] == "stage stream: deadline passed"
