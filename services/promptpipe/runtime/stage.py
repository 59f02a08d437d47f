"""What every stage shares: admission, deadline, span, timing, metrics, error mapping.

A stage's own logic is a handler: `process` (rag, assemble) or `run` (inference,
post) for one work item. It never touches gRPC contexts, status codes or metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import grpc
from prometheus_client import CollectorRegistry

from promptpipe.contract.spec import AuthSpec, StageSpec
from promptpipe.contract.tracing import QUEUE_WAIT_ATTRIBUTE, SPAN_NAMES
from promptpipe.runtime.admission import ONE_FLOW, AdmissionQueue, Flow
from promptpipe.runtime.errors import DeadlineExceeded, Shed, StageError, abort_with
from promptpipe.runtime.logs import in_call
from promptpipe.runtime.metrics import StageMetrics
from promptpipe.runtime.quotas import TenantFlows
from promptpipe.runtime.tracing import tracer
from promptpipe.v1 import common_pb2, stage_pb2


@dataclass
class Call:
    """One admitted call as a handler sees it."""

    deadline: float  # time.monotonic() clock
    queue_wait: float
    # Times the handler carried the call on elsewhere after what served it failed (its timing says).
    failovers: int = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class StageHandler(Protocol):
    async def start(self) -> None:
        """Load what the stage needs (index, model) before it reports SERVING."""

    async def close(self) -> None: ...


@runtime_checkable
class EnrichingHandler(StageHandler, Protocol):
    """rag, assemble: one work item in, the same item enriched out."""

    async def process(self, item: stage_pb2.WorkItem, call: Call) -> stage_pb2.WorkItem: ...


@runtime_checkable
class StreamingHandler(StageHandler, Protocol):
    """inference, post: token chunks, then one final event."""

    def run(self, item: stage_pb2.WorkItem, call: Call) -> AsyncIterator[stage_pb2.StageEvent]: ...


class StageRuntime:
    def __init__(
        self, stage: str, spec: StageSpec, queue: AdmissionQueue, metrics: StageMetrics, auth: AuthSpec | None = None
    ) -> None:
        self.stage = stage
        self.spec = spec
        self.queue = queue
        self.metrics = metrics
        self._span_name = SPAN_NAMES.get(stage, stage)
        self._flows = TenantFlows(auth if auth is not None else AuthSpec())

    @classmethod
    def create(
        cls, stage: str, spec: StageSpec, registry: CollectorRegistry, pipeline: str, auth: AuthSpec | None = None
    ) -> StageRuntime:
        """A stage's runtime with its own admission queue; with `auth`, its calls are admitted by their
        tenants' flows."""
        queue = AdmissionQueue.of(spec.queue, stage)
        return cls(stage, spec, queue, StageMetrics(registry, pipeline, stage, queue), auth)

    def flow_of(self, item: stage_pb2.WorkItem) -> Flow:
        """The flow a work item is admitted by: its tenant's, as the gateway set it."""
        return self._flows.of(item.metadata.get("tenant", ""))

    def refused_at_the_door(self, tenant: str) -> Shed | None:
        """What this stage's queue would refuse a call of `tenant` with now, counted as its refusals are; or
        None. For a check before the call's request is read; admission checks again (and may still shed)."""
        refused = self.queue.refusal(self._flows.of(tenant))
        if refused is not None:
            self.queue.counters.rejected += 1
            self.metrics.shed.get(refused.reason, self.metrics.shed["rejected"]).inc()
            self.metrics.observe_call(refused.code.name, 0.0)
        return refused

    def deadline_for(self, context: grpc.aio.ServicerContext) -> tuple[float, bool]:
        """The caller's deadline, capped by this stage's timeout; and whether it is the caller's."""
        return self.deadline_within(context.time_remaining())

    def deadline_within(self, remaining: float | None) -> tuple[float, bool]:
        """`remaining` seconds from now (None: the caller set none), capped by this stage's timeout; and
        whether the deadline is the caller's."""
        if remaining is not None and remaining < self.spec.timeout_seconds:
            return time.monotonic() + remaining, True
        return time.monotonic() + self.spec.timeout_seconds, False

    @contextlib.asynccontextmanager
    async def admitted(self, context: grpc.aio.ServicerContext, flow: Flow = ONE_FLOW) -> AsyncIterator[Call]:
        """`admit` for a gRPC call: its deadline, and any failure of the body mapped to a status (the one
        place errors become gRPC statuses). Past its deadline, the watchdog sends the status and ends it."""
        deadline, callers = self.deadline_for(context)

        def overrun() -> None:
            exc = DeadlineExceeded(f"stage {self.stage}: the call outlived its deadline (is the client reading?)")
            _in_background(_quietly(abort_with(context, exc, self.stage)))

        try:
            async with self.admit(deadline, callers, overrun, flow) as call:
                yield call
        except Exception as exc:  # noqa: BLE001 - every error becomes a status, in abort_with
            await abort_with(context, exc, self.stage)

    @contextlib.asynccontextmanager
    async def admit(
        self, deadline: float, callers: bool, overrun: Callable[[], None] | None, flow: Flow = ONE_FLOW
    ) -> AsyncIterator[Call]:
        """Admit a call of any transport and hold its work slot for the body, in a span, with the metrics.
        Errors pass through (the transport turns them into its own statuses). A body that outlives its
        deadline by WATCHDOG_SLACK_SECONDS, wherever it is stuck, gets `overrun()` then is cancelled (None:
        no watchdog, for a call in-process, which its caller's own watchdog bounds)."""
        started = time.perf_counter()
        code = "OK"
        watchdog: _Watchdog | None = None
        try:
            async with self.queue.slot(deadline - time.monotonic(), flow) as waited:
                # Only an admitted call gets a watchdog: a refusal costs no timer.
                if overrun is not None:
                    watchdog = _Watchdog(deadline + WATCHDOG_SLACK_SECONDS, overrun)
                self.metrics.queue_wait.observe(waited)
                started = time.perf_counter()
                # The wait is the span's attribute: the span itself covers the work, from the slot on.
                with tracer().start_as_current_span(self._span_name, attributes={QUEUE_WAIT_ATTRIBUTE: waited}):
                    yield Call(deadline, waited)
        except (asyncio.CancelledError, GeneratorExit):  # the caller left (in-process: closed the stream)
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = exc.code.name if isinstance(exc, StageError) else "INTERNAL"
            if isinstance(exc, Shed):
                self.metrics.shed.get(exc.reason, self.metrics.shed["rejected"]).inc()
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
                if watchdog.fired:
                    code = DeadlineExceeded.code.name
            self.metrics.observe_call(code, time.perf_counter() - started)
            if callers and code == DeadlineExceeded.code.name:
                self.metrics.caller_deadlines.inc()

    def timing(self, call: Call, work_started: float, first_output: float | None = None) -> common_pb2.StageTiming:
        """This stage's whole call: `first_output` is when its first token went on (None: none did, or it
        sends none, like rag and assemble, whose work all comes before the first token)."""
        work = time.perf_counter() - work_started
        first = work if first_output is None else first_output - work_started
        return common_pb2.StageTiming(
            stage=self.stage,
            queue_wait_seconds=call.queue_wait,
            work_seconds=work,
            first_output_seconds=first,
            failovers=call.failovers,
        )

    def stats(self, serving: bool) -> stage_pb2.StageStats:
        """The stage's queue now."""
        q = self.queue
        now = q.snapshot()
        return stage_pb2.StageStats(
            stage=self.stage,
            queue_depth=now["depth"],
            queue_capacity=q.capacity,
            in_flight=now["in_flight"],
            concurrency=q.concurrency,
            rejected_total=now["rejected"],
            dropped_total=now["dropped"],
            completed_total=now["completed"],
            serving=serving,
            shed_policy=q.policy.value,
        )


