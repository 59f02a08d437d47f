"""The gateway's front door: a Gateway call is judged from its metadata alone, before its request message
is read, parsed, charged or given a task of its own: first its API key, then whether the gateway's queue
would refuse it now.

grpc reads and parses a unary request before the servicer runs, so a check in the servicer comes after a
stranger's 16 MiB message is in memory, and under a surge, when most calls are refused, each refusal made
there costs a request parse, a servicer task and its stream set up. Here a call without a valid key gets
UNAUTHENTICATED, and a call the queue would refuse (`AdmissionQueue.refusal`: the same rules as admission,
fair admission's and the wait cap's included, so a light tenant still takes a heavy tenant's place) gets
the status the servicer would send (RESOURCE_EXHAUSTED, the stage's name, a RetryInfo), each from a
handler that never reads what the client sent. A refused call is not charged to its tenant's quota: it got
nothing. A call let through goes on to the servicer, which looks at the key again to learn the tenant (a
hash and a dict lookup), and may still be refused at admission if the queue filled meanwhile.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

import grpc

from promptpipe.gateway.access_log import AccessLog
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.errors import Shed, Unauthenticated, refusal
from promptpipe.runtime.stage import StageRuntime
from promptpipe.v1 import gateway_pb2

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
GATEWAY_METHODS = f"/{GATEWAY_SERVICE}/"  # the prefix of its methods' paths


def _authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


class FrontDoor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a Gateway call without a valid API key, or one the gateway's queue would refuse now, before
    its request is read. Health and reflection pass."""

    def __init__(self, keys: KeyRing, runtime: StageRuntime) -> None:
        self._keys = keys
        self._runtime = runtime

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not details.method.startswith(GATEWAY_METHODS):
            return await continuation(details)
        stage = self._runtime.stage
        try:
            tenant = self._keys.tenant_of(_authorization(details.invocation_metadata))
        except Unauthenticated as exc:
            return refusal(exc, stage)
        refused = self._runtime.refused_at_the_door(tenant)
        if refused is None:
            return await continuation(details)
        return refusal(refused, stage, before=lambda: _log_refusal(refused, tenant))


def _log_refusal(refused: Shed, tenant: str) -> None:
    access = AccessLog("grpc", uuid.uuid4().hex)
    access.tenant, access.status = tenant, refused.code.name
    access.write()
