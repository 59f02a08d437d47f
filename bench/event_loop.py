"""uvloop or the standard event loop, side by side in one run: the stage processes' loop and the client's.

    python -m bench.event_loop [--rounds 3] [--seconds 6]

Each round measures, for each configuration (stages' loop / client's loop), on the five-service pipeline
with the synthetic backend as fast as read: tokens/s end to end at 16 streams and the inference stage
alone at 16 streams, and TTFT at 1 stream (8 tokens a call) p50/p99. Configurations alternate within a
round, so a noisy minute hurts them alike; the table gives each figure's median over the rounds and its
ratio to asyncio/asyncio. Each configuration runs in a process of its own (its client on its loop).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = (("asyncio", "asyncio"), ("uvloop", "asyncio"), ("uvloop", "uvloop"))
FIGURES = ("pipeline tok/s", "inference tok/s", "TTFT p50 ms", "TTFT p99 ms")


async def _measure(seconds: float) -> dict[str, float]:
    from bench.harness import path_figures, pipeline_doc

    return await path_figures(pipeline_doc("bench-loop"), seconds)


def _side(stages: str, client: str, seconds: float) -> dict[str, float]:
    env = {**os.environ, "PROMPTPIPE_EVENT_LOOP": stages, "BENCH_CLIENT_LOOP": client}
    args = [sys.executable, "-m", "bench.event_loop", "--measure", "--seconds", str(seconds)]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="about how long each throughput run takes")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        from promptpipe import event_loop

        print(json.dumps(event_loop.run(_measure(args.seconds), os.environ["BENCH_CLIENT_LOOP"])))
        return
    from bench.harness import medians_of_alternating_rounds

    medians = medians_of_alternating_rounds(
        args.rounds, CONFIGS, lambda c: _side(*c, args.seconds), lambda c: f"stages {c[0]}, client {c[1]}"
    )
    base = medians[CONFIGS[0]]
    print(f"\nmedians of {args.rounds} rounds (ratio to asyncio/asyncio)")
    print(f"{'stages / client':22}" + "".join(f"{f:>24}" for f in FIGURES))
    for config in CONFIGS:
        cells = "".join(f"{medians[config][f]:>14,.1f} ({medians[config][f] / base[f]:.2f}×)" for f in FIGURES)
        print(f"{config[0] + ' / ' + config[1]:22}{cells}")


if __name__ == "__main__":
    main()
