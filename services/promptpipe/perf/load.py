"""Load shapes: fixed concurrency, fixed rate with Poisson arrivals, or a sweep of either."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from promptpipe.perf.records import Level


def parse_levels(concurrency: str | None, rate: str | None) -> list[Level]:
    """`--concurrency 1,4,16` or `--rate 2,5,10` (one value: one level; several: a sweep)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give one of --concurrency or --rate")
    kind, text = ("concurrency", concurrency) if concurrency is not None else ("rate", rate or "")
    levels = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--{kind}: {part!r} is not a number") from None
        if value <= 0 or (kind == "concurrency" and value != int(value)):
            raise ValueError(
                f"--{kind}: {part!r} must be a positive {'integer' if kind == 'concurrency' else 'number'}"
            )
        levels.append(Level(kind, value))
    return levels


def poisson_arrivals(rate: float, seconds: float, limit: int, rng: random.Random) -> list[float]:
    """Start times (seconds from the level's start) of a Poisson process of `rate` calls per second,
    within `seconds` and at most `limit` of them: exponential gaps, as real independent users make."""
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds and len(times) < limit:
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def closed_loop(concurrency: int, call: Callable[[], Awaitable[bool]]) -> None:
    """Fixed concurrency: `concurrency` clients, each sending its next call as soon as its last one ended,
    until `call` says there is none left to send (False)."""

    async def client() -> None:
        while await call():
            pass

    await asyncio.gather(*(client() for _ in range(concurrency)))
