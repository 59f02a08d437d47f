"""Cancelling a call at each of its await points in turn, systematically rather than by timing.

`run_cancelled_at(work, n)` runs the coroutine `work()` in a task of its own and counts the times it
suspends (each await that really waits: the only places asyncio can deliver a cancel), in that task and in
every task it starts meanwhile (a stage's pump, a shielded close), all on one count. At the n-th it cancels
the task that suspended there, exactly as grpc cancels a handler whose client left, or a reader cancels
its pump: the await suspended there raises CancelledError. With `again`, every later suspension of every
one of those tasks is cancelled too (up to AGAIN_AT_MOST of them), which models a second cancel landing
while the call cleans up after the first (a stage's own deadline, then its caller's, then the watchdog).
`suspensions(work)` counts the points of a run that is not cancelled, so a test walks n over all of them.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any

# A call that keeps suspending under a stream of cancels is one that swallows them: past this many, the
# plan stops cancelling and lets the call end (the test's idle checks then say what it left held).
AGAIN_AT_MOST = 500


class _Plan:
    """Where to cancel, counted over every suspension of the call's tasks."""

    def __init__(self, at: int | None, again: bool) -> None:
        self.at = at
        self.again = again
        self.suspensions = 0

    def cancel_here(self) -> bool:
        self.suspensions += 1
        if self.at is None:
            return False
        if self.suspensions == self.at:
            return True
        return self.again and self.at < self.suspensions <= self.at + AGAIN_AT_MOST


class _Stepper:
    """Drives a coroutine as its task would, one suspension at a time, cancelling the task where told."""

    def __init__(self, coro: Coroutine[Any, Any, Any], plan: _Plan) -> None:
        self._coro = coro
        self._plan = plan

    def __await__(self) -> Generator[Any, Any, Any]:
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                yielded = self._coro.send(send) if throw is None else self._coro.throw(throw)
            except StopIteration as done:
                return done.value
            if self._plan.cancel_here():
                # As Task.cancel() from outside: the task cancels the future it is about to wait on (or, for a
                # bare yield, throws CancelledError at its next step), so the await suspended here raises it.
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
            try:
                send, throw = (yield yielded), None
            except BaseException as exc:  # handed on into the coroutine, as the task would
                send, throw = None, exc


def _stepped(coro: Coroutine[Any, Any, Any], plan: _Plan) -> Coroutine[Any, Any, Any]:
    async def driven() -> Any:
        return await _Stepper(coro, plan)

    return driven()


@dataclass
class CancelledRun:
    suspensions: int  # how many times the call's tasks suspended, cancelled ones included
    cancelled: bool  # whether the call ended with CancelledError
    error: BaseException | None  # any other exception it ended with
    result: Any = None


async def run_cancelled_at(
    work: Callable[[], Awaitable[Any]], at: int | None, again: bool = False, timeout: float = 60.0
) -> CancelledRun:
    """Run `work()` in a task of its own, cancelling at the `at`-th suspension of its tasks (None: never)."""
    plan = _Plan(at, again)
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], context: contextvars.Context | None = None
    ) -> asyncio.Task[Any]:
        task = asyncio.Task(_stepped(coro, plan), loop=loop, context=context)
        # A task cancelled before its first step never starts its coroutine: closed, as asyncio's own
        # throw into it would have, not left to warn that it was never awaited.
        task.add_done_callback(lambda _: coro.close() if inspect.getcoroutinestate(coro) == "CORO_CREATED" else None)
        return task

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        task = loop.create_task(_as_coroutine(work()))
        done, _ = await asyncio.wait([task], timeout=timeout)
    finally:
        loop.set_task_factory(previous)
    if not done:
        task.cancel()
        raise AssertionError(f"the call did not end within {timeout}s of its cancel at suspension {at}")
    if task.cancelled():
        return CancelledRun(plan.suspensions, True, None)
    error = task.exception()
    if error is not None:
        return CancelledRun(plan.suspensions, False, error)
    return CancelledRun(plan.suspensions, False, None, task.result())


async def suspensions(work: Callable[[], Awaitable[Any]]) -> int:
    """The number of times an uncancelled run of `work()` suspends, in all its tasks (it must end well)."""
    run = await run_cancelled_at(work, None)
    if run.error is not None:
        raise AssertionError("the uncancelled call failed") from run.error
    return run.suspensions


def _as_coroutine(awaitable: Awaitable[Any]) -> Coroutine[Any, Any, Any]:
    if isinstance(awaitable, Coroutine):
        return awaitable

    async def wrapped() -> Any:
        return await awaitable

    return wrapped()
