"""The gateway's OpenAI-compatible HTTP API, through real stage processes, with the real clients: the
official `openai` SDK (sync and async), curl, and our own `openai` backend calling another pipeline."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import time
import urllib.request

import aiohttp
import openai
import pytest

from promptpipe.contract.spec import StageName
from promptpipe.waiting import wait_until_async
from tests.support.calls import collect
from tests.support.pipelines import RunningPipeline, synthetic_pipeline

pytestmark = pytest.mark.processes

HELLO = [{"role": "user", "content": "hello there"}]


def sdk(p: RunningPipeline, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.openai_base_url, api_key="unused", max_retries=max_retries)


def slow(tokens_per_second: int, tokens: int, **spec: object) -> dict[str, object]:
    return synthetic_pipeline(
        model={"synthetic": {"tokensPerSecond": tokens_per_second}}, generation={"maxNewTokens": tokens}, **spec
    )


async def test_the_sdk_gets_the_same_answer_as_grpc_whole_and_streamed(start_pipeline) -> None:
    p = start_pipeline(synthetic_pipeline())
    client = sdk(p)
    grpc_answer = await collect(p.gateway, "hello there")

    whole = client.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model="synthetic",
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert whole.object == "chat.completion" and whole.model == "synthetic"
    assert whole.choices[0].message.content == grpc_answer.text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 16
    assert whole.usage.prompt_tokens == grpc_answer.summary.usage.prompt_tokens
    timings = (whole.model_extra or {})["promptpipe"]["timings"]
    assert [t["stage"] for t in timings] == ["rag", "assemble", "inference", "post", "stream"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == grpc_answer.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_the_async_sdk_streams_completions_and_lists_the_model(start_pipeline) -> None:
    p = start_pipeline(synthetic_pipeline(name="pipe"))
    async with openai.AsyncOpenAI(base_url=p.openai_base_url, api_key="unused", max_retries=0) as client:
        stream = await client.completions.create(model="pipe", prompt="hello there", max_tokens=5, stream=True)
        texts = [c.choices[0].text async for c in stream if c.choices]
        models = await client.models.list()
        one = await client.models.retrieve("synthetic")

    assert "".join(texts).split() == ["tok"] * 5
    assert [m.id for m in models.data] == ["synthetic", "pipe"]
    assert one.id == "synthetic" and (one.model_extra or {})["promptpipe"]["pipeline"] == "pipe"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 7}, "temperature"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"stop": ["x"] * 9}, "stop"),
        ({"messages": [{"role": "system", "content": "you are evil"}, *HELLO]}, "messages[0].role"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ],
)
async def test_a_bad_parameter_raises_the_sdks_bad_request_error_naming_it(
    start_pipeline, fields: dict[str, object], param: str
) -> None:
    p = start_pipeline(synthetic_pipeline())
    request = {"model": "synthetic", "messages": HELLO, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(p).chat.completions.create(**request)  # type: ignore[call-overload]
    assert caught.value.status_code == 400
    assert caught.value.param == param, caught.value.body
    with pytest.raises(openai.NotFoundError):
        sdk(p).chat.completions.create(model="gpt-4o", messages=HELLO)  # type: ignore[arg-type]
    assert p.metric(StageName.INFERENCE, "promptpipe_backend_generated_tokens_total") == 0


async def test_overload_is_refused_at_once_with_503_and_the_sdk_retries_after_the_hint(start_pipeline) -> None:
    # One call at a time at the gateway, none waiting; each holds it for about a second.
    p = start_pipeline(
        slow(40, 40, stages={"stream": {"queue": {"capacity": 0, "concurrency": 1, "retryAfterSeconds": 0.6}}})
    )
    running = asyncio.create_task(collect(p.gateway, "hello there"))
    await wait_until_async(
        lambda: p.metric(StageName.INFERENCE, "promptpipe_backend_active_generations") == 1, what="a call to run"
    )

    async with aiohttp.ClientSession() as http:
        body = {"model": "synthetic", "messages": HELLO, "stream": True}
        async with http.post(p.openai_base_url + "/chat/completions", json=body) as refused:
            assert refused.status == 503
            assert refused.headers["retry-after-ms"] == "600" and refused.headers["retry-after"] == "1"
            assert (await refused.json())["error"]["code"] == "overloaded"
    assert not running.done(), "the refusal did not wait for the running call"

    started = time.monotonic()
    retried = await asyncio.to_thread(
        sdk(p, max_retries=4).chat.completions.create,
        model="synthetic",
        messages=HELLO,  # type: ignore[arg-type]
    )
    assert retried.usage is not None and retried.usage.completion_tokens == 40
    assert time.monotonic() - started >= 0.6, "the SDK waited the hint before retrying"
    assert (await running).summary is not None
    shed = p.metric(StageName.STREAM, "promptpipe_stage_shed_total", reason="rejected")
    assert 2 <= shed <= 5


async def test_a_deadline_is_504_whole_and_an_error_event_mid_stream(start_pipeline) -> None:
    p = start_pipeline(slow(20, 200, stages={"stream": {"timeoutSeconds": 1}}))
    client = sdk(p)

    with pytest.raises(openai.InternalServerError) as whole:
        client.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
    assert whole.value.status_code == 504

    received: list[str] = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as mid_stream:
        for chunk in client.chat.completions.create(model="synthetic", messages=HELLO, stream=True):  # type: ignore[arg-type]
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert "deadline" in mid_stream.value.message.lower()
    assert "".join(received).strip(), "what streamed before the deadline reached the client"
    assert time.monotonic() - started < 1 + 2.0
    await wait_until_async(
        lambda: p.metric(StageName.INFERENCE, "promptpipe_backend_active_generations") == 0,
        what="the generations to stop",
    )
    assert p.metric(StageName.INFERENCE, "promptpipe_backend_generated_tokens_total") < 2 * 200


def test_the_request_timeout_header_is_the_calls_deadline_and_a_bad_one_is_named(start_pipeline) -> None:
    p = start_pipeline(slow(20, 200))  # ten seconds of tokens, within the stages' 120 s timeout
    client = sdk(p)

    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as late:
        client.chat.completions.create(
            model="synthetic",
            messages=HELLO,  # type: ignore[arg-type]
            extra_headers={"X-Request-Timeout": "0.5"},
        )
    assert late.value.status_code == 504 and time.monotonic() - started < 0.5 + 1.5
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="synthetic",
            messages=HELLO,  # type: ignore[arg-type]
            extra_headers={"X-Request-Timeout": "soon"},
        )
    assert bad.value.param == "X-Request-Timeout" and "'soon'" in bad.value.message


async def test_a_client_that_leaves_mid_stream_stops_the_generation(start_pipeline) -> None:
    p = start_pipeline(slow(20, 500))
    seen = 0
    async with aiohttp.ClientSession() as http:
        body = {"model": "synthetic", "messages": HELLO, "stream": True}
        async with http.post(p.openai_base_url + "/chat/completions", json=body) as response:
            async for line in response.content:
                seen += line.startswith(b"data: ")
                if seen == 4:
                    break  # and the connection closes with the session
    assert seen == 4

    await wait_until_async(
        lambda: p.metric(StageName.INFERENCE, "promptpipe_backend_generations_cancelled_total") == 1,
        what="the backend to see the client leave",
    )
    assert p.metric(StageName.INFERENCE, "promptpipe_backend_active_generations") == 0
    assert p.metric(StageName.INFERENCE, "promptpipe_backend_generated_tokens_total") < 100


def test_curl_streams_server_sent_events_ending_with_done(start_pipeline) -> None:
    p = start_pipeline(synthetic_pipeline())
    body = json.dumps({"model": "synthetic", "prompt": "hello there", "max_tokens": 4, "stream": True})
    url = p.openai_base_url + "/completions"
    out = subprocess.run(
        ["curl", "-sSN", "--fail-with-body", "-H", "Content-Type: application/json", "-d", body, url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    events = [e for e in out.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts).split() == ["tok"] * 4


def test_health_is_on_the_http_port_and_metrics_only_on_the_metrics_port(start_pipeline) -> None:
    p = start_pipeline(synthetic_pipeline())
    root = p.openai_base_url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/health", timeout=5) as health:
        assert json.loads(health.read()) == {"status": "SERVING"}
    sdk(p).completions.create(model="synthetic", prompt="hello")
    with pytest.raises(urllib.error.HTTPError) as public:
        urllib.request.urlopen(root + "/metrics", timeout=5)
    assert public.value.code == 404, "no metrics (tenants' names among them) on the public port"
    assert "promptpipe_gateway_output_tokens_total" in p.metrics(StageName.STREAM)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(root + "/v1/embeddings", timeout=5)
    assert missing.value.code == 404 and "error" in json.loads(missing.value.read())


async def test_one_pipeline_calls_another_through_its_openai_api(start_pipeline) -> None:
    inner = start_pipeline(synthetic_pipeline(name="inner"))
    endpoint = inner.openai_base_url.removesuffix("/v1")
    outer = start_pipeline(
        synthetic_pipeline(
            name="outer",
            model={"name": "front", "backend": "openai", "openai": {"endpoints": [endpoint], "model": "inner"}},
        )
    )

    out = await collect(outer.gateway, "hello there")

    assert out.error is None and out.summary is not None
    assert out.text.split() == ["tok"] * 16
    assert inner.metric(StageName.STREAM, "promptpipe_stage_duration_seconds_count", code="OK") == 1


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_refused_415(start_pipeline, content_type: str | None) -> None:
    """A POST a web page can make a browser send without a preflight (text/plain, a form, no type) is not a
    call: the gateway refuses it before reading the body, and the same body as JSON is answered."""
    p = start_pipeline(synthetic_pipeline())
    body = json.dumps({"model": "synthetic", "messages": [{"role": "user", "content": "hello"}]}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    url = urllib.parse.urlsplit(p.openai_base_url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)  # sends no type of its own
    connection.request("POST", url.path + "/chat/completions", body, headers)
    refused = connection.getresponse()
    assert refused.status == 415
    assert json.loads(refused.read())["error"]["code"] == "unsupported_media_type"
    connection.close()
    declared = urllib.request.Request(
        p.openai_base_url + "/chat/completions", body, {"Content-Type": "application/json; charset=utf-8"}
    )
    with urllib.request.urlopen(declared, timeout=10) as answered:
        assert answered.status == 200
