"""Retries with backoff, the circuit breaker, and when a call is carried on after a failure mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from promptpipe.contract.spec import CircuitBreakerSpec, FailoverSpec, RetrySpec
from promptpipe.runtime.errors import DeadlineExceeded


def backoff_delay(spec: RetrySpec, attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff before retry number `attempt` (1-based)."""
    ceiling = min(spec.max_backoff_seconds, spec.initial_backoff_seconds * (2 ** (attempt - 1)))
    return float(ceiling * rng())


@dataclass(frozen=True)
class Attempt:
    number: int  # 1-based
    last: bool  # no retry follows a failure of this one


class Retries:
    """The attempts of one call, the one retry loop of the data path:

        async for attempt in Retries(spec, deadline, "the backend"):
            try: ...; return
            except SomeError: if not retryable or attempt.last: raise

    Before each retry it waits a full-jitter backoff, and raises DeadlineExceeded when that
    wait would pass `deadline` (on the time.monotonic clock). Which failures are retried is
    the caller's rule (ours: only before anything was streamed)."""

    def __init__(self, spec: RetrySpec, deadline: float, what: str, rng: Callable[[], float] = random.random) -> None:
        self._spec = spec
        self._deadline = deadline
        self._what = what
        self._rng = rng
        self._done = 0

    def __aiter__(self) -> Retries:
        return self

    async def __anext__(self) -> Attempt:
        if self._done >= self._spec.max_attempts:
            raise StopAsyncIteration
        if self._done:
            delay = backoff_delay(self._spec, self._done, self._rng)
            if time.monotonic() + delay >= self._deadline:
                raise DeadlineExceeded(f"deadline passed while retrying {self._what}")
            await asyncio.sleep(delay)
        self._done += 1
        return Attempt(self._done, self._done == self._spec.max_attempts)


class CircuitBreaker:
    """Closed -> open after `failure_threshold` failures in a row. After `reset_seconds`, one trial call
    may go through (half-open): its success closes the circuit, its failure opens it again.

    `allow()` only asks; a call takes the trial with `attempt()`, for the endpoint it chose. A trial
    that ends recording neither (the client left, the call was closed on a stop sequence, the backend
    refused the input or was busy, any other error) is handed back, and one held longer than
    `reset_seconds` is presumed lost: the circuit is never left open for want of a verdict."""

    def __init__(self, spec: CircuitBreakerSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self._spec = spec
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial: object | None = None  # the trial in progress, and when it started
        self._trial_started = 0.0

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def _trial_held(self) -> bool:
        return self._trial is not None and self._clock() - self._trial_started < self._spec.reset_seconds

    def allow(self) -> bool:
        """Whether a call may go through now (no side effect)."""
        if self._opened_at is None:
            return True
        return self._clock() - self._opened_at >= self._spec.reset_seconds and not self._trial_held()

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """One call through this breaker; on an open circuit (after `allow()`), it holds the trial."""
        trial = object() if self._opened_at is not None else None
        if trial is not None:
            self._trial, self._trial_started = trial, self._clock()
        try:
            yield
        finally:
            if trial is not None and self._trial is trial:  # no verdict recorded: hand the trial back
                self._trial = None

    def retry_after(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._spec.reset_seconds - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial = None

    def record_failure(self) -> None:
        self._trial = None
        self._failures += 1
        if self._opened_at is not None or self._failures >= self._spec.failure_threshold:
            self._opened_at = self._clock()


def why_not_carried_on(
    failover: FailoverSpec, seconds_left: float, done: int, first_token_seconds: float, others: list[str] | None
) -> str:
    """Why a call whose replica or pod failed mid-stream is not carried on ("" when it is), pure: failover
    off or its attempts used up, no replica but those that failed (`others`; None: not known, as for the
    pods behind a Service), or a deadline closer than a first token took."""
    if failover.max_attempts == 0:
        return "failover is off (failover.maxAttempts 0)"
    if done >= failover.max_attempts:
        return f"failover.maxAttempts ({failover.max_attempts}) reached"
    if others is not None and not others:
        return "no other replica"
    if seconds_left <= first_token_seconds:
        return (
            f"{max(0.0, seconds_left):.2f}s left to the deadline, less than a first token took"
            f" ({first_token_seconds:.2f}s)"
        )
    return ""
