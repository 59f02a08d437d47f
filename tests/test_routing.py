"""Replica routing: the ring, bounded loads, circuits, the routing key, and the policies. Pure policy."""

from __future__ import annotations

import math
from collections import Counter

from promptpipe.backends.discovery import replica_urls
from promptpipe.backends.routing import LEADING_CHARS, HashRing, Reason, Router, routing_key
from promptpipe.contract.spec import RoutingPolicy, RoutingSpec

SESSIONS = [f"user-{i}" for i in range(4000)]


def every(_: str) -> bool:
    return True


def home(router: Router, key: str) -> str:
    return router.order(key, every)[0][0]


def test_a_key_always_maps_to_the_same_replica_whatever_the_order_they_are_listed_in() -> None:
    ring = HashRing(["a:1", "b:1", "c:1"])
    assert all(ring.home(s) == HashRing(["c:1", "a:1", "b:1"]).home(s) for s in SESSIONS[:200])


def test_a_replica_leaving_moves_only_its_own_keys() -> None:
    before, after = HashRing(["a", "b", "c", "d"]), HashRing(["a", "b", "c"])
    moved = [s for s in SESSIONS if before.home(s) != after.home(s)]
    assert moved and all(before.home(s) == "d" for s in moved)
    assert Counter(before.home(s) for s in SESSIONS)["d"] == len(moved)


def test_a_replica_joining_takes_keys_only_for_itself() -> None:
    before, after = HashRing(["a", "b", "c"]), HashRing(["a", "b", "c", "d"])
    moved = [s for s in SESSIONS if before.home(s) != after.home(s)]
    assert moved and all(after.home(s) == "d" for s in moved)
    assert 0.15 < len(moved) / len(SESSIONS) < 0.35, "about a quarter of the keys: d's share"


def test_a_removed_replicas_sessions_land_on_their_next_replica_in_ring_order() -> None:
    router = Router(RoutingSpec(), ["a", "b", "c", "d"])
    next_of = {s: router.order(s, every)[0][1] for s in SESSIONS if home(router, s) == "d"}
    router.set_replicas(["a", "b", "c"])
    assert next_of and all(home(router, s) == second for s, second in next_of.items())


def test_keys_spread_evenly_and_the_fallback_order_holds_every_replica_once() -> None:
    ring = HashRing(["a", "b", "c", "d"])
    counts = Counter(ring.home(f"user-{i}") for i in range(8000))
    assert all(1500 < n < 2500 for n in counts.values()), counts
    order = list(ring.preference("user-1"))
    assert sorted(order) == ["a", "b", "c", "d"] and order[0] == ring.home("user-1")


def test_a_home_over_its_bounded_load_passes_the_call_to_the_next_replica_on_the_ring() -> None:
    router = Router(RoutingSpec(load_bound=1.25), ["a", "b", "c"])
    (first, second, third), reason = router.order("hot", every)
    assert reason is Reason.HOME
    # One hot key, calls held open: its home takes calls until it holds 1.25 x the mean, then the next does.
    picks = []
    for _ in range(12):
        order, reason = router.order("hot", every)
        picks.append((order[0], reason))
        router.started(order[0])
    load = {r: router.in_flight(r) for r in (first, second, third)}
    assert load[first] >= load[second] >= load[third] > 0, f"overflow follows the ring order: {load}"
    assert max(load.values()) <= 1.25 * 12 / 3, f"no replica above (1+ε) x the mean: {load}"
    assert picks[0] == (first, Reason.HOME) and picks[1] == (second, Reason.OVERFLOW)
    for _ in range(load[first]):
        router.finished(first)
    assert router.order("hot", every) == ([first, second, third], Reason.HOME), "home again once it has room"


def test_bounded_loads_keep_every_replica_within_the_bound_under_many_keys() -> None:
    router = Router(RoutingSpec(load_bound=1.1), [f"r{i}" for i in range(5)])
    for i in range(500):  # a skewed mix: half the calls on three keys
        key = f"hot-{i % 3}" if i % 2 else f"user-{i}"
        router.started(router.order(key, every)[0][0])
        loads = [router.in_flight(r) for r in router.replicas]
        mean = sum(loads) / len(loads)
        assert max(loads) <= max(math.ceil(mean), 1.1 * mean), loads


def test_while_calls_are_few_no_replica_holds_two_while_another_holds_none() -> None:
    """Three replicas, three calls open on one hot key: one each (the paper's rounding up would allow 2)."""
    router = Router(RoutingSpec(), ["a", "b", "c"])
    for _ in range(3):
        router.started(router.order("hot", every)[0][0])
    assert sorted(router.in_flight(r) for r in router.replicas) == [1, 1, 1]


def test_an_open_circuit_sends_the_call_to_the_next_replica_and_says_so() -> None:
    router = Router(RoutingSpec(), ["a", "b", "c"])
    ring = list(HashRing(["a", "b", "c"]).preference("s"))
    order, reason = router.order("s", lambda r: r != ring[0])
    assert order == ring[1:] and reason is Reason.CIRCUIT
    assert router.order("s", lambda r: False) == ([], Reason.HOME)


