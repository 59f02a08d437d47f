"""Which gRPC status codes say the server failed, and which say the caller did.

A rollout's error rate counts only server errors: a client's bad request, its
cancellation or load shedding says nothing about the model. Names as grpc spells them.
"""

from __future__ import annotations

SERVER_ERROR_CODES: tuple[str, ...] = (
    "INTERNAL",
    "UNAVAILABLE",
    "UNKNOWN",
    "DEADLINE_EXCEEDED",
    "DATA_LOSS",
    "UNIMPLEMENTED",
)
CLIENT_ERROR_CODES: tuple[str, ...] = (
    "INVALID_ARGUMENT",
    "CANCELLED",
    "RESOURCE_EXHAUSTED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
)


def is_server_error(code: str) -> bool:
    return code in SERVER_ERROR_CODES
