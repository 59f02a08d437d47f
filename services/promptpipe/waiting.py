"""The one way promptpipe waits for something outside it to happen: poll a check until it
gives a truthy value or a bound passes (the CLI, the local runs, the test harness)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class _Poll:
    def __init__(self, what: str, timeout: float, retry_on: tuple[type[BaseException], ...]) -> None:
        self.what = what
        self.timeout = timeout
        self.retry_on = retry_on
        self.deadline = time.monotonic() + timeout
        self.last: object = None

    def expired(self, error: BaseException | None) -> bool:
        """After a falsy result (or an error in `retry_on`): whether to give up now."""
        if time.monotonic() < self.deadline:
            return False
        if error is not None:
            raise TimeoutError(f"timed out after {self.timeout:g}s waiting for {self.what}: {error}") from error
        raise TimeoutError(f"timed out after {self.timeout:g}s waiting for {self.what} (last: {self.last!r})")


def wait_until(
    check: Callable[[], T | None],
    what: str,
    timeout: float = 20.0,
    every: float = 0.05,
    *,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `check` every `every` seconds until it returns something truthy, and return that.

    An exception in `retry_on` counts as "not yet"; any other ends the wait at once (e.g. a
    process that died). After `timeout`, TimeoutError names `what` and the last answer."""
    poll = _Poll(what, timeout, retry_on)
    while True:
        error: BaseException | None = None
        try:
            result = check()
            if result:
                return result
            poll.last = result
        except retry_on as err:
            error = err
        poll.expired(error)
        time.sleep(every)


async def wait_until_async(
    check: Callable[[], T | Awaitable[T | None] | None],
    what: str,
    timeout: float = 20.0,
    every: float = 0.02,
    *,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """`wait_until` for a running event loop: `check` may be a coroutine function."""
    poll = _Poll(what, timeout, retry_on)
    while True:
        error: BaseException | None = None
        try:
            result = check()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            poll.last = result
        except retry_on as err:
            error = err
        poll.expired(error)
        await asyncio.sleep(every)
