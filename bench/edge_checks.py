"""What the gateway's and the stages' checks cost a call: TTFT through the whole pipeline (five services,
synthetic backend, API keys on), this tree against an earlier checkout, side by side, rounds alternating.

    git worktree add /tmp/before 7d450c3     # the code before the checks (issue 34)
    python -m bench.edge_checks --before-tree /tmp/before [--calls 400] [--rounds 3] [--bodies]

Each side runs in a process of its own with its own code (PYTHONPATH), the same pipeline file and the
same client: sequential calls (one at a time, so the figure is the path's, not a queue's), each with a
valid key, after a warm-up. Also the key check alone, per call (this tree's interceptor), in µs, and with
--bodies what 8 concurrent bodies of about 1 MiB cost this tree's gateway (RSS, and small calls meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

KEY = "pp-bench-key-0123456789abcdef0123456789abcdef"
DOC = {
    "apiVersion": "promptpipe.io/v1alpha1",
    "kind": "PromptPipeline",
    "metadata": {"name": "checks"},
    "spec": {
        "model": {"name": "synthetic", "backend": "synthetic", "synthetic": {"tokensPerSecond": 0}},
        "generation": {"maxNewTokens": 8},
        "rag": {"enabled": False},
    },
}


@contextlib.contextmanager
def _keyed_pipeline() -> Iterator[Any]:
    """The pipeline of DOC running locally with one API key (KEY), on whatever code PYTHONPATH gives."""
    import yaml

    from promptpipe.cli import localrun
    from promptpipe.contract.apikeys import hash_key

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PROMPTPIPE_HOME"] = tmp
        os.environ["PROMPTPIPE_API_KEYS"] = f"bench: {hash_key(KEY)}\n"
        path = Path(tmp) / "pipeline.yaml"
        path.write_text(yaml.safe_dump(DOC))
        run = localrun.start(path)
        try:
            localrun.wait_serving(run, 120)
            yield run
        finally:
            localrun.stop(run)


def _measure(calls: int) -> dict[str, float]:
    """In the child: start the pipeline with one key, time `calls` sequential calls' first token."""
    import grpc

    from promptpipe.v1 import gateway_pb2, gateway_pb2_grpc

    with _keyed_pipeline() as run:

        async def drive() -> list[float]:
            ttfts: list[float] = []
            async with grpc.aio.insecure_channel(run.gateway) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                for i in range(calls + 50):
                    started = time.perf_counter()
                    first = None
                    request = gateway_pb2.GenerateRequest(prompt="hello there")
                    async for r in stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),)):
                        if first is None and r.HasField("chunk"):
                            first = time.perf_counter() - started
                    if i >= 50 and first is not None:  # the first 50 warm the path up
                        ttfts.append(first)
            return ttfts

        ttfts = sorted(asyncio.run(drive()))
    return {"p50": statistics.median(ttfts), "p99": ttfts[int(0.99 * (len(ttfts) - 1))], "calls": len(ttfts)}


def _interceptor_us(interceptor: Any, method: str, metadata: tuple[tuple[str, str], ...], rounds: int) -> float:
    """A server interceptor's work before a call goes on (the call let through), per call, in µs."""
    import grpc

    class Details(grpc.HandlerCallDetails):  # type: ignore[misc]
        pass

    details = Details()
    details.method, details.invocation_metadata = method, metadata

    async def go_on(_: grpc.HandlerCallDetails) -> None:
        return None

    async def loop() -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            await interceptor.intercept_service(go_on, details)
        return (time.perf_counter() - started) / rounds * 1e6

    return asyncio.run(loop())


def _key_check_us(rounds: int = 20_000) -> float:
    """This tree's front door (the key check and the queue's answer, before a call goes on), per call, in µs."""
    from prometheus_client import CollectorRegistry

    from promptpipe.contract.apikeys import hash_key
    from promptpipe.contract.pipeline_file import parse_pipeline
    from promptpipe.gateway.front_door import FrontDoor
    from promptpipe.runtime.apikeys import KeyRing
    from promptpipe.runtime.stage import StageRuntime

    spec = parse_pipeline(DOC).spec
    runtime = StageRuntime.create("stream", spec.stages.stream, CollectorRegistry(), "checks", spec.auth)
    check = FrontDoor(KeyRing(inline=f"bench: {hash_key(KEY)}\n"), runtime)
    return _interceptor_us(check, "/promptpipe.v1.Gateway/Generate", (("authorization", f"Bearer {KEY}"),), rounds)


