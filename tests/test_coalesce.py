"""Coalescing: chunks merge only when the reader falls behind; nothing is lost."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator

from promptpipe.runtime.coalesce import coalesce
from promptpipe.v1 import common_pb2, stage_pb2


async def turns(n: int) -> None:
    """Give the event loop `n` turns: the producer's progress, counted without a clock."""
    for _ in range(n):
        await asyncio.sleep(0)


async def tokens(n: int, produced: list[int] | None = None) -> AsyncIterator[stage_pb2.StageEvent]:
    for i in range(n):
        if produced is not None:
            produced.append(i)
        yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text=f"t{i} ", token_count=1))
        await asyncio.sleep(0)
    yield stage_pb2.StageEvent(final=stage_pb2.StageFinal(usage=common_pb2.Usage(completion_tokens=n)))


async def test_a_reader_that_keeps_up_gets_every_chunk_alone() -> None:
    out = [e async for e in coalesce(tokens(50))]
    chunks = [e.chunk for e in out if e.HasField("chunk")]
    assert len(chunks) == 50 and all(c.token_count == 1 for c in chunks)
    assert out[-1].HasField("final")


async def test_a_slow_reader_gets_merged_chunks_with_all_text_in_order() -> None:
    chunks = []
    final = None
    async for e in coalesce(tokens(200)):
        if e.HasField("chunk"):
            chunks.append(e.chunk)
            await turns(20)  # slower than the producer, which yields once a token
        else:
            final = e
    assert "".join(c.text for c in chunks) == "".join(f"t{i} " for i in range(200))
    assert sum(c.token_count for c in chunks) == 200
    assert len(chunks) < 50, "the slow reader should see far fewer, larger chunks"
    assert final is not None and final.final.usage.completion_tokens == 200


async def test_a_stalled_reader_stalls_the_producer() -> None:
    produced: list[int] = []
    stream = coalesce(tokens(10_000, produced), max_buffered_tokens=64)
    await anext(stream)
    await turns(1000)  # the producer could make 1000 tokens in these turns of the loop
    assert 64 <= len(produced) <= 64 + 2, "the producer ran until the buffer, bounded in tokens, was full"
    await stream.aclose()


async def test_errors_reach_the_reader_after_what_came_before() -> None:
    async def failing() -> AsyncIterator[stage_pb2.StageEvent]:
        yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text="a", token_count=1))
        raise RuntimeError("boom")

    seen = []
    try:
        async for e in coalesce(failing()):
            seen.append(e.chunk.text)
    except RuntimeError as err:
        assert str(err) == "boom"
    else:
        raise AssertionError("the error was swallowed")
    assert seen == ["a"]


async def test_closing_the_reader_stops_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[stage_pb2.StageEvent]:
        try:
            while True:
                yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text="x", token_count=1))
                await asyncio.sleep(0)
        finally:
            closed.set()

    stream = coalesce(endless())
    await anext(stream)
    await stream.aclose()
    assert closed.is_set()


async def test_closing_the_reader_closes_a_source_held_up_by_the_full_buffer() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[stage_pb2.StageEvent]:
        try:
            while True:  # never awaits: the pump stops it only when the buffer is full
                yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text="x", token_count=1))
        finally:
            closed.set()  # where the inference stage closes the generation and counts it ended

    stream = coalesce(endless(), max_buffered_tokens=4)
    await anext(stream)
    await turns(50)  # the buffer fills: the pump waits for room, the source waits at its yield
    await stream.aclose()
    assert closed.is_set(), "the source is closed with the reader, not whenever the garbage collector gets to it"


async def test_a_reader_cancelled_while_the_source_winds_down_stays_cancelled() -> None:
    """The reader closes its stream; while the source takes its time to stop, the reader's own task is
    cancelled (its client left): that cancel is not swallowed by the wind-down."""
    winding_down = asyncio.Event()
    log: list[str] = []

    async def slow_to_stop() -> AsyncIterator[stage_pb2.StageEvent]:
        yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text="a", token_count=1))
        try:
            await asyncio.Event().wait()  # generating, until cancelled
        except asyncio.CancelledError:
            winding_down.set()
            await asyncio.shield(asyncio.sleep(0.2))  # a cleanup that takes a while (a backend told to stop)
            log.append("source stopped")
            raise

    async def reader() -> None:
        events = coalesce(slow_to_stop())
        async for _ in events:
            break
        await events.aclose()
        log.append("reader went on")

    task = asyncio.create_task(reader())
    await winding_down.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and task.cancelled(), log
    assert log == ["source stopped"], "the source stopped, and the cancelled reader did not go on"


CURRENT_SPAN: contextvars.ContextVar[str] = contextvars.ContextVar("current_span", default="")


async def test_the_source_is_closed_in_the_task_that_runs_it_so_what_it_set_in_its_context_resets() -> None:
    """A source that sets a context variable and resets it when it ends (as an OpenTelemetry span made
    current does) is closed in its own context, even when held up at a `yield` by a full buffer: resetting
    from another task's context fails ("Failed to detach context" in a traced stage's log)."""
    ended: list[str] = []

    async def traced() -> AsyncIterator[stage_pb2.StageEvent]:
        token = CURRENT_SPAN.set("inference")
        try:
            while True:  # never awaits: the pump stops it only when the buffer is full
                yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text="x", token_count=1))
        finally:
            try:
                CURRENT_SPAN.reset(token)
                ended.append("reset")
            except ValueError as exc:
                ended.append(f"not reset: {exc}")

    stream = coalesce(traced(), max_buffered_tokens=4)
    await anext(stream)
    await turns(50)  # the buffer fills: the source waits at its yield
    await stream.aclose()
    assert ended == ["reset"]
