"""What both ends of promptpipe's gRPC calls share (the stages and the Python client):
channel options, and reading the retry hint and quota a RESOURCE_EXHAUSTED status carries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)

# Between stages, on top: calls spread over every address the next stage's name resolves to (a headless
# Service: its ready pods), and the name is looked up again at most a second after a connection ends
# (the servers end each connection after MAX_CONNECTION_AGE_MS), so new replicas get calls within seconds
# and a drained one none. Reconnecting backs off to at most a second, so a stage woken from zero is
# found soon after it is up.
STAGE_CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    *CHANNEL_OPTIONS,
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.dns_min_time_between_resolutions_ms", 1_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
# Servers end a connection this long after it opened (gRPC adds ±10% jitter); calls on it finish first.
MAX_CONNECTION_AGE_MS = 5_000


def quota_of(error: grpc.aio.AioRpcError) -> str | None:
    """Which quota refused the call ('tenant:team-a requests per minute'), if a QuotaFailure says so: a
    tenant's limit, where a RESOURCE_EXHAUSTED without one is the service's overload."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            return " ".join(f"{v.subject} {v.description}" for v in failure.violations)
    return None


def retry_after_of(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo hint of a RESOURCE_EXHAUSTED error, if it carries one."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None
