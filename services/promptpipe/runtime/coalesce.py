"""Coalescing of token chunks when the reader is slower than the producer.

A pump task reads the source into a buffer; the reader takes everything buffered
at once and sends it as one chunk. A reader that keeps up gets every chunk as it
was produced (no added latency); a slow one gets fewer, larger chunks, so the
per-message cost of gRPC stops bounding throughput. The buffer is bounded in
tokens, so a stalled reader stalls the producer (backpressure), not memory.

At the source (the inference stage), batches are made on purpose, as the engines do (vLLM's
`--stream-interval`, TGI's one Decode per step): the first chunk goes out at once, alone; after it, at most
one message every `interval` seconds, or as soon as `max_tokens` are waiting, carrying everything produced
since the last. A message costs a process the same whatever it carries, so a call's tokens cost about
`max_tokens` times less; the last tokens and the final event never wait for the interval.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from promptpipe.v1 import common_pb2, stage_pb2

MAX_BUFFERED_TOKENS = 1024


async def coalesce(
    source: AsyncIterator[stage_pb2.StageEvent],
    max_buffered_tokens: int = MAX_BUFFERED_TOKENS,
    interval: float = 0.0,
    max_tokens: int = 0,
) -> AsyncGenerator[stage_pb2.StageEvent, None]:
    """`source`'s events, chunks merged as described above; `interval` 0: no batch is waited for."""
    buffer: collections.deque[stage_pb2.StageEvent] = collections.deque()
    buffered_tokens = 0
    ready = asyncio.Event()
    space = asyncio.Event()
    space.set()
    done = False
    failure: BaseException | None = None

    async def pump() -> None:
        nonlocal buffered_tokens, done, failure
        try:
            async for event in source:
                if event.HasField("chunk"):
                    while buffered_tokens >= max_buffered_tokens:
                        space.clear()
                        await space.wait()
                    buffered_tokens += max(1, event.chunk.token_count)
                buffer.append(event)
                ready.set()
        except Exception as exc:  # noqa: BLE001 - handed to the reader, raised there
            failure = exc
        finally:
            try:
                # Stopped while the source sat at a `yield` (the buffer was full): close it here, in the
                # task that runs it (its context: the spans it opened end in it), so what it holds (a call
                # upstream, a generation) ends with the reader, not at a GC pass.
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
            except Exception as exc:  # noqa: BLE001 - handed to the reader, raised there
                failure = failure or exc
            finally:
                done = True
                ready.set()

    def batch_ready() -> bool:
        # A whole batch, the stream's end, or an event that is not a chunk (the final one comes last).
        return done or buffered_tokens >= max_tokens > 0 or bool(buffer and not buffer[-1].HasField("chunk"))

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(pump())
    last_sent: float | None = None  # when a chunk last went out; None: none has (the first never waits)
    try:
        while True:
            await ready.wait()
            ready.clear()
            if interval > 0 and last_sent is not None and not batch_ready():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(last_sent + interval):
                        while not batch_ready():
                            await ready.wait()
                            ready.clear()
            if buffer and buffer[0].HasField("chunk"):
                last_sent = loop.time()
            while buffer:
                event = buffer.popleft()
                if not event.HasField("chunk"):
                    yield event
                    continue
                texts = [event.chunk.text]
                count = event.chunk.token_count
                taken = max(1, count)
                while buffer and buffer[0].HasField("chunk"):
                    nxt = buffer.popleft().chunk
                    texts.append(nxt.text)
                    count += nxt.token_count
                    taken += max(1, nxt.token_count)
                buffered_tokens -= taken
                space.set()
                if len(texts) == 1:
                    yield event
                else:
                    yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text="".join(texts), token_count=count))
            if done and not buffer:
                break
        if failure is not None:
            raise failure
    finally:
        # The reader is done: the pump stops and closes the source. A cancel of the reader's own task
        # meanwhile is kept, and raised once the source is closed.
        cancelled = False
        task.cancel()
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
