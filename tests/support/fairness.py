"""Tenant fairness under a flood, for the test and the benchmark alike.

Tenant A floods the gateway at many times its capacity, from a process of its own (so the flood's client
is not what slows the measuring one); tenant B calls now and then, and its time to first token is
measured alone first, then during the flood. Run as a module, this is the flood:
`python -m tests.support.fairness TARGET KEY RATE SECONDS` prints A's outcomes as JSON.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from promptpipe.client import GenerationError, PipelineClient
from tests.support.pipelines import synthetic_pipeline

# One call: 0.2 s to the first token (a model's prefill), then 8 tokens at 200/s: B's calls, and A's on
# average. A's calls vary in length (1 to 15 tokens), as real ones do: identical calls admitted together end
# together, so every slot frees at once and a call arriving just after waits a whole call, which no
# non-preemptive slot limit avoids; fair admission's promise is the next slot, not an idle one.
FIRST_TOKEN_SECONDS = 0.2
TOKENS = 8
MAX_TOKENS = 2 * TOKENS - 1
TOKENS_PER_SECOND = 200
# The gateway's admission: 4 calls at a time, 16 waiting.
CONCURRENCY = 4
WAITING = 16
CALL_SECONDS = FIRST_TOKEN_SECONDS + (TOKENS - 1) / TOKENS_PER_SECOND
CAPACITY_PER_SECOND = CONCURRENCY / CALL_SECONDS


def fairness_pipeline(name: str = "fair") -> dict[str, Any]:
    return synthetic_pipeline(
        name,
        model={
            "synthetic": {"tokensPerSecond": TOKENS_PER_SECOND, "firstTokenSeconds": FIRST_TOKEN_SECONDS},
        },
        generation={"maxNewTokens": MAX_TOKENS},
        stages={"stream": {"queue": {"concurrency": CONCURRENCY, "capacity": WAITING}}},
    )


async def first_token_seconds(target: str, key: str, calls: int, every: float) -> tuple[list[float], list[str]]:
    """`calls` calls, one every `every` seconds: each one's time to first token, and the errors."""
    ttfts: list[float] = []
    errors: list[str] = []
    async with PipelineClient(target, key) as client:
        begun = time.perf_counter()
        for i in range(calls):
            started = time.perf_counter()
            first: float | None = None
            try:
                async for r in client.generate("hello", max_new_tokens=TOKENS, timeout=30):
                    if first is None and r.HasField("chunk"):
                        first = time.perf_counter() - started
            except GenerationError as err:
                errors.append(err.code.name)
            else:
                ttfts.append(first if first is not None else float("nan"))
            pause = begun + every * (i + 1) - time.perf_counter()  # one call every `every` seconds
            if pause > 0 and i + 1 < calls:
                await asyncio.sleep(pause)
    return ttfts, errors


@dataclass
class Flood:
    process: subprocess.Popen[str]

    def outcomes(self) -> dict[str, int]:
        out, _ = self.process.communicate(timeout=120)
        result: dict[str, int] = json.loads(out)
        return result


def start_flood(target: str, key: str, rate: float, seconds: float) -> Flood:
    args = [sys.executable, "-m", "tests.support.fairness", target, key, str(rate), str(seconds)]
    return Flood(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))


async def _flood(target: str, key: str, rate: float, seconds: float) -> dict[str, int]:
    """Calls at `rate` a second, open loop (Poisson arrivals are not needed: a flood is a flood)."""
    outcomes: collections.Counter[str] = collections.Counter()
    lengths = random.Random(0)

    async def one(client: PipelineClient, tokens: int) -> None:
        try:
            async for _ in client.generate("flood", max_new_tokens=tokens, timeout=30):
                pass
            outcomes["OK"] += 1
        except GenerationError as err:
            outcomes[err.code.name] += 1

    async with PipelineClient(target, key) as client:
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - start < seconds:
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(one(client, lengths.randint(1, MAX_TOKENS)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.gather(*tasks)
    return dict(outcomes)


if __name__ == "__main__":
    target, key, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    print(json.dumps(asyncio.run(_flood(target, key, rate, seconds))))
