"""The Python client for the gateway: `async for chunk in client.generate(...)`.

Any gRPC client works the same way; this one adds typed errors with the retry hint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from promptpipe.rpc import CHANNEL_OPTIONS, quota_of, retry_after_of
from promptpipe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


@dataclass
class GenerationError(Exception):
    code: grpc.StatusCode
    message: str
    retry_after: float | None = None
    # Set when a tenant's quota refused the call (429 on HTTP), not the service's overload (503).
    quota: str | None = None

    def __str__(self) -> str:
        hint = f" (retry after {self.retry_after:.2f}s)" if self.retry_after is not None else ""
        return f"{self.code.name}: {self.message}{hint}"


# A client is a connection of its own, not one shared by every client in the process (gRPC's default):
# a gateway's pods behind a Service are each handed connections, so clients spread over them only if
# each has its own.
CLIENT_CHANNEL_OPTIONS = (*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))


class PipelineClient:
    def __init__(
        self, target: str, api_key: str | None = None, *, tls: bool = False, root_certificates: bytes | None = None
    ) -> None:
        """`tls`: the gateway serves TLS (trusted by the system's roots, or by `root_certificates`, PEM)."""
        # Sent as gRPC metadata `authorization: Bearer <key>`, as the HTTP API takes it.
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self._channel = grpc.aio.secure_channel(target, credentials, options=CLIENT_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=CLIENT_CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> PipelineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self,
        prompt: str = "",
        *,
        messages: Sequence[tuple[str, str]] = (),
        session_id: str = "",
        max_new_tokens: int = 0,
        temperature: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        timeout: float = 120.0,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Yield responses: chunks, then one summary. Raises GenerationError on a status."""
        params = common_pb2.GenerationParameters(max_new_tokens=max_new_tokens, stop=list(stop))
        if temperature is not None:
            params.temperature = temperature
        if seed is not None:
            params.seed = seed
        request = gateway_pb2.GenerateRequest(
            session_id=session_id,
            prompt=prompt,
            parameters=params,
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        )
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                if response.HasField("summary"):
                    # Its OK status follows the summary at once: wait for it, so a client that closes its
                    # channel next does not cancel a call that has ended (the gateway would count it CANCELLED).
                    await call.code()
                    yield response
                    return
                yield response
            # Every call ends with a summary or a status: a stream with neither may be cut short.
            raise GenerationError(grpc.StatusCode.DATA_LOSS, "the gateway ended the stream without a summary")
        except grpc.aio.AioRpcError as err:
            raise GenerationError(err.code(), err.details() or "", retry_after_of(err), quota_of(err)) from None
        finally:
            call.cancel()
