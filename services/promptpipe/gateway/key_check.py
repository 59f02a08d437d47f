"""The gateway's API key, checked from a call's metadata before its request message is read.

grpc reads and parses a unary request before the servicer runs, so a check in the servicer comes after a
stranger's 16 MiB message is in memory. This interceptor runs on the headers alone: a call without a
valid key gets a handler that takes its request as a stream it never reads, and ends it UNAUTHENTICATED
(the client sees the same status as from the servicer; the message it sent is never parsed). A call with
a key goes on to the servicer, which looks at the key again to learn the tenant (a hash and a dict
lookup).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.errors import Unauthenticated, refusal
from promptpipe.v1 import gateway_pb2

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


class KeyCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a Gateway call without a valid API key before its request is read."""

    def __init__(self, keys: KeyRing, stage: str) -> None:
        self._keys = keys
        self._stage = stage

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self._keys.open or not details.method.startswith(f"/{GATEWAY_SERVICE}/"):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        try:
            self._keys.tenant_of(metadata.get("authorization"))
        except Unauthenticated as exc:
            return refusal(exc, self._stage)
        return await continuation(details)
