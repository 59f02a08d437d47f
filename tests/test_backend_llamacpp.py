"""The embedded llama.cpp backend on the SmolLM2 model, driven directly: a cancelled reader stops the decode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from promptpipe.backends.base import GenerationRequest
from promptpipe.backends.llamacpp import LlamaCppBackend
from promptpipe.contract.spec import LlamaCppSpec
from promptpipe.runtime.metrics import BackendMetrics
from promptpipe.waiting import wait_until_async

pytestmark = pytest.mark.model

BACKEND_LABELS = {"pipeline": "test", "backend": "llamacpp"}


@pytest.fixture
async def backend() -> AsyncIterator[tuple[LlamaCppBackend, CollectorRegistry]]:
    registry = CollectorRegistry()
    llm = LlamaCppBackend(LlamaCppSpec(), BackendMetrics(registry, "test", "llamacpp"))
    await llm.start()
    yield llm, registry
    await llm.close()


def decoded(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("promptpipe_backend_decoded_tokens_total", BACKEND_LABELS) or 0.0


def long_story() -> GenerationRequest:
    return GenerationRequest(
        prompt="Write a very long story about a dragon.",
        max_new_tokens=2000,  # far more than the test reads
        temperature=0.8,
        top_p=0.95,
        top_k=40,
        seed=1,
        session_id="",
        deadline=time.monotonic() + 120,
    )


async def test_a_reader_cancelled_while_pieces_wait_for_it_stops_the_decode(
    backend: tuple[LlamaCppBackend, CollectorRegistry],
) -> None:
    llm, registry = backend
    backlog_read = asyncio.Event()
    read = 0

    async def reader() -> None:
        nonlocal read
        async for _ in llm.generate(long_story()):
            read += 1
            if read == 1:
                await asyncio.sleep(0.5)  # pieces pile up in the hand-over meanwhile
            elif read == 3:
                backlog_read.set()

    task = asyncio.create_task(reader())
    async with asyncio.timeout(60):
        await backlog_read.wait()
    # The reader is taking a piece that is already there: the cancel arrives as the piece does, the
    # moment asyncio.wait_for (Python 3.11) would swallow it and read on.
    task.cancel()
    async with asyncio.timeout(10):
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled(), "the reader ends with its cancel, not by reading on"
    # The decode thread gives the model back when it stops, within a token of the cancel.
    await wait_until_async(lambda: llm.held_for() == 0, "the model to be free for the next call", timeout=5)
    stopped_at = decoded(registry)
    await asyncio.sleep(0.5)
    assert decoded(registry) == stopped_at, "llama.cpp is no longer decoding"
    assert stopped_at < 400, "decoding stopped near the cancel, long before max_new_tokens"
