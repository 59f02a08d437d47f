"""Where the data path's CPU goes. Run: python -m bench.profile [--seconds S] [--flames DIR]

Each load runs on the five-service pipeline and on the fused one (`spec.fuse`: rag and assemble in the
gateway, post in inference). From each stage process's own CPU time (user + system, all its threads):
  - per token message, one stream paced at 1,000 tokens/s, so every hop keeps up and sends each token in
    a message of its own (checked at the client);
  - per token, 16 streams as fast as they are read (the throughput load; coalescing merges tokens);
  - per call, calls of 1 token on 16 streams (the TTFT load: everything but the tokens).
A process's figure covers both sides of the hops it takes part in. With --flames, py-spy then records
each stage process under each load (SVG flame graphs, and the functions with the most samples, printed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.harness import StreamResult, channel, gateway_stream, pipeline_doc, running
from promptpipe.cli import localrun
from promptpipe.v1 import gateway_pb2_grpc


@dataclass(frozen=True)
class Load:
    name: str
    streams: int
    tokens: int  # per call
    tokens_per_second: float  # the synthetic backend's pace per stream (0: as fast as read)
    unit: str  # what the CPU is divided by: "message", "token" or "call"


LOADS = (
    Load("one token per message, 1 stream", 1, 2000, 1000.0, "message"),
    Load("as fast as read, 16 streams", 16, 4000, 0.0, "token"),
    Load("calls of 1 token, 16 streams", 16, 1, 0.0, "call"),
)
SHAPES = {
    "five services": [],
    "fused": ["rag", "assemble", "post"],
    "one process": ["rag", "assemble", "post", "inference"],
}


def cpu_seconds(run: localrun.LocalRun) -> dict[str, float]:
    out = {}
    for stage, proc in run.stages.items():
        times = psutil.Process(proc.pid).cpu_times()
        out[stage] = times.user + times.system
    return out


async def for_seconds(fn: Callable[[], Awaitable[StreamResult]], streams: int, seconds: float) -> list[StreamResult]:
    """Closed-loop calls on `streams` streams until `seconds` have passed."""
    end = time.perf_counter() + seconds
    results: list[StreamResult] = []

    async def worker() -> None:
        while time.perf_counter() < end:
            results.append(await fn())

    await asyncio.gather(*(worker() for _ in range(streams)))
    return results


def flames(run: localrun.LocalRun, folder: Path, slug: str, seconds: float) -> list[subprocess.Popen[bytes]]:
    """py-spy on every stage process for `seconds` (it samples without stopping them)."""
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    procs = []
    for stage, proc in run.stages.items():
        for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            args = ["record", "--pid", str(proc.pid), "--duration", str(int(seconds)), "--rate", "250"]
            args += ["--nonblocking", "--format", fmt, "--output", str(folder / f"{slug}-{stage}.{suffix}")]
            procs.append(subprocess.Popen([py_spy, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def top_functions(raw: Path, n: int = 8) -> list[tuple[str, float]]:
    """The functions holding the most samples (self time), from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        own[stack.split(";")[-1]] += int(count)
        total += int(count)
    return [(frame, count / total) for frame, count in own.most_common(n)] if total else []


def doc_for(load: Load, fuse: list[str]) -> dict[str, Any]:
    doc = pipeline_doc("bench-profile", tokens_per_second=load.tokens_per_second, max_new_tokens=load.tokens)
    if fuse:
        doc["spec"]["fuse"] = fuse
    return doc


async def measure(load: Load, fuse: list[str], seconds: float, flame_dir: Path | None) -> dict[str, float]:
    """CPU µs per unit of `load` for each stage process of the pipeline."""
    with running(doc_for(load, fuse)) as run:
        async with channel(run.gateway) as gw:
            gateway = gateway_pb2_grpc.GatewayStub(gw)
            await for_seconds(lambda: gateway_stream(gateway, min(load.tokens, 8)), 4, 1.0)  # warm up

            def call() -> Awaitable[StreamResult]:
                return gateway_stream(gateway, load.tokens)

            before = cpu_seconds(run)
            start = time.perf_counter()
            results = await for_seconds(call, load.streams, seconds)
            wall = time.perf_counter() - start
            used = {s: cpu_seconds(run)[s] - before[s] for s in before}
            tokens, messages = sum(r.tokens for r in results), sum(r.messages for r in results)
            per = {"message": tokens, "token": tokens, "call": len(results)}[load.unit]
            rate = f"{tokens:,} tokens in {wall:.1f} s ({tokens / wall:,.0f} tokens/s)"
            print(f"   {len(results)} calls, {rate}, {tokens / max(1, messages):.1f} tokens per message at the client")
            if load.unit == "message" and tokens > 1.05 * messages:
                print("   (not every token went alone: the figures are per token, not per message)")
            if flame_dir is not None:
                flame_dir.mkdir(parents=True, exist_ok=True)
                slug = f"{load.name}-{'fused' if fuse else 'five'}".replace(", ", "-").replace(" ", "-")
                spies = flames(run, flame_dir, slug, min(seconds, 10))
                await for_seconds(call, load.streams, min(seconds, 10) + 1)
                for spy in spies:
                    spy.wait(30)
                for stage in run.stages:
                    raw = flame_dir / f"{slug}-{stage}.txt"
                    if raw.exists():
                        tops = ", ".join(f"{f.split(' (')[0]} {share:.0%}" for f, share in top_functions(raw, 4))
                        print(f"   {stage:>9} top self: {tops}")
            return {s: used[s] / per * 1e6 for s in used}


async def main(seconds: float, flame_dir: Path | None, shapes: dict[str, list[str]]) -> None:
    stages = ("stream", "rag", "assemble", "post", "inference")
    print(f"CPU µs per unit, from each stage process's CPU time (all threads); {seconds:.0f} s per load")
    for load in LOADS:
        print(f"\n-- {load.name}: CPU µs per {load.unit}")
        rows = {shape: await measure(load, fuse, seconds, flame_dir) for shape, fuse in shapes.items()}
        print(f"{'':16}" + "".join(f"{s:>11}" for s in stages) + f"{'all':>11}")
        for shape, per in rows.items():
            cells = "".join(f"{per[s]:11.1f}" if s in per else f"{'(fused)':>11}" for s in stages)
            print(f"{shape:16}{cells}{sum(per.values()):11.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per measurement")
    parser.add_argument("--flames", type=Path, help="record py-spy flame graphs into this folder")
    parser.add_argument("--five-only", action="store_true", help="leave the fused pipeline out (code before it)")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.flames, {"five services": []} if args.five_only else SHAPES))
