"""Benchmark plumbing: start pipelines, drive streams, summarise latencies."""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
import yaml

from promptpipe.cli import localrun
from promptpipe.contract.identity import subject
from promptpipe.contract.runtime_config import load_runtime_config
from promptpipe.contract.spec import StageName
from promptpipe.perf import load
from promptpipe.perf.breakdown import percentile
from promptpipe.rpc import CHANNEL_OPTIONS
from promptpipe.runtime.identity import SignedToken, parse_issuer_keys
from promptpipe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, stage_pb2, stage_pb2_grpc

C = TypeVar("C")


def pipeline_doc(
    name: str, *, tokens_per_second: float = 0.0, max_new_tokens: int = 8, stages: dict[str, Any] | None = None
) -> dict[str, Any]:
    wide = {"queue": {"capacity": 256, "concurrency": 256}}
    return {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "synthetic", "backend": "synthetic", "synthetic": {"tokensPerSecond": tokens_per_second}},
            "generation": {"maxNewTokens": max_new_tokens, "maxNewTokensLimit": 32768},
            "rag": {"enabled": False},
            "stages": stages or dict.fromkeys(("stream", "rag", "assemble", "inference", "post"), wide),
        },
    }


@contextmanager
def running(doc: dict[str, Any] | Path) -> Iterator[localrun.LocalRun]:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PROMPTPIPE_HOME"] = tmp
        if isinstance(doc, Path):
            path = doc
        else:
            path = Path(tmp) / "pipeline.yaml"
            path.write_text(yaml.safe_dump(doc))
        run = localrun.start(path)
        try:
            localrun.wait_serving(run, 120)
            yield run
        finally:
            localrun.stop(run)


def rss_mib(run: localrun.LocalRun) -> float:
    total = 0
    for proc in run.stages.values():
        with contextlib.suppress(psutil.NoSuchProcess):  # exited: it holds nothing
            total += psutil.Process(proc.pid).memory_info().rss
    return total / 2**20


@dataclass
class StreamResult:
    ttft: float | None
    tokens: int
    seconds: float
    code: grpc.StatusCode
    messages: int = 0  # chunk messages received (fewer than tokens when coalesced)


async def gateway_stream(stub: gateway_pb2_grpc.GatewayStub, max_new: int, timeout: float = 60.0) -> StreamResult:
    request = gateway_pb2.GenerateRequest(
        prompt="bench", parameters=common_pb2.GenerationParameters(max_new_tokens=max_new)
    )
    start = time.perf_counter()
    ttft = None
    tokens = messages = 0
    try:
        async for r in stub.Generate(request, timeout=timeout):
            if r.HasField("chunk"):
                if ttft is None:
                    ttft = time.perf_counter() - start
                tokens += r.chunk.token_count
                messages += 1
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        code = err.code()
    return StreamResult(ttft, tokens, time.perf_counter() - start, code, messages)


def as_post(run: localrun.LocalRun) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the post stage's identity token, the one caller the inference stage takes."""
    identity = load_runtime_config(Path(run.folder) / "runtime.yaml").identity
    if identity is None:
        return ()
    keys = parse_issuer_keys(Path(identity.keys_file).read_text())
    account = subject(identity.namespace, identity.accounts[StageName.POST])
    return SignedToken(Path(identity.signing_key_file), keys, identity.audience, account).metadata()


async def stage_stream(
    stub: stage_pb2_grpc.StageStub, max_new: int, metadata: tuple[tuple[str, str], ...] = ()
) -> StreamResult:
    """The inference stage alone: a work item straight to its Run (as post calls it: `as_post`)."""
    item = stage_pb2.WorkItem(
        request_id="b",
        session_id="b",
        prompt="bench",
        parameters=common_pb2.GenerationParameters(max_new_tokens=max_new, temperature=0.0, top_p=1.0),
    )
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async for e in stub.Run(item, timeout=60, metadata=metadata):
        if e.HasField("chunk"):
            if ttft is None:
                ttft = time.perf_counter() - start
            tokens += e.chunk.token_count
    return StreamResult(ttft, tokens, time.perf_counter() - start, grpc.StatusCode.OK)


