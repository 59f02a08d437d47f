"""The `openai` backend against a real OpenAI-compatible server: llama.cpp's, on SmolLM2."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from promptpipe.localproc import free_port
from promptpipe.v1 import common_pb2
from promptpipe.waiting import wait_until_async
from tests.support.calls import Outcome, collect
from tests.support.pipelines import openai_server, synthetic_pipeline

pytestmark = [pytest.mark.processes, pytest.mark.model]


def openai_pipeline(*urls: str) -> dict[str, object]:
    return synthetic_pipeline(
        model={"backend": "openai", "openai": {"endpoints": list(urls), "model": "smollm2"}},
        generation={"maxNewTokens": 12, "temperature": 0.0},
    )


async def test_streams_the_servers_tokens(start_pipeline) -> None:
    with openai_server() as url:
        p = start_pipeline(openai_pipeline(url))
        first = await collect(p.gateway, "What is the capital of France?")
        assert first.error is None and first.summary is not None
        assert first.text.strip() and first.chunks >= 2, "streamed in several chunks"
        assert first.summary.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)
        assert 0 < first.summary.usage.completion_tokens <= 12


async def test_cancel_closes_the_stream_to_the_server(start_pipeline) -> None:
    with openai_server() as url:
        doc = openai_pipeline(url)
        doc["spec"]["generation"]["maxNewTokens"] = 400  # type: ignore[index]
        p = start_pipeline(doc)
        out = Outcome()
        call = asyncio.create_task(collect(p.gateway, "Tell a long story.", out, temperature=0.8))
        await wait_until_async(lambda: out.chunks >= 2, timeout=30, what="two chunks")
        call.cancel()
        from promptpipe.contract.spec import StageName

        await wait_until_async(
            lambda: p.metric(StageName.INFERENCE, "promptpipe_backend_active_generations") == 0,
            what="the generation to end",
        )
        assert p.metric(StageName.INFERENCE, "promptpipe_backend_generations_cancelled_total") == 1
        # The server is free again at once: a new call is answered.
        assert (await collect(p.gateway, "Hi", max_new_tokens=4)).summary is not None


async def test_unreachable_server_is_unavailable_after_retries(start_pipeline) -> None:
    p = start_pipeline(openai_pipeline(f"http://127.0.0.1:{free_port()}"))
    out = await collect(p.gateway, "hello")
    assert out.error is not None and out.error.code is grpc.StatusCode.UNAVAILABLE
    assert "APIConnectionError" in out.error.message
