"""What HTTP backends share: session affinity, per-endpoint circuit breakers, and
retries with backoff and jitter, only while nothing has been streamed."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

from promptpipe.backends.affinity import HashRing
from promptpipe.backends.base import GenerationRequest, Outcome, Piece
from promptpipe.contract.spec import CircuitBreakerSpec, RemoteBackendSpec, RetrySpec
from promptpipe.runtime.errors import Shed, Unavailable
from promptpipe.runtime.metrics import BackendMetrics
from promptpipe.runtime.resilience import CircuitBreaker, Retries

log = logging.getLogger(__name__)

OVERLOAD_RETRY_AFTER = 1.0


class BackendCallError(Exception):
    def __init__(self, message: str, retryable: bool, overloaded: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.overloaded = overloaded


class RemoteBackend:
    name = "remote"

    def __init__(
        self, spec: RemoteBackendSpec, *, breaker: CircuitBreakerSpec, retry: RetrySpec, metrics: BackendMetrics
    ) -> None:
        self.spec = spec
        self._retry = retry
        self._metrics = metrics
        self._ring = HashRing(spec.endpoints)
        self._breakers = {ep: CircuitBreaker(breaker) for ep in spec.endpoints}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def stream_from(self, endpoint: str, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        raise NotImplementedError

    def available(self) -> bool:
        """False while every endpoint's circuit is open and no trial is due: the stage says NOT_SERVING."""
        return any(b.allow() for b in self._breakers.values())

    def _candidates(self, session: str) -> list[str]:
        """The session's home endpoint first, then the ring order; open circuits skipped."""
        return [ep for ep in self._ring.preference(session or "") if self._breakers[ep].allow()]

    def _update_circuit_gauge(self) -> None:
        self._metrics.circuit_open.set(sum(b.is_open for b in self._breakers.values()))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        last: BackendCallError | None = None
        async for attempt in Retries(self._retry, request.deadline, "the backend"):
            candidates = self._candidates(request.session_id)
            if not candidates:
                retry_in = min(b.retry_after() for b in self._breakers.values())
                raise Unavailable(f"backend circuit open; retry in {retry_in:.1f}s")
            endpoint = (
                candidates[(attempt.number - 1) % len(candidates)] if last and not last.overloaded else candidates[0]
            )
            produced = False
            breaker = self._breakers[endpoint]
            try:
                with breaker.attempt():  # the half-open trial, if any, is this endpoint's only
                    async for out in self.stream_from(endpoint, request):
                        produced = produced or isinstance(out, Piece)
                        yield out
                    breaker.record_success()
                return
            except BackendCallError as err:
                log.warning(
                    "backend %s failed (attempt %d of %d): %s", endpoint, attempt.number, self._retry.max_attempts, err
                )
                if not err.overloaded:  # a busy backend is healthy; do not trip its breaker
                    breaker.record_failure()
                if produced or not err.retryable:
                    raise Unavailable(str(err)) from None
                last = err
            finally:
                self._update_circuit_gauge()
        if last is not None and last.overloaded:
            raise Shed(str(last), OVERLOAD_RETRY_AFTER)
        raise Unavailable(str(last))
