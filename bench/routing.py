"""Prefix-aware routing on this machine's CPU (issue 18's benchmark).

Three replicas of llama.cpp's OpenAI-compatible server (llama-cpp-python's, on SmolLM2-135M, one thread each,
with its prompt cache on) behind one pipeline (`openai` backend, the three as endpoints). The workload is a
chat product's: many conversations, each a long system prompt shared by all, an opening message of its own
(a document to talk about), then short questions turn after turn, each turn sending the whole history again.

Each routing policy runs it in turn, on freshly started replicas (empty caches), in one invocation:
round-robin, least-loaded, prefix with a session id, and prefix keyed by the prompt alone (no session id).
Reported per policy: TTFT p50/p95 at the client, output tokens/s, the prompt tokens each replica actually
evaluated (llama.cpp's own timings, from its log), and the inference stage's routing metrics, with each
replica's peak calls in flight against the bound.

    python -m bench.routing [--sessions 12] [--turns 8] [--concurrency 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.harness import channel, median, pct, running
from promptpipe.backends.llamacpp import default_model_path
from promptpipe.localproc import free_port
from promptpipe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from promptpipe.waiting import wait_until

REPLICAS = 3
LOAD_BOUND = 1.25
MAX_NEW_TOKENS = 16
# llama.cpp's own count of the prompt tokens it evaluated for one completion (the rest came from its cache).
EVALUATED = re.compile(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens")
WORDS = [
    "anchor",
    "basket",
    "cable",
    "drill",
    "engine",
    "filter",
    "gasket",
    "hinge",
    "insulation",
    "joist",
    "kettle",
    "ladder",
    "mortar",
    "nozzle",
    "outlet",
    "pulley",
    "quartz",
    "rivet",
    "socket",
    "trowel",
    "valve",
    "washer",
    "yoke",
    "zinc",
    "bracket",
    "clamp",
    "dowel",
    "flange",
    "grout",
    "lever",
]
SYSTEM = (
    "You are the support assistant of a hardware store. Answer in one short sentence, politely, using only "
    "what the customer's document says. "
    + " ".join(f"Rule {i}: never recommend a product that is not in stock, and name its aisle." for i in range(12))
)


@dataclass
class Replica:
    url: str
    log: Path
    proc: subprocess.Popen[bytes]

    def evaluated(self) -> list[int]:
        return [int(n) for n in EVALUATED.findall(self.log.read_text(errors="replace"))]


@contextlib.contextmanager
def replicas(folder: Path, count: int) -> Iterator[list[Replica]]:
    """`count` llama.cpp servers with their RAM prompt cache, one thread each, freshly started."""
    started: list[Replica] = []
    try:
        for i in range(count):
            port = free_port()
            log = folder / f"replica-{i}-{port}.log"
            args = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path())]
            args += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"]
            args += ["--cache", "true", "--cache_size", str(1 << 30), "--verbose", "true"]
            # Its default cuts a streaming completion short when the next request arrives: queue them instead.
            args += ["--interrupt_requests", "false"]
            with log.open("wb") as out:
                proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
            started.append(Replica(f"http://127.0.0.1:{port}", log, proc))
        for r in started:
            wait_until(
                lambda r=r: urllib.request.urlopen(r.url + "/v1/models", timeout=1).close() is None,
                "a llama.cpp server",
                120,
                retry_on=(OSError,),
            )
            body = json.dumps({"prompt": "Hello", "max_tokens": 1}).encode()
            request = urllib.request.Request(r.url + "/v1/completions", body, {"content-type": "application/json"})
            urllib.request.urlopen(request, timeout=60).close()  # weights paged in before anything is timed
        yield started
    finally:
        for r in started:
            r.proc.terminate()
        for r in started:
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                r.proc.kill()


def pipeline(urls: list[str], policy: str) -> dict[str, Any]:
    wide = {"queue": {"capacity": 64, "concurrency": 32}, "timeoutSeconds": 300}
    return {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": "routing"},
        "spec": {
            "model": {
                "name": "smollm2",
                "backend": "openai",
                "openai": {"endpoints": urls, "model": "smollm2", "readTimeoutSeconds": 300},
                "routing": {"policy": policy, "loadBound": LOAD_BOUND},
            },
            "template": {"system": SYSTEM, "maxPromptTokens": 1900},
            "generation": {"maxNewTokens": MAX_NEW_TOKENS, "temperature": 0},
            "rag": {"enabled": False},
            "stages": dict.fromkeys(("stream", "rag", "assemble", "inference", "post"), wide),
        },
    }


def opening(session: int) -> str:
    rng = random.Random(session)
    items = ", ".join(f"{rng.choice(WORDS)} {rng.randint(10, 999)} in aisle {rng.randint(1, 40)}" for _ in range(24))
    return f"My document, order {session}: {items}. Please keep it in mind."


@dataclass
class Measured:
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0


async def converse(stub: gateway_pb2_grpc.GatewayStub, session: int, turns: int, with_id: bool, out: Measured) -> None:
    history: list[common_pb2.ChatMessage] = []
    rng = random.Random(1000 + session)
    for turn in range(turns):
        question = opening(session) if turn == 0 else f"Is the {rng.choice(WORDS)} in stock, and where?"
        history.append(common_pb2.ChatMessage(role="user", content=question))
        request = gateway_pb2.GenerateRequest(
            session_id=f"conversation-{session}" if with_id else "",
            messages=history,
            parameters=common_pb2.GenerationParameters(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0),
        )
        started, first, answer = time.perf_counter(), None, ""
        try:
            async for response in stub.Generate(request, timeout=300):
                if response.HasField("chunk"):
                    first = first if first is not None else time.perf_counter() - started
                    answer += response.chunk.text
                    out.tokens += response.chunk.token_count
        except Exception:
            out.errors += 1
            return
        if first is not None:
            out.ttfts.append(first)
        history.append(common_pb2.ChatMessage(role="assistant", content=answer or "ok"))


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def peaks(url: str, stop: asyncio.Event, into: dict[str, int]) -> None:
    """The most calls the inference stage had open on each replica, sampled every 20 ms."""
    while not stop.is_set():
        for (name, labels), value in (await asyncio.to_thread(scrape, url)).items():
            if name == "promptpipe_backend_replica_in_flight":
                replica = dict(labels)["replica"]
                into[replica] = max(into.get(replica, 0), int(value))
        await asyncio.sleep(0.02)


@dataclass
class Row:
    name: str
    measured: Measured
    seconds: float
    evaluated: list[int]
    calls: list[int]
    peak: list[int]
    routed: dict[str, float]
    affinity: float


async def run_policy(folder: Path, name: str, policy: str, with_id: bool, args: argparse.Namespace) -> Row:
    with replicas(folder, REPLICAS) as reps:
        before = [len(r.evaluated()) for r in reps]
        with running(pipeline([r.url for r in reps], policy)) as run:
            metrics = f"http://127.0.0.1:{run.stages['inference'].metrics_port}/metrics"
            measured, peak, stop = Measured(), dict[str, int](), asyncio.Event()
            sampler = asyncio.create_task(peaks(metrics, stop, peak))
            async with channel(run.gateway) as ch:
                stub = gateway_pb2_grpc.GatewayStub(ch)
                queue = list(range(args.sessions))
                started = time.perf_counter()

                async def worker() -> None:
                    while queue:
                        await converse(stub, queue.pop(0), args.turns, with_id, measured)

                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                seconds = time.perf_counter() - started
            stop.set()
            await sampler
            samples = scrape(metrics)
        evaluated = [r.evaluated()[n:] for r, n in zip(reps, before, strict=True)]
        routed = {
            dict(labels)["reason"]: value
            for (metric, labels), value in samples.items()
            if metric == "promptpipe_backend_routed_total"
        }
        affinity = next(v for (metric, _), v in samples.items() if metric == "promptpipe_backend_affinity_ratio")
        return Row(
            name,
            measured,
            seconds,
            [sum(e) for e in evaluated],
            [len(e) for e in evaluated],
            [peak.get(r.url, 0) for r in reps],
            routed,
            affinity,
        )


def report(rows: list[Row], args: argparse.Namespace) -> None:
    calls = args.sessions * args.turns
    print(
        f"\n{args.sessions} conversations x {args.turns} turns ({calls} calls), {args.concurrency} at a time; "
        f"{REPLICAS} llama.cpp replicas (1 thread, prompt cache on); loadBound {LOAD_BOUND}\n"
    )
    head = (
        f"{'policy':<24}{'TTFT p50':>10}{'TTFT p95':>10}{'tok/s':>8}{'errors':>8}"
        f"{'prompt tokens evaluated':>32}{'calls':>14}{'peak in flight':>16}{'home/overflow/circuit':>24}"
        f"{'affinity':>10}"
    )
    print(head)
    base = median(rows[0].measured.ttfts)
    for row in rows:
        m = row.measured
        evaluated = f"{sum(row.evaluated):>6} ({'/'.join(str(e) for e in row.evaluated)})"
        routed = "/".join(f"{row.routed.get(k, 0):.0f}" for k in ("home", "overflow", "circuit"))
        print(
            f"{row.name:<24}{median(m.ttfts) * 1000:>8.0f}ms{pct(m.ttfts, 95) * 1000:>8.0f}ms"
            f"{m.tokens / row.seconds:>8.1f}{m.errors:>8}{evaluated:>32}{'/'.join(map(str, row.calls)):>14}"
            f"{'/'.join(map(str, row.peak)):>16}{routed:>24}{row.affinity:>10.2f}"
        )
    print()
    for row in rows[1:]:
        print(f"TTFT p50, {rows[0].name} / {row.name}: {base / median(row.measured.ttfts):.2f}x")
    mean = args.concurrency / REPLICAS
    bound = max(math.ceil(mean), math.floor(LOAD_BOUND * mean + 1e-9))  # as routing.Router.capacity
    print(f"bounded load: with {args.concurrency} calls open, no replica may hold more than {bound} at once")


async def main(args: argparse.Namespace) -> None:
    policies = [
        ("round-robin", "round-robin", True),
        ("least-loaded", "least-loaded", True),
        ("prefix (session id)", "prefix", True),
        ("prefix (prompt key)", "prefix", False),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, policy, with_id in policies:
            print(f"running {name} ...", flush=True)
            rows.append(await run_policy(Path(tmp), name, policy, with_id, args))
    report(rows, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
