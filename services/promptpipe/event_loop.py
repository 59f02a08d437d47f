"""The event loop a process runs its asyncio code on: uvloop (libuv) or the standard library's.

`PROMPTPIPE_EVENT_LOOP` chooses (`uvloop`, `asyncio`); unset, DEFAULT: uvloop, which measured better on
every figure of `python -m bench.event_loop` (uvloop in the stages and the client, medians of 5 rounds:
tokens/s end to end 1.14x, the inference stage alone 1.13x, TTFT p50 0.94x and p99 0.92x;
docs/performance.md). grpc.aio, aiohttp and the stages run on either."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

LOOPS = ("uvloop", "asyncio")
DEFAULT = "uvloop"
ENV = "PROMPTPIPE_EVENT_LOOP"


def chosen() -> str:
    """The loop PROMPTPIPE_EVENT_LOOP names, or DEFAULT; anything else is an error that says what may be."""
    name = os.environ.get(ENV, "") or DEFAULT
    if name not in LOOPS:
        raise ValueError(f"{ENV}={name!r}: must be one of {', '.join(LOOPS)}")
    return name


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], name: str | None = None) -> T:
    """asyncio.run on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(name or chosen())) as runner:
        return runner.run(main)
