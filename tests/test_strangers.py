"""Nothing is read or parsed for a stranger, and nothing unbounded for anyone: a running gateway's public ports,
tried as a hostile client would (a gRPC client without a key, raw sockets for the slow and oversized cases,
a gzip bomb), its memory read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from promptpipe.contract.spec import StageName
from promptpipe.runtime.identity import TokenSource
from promptpipe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, stage_pb2, stage_pb2_grpc
from tests.support.pipelines import RunningPipeline, synthetic_pipeline, tenant_keys

pytestmark = pytest.mark.processes

MIB = 1024 * 1024
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5


@pytest.fixture
def key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return tenant_keys(tmp_path, monkeypatch, "alice")["alice"]


def gateway_with_limits(start_pipeline: Any, **spec: Any) -> RunningPipeline:
    limits = {"http": {"headerTimeoutSeconds": HEADER_TIMEOUT, "bodyTimeoutSeconds": BODY_TIMEOUT}}
    return start_pipeline(synthetic_pipeline(**limits, **spec))  # type: ignore[no-any-return]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def statuses(target: str, requests: list[gateway_pb2.GenerateRequest], key: str | None) -> list[grpc.StatusCode]:
    """Each request's final status, all sent at once on one channel."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(request: gateway_pb2.GenerateRequest) -> grpc.StatusCode:
            call = stub.Generate(request, metadata=metadata, timeout=30)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        return list(await asyncio.gather(*(one(r) for r in requests)))


def huge(size: int) -> gateway_pb2.GenerateRequest:
    # Many messages of 200,000 characters: within each message's limit, past the whole prompt's.
    count = size // 200_000
    return gateway_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="x" * 200_000) for _ in range(count)]
    )


def test_calls_without_a_key_cost_the_gateway_no_memory_for_their_messages(start_pipeline, key) -> None:
    p = gateway_with_limits(start_pipeline)
    pid = p.pid(StageName.STREAM)
    asyncio.run(statuses(p.gateway, [gateway_pb2.GenerateRequest(prompt="warm up")], key))
    idle = rss_mib(pid)
    for _ in range(3):
        codes = asyncio.run(statuses(p.gateway, [huge(15 * MIB)] * 16, None))
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 16
    grown = rss_mib(pid) - idle
    # Parsed, 16 messages of 15 MiB would be 240 MiB (the gateway's RSS went 77 -> 306 MB before the check
    # moved ahead of the read); unread, a few flow-control windows at most.
    assert grown < 24, f"the gateway grew {grown:.1f} MiB for 48 calls it refused"
    assert asyncio.run(statuses(p.gateway, [gateway_pb2.GenerateRequest(prompt="still here")], key)) == [
        grpc.StatusCode.OK
    ]
    assert p.metric(StageName.STREAM, "promptpipe_stage_queue_wait_seconds_count") == 2, "no refused call queued"


def test_a_message_larger_than_the_longest_prompt_is_refused_from_its_length(start_pipeline, key) -> None:
    p = gateway_with_limits(start_pipeline)
    started = time.monotonic()
    codes = asyncio.run(statuses(p.gateway, [huge(15 * MIB)] * 4, key))
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
    assert time.monotonic() - started < 10, "refused from the length prefix, not after the message is read"
    assert p.metric(StageName.STREAM, "promptpipe_stage_queue_wait_seconds_count") == 0


def test_a_prompt_over_the_cap_is_refused_at_the_gateway_before_retrieval(start_pipeline, key) -> None:
    p = gateway_with_limits(start_pipeline, generation={"maxNewTokens": 16, "maxPromptCharacters": 4096})
    messages = [common_pb2.ChatMessage(role="user", content="y" * 3000)] * 2
    with pytest.raises(grpc.RpcError) as err:
        asyncio.run(_generate(p.gateway, gateway_pb2.GenerateRequest(messages=messages), key))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in err.value.details() and "generation.maxPromptCharacters" in err.value.details()
    # Not one call reached a stage behind the gateway.
    for stage in (StageName.ASSEMBLE, StageName.POST):
        assert p.metric(stage, "promptpipe_stage_queue_wait_seconds_count") == 0, stage


