"""What the shared quota store (auth.quotaStore) costs a call, side by side in one run, on Debian's
redis-server on loopback:

- a charge alone: this process's buckets (LocalTenancy) against the store's (SharedTenancy), sequential
  charges, p50 and p99 in µs; and 64 charges at once, charges per second;
- TTFT through a pipeline (synthetic backend, API key on, a tenant with both quotas): two extra gateway
  processes of one local pipeline, one with the store and one without, calls alternating between them
  call by call, so a noisy second hurts both alike.

    python -m bench.quota_store [--charges 5000] [--calls 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from bench.harness import channel, median, pct
from promptpipe.contract.apikeys import hash_key
from promptpipe.contract.spec import AuthSpec, ShedPolicy
from promptpipe.gateway.quota_store import SharedTenancy
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.quotas import LocalTenancy, Tenancy
from promptpipe.v1 import gateway_pb2, gateway_pb2_grpc
from tests.support.pipelines import running_pipeline, synthetic_pipeline
from tests.support.redis_store import RedisServer, redis_server

KEY = "pp-bench-key-0123456789abcdef0123456789abcdef"
# Limits no run reaches: every charge goes the whole way (both buckets), none is refused.
QUOTA = {"name": "bench", "requestsPerMinute": 10_000_000, "tokensPerMinute": 10_000_000_000}


def _auth() -> AuthSpec:
    return AuthSpec.model_validate({"tenants": [QUOTA]})


async def _charges(tenancy: Tenancy, n: int) -> tuple[list[float], float]:
    """Per-charge seconds of `n` sequential charges (each after 8 tokens used, as a streamed call leaves
    them); and charges per second with 64 at once."""
    times = []
    for _ in range(n):
        tenancy.used("bench", 8)
        started = time.perf_counter()
        await tenancy.charge("bench")
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(n // 64):
        await asyncio.gather(*(tenancy.charge("bench") for _ in range(64)))
    return times, (n // 64 * 64) / (time.perf_counter() - started)


def charge_figures(store: RedisServer, n: int) -> None:
    async def run() -> None:
        queue = AdmissionQueue(8, 1, ShedPolicy.REJECT_NEW, 1.0)
        local = LocalTenancy.create(_auth(), CollectorRegistry(), "bench", queue)
        shared = SharedTenancy.create(store.url, "bench/bench", _auth(), CollectorRegistry(), "bench", queue)
        try:
            await _charges(shared, 200)  # connections opened, the script loaded
            for name, tenancy in (("own buckets", local), ("shared store", shared)):
                times, rate = await _charges(tenancy, n)
                print(
                    f"charge, {name:12}: p50 {pct(times, 50) * 1e6:7.1f} µs  p99 {pct(times, 99) * 1e6:7.1f} µs"
                    f"  {rate:9.0f} charges/s at 64 at once",
                    flush=True,
                )
        finally:
            await shared.close()

    asyncio.run(run())


async def _ttft(target: str) -> float:
    async with channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        started = time.perf_counter()
        request = gateway_pb2.GenerateRequest(prompt="hello there")
        first = 0.0
        async for r in stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30):
            if not first and r.HasField("chunk"):
                first = time.perf_counter() - started
        return first


def ttft_figures(store: RedisServer, calls: int, folder: Path) -> None:
    os.environ["PROMPTPIPE_API_KEYS"] = f"bench: {hash_key(KEY)}\n"
    doc = synthetic_pipeline(name="quotas", generation={"maxNewTokens": 8}, auth={"tenants": [QUOTA], "quotaStore": {}})
    with (
        running_pipeline(doc, folder) as p,
        p.more_gateways(1, folder) as [(own, _)],
        p.more_gateways(1, folder, PROMPTPIPE_QUOTA_STORE_URL=store.url) as [(shared, _)],
    ):

        async def run() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {"own buckets": [], "shared store": []}
            for i in range(calls + 50):
                for name, target in (("own buckets", own), ("shared store", shared)):
                    ttft = await _ttft(target)
                    if i >= 50:  # the first 50 warm both paths up
                        out[name].append(ttft)
            return out

        ttfts = asyncio.run(run())
    for name, values in ttfts.items():
        print(f"TTFT, {name:12}: p50 {median(values) * 1000:7.3f} ms  p99 {pct(values, 99) * 1000:7.3f} ms")
    ratio = median(ttfts["shared store"]) / median(ttfts["own buckets"])
    print(f"TTFT p50 shared/own: {ratio:.3f}x over {calls} calls each, alternating")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--charges", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PROMPTPIPE_HOME"] = tmp
        with redis_server(Path(tmp) / "redis") as store:
            charge_figures(store, args.charges)
            ttft_figures(store, args.calls, Path(tmp) / "pipelines")


if __name__ == "__main__":
    main()
