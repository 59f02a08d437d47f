"""The OpenAI-compatible HTTP API against gRPC, side by side. Run: python -m bench.http [--quick]

One five-stage pipeline on the synthetic backend, called through its gateway both ways, the two
interleaved so both see the same machine:
  1. time to first token at 1 and 64 concurrent streams (p50/p99), and what HTTP adds over gRPC;
  2. tokens/s of long streams at 1 and 8 streams;
  3. the HTTP stacks alone, the choice behind the gateway: one SSE endpoint in aiohttp and in
     Starlette on uvicorn (httptools), each its own process (bench.sse_servers);
  4. what checking an API key adds to a call (a ring of 1000 keys, the key file looked at once a second).
The HTTP client is aiohttp reading the server-sent events as they come (what an SDK does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc

from bench.harness import StreamResult, channel, closed_loop, gateway_stream, ms, pct, pipeline_doc, running
from promptpipe.contract.apikeys import hash_key, new_key
from promptpipe.localproc import free_port
from promptpipe.runtime.apikeys import KeyRing
from promptpipe.v1 import gateway_pb2_grpc
from tests.support.pipelines import serving_process


def chat(max_new: int) -> dict[str, object]:
    return {
        "model": "synthetic",
        "messages": [{"role": "user", "content": "bench"}],
        "max_tokens": max_new,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def http_stream(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> StreamResult:
    """One streamed chat completion; the first token is the first chunk with content, the count is the
    usage's when it comes."""
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            return StreamResult(None, 0, time.perf_counter() - start, grpc.StatusCode.UNKNOWN)
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
    return StreamResult(ttft, tokens, time.perf_counter() - start, grpc.StatusCode.OK)


Call = Callable[[], Awaitable[StreamResult]]


async def side_by_side(
    calls: dict[str, Call], concurrency: int, total: int, rounds: int
) -> dict[str, list[StreamResult]]:
    """Each way in turn, `rounds` times, so drift on the machine falls on both alike."""
    out: dict[str, list[StreamResult]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            out[name] += await closed_loop(call, concurrency, total // rounds)
    return out


async def stacks_section(samples: int) -> None:
    print("\n== 3. the HTTP stacks alone: one SSE endpoint, 8 events (no pipeline behind it) ==")
    ports = {stack: free_port() for stack in ("aiohttp", "starlette")}
    with contextlib.ExitStack() as servers:
        for stack, port in ports.items():
            args = [sys.executable, "-m", "bench.sse_servers", stack, str(port)]
            servers.enter_context(serving_process(args, f"http://127.0.0.1:{port}/health", stack))
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            calls = {
                stack: functools.partial(http_stream, session, f"http://127.0.0.1:{port}/stream", {})
                for stack, port in ports.items()
            }
            for call in calls.values():
                for _ in range(50):
                    await call()
            print(f"{'':26}{'first event p50':>16}{'p99':>11}{'whole p50':>13}")
            for conc in (1, 64):
                total = samples if conc == 1 else samples * 4
                res = await side_by_side(calls, conc, total, rounds=4)
                for stack, results in res.items():
                    first = [r.ttft for r in results if r.ttft is not None]
                    whole = [r.seconds for r in results]
                    label = f"{stack}, {conc:>2} streams"
                    print(f"{label:26}{ms(pct(first, 50))}{ms(pct(first, 99))}   {ms(pct(whole, 50))}")


def auth_section(samples: int) -> None:
    print("\n== 4. the API key check, per call (1000 keys of 100 tenants) ==")
    with tempfile.TemporaryDirectory() as tmp:
        keys = [new_key() for _ in range(1000)]
        path = Path(tmp, "keys.yaml")
        tenants: dict[str, list[str]] = {}
        for i, k in enumerate(keys):
            tenants.setdefault(f"t{i % 100}", []).append(hash_key(k))
        path.write_text("".join(f"{t}: [{', '.join(hs)}]\n" for t, hs in tenants.items()))
        ring = KeyRing(path)
        headers = [f"Bearer {random.choice(keys)}" for _ in range(samples)]
        took = []
        for header in headers:
            start = time.perf_counter()
            ring.tenant_of(header)
            took.append(time.perf_counter() - start)
        p50, p99 = pct(took, 50) * 1e6, pct(took, 99) * 1e6
        print(f"{'tenant_of':22}{p50:8.2f} µs p50 {p99:8.2f} µs p99   (target: at most 100 µs p50)")


async def main(quick: bool) -> None:
    samples = 200 if quick else 1000
    doc = pipeline_doc("bench-http", max_new_tokens=8)
    with running(doc) as run:
        url = run.openai_base_url + "/chat/completions"
        connector = aiohttp.TCPConnector(limit=0)
        async with channel(run.gateway) as gw, aiohttp.ClientSession(connector=connector) as session:
            gateway = gateway_pb2_grpc.GatewayStub(gw)

            def grpc_call(n: int) -> Call:
                return lambda: gateway_stream(gateway, n)

            def http_call(n: int) -> Call:
                return lambda: http_stream(session, url, chat(n))

            for _ in range(50):  # warm both paths: channels, pooled connections, code
                await gateway_stream(gateway, 8)
                await http_stream(session, url, chat(8))

            print("\n== 1. time to first token (synthetic backend, 8 tokens per call) ==")
            print(f"{'':22}{'p50':>11}{'p99':>11}   HTTP added over gRPC p50 / p99")
            for conc in (1, 64):
                total = samples if conc == 1 else samples * 4
                res = await side_by_side({"gRPC": grpc_call(8), "HTTP": http_call(8)}, conc, total, rounds=4)
                ttfts = {k: [r.ttft for r in v if r.ttft is not None] for k, v in res.items()}
                failed = {k: sum(r.code != grpc.StatusCode.OK for r in v) for k, v in res.items()}
                g50, g99 = pct(ttfts["gRPC"], 50), pct(ttfts["gRPC"], 99)
                for way in ("gRPC", "HTTP"):
                    p50, p99 = pct(ttfts[way], 50), pct(ttfts[way], 99)
                    added = f"   {ms(p50 - g50)} / {ms(p99 - g99)}" if way == "HTTP" else ""
                    print(f"{way + f', {conc:>2} streams':22}{ms(p50)}{ms(p99)}{added}  ({failed[way]} failed)")

            print("\n== 2. tokens/s of long streams (2048 tokens per call) ==")
            long = 2048
            for conc in (1, 8):
                rounds = 2 if quick else 4
                res = await side_by_side(
                    {"gRPC": grpc_call(long), "HTTP": http_call(long)}, conc, conc * rounds, rounds
                )
                for way in ("gRPC", "HTTP"):
                    rates = [r.tokens / r.seconds for r in res[way] if r.seconds > 0]
                    tokens = sum(r.tokens for r in res[way]) / max(1, len(res[way]))
                    print(
                        f"{way + f', {conc} streams':22}{pct(rates, 50):10.0f} tok/s per stream (p50)"
                        f"{pct(rates, 50) * conc:10.0f} tok/s in all   ({tokens:.0f} tokens per call)"
                    )
    await stacks_section(samples)
    auth_section(samples * 10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