async def _generate(target: str, request: gateway_pb2.GenerateRequest, key: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        async for _ in gateway_pb2_grpc.GatewayStub(channel).Generate(
            request, metadata=(("authorization", f"Bearer {key}"),), timeout=30
        ):
            pass


# ---- HTTP: raw sockets


def address(p: RunningPipeline) -> tuple[str, int]:
    url = urlsplit(p.openai_base_url)
    assert url.hostname and url.port
    return url.hostname, url.port


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `seconds`, and what it sent before."""
    sock.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not data:
            return True, got
        got += data
    return False, got


def test_connections_dripping_their_headers_are_closed(start_pipeline, key) -> None:
    p = gateway_with_limits(start_pipeline)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n".encode()
    socks = [socket.create_connection(address(p)) for _ in range(50)]
    opened = time.monotonic()
    for i in range(len(head)):  # a byte at a time, never the blank line that ends the head
        for s in socks:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.send(head[i : i + 1])
        time.sleep(0.05)
        if time.monotonic() - opened > HEADER_TIMEOUT + 1:
            break
    results = [closed_within(s, HEADER_TIMEOUT + 3) for s in socks]
    took = time.monotonic() - opened
    for s in socks:
        s.close()
    assert all(closed for closed, _ in results), f"{sum(not c for c, _ in results)} of 50 still open after {took:.1f} s"


def test_a_body_dripped_past_its_timeout_gets_408_and_a_closed_connection(start_pipeline, key) -> None:
    p = gateway_with_limits(start_pipeline)
    body = json.dumps({"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}).encode()
    s = socket.create_connection(address(p))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    started = time.monotonic()
    for i in range(len(body) - 1):  # never the last byte
        if time.monotonic() - started > BODY_TIMEOUT + 1:
            break
        s.send(body[i : i + 1])
        time.sleep(0.1)
    closed, answer = closed_within(s, BODY_TIMEOUT + 3)
    s.close()
    assert closed, "the connection stayed open"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "timeout" and "did not arrive within" in error["message"]


def post(p: RunningPipeline, body: bytes, key: str, **headers: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{p.openai_base_url}/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_gzip_bomb_is_refused_413_while_it_inflates_in_bounded_steps(start_pipeline, key) -> None:
    p = gateway_with_limits(start_pipeline)
    pid = p.pid(StageName.STREAM)
    bomb = gzip.compress(b'{"model": "synthetic", "messages": [' + b" " * (200 * MIB), compresslevel=9)
    assert len(bomb) < 300 * 1024
    idle = rss_mib(pid)
    status, body = post(p, bomb, key, **{"Content-Encoding": "gzip"})
    assert status == 413 and body["error"]["code"] == "too_large"
    assert "spec.http.maxBodyBytes" in body["error"]["message"]
    grown = rss_mib(pid) - idle
    assert grown < 16, f"the gateway grew {grown:.1f} MiB inflating a {len(bomb) // 1024} KiB body"
    # A gzip body within the limit is served as any other.
    ok = gzip.compress(json.dumps({"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}).encode())
    status, answer = post(p, ok, key, **{"Content-Encoding": "gzip"})
    assert status == 200 and answer["choices"][0]["message"]["content"]
    status, body = post(p, b"not gzip at all", key, **{"Content-Encoding": "gzip"})
    assert status == 400 and "inflate" in body["error"]["message"]
    status, body = post(p, ok, key, **{"Content-Encoding": "br"})
    assert status == 415 and body["error"]["code"] == "unsupported_encoding"


def test_bodies_of_tiny_content_parts_are_refused_while_they_are_decoded(start_pipeline, key) -> None:
    p = gateway_with_limits(start_pipeline)
    pid = p.pid(StageName.STREAM)
    part = {"type": "text", "text": "a"}
    body = json.dumps({"model": "synthetic", "messages": [{"role": "user", "content": [part] * 33_000}]}).encode()
    assert len(body) < MIB  # within the body limit: what costs is the objects, not the bytes
    idle = rss_mib(pid)

    def one(_: int) -> tuple[int, dict[str, Any]]:
        return post(p, body, key)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(status == 400 and "more than 1024 JSON objects" in b["error"]["message"] for status, b in answers)
    grown = rss_mib(pid) - idle
    # Decoded whole, 33,000 parts are about 12 MB of objects per body (the gateway grew 36 MiB for 8).
    assert grown < 8, f"the gateway grew {grown:.1f} MiB for 8 bodies of {len(body) // 1024} KiB"


def test_a_body_refused_while_it_is_read_or_parsed_is_charged_to_the_tenant(start_pipeline, key) -> None:
    p = gateway_with_limits(start_pipeline, auth={"defaultQuota": {"requestsPerMinute": 3}})
    for _ in range(3):
        status, body = post(p, b"{not json", key)
        assert status == 400, body
    # A good body now: the three bad ones used the minute's calls.
    good = json.dumps({"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, body = post(p, good, key)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body


# ---- behind the gateway: the inference stage checks what it is asked, whoever asks


async def run_inference(
    target: str, item: stage_pb2.WorkItem, identity: TokenSource
) -> tuple[grpc.StatusCode, str, int]:
    """A direct Stage/Run to the inference stage with `identity`'s token: its status, message, and the tokens
    it streamed."""
    tokens = 0
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            async for event in stage_pb2_grpc.StageStub(channel).Run(item, timeout=30, metadata=identity.metadata()):
                tokens += event.chunk.token_count
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or "", tokens
    return grpc.StatusCode.OK, "", tokens


def test_the_inference_stage_refuses_past_the_pipelines_limits_whoever_calls(start_pipeline) -> None:
    p = gateway_with_limits(start_pipeline, template={"maxPromptTokens": 256})
    target = p.target(StageName.INFERENCE)
    post = p.identity_of(StageName.POST)  # the one caller its identity check lets through
    asking = stage_pb2.WorkItem(prompt="hi", parameters=common_pb2.GenerationParameters(max_new_tokens=100_000))
    code, message, tokens = asyncio.run(run_inference(target, asking, post))
    assert (code, tokens) == (grpc.StatusCode.INVALID_ARGUMENT, 0)
    assert message.startswith("parameters.max_new_tokens: must be at most 4096")
    hot = stage_pb2.WorkItem(prompt="hi", parameters=common_pb2.GenerationParameters(temperature=9))
    assert asyncio.run(run_inference(target, hot, post))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "parameters.temperature: must be between 0 and 2",
    )
    long = stage_pb2.WorkItem(prompt="w " * 10_000)
    code, message, _ = asyncio.run(run_inference(target, long, post))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "budget of 256 tokens" in message
    # Unset parameters get the pipeline's defaults (maxNewTokens 16 here), not the backend's or none.
    assert asyncio.run(run_inference(target, stage_pb2.WorkItem(prompt="hi"), post)) == (grpc.StatusCode.OK, "", 16)
    # A call carried on after a failure (`resume`) claims no more than the call could have received.
    owed = stage_pb2.WorkItem(prompt="hi", resume=stage_pb2.Resume(text="x", tokens=17))
    assert asyncio.run(run_inference(target, owed, post))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "resume.tokens: more than the call's max_new_tokens (16)",
    )
    padded = stage_pb2.WorkItem(prompt="hi", resume=stage_pb2.Resume(text="w" * 100_000, tokens=3))
    assert asyncio.run(run_inference(target, padded, post))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "resume.text: longer than 3 tokens can be",
    )
    # ... and gets only the tokens left: 16 - 10.
    assert asyncio.run(
        run_inference(target, stage_pb2.WorkItem(prompt="hi", resume=stage_pb2.Resume(text=" a b", tokens=10)), post)
    ) == (grpc.StatusCode.OK, "", 6)
