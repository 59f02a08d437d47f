"""Errors a stage raises on purpose, and their one mapping to gRPC status codes.

Anything else becomes INTERNAL with a fixed message: internals never reach clients.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)


class StageError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(StageError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class Shed(StageError):
    """Load shedding: the request was refused or dropped; retry after `retry_after`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float, reason: str = "rejected") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason  # "rejected" (reject-new), "dropped" (drop-oldest) or "wait_cap" (maxWaitMilliseconds)


class QuotaExceeded(Shed):
    """A tenant's quota is used up: refused before admission, until its bucket refills (429 on HTTP, where
    overload is 503; on gRPC both are RESOURCE_EXHAUSTED, this one with a QuotaFailure detail)."""

    def __init__(self, tenant: str, limit: str, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after, "quota")
        self.tenant = tenant
        self.limit = limit  # "requests" or "tokens" (per minute)


class Unauthenticated(StageError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(StageError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(StageError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(StageError):
    code = grpc.StatusCode.UNAVAILABLE


class ClientGone(StageError):
    """The client closed its connection while its answer streamed (counted as a cancelled call)."""

    code = grpc.StatusCode.CANCELLED


class DataLoss(StageError):
    """A stream ended with neither its final event nor a status: what was sent may be cut short."""

    code = grpc.StatusCode.DATA_LOSS


class UpstreamError(StageError):
    """A downstream stage ended the call with a status; pass it on unchanged."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        trailers: tuple[tuple[str, str | bytes], ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.trailers = trailers
        self.retry_after = retry_after  # a RESOURCE_EXHAUSTED's RetryInfo, for transports that say it otherwise


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):  # type: ignore[misc]
    """A status to abort with, trailers included."""


def _retry_info_status(err: Shed) -> grpc.Status:
    quota = (err.tenant, err.limit) if isinstance(err, QuotaExceeded) else None
    return _retry_info_status_of(err.message, err.retry_after, quota)


# A surge refuses thousands of calls with the same few messages: each status is built once.
@functools.lru_cache(maxsize=256)
def _retry_info_status_of(message: str, retry_after: float, quota: tuple[str, str] | None) -> grpc.Status:
    seconds = int(retry_after)
    nanos = int((retry_after - seconds) * 1e9)
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    status.details.add().Pack(info)
    if quota is not None:
        tenant, limit = quota
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"tenant:{tenant}", description=f"{limit} per minute"
        )
        status.details.add().Pack(error_details_pb2.QuotaFailure(violations=[violation]))
    return rpc_status.to_status(status)


# Trailer naming the stage whose handler chose the status. A status without it came
# from the transport (nothing reached a handler), and only such a call is retried.
ORIGIN_TRAILER = "promptpipe-origin"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, stage: str) -> None:
    """End the call with the status that `exc` stands for. Always raises."""
    if isinstance(exc, UpstreamError):
        passed_on = tuple((k, v) for k, v in exc.trailers if k in ("grpc-status-details-bin", ORIGIN_TRAILER))
        await context.abort(exc.code, exc.message, trailing_metadata=passed_on or ((ORIGIN_TRAILER, stage),))
    origin = ((ORIGIN_TRAILER, stage),)
    if isinstance(exc, Shed):
        # abort_with_status sends the status's own trailers only (the context's are dropped): add ours there.
        status = _retry_info_status(exc)
        await context.abort_with_status(_Status(status.code, status.details, (*status.trailing_metadata, *origin)))
    if isinstance(exc, StageError):
        await context.abort(exc.code, exc.message, trailing_metadata=origin)
    log.exception("unexpected error in stage %s", stage, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in stage {stage}", trailing_metadata=origin)


def refusal(exc: StageError, stage: str, before: Callable[[], None] | None = None) -> grpc.RpcMethodHandler:
    """What a server interceptor hands back to end a call with `exc`'s status without reading its request:
    a handler that takes the request as a stream it never reads, so nothing the caller sent is parsed.
    `before` runs first (an access log line)."""

    async def refuse(_unread: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        if before is not None:
            before()
        await abort_with(context, exc, stage)

    return grpc.stream_stream_rpc_method_handler(refuse)


def as_received(exc: BaseException, stage: str) -> UpstreamError:
    """The error a caller of `stage` gets for `exc` when it calls the stage in-process (a fused stage):
    the status `abort_with` would have sent it over gRPC, trailers included."""
    if isinstance(exc, UpstreamError):
        return exc
    origin = ((ORIGIN_TRAILER, stage),)
    if isinstance(exc, Shed):
        status = _retry_info_status(exc)
        return UpstreamError(exc.code, exc.message, (*status.trailing_metadata, *origin), exc.retry_after)
    if isinstance(exc, StageError):
        return UpstreamError(exc.code, exc.message, origin)
    log.exception("unexpected error in stage %s", stage, exc_info=exc)
    return UpstreamError(grpc.StatusCode.INTERNAL, f"internal error in stage {stage}", origin)


def from_a_stage(trailers: tuple[tuple[str, str | bytes], ...]) -> bool:
    return any(k == ORIGIN_TRAILER for k, _ in trailers)
