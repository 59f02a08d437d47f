"""What worker processes per stage (`stages.<stage>.workers`) cost and give.

1. Admission per call: a stage's own `AdmissionQueue` (in its process) against a worker's
   `BrokeredQueue`, whose broker runs in another process as a supervisor's does (a real Unix socket).
   Sequential admit + release, p50 and p99 in µs.
2. The pipeline at `--streams` concurrent streams with post (the stage that filters every token) run as
   1 and as 2 workers, side by side in one run: tokens/s through the gateway and TTFT p50. On a machine
   whose cores the other stages and the client already use, a second worker has no core to run on: the
   figure says what it costs there; the gain needs a pod with a core to spare.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path

from bench.harness import channel, closed_loop, gateway_stream, median, pct, pipeline_doc, running
from promptpipe.contract.spec import QueueSpec, ShedPolicy
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.broker import AdmissionBroker, BrokeredQueue
from promptpipe.v1 import gateway_pb2_grpc

SPEC = QueueSpec(capacity=64, concurrency=8, shed_policy=ShedPolicy.REJECT_NEW)


def _broker_process(path: str, ready: multiprocessing.synchronize.Event) -> None:
    async def serve() -> None:
        broker = AdmissionBroker(AdmissionQueue(SPEC.capacity, SPEC.concurrency, SPEC.shed_policy, 0.5))
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


def admission_cost(calls: int) -> None:
    own = asyncio.run(_admissions(AdmissionQueue(SPEC.capacity, SPEC.concurrency, SPEC.shed_policy, 0.5), calls))
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder, "admission.sock"))
        ready = multiprocessing.Event()
        broker = multiprocessing.Process(target=_broker_process, args=(path, ready), daemon=True)
        broker.start()
        ready.wait(10)

        async def brokered() -> list[float]:
            queue = BrokeredQueue(SPEC)
            await queue.connect(path)
            await _admissions(queue, 200)  # warm up
            try:
                return await _admissions(queue, calls)
            finally:
                await queue.close()

        shared = asyncio.run(brokered())
        broker.terminate()
    print(f"admission per call ({calls} sequential, admit + release):")
    for label, values in (("own queue (one process)", own), ("brokered (a worker)", shared)):
        print(f"  {label:26s} p50 {pct(values, 50) * 1e6:7.1f} µs   p99 {pct(values, 99) * 1e6:7.1f} µs")
    # A worker's release is a message it does not wait for: the round trip is the admission's.


async def _load(gateway: str, streams: int, calls: int, tokens: int) -> tuple[float, float]:
    ch = channel(gateway)
    stub = gateway_pb2_grpc.GatewayStub(ch)  # type: ignore[no-untyped-call]
    await closed_loop(lambda: gateway_stream(stub, tokens), streams, streams * 2)  # warm up
    start = time.perf_counter()
    results = await closed_loop(lambda: gateway_stream(stub, tokens), streams, calls)
    elapsed = time.perf_counter() - start
    await ch.close()
    return sum(r.tokens for r in results) / elapsed, median([r.ttft for r in results if r.ttft is not None])


def throughput(streams: int, calls: int, tokens: int, rounds: int) -> None:
    wide = {"queue": {"capacity": 256, "concurrency": 256}}
    figures: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(rounds):  # alternated, so both see the same machine
        for workers in (1, 2):
            stages = {s: dict(wide) for s in ("stream", "rag", "assemble", "inference", "post")}
            stages["post"] = {**wide, "workers": workers}
            with running(pipeline_doc(f"w{workers}", max_new_tokens=tokens, stages=stages)) as run:
                figures[workers].append(asyncio.run(_load(run.gateway, streams, calls, tokens)))
    print(f"pipeline, {streams} streams, {calls} calls of {tokens} tokens, medians of {rounds} rounds:")
    base = median([t for t, _ in figures[1]])
    for workers, each in figures.items():
        rate, ttft = median([t for t, _ in each]), median([f for _, f in each])
        print(
            f"  post with {workers} worker(s): {rate:9.0f} tokens/s ({rate / base:.2f}x)"
            f"   TTFT p50 {ttft * 1e3:6.2f} ms"
        )


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
