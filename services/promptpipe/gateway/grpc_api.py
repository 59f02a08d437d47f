"""The gateway's gRPC API (`promptpipe.v1.Gateway`), and the call both transports make: key and quota
first, then admission, then rag -> assemble -> post."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from promptpipe.contract.spec import GenerationDefaults
from promptpipe.gateway.access_log import AccessLog
from promptpipe.gateway.requests import own_timings, work_item
from promptpipe.runtime.admission import Flow
from promptpipe.runtime.apikeys import ANONYMOUS, KeyRing
from promptpipe.runtime.calls import NextStage
from promptpipe.runtime.coalesce import coalesce
from promptpipe.runtime.errors import DataLoss, QuotaExceeded, Unauthenticated, Unavailable, abort_with
from promptpipe.runtime.logs import in_call
from promptpipe.runtime.metrics import GatewayMetrics
from promptpipe.runtime.quotas import Tenancy
from promptpipe.runtime.stage import Call, StageRuntime, close_when_done
from promptpipe.v1 import common_pb2, gateway_pb2


def with_tenant(request: gateway_pb2.GenerateRequest, tenant: str) -> None:
    """The tenant whose key the call carried goes on with the request (metadata `tenant`). The client never
    sets it: with keys its own is replaced, and on an open gateway (no key, no tenant) it is dropped."""
    if tenant != ANONYMOUS:
        request.metadata["tenant"] = tenant
    elif "tenant" in request.metadata:
        del request.metadata["tenant"]


class GatewayServicer:
    def __init__(
        self,
        runtime: StageRuntime,
        defaults: GenerationDefaults,
        rag: NextStage,
        assemble: NextStage,
        post: NextStage,
        metrics: GatewayMetrics,
        keys: KeyRing,
        tenancy: Tenancy,
    ) -> None:
        self.keys = keys
        self.tenancy = tenancy
        self._runtime = runtime
        self._defaults = defaults
        self._rag = rag
        self._assemble = assemble
        self._post = post
        self._metrics = metrics

    async def close(self) -> None:
        for client in (self._rag, self._assemble, self._post):
            await client.close()
        await self.tenancy.close()

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        received = time.perf_counter()
        access = AccessLog("grpc", uuid.uuid4().hex)
        in_call(request_id=access.request_id)
        try:
            try:
                tenant, flow = await self.caller(dict(context.invocation_metadata() or ()).get("authorization"))
            except (Unauthenticated, QuotaExceeded, Unavailable) as exc:
                await abort_with(context, exc, self._runtime.stage)
            access.tenant = tenant
            in_call(tenant=tenant)
            with_tenant(request, tenant)
            async with self._runtime.admitted(context, flow) as call:
                answer = self.answer(request, call, received, access)
                close_when_done(context, answer)
                async for response in answer:
                    yield response
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            access.status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        finally:
            code = context.code()  # set by an abort: the status the call ended with
            if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
                access.status = code.name
            access.write()

    async def caller(self, authorization: str | None) -> tuple[str, Flow]:
        """Whose call this is and its place in the admission queue, before admission: a call without a
        valid key (Unauthenticated) or over its tenant's quota (QuotaExceeded) takes no place in the queue."""
        tenant = self.keys.tenant_of(authorization)
        return tenant, await self.tenancy.charge(tenant)

    async def answer(
        self, request: gateway_pb2.GenerateRequest, call: Call, received: float, access: AccessLog
    ) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        """One admitted call through rag -> assemble -> post, whatever the transport: chunks, then the
        summary. Closing it early (the client left) closes the post stage's stream, which ends the call
        down to the backend. Its tokens are charged to its tenant as they are known (the prompt's once it is
        assembled, each chunk's as it goes out), so however it ends, and go on its access log line."""
        request_id, tenant = access.request_id, access.tenant
        first: float | None = None
        tokens = prompt_tokens = 0
        try:
            item = work_item(request, self._defaults, request_id)
            item = await self._rag.process(item, call.deadline)
            item = await self._assemble.process(item, call.deadline)
            # Billed as they are known, not when the call ends: a client that leaves after its first chunk
            # has paid for its prompt, and for every token it was sent.
            prompt_tokens = item.prompt_tokens
            self.tenancy.used(tenant, prompt_tokens)
            async with contextlib.aclosing(coalesce(self._post.run(item, call.deadline))) as events:
                async for event in events:
                    if event.HasField("chunk"):
                        if first is None:
                            first = time.perf_counter()
                            self._metrics.first_token(first - received)
                        tokens += event.chunk.token_count
                        self._metrics.tokens.inc(event.chunk.token_count)
                        self.tenancy.used(tenant, event.chunk.token_count)
                        yield gateway_pb2.GenerateResponse(chunk=event.chunk)
                    elif event.HasField("final"):
                        end = time.perf_counter()
                        if first is not None and tokens > 1:
                            self._metrics.tpot.observe((end - first) / (tokens - 1))
                        # The backend's own count, where it differs from assemble's: the rest is billed now.
                        self.tenancy.used(tenant, max(0, event.final.usage.prompt_tokens - prompt_tokens))
                        prompt_tokens = max(prompt_tokens, event.final.usage.prompt_tokens)
                        # From the request's arrival (its key and quota checks included), as the TTFT is.
                        served = end - received - call.queue_wait
                        stream_timing = common_pb2.StageTiming(
                            stage=self._runtime.stage,
                            queue_wait_seconds=call.queue_wait,
                            work_seconds=served,
                            first_output_seconds=(first or end) - received - call.queue_wait,
                        )
                        summary = gateway_pb2.GenerateSummary(
                            finish_reason=event.final.finish_reason,
                            usage=event.final.usage,
                            timings=own_timings([*item.timings, *event.final.timings], stream_timing),
                            time_to_first_token_seconds=(first or end) - received,
                            total_seconds=end - received,
                            request_id=request_id,
                        )
                        yield gateway_pb2.GenerateResponse(summary=summary)
                        return
            raise DataLoss("the post stage ended its stream without a final event")
        finally:
            access.tokens_in, access.tokens_out = prompt_tokens, tokens
            access.ttft = None if first is None else first - received
