"""The `tgi` backend against a server speaking TGI's wire protocol, through the pipeline."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import pytest

from promptpipe.cli.localrun import health_status
from promptpipe.contract.spec import StageName
from promptpipe.localproc import free_port
from promptpipe.stages.token_counts import TgiTokenCounter, approximate_tokens
from promptpipe.waiting import wait_until_async
from tests.support.calls import Outcome, collect
from tests.support.pipelines import synthetic_pipeline, tgi_server, tgi_stats

pytestmark = pytest.mark.processes


def tgi_pipeline(
    *urls: str, breaker: dict[str, object] | None = None, routing: dict[str, object] | None = None, **extra: object
) -> dict[str, object]:
    return synthetic_pipeline(
        model={
            "backend": "tgi",
            "tgi": {"endpoints": list(urls)},
            "circuitBreaker": breaker or {"failureThreshold": 100},
            "routing": routing or {},
        },
        generation={"maxNewTokens": 6},
        stages={"post": {"retries": {"maxAttempts": 1}}, "inference": {"retries": {"maxAttempts": 3}}},
        **extra,
    )


async def test_streams_tokens_and_finish_reason(start_pipeline) -> None:
    with tgi_server() as url:
        p = start_pipeline(tgi_pipeline(url))
        out = await collect(p.gateway, "hello")
        assert out.error is None
        assert out.text == " alpha bravo charlie delta echo foxtrot"
        assert out.summary is not None and out.summary.usage.completion_tokens == 6
        assert out.summary.finish_reason == 2  # LENGTH, from TGI's details.finish_reason


async def test_error_event_mid_stream_ends_call_with_explicit_status(start_pipeline) -> None:
    with tgi_server() as url:
        p = start_pipeline(tgi_pipeline(url))
        out = await collect(p.gateway, "fail-after:3")
        assert out.text == " alpha bravo charlie", "tokens streamed before the error are kept"
        assert out.error is not None and out.error.code is grpc.StatusCode.UNAVAILABLE
        assert "GenerationError" in out.error.message
        assert "CUDA" not in out.error.message, "backend internals are not passed to clients"
        assert tgi_stats(url)["started"] == 1, "nothing is retried once tokens were streamed"


async def test_overload_before_first_token_is_retried(start_pipeline) -> None:
    with tgi_server() as url:
        p = start_pipeline(tgi_pipeline(url))
        out = await collect(p.gateway, "overload:2")
        assert out.error is None and out.summary is not None
        assert tgi_stats(url)["overloaded"] == 2


async def test_persistent_overload_becomes_resource_exhausted(start_pipeline) -> None:
    with tgi_server() as url:
        p = start_pipeline(tgi_pipeline(url))
        out = await collect(p.gateway, "overload:9")
        assert out.error is not None and out.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert out.error.retry_after is not None and out.error.retry_after > 0
        assert tgi_stats(url)["overloaded"] == 3


async def test_circuit_opens_after_repeated_failures(start_pipeline) -> None:
    with tgi_server() as url:
        doc = tgi_pipeline(url)
        doc["spec"]["model"]["circuitBreaker"] = {"failureThreshold": 2, "resetSeconds": 60}
        doc["spec"]["stages"]["inference"]["retries"] = {"maxAttempts": 1}
        p = start_pipeline(doc)
        for _ in range(2):
            failed = await collect(p.gateway, "fail-after:0")
            assert failed.error is not None and failed.error.code is grpc.StatusCode.UNAVAILABLE
        fast = await collect(p.gateway, "hello")
        assert fast.error is not None and "circuit open" in fast.error.message
        assert tgi_stats(url)["started"] == 2, "an open circuit sends nothing to the backend"
        assert p.metric(StageName.INFERENCE, "promptpipe_backend_circuit_open") == 1


def replicas_serving(urls: dict[str, str], markers: list[str]) -> dict[str, Counter[str]]:
    """For each marker, which fake TGI replicas received prompts carrying it, and how often."""
    found: dict[str, Counter[str]] = {m: Counter() for m in markers}
    for name, url in urls.items():
        for prompt in tgi_stats(url)["prompts"]:
            for m in markers:
                if m in prompt:
                    found[m][name] += 1
    return found


async def test_a_session_or_a_conversation_keeps_its_replica_while_the_replicas_have_room(start_pipeline) -> None:
    with tgi_server("a") as a, tgi_server("b") as b:
        p = start_pipeline(tgi_pipeline(a, b))
        sessions = [f"user-{i}" for i in range(16)]
        for _round in range(2):
            for s in sessions:
                assert (await collect(p.gateway, f"session marker {s}.", session_id=s)).error is None
        # No session id: a conversation is known by its opening turn, which every later turn repeats.
        talks = [f"talk-{i}" for i in range(8)]
        chats: dict[str, list[tuple[str, str]]] = {t: [] for t in talks}
        for turn in range(3):
            for t in talks:
                chats[t].append(("user", f"turn {turn} of {t}"))
                out = await collect(p.gateway, "", messages=chats[t])
                assert out.error is None
                chats[t].append(("assistant", out.text))
        homes = replicas_serving({"a": a, "b": b}, [f"marker {s}." for s in sessions] + [f"of {t}" for t in talks])
        assert all(len(c) == 1 for c in homes.values()), {k: c for k, c in homes.items() if len(c) != 1}
        assert {name for c in homes.values() for name in c} == {"a", "b"}, "keys spread over both replicas"
        assert p.metric(StageName.INFERENCE, "promptpipe_backend_affinity_ratio") == 1.0


async def test_a_burst_on_one_session_overflows_past_its_home_within_the_bound_and_the_metrics_say_so(
    start_pipeline,
) -> None:
    with tgi_server("a") as a, tgi_server("b") as b, tgi_server("c") as c:
        p = start_pipeline(tgi_pipeline(a, b, c, routing={"loadBound": 1.25}))
        # Every call held open a while (slow:ms per token), all on one session: its home cannot take them all.
        results = await asyncio.gather(*(collect(p.gateway, "burst slow:150", session_id="hot") for _ in range(9)))
        assert all(r.error is None for r in results)
        stats = {name: tgi_stats(url) for name, url in (("a", a), ("b", b), ("c", c))}
        served = {name: s["finished"] for name, s in stats.items()}
        assert sum(served.values()) == 9 and all(served.values()), served
        # Bounded loads: never more than 1.25 x the mean of 9 / 3 (rounded down: 3) calls at once on one replica.
        most = {name: s["most_active"] for name, s in stats.items()}
        assert max(most.values()) <= 3, most
        home = p.metric(StageName.INFERENCE, "promptpipe_backend_routed_total", reason="home")
        overflow = p.metric(StageName.INFERENCE, "promptpipe_backend_routed_total", reason="overflow")
        assert home + overflow == 9 and overflow > 0 and home in served.values(), (home, overflow, served)
        ratio = p.metric(StageName.INFERENCE, "promptpipe_backend_affinity_ratio")
        assert ratio == pytest.approx(home / 9)
        for url in (a, b, c):
            assert p.metric(StageName.INFERENCE, "promptpipe_backend_replica_in_flight", replica=url) == 0


async def test_the_inference_stage_is_not_serving_while_every_circuit_is_open_and_serves_once_a_trial_is_due(
    start_pipeline,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every call fails to connect
    p = start_pipeline(tgi_pipeline(dead, breaker={"failureThreshold": 1, "resetSeconds": 4}))
    inference = p.target(StageName.INFERENCE)
    assert health_status(inference, 2.0) == "SERVING"
    out = await collect(p.gateway, "hello")
    assert out.error is not None and out.error.code is grpc.StatusCode.UNAVAILABLE
    opened = time.monotonic()
    await wait_until_async(lambda: health_status(inference, 2.0) == "NOT_SERVING", "NOT_SERVING", timeout=5)
    # After resetSeconds a trial call may go through: the stage says SERVING again, and is called again.
    await wait_until_async(lambda: health_status(inference, 2.0) == "SERVING", "SERVING again", timeout=10)
    assert time.monotonic() - opened >= 3.0
    assert p.metric(StageName.INFERENCE, "promptpipe_backend_circuit_open") == 1


async def test_a_half_open_trial_the_client_walks_away_from_does_not_leave_the_circuit_open(start_pipeline) -> None:
    with tgi_server() as url:
        doc = tgi_pipeline(url, breaker={"failureThreshold": 1, "resetSeconds": 2})
        doc["spec"]["stages"]["inference"]["retries"] = {"maxAttempts": 1}
        p = start_pipeline(doc)
        failed = await collect(p.gateway, "fail-after:0")  # the one endpoint's circuit opens
        assert failed.error is not None
        refused = await collect(p.gateway, "hello")
        assert refused.error is not None and "circuit open" in refused.error.message
        # A trial is due once resetSeconds have passed: the stage says it can serve again (read when scraped).
        serving = "promptpipe_stage_serving"
        await wait_until_async(lambda: p.metric(StageName.INFERENCE, serving) == 1, "a trial to be due", timeout=10)

        # The trial call: its client leaves after the first token, so it ends with no verdict.
        streaming = Outcome()
        trial = asyncio.create_task(collect(p.gateway, "slow:300", streaming))
        async with asyncio.timeout(10):
            await streaming.first_chunk.wait()
        trial.cancel()
        await wait_until_async(lambda: tgi_stats(url)["aborted"] >= 1, "the trial to be cut off", timeout=10)

        # Before: the trial stayed taken, and every call answered "circuit open" until the pod restarted.
        after = await collect(p.gateway, "hello")
        assert after.error is None and after.summary is not None, after.error
        assert p.metric(StageName.INFERENCE, "promptpipe_backend_circuit_open") == 0


async def test_the_prompt_budget_counts_with_tgis_tokenizer(start_pipeline) -> None:
    # 300 CJK characters: 75 tokens at four characters a token, 300 as TGI counts them.
    question = "你好" * 150
    with tgi_server() as url:
        p = start_pipeline(tgi_pipeline(url, template={"maxPromptTokens": 200}))
        out = await collect(p.gateway, question)
        assert out.error is not None and out.error.code is grpc.StatusCode.INVALID_ARGUMENT
        needs = int(out.error.message.split("needs ")[1].split()[0])
        assert out.error.message.startswith("messages: the question needs") and needs > 300
        assert tgi_stats(url)["tokenized"] >= 1
        fits = await collect(p.gateway, "你好" * 40)
        assert fits.error is None, fits.error


def test_token_counts_fall_back_to_a_bound_that_never_undercounts_when_tgi_cannot_answer() -> None:
    dead = TgiTokenCounter([f"http://127.0.0.1:{free_port()}"], timeout_seconds=1)
    assert dead("你好" * 150) == approximate_tokens("你好" * 150) == 900  # three bytes, three tokens each
    assert approximate_tokens("The quick brown fox") == 5
