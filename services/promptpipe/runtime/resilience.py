"""Retry backoff and the circuit breaker: pure policy, no I/O."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from promptpipe.config.spec import CircuitBreakerSpec, RetrySpec


def backoff_delay(spec: RetrySpec, attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff before retry number `attempt` (1-based)."""
    ceiling = min(spec.max_backoff_seconds, spec.initial_backoff_seconds * (2 ** (attempt - 1)))
    return float(ceiling * rng())


class CircuitBreaker:
    """Closed -> open after `failure_threshold` failures in a row; after `reset_seconds`
    one trial call is let through (half-open): success closes, failure reopens."""

    def __init__(self, spec: CircuitBreakerSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self._spec = spec
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if self._clock() - self._opened_at >= self._spec.reset_seconds and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def retry_after(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._spec.reset_seconds - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_running = False

    def record_failure(self) -> None:
        self._trial_running = False
        self._failures += 1
        if self._opened_at is not None or self._failures >= self._spec.failure_threshold:
            self._opened_at = self._clock()