# How long past its deadline a call's handler may still run before the watchdog ends it: the handler's
# own deadline handling (downstream calls carry the deadline) normally ends it first, with its status.
WATCHDOG_SLACK_SECONDS = 1.0


class _Watchdog:
    """Ends a call whose handler outlives its deadline, wherever the handler is stuck.

    Mostly that is the transport's write of a response to a client that stopped reading: the write waits
    for flow control for ever, and the handler's admission slot with it. The transport's `overrun` goes
    first (gRPC hands the call's status over; it goes out after the data already buffered, if the client
    ever reads), then the handler task is cancelled, which frees the slot. A gRPC client with a deadline of
    its own is ended by grpc at that deadline anyway; this bounds the calls that set none by the stage's
    `timeoutSeconds`.
    """

    def __init__(self, deadline: float, overrun: Callable[[], None]) -> None:
        self.fired = False
        self._overrun = overrun
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + (deadline - time.monotonic()), self._fire)

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        self.fired = True
        self._overrun()
        if self._task is not None:
            self._task.cancel()


async def _quietly(work: Coroutine[Any, Any, None]) -> None:
    # abort_with raises once the status is out; the handler may also have begun ending the call.
    with contextlib.suppress(Exception):
        await work


def close_when_done(context: grpc.aio.ServicerContext, stream: AsyncIterator[object]) -> None:
    """Close a handler's event stream when its call ends, however it ends. grpc cancels a handler whose
    client left wherever it is awaiting: inside the stream, the stream's `finally` cancels the call
    upstream; but in grpc's own write of an event, the handler is dropped with the stream suspended at a
    `yield`, and the stream is closed only when the garbage collector finds it, which in an idle process
    can take long, while the call upstream (and the model generating for it) runs on."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return

    async def close() -> None:
        with contextlib.suppress(RuntimeError):  # still running: it is ending by itself
            await aclose()

    context.add_done_callback(lambda _: _in_background(close()))


_background: set[asyncio.Future[None]] = set()


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(work)
    _background.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_background.discard)


class StageServicer:
    """The internal `promptpipe.v1.Stage` service of one stage process."""

    def __init__(self, runtime: StageRuntime, handler: EnrichingHandler | StreamingHandler | None) -> None:
        self.runtime = runtime
        # Decided once here: a Protocol isinstance check is too slow for every call.
        self._enricher = handler if isinstance(handler, EnrichingHandler) else None
        self._streamer = handler if isinstance(handler, StreamingHandler) else None
        self.serving = False

    async def Process(self, request: stage_pb2.WorkItem, context: grpc.aio.ServicerContext) -> stage_pb2.WorkItem:
        handler = self._enricher
        if handler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"stage {self.runtime.stage} streams; call Run")
            raise AssertionError("abort raises")
        in_call(request_id=request.request_id)
        async with self.runtime.admitted(context, self.runtime.flow_of(request)) as call:
            work_started = time.perf_counter()
            item = await handler.process(request, call)
            item.timings.append(self.runtime.timing(call, work_started))
            return item
        raise AssertionError("unreachable: admitted() either yields or aborts")

    async def Run(
        self, request: stage_pb2.WorkItem, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.StageEvent]:
        handler = self._streamer
        if handler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"stage {self.runtime.stage} has no Run")
            raise AssertionError("abort raises")
        in_call(request_id=request.request_id)
        async with self.runtime.admitted(context, self.runtime.flow_of(request)) as call:
            work_started = time.perf_counter()
            first_output: float | None = None
            events = handler.run(request, call)
            close_when_done(context, events)
            async for event in events:
                if event.HasField("final"):  # every stage records its own time on the final event
                    event.final.timings.append(self.runtime.timing(call, work_started, first_output))
                elif first_output is None:
                    first_output = time.perf_counter()
                yield event

    async def Stats(self, request: stage_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> stage_pb2.StageStats:
        return self.runtime.stats(self.serving)
