"""Tokens batched at the source (spec.batching) against every token alone, side by side in one run.

    python -m bench.batching [--rounds 3] [--seconds 6]

For each setting (interval ms / max tokens; 0/0 is every token alone), on the five-service pipeline with the
synthetic backend: tokens/s end to end and of the inference stage alone at 16 streams as fast as read, and
their ratio; TTFT at 1 stream (8 tokens a call) p50/p99; the gaps between the messages of 1 stream
from a backend pacing 1,000 tokens/s (its inter-token latency as a client sees it) p50/p99; and with 32
streams each paced at 250 tokens/s, as an engine decodes (no backlog for coalescing to merge), the CPU
time all stage processes spend per token and the messages per token the client receives. Settings
alternate within each round; the table gives medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.harness import (
    channel,
    gaps_of_stream,
    gateway_stream,
    medians_of_alternating_rounds,
    path_figures,
    pct,
    pipeline_doc,
    running,
)
from bench.profile import cpu_seconds, for_seconds
from promptpipe.v1 import gateway_pb2_grpc

SETTINGS = ((0.0, 0), (5.0, 32), (10.0, 64), (20.0, 64))
FIGURES = (
    "pipeline tok/s",
    "inference tok/s",
    "ratio",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "paced CPU µs/tok",
    "paced msg/tok",
)


def doc(name: str, interval: float, max_tokens: int, **kwargs: Any) -> dict[str, Any]:
    d = pipeline_doc(name, **kwargs)
    d["spec"]["batching"] = {"intervalMilliseconds": interval, "maxTokens": max_tokens}
    return d


async def measure(interval: float, max_tokens: int, seconds: float) -> dict[str, float]:
    out = await path_figures(doc("bench-batch", interval, max_tokens), seconds)
    out["ratio"] = out["pipeline tok/s"] / out["inference tok/s"]
    with running(doc("bench-itl", interval, max_tokens, tokens_per_second=1000)) as run:
        async with channel(run.gateway) as gw:
            gateway = gateway_pb2_grpc.GatewayStub(gw)
            gaps = [g for _ in range(20) for g in await gaps_of_stream(gateway, 200)]
    out["ITL p50 ms"], out["ITL p99 ms"] = pct(gaps, 50) * 1000, pct(gaps, 99) * 1000
    with running(doc("bench-paced", interval, max_tokens, tokens_per_second=250)) as run:
        async with channel(run.gateway) as gw:
            gateway = gateway_pb2_grpc.GatewayStub(gw)
            await for_seconds(lambda: gateway_stream(gateway, 100), 32, 1.0)  # warm up
            before = sum(cpu_seconds(run).values())
            results = await for_seconds(lambda: gateway_stream(gateway, 100), 32, seconds)
            cpu = sum(cpu_seconds(run).values()) - before
    tokens = sum(r.tokens for r in results)
    out["paced CPU µs/tok"] = cpu / tokens * 1e6
    out["paced msg/tok"] = sum(r.messages for r in results) / tokens
    return out


def main(rounds: int, seconds: float) -> None:
    medians = medians_of_alternating_rounds(
        rounds, SETTINGS, lambda s: asyncio.run(measure(*s, seconds)), lambda s: f"{s[0]:g} ms / {s[1]} tokens"
    )
    print(f"\nmedians of {rounds} rounds")
    print(f"{'interval / max tokens':24}" + "".join(f"{f:>17}" for f in FIGURES))
    for setting in SETTINGS:
        print(f"{f'{setting[0]:g} ms / {setting[1]}':24}" + "".join(f"{medians[setting][f]:>17,.2f}" for f in FIGURES))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="about how long each throughput run takes")
    args = parser.parse_args()
    main(args.rounds, args.seconds)
