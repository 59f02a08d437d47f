"""What HTTP backends share: routing over the replicas (`routing.py`), per-replica circuit breakers, and
retries with backoff and jitter, only while nothing has been streamed. The replicas are the configured
endpoints, or, for the TGI the operator runs, its pods as they come and go (`discovery.py`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence

from promptpipe.backends.base import GenerationRequest, Outcome, Piece
from promptpipe.backends.routing import Router
from promptpipe.contract.spec import CircuitBreakerSpec, FailoverSpec, RemoteBackendSpec, RetrySpec, RoutingSpec
from promptpipe.runtime.errors import Shed, Unavailable
from promptpipe.runtime.metrics import BackendMetrics
from promptpipe.runtime.resilience import CircuitBreaker, Retries, why_not_carried_on
from promptpipe.runtime.tracing import note
from promptpipe.v1.common_pb2 import FINISH_REASON_LENGTH

log = logging.getLogger(__name__)

OVERLOAD_RETRY_AFTER = 1.0


class BackendCallError(Exception):
    def __init__(self, message: str, retryable: bool, overloaded: bool = False, reason: str = "error") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.overloaded = overloaded
        # Why, as a failover counts it (`FAILOVER_REASONS`): reset, error or stall.
        self.reason = reason


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
        failover: FailoverSpec | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self._retry = retry
        self._failover = failover or FailoverSpec()
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
        """The call on the best replica; when that one fails after its first token, carried on on another
        (`spec.failover`) from the prompt and the text sent so far, for the tokens left."""
        sent: list[str] = []  # the text the caller has, piece by piece
        tokens = 0  # ... and its tokens
        failed: set[str] = set()
        failovers = 0
        first_token_seconds: float | None = None  # how long the first attempt took to its first token
        attempt = request
        while True:
            before, started = tokens, time.monotonic()
            try:
                async for out in self._attempt(attempt, failed):
                    if isinstance(out, Piece):
                        if first_token_seconds is None:
                            first_token_seconds = time.monotonic() - started
                        sent.append(out.text)
                        tokens += out.tokens
                        yield out
                    else:
                        yield Outcome(out.finish_reason, before + out.completion_tokens, failovers)
                return
            except _FailedMidStream as broken:
                failed.add(broken.endpoint)
                others = [r for r in self._router.replicas if r not in failed]
                refusal = why_not_carried_on(
                    self._failover, request.remaining(), failovers, first_token_seconds or 0.0, others
                )
                if refusal:
                    raise Unavailable(f"{broken.cause}; not carried on: {refusal}") from None
                failovers += 1
                self._metrics.failed_over(broken.cause.reason)
                log.warning(
                    "backend %s failed after %d tokens (%s): carrying the call on elsewhere (failover %d of %d)",
                    broken.endpoint,
                    tokens,
                    broken.cause,
                    failovers,
                    self._failover.max_attempts,
                )
                note("failover", {"from": broken.endpoint, "reason": broken.cause.reason, "after_tokens": tokens})
                left = request.max_new_tokens - tokens
                if left <= 0:  # every token it was asked for had arrived; only the final details had not
                    yield Outcome(FINISH_REASON_LENGTH, tokens, failovers)
                    return
                attempt = continued(request, "".join(sent), left)

    async def _attempt(self, request: GenerationRequest, failed: set[str]) -> AsyncGenerator[Piece | Outcome, None]:
        """One attempt at the call, on a replica not in `failed`: retried on another while nothing has been
        streamed; a failure after that raises `_FailedMidStream`."""
        last: BackendCallError | None = None
        key = request.routing_key or request.session_id
        async for attempt in Retries(self._retry, request.deadline, "the backend"):
            candidates = [ep for ep in self._candidates(key) if ep not in failed]
            if not candidates:
                if failed:
                    raise Unavailable(f"no backend replica left but {', '.join(sorted(failed))}, which failed")
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
                if produced:
                    raise _FailedMidStream(endpoint, err) from None
                if not err.retryable:
                    raise Unavailable(str(err)) from None
                last = err
            finally:
                self._router.finished(endpoint)
                self._update_circuit_gauge()
        if last is not None and last.overloaded:
            raise Shed(str(last), OVERLOAD_RETRY_AFTER)
        raise Unavailable(str(last))


class _FailedMidStream(Exception):
    def __init__(self, endpoint: str, cause: BackendCallError) -> None:
        super().__init__(f"{endpoint}: {cause}")
        self.endpoint, self.cause = endpoint, cause


def continued(request: GenerationRequest, sent: str, left: int) -> GenerationRequest:
    """The call carried on after `sent`: the prompt followed by that text, for the `left` tokens still
    owed (pure). A backend that takes only text re-reads the text, so its tokens at the seam may split
    differently from the first replica's (docs/architecture.md#failover-mid-stream)."""
    return dataclasses.replace(request, prompt=request.prompt + sent, max_new_tokens=left)
