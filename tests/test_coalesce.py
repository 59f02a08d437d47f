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


async def paced(gaps: list[float]) -> AsyncIterator[stage_pb2.StageEvent]:
    """A token after each of `gaps` seconds (the first at once), then the final event."""
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text=f"t{i} ", token_count=1))
    yield stage_pb2.StageEvent(final=stage_pb2.StageFinal(usage=common_pb2.Usage(completion_tokens=len(gaps))))


async def timed(events: AsyncIterator[stage_pb2.StageEvent]) -> list[tuple[float, stage_pb2.StageEvent]]:
    start = asyncio.get_running_loop().time()
    return [(asyncio.get_running_loop().time() - start, e) async for e in events]


async def test_at_the_source_the_first_token_goes_alone_at_once_then_batches_by_interval() -> None:
    # Tokens every 10 ms after the first, batches every 50 ms: the first alone and at once, then a few
    # messages carrying several tokens each, everything in order.
    out = await timed(coalesce(paced([0.0, *[0.01] * 19]), interval=0.05))
    chunks = [(at, e.chunk) for at, e in out if e.HasField("chunk")]
    assert chunks[0][1].text == "t0 " and chunks[0][1].token_count == 1
    assert "".join(c.text for _, c in chunks) == "".join(f"t{i} " for i in range(20))
    assert sum(c.token_count for _, c in chunks) == 20
    assert 2 <= len(chunks) <= 10, [c.token_count for _, c in chunks]  # about 190 ms of tokens, 50 ms batches
    assert out[-1][1].HasField("final")


async def test_the_end_of_the_stream_is_never_held_for_the_interval() -> None:
    # A 1 s interval over 190 ms of tokens: the first alone at once, the rest together when the final comes.
    out = await timed(coalesce(paced([0.0, *[0.01] * 19]), interval=1.0))
    chunks = [(at, e.chunk) for at, e in out if e.HasField("chunk")]
    assert [c.token_count for _, c in chunks] == [1, 19]
    assert chunks[0][0] < 0.5 and out[-1][1].HasField("final") and out[-1][0] < 0.8, [at for at, _ in out]


async def test_a_batch_goes_as_soon_as_max_tokens_are_waiting() -> None:
    out = [e async for e in coalesce(tokens(40), interval=10.0, max_tokens=8)]
    sizes = [e.chunk.token_count for e in out if e.HasField("chunk")]
    assert sizes[0] == 1 and sum(sizes) == 40 and all(s <= 8 + 1 for s in sizes), sizes
    assert len(sizes) >= 40 // 9, "not one batch held for the 10 s interval"


async def test_a_token_after_a_stall_longer_than_the_interval_goes_at_once() -> None:
    out = await timed(coalesce(paced([0.0, 0.3, 0.0]), interval=0.2))
    chunks = [(at, e.chunk.text) for at, e in out if e.HasField("chunk")]
    assert chunks[0][1] == "t0 " and chunks[0][0] < 0.05, "the first before the stall"
    assert "".join(text for _, text in chunks) == "t0 t1 t2 "
    assert chunks[-1][0] < 0.3 + 0.25, "the stall already outlasted the interval: nothing more is waited for"