def channel(target: str, own_connection: bool = False) -> grpc.aio.Channel:
    """A channel to `target`; `own_connection`: not shared with the process's other channels (gRPC's
    default), so several servers behind one address, handed connections, each get some."""
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)] if own_connection else CHANNEL_OPTIONS
    return grpc.aio.insecure_channel(target, options=options)


# The nearest-rank percentile (q in 0-100) that `promptpipe analyze` reports too.
pct = percentile


def ms(v: float) -> str:
    return f"{v * 1000:8.3f} ms"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def closed_loop(fn: Any, concurrency: int, total: int) -> list[StreamResult]:
    """`concurrency` clients issue `total` calls of `fn` back to back (`promptpipe bench`'s closed loop)."""
    results: list[StreamResult] = []
    remaining = total

    async def one() -> bool:
        nonlocal remaining
        if remaining <= 0:
            return False
        remaining -= 1
        results.append(await fn())
        return True

    await load.closed_loop(concurrency, one)
    return results


async def gaps_of_stream(stub: gateway_pb2_grpc.GatewayStub, max_new: int) -> list[float]:
    """The gaps between a call's chunk messages as the client sees them (its inter-token latency, a batch's
    tokens arriving together)."""
    request = gateway_pb2.GenerateRequest(
        prompt="bench", parameters=common_pb2.GenerationParameters(max_new_tokens=max_new)
    )
    arrivals = [time.perf_counter() async for r in stub.Generate(request, timeout=60) if r.HasField("chunk")]
    return [b - a for a, b in itertools.pairwise(arrivals)]


async def path_figures(doc: dict[str, Any], seconds: float) -> dict[str, float]:
    """On a running `doc` (synthetic backend): tokens/s end to end and of the inference stage alone at 16
    streams as fast as read, TTFT p50/p99 at 1 stream (8 tokens a call)."""
    out: dict[str, float] = {}
    with running(doc) as run:
        async with channel(run.gateway) as gw, channel(f"127.0.0.1:{run.stages['inference'].port}") as inf:
            gateway, stage = gateway_pb2_grpc.GatewayStub(gw), stage_pb2_grpc.StageStub(inf)
            post = as_post(run)
            for _ in range(50):  # warm up channels and code paths
                await gateway_stream(gateway, 8)
            for name, fn in (
                ("pipeline tok/s", lambda: gateway_stream(gateway, 4000)),
                ("inference tok/s", lambda: stage_stream(stage, 4000, post)),
            ):
                start = time.perf_counter()
                results = await closed_loop(fn, 16, int(seconds * 8))
                out[name] = sum(r.tokens for r in results) / (time.perf_counter() - start)
            ttfts = [r.ttft for r in await closed_loop(lambda: gateway_stream(gateway, 8), 1, 400) if r.ttft]
            out["TTFT p50 ms"], out["TTFT p99 ms"] = pct(ttfts, 50) * 1000, pct(ttfts, 99) * 1000
    return out


def medians_of_alternating_rounds(
    rounds: int, configs: Sequence[C], measure: Callable[[C], dict[str, float]], label: Callable[[C], str]
) -> dict[C, dict[str, float]]:
    """Each config measured once a round, configs alternating within the round (a noisy minute hurts them
    alike), each measurement printed as it comes; every figure's median over the rounds, by config."""
    runs: dict[C, list[dict[str, float]]] = {c: [] for c in configs}
    for r in range(rounds):
        for config in configs:
            runs[config].append(measure(config))
            print(f"round {r + 1}, {label(config)}: {runs[config][-1]}", flush=True)
    return {c: {f: statistics.median(run[f] for run in runs[c]) for f in runs[c][0]} for c in configs}
