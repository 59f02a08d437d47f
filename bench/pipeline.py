"""promptpipe data-path benchmark. Run: make bench  (or python -m bench.pipeline [--quick] [SECTION...])

Prints, from one run, side by side:
  1. TTFT of the synthetic backend alone, the inference stage alone, and the whole
     pipeline, five services, fused (`spec.fuse`: two processes) and fused whole (one process),
     at 1 and 64 concurrent streams (p50/p99), and the TTFT they add over the backend;
  2. the most tokens/s the pipeline passes end to end (five services and fused) vs the
     inference stage alone;
  3. a surge at 10x capacity for 30 s from ghz (built from its Go module, cached): refusal
     latency, accepted TTFT vs unloaded, memory, statuses of every call;
  4. the embedded SmolLM2 model through the pipeline (as the quickstart, without PII
     redaction, and fused) vs llama.cpp called directly.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.harness import (
    StreamResult,
    as_post,
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


FUSED = ["rag", "assemble", "post"]
# False with --five-only: the fused pipeline is left out (to run this benchmark on code before spec.fuse).
WITH_FUSED = True


def fused_doc(name: str, **kwargs: Any) -> dict[str, Any]:
    """`pipeline_doc` with rag and assemble in the gateway's process and post in inference's."""
    doc = pipeline_doc(name, **kwargs)
    doc["spec"]["fuse"] = FUSED
    return doc


async def ttft_section(samples: int) -> None:
    print("\n== 1. time to first token (synthetic backend, 8 tokens per call) ==")
    direct = [(await backend_alone(8))[0] for _ in range(samples)]
    print(f"{'':30}{'p50':>11}{'p99':>11}   added over backend p50 / p99")
    base50, base99 = pct(direct, 50), pct(direct, 99)
    print(f"{'backend alone (in-process)':30}{ms(base50)}{ms(base99)}")
    rows: dict[tuple[str, int], list[float]] = {}
    whole = fused_doc("bench-one")
    whole["spec"]["fuse"] = [*FUSED, "inference"]
    shapes = [
        ("pipeline", pipeline_doc("bench-ttft")),
        ("pipeline, fused", fused_doc("bench-fused")),
        ("one process", whole),
    ]
    for label, doc in shapes[: 3 if WITH_FUSED else 1]:
        with running(doc) as run:
            # The inference stage alone is measured on the five-service run (fused whole, it has no process).
            inference = run.stages.get("inference", run.stages["stream"])
            async with channel(run.gateway) as gw, channel(f"127.0.0.1:{inference.port}") as inf:
                gateway = gateway_pb2_grpc.GatewayStub(gw)
                stage = stage_pb2_grpc.StageStub(inf)
                post = as_post(run)
                for _ in range(50):  # warm up channels and code paths
                    await gateway_stream(gateway, 8)
                for conc in (1, 64):
                    total = samples if conc == 1 else samples * 4
                    if label == "pipeline":  # inference alone: its process serves inference's own Run
                        s = await closed_loop(lambda: stage_stream(stage, 8, post), conc, total)
                        rows[("inference stage", conc)] = [r.ttft for r in s if r.ttft is not None]
                    g = await closed_loop(lambda: gateway_stream(gateway, 8), conc, total)
                    rows[(label, conc)] = [r.ttft for r in g if r.ttft is not None]
    for conc in (1, 64):
        for label in ("inference stage", "pipeline", "pipeline, fused", "one process"):
            if (label, conc) not in rows:
                continue
            t = rows[(label, conc)]
            p50, p99 = pct(t, 50), pct(t, 99)
            print(f"{label + f', {conc:>2} streams':30}{ms(p50)}{ms(p99)}   {ms(p50 - base50)} / {ms(p99 - base99)}")


async def throughput_section(seconds: float) -> None:
    print("\n== 2. tokens/s end to end (synthetic backend as fast as read) ==")
    tokens_per_call = 4000
    _, n = await backend_alone(200_000)
    t0 = time.perf_counter()
    await backend_alone(200_000)
    backend_rate = n / (time.perf_counter() - t0)
    print(f"{'backend alone (in-process)':38}{backend_rate:12,.0f} tokens/s")
    rates = {}
    shapes = [("pipeline (5 stages)", pipeline_doc("bench-tput")), ("pipeline, fused", fused_doc("bench-tf"))]
    for label, doc in shapes[: 2 if WITH_FUSED else 1]:
        with running(doc) as run:
            async with channel(run.gateway) as gw, channel(f"127.0.0.1:{run.stages['inference'].port}") as inf:
                gateway = gateway_pb2_grpc.GatewayStub(gw)
                stage = stage_pb2_grpc.StageStub(inf)
                post = as_post(run)
                calls = [(label, lambda: gateway_stream(gateway, tokens_per_call))]
                if label == "pipeline (5 stages)":
                    calls.insert(0, ("inference stage alone", lambda: stage_stream(stage, tokens_per_call, post)))
                for name, fn in calls:
                    for conc in (1, 16):
                        start = time.perf_counter()
                        res = await closed_loop(fn, conc, max(conc, int(seconds * conc / 2)))
                        rate = sum(r.tokens for r in res) / (time.perf_counter() - start)
                        rates[(name, conc)] = rate
                        print(f"{name + f', {conc:>2} streams':38}{rate:12,.0f} tokens/s")
    for name in ("pipeline (5 stages)", "pipeline, fused")[: 2 if WITH_FUSED else 1]:
        for conc in (1, 16):
            ratio = rates[(name, conc)] / rates[("inference stage alone", conc)]
            print(f"{name} / inference stage alone, {conc:>2} streams: {ratio:.2f}")


def ghz_surge(target: str, rate: float, seconds: float, max_new: int) -> list[dict[str, Any]]:
    """`rate` calls/s for `seconds` from ghz (Go: a client that is not the bottleneck), each call waited
    for to its end; every call's status and latency."""
    from tests.devcluster.build import ensure_ghz

    args = [
        str(ensure_ghz()),
        "--insecure",
        "--proto", str(ROOT / "protos" / "promptpipe" / "v1" / "gateway.proto"),
        "--import-paths", str(ROOT / "protos"),
        "--call", "promptpipe.v1.Gateway.Generate",
        "-d", json.dumps({"prompt": "bench", "parameters": {"max_new_tokens": max_new}}),
        "--rps", str(int(rate)), "--async", "-z", f"{seconds:.0f}s", "--duration-stop", "wait",
        "-t", "10s", "--connections", "8", "-c", "64", "--cpus", "1",
        "-O", "json", target,
    ]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    details: list[dict[str, Any]] = json.loads(out.stdout)["details"]
    return details


