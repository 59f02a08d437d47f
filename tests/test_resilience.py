"""Backoff and circuit breaker: pure policy."""

from __future__ import annotations

import contextlib

from promptpipe.contract.spec import CircuitBreakerSpec, RetrySpec
from promptpipe.runtime.resilience import CircuitBreaker, backoff_delay


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    spec = RetrySpec(initial_backoff_seconds=0.1, max_backoff_seconds=0.5)
    assert backoff_delay(spec, 1, rng=lambda: 1.0) == 0.1
    assert backoff_delay(spec, 3, rng=lambda: 1.0) == 0.4
    assert backoff_delay(spec, 9, rng=lambda: 1.0) == 0.5
    assert backoff_delay(spec, 3, rng=lambda: 0.25) == 0.1


def opened(now: list[float], reset: float = 10) -> CircuitBreaker:
    breaker = CircuitBreaker(CircuitBreakerSpec(failure_threshold=2, reset_seconds=reset), clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    return breaker


def test_circuit_opens_half_opens_and_closes() -> None:
    now = [0.0]
    breaker = opened(now)
    now[0] = 10.0
    assert breaker.allow() and breaker.allow(), "asking takes nothing"
    with breaker.attempt():
        assert not breaker.allow(), "only one trial at a time"
        breaker.record_failure()
    assert not breaker.allow() and breaker.retry_after() == 10.0
    now[0] = 20.0
    with breaker.attempt():
        breaker.record_success()
    assert not breaker.is_open and breaker.allow()


def test_a_trial_that_ends_without_a_verdict_hands_the_trial_back() -> None:
    now = [10.0]
    breaker = opened(now)
    now[0] = 20.0
    # The client left, post closed the call on a stop sequence, the backend said 429 or refused the input.
    with contextlib.suppress(RuntimeError), breaker.attempt():
        raise RuntimeError("the call ended some other way")
    assert breaker.is_open and breaker.allow(), "the next call gets the trial: the circuit is not stuck open"


def test_a_trial_held_past_the_reset_time_is_presumed_lost() -> None:
    now = [10.0]
    breaker = opened(now)
    now[0] = 20.0
    trial = breaker.attempt()
    trial.__enter__()  # a call that never comes back
    assert not breaker.allow()
    now[0] = 29.9
    assert not breaker.allow()
    now[0] = 30.0
    assert breaker.allow(), "another trial may start"


def test_asking_every_endpoint_takes_no_trial_from_any() -> None:
    now = [10.0]
    a, b = opened(now), opened(now)
    now[0] = 20.0
    assert [x.allow() for x in (a, b)] == [True, True]
    with a.attempt():  # the endpoint the call chose
        assert not a.allow() and b.allow(), "b's trial is still there for the next call"
