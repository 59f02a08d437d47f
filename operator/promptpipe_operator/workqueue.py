"""One reconcile at a time per pipeline, and requests that pile up during a run share the next one.

Every caller gets the result of a run that started after it asked, so what it saw
(an edit, a deleted child) is taken into account; but ten events during one run
cost one more run, not ten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Slot(Generic[T]):
    def __init__(self) -> None:
        self.running = False
        self.next: asyncio.Future[T] | None = None


class KeyedRunner(Generic[K, T]):
    def __init__(self, run: Callable[[K], Awaitable[T]]) -> None:
        self._run = run
        self._slots: dict[K, _Slot[T]] = {}

    async def request(self, key: K) -> T:
        slot = self._slots.setdefault(key, _Slot())
        if slot.next is None:
            slot.next = asyncio.get_running_loop().create_future()
        waiter = slot.next
        if not slot.running:
            slot.running = True
            asyncio.get_running_loop().create_task(self._drive(key, slot))
        return await asyncio.shield(waiter)

    async def _drive(self, key: K, slot: _Slot[T]) -> None:
        try:
            while slot.next is not None:
                waiter, slot.next = slot.next, None
                try:
                    waiter.set_result(await self._run(key))
                except Exception as err:  # noqa: BLE001 - handed to every caller of this run
                    waiter.set_exception(err)
                    waiter.exception()  # retrieved here too: callers may have gone away
        finally:
            slot.running = False
            if self._slots.get(key) is slot and slot.next is None:
                del self._slots[key]
