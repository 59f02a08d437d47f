"""A stage's gRPC handler, driven in-process with a stand-in for grpc's servicer context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry

from promptpipe.contract.spec import StageSpec
from promptpipe.runtime.stage import Call, StageRuntime, StageServicer
from promptpipe.v1 import common_pb2, stage_pb2
from promptpipe.waiting import wait_until_async


class Context:
    """What the servicer uses of grpc.aio's context: the deadline, and callbacks run when the call ends."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[object], None]] = []

    def time_remaining(self) -> float:
        return 30.0

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:
        for callback in self.callbacks:
            callback(self)


class Endless:
    """A streaming handler whose stream runs until it is closed (a generation upstream, say)."""

    def __init__(self) -> None:
        self.closed = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def run(self, item: stage_pb2.WorkItem, call: Call) -> AsyncIterator[stage_pb2.StageEvent]:
        async def events() -> AsyncIterator[stage_pb2.StageEvent]:
            try:
                while True:
                    yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text="x", token_count=1))
            finally:
                self.closed = True  # where a real stream cancels its call upstream

        return events()


async def test_a_handlers_stream_is_closed_when_its_call_ends_though_grpc_dropped_it_at_a_yield() -> None:
    handler = Endless()
    servicer = StageServicer(StageRuntime.create("post", StageSpec(), CollectorRegistry(), "p"), handler)
    context = Context()
    run = servicer.Run(stage_pb2.WorkItem(), context)  # type: ignore[arg-type]
    await anext(run)  # the handler is suspended at its yield while grpc writes the event
    context.end()  # the client leaves: grpc ends the call, and drops the handler where it is
    await wait_until_async(lambda: handler.closed, "the handler's stream to be closed", timeout=5)
    assert run.ag_frame is not None, "still referenced: no garbage collection closed it"
