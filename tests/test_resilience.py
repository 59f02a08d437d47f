"""Backoff, circuit breaker and session affinity: pure policy."""

from __future__ import annotations

from collections import Counter

from promptpipe.backends.affinity import HashRing
from promptpipe.contract.spec import CircuitBreakerSpec, RetrySpec
from promptpipe.runtime.resilience import CircuitBreaker, backoff_delay


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    spec = RetrySpec(initial_backoff_seconds=0.1, max_backoff_seconds=0.5)
    assert backoff_delay(spec, 1, rng=lambda: 1.0) == 0.1
    assert backoff_delay(spec, 3, rng=lambda: 1.0) == 0.4
    assert backoff_delay(spec, 9, rng=lambda: 1.0) == 0.5
    assert backoff_delay(spec, 3, rng=lambda: 0.25) == 0.1


def test_circuit_opens_half_opens_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(CircuitBreakerSpec(failure_threshold=2, reset_seconds=10), clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow(), "one trial call after the reset time"
    assert not breaker.allow(), "only one trial at a time"
    breaker.record_failure()
    assert not breaker.allow() and breaker.retry_after() == 10.0
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open and breaker.allow()


def test_a_session_always_maps_to_the_same_endpoint() -> None:
    ring = HashRing(["a:1", "b:1", "c:1"])
    assert all(ring.home(f"s{i}") == HashRing(["c:1", "a:1", "b:1"]).home(f"s{i}") for i in range(200))


def test_removing_an_endpoint_moves_only_its_sessions() -> None:
    before = HashRing(["a", "b", "c", "d"])
    after = HashRing(["a", "b", "c"])
    sessions = [f"user-{i}" for i in range(4000)]
    moved = [s for s in sessions if before.home(s) != after.home(s)]
    assert all(before.home(s) == "d" for s in moved)
    assert Counter(before.home(s) for s in sessions)["d"] == len(moved)


def test_sessions_spread_evenly_and_fall_back_in_ring_order() -> None:
    ring = HashRing(["a", "b", "c", "d"])
    counts = Counter(ring.home(f"user-{i}") for i in range(8000))
    assert all(1500 < n < 2500 for n in counts.values()), counts
    order = list(ring.preference("user-1"))
    assert sorted(order) == ["a", "b", "c", "d"] and order[0] == ring.home("user-1")
