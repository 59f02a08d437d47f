"""Calls to a fused stage: the stage's own handler, in its caller's process, in place of a gRPC call.

The caller sees what a `StageClient` gives (`process`, `run`, `close`): the same events, timings and
errors, a refusal included (RESOURCE_EXHAUSTED with its retry hint, naming the stage). The stage keeps
its admission queue, deadline cap, span and metrics; only the hop goes (no serialization, no network,
no second event loop).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from promptpipe.runtime.calls import add_hop
from promptpipe.runtime.errors import as_received
from promptpipe.runtime.stage import EnrichingHandler, StageRuntime, StreamingHandler
from promptpipe.v1 import stage_pb2


class InProcessStage:
    def __init__(self, runtime: StageRuntime, handler: EnrichingHandler | StreamingHandler) -> None:
        self.runtime = runtime
        self.handler = handler
        self.name = f"the {runtime.stage} stage"
        self._closed = False
        # Decided once here: a Protocol isinstance check is too slow for every call.
        self._enricher = handler if isinstance(handler, EnrichingHandler) else None
        self._streamer = handler if isinstance(handler, StreamingHandler) else None

    async def start(self) -> None:
        await self.handler.start()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.handler.close()

    async def process(self, item: stage_pb2.WorkItem, deadline: float) -> stage_pb2.WorkItem:
        """rag and assemble: the enriched work item (the same message, enriched in place)."""
        handler = self._enricher
        if handler is None:
            raise TypeError(f"{self.name} streams: call run")
        started = time.perf_counter()
        capped, callers = self.runtime.deadline_within(deadline - time.monotonic())
        try:
            async with self.runtime.admit(capped, callers, None, self.runtime.flow_of(item)) as call:
                work_started = time.perf_counter()
                result = await handler.process(item, call)
                result.timings.append(self.runtime.timing(call, work_started))
        except Exception as exc:  # noqa: BLE001 - what the caller would have received as a status
            raise as_received(exc, self.runtime.stage) from None
        add_hop(result.timings[-1], time.perf_counter() - started, None)
        return result

    async def run(self, item: stage_pb2.WorkItem, deadline: float) -> AsyncGenerator[stage_pb2.StageEvent, None]:
        """inference and post: their events, this stage's timing on the final one."""
        handler = self._streamer
        if handler is None:
            raise TypeError(f"{self.name} has no run: call process")
        started = time.perf_counter()
        capped, callers = self.runtime.deadline_within(deadline - time.monotonic())
        try:
            async with self.runtime.admit(capped, callers, None, self.runtime.flow_of(item)) as call:
                work_started = time.perf_counter()
                first_output: float | None = None
                events = handler.run(item, call)
                try:
                    async for event in events:
                        if event.HasField("final"):
                            timing = self.runtime.timing(call, work_started, first_output)
                            event.final.timings.append(timing)
                            now = time.perf_counter()
                            add_hop(timing, now - started, (first_output or now) - started)
                        elif first_output is None:
                            first_output = time.perf_counter()
                        yield event
                finally:
                    aclose = getattr(events, "aclose", None)
                    if aclose is not None:
                        await aclose()
        except Exception as exc:  # noqa: BLE001 - what the caller would have received as a status
            raise as_received(exc, self.runtime.stage) from None
