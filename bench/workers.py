"""What worker processes per stage (`stages.<stage>.workers`) cost and give.

1. Admission per call: a stage's own `AdmissionQueue` (in its process) against a worker's
   `BrokeredQueue`, whose broker runs in another process as a supervisor's does (a real Unix socket).
   Sequential admit + release, p50 and p99 in µs.
2. A gateway call's charge to its tenant's quota: the gateway's own `LocalTenancy` against a worker's
   `BrokeredTenancy` (the supervisor's quotas, over the same socket). p50 and p99 in µs.
3. The pipeline at `--streams` concurrent streams, every stage one process, then post (the stage that
   filters every token) as 2 workers, then the gateway as 2 workers, side by side in one run: tokens/s
   through the gateway and TTFT p50. The client keeps 8 connections (a gateway's workers are handed
   connections, not calls). On a machine whose cores the other stages and the client already use, a
   second worker has no core to run on: the figure says what it costs there; the gain needs a pod with
   a core to spare.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from bench.harness import channel, closed_loop, gateway_stream, median, pct, pipeline_doc, running
from promptpipe.contract.spec import AuthSpec, QueueSpec, ShedPolicy
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.broker import BrokeredQueue, BrokeredTenancy, BrokerLink, StageBroker
from promptpipe.runtime.quotas import LocalTenancy, Tenancy
from promptpipe.v1 import gateway_pb2_grpc

SPEC = QueueSpec(capacity=64, concurrency=8, shed_policy=ShedPolicy.REJECT_NEW)
# A quota no call uses up: the figure is the charge's cost, not a refusal's.
AUTH = AuthSpec.model_validate({"defaultQuota": {"requestsPerMinute": 10_000_000}})
CLIENT_CONNECTIONS = 8


def _tenancy() -> tuple[AdmissionQueue, LocalTenancy]:
    queue = AdmissionQueue(SPEC.capacity, SPEC.concurrency, SPEC.shed_policy, 0.5)
    return queue, LocalTenancy.create(AUTH, CollectorRegistry(), "bench", queue)


def _broker_process(path: str, ready: multiprocessing.synchronize.Event) -> None:
    async def serve() -> None:
        broker = StageBroker(*_tenancy())
        await broker.start(path)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(serve())


async def _admissions(queue: AdmissionQueue | BrokeredQueue, calls: int) -> list[float]:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        async with queue.slot(5.0):
            pass
        seconds.append(time.perf_counter() - start)
    return seconds


async def _charges(tenancy: Tenancy, calls: int) -> list[float]:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        await tenancy.charge("team")
        seconds.append(time.perf_counter() - start)
    return seconds


def admission_cost(calls: int) -> None:
    own = asyncio.run(_admissions(AdmissionQueue(SPEC.capacity, SPEC.concurrency, SPEC.shed_policy, 0.5), calls))
    own_charges = asyncio.run(_charges(_tenancy()[1], calls))
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder, "admission.sock"))
        ready = multiprocessing.Event()
        broker = multiprocessing.Process(target=_broker_process, args=(path, ready), daemon=True)
        broker.start()
        ready.wait(10)

        async def brokered() -> tuple[list[float], list[float]]:
            link = BrokerLink()
            await link.connect(path)
            queue, tenancy = BrokeredQueue(link, SPEC), BrokeredTenancy(link)
            await _admissions(queue, 200)  # warm up
            await _charges(tenancy, 200)
            try:
                return await _admissions(queue, calls), await _charges(tenancy, calls)
            finally:
                await link.close()

        shared, shared_charges = asyncio.run(brokered())
        broker.terminate()
    print(f"admission per call ({calls} sequential, admit + release):")
    for label, values in (("own queue (one process)", own), ("brokered (a worker)", shared)):
        print(f"  {label:26s} p50 {pct(values, 50) * 1e6:7.1f} µs   p99 {pct(values, 99) * 1e6:7.1f} µs")
    print(f"a gateway call's quota charge ({calls} sequential):")
    for label, values in (("own quotas (one process)", own_charges), ("brokered (a worker)", shared_charges)):
        print(f"  {label:26s} p50 {pct(values, 50) * 1e6:7.1f} µs   p99 {pct(values, 99) * 1e6:7.1f} µs")
    # A worker's release is a message it does not wait for: the round trip is the admission's.


async def _load(gateway: str, streams: int, calls: int, tokens: int) -> tuple[float, float]:
    channels = [channel(gateway, own_connection=True) for _ in range(CLIENT_CONNECTIONS)]
    stubs = itertools.cycle([gateway_pb2_grpc.GatewayStub(ch) for ch in channels])  # type: ignore[no-untyped-call]
    await closed_loop(lambda: gateway_stream(next(stubs), tokens), streams, streams * 2)  # warm up
    start = time.perf_counter()
    results = await closed_loop(lambda: gateway_stream(next(stubs), tokens), streams, calls)
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    return sum(r.tokens for r in results) / elapsed, median([r.ttft for r in results if r.ttft is not None])


# What runs as 2 workers in each configuration.
CONFIGS = {"every stage one process": None, "post as 2 workers": "post", "gateway as 2 workers": "stream"}


def throughput(streams: int, calls: int, tokens: int, rounds: int) -> None:
    wide = {"queue": {"capacity": 256, "concurrency": 256}}
    figures: dict[str, list[tuple[float, float]]] = {label: [] for label in CONFIGS}
    for _ in range(rounds):  # alternated, so each sees the same machine
        for label, doubled in CONFIGS.items():
            stages: dict[str, dict[str, object]] = {
                s: dict(wide) for s in ("stream", "rag", "assemble", "inference", "post")
            }
            if doubled is not None:
                stages[doubled] = {**wide, "workers": 2}
            with running(pipeline_doc(f"w-{doubled or 'none'}", max_new_tokens=tokens, stages=stages)) as run:
                figures[label].append(asyncio.run(_load(run.gateway, streams, calls, tokens)))
    print(f"pipeline, {streams} streams, {calls} calls of {tokens} tokens, medians of {rounds} rounds:")
    base = median([t for t, _ in figures["every stage one process"]])
    for label, each in figures.items():
        rate, ttft = median([t for t, _ in each]), median([f for _, f in each])
        print(f"  {label:24s} {rate:9.0f} tokens/s ({rate / base:.2f}x)   TTFT p50 {ttft * 1e3:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admissions", type=int, default=5000)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--calls", type=int, default=160)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    admission_cost(args.admissions)
    throughput(args.streams, args.calls, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