async def surge_section(seconds: float) -> None:
    for fuse in ([], FUSED)[: 2 if WITH_FUSED else 1]:
        await _surge(seconds, fuse)


async def _surge(seconds: float, fuse: list[str]) -> None:
    shape = "fused" if fuse else "five services"
    print(f"\n== 3. surge at 10x capacity for {seconds:.0f} s (ghz), {shape} ==")
    # Capacity: the gateway runs 8 calls and queues 2; each call streams 50 tokens at 250 tokens/s (0.2 s).
    # A short queue bounds what admitted calls can wait (here about 2/8 of a call's time).
    admission = {"queue": {"capacity": 2, "concurrency": 8, "shedPolicy": "reject-new"}}
    wide = {"queue": {"capacity": 64, "concurrency": 64}}
    stages = {"stream": admission, "rag": wide, "assemble": wide, "inference": wide, "post": wide}
    doc = pipeline_doc("bench-surge", tokens_per_second=250, max_new_tokens=50, stages=stages)
    if fuse:
        doc["spec"]["fuse"] = fuse
    with running(doc) as run:
        async with channel(run.gateway) as gw:
            gateway = gateway_pb2_grpc.GatewayStub(gw)
            await closed_loop(lambda: gateway_stream(gateway, 50), 8, 40)  # warm up
            start = time.perf_counter()
            unloaded = await closed_loop(lambda: gateway_stream(gateway, 50), 8, 80)
            capacity_rps = len(unloaded) / (time.perf_counter() - start)
            t_unloaded = [r.ttft for r in unloaded if r.ttft is not None]
            rate = 10 * capacity_rps
            print(f"capacity {capacity_rps:.1f} calls/s (8 running, 2 queued); surge arrivals {rate:.0f} calls/s")
            rss_before = rss_mib(run)
            surge = asyncio.create_task(asyncio.to_thread(ghz_surge, run.gateway, rate, seconds, 50))
            # A probe among the surge: a call every 50 ms, its TTFT when admitted.
            probes: list[asyncio.Task[StreamResult]] = []
            rss_peak = rss_before
            while not surge.done():
                probes.append(asyncio.create_task(gateway_stream(gateway, 50, timeout=10)))
                await asyncio.sleep(0.05)
                if len(probes) % 20 == 0:
                    rss_peak = max(rss_peak, rss_mib(run))
            details = await surge
            probed = await asyncio.gather(*probes)
            rss_after = rss_mib(run)
    by_status = collections.Counter(d["status"] for d in details)
    refused = [d["latency"] / 1e9 for d in details if d["status"] == "ResourceExhausted"]
    accepted = [r.ttft for r in probed if r.code is grpc.StatusCode.OK and r.ttft is not None]
    print(f"calls {len(details)} by status: {dict(by_status)}; none unended (ghz waited for every call)")
    print(f"refusal answered in: p50 {ms(pct(refused, 50))}  p99 {ms(pct(refused, 99))}")
    print(
        f"accepted TTFT p99 (probe, {len(accepted)} of {len(probed)} admitted): {ms(pct(accepted, 99))} "
        f"vs unloaded p99 {ms(pct(t_unloaded, 99))} (ratio {pct(accepted, 99) / pct(t_unloaded, 99):.2f})"
    )
    print(f"stage processes RSS: before {rss_before:.0f} MiB, peak {rss_peak:.0f} MiB, after {rss_after:.0f} MiB")


