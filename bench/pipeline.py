"""promptpipe data-path benchmark. Run: make bench  (or python -m bench.pipeline [--quick])

Prints, from one run, side by side:
  1. TTFT of the synthetic backend alone, the inference stage alone, and the whole
     five-stage pipeline, at 1 and 64 concurrent streams (p50/p99), and the TTFT the
     pipeline adds over the backend;
  2. the most tokens/s the pipeline passes end to end vs the inference stage alone;
  3. a surge at 10x capacity for 30 s: rejection latency, accepted TTFT vs unloaded,
     memory, calls that never ended;
  4. the embedded SmolLM2 model through the pipeline vs llama.cpp called directly.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import grpc

from bench.harness import (
    channel,
    closed_loop,
    gateway_stream,
    median,
    ms,
    pct,
    pipeline_doc,
    rss_mib,
    running,
    stage_stream,
)
from promptpipe.backends.base import GenerationRequest, Piece
from promptpipe.backends.synthetic import SyntheticBackend
from promptpipe.contract.spec import StageName, SyntheticSpec
from promptpipe.v1 import gateway_pb2_grpc, stage_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


async def backend_alone(max_new: int) -> tuple[float, int]:
    backend = SyntheticBackend(SyntheticSpec())
    req = GenerationRequest("bench", max_new, 0.0, 1.0, 0, None, "b", time.monotonic() + 60)
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async for out in backend.generate(req):
        if isinstance(out, Piece):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            tokens += 1
    assert ttft is not None
    return ttft, tokens


async def ttft_section(samples: int) -> None:
    print("\n== 1. time to first token (synthetic backend, 8 tokens per call) ==")
    direct = [(await backend_alone(8))[0] for _ in range(samples)]
    with running(pipeline_doc("bench-ttft")) as run:
        async with channel(run.gateway) as gw, channel(f"127.0.0.1:{run.stages['inference'].port}") as inf:
            gateway = gateway_pb2_grpc.GatewayStub(gw)
            stage = stage_pb2_grpc.StageStub(inf)
            for _ in range(50):  # warm up channels and code paths
                await gateway_stream(gateway, 8)
            print(f"{'':28}{'p50':>11}{'p99':>11}   added over backend p50 / p99")
            base50, base99 = pct(direct, 50), pct(direct, 99)
            print(f"{'backend alone (in-process)':28}{ms(base50)}{ms(base99)}")
            for conc in (1, 64):
                total = samples if conc == 1 else samples * 4
                s = await closed_loop(lambda: stage_stream(stage, 8), conc, total)
                g = await closed_loop(lambda: gateway_stream(gateway, 8), conc, total)
                for label, res in (
                    (f"inference stage, {conc:>2} streams", s),
                    (f"pipeline,        {conc:>2} streams", g),
                ):
                    t = [r.ttft for r in res if r.ttft is not None]
                    p50, p99 = pct(t, 50), pct(t, 99)
                    print(f"{label:28}{ms(p50)}{ms(p99)}   {ms(p50 - base50)} / {ms(p99 - base99)}")


async def throughput_section(seconds: float) -> None:
    print("\n== 2. tokens/s end to end (synthetic backend as fast as read) ==")
    tokens_per_call = 4000
    with running(pipeline_doc("bench-tput")) as run:
        async with channel(run.gateway) as gw, channel(f"127.0.0.1:{run.stages['inference'].port}") as inf:
            gateway = gateway_pb2_grpc.GatewayStub(gw)
            stage = stage_pb2_grpc.StageStub(inf)
            _, n = await backend_alone(200_000)
            t0 = time.perf_counter()
            await backend_alone(200_000)
            backend_rate = n / (time.perf_counter() - t0)
            print(f"{'backend alone (in-process)':34}{backend_rate:12,.0f} tokens/s")
            rates = {}
            for label, fn in (
                ("inference stage alone", lambda: stage_stream(stage, tokens_per_call)),
                ("pipeline (5 stages)", lambda: gateway_stream(gateway, tokens_per_call)),
            ):
                for conc in (1, 16):
                    start = time.perf_counter()
                    res = await closed_loop(fn, conc, max(conc, int(seconds * conc / 2)))
                    rate = sum(r.tokens for r in res) / (time.perf_counter() - start)
                    rates[(label, conc)] = rate
                    print(f"{label + f', {conc:>2} streams':34}{rate:12,.0f} tokens/s")
            for conc in (1, 16):
                ratio = rates[("pipeline (5 stages)", conc)] / rates[("inference stage alone", conc)]
                print(f"pipeline / inference stage alone, {conc:>2} streams: {ratio:.2f}")


async def surge_section(seconds: float) -> None:
    print(f"\n== 3. surge at 10x capacity for {seconds:.0f} s ==")
    # Capacity: the gateway runs 8 calls and queues 2; each call streams 50 tokens at 250 tokens/s (0.2 s).
    # A short queue bounds what admitted calls can wait (here about 2/8 of a call's time).
    admission = {"queue": {"capacity": 2, "concurrency": 8, "shedPolicy": "reject-new"}}
    wide = {"queue": {"capacity": 64, "concurrency": 64}}
    stages = {"stream": admission, "rag": wide, "assemble": wide, "inference": wide, "post": wide}
    with running(pipeline_doc("bench-surge", tokens_per_second=250, max_new_tokens=50, stages=stages)) as run:
        async with channel(run.gateway) as gw:
            gateway = gateway_pb2_grpc.GatewayStub(gw)
            unloaded = await closed_loop(lambda: gateway_stream(gateway, 50), 8, 80)
            t_unloaded = [r.ttft for r in unloaded if r.ttft is not None]
            start = time.perf_counter()
            capacity_rps = len(await closed_loop(lambda: gateway_stream(gateway, 50), 8, 80)) / (
                time.perf_counter() - start
            )
            rate = 10 * capacity_rps
            print(f"capacity {capacity_rps:.1f} calls/s (8 running, 2 queued); surge arrivals {rate:.0f} calls/s")
            rss_before = rss_mib(run)
            rss_peak = rss_before
            tasks: list[asyncio.Task[object]] = []
            rng = random.Random(7)
            end = time.perf_counter() + seconds
            next_at = time.perf_counter()
            while time.perf_counter() < end:
                next_at += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                tasks.append(asyncio.create_task(gateway_stream(gateway, 50, timeout=10)))
                if len(tasks) % 500 == 0:
                    rss_peak = max(rss_peak, rss_mib(run))
            done, pending = await asyncio.wait(tasks, timeout=30)
            results = [t.result() for t in done]
            rss_after = rss_mib(run)
    ok = [r for r in results if r.code is grpc.StatusCode.OK]
    shed = [r for r in results if r.code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    other = [r for r in results if r.code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)]
    rejected_latency = [r.seconds for r in shed]
    accepted_ttft = [r.ttft for r in ok if r.ttft is not None]
    print(
        f"calls {len(tasks)}: accepted {len(ok)}, rejected {len(shed)}, other status {len(other)}, "
        f"never ended {len(pending)}"
    )
    print(f"rejection answered in: p50 {ms(pct(rejected_latency, 50))}  p99 {ms(pct(rejected_latency, 99))}")
    print(
        f"accepted TTFT p99: {ms(pct(accepted_ttft, 99))} vs unloaded p99 {ms(pct(t_unloaded, 99))} "
        f"(ratio {pct(accepted_ttft, 99) / pct(t_unloaded, 99):.2f})"
    )
    print(f"stage processes RSS: before {rss_before:.0f} MiB, peak {rss_peak:.0f} MiB, after {rss_after:.0f} MiB")


async def model_section(samples: int) -> None:
    print("\n== 4. embedded SmolLM2-135M: pipeline vs llama.cpp directly ==")
    from llama_cpp import Llama

    from promptpipe.backends.llamacpp import default_model_path
    from promptpipe.client import PipelineClient

    question = "What does the inference stage do?"
    max_new = 64
    with running(ROOT / "deploy" / "examples" / "quickstart.yaml") as run:
        pipe_ttft, pipe_rate, prompts = [], [], []
        async with PipelineClient(run.gateway) as client:
            for _ in range(samples + 1):
                start = time.perf_counter()
                first = None
                n = 0
                summary = None
                async for r in client.generate(question, temperature=0.0, max_new_tokens=max_new):
                    if r.HasField("chunk"):
                        first = first or time.perf_counter()
                        n += r.chunk.token_count
                    else:
                        summary = r.summary
                assert first is not None and summary is not None
                pipe_ttft.append(first - start)
                pipe_rate.append((n - 1) / (time.perf_counter() - first))
                prompts.append(summary.usage.prompt_tokens)
        # Same prompt for llama.cpp directly, taken from the assemble stage.
        from promptpipe.contract.pipeline_file import load_pipeline
        from promptpipe.runtime.calls import StageClient
        from promptpipe.stages.requests import work_item
        from promptpipe.v1 import common_pb2, gateway_pb2

        spec = load_pipeline(ROOT / "deploy" / "examples" / "quickstart.yaml").spec
        item = work_item(
            gateway_pb2.GenerateRequest(
                prompt=question, parameters=common_pb2.GenerationParameters(temperature=0.0, max_new_tokens=max_new)
            ),
            spec.generation,
            "b",
        )
        for stage in (StageName.RAG, StageName.ASSEMBLE):
            c = StageClient(f"127.0.0.1:{run.stages[stage.value].port}", spec.stages.rag.retries)
            item = await c.process(item, time.monotonic() + 30)
            await c.close()
    llm = Llama(str(default_model_path()), n_ctx=2048, verbose=False)
    direct_ttft, direct_rate = [], []
    for _ in range(samples + 1):
        start = time.perf_counter()
        first = None
        n = 0
        for _chunk in llm.create_completion(
            item.prompt, max_tokens=max_new, temperature=0.0, top_k=40, top_p=0.95, stream=True
        ):
            first = first or time.perf_counter()
            n += 1
        assert first is not None
        direct_ttft.append(first - start)
        direct_rate.append((n - 2) / (time.perf_counter() - first))
    # The first call of each pays for cold caches; medians of the rest.
    print(f"prompt tokens {prompts[-1]}, {max_new} new tokens, greedy, {samples} calls each")
    print(f"{'':24}{'TTFT p50':>12}{'tokens/s p50':>15}")
    print(f"{'llama.cpp directly':24}{ms(median(direct_ttft[1:]))}{median(direct_rate[1:]):15.1f}")
    print(f"{'pipeline (5 stages)':24}{ms(median(pipe_ttft[1:]))}{median(pipe_rate[1:]):15.1f}")
    print(
        f"ratio pipeline/direct: TTFT {median(pipe_ttft[1:]) / median(direct_ttft[1:]):.2f}, "
        f"tokens/s {median(pipe_rate[1:]) / median(direct_rate[1:]):.2f}"
    )


async def main(quick: bool) -> None:
    import os

    print(f"promptpipe data-path benchmark on {os.cpu_count()} cores{' (quick)' if quick else ''}")
    await ttft_section(100 if quick else 400)
    await throughput_section(2 if quick else 6)
    await surge_section(5 if quick else 30)
    await model_section(2 if quick else 5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run, to check the benchmark works")
    asyncio.run(main(parser.parse_args().quick))
