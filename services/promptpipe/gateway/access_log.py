"""The gateway's access log: one line per call when it ends, whatever the transport and however it ends.

The line carries the request id, the tenant, the transport (`grpc` or `http`), the status (a gRPC status
code name on both transports, so one query covers both), the time to first token, tokens in and out, and
the call's duration; in JSON logs as an `access` object. Never the prompt or the answer.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

log = logging.getLogger("promptpipe.access")

Transport = Literal["grpc", "http"]

# What an HTTP error the OpenAI edge sends means, in gRPC's words (the status column is one vocabulary).
_HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def status_of_http(status: int) -> str:
    if status < 400:
        return "OK"
    return _HTTP_STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


class AccessLog:
    """One call's line, filled in as the call goes (the tenant once known, the answer's tokens as they
    stream) and written once, when it ends."""

    def __init__(self, transport: Transport, request_id: str) -> None:
        self.transport = transport
        self.request_id = request_id
        self.tenant = ""
        self.status = "OK"
        self.ttft: float | None = None
        self.tokens_in = 0
        self.tokens_out = 0
        self._started = time.perf_counter()
        self._written = False

    def write(self) -> None:
        if self._written:
            return
        self._written = True
        seconds = time.perf_counter() - self._started
        ttft_ms = round(self.ttft * 1000, 1) if self.ttft is not None else None
        fields = {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "transport": self.transport,
            "status": self.status,
            "ttft_ms": ttft_ms,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "duration_ms": round(seconds * 1000, 1),
        }
        log.info(
            "%s %s %s tenant=%s ttft_ms=%s tokens=%d+%d duration_ms=%.1f",
            self.transport,
            self.request_id,
            self.status,
            self.tenant or "-",
            "-" if ttft_ms is None else ttft_ms,
            self.tokens_in,
            self.tokens_out,
            seconds * 1000,
            extra={"access": fields},
        )
