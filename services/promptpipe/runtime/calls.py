"""Calls from one stage to the next: deadline passed on, retries only before the
first event arrived, downstream statuses passed back unchanged.

A call waits for the next stage to be reachable (`wait_for_ready`), bounded by its deadline:
on a cluster the next stage may be scaled to zero, and this wait is what wakes it, because the
calls open to it (`open_calls`) are what it scales on. Calls spread over the next stage's
replicas (round_robin over its headless Service's addresses, re-resolved as connections age).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import grpc

from promptpipe.contract.spec import FailoverSpec, RetrySpec
from promptpipe.rpc import STAGE_CHANNEL_OPTIONS, retry_after_of
from promptpipe.runtime.errors import DeadlineExceeded, UpstreamError, from_a_stage
from promptpipe.runtime.identity import NoToken, TokenSource
from promptpipe.runtime.metrics import Failovers, OpenCallSeconds
from promptpipe.runtime.resilience import Attempt, Retries, why_not_carried_on
from promptpipe.runtime.tracing import note
from promptpipe.v1 import common_pb2, stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

# Only failures that mean "this call never reached a working server" are retried:
# UNAVAILABLE from the transport, not one a stage's handler chose (see ORIGIN_TRAILER).
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


class NextStage(Protocol):
    """The stage a stage calls, over gRPC (StageClient) or in-process when fused (InProcessStage)."""

    name: str

    async def process(self, item: stage_pb2.WorkItem, deadline: float) -> stage_pb2.WorkItem: ...

    def run(self, item: stage_pb2.WorkItem, deadline: float) -> AsyncGenerator[stage_pb2.StageEvent, None]: ...

    async def close(self) -> None: ...


class StageClient:
    def __init__(
        self,
        target: str,
        retry: RetrySpec,
        interceptors: Sequence[Any] = (),
        open_calls: OpenCallSeconds | None = None,
        name: str = "the next stage",
        tokens: TokenSource | None = None,
        failover: FailoverSpec | None = None,
        failovers: Failovers | None = None,
        stage: str = "",
    ) -> None:
        self.target = target
        self._failover = failover or FailoverSpec(max_attempts=0)
        self._failovers = failovers
        self._stage = stage  # the stage called, as metrics and traces name it
        self._tokens = tokens or NoToken()  # who this process is, on every call
        self.name = name  # what callers' messages call it: never its address
        self._retry = retry
        self._open_calls = open_calls or OpenCallSeconds()
        self._channel = grpc.aio.insecure_channel(
            target, options=STAGE_CHANNEL_OPTIONS, interceptors=interceptors or None
        )
        self._stub = stage_pb2_grpc.StageStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._channel.close()

    async def stats(self, timeout: float) -> stage_pb2.StageStats:
        result: stage_pb2.StageStats = await self._stub.Stats(stage_pb2.StatsRequest(), timeout=timeout)
        return result

    async def process(self, item: stage_pb2.WorkItem, deadline: float) -> stage_pb2.WorkItem:
        """rag and assemble: one call, the enriched work item back."""
        started = time.perf_counter()
        with self._open_calls.open():  # retries and waiting included
            async for attempt in Retries(self._retry, deadline, self.name):
                try:
                    result: stage_pb2.WorkItem = await self._stub.Process(
                        item, timeout=self._remaining(deadline), wait_for_ready=True, metadata=self._tokens.metadata()
                    )
                    if result.timings:  # the callee's own, appended last
                        add_hop(result.timings[-1], time.perf_counter() - started, None)
                    return result
                except grpc.aio.AioRpcError as err:
                    self._raise_unless_retryable(err, attempt, streamed=False)
            raise AssertionError("the last attempt raises")

    async def run(self, item: stage_pb2.WorkItem, deadline: float) -> AsyncGenerator[stage_pb2.StageEvent, None]:
        """inference and post: stream their events; `deadline` is on the time.monotonic clock. When the pod
        serving the call goes away mid-stream, the call is carried on on another pod of the stage
        (`spec.failover`), told what this caller already has (`WorkItem.resume`)."""
        started = time.perf_counter()
        received: list[str] = []
        tokens = failovers = 0
        first: float | None = None
        with self._open_calls.open():  # retries, waiting and failovers included
            while True:
                try:
                    async for event in self._attempt(item, deadline, resuming=failovers > 0):
                        if event.HasField("final"):
                            if event.final.timings:  # the callee's own, appended last
                                now = time.perf_counter()
                                callee = event.final.timings[-1]
                                add_hop(callee, now - started, (first or now) - started)
                                callee.failovers += failovers
                        else:
                            if first is None:
                                first = time.perf_counter()
                            received.append(event.chunk.text)
                            tokens += event.chunk.token_count
                        yield event
                    return
                except _WentAway as gone:
                    refusal = why_not_carried_on(
                        self._failover, deadline - time.monotonic(), failovers, (first or started) - started, None
                    )
                    if refusal:
                        message = f"{_transport_failure(self.name, gone.code, True)}; not carried on: {refusal}"
                        raise UpstreamError(gone.code, message) from None
                    failovers += 1
                    if self._failovers is not None:
                        self._failovers.count(self._stage, "reset")
                    log.warning(
                        "%s went away after %d tokens: carrying the call on on another pod (failover %d of %d)",
                        self.name,
                        tokens,
                        failovers,
                        self._failover.max_attempts,
                    )
                    note("failover", {"to": self._stage, "reason": "reset", "after_tokens": tokens})
                    item = resumed(item, "".join(received), tokens)
                    received, tokens = [], 0

    async def _attempt(
        self, item: stage_pb2.WorkItem, deadline: float, resuming: bool
    ) -> AsyncGenerator[stage_pb2.StageEvent, None]:
        """One call, retried while nothing was streamed; the transport failing after that raises `_WentAway`.
        A call carried on does not wait for a pod to become ready (the first call's wait is what wakes a
        stage scaled to zero): with none ready but the one that went away, it ends at once."""
        async for attempt in Retries(self._retry, deadline, self.name):
            call = self._stub.Run(
                item, timeout=self._remaining(deadline), wait_for_ready=not resuming, metadata=self._tokens.metadata()
            )
            # Closed explicitly when we leave: a tracing interceptor ends the call's span only when its
            # response iterator ends, and one left to the garbage collector may never be.
            events = aiter(call)
            streamed = ended = False
            try:
                async for event in events:
                    streamed = True
                    ended = event.HasField("final")
                    yield event
                    if ended:  # the last event: its OK status follows, unread (a read cancelled would cancel it)
                        return
                return
            except grpc.aio.AioRpcError as err:
                transport = err.code() in _RETRYABLE and not from_a_stage(tuple(err.trailing_metadata() or ()))
                if transport and streamed:
                    log.warning("call to %s (%s) failed mid-stream: %s", self.name, self.target, err.details())
                    raise _WentAway(err.code()) from None
                if transport and resuming and attempt.last:
                    went = _transport_failure(self.name, err.code(), True)
                    raise UpstreamError(err.code(), f"{went}; not carried on: no other pod of it answered") from None
                self._raise_unless_retryable(err, attempt, streamed)
            finally:
                # Leaving early stops the next stage. After its final event its status follows at once:
                # cancelling then would have it count a call it completed as CANCELLED.
                if not ended:
                    call.cancel()
                if isinstance(events, AsyncGenerator):
                    await events.aclose()

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the next stage was reached")
        return remaining

    def _raise_unless_retryable(self, err: grpc.aio.AioRpcError, attempt: Attempt, streamed: bool) -> None:
        code = err.code()
        trailers = tuple(err.trailing_metadata() or ())
        if from_a_stage(trailers):  # a stage's handler chose it: pass it on as it is
            raise UpstreamError(code, err.details() or code.name, trailers, retry_after_of(err)) from None
        if streamed or code not in _RETRYABLE or attempt.last:
            # The transport's words name addresses and sockets: they go to the log, not to the client.
            log.warning("call to %s (%s) failed: %s: %s", self.name, self.target, code.name, err.details())
            raise UpstreamError(code, _transport_failure(self.name, code, streamed)) from None


class _WentAway(Exception):
    """The pod serving a streaming call went away after it had sent something."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code


def resumed(item: stage_pb2.WorkItem, text: str, tokens: int) -> stage_pb2.WorkItem:
    """The call again, carried on after `text` (`tokens` of them) on top of what it already carried (pure)."""
    again = stage_pb2.WorkItem()
    again.CopyFrom(item)
    again.resume.text += text
    again.resume.tokens += tokens
    return again


def add_hop(timing: common_pb2.StageTiming, call_seconds: float, first_seconds: float | None) -> None:
    """Set the hop of a stage's timing from its call as the caller timed it: in all (`call_seconds`)
    and to its first token (`first_seconds`; None for a call that sends none, all of it comes first)."""
    timing.hop_seconds = max(0.0, call_seconds - timing.queue_wait_seconds - timing.work_seconds)
    if first_seconds is None:
        timing.hop_first_seconds = timing.hop_seconds
    else:
        before = timing.queue_wait_seconds + timing.first_output_seconds
        timing.hop_first_seconds = min(timing.hop_seconds, max(0.0, first_seconds - before))


def _transport_failure(name: str, code: grpc.StatusCode, streamed: bool) -> str:
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"{name} went away mid-stream" if streamed else f"{name} is unreachable"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"deadline exceeded waiting for {name}"
    return f"call to {name} failed: {code.name}"
