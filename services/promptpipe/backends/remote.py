"""What HTTP backends share: routing over the replicas (`routing.py`), per-replica circuit breakers, and
retries with backoff and jitter, only while nothing has been streamed. The replicas are the configured
endpoints, or, for the TGI the operator runs, its pods as they come and go (`discovery.py`)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence

from promptpipe.backends.base import GenerationRequest, Outcome, Piece
from promptpipe.backends.routing import Router
from promptpipe.contract.spec import CircuitBreakerSpec, RemoteBackendSpec, RetrySpec, RoutingSpec
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
        self,
        spec: RemoteBackendSpec,
        *,
        breaker: CircuitBreakerSpec,
        retry: RetrySpec,
        metrics: BackendMetrics,
        routing: RoutingSpec | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self._retry = retry
        self._metrics = metrics
        self._breaker_spec = breaker
        self._clock = clock  # the circuit breakers' (tests move it on)
        self._router = Router(routing or RoutingSpec(), spec.endpoints)
        self._breakers = {ep: CircuitBreaker(breaker, clock) for ep in spec.endpoints}
        metrics.replicas_from(self.loads)

    @property
    def replicas(self) -> tuple[str, ...]:
        return self._router.replicas

    def loads(self) -> Mapping[str, int]:
        return {r: self._router.in_flight(r) for r in self._router.replicas}

    def set_replicas(self, replicas: Sequence[str]) -> None:
        """The replicas now (discovery's news); none known: the configured endpoints. Calls already running
        on a replica that left finish there; a replica that stays keeps its circuit's state."""
        replicas = list(replicas) or self.spec.endpoints
        if tuple(dict.fromkeys(replicas)) == self._router.replicas:
            return
        self._router.set_replicas(replicas)
        self._breakers = {
            ep: self._breakers.get(ep) or CircuitBreaker(self._breaker_spec, self._clock) for ep in replicas
        }
        self._update_circuit_gauge()
        log.info("backend replicas: %s", ", ".join(self._router.replicas))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def stream_from(self, endpoint: str, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        raise NotImplementedError

    def held_for(self) -> float:
        return 0.0  # a call holds nothing here beyond its admission slot

    def available(self) -> bool:
        """False while every endpoint's circuit is open and no trial is due: the stage says NOT_SERVING."""
        return any(b.allow() for b in self._breakers.values())

    def _candidates(self, key: str) -> list[str]:
        """The replicas to try, best first (see `Router.order`); open circuits skipped."""
        breakers = self._breakers
        order, reason = self._router.order(key, lambda ep: breakers[ep].allow())
        if order:
            self._metrics.routed(reason.value)
        return order

    def _update_circuit_gauge(self) -> None:
        self._metrics.circuit_open.set(sum(b.is_open for b in self._breakers.values()))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        last: BackendCallError | None = None
        key = request.routing_key or request.session_id
        async for attempt in Retries(self._retry, request.deadline, "the backend"):
            candidates = self._candidates(key)
            if not candidates:
                retry_in = min(b.retry_after() for b in self._breakers.values())
                raise Unavailable(f"backend circuit open; retry in {retry_in:.1f}s")
            endpoint = (
                candidates[(attempt.number - 1) % len(candidates)] if last and not last.overloaded else candidates[0]
            )
            produced = False
            breaker = self._breakers[endpoint]
            self._router.started(endpoint)
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
                self._router.finished(endpoint)
                self._update_circuit_gauge()
        if last is not None and last.overloaded:
            raise Shed(str(last), OVERLOAD_RETRY_AFTER)
        raise Unavailable(str(last))