def _identity_check_us(rounds: int = 20_000) -> dict[str, float]:
    """This tree's stage identity, per call, in µs: the callee's interceptor with a token it has seen (the
    common case), its first check of a new token (the signature verified), and the caller's token."""

    from promptpipe.cli import local_identity
    from promptpipe.contract.identity import callers_of, subject
    from promptpipe.contract.pipeline_file import parse_pipeline
    from promptpipe.contract.spec import StageName
    from promptpipe.runtime.identity import CallerCheck, IdentityCheck, SignedToken, keys_file

    pipeline = parse_pipeline(DOC)
    with tempfile.TemporaryDirectory() as tmp:
        identity = local_identity.set_up(Path(tmp), pipeline)
        keys = keys_file(identity)
        check = CallerCheck(identity, callers_of(pipeline.spec, StageName.INFERENCE), keys)
        interceptor = IdentityCheck(check, "inference")
        post = subject(identity.namespace, identity.accounts[StageName.POST])
        signer = SignedToken(Path(identity.signing_key_file), keys.value, identity.audience, post)
        cached = _interceptor_us(interceptor, "/promptpipe.v1.Stage/Run", signer.metadata(), rounds)
        fresh = []
        now = time.time()
        for i in range(200):  # a new token each time (issued i seconds ago, still valid): a token's first call
            key = Path(identity.signing_key_file)
            token = SignedToken(key, keys.value, identity.audience, post, clock=lambda i=i: now - i).metadata()[0][1]
            started = time.perf_counter()
            check.caller_of(token)
            fresh.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        for _ in range(rounds):
            signer.metadata()
        sending = (time.perf_counter() - started) / rounds * 1e6
    return {"seen": cached, "first": statistics.median(fresh), "sending": sending}


def _bodies() -> None:
    """8 concurrent bodies at once, with a key, to this tree's gateway over HTTP: its RSS growth at the peak
    and after, and the latency of small calls made meanwhile (the event loop held)."""
    import threading
    import urllib.error
    import urllib.request

    import psutil

    def post(base: str, body: bytes) -> int:
        request = urllib.request.Request(
            f"{base}/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code

    part = {"type": "text", "text": "a"}
    kinds = {
        "33,000 one-letter parts": {"role": "user", "content": [part] * 33_000},
        "one 1 MiB string": {"role": "user", "content": "word " * (1_040_000 // 5)},
    }
    small = json.dumps({"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}).encode()
    print("8 concurrent bodies of about 1 MiB, with a key: the gateway's RSS, and small calls meanwhile")
    print(f"{'body':<26}{'statuses':>12}{'peak MiB':>10}{'after':>8}{'small p50 ms':>14}{'max ms':>8}")
    for name, message in kinds.items():
        body = json.dumps({"model": "synthetic", "messages": [message]}).encode()
        with _keyed_pipeline() as run:
            gateway = psutil.Process(run.stages["stream"].pid)
            post(run.openai_base_url, small)
            idle = gateway.memory_info().rss / 2**20
            peak, latencies, statuses, done = [idle], [], [], threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak.append(gateway.memory_info().rss / 2**20)
                    time.sleep(0.01)

            def calls() -> None:
                while not done.is_set():
                    started = time.perf_counter()
                    post(run.openai_base_url, small)
                    latencies.append(time.perf_counter() - started)

            helpers = [threading.Thread(target=sample), threading.Thread(target=calls)]
            senders = [
                threading.Thread(target=lambda: statuses.append(post(run.openai_base_url, body))) for _ in range(8)
            ]
            for t in [*helpers, *senders]:
                t.start()
            for t in senders:
                t.join()
            time.sleep(0.5)
            done.set()
            for t in helpers:
                t.join()
            after = gateway.memory_info().rss / 2**20
        codes = ",".join(sorted({str(c) for c in statuses}))
        latencies.sort()
        print(
            f"{name:<26}{codes:>12}{max(peak) - idle:>+10.1f}{after - idle:>+8.1f}"
            f"{statistics.median(latencies) * 1000:>14.1f}{latencies[-1] * 1000:>8.1f}"
        )


def _side(tree: Path | None, calls: int) -> dict[str, float]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = f"{tree / 'services'}:{tree}"
    out = subprocess.run(
        [sys.executable, __file__, "--measure", "--calls", str(calls)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-tree", type=Path, help="a checkout of the code before the checks")
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bodies", action="store_true", help="also: 8 concurrent 1 MiB bodies (memory, loop)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.calls)))
        return
    sides: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        if args.before_tree is not None:
            sides["before"].append(_side(args.before_tree, args.calls))
        sides["after"].append(_side(None, args.calls))
    print(f"TTFT through five services, API keys on, {args.calls} sequential calls a round; median of rounds")
    print(f"{'code':<8}{'p50 ms':>10}{'p99 ms':>10}")
    figures = {}
    for name, rounds in sides.items():
        if rounds:
            p50 = statistics.median(r["p50"] for r in rounds) * 1000
            p99 = statistics.median(r["p99"] for r in rounds) * 1000
            figures[name] = p50
            print(f"{name:<8}{p50:>10.2f}{p99:>10.2f}")
    if len(figures) == 2:
        print(f"after/before p50: {figures['after'] / figures['before']:.2f}x")
    print(f"the gateway's front door (key and queue) alone: {_key_check_us():.1f} µs a call")
    identity = _identity_check_us()
    print(
        f"stage identity, per call and hop: the callee's check {identity['seen']:.1f} µs (a token seen before), "
        f"{identity['first']:.0f} µs for a token's first call (signature verified); the caller's token "
        f"{identity['sending']:.2f} µs"
    )
    if args.bodies:
        _bodies()


if __name__ == "__main__":
    main()
