"""Refusals at the edge: a Gateway call that the gateway's queue would refuse now is refused from its
metadata, before its request message is read, parsed, charged or given a task of its own.

Under a surge most calls are refused, and each refusal made in the servicer costs a request parse, a
servicer task and its stream set up. This interceptor asks the queue first (`AdmissionQueue.refusal`: the
same rules as admission, fair admission's included, so a light tenant still takes a heavy tenant's place)
and, if it would refuse, hands back a handler that ends the call with the same status the servicer would
send (RESOURCE_EXHAUSTED, the stage's name, a RetryInfo) without reading what the client sent. A call it
lets through is admitted as before, and may still be refused there if the queue filled meanwhile. A
refused call is not charged to its tenant's quota: it got nothing. It runs after the key check, which has
already refused a call without a valid key.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import grpc

from promptpipe.gateway.access_log import AccessLog
from promptpipe.gateway.key_check import GATEWAY_SERVICE
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.errors import Shed, Unauthenticated, refusal
from promptpipe.runtime.stage import StageRuntime


def _refusal(refused: Shed, tenant: str, stage: str) -> grpc.RpcMethodHandler:
    def log_it() -> None:
        access = AccessLog("grpc", uuid.uuid4().hex)
        access.tenant, access.status = tenant, refused.code.name
        access.write()

    return refusal(refused, stage, before=log_it)


class EdgeAdmission(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a Gateway call the gateway's queue would refuse now, before its request is read."""

    def __init__(self, runtime: StageRuntime, keys: KeyRing | None) -> None:
        self._runtime = runtime
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not details.method.startswith(f"/{GATEWAY_SERVICE}/"):
            return await continuation(details)  # health and reflection are never refused here
        tenant = ""
        if self._keys is not None:
            try:
                tenant = self._keys.tenant_of(dict(details.invocation_metadata or ()).get("authorization"))
            except Unauthenticated:
                return await continuation(details)  # the key check's to refuse, and it runs first
        refused = self._runtime.refused_at_the_door(tenant)
        if refused is None:
            return await continuation(details)
        return _refusal(refused, tenant, self._runtime.stage)