async def _model_calls(path: Path, question: str, max_new: int, samples: int) -> tuple[list[float], list[float], int]:
    """TTFTs and tokens/s of `samples` + 1 greedy calls through the pipeline in `path`; its prompt's tokens."""
    from promptpipe.client import PipelineClient

    ttfts, rates, prompt_tokens = [], [], 0
    with running(path) as run:
        async with PipelineClient(run.gateway) as client:
            for _ in range(samples + 1):
                start = time.perf_counter()
                first = None
                n = 0
                async for r in client.generate(question, temperature=0.0, max_new_tokens=max_new):
                    if r.HasField("chunk"):
                        first = first or time.perf_counter()
                        n += r.chunk.token_count
                    else:
                        prompt_tokens = r.summary.usage.prompt_tokens
                assert first is not None
                ttfts.append(first - start)
                rates.append((n - 1) / (time.perf_counter() - first))
    return ttfts, rates, prompt_tokens


async def _assembled_prompt(path: Path, question: str, max_new: int) -> str:
    """The prompt the quickstart's rag and assemble stages hand to inference."""
    from promptpipe.contract.pipeline_file import load_pipeline
    from promptpipe.gateway.requests import work_item
    from promptpipe.runtime.calls import StageClient
    from promptpipe.v1 import common_pb2, gateway_pb2

    spec = load_pipeline(path).spec
    item = work_item(
        gateway_pb2.GenerateRequest(
            prompt=question, parameters=common_pb2.GenerationParameters(temperature=0.0, max_new_tokens=max_new)
        ),
        spec.generation,
        "b",
    )
    with running(path) as run:
        for stage in (StageName.RAG, StageName.ASSEMBLE):
            c = StageClient(f"127.0.0.1:{run.stages[stage.value].port}", spec.stages.rag.retries)
            item = await c.process(item, time.monotonic() + 30)
            await c.close()
    return item.prompt


