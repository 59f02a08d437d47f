"""The wait cap (`queue.maxWaitMilliseconds`), driven directly: a newcomer whose expected wait is over it is
refused at once, a waiter that reaches it is ended, each with the stage's name, the cap and a retry hint;
and fair admission's rules still decide who would wait how long."""

from __future__ import annotations

import asyncio

import pytest

from promptpipe.contract.spec import QueueSpec, ShedPolicy
from promptpipe.runtime.admission import WAIT_CAP, AdmissionQueue, Flow
from tests.test_fair_admission import Slots, settle

A, B = Flow("a"), Flow("b")


async def primed(concurrency: int = 1) -> tuple[AdmissionQueue, float]:
    """A queue of stage inference that has held one slot (its slot-time known: the EWMA's first value)."""
    q = AdmissionQueue.of(
        QueueSpec(capacity=10, concurrency=concurrency, shed_policy=ShedPolicy.REJECT_NEW, retry_after_seconds=0.5),
        "inference",
    )
    assert q.expected_wait() is None, "no slot held yet: nothing to judge by"
    async with q.slot(5.0):
        await asyncio.sleep(0.05)
    slot = q.expected_wait()
    assert slot == 0.0, "an idle queue: no wait"
    assert q._slot_seconds is not None and q._slot_seconds >= 0.05
    # From here a slot-time of 10 s: a cap of a few slot-times is then never reached in real time while a
    # test runs (a loaded machine had a waiter ended at 2.5 x 50 ms), so the expected waits alone decide.
    q._slot_seconds = 10.0
    return q, q._slot_seconds


async def test_a_newcomer_expected_to_wait_past_the_cap_is_refused_at_once_naming_the_stage() -> None:
    q, slot = await primed()
    q.max_wait = 2.5 * slot  # between two and three slot-times
    s = Slots(q)
    await s.arrive("running", A)
    await s.arrive("first", A)  # 1 slot-time away
    await s.arrive("second", A)  # 2
    assert q.expected_wait(A) == pytest.approx(3 * slot)
    await s.arrive("third", A)  # 3: over the cap
    refused = s.shed["third"]
    assert refused.reason == WAIT_CAP and str(refused).startswith("stage inference: expected wait ")
    assert f"over queue.maxWaitMilliseconds {q.max_wait * 1000:.0f}" in str(refused)
    assert refused.retry_after == pytest.approx(max(0.5, 3 * slot - q.max_wait))
    assert q.depth == 2 and q.counters.rejected == 1, "refused without a place taken, nobody else dropped"
    await s.finish_all_in_turn()
    assert s.admitted == ["running", "first", "second"]


async def test_a_light_tenant_still_gets_in_where_a_heavy_ones_newcomer_is_refused() -> None:
    q, slot = await primed()
    q.max_wait = 2.5 * slot
    s = Slots(q)
    for name in ("a0", "a1", "a2"):
        await s.arrive(name, A)  # a0 runs, a1 and a2 wait
    await s.arrive("a3", A)
    assert s.shed["a3"].reason == WAIT_CAP
    # b waits behind one turn of a's at most (deficit round robin): about two slot-times.
    assert q.expected_wait(B) == pytest.approx(2 * slot)
    await s.arrive("b0", B)
    assert "b0" not in s.shed
    await s.finish_all_in_turn()
    assert s.admitted == ["a0", "a1", "b0", "a2"]


async def test_a_waiter_is_ended_when_it_has_waited_the_cap_well_before_its_deadline() -> None:
    q, _ = await primed()
    q.max_wait = 0.1
    s = Slots(q)
    await s.arrive("running", A)
    q._slot_seconds = 0.01  # expected to wait little, admitted to the queue; then the running call holds on
    started = asyncio.get_running_loop().time()
    await s.arrive("waiting", A)
    while "waiting" not in s.shed:
        await asyncio.sleep(0.01)
    waited = asyncio.get_running_loop().time() - started
    ended = s.shed["waiting"]
    assert ended.reason == WAIT_CAP and str(ended) == "stage inference: waited 100 ms, queue.maxWaitMilliseconds"
    assert ended.retry_after == 0.5 and 0.1 <= waited < 2.0, "at the cap, not at the 5 s deadline"
    assert q.depth == 0 and q.counters.dropped == 1
    await s.finish("running")
    await settle()
    assert s.admitted == ["running"]


async def test_without_a_cap_nothing_is_refused_for_its_wait() -> None:
    q, slot = await primed()
    s = Slots(q)
    for i in range(6):
        await s.arrive(f"a{i}", A)
    assert q.expected_wait(A) == pytest.approx(6 * slot) and not s.shed
    await s.finish_all_in_turn()
    assert s.admitted == [f"a{i}" for i in range(6)]


def test_the_cap_is_a_pipeline_setting_bounded_and_off_by_default() -> None:
    assert QueueSpec().max_wait_milliseconds == 0
    assert AdmissionQueue.of(QueueSpec(max_wait_milliseconds=250), "post").max_wait == 0.25
    with pytest.raises(ValueError, match="maxWaitMilliseconds"):
        QueueSpec.model_validate({"maxWaitMilliseconds": -1})
