"""Tokens in batches after the first (spec.batching), through real stage processes: the first token is
never held for the interval, a call's text and usage are the unbatched run's, over gRPC and the OpenAI API."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.support.calls import Outcome, collect
from tests.support.pipelines import RunningPipeline, synthetic_pipeline, tgi_server

pytestmark = pytest.mark.processes

# The TGI test server's words, a token each (tests/support/tgi_server.py).
WORDS = " alpha bravo charlie delta echo foxtrot golf hotel"


def tgi_pipeline(url: str, batching: dict[str, object], name: str = "t") -> dict[str, object]:
    return synthetic_pipeline(
        name,
        model={"backend": "tgi", "tgi": {"endpoints": [url]}},
        generation={"maxNewTokens": 8},
        batching=batching,
    )


async def test_the_first_token_is_never_held_for_the_interval_and_the_rest_come_in_batches(start_pipeline) -> None:
    with tgi_server() as url:
        # A second between batches; the backend sends a token, then stalls 700 ms before each next one.
        p: RunningPipeline = start_pipeline(tgi_pipeline(url, {"intervalMilliseconds": 1000, "maxTokens": 0}))
        started = time.monotonic()
        first_at: list[float] = []
        outcome = Outcome()

        async def watch() -> None:
            await outcome.first_chunk.wait()
            first_at.append(time.monotonic() - started)

        watcher = asyncio.create_task(watch())
        out = await collect(p.gateway, "slow:700", outcome, max_new_tokens=3)
        await watcher
        assert out.error is None and out.text == " alpha bravo charlie"
        # The backend sends each token 700 ms after the one before: the client had the first (at about
        # 0.7 s) before the backend sent the second (1.4 s), though the interval is a second.
        assert first_at[0] < 1.4, first_at
        assert out.summary is not None and out.summary.usage.completion_tokens == 3


async def test_batched_text_and_usage_equal_every_token_alone_over_grpc_and_the_openai_api(start_pipeline) -> None:
    with tgi_server() as url:
        alone = start_pipeline(tgi_pipeline(url, {"intervalMilliseconds": 0, "maxTokens": 0}, "alone"))
        batched = start_pipeline(tgi_pipeline(url, {"intervalMilliseconds": 1000, "maxTokens": 0}, "batched"))
        # Tokens 50 ms apart: every one alone in the first; in the second, the first alone and the other
        # seven together (the interval outlasts the call, and the final event never waits for it). Post may
        # hold the last few characters back until the end (a stop sequence or an address could span them):
        # one message more in either.
        one, many = await collect(alone.gateway, "slow:50"), await collect(batched.gateway, "slow:50")
        assert one.text == many.text == WORDS
        assert one.chunks >= 8 and many.chunks <= 3, (one.chunks, many.chunks)
        assert one.summary is not None and many.summary is not None
        assert one.summary.usage.completion_tokens == many.summary.usage.completion_tokens == 8

        client = openai.OpenAI(base_url=batched.openai_base_url, api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="synthetic",
            messages=[{"role": "user", "content": "slow:50"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(texts) == WORDS and len(texts) <= 3, texts  # a chunk may carry several tokens' text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
