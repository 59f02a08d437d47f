"""Tenant fairness and the cost of the front door's checks.

1. A floods the gateway at 10x its capacity for `--seconds`, B calls at 10% of it. B's time to first
   token alone and during the flood, and how many of B's calls were refused: with A and B as two tenants
   (fair admission), then with both keys in one tenant (the plain FIFO queue, what a gateway without
   tenants does). Synthetic backend: 0.2 s to the first token, 8 tokens at 200/s; the gateway runs 4
   calls and queues 16.
2. What a call pays at the gateway for its key check and its quota check, in-process, p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import pct, running
from promptpipe.contract.apikeys import hash_key, new_key
from promptpipe.contract.spec import AuthSpec
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.runtime.quotas import Quotas
from tests.support.fairness import CAPACITY_PER_SECOND, fairness_pipeline, first_token_seconds, start_flood


def scenario(same_tenant: bool, seconds: float, folder: Path) -> dict[str, object]:
    a, b = new_key(), new_key()
    keys = folder / ("one.yaml" if same_tenant else "two.yaml")
    lines = f"everyone: [{hash_key(a)}, {hash_key(b)}]\n" if same_tenant else f"a: {hash_key(a)}\nb: {hash_key(b)}\n"
    keys.write_text(lines)
    os.environ["PROMPTPIPE_API_KEYS_FILE"] = str(keys)
    every = 1 / (0.1 * CAPACITY_PER_SECOND)
    calls = max(4, int(seconds / every) - 2)
    with running(fairness_pipeline()) as run:
        alone, _ = asyncio.run(first_token_seconds(run.gateway, b, 10, every))
        flood = start_flood(run.gateway, a, 10 * CAPACITY_PER_SECOND, seconds)

        async def during() -> tuple[list[float], list[str]]:
            await asyncio.sleep(2.0)  # the flood's process starts and fills the queue first
            return await first_token_seconds(run.gateway, b, calls, every)

        loaded, refused = asyncio.run(during())
        outcomes = flood.outcomes()
    del os.environ["PROMPTPIPE_API_KEYS_FILE"]
    return {"alone": alone, "loaded": loaded, "refused": len(refused), "calls": calls, "flood": outcomes}


def report(name: str, r: dict[str, object]) -> None:
    alone, loaded = r["alone"], r["loaded"]
    assert isinstance(alone, list) and isinstance(loaded, list)
    base = pct(alone, 99)
    line = f"  {name:<34} B alone p50/p99 {ms(pct(alone, 50))}/{ms(base)}"
    if loaded:
        worst = pct(loaded, 99)
        line += f"   flooded p50/p99 {ms(pct(loaded, 50))}/{ms(worst)}   p99 ratio {worst / base:.2f}x"
    line += f"   B refused {r['refused']}/{r['calls']}   A: {r['flood']}"
    print(line, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def checks(n: int) -> None:
    key = new_key()
    ring = KeyRing(inline=f"team-a: {hash_key(key)}\n")
    quotas = Quotas(AuthSpec.model_validate({"defaultQuota": {"requestsPerMinute": 10**7, "tokensPerMinute": 10**9}}))
    header = f"Bearer {key}"
    samples: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        tenant = ring.tenant_of(header)
        quotas.admit(tenant)
        quotas.used(tenant, 100)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    print(
        f"  key check + quota check + charge, per call: p50 {statistics.median(samples):.2f} µs,"
        f" p99 {samples[int(0.99 * len(samples))]:.2f} µs ({n} calls)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(
        f"1. fairness: A at 10x capacity ({10 * CAPACITY_PER_SECOND:.0f}/s),"
        f" B at 10% ({0.1 * CAPACITY_PER_SECOND:.1f}/s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        report("two tenants (fair admission)", scenario(False, args.seconds, Path(tmp)))
        report("one tenant (FIFO, no fairness)", scenario(True, args.seconds, Path(tmp)))
    print("2. the front door's checks, in-process")
    checks(100_000)


if __name__ == "__main__":
    main()
