"""The load a called stage scales on: seconds its callers' calls to it were open, open ones included."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from promptpipe.runtime import metrics as runtime_metrics
from promptpipe.runtime.metrics import NextStageCalls, OpenCallSeconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(runtime_metrics.time, "monotonic", fake)
    return fake


def test_an_open_call_counts_while_it_is_open_so_a_waiting_call_is_seen(clock: Clock) -> None:
    seconds = OpenCallSeconds()
    with seconds.open():
        clock.now += 2.5
        assert seconds.total() == pytest.approx(2.5)
        clock.now += 1.0
        assert seconds.total() == pytest.approx(3.5)
    clock.now += 10.0
    assert seconds.total() == pytest.approx(3.5), "an ended call stops counting"


def test_the_rate_is_the_mean_number_of_calls_open(clock: Clock) -> None:
    seconds = OpenCallSeconds()
    before = seconds.total()
    # Over 10 s: one call open throughout, and 100 calls of 20 ms each (a gauge read now and then sees ~none).
    with seconds.open():
        for _ in range(100):
            with seconds.open():
                clock.now += 0.02
        clock.now += 8.0
        assert (seconds.total() - before) / 10.0 == pytest.approx(1.2)


def test_the_total_never_goes_back(clock: Clock) -> None:
    seconds = OpenCallSeconds()
    totals = []
    for i in range(1000):
        with seconds.open():
            clock.now += 0.001 * (i % 7)
            totals.append(seconds.total())
        totals.append(seconds.total())
    assert totals == sorted(totals)


def test_every_next_stage_has_its_series_from_the_start() -> None:
    registry = CollectorRegistry()
    calls = NextStageCalls(registry, "p", "stream")
    calls.to("rag")
    calls.to("post")
    text = generate_latest(registry).decode()
    assert 'promptpipe_stage_next_call_seconds_total{pipeline="p",stage="stream",to="rag"} 0.0' in text
    assert 'promptpipe_stage_next_call_seconds_total{pipeline="p",stage="stream",to="post"} 0.0' in text
    assert "# TYPE promptpipe_stage_next_call_seconds_total counter" in text