def _quickstart_variant(folder: Path, name: str, *, redact: bool = True, fuse: list[str] | None = None) -> Path:
    """The quickstart, with post's PII redaction off (its stop sequence stays) or stages fused; the corpus
    path made absolute."""
    quickstart = ROOT / "deploy" / "examples" / "quickstart.yaml"
    doc = yaml.safe_load(quickstart.read_text())
    doc["spec"]["rag"]["corpus"]["path"] = str(quickstart.parent / doc["spec"]["rag"]["corpus"]["path"])
    if not redact:
        doc["spec"]["post"]["redact"] = {"email": False, "phone": False, "card": False, "iban": False}
    if fuse:
        doc["spec"]["fuse"] = fuse
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def model_section(samples: int) -> None:
    print("\n== 4. embedded SmolLM2-135M: pipeline vs llama.cpp directly ==")
    from llama_cpp import Llama

    from promptpipe.backends.llamacpp import default_model_path

    question = "What does the inference stage do?"
    max_new = 64
    quickstart = ROOT / "deploy" / "examples" / "quickstart.yaml"
    prompt = await _assembled_prompt(quickstart, question, max_new)
    llm = Llama(str(default_model_path()), n_ctx=2048, verbose=False)
    direct_ttft, direct_rate = [], []
    for _ in range(samples + 1):
        start = time.perf_counter()
        first = None
        n = 0
        for _chunk in llm.create_completion(
            prompt, max_tokens=max_new, temperature=0.0, top_k=40, top_p=0.95, stream=True
        ):
            first = first or time.perf_counter()
            n += 1
        assert first is not None
        direct_ttft.append(first - start)
        direct_rate.append((n - 2) / (time.perf_counter() - first))
    del llm
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = {
            "pipeline (quickstart)": await _model_calls(quickstart, question, max_new, samples),
            "pipeline, no redaction": await _model_calls(
                _quickstart_variant(folder, "plain", redact=False), question, max_new, samples
            ),
        }
        if WITH_FUSED:
            fused = _quickstart_variant(folder, "fused", redact=False, fuse=FUSED)
            runs["fused, no redaction"] = await _model_calls(fused, question, max_new, samples)
    # The first call of each pays for cold caches; medians of the rest.
    print(f"prompt tokens {runs['pipeline (quickstart)'][2]}, {max_new} new tokens, greedy, {samples} calls each")
    print(f"{'':24}{'TTFT p50':>12}{'tokens/s p50':>15}{'TTFT added':>14}{'tokens/s ratio':>16}")
    d_ttft, d_rate = median(direct_ttft[1:]), median(direct_rate[1:])
    print(f"{'llama.cpp directly':24}{ms(d_ttft)}{d_rate:15.1f}")
    for label, (ttfts, rates, _) in runs.items():
        p_ttft, p_rate = median(ttfts[1:]), median(rates[1:])
        print(f"{label:24}{ms(p_ttft)}{p_rate:15.1f}  {ms(p_ttft - d_ttft)}{p_rate / d_rate:16.2f}")
    print("(PII redaction holds each word until the next token shows it is not the start of an address.)")


SECTIONS = ("ttft", "throughput", "surge", "model")


async def main(quick: bool, sections: list[str]) -> None:
    import os

    print(f"promptpipe data-path benchmark on {os.cpu_count()} cores{' (quick)' if quick else ''}")
    if "ttft" in sections:
        await ttft_section(100 if quick else 400)
    if "throughput" in sections:
        await throughput_section(2 if quick else 6)
    if "surge" in sections:
        await surge_section(5 if quick else 30)
    if "model" in sections:
        await model_section(2 if quick else 5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run, to check the benchmark works")
    parser.add_argument("--five-only", action="store_true", help="leave the fused pipeline out (code before it)")
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"which to run: {', '.join(SECTIONS)} (all)")
    args = parser.parse_args()
    if unknown := set(args.sections) - set(SECTIONS):
        parser.error(f"no section {', '.join(sorted(unknown))}; the sections are {', '.join(SECTIONS)}")
    WITH_FUSED = not args.five_only
    asyncio.run(main(args.quick, args.sections or list(SECTIONS)))