def test_replicas_that_stay_keep_their_calls_counted_and_one_that_left_is_forgotten() -> None:
    router = Router(RoutingSpec(), ["a", "b"])
    router.started("a")
    router.started("b")
    router.set_replicas(["a", "c"])
    assert (router.in_flight("a"), router.in_flight("b"), router.in_flight("c")) == (1, 0, 0)
    router.finished("b")  # a call that ran on b ends after b left
    assert router.in_flight("b") == 0 and router.replicas == ("a", "c")


def test_round_robin_takes_turns_and_least_loaded_picks_the_emptiest() -> None:
    rr = Router(RoutingSpec(policy=RoutingPolicy.ROUND_ROBIN), ["a", "b", "c"])
    assert [rr.order("same", every)[0][0] for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert rr.order("same", every)[1] is Reason.BALANCED
    ll = Router(RoutingSpec(policy=RoutingPolicy.LEAST_LOADED), ["a", "b", "c"])
    ll.started("a")
    ll.started("a")
    ll.started("b")
    assert ll.order("same", every)[0] == ["c", "b", "a"]
    ll.started("c")
    assert ll.order("same", every)[0][:2] in (["b", "c"], ["c", "b"])
    assert ll.order("same", lambda r: r != "b")[0] == ["c", "a"]


def test_a_conversation_keeps_its_key_turn_after_turn_and_another_gets_another() -> None:
    system = "You are terse. " * 200  # longer than LEADING_CHARS: the shared part alone says nothing
    assert len(system) > LEADING_CHARS

    def prompt(*turns: str) -> str:
        return system + "".join(f"<user>{t}<assistant>ok." for t in turns)

    first = routing_key("", prompt("Where is Paris?"), "Where is Paris?")
    later = routing_key("", prompt("Where is Paris?", "And Rome?", "And Oslo?"), "Where is Paris?")
    other = routing_key("", prompt("Where is Lima?", "And Rome?"), "Where is Lima?")
    assert first == later and first != other
    assert routing_key("s-1", prompt("a"), "a") == routing_key("s-1", prompt("b"), "b"), "a session id wins"
    assert routing_key("s-1", "x", "x") != routing_key("s-2", "x", "x")
    # A first message the prompt does not hold word for word (escaped, or trimmed away): its leading part.
    assert routing_key("", "abc" * 1000, "zzz") == routing_key("", "abc" * 1000 + "more", "zzz")


def test_the_replicas_are_the_ready_addresses_of_every_slice_with_the_named_port() -> None:
    def piece(port: str, *endpoints: dict[str, object]) -> dict[str, object]:
        return {
            "ports": [{"name": "metrics", "port": 9090}, {"name": port, "port": 8080}],
            "endpoints": list(endpoints),
        }

    slices = [
        piece(
            "http",
            {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.1"]},  # ready unset: ready, as the API says
            {"addresses": ["10.0.0.3"], "conditions": {"ready": False, "terminating": True}},
        ),
        piece("http", {"addresses": ["fd00::5"], "conditions": {"ready": True}}, {"addresses": ["10.0.0.2"]}),
        piece("grpc", {"addresses": ["10.0.0.9"]}),  # a port of another name: not this backend
        {"endpoints": [{"addresses": ["10.0.0.8"]}]},  # no ports yet
    ]
    assert replica_urls(slices, "http", "http") == [
        "http://10.0.0.1:8080",
        "http://10.0.0.2:8080",
        "http://[fd00::5]:8080",
    ]
    assert replica_urls([], "http", "http") == []


def test_a_backend_told_of_new_replicas_keeps_the_circuits_of_those_that_stay_and_falls_back_to_its_endpoints() -> None:
    from prometheus_client import CollectorRegistry

    from promptpipe.backends.remote import RemoteBackend
    from promptpipe.contract.spec import CircuitBreakerSpec, RemoteBackendSpec, RetrySpec
    from promptpipe.runtime.metrics import BackendMetrics

    backend = RemoteBackend(
        RemoteBackendSpec(endpoints=["http://svc:8080"]),
        breaker=CircuitBreakerSpec(failure_threshold=1),
        retry=RetrySpec(),
        metrics=BackendMetrics(CollectorRegistry(), "p", "tgi"),
    )
    backend.set_replicas(["http://10.0.0.1:8080", "http://10.0.0.2:8080"])
    backend._breakers["http://10.0.0.1:8080"].record_failure()  # its circuit opens
    backend.set_replicas(["http://10.0.0.1:8080", "http://10.0.0.3:8080"])
    assert backend._breakers["http://10.0.0.1:8080"].is_open, "a replica that stays keeps its circuit"
    assert backend.loads() == {"http://10.0.0.1:8080": 0, "http://10.0.0.3:8080": 0}
    assert backend._candidates("any") == ["http://10.0.0.3:8080"], "an open circuit is skipped"
    backend.set_replicas([])  # no pod ready, or none known: the Service itself
    assert backend.replicas == ("http://svc:8080",)
